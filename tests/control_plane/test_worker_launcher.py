"""LocalWorkers with --tensor-parallel-size: the processes of each group, their GPUs and flags, and restarts of a
group as a unit (processes recorded, not started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.control_plane.launch import worker_launcher
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, WorkerLaunchConfig


class FakeProcess:
    """A recorded worker process: its command line and environment; running until killed or told it exited."""

    def __init__(self, command: list[str], env: dict[str, str], start_new_session: bool) -> None:
        self.command = command
        self.env = env
        self.pid = id(self)
        self.returncode: int | None = None
        self.was_killed = False

    def flag(self, name: str) -> str | None:
        return self.command[self.command.index(name) + 1] if name in self.command else None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.was_killed, self.returncode = True, -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[FakeProcess]:
    processes: list[FakeProcess] = []

    def popen(command: list[str], env: dict[str, str], start_new_session: bool) -> FakeProcess:
        processes.append(FakeProcess(command, env, start_new_session))
        return processes[-1]

    monkeypatch.setattr(f"{worker_launcher.__name__}.subprocess.Popen", popen)
    return processes


def test_each_worker_is_a_group_of_ranks_that_see_the_groups_gpus(started: list[FakeProcess]) -> None:
    workers = LocalWorkers(WorkerLaunchConfig(Path("m"), num_workers=2, tensor_parallel_size=2))
    addresses = workers.start()

    assert [p.flag("--tp-rank") for p in started] == ["0", "1", "0", "1"]
    assert [p.flag("--listen") for p in started] == [addresses[0]] * 2 + [addresses[1]] * 2
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in started] == ["0,1", "0,1", "2,3", "2,3"]
    rendezvous = [p.flag("--tp-rendezvous") for p in started]
    assert rendezvous[0] == rendezvous[1] != rendezvous[2] == rendezvous[3]
    assert {p.flag("--tp-size") for p in started} == {"2"}


def test_one_rank_per_worker_gets_no_tensor_parallel_flags(started: list[FakeProcess]) -> None:
    LocalWorkers(WorkerLaunchConfig(Path("m"))).start()

    assert [(p.flag("--tp-size"), p.flag("--tp-rank"), "CUDA_VISIBLE_DEVICES" in p.env) for p in started] == [
        (None, None, False)]


def test_a_group_whose_follower_exited_is_not_alive_and_restarts_whole(started: list[FakeProcess]) -> None:
    workers = LocalWorkers(WorkerLaunchConfig(Path("m"), num_workers=2, tensor_parallel_size=2))
    workers.start()
    started[3].returncode = 1  # worker 1's rank 1 died

    with pytest.raises(RuntimeError, match="exited with code 1"):
        workers.check_alive(1)
    workers.check_alive(0)
    address = workers.restart(1)

    assert [p.was_killed for p in started[:4]] == [False, False, True, False]  # its leader killed; the dead one reaped
    assert [p.flag("--tp-rank") for p in started[4:]] == ["0", "1"]
    assert address == started[4].flag("--listen") == started[5].flag("--listen") != started[2].flag("--listen")
    assert started[4].flag("--tp-rendezvous") not in {started[2].flag("--tp-rendezvous"), None}
