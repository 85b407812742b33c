"""Paged-attention kernel benchmark: decode bandwidth vs a measured ceiling and torch SDPA, prefill TFLOP/s.

Run on a CUDA machine: python benchmarks/kernel_attention.py [--commit SHA] [--out-dir benchmarks/results]
[--kv-cache-dtype fp8] [--batches 16,64] [--contexts 2048] [--no-prefill]
Writes kernel_attention_<date>.json / .md / .png to --out-dir and prints a short table last.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.report import git_commit, int_list, pyplot
from pagedserve.kernels.fp8 import FP8_DTYPE, as_bytes, quantize
from pagedserve.kernels.ops import KernelOps, get_kernel_ops

SHAPES = {"llama-3.2-1b": (32, 8, 64), "llama-3-8b": (32, 8, 128)}  # q heads, kv heads, head_dim
BATCHES = (1, 16, 64, 256)
CONTEXTS = (512, 2048, 8192)
PREFILL_TOKENS = (1024, 4096)
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
L2_FLUSH_BYTES = 256 * 2**20  # several times the H100's 50 MB L2
MIN_BYTES_IN_ROTATION = 512 * 2**20  # input sets rotated so that repeated runs miss the L2


@dataclass(frozen=True, slots=True)
class DecodeResult:
    shape: str
    batch: int
    context: int
    bytes_moved: int
    launches: int  # per graph in the *_us times: one per input set (up to 8, see bench_decode)
    paged_us: float
    sdpa_us: float
    gather_sdpa_us: float
    paged_single_us: float  # a graph of one launch: adds the graph's own launch latency
    sdpa_single_us: float

    @property
    def paged_gbps(self) -> float:
        return self.bytes_moved / self.paged_us / 1e3

    @property
    def paged_single_gbps(self) -> float:
        return self.bytes_moved / self.paged_single_us / 1e3


@dataclass(frozen=True, slots=True)
class PrefillResult:
    shape: str
    tokens: int
    num_seqs: int
    flops: float
    paged_us: float
    sdpa_us: float


class Timer:
    """Median kernel time of a callable, L2 flushed before every run, measured with CUDA events."""

    def __init__(self, repeats: int) -> None:
        self._repeats = repeats
        self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")

    def median_us(self, run: Callable[[int], object]) -> float:
        for i in range(3):
            run(i)
        times = []
        for i in range(self._repeats):
            # Reading (not writing) evicts the inputs without leaving dirty lines whose write-back would be
            # charged to the timed run; it also keeps the GPU busy while the host enqueues the run.
            self._flush.sum()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(i)
            end.record()
            times.append((start, end))
        torch.cuda.synchronize()
        return float(statistics.median(s.elapsed_time(e) for s, e in times)) * 1e3


def measure_read_ceiling_gbps(timer: Timer) -> dict[str, float]:
    """Read bandwidth of a 4 GiB reduction, and read+write bandwidth of a 2 GiB copy, in GB/s."""
    data = torch.randn(2**30, device="cuda")
    sum_us = timer.median_us(lambda _: data.sum())
    half = data[: 2**29]
    copy_dst = torch.empty_like(half)
    copy_us = timer.median_us(lambda _: copy_dst.copy_(half))
    return {"sum_read_gbps": data.nbytes / sum_us / 1e3, "copy_read_write_gbps": 2 * half.nbytes / copy_us / 1e3}


def _decode_inputs(
    q_heads: int, kv_heads: int, head_dim: int, batch: int, context: int, seed: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    cache_shape = (num_blocks, kv_heads, BLOCK_SIZE, head_dim)
    return {
        "query": torch.randn(batch, q_heads, head_dim, device="cuda", generator=gen, dtype=DTYPE),
        "key_cache": torch.randn(cache_shape, device="cuda", generator=gen, dtype=DTYPE),
        "value_cache": torch.randn(cache_shape, device="cuda", generator=gen, dtype=DTYPE),
        "block_tables": torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32).view(batch, -1),
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        "query_start_loc": torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
    }


def _contiguous_kv(inputs: dict[str, torch.Tensor], context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, kv_heads, context, head_dim] K and V in sequence order, for the SDPA baseline."""
    block_tables = inputs["block_tables"]
    return _gather(inputs["key_cache"], block_tables, context), _gather(inputs["value_cache"], block_tables, context)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, context: int) -> torch.Tensor:
    """In DTYPE: an FP8 cache (scale 1) is gathered as bytes, then widened, so the baselines read 16-bit K/V."""
    blocks = as_bytes(cache)[block_tables.long()].view(cache.dtype).to(DTYPE)  # [batch, blocks, kv_heads, B, D]
    batch, num_blocks, kv_heads, block_size, head_dim = blocks.shape
    merged = blocks.permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, num_blocks * block_size, head_dim)
    return merged[:, :, :context]


