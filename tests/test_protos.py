"""The committed protocol stubs are exactly what the pinned grpcio-tools generates from the .proto files."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parents[1] / "protos"
PACKAGE = Path("pagedserve") / "v1"


def test_committed_stubs_equal_a_fresh_regeneration(tmp_path: Path) -> None:
    sources = sorted((PROTOS / PACKAGE).glob("*.proto"))
    shutil.copytree(PROTOS / PACKAGE, tmp_path / "src" / PACKAGE, ignore=shutil.ignore_patterns("*.py*", "__*"))
    out = tmp_path / "out"
    (out / PACKAGE).mkdir(parents=True)
    argv = ["protoc", f"-I{tmp_path / 'src'}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    assert protoc.main([*argv, *(str(tmp_path / "src" / PACKAGE / s.name) for s in sources)]) == 0
    generated = sorted(p.name for p in (out / PACKAGE).iterdir())
    committed = sorted(p.name for p in (PROTOS / PACKAGE).iterdir() if p.suffix in (".py", ".pyi") and "_pb2" in p.name)
    assert generated == committed
    _, mismatch, errors = filecmp.cmpfiles(out / PACKAGE, PROTOS / PACKAGE, generated, shallow=False)
    assert mismatch == [] and errors == [], f"stale stubs (run `make protos`): {mismatch + errors}"


def test_the_committed_descriptor_set_equals_a_fresh_one_with_source_info(tmp_path: Path) -> None:
    """Reflection serves this set (runtime/reflection.py); `make protos` writes it beside the stubs."""
    sources = sorted(str(s.relative_to(PROTOS)) for s in (PROTOS / PACKAGE).glob("*.proto"))
    out = tmp_path / "descriptors.binpb"
    argv = ["protoc", f"-I{PROTOS}", "--include_source_info", "--include_imports", f"--descriptor_set_out={out}"]
    assert protoc.main([*argv, *(str(PROTOS / s) for s in sources)]) == 0
    assert out.read_bytes() == (PROTOS / PACKAGE / "descriptors.binpb").read_bytes(), "stale (run `make protos`)"
