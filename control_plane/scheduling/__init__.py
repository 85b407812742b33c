"""One worker's scheduling and memory: requests, the token-budget scheduler, block tables, prefix cache, preemption.

Runs in the engine process; plain Python, no protobuf.
"""
