"""A benchmark's child process that ends with the benchmark, however the benchmark ends.

    python -m benchmarks.tethered PARENT_PID MODULE [ARG ...]

runs MODULE as `python -m MODULE ARG ...` would, once runtime.parent_watch watches PARENT_PID. A benchmark stopped by
a signal that runs no clean-up (SIGKILL, or SIGTERM's default action: a timeout's) then leaves no server behind,
still loading or serving on the device while the next run is measured.
"""

from __future__ import annotations

import runpy
import sys

from pagedserve.runtime.parent_watch import exit_when_parent_dies


def main(argv: list[str]) -> None:
    parent_pid, module, *args = argv
    exit_when_parent_dies(int(parent_pid))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
