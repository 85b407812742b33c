"""What every pagedserve process runs on: logging, signals, the garbage collector's and the GIL's settings, gRPC
channel options, and the `pagedserve` command that starts the processes."""
