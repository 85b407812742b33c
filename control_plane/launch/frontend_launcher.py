"""Starts and stops the frontend process of `pagedserve serve`, which holds the public server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import structlog

from pagedserve.runtime.logs import LogFormat

log = structlog.get_logger()

# The frontend lets open streams finish for up to 5 s after SIGTERM (frontend.py); a little more before SIGKILL.
_STOP_TIMEOUT_S = 10.0


class FrontendProcess:
    """The frontend child (`python -m pagedserve.control_plane.frontend.main`), connected to this engine's address."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def start(cls, engine_address: str, model_dir: Path, address: str, log_format: LogFormat) -> FrontendProcess:
        """In a session of its own, so that signals for this process's group (Ctrl-C at a terminal) reach only
        the engine, which stops the frontend by stop(): a SIGINT of its own would start its drain, and the
        engine's SIGTERM would then end it at once."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pagedserve.control_plane.frontend.main", "--engine", engine_address,
            "--model", str(model_dir), "--listen", address, "--log-format", log_format.value,
            start_new_session=True,
        )
        log.info("frontend_started", pid=process.pid, engine=engine_address, address=address)
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
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
