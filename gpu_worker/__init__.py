"""GPU worker: weights, paged KV pools, model runner and the worker gRPC service."""
