"""The frontend process as `serve` starts it: first it arranges to exit once the engine that started it is gone,
however the engine died (SIGKILL included), then it runs the frontend (control_plane/frontend/main.py).

The frontend also exits when its relay to the engine ends; the watch covers what that misses: an engine that dies
before the frontend has connected to it (the frontend waits up to a minute for an engine that starts slowly).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pagedserve.control_plane.frontend.main import main as frontend_main
from pagedserve.runtime.parent_watch import exit_when_parent_dies


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--parent-pid", type=int, required=True, help="the engine process's pid")
    args, frontend_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    exit_when_parent_dies(args.parent_pid)
    return frontend_main(frontend_argv)


if __name__ == "__main__":
    raise SystemExit(main())
