"""The step contract: plain frozen data that crosses the control-plane/worker boundary, and its one protobuf codec.

Both planes import it; it imports neither plane, nor torch, nor grpc.
"""
