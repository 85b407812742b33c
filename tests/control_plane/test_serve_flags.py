"""`pagedserve serve` flags and PAGEDSERVE_* variables for the model format, parsed into the contract's enums."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat
from pagedserve.control_plane.config import ServerConfig
from pagedserve.control_plane.engine.main import build_parser, configs_from_args
from pagedserve.runtime.flags import parse_args


def _server(argv: list[str]) -> ServerConfig:
    return configs_from_args(parse_args(build_parser(), argv, os.environ))[0]


def test_model_format_flags_become_enums() -> None:
    server = _server(["--dtype", "bfloat16", "--device", "cpu", "--load-format", "dummy"])

    assert (server.dtype, server.device, server.load_format) == (DType.BFLOAT16, DeviceKind.CPU, LoadFormat.DUMMY)


def test_model_format_defaults_are_auto() -> None:
    server = _server([])

    assert (server.dtype, server.device, server.load_format) == (DType.AUTO, DeviceKind.AUTO, LoadFormat.AUTO)


def test_environment_sets_the_default_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_DTYPE", "float16")
    monkeypatch.setenv("PAGEDSERVE_LOAD_FORMAT", "dummy")

    server = _server(["--load-format", "safetensors"])

    assert (server.dtype, server.load_format) == (DType.FLOAT16, LoadFormat.SAFETENSORS)


def test_help_lists_the_plain_values() -> None:
    text = " ".join(build_parser().format_help().split())

    assert ("--dtype {auto,float32,bfloat16,float16}" in text, "--device {auto,cpu,cuda}" in text,
            "--load-format {auto,safetensors,dummy}" in text) == (True, True, True)


def test_unknown_value_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dtype", "int8"])

    assert "--dtype" in capsys.readouterr().err


def test_parsing_the_serve_flags_imports_neither_torch_nor_the_worker() -> None:
    code = (
        "import sys; from pagedserve.control_plane.engine.main import build_parser; "
        "build_parser().parse_args(['--dtype', 'bfloat16']); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('pagedserve.gpu_worker')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_tensor_parallel_size_flag_and_variable_size_each_local_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (_server([]).tensor_parallel_size, _server(["-tp", "2"]).tensor_parallel_size) == (1, 2)
    monkeypatch.setenv("PAGEDSERVE_TENSOR_PARALLEL_SIZE", "4")
    assert _server([]).tensor_parallel_size == 4


def test_tensor_parallel_size_is_refused_with_external_workers() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size applies to local workers"):
        _server(["--model", "m", "--worker", "10.0.0.5:50061", "--tensor-parallel-size", "2"])


def test_no_dependent_launch_reaches_local_workers_and_is_refused_with_external_ones() -> None:
    assert (_server([]).dependent_launch, _server(["--no-dependent-launch"]).dependent_launch) == (True, False)
    with pytest.raises(ValueError, match="give each external worker --no-dependent-launch"):
        _server(["--model", "m", "--worker", "10.0.0.5:50061", "--no-dependent-launch"])


def test_quantize_lm_head_reaches_local_workers_and_is_refused_with_external_ones() -> None:
    # Whether the weights are FP8 (a flag, or an FP8 checkpoint) is the worker's to check, when it loads them.
    assert (_server(["--quantize-lm-head"]).quantize_lm_head, _server([]).quantize_lm_head) == (True, False)
    with pytest.raises(ValueError, match="--quantize-lm-head\\) instead"):
        _server(["--model", "m", "--worker", "10.0.0.5:50061", "--quantize-lm-head"])


def test_batch_invariant_reaches_local_workers_and_is_refused_with_external_ones() -> None:
    assert (_server(["--batch-invariant"]).batch_invariant, _server([]).batch_invariant) == (True, False)
    with pytest.raises(ValueError, match="give each external worker --batch-invariant"):
        _server(["--model", "m", "--worker", "10.0.0.5:50061", "--batch-invariant"])


def test_prefix_caching_false_in_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_ENABLE_PREFIX_CACHING", "false")

    cache = configs_from_args(parse_args(build_parser(), [], os.environ))[2]
    flagged = configs_from_args(parse_args(build_parser(), ["--enable-prefix-caching"], os.environ))[2]

    assert (cache.enable_prefix_caching, flagged.enable_prefix_caching) == (False, True)
