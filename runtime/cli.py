"""The `pagedserve` command: `serve` (control plane), `worker` (data plane), `generate` (a streaming client)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

_USAGE = """usage: pagedserve {serve,worker,generate} [options]

  serve      run the control plane (starts local workers unless --worker is given)
  worker     run a worker that holds the model and the KV cache
  generate   stream a completion from a running server

`pagedserve COMMAND --help` lists a command's options."""


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve generate", description="Stream a completion to stdout.")
    p.add_argument("prompt")
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    return p


async def _generate(args: argparse.Namespace) -> int:
    from pagedserve.clients.client import PagedServeClient, SamplingParams
    from pagedserve.clients.errors import PagedServeClientError

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop)
    for field in ("top_p", "top_k", "seed"):
        if getattr(args, field) is not None:
            setattr(params, field, getattr(args, field))
    async with PagedServeClient(args.server) as client:
        try:
            async for chunk in client.generate_stream(args.prompt, params, timeout_s=args.timeout):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except PagedServeClientError as error:
            print(f"\nerror: {error.code.name}: {error.message}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from pagedserve.control_plane.engine.main import main as serve_main

        return serve_main(rest)
    if command == "worker":
        from pagedserve.gpu_worker.main import main as worker_main

        return worker_main(rest)
    if command == "generate":
        return asyncio.run(_generate(_generate_parser().parse_args(rest)))
    print(f"pagedserve: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
