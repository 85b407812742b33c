"""Control plane (CPU only): request queue, scheduler, global block tables and the public gRPC service.

Sub-packages by process and role: frontend/ (frontend process), engine/ (engine process), scheduling/ and text/
(run by the engine), relay/ (the protocol between the two), launch/ (what serve starts beside the engine).
"""
