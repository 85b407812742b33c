"""A model directory is checked before any process starts: each defect is one line naming the flag and the fix."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.contract.model_dir import (
    SUPPORTED_ARCHITECTURES,
    ModelDirError,
    check_model_dir,
    check_tokenizer_dir,
)
from pagedserve.control_plane.config import ServerConfig
from pagedserve.control_plane.engine.main import check_model
from pagedserve.gpu_worker.models.model_config import Architecture


def _model(tmp_path: Path, stories: Path, architecture: str = "LlamaForCausalLM", *files: str) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((stories / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    for name in files:
        shutil.copy(stories / name, model / name)
    return model


def test_the_served_model_passes(stories260k_dir: Path) -> None:
    check_model_dir(stories260k_dir)

    assert check_tokenizer_dir(stories260k_dir) == stories260k_dir


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match=r"^--model .*/absent: no such directory$"):
        check_model_dir(tmp_path / "absent")


def test_a_hub_id_gets_the_download_command() -> None:
    with pytest.raises(ModelDirError, match="hf download meta-llama/Llama-3.2-1B --local-dir DIR"):
        check_model_dir(Path("meta-llama/Llama-3.2-1B"))


def test_a_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="not a Hugging Face model directory"):
        check_model_dir(tmp_path)


def test_an_unsupported_architecture_lists_the_supported_ones(tmp_path: Path, stories260k_dir: Path) -> None:
    model = _model(tmp_path, stories260k_dir, "GPT2LMHeadModel", "model.safetensors")

    with pytest.raises(ModelDirError, match="unsupported architecture GPT2LMHeadModel; pagedserve serves Llama"):
        check_model_dir(model)


def test_pytorch_bin_weights_are_named(tmp_path: Path, stories260k_dir: Path) -> None:
    model = _model(tmp_path, stories260k_dir)
    (model / "pytorch_model.bin").write_bytes(b"")

    with pytest.raises(ModelDirError, match="PyTorch .bin weights"):
        check_model_dir(model)
    check_model_dir(model, needs_weights=False)  # dummy weights need no file


def test_no_tokenizer_points_at_the_tokenizer_flag(tmp_path: Path, stories260k_dir: Path) -> None:
    model = _model(tmp_path, stories260k_dir, "LlamaForCausalLM", "model.safetensors")

    with pytest.raises(ModelDirError, match="no tokenizer.json .*give --tokenizer DIR"):
        check_tokenizer_dir(model)
    assert check_tokenizer_dir(model, stories260k_dir) == stories260k_dir


def test_a_tokenizer_directory_without_tokenizer_json_is_named(tmp_path: Path, stories260k_dir: Path) -> None:
    with pytest.raises(ModelDirError, match=r"^--tokenizer .*: no tokenizer.json \(a Hugging Face fast tokenizer\)$"):
        check_tokenizer_dir(stories260k_dir, tmp_path)


def test_the_supported_list_is_the_workers() -> None:
    assert tuple(a.value for a in Architecture) == SUPPORTED_ARCHITECTURES


def test_serve_with_a_bad_model_exits_2_with_one_line_before_any_worker(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", "pagedserve.runtime.cli", "serve", "--model", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    # CPU time, not wall time: on a machine shared by others the wall clock measures their load, not this work.
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 3.0
    assert (result.returncode, result.stderr.splitlines()) == (
        2, [f"pagedserve serve: error: --model {tmp_path}: not a Hugging Face model directory (no config.json)"])


def test_serve_refuses_a_tokenizer_without_a_model(stories260k_dir: Path) -> None:
    with pytest.raises(ModelDirError, match="--tokenizer needs --model"):
        check_model(ServerConfig(tokenizer_dir=stories260k_dir))
    check_model(ServerConfig(model_dir=stories260k_dir, tokenizer_dir=stories260k_dir))
