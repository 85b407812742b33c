"""pagedserve: LLM serving with PagedAttention over gRPC."""
