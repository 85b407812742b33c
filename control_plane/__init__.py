"""Control plane: request queue, scheduler, global block tables and the public gRPC service (CPU only)."""
