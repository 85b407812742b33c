"""Programmatic dependent launch: every kernel waits for the grid before it (CPU, on the sources), the launch
structures have cuda.h's layout (CPU), and on the GPU a kernel that reads its predecessor's output sees this replay's
values, not the last one's, inside a captured graph."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pagedserve.kernels.dependent_launch import COMPILE_DEFINE, MIN_COMPUTE_CAPABILITY, LaunchAttribute, LaunchConfig
from pagedserve.kernels.fp8 import quantize_per_row
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_FP8_GPU
from tests.kernels.ptx import KERNEL_DIR

WAITS = ("begin_dependent_grid();", "wait_for_prior_grid();")
# Kernels that load before they wait: what each loads early, and the names it may not touch until it has waited
# (what the kernel before it writes, and what it writes itself).
GEMV_FORBIDDEN = ("x", "x_row_stride", "out", "scales", "bias", "load_x", "load_mma_x")
EARLY_LOADS = {
    "decode_gemv.cu:decode_gemv": ("load_weight_batch", GEMV_FORBIDDEN),
    "decode_gemv.cu:decode_gemv_mma": ("load_mma_weights", GEMV_FORBIDDEN),
    # The block table, the lengths and the tiles before each decode row's newest token (the step's inputs and
    # earlier steps' K/V); the query rows and the newest K/V come from the kernel before.
    "paged_decode.cu:paged_decode": ("pipeline.start", ("query", "out", "state.start", "split_acc", "split_max",
                                                        "split_sum", "write_heads", "kAllTokens")),
}


def _code(text: str) -> str:
    """text without its // comments."""
    return re.sub(r"//[^\n]*", "", text)


