"""Generated protocol of pagedserve, version 1 (see the .proto files beside this)."""
