"""vLLM's engine protocol (vllm.grpc.engine.VllmEngine), served beside GenerationService for the Shepherd Model
Gateway: docs/vllm-engine-protocol.md."""
