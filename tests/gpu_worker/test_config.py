"""WorkerConfig validation and the worker's command-line flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.main import build_parser, config_from_args
from pagedserve.gpu_worker.parallel.config import TensorParallelConfig
from pagedserve.runtime.flags import parse_args


def test_flags_build_the_worker_config() -> None:
    args = build_parser().parse_args([
        "--model", "/models/m", "--listen", "0.0.0.0:0", "--dtype", "bfloat16", "--device", "cpu",
        "--load-format", "dummy", "--seed", "7", "--worker-id", "w3", "--cpu-threads", "3",
    ])

    assert config_from_args(args) == WorkerConfig(
        model_dir=Path("/models/m"), dtype=DType.BFLOAT16, device=DeviceKind.CPU, load_format=LoadFormat.DUMMY,
        seed=7, listen_address="0.0.0.0:0", worker_id="w3", cpu_threads=3,
    )


def test_cpu_threads_default_to_the_cores_this_process_may_use() -> None:
    config = config_from_args(build_parser().parse_args(["--model", "m"]))

    assert config.cpu_threads == len(os.sched_getaffinity(0))


def test_enforce_eager_flag_turns_cuda_graphs_off() -> None:
    args = build_parser().parse_args(["--model", "m", "--enforce-eager"])

    assert (config_from_args(args).enforce_eager, WorkerConfig(model_dir=Path("m")).enforce_eager) == (True, False)


def test_no_dependent_launch_flag_and_variable_turn_dependent_launches_off() -> None:
    on = config_from_args(build_parser().parse_args(["--model", "m"]))
    off = config_from_args(build_parser().parse_args(["--model", "m", "--no-dependent-launch"]))
    from_variable = config_from_args(parse_args(build_parser(), ["--model", "m"],
                                                {"PAGEDSERVE_NO_DEPENDENT_LAUNCH": "true"}))

    assert (on.dependent_launch, off.dependent_launch, from_variable.dependent_launch) == (True, False, False)


def test_quantize_lm_head_flag_is_off_unless_given() -> None:
    given = config_from_args(build_parser().parse_args(["--model", "m", "--quantization", "fp8", "--quantize-lm-head"]))
    default = config_from_args(build_parser().parse_args(["--model", "m", "--quantization", "fp8"]))

    assert (given.quantize_lm_head, default.quantize_lm_head) == (True, False)


def test_batch_invariant_flag_is_off_unless_given() -> None:
    given = config_from_args(build_parser().parse_args(["--model", "m", "--device", "cpu", "--batch-invariant"]))
    default = config_from_args(build_parser().parse_args(["--model", "m"]))

    assert (given.batch_invariant, default.batch_invariant) == (True, False)


def test_flag_defaults_listen_on_loopback_with_automatic_choices() -> None:
    config = config_from_args(build_parser().parse_args(["--model", "m"]))

    assert (config.listen_address, config.dtype, config.device, config.load_format, config.seed) == (
        "127.0.0.1:50061", DType.AUTO, DeviceKind.AUTO, LoadFormat.AUTO, 0)


@pytest.mark.parametrize("address", ["localhost", ":50061", "host:port", "host:70000"])
def test_listen_address_must_be_host_and_port(address: str) -> None:
    with pytest.raises(ValueError, match="listen_address"):
        WorkerConfig(model_dir=Path("m"), listen_address=address)


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        WorkerConfig(model_dir=Path("m"), seed=-1)


def test_tensor_parallel_flags_place_the_worker_in_its_group() -> None:
    args = build_parser().parse_args(["--model", "m", "--tp-size", "4", "--tp-rank", "3",
                                      "--tp-rendezvous", "10.0.0.5:29500", "--tp-timeout", "20"])

    assert config_from_args(args).tensor_parallel == TensorParallelConfig(3, 4, "10.0.0.5:29500", 20.0)
    assert WorkerConfig(model_dir=Path("m")).tensor_parallel == TensorParallelConfig(0, 1, None, 60.0)


@pytest.mark.parametrize(("rank", "size", "rendezvous", "message"), [
    (2, 2, "127.0.0.1:29500", "tp_rank must be in \\[0, 2\\), got 2"),
    (0, 2, None, "tp_rendezvous must be HOST:PORT with tp_size 2, got None"),
    (0, 0, None, "tp_size must be at least 1, got 0"),
])
def test_a_rank_outside_its_group_or_a_group_without_rendezvous_is_rejected(
    rank: int, size: int, rendezvous: str | None, message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        TensorParallelConfig(rank, size, rendezvous)