def _kernel_bodies() -> dict[str, str]:
    """Each __global__ function of kernels/*.cu by name, with its body (up to the brace that closes it)."""
    bodies: dict[str, str] = {}
    for path in sorted([*KERNEL_DIR.glob("*.cu"), *KERNEL_DIR.glob("*.cuh")]):
        text = path.read_text()
        for match in re.finditer(r"^\s*__global__\b", text, re.MULTILINE):
            open_brace = text.index("{", match.end())
            name = re.findall(r"(\w+)\s*\(", text[match.end():open_brace])[-1]
            depth, end = 0, open_brace
            for end in range(open_brace, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    break
            bodies[f"{path.name}:{name}"] = text[open_brace:end + 1]
    return bodies


def test_every_kernel_waits_for_the_grid_before_it() -> None:
    bodies = _kernel_bodies()
    assert len(bodies) >= 19, sorted(bodies)
    missing = [name for name, body in bodies.items() if not any(wait in body for wait in WAITS)]
    assert not missing, f"launched as dependent launches, these never wait for the kernel before them: {missing}"


def test_kernels_that_begin_with_the_wait_do_nothing_before_it() -> None:
    for name, body in _kernel_bodies().items():
        if name not in EARLY_LOADS and "begin_dependent_grid();" in body:
            first_statement = body[1:].strip().split("\n", 1)[0]
            assert first_statement == "begin_dependent_grid();", (name, first_statement)


def test_a_kernel_that_loads_before_its_wait_loads_only_what_no_kernel_before_it_writes() -> None:
    bodies = _kernel_bodies()
    early = {name: re.split(r"begin_dependent_grid\(\);|wait_for_prior_grid\(\);", _code(bodies[name]))[0]
             for name in EARLY_LOADS}
    late = [name for name, body in bodies.items()
            if name not in EARLY_LOADS and not _code(body)[1:].strip().startswith(WAITS)]
    assert not late, f"these load before their wait, and are not listed with what they load: {late}"
    for name, code in early.items():
        load, forbidden = EARLY_LOADS[name]
        assert load in code, name
        touched = [word for word in forbidden if re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", code)]
        assert not touched, f"{name} touches {touched} before it waits for the kernel before it"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_built_for_dependent_launch_refuse_an_architecture_without_the_wait(arch: str,
                                                                                   tmp_path: Path) -> None:
    completed = subprocess.run(
        ["nvcc", "--std=c++17", f"-I{KERNEL_DIR}", f"-arch={arch}", "-ptx", COMPILE_DEFINE,
         str(KERNEL_DIR / "cache_ops.cu"), "-o", str(tmp_path / "cache_ops.ptx")],
        capture_output=True, text=True, check=False)
    if arch == "compute_80":
        assert completed.returncode != 0 and "griddepcontrol" in completed.stderr, completed.stderr
    else:
        assert completed.returncode == 0, completed.stderr
        assert "griddepcontrol.wait" in (tmp_path / "cache_ops.ptx").read_text()


def test_launch_structures_have_the_driver_layout() -> None:
    # cuda.h: CUlaunchAttribute is the id padded to 8 bytes and a 64-byte union; CUlaunchConfig is seven unsigned
    # ints, the stream handle, the attribute pointer and their count.
    assert ctypes.sizeof(LaunchAttribute) == 72 and LaunchAttribute.value.offset == 8
    assert (LaunchConfig.stream.offset, LaunchConfig.attrs.offset, LaunchConfig.num_attrs.offset) == (32, 40, 48)
    assert ctypes.sizeof(LaunchConfig) == 56


# One CTA that lets the next kernel start, waits about delay_cycles, then writes the rows (keys, then values) at
# their byte offsets in the two caches.
LATE_WRITER_SOURCE = r"""
extern "C" __global__ void write_rows_late(const unsigned char* rows, unsigned char* key_cache,
                                           unsigned char* value_cache, const long long* offsets, int num_rows,
                                           int row_bytes, long long delay_cycles) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long start = clock64();
  while (clock64() - start < delay_cycles) {}
  for (int i = threadIdx.x; i < num_rows * row_bytes; i += blockDim.x) {
    key_cache[offsets[i / row_bytes] + i % row_bytes] = rows[i];
    value_cache[offsets[i / row_bytes] + i % row_bytes] = rows[num_rows * row_bytes + i];
  }
}
"""


class TestCapturedChain:
    pytestmark = NEEDS_FP8_GPU

    def test_launches_are_dependent_from_compute_capability_9(self) -> None:
        from pagedserve.kernels.module_cache import ModuleCache

        device = torch.device("cuda")
        expected = torch.cuda.get_device_capability(device) >= MIN_COMPUTE_CAPABILITY
        assert ModuleCache(device).dependent_launches == expected

    @pytest.mark.parametrize("in_features", [2048, 14336])
    @pytest.mark.parametrize("num_rows", [1, 4])
    def test_a_dependent_kernel_reads_this_replays_output_of_the_one_before(self, in_features: int,
                                                                           num_rows: int) -> None:
        from pagedserve.kernels.ops import get_kernel_ops

        device = torch.device("cuda")
        ops, reference = get_kernel_ops(device), TorchReferenceOps()
        gen = torch.Generator(device=device).manual_seed(in_features + num_rows)
        weight, scale = quantize_per_row(torch.randn(1024, in_features, device=device, generator=gen))
        scale = scale.squeeze(1)
        # silu_and_mul runs over 2,048 rows and the GEMV reads its last ones: the kernel before takes tens of
        # microseconds, long enough for a GEMV that did not wait to read the rows before they are written.
        gate_up = torch.randn(2048, 2 * in_features, device=device, generator=gen).to(torch.bfloat16)
        ops.fp8_gemv(ops.silu_and_mul(gate_up)[-num_rows:], weight, scale)  # compiles both before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.fp8_gemv(ops.silu_and_mul(gate_up)[-num_rows:], weight, scale)
        for _ in range(20):
            # New inputs each replay: a GEMV that read the activation before silu_and_mul had written it would
            # return the product of the replay before.
            gate_up.copy_(torch.randn(gate_up.shape, device=device, generator=gen))
            graph.replay()
            expected = reference.fp8_gemv(reference.silu_and_mul(gate_up[-num_rows:]), weight, scale)
            torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2,
                                       atol=2e-2 * expected.float().abs().mean().item())

    @pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
    def test_decode_attention_reads_the_newest_tokens_only_after_their_writer_ends(self,
                                                                                  cache_dtype: torch.dtype) -> None:
        import cupy
        import numpy as np

        from pagedserve.kernels.module_cache import ModuleCache
        from pagedserve.kernels.ops import get_kernel_ops

        device = torch.device("cuda")
        if not ModuleCache(device).dependent_launches:
            pytest.skip("launches are dependent from compute capability 9.0 only")
        ops, reference = get_kernel_ops(device), TorchReferenceOps()
        gen = torch.Generator(device=device).manual_seed(7)
        kv_heads, group, head_dim, block_size, num_seqs = 8, 4, 64, 16, 64
        # Short contexts put each row's newest token in the tiles its warps stage first, before they wait.
        seq_lens = torch.randint(1, 600, (num_seqs,), device=device, generator=gen, dtype=torch.int32)
        blocks_per_seq = -(-600 // block_size)
        cache_shape = (num_seqs * blocks_per_seq, kv_heads, block_size, head_dim)
        key_cache, value_cache = (torch.randn(cache_shape, device=device, generator=gen).to(cache_dtype)
                                  for _ in range(2))
        block_tables = torch.randperm(cache_shape[0], device=device, generator=gen).to(torch.int32)
        block_tables = block_tables.view(num_seqs, blocks_per_seq)
        newest = (seq_lens - 1).long()
        blocks = block_tables.gather(1, (newest // block_size).unsqueeze(1)).long()
        rows = (blocks * kv_heads + torch.arange(kv_heads, device=device)) * block_size + (newest % block_size)[:, None]
        row_bytes = head_dim * key_cache.element_size()
        offsets = (rows.flatten() * row_bytes).contiguous()
        new_rows = torch.empty(2, offsets.numel(), row_bytes, device=device, dtype=torch.uint8)
        query = torch.empty(num_seqs, kv_heads * group, head_dim, device=device, dtype=torch.bfloat16)
        query_start_loc = torch.arange(num_seqs + 1, device=device, dtype=torch.int32)
        out, expected = torch.empty_like(query), torch.empty_like(query)
        # The newest tokens' writer lets the next kernel start at once, then spins for about 100 us before it
        # writes them: an attention that staged them before its wait would attend to the replay before's.
        writer = cupy.RawKernel(LATE_WRITER_SOURCE, "write_rows_late")
        writer_args = (cupy.asarray(new_rows), cupy.asarray(key_cache.view(torch.uint8)),
                       cupy.asarray(value_cache.view(torch.uint8)), cupy.asarray(offsets), np.int32(offsets.numel()),
                       np.int32(row_bytes), np.int64(200_000))

        def step() -> None:
            writer((1,), (256,), writer_args, stream=cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream))
            ops.paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, 1, 600,
                                head_dim ** -0.5)

        def new_inputs() -> None:
            query.copy_(torch.randn(query.shape, device=device, generator=gen))
            kv = torch.randn(2, offsets.numel(), head_dim, device=device, generator=gen).to(cache_dtype)
            new_rows.copy_(kv.view(torch.uint8).view(new_rows.shape))

        new_inputs()
        step()  # compiles both before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(10):
            new_inputs()
            graph.replay()
            reference.paged_attention(expected, query, key_cache, value_cache, block_tables, seq_lens,
                                      query_start_loc, 1, 600, head_dim ** -0.5)
            torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
