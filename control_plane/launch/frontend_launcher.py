"""Starts and stops the frontend process of `pagedserve serve`, which holds the public server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import structlog

from pagedserve.control_plane.config import FRONTEND_API_KEYS_ENV, ServerConfig
from pagedserve.runtime.auth import SECRET_ENV, ClusterSecret
from pagedserve.runtime.logs import LogFormat, LogLevel

log = structlog.get_logger()

# The frontend lets open streams finish for up to 5 s after SIGTERM (frontend.py); a little more before SIGKILL.
_STOP_TIMEOUT_S = 10.0


class FrontendProcess:
    """The frontend child (frontend/main.py, through launch/frontend_child.py), connected to this engine's address."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def start(
        cls, engine_address: str, model_dir: Path, address: str, log_format: LogFormat,
        server: ServerConfig | None = None, max_num_seqs: int | None = None,
        cluster_secret: ClusterSecret | None = None, log_level: LogLevel = LogLevel.INFO, index: int = 0,
    ) -> FrontendProcess:
        """In a session of its own, so that signals for this process's group (Ctrl-C at a terminal) reach only
        the engine, which stops the frontend by stop(): a SIGINT of its own would start its drain, and the
        engine's SIGTERM would then end it at once. server's API keys go in its environment, never on its command
        line; its TLS files, chat template and max_num_seqs (the bound on a request's n) as flags. The cluster
        secret (which the engine service requires) goes in its environment too; it exits once this process is gone
        (--parent-pid). index: which of the server's frontends it is, unique among them (its relay ids carry it)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pagedserve.control_plane.launch.frontend_child", "--parent-pid", str(os.getpid()),
            "--engine", engine_address,
            "--model", str(model_dir), "--listen", address, "--log-format", log_format.value,
            "--log-level", log_level.value, "--frontend-index", str(index),
            *_public_flags(server, max_num_seqs), start_new_session=True,
            env=_with_secret(_public_env(server), cluster_secret),
        )
        log.info("frontend_started", pid=process.pid, index=index, engine=engine_address, address=address)
        return cls(process)

    async def wait(self) -> int:
        """Its exit code, once it has exited."""
        return await self._process.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after _STOP_TIMEOUT_S."""
        if self._process.returncode is not None:
            return
        self._process.terminate()
        try:
            await asyncio.wait_for(self._process.wait(), timeout=_STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._process.kill()
            await self._process.wait()


def _public_flags(server: ServerConfig | None, max_num_seqs: int | None) -> list[str]:
    flags = [] if max_num_seqs is None else ["--max-num-seqs", str(max_num_seqs)]
    if server is not None:
        for flag, path in (("--tls-cert-file", server.tls_cert_file), ("--tls-key-file", server.tls_key_file),
                           ("--tls-client-ca-file", server.tls_client_ca_file)):
            if path is not None:
                flags += [flag, str(path.resolve())]
        if server.chat_template is not None:
            flags += ["--chat-template", server.chat_template]  # the frontend runs in this process's directory
    return flags


def _public_env(server: ServerConfig | None) -> dict[str, str]:
    """This process's environment with server's API keys (newline-separated) in FRONTEND_API_KEYS_ENV, and only
    those: a value this process inherited is not passed on."""
    env = {name: value for name, value in os.environ.items() if name != FRONTEND_API_KEYS_ENV}
    if server is not None and server.api_keys:
        env[FRONTEND_API_KEYS_ENV] = "\n".join(server.api_keys)
    return env


def _with_secret(env: dict[str, str], secret: ClusterSecret | None) -> dict[str, str]:
    """env with secret in SECRET_ENV (which the frontend's engine client sends), or without that variable."""
    env = {name: value for name, value in env.items() if name != SECRET_ENV}
    if secret is not None:
        env[SECRET_ENV] = secret.value
    return env
