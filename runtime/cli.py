"""The `pagedserve` command: `serve` (control plane), `worker` (data plane), `generate` and `chat` (streaming
clients)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.clients.client import SamplingParams

_USAGE = """usage: pagedserve {serve,worker,generate,chat} [options]

  serve      run the control plane (starts local workers unless --worker is given)
  worker     run a worker that holds the model and the KV cache
  generate   stream a completion from a running server
  chat       chat with a running server (its model's chat template), interactively or with --message

`pagedserve COMMAND --help` lists a command's options."""


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve generate", description="Stream a completion to stdout.")
    p.add_argument("prompt")
    _add_sampling_flags(p)
    return p


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The server and sampling flags that generate and chat share."""
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--timeout", type=float, help="deadline in seconds")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    from pagedserve.clients.client import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop)
    for field in ("top_p", "top_k", "seed"):
        if getattr(args, field) is not None:
            setattr(params, field, getattr(args, field))
    return params


async def _generate(args: argparse.Namespace) -> int:
    from pagedserve.clients.client import PagedServeClient
    from pagedserve.clients.errors import PagedServeClientError

    params = _sampling_params(args)
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


def _chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pagedserve chat",
        description="Chat with a server's model (its chat template). Without --message: one user turn per line read "
                    "(the conversation so far goes with each), until end of input or /exit; /reset forgets it.",
    )
    p.add_argument("--message", help="send this one user message, print the reply and exit")
    p.add_argument("--system", help="a system message that opens the conversation")
    _add_sampling_flags(p)
    return p


async def _chat(args: argparse.Namespace) -> int:
    from pagedserve.clients.client import PagedServeClient
    from pagedserve.clients.errors import PagedServeClientError

    params = _sampling_params(args)
    opening = [] if args.system is None else [{"role": "system", "content": args.system}]
    history = list(opening)
    is_interactive = args.message is None and sys.stdin.isatty()
    async with PagedServeClient(args.server) as client:
        while True:
            line = args.message if args.message is not None else _read_turn(is_interactive)
            if line is None or line.strip() == "/exit":
                return 0
            if line.strip() == "/reset":
                history = list(opening)
                continue
            turn = [*history, {"role": "user", "content": line}]
            reply: list[str] = []
            try:
                async for chunk in client.chat_stream(turn, params, timeout_s=args.timeout):
                    reply.append(chunk.text)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            except PagedServeClientError as error:
                print(f"\nerror: {error.code.name}: {error.message}", file=sys.stderr)
                if args.message is not None:
                    return 1
                continue  # the turn is forgotten; the conversation goes on
            sys.stdout.write("\n")
            if args.message is not None:
                return 0
            history = [*turn, {"role": "assistant", "content": "".join(reply)}]


def _read_turn(is_interactive: bool) -> str | None:
    """The next line of input (prompted at a terminal); None at its end."""
    try:
        return input("> ") if is_interactive else input()
    except EOFError:
        return None


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
    if command == "chat":
        return asyncio.run(_chat(_chat_parser().parse_args(rest)))
    print(f"pagedserve: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