def _capture(body: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """body as a CUDA graph (decode steps are replayed from graphs in serving); body must have run once before,
    so that kernels are compiled and buffers allocated outside capture."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _warm(run: Callable[[int], object], count: int) -> None:
    for i in range(count):
        run(i)
    torch.cuda.synchronize()


def _replay_us(timer: Timer, run: Callable[[int], object], count: int) -> float:
    """Time of a graph of one launch, one graph per input set, rotated."""
    _warm(run, count)
    graphs = [_capture(functools.partial(run, i)) for i in range(count)]
    return timer.median_us(lambda i: graphs[i % count].replay())


def _per_launch_us(timer: Timer, run: Callable[[int], object], count: int) -> float:
    """Time per launch in one graph of `count` launches over distinct inputs, as a decode step's graph launches
    attention once per layer over that layer's cache: the graph's own launch latency is paid once, not per
    launch (with count 1, once per launch), and no launch reads what another read (the L2 is flushed before
    each replay)."""
    _warm(run, count)
    graph = _capture(lambda: [run(i) for i in range(count)])
    return timer.median_us(lambda _: graph.replay()) / count


def measure_graph_launch_us(timer: Timer) -> float:
    """Replay time of a graph of one near-empty kernel, timed as the decode points are."""
    one = torch.zeros(1, device="cuda")
    return _replay_us(timer, lambda _: one.add_(1), 1)


def bench_decode(timer: Timer, ops: KernelOps, shape: str, batch: int, context: int,
                 fp8_kv: bool = False) -> DecodeResult:
    """With fp8_kv the paged kernel reads an e4m3 pool (scale 1: randn K/V sit well inside e4m3's range) and
    bytes_moved counts one byte per K/V element; the SDPA baselines read the same values widened to DTYPE."""
    q_heads, kv_heads, head_dim = SHAPES[shape]
    kv_bytes = 2 * batch * context * kv_heads * head_dim * (FP8_DTYPE.itemsize if fp8_kv else DTYPE.itemsize)
    num_sets = max(1, min(8, MIN_BYTES_IN_ROTATION // kv_bytes))
    sets = [_decode_inputs(q_heads, kv_heads, head_dim, batch, context, seed) for seed in range(num_sets)]
    if fp8_kv:
        for inputs in sets:
            inputs["key_cache"], inputs["value_cache"] = (quantize(inputs[name], 1.0)
                                                          for name in ("key_cache", "value_cache"))
    outs = [torch.empty_like(s["query"]) for s in sets]
    scale = 1 / math.sqrt(head_dim)

    def paged(i: int) -> None:
        s = sets[i]
        ops.paged_attention(outs[i], s["query"], s["key_cache"], s["value_cache"], s["block_tables"],
                            s["seq_lens"], s["query_start_loc"], 1, context, scale)

    def gather_sdpa(i: int) -> torch.Tensor:
        key, value = _contiguous_kv(sets[i], context)
        return F.scaled_dot_product_attention(sets[i]["query"].unsqueeze(2), key, value, scale=scale,
                                              enable_gqa=True)

    paged_us = _per_launch_us(timer, paged, num_sets)
    paged_single_us = _replay_us(timer, paged, num_sets)
    gather_us = _per_launch_us(timer, gather_sdpa, num_sets)
    contiguous = [_contiguous_kv(s, context) for s in sets]

    def sdpa(i: int) -> torch.Tensor:
        key, value = contiguous[i]
        return F.scaled_dot_product_attention(sets[i]["query"].unsqueeze(2), key, value, scale=scale,
                                              enable_gqa=True)

    sdpa_us = _per_launch_us(timer, sdpa, num_sets)
    sdpa_single_us = _replay_us(timer, sdpa, num_sets)
    bytes_moved = kv_bytes + 2 * batch * q_heads * head_dim * DTYPE.itemsize
    return DecodeResult(shape, batch, context, bytes_moved, num_sets, paged_us, sdpa_us, gather_us, paged_single_us,
                        sdpa_single_us)


def measure_host_us(ops: KernelOps) -> float:
    """Host time of one eager paged_attention call (validation, layout, launch), without waiting for the GPU."""
    # A small problem, so the GPU keeps up with the host and the host never waits on a full launch queue.
    inputs = _decode_inputs(32, 8, 128, 4, 256, seed=99)
    out = torch.empty_like(inputs["query"])
    args = (out, inputs["query"], inputs["key_cache"], inputs["value_cache"], inputs["block_tables"],
            inputs["seq_lens"], inputs["query_start_loc"], 1, 256, 0.1)
    ops.paged_attention(*args)
    torch.cuda.synchronize()
    calls = 200
    start = time.perf_counter()
    for _ in range(calls):
        ops.paged_attention(*args)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def bench_prefill(timer: Timer, ops: KernelOps, shape: str, tokens: int) -> PrefillResult:
    """Causal prefill of num_seqs prompts of `tokens` tokens each (16k tokens in all), paged vs flash SDPA."""
    q_heads, kv_heads, head_dim = SHAPES[shape]
    num_seqs = max(1, 16384 // tokens)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    blocks_per_seq = tokens // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_seq
    cache_shape = (num_blocks, kv_heads, BLOCK_SIZE, head_dim)
    query = torch.randn(num_seqs * tokens, q_heads, head_dim, device="cuda", generator=gen, dtype=DTYPE)
    key_cache = torch.randn(cache_shape, device="cuda", generator=gen, dtype=DTYPE)
    value_cache = torch.randn(cache_shape, device="cuda", generator=gen, dtype=DTYPE)
    block_tables = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32).view(num_seqs, -1)
    seq_lens = torch.full((num_seqs,), tokens, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(0, num_seqs * tokens + 1, tokens, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    scale = 1 / math.sqrt(head_dim)
    paged_us = timer.median_us(lambda _: ops.paged_attention(
        out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tokens, tokens, scale))
    key, value = (_gather(c, block_tables, tokens) for c in (key_cache, value_cache))
    dense_query = query.view(num_seqs, tokens, q_heads, head_dim).transpose(1, 2)
    key, value = (t.repeat_interleave(q_heads // kv_heads, dim=1) for t in (key, value))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        sdpa_us = timer.median_us(lambda _: F.scaled_dot_product_attention(
            dense_query, key, value, is_causal=True, scale=scale))
    flops = 4.0 * num_seqs * q_heads * head_dim * tokens * (tokens + 1) / 2
    return PrefillResult(shape, tokens, num_seqs, flops, paged_us, sdpa_us)


def write_reports(out_dir: Path, meta: dict[str, Any], ceiling: dict[str, float], decode: list[DecodeResult],
                  prefill: list[PrefillResult]) -> tuple[Path, dict[str, Any]]:
    """Writes kernel_attention_<date>.json / .md / .png into out_dir; returns their stem and the JSON record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernel_attention_{meta['date']}"
    record = {"metadata": meta, "ceiling": ceiling,
              "decode": [asdict(r) | {"paged_gbps": r.paged_gbps} for r in decode],
              "prefill": [asdict(r) for r in prefill]}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown_report(meta, ceiling, decode, prefill))
    plot(stem.with_suffix(".png"), ceiling, decode)
    return stem, record


def markdown_report(
    meta: dict[str, Any], ceiling: dict[str, float], decode: list[DecodeResult], prefill: list[PrefillResult]
) -> str:
    peak = max(ceiling.values())
    lines = [f"# Paged attention kernels, {meta['device']}, {meta['date']}", "",
             f"commit `{meta['commit']}`; command `{meta['command']}`; bf16, block_size {BLOCK_SIZE}, KV cache "
             f"{meta['kv_cache_dtype']} (fp8: the paged decode reads e4m3 and every GB/s counts one byte per K/V "
             "element; the SDPA baselines read the same values in bf16).", "",
             "Decode times are per launch in a CUDA graph of `launches` launches over distinct inputs (as a decode "
             "step's graph launches attention once per layer), L2 flushed before each replay; median of "
             f"{meta['repeats']} runs. The `1-graph` columns time a graph of one launch, which adds the graph's own "
             f"launch latency: {meta['graph_launch_us']} us for a graph of one near-empty kernel. "
             f"Host cost of one eager decode call: {meta['host_us_per_decode_call']} us.", "",
             f"Read-bandwidth ceiling (measured): {peak:.0f} GB/s "
             f"(sum {ceiling['sum_read_gbps']:.0f}, copy {ceiling['copy_read_write_gbps']:.0f}).", "",
             "## Decode", "",
             "| shape | batch | context | launches | paged us | GB/s | % ceiling | SDPA us | paged/SDPA | "
             "gather+SDPA us | 1-graph paged us | 1-graph % ceiling | 1-graph SDPA us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in decode:
        lines.append(f"| {r.shape} | {r.batch} | {r.context} | {r.launches} | {r.paged_us:.1f} | "
                     f"{r.paged_gbps:.0f} | {100 * r.paged_gbps / peak:.0f} | {r.sdpa_us:.1f} | "
                     f"{r.paged_us / r.sdpa_us:.2f} | {r.gather_sdpa_us:.1f} | {r.paged_single_us:.1f} | "
                     f"{100 * r.paged_single_gbps / peak:.0f} | {r.sdpa_single_us:.1f} |")
    lines += ["", "## Prefill (causal)", "", "| shape | tokens | seqs | paged TFLOP/s | SDPA flash TFLOP/s | ratio |",
              "|---|---|---|---|---|---|"]
    for p in prefill:
        lines.append(f"| {p.shape} | {p.tokens} | {p.num_seqs} | {p.flops / p.paged_us / 1e6:.0f} | "
                     f"{p.flops / p.sdpa_us / 1e6:.0f} | {p.sdpa_us / p.paged_us:.2f} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, ceiling: dict[str, float], decode: list[DecodeResult]) -> None:
    """The decode launches' GB/s by context, one axis per shape; nothing without matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(12, 4.5), sharey=True)
    for axis, shape in zip(axes, SHAPES, strict=True):  # one axis per shape
        for batch in sorted({r.batch for r in decode}):
            rows = [r for r in decode if r.shape == shape and r.batch == batch]
            axis.plot([r.context for r in rows], [r.paged_gbps for r in rows], marker="o", label=f"batch {batch}")
        axis.axhline(max(ceiling.values()), color="black", linestyle="--", label="read ceiling")
        axis.set_xscale("log", base=2)
        axis.set_title(f"{shape} decode, bf16")
        axis.set_xlabel("context tokens")
    axes[0].set_ylabel("achieved GB/s")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, writes its reports; returns the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commit", default=None, help="commit measured (default: as every benchmark names it, "
                        "benchmarks.report.git_commit)")
    parser.add_argument("--out-dir", "--result-dir", dest="out_dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="fp8: decode reads an e4m3 pool, its GB/s counted in FP8 bytes")
    parser.add_argument("--batches", type=int_list, default=BATCHES, help="decode batches, comma-separated")
    parser.add_argument("--contexts", type=int_list, default=CONTEXTS, help="decode contexts, comma-separated")
    parser.add_argument("--no-prefill", action="store_true", help="time the decode kernel only")
    args = parser.parse_args(argv)
    commit = args.commit or git_commit()
    meta = {"commit": commit, "device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "repeats": args.repeats,
            "kv_cache_dtype": args.kv_cache_dtype}
    timer = Timer(args.repeats)
    ops = get_kernel_ops(torch.device("cuda", torch.cuda.current_device()))
    ceiling = measure_read_ceiling_gbps(timer)
    meta["host_us_per_decode_call"] = round(measure_host_us(ops), 1)
    meta["graph_launch_us"] = round(measure_graph_launch_us(timer), 1)
    decode = [bench_decode(timer, ops, shape, batch, context, args.kv_cache_dtype == "fp8")
              for shape in SHAPES for batch in args.batches for context in args.contexts]
    prefill = ([] if args.no_prefill else
               [bench_prefill(timer, ops, shape, tokens) for shape in SHAPES for tokens in PREFILL_TOKENS])
    stem, record = write_reports(args.out_dir, meta, ceiling, decode, prefill)
    print(f"wrote {stem}.json/.md/.png")
    print(markdown_report(meta, ceiling, decode, prefill))
    return record


if __name__ == "__main__":
    main()
