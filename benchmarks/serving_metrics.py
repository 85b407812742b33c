"""Per-request timings of a streamed benchmark and the metrics `vllm bench serve` reports from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it: when it was sent, when each chunk with tokens arrived and how many, and the
    text it streamed. num_late_tokens: tokens that came with no chunk of their own (a stream of text only, such as
    the gateway's, holds back a token that ends mid-character and sends it with a later one); the usage counts them,
    and they are added to the last chunk."""

    prompt_len: int
    start_s: float
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_num_tokens: list[int] = field(default_factory=list)
    error: str | None = None
    output_text: str = ""
    num_late_tokens: int = 0

    @property
    def is_success(self) -> bool:
        return self.error is None and bool(self.chunk_times_s)

    @property
    def output_len(self) -> int:
        return sum(self.chunk_num_tokens)

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] - self.start_s

    @property
    def latency_s(self) -> float:
        return self.chunk_times_s[-1] - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, or None for a single-token completion."""
        if self.output_len < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_len - 1)

    def itls_s(self) -> list[float]:
        """Inter-token latencies: each chunk's gap from the previous chunk, shared evenly by the chunk's tokens.

            chunk:   c0 (1 token)     c1 (1 token)           c2 (2 tokens)
            time:    t0 ------------- t1 ------------------- t2
            ITL:                      t1 - t0                (t2 - t1) / 2, (t2 - t1) / 2
        """
        gaps: list[float] = []
        for index in range(1, len(self.chunk_times_s)):
            tokens = self.chunk_num_tokens[index]
            gap = self.chunk_times_s[index] - self.chunk_times_s[index - 1]
            gaps.extend([gap / tokens] * tokens)
        return gaps


def _stats_ms(name: str, values_s: Sequence[float]) -> dict[str, float]:
    """mean, median, std and percentiles of seconds, reported in milliseconds (zeros when there are none)."""
    values = np.asarray(values_s, dtype=np.float64) * 1000.0 if len(values_s) else np.zeros(1)
    stats = {f"mean_{name}_ms": float(values.mean()), f"median_{name}_ms": float(np.median(values)),
             f"std_{name}_ms": float(values.std())}
    stats.update({f"p{p}_{name}_ms": float(np.percentile(values, p)) for p in PERCENTILES})
    return stats


def compute_metrics(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """vLLM's serving metrics over the successful requests of one run lasting duration_s."""
    done = [r for r in records if r.is_success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_len for r in done)
    tpots = [t for t in (r.tpot_s for r in done) if t is not None]
    metrics: dict[str, Any] = {
        "duration_s": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error is not None})[:5],
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "total_late_tokens": sum(r.num_late_tokens for r in done),
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    metrics.update(_stats_ms("ttft", [r.ttft_s for r in done]))
    metrics.update(_stats_ms("tpot", tpots))
    metrics.update(_stats_ms("itl", [gap for r in done for gap in r.itls_s()]))
    metrics.update(_stats_ms("e2el", [r.latency_s for r in done]))
    metrics["ttfts_ms"] = [round(r.ttft_s * 1000.0, 3) for r in done]
    metrics["tpots_ms"] = [round(t * 1000.0, 3) for t in tpots]
    metrics["e2els_ms"] = [round(r.latency_s * 1000.0, 3) for r in done]
    return metrics
