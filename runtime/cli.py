"""The `pagedserve` command: `serve` (control plane), `worker` (data plane), `generate` and `chat` (streaming
clients)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from pagedserve.runtime.flags import EPILOG, parse_args

if TYPE_CHECKING:
    from pagedserve.contract.sampling_params import SamplingParams

_USAGE = """usage: pagedserve {serve,worker,generate,chat} [options]

  serve      run the control plane (starts local workers unless --worker is given)
  worker     run a worker that holds the model and the KV cache
  generate   stream a completion from a running server
  chat       chat with a running server (its model's chat template), interactively or with --message

`pagedserve COMMAND --help` lists a command's options; every option may also be given as an environment variable
PAGEDSERVE_<OPTION> (docs/configuration.md). `pagedserve --version` prints the version."""


def pagedserve_version() -> str:
    try:
        return version("pagedserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve generate", description="Stream a completion to stdout.",
                                epilog=EPILOG)
    p.add_argument("prompt", help="the prompt text")
    _add_client_flags(p)
    return p


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    """The server and sampling flags generate and chat share; the sampling defaults are SamplingParams' (vLLM's),
    as for every other way in."""
    from pagedserve.contract.sampling_params import SamplingParams

    defaults = SamplingParams()
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of a pagedserve server (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                   help="most tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="softmax temperature; 0 is greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p,
                   help="nucleus sampling mass in (0, 1] (default %(default)s)")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="sample among the k likeliest tokens; 0: all")
    p.add_argument("--seed", type=int, help="seed of this request's sampling (default: unseeded)")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--api-key", help="sent as 'authorization: Bearer KEY' (a server started with --api-key)")
    p.add_argument("--timeout", type=float, help="deadline in seconds (default: none)")


def _sampling_params(command: str, args: argparse.Namespace) -> SamplingParams | None:
    """The flags' sampling params; None, having said why on stderr, when they are invalid."""
    from pagedserve.contract.errors import InvalidArgumentError
    from pagedserve.contract.sampling_params import SamplingParams

    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    except InvalidArgumentError as error:
        print(f"pagedserve {command}: error: {error}", file=sys.stderr)
        return None


async def _generate(args: argparse.Namespace) -> int:
    from pagedserve.clients.client import PagedServeClient
    from pagedserve.clients.errors import PagedServeClientError

    params = _sampling_params("generate", args)
    if params is None:
        return 2
    async with PagedServeClient(args.server, api_key=args.api_key) as client:
        try:
            async for chunk in client.generate_stream(args.prompt, params, timeout_s=args.timeout):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except PagedServeClientError as error:
            print(f"\nerror: {error.code.name}: {error.message}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0


def chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pagedserve chat",
        description="Chat with a server's model (its chat template). Without --message: one user turn per line read "
                    "(the conversation so far goes with each), until end of input or /exit; /reset forgets it.",
        epilog=EPILOG,
    )
    p.add_argument("--message", help="send this one user message, print the reply and exit")
    p.add_argument("--system", help="a system message that opens the conversation")
    _add_client_flags(p)
    return p


async def _chat(args: argparse.Namespace) -> int:
    from pagedserve.clients.client import PagedServeClient
    from pagedserve.clients.errors import PagedServeClientError

    params = _sampling_params("chat", args)
    if params is None:
        return 2
    opening = [] if args.system is None else [{"role": "system", "content": args.system}]
    history = list(opening)
    is_interactive = args.message is None and sys.stdin.isatty()
    async with PagedServeClient(args.server, api_key=args.api_key) as client:
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
    if command == "--version":
        print(f"pagedserve {pagedserve_version()}")
        return 0
    if command == "serve":
        from pagedserve.control_plane.engine.main import main as serve_main

        return serve_main(rest)
    if command == "worker":
        from pagedserve.gpu_worker.main import main as worker_main

        return worker_main(rest)
    if command == "generate":
        return asyncio.run(_generate(parse_args(generate_parser(), rest, os.environ)))
    if command == "chat":
        return asyncio.run(_chat(parse_args(chat_parser(), rest, os.environ)))
    print(f"pagedserve: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
