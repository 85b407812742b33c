"""The gRPC hop floor benchmark on a loopback server (CPU): every measure taken, in causal order, and recorded."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import grpc_hops


def test_a_short_run_takes_every_measure_and_records_what_it_returns(tmp_path: Path) -> None:
    result = grpc_hops.main(["--calls", "20", "--messages", "20", "--result-dir", str(tmp_path)])

    p50 = result["p50_us"]
    assert len(p50) == 7 and all(value > 0 for value in p50.values())
    # Each call's first message comes back after its handler was entered, so the medians keep that order.
    assert (p50["new call: client to handler and back to the first message"]
            > p50["new call: client to handler"])
    assert json.loads(next(tmp_path.glob("*-grpc-hops-cpu.json")).read_text()) == result


def test_the_prompt_request_is_the_same_for_a_seed_and_stays_within_the_vocabulary() -> None:
    request = grpc_hops.prompt_request(num_ids=64, vocab_size=100, seed=3)
    assert len(request.token_ids.ids) == 64 and all(0 <= i < 100 for i in request.token_ids.ids)
    assert request.token_ids.ids == grpc_hops.prompt_request(num_ids=64, vocab_size=100, seed=3).token_ids.ids
