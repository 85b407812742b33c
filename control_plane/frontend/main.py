"""The frontend process of `pagedserve serve`: the public gRPC server, tokenization and the clients' streams.

`pagedserve serve` starts it once its engine listens (frontend_launcher.py). Client
streams cost the process that sends them tens of microseconds per message; here they do not slow the engine's
loop, which plans steps and exchanges them with the workers (docs/architecture.md, "Two control-plane
processes"). Wiring only.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve.control_plane.config import FRONTEND_API_KEYS_ENV
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.frontend.service import GenerationServicer, PublicAccess, build_server
from pagedserve.control_plane.frontend.vllm_engine.servicer import (
    SERVICE_NAME as VLLM_ENGINE_SERVICE_NAME,
)
from pagedserve.control_plane.frontend.vllm_engine.servicer import (
    VllmEngineServicer,
    add_vllm_engine_service,
)
from pagedserve.control_plane.text.chat_template import ChatTemplate, load_chat_template
from pagedserve.control_plane.text.constraint_validator import ConstraintValidator
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.runtime.auth import ClusterSecret, inherited_cluster_secret
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import add_log_flags, configure_logging
from pagedserve.runtime.stop_signal import stopped_by_signal
from pagedserve.v1 import generation_service_pb2

log = structlog.get_logger()

_ENGINE_ANSWER_TIMEOUT_S = 60.0
# The whole server (""), the generation service and vLLM's engine protocol report the same health.
_HEALTH_SERVICE_NAMES = (
    "", generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name, VLLM_ENGINE_SERVICE_NAME,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pagedserve.control_plane.frontend.main",
                                description="The public server of `pagedserve serve` (started by it).")
    p.add_argument("--engine", required=True, help="the engine process's EngineService address")
    p.add_argument("--model", type=Path, required=True, help="model directory (its tokenizer)")
    p.add_argument("--listen", required=True, help="public HOST:PORT")
    p.add_argument("--frontend-index", type=int, default=0,
                   help="which of the server's frontends this is (they share the public port)")
    add_log_flags(p)
    p.add_argument("--max-num-seqs", type=int, help="the schedulers' max_num_seqs: a request's n may not exceed it")
    p.add_argument("--tls-cert-file", type=Path, help="PEM certificate chain: serve over TLS")
    p.add_argument("--tls-key-file", type=Path, help="PEM private key of --tls-cert-file")
    p.add_argument("--tls-client-ca-file", type=Path, help="PEM CA certificates that must sign clients' (mTLS)")
    p.add_argument("--chat-template", help="Chat's template: a file or the template's text (default: the model's)")
    return p


def _public_access(args: argparse.Namespace) -> PublicAccess:
    """The TLS files' contents, and the API keys `serve` handed down in FRONTEND_API_KEYS_ENV."""
    keys = tuple(key for key in os.environ.get(FRONTEND_API_KEYS_ENV, "").splitlines() if key)
    return PublicAccess(
        api_keys=keys,
        tls_certificate_chain=args.tls_cert_file.read_bytes() if args.tls_cert_file else None,
        tls_private_key=args.tls_key_file.read_bytes() if args.tls_key_file else None,
        tls_client_ca=args.tls_client_ca_file.read_bytes() if args.tls_client_ca_file else None,
    )


async def run_frontend(
    engine_address: str, model_dir: Path, address: str, access: PublicAccess | None = None,
    max_num_seqs: int | None = None, secret: ClusterSecret | None = None, chat_template: str | None = None,
    frontend_index: int = 0,
) -> int:
    """Serves until SIGINT/SIGTERM (0) or until the engine process goes away (1). chat_template: the template's
    text (None: the model's)."""
    engine = EngineClient(engine_address, secret, frontend_index)
    model = await engine.describe(_ENGINE_ANSWER_TIMEOUT_S)
    tokenizer = Tokenizer(model_dir)
    engine.start()
    constraints = ConstraintValidator(tokenizer, model.vocab_size)  # one vocabulary index and cache for both services
    servicer = GenerationServicer(engine, tokenizer, model, max_num_seqs, ChatTemplate(tokenizer, chat_template),
                                  constraints)
    # vLLM's engine protocol on the same port, under the same keys and TLS (docs/vllm-engine-protocol.md).
    vllm_engine = VllmEngineServicer(engine, tokenizer, model, model_dir, constraints, max_num_seqs)
    server, port = await build_server(servicer, address, access, (
        functools.partial(add_vllm_engine_service, vllm_engine),
    ))
    # The public health follows the engine's (DESIGN.md section 9, "Health never lies"). This servicer takes over
    # from the one build_server registers: the last one registered for a service answers its calls.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    set_serving = functools.partial(_set_health, health_servicer)
    await set_serving(False)  # until the engine's first report
    follower = asyncio.create_task(engine.follow_health(set_serving), name="engine-health")
    await server.start()
    freeze_startup_objects()
    log.info("server_listening", address=f"{address.rsplit(':', 1)[0]}:{port}", frontend_index=frontend_index,
             model=model.name, max_model_len=model.max_model_len, num_gpu_blocks=model.num_gpu_blocks)
    stopped = await stopped_by_signal(engine.closed.wait())
    follower.cancel()
    await set_serving(False)  # at once: load balancers stop sending while open streams finish
    log.info("server_stopping")
    await server.stop(grace=5.0)
    await engine.close()
    return 0 if stopped else 1


async def _set_health(health_servicer: health.aio.HealthServicer, is_serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in _HEALTH_SERVICE_NAMES:
        await health_servicer.set(name, status)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level.number)
    use_short_turns()
    # The engine that starts this process hands it the cluster secret in its environment (never on a command line).
    secret = inherited_cluster_secret(os.environ)
    chat_template = None if args.chat_template is None else load_chat_template(args.chat_template)
    return asyncio.run(run_frontend(
        args.engine, args.model, args.listen, _public_access(args), args.max_num_seqs, secret, chat_template,
        args.frontend_index,
    ))


if __name__ == "__main__":
    raise SystemExit(main())
