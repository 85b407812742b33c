"""The serving benchmark's gateway path end to end on stories260K: the real `smg` gateway started in front of a
running server, the same random workload (as text) through it and through our Generate, every field recorded per
path, and the gateway's completions equal to the server's own greedy tokens on the same prompts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import transformers

from benchmarks import serving
from benchmarks.model_shapes import sampling_vocab_size
from pagedserve.v1 import common_pb2, generation_service_pb2_grpc
from pagedserve.v1 import generation_service_pb2 as pb
from tests.e2e.processes import Cluster, running_cluster

pytestmark = pytest.mark.e2e

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 3, 24, 6


@pytest.fixture(scope="module")
def server(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(stories260k_dir, tmp_path_factory.mktemp("bench-gateway-logs")) as cluster:
        yield cluster


def _greedy_ids(stub: generation_service_pb2_grpc.GenerationServiceStub, prompt_ids: tuple[int, ...]) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling_params=common_pb2.SamplingParams(
        temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True))
    return [t for response in stub.Generate(request, timeout=60) for t in response.token_ids]


def test_gateway_beside_direct_records_each_path_and_streams_the_servers_greedy_tokens(
    server: Cluster, stories260k_dir: Path, tmp_path: Path,
) -> None:
    argv = ["--model", str(stories260k_dir), "--server", server.address, "--paths", "direct,gateway",
            "--num-prompts", str(NUM_PROMPTS), "--random-input-len", str(INPUT_LEN), "--random-output-len",
            str(OUTPUT_LEN), "--sweep-concurrency", f"1,{NUM_PROMPTS}", "--no-bound", "--save-detailed",
            "--result-dir", str(tmp_path)]
    result = serving.main(argv)
    runs = result["runs"]
    assert [(run["path"], run["max_concurrency"]) for run in runs] == [
        ("direct", 1), ("gateway", 1), ("direct", NUM_PROMPTS), ("gateway", NUM_PROMPTS)]
    args = serving.parse_args(argv)
    tokenizer = transformers.AutoTokenizer.from_pretrained(stories260k_dir)
    vocab_size = sampling_vocab_size(stories260k_dir)
    gateway_texts = []
    with grpc.insecure_channel(server.address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        for run in runs:
            requests = serving.sample_workload(NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, args, vocab_size, run["seed"],
                                               serving.text_tokenizer(stories260k_dir, args))
            assert (run["completed"], run["failed"], run["errors"]) == (NUM_PROMPTS, 0, [])
            assert run["total_input_tokens"] == sum(len(r.prompt_token_ids) for r in requests)
            assert run["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
            assert run["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
            assert len(run["ttfts_ms"]) == len(run["tpots_ms"]) == NUM_PROMPTS
            assert all(ms > 0 for ms in run["ttfts_ms"]) and run["output_throughput"] > 0
            assert run["step_profile"]["steps"] >= OUTPUT_LEN  # the server ran this run's work
            if run["path"] == "gateway":
                # The gateway decodes each completion alone, as transformers' decode does.
                assert run["generated_texts"] == [
                    tokenizer.decode(_greedy_ids(stub, r.prompt_token_ids), skip_special_tokens=True)
                    for r in requests]
                gateway_texts += run["generated_texts"]
    assert any(set(text) - {"\ufffd"} for text in gateway_texts)  # not only bytes that decode to replacements
    written = json.loads(next(tmp_path.glob("*-serving-cpu.json")).read_text())
    assert written == result and written["config"]["paths"] == ["direct", "gateway"]
    assert f"| gateway | none | {NUM_PROMPTS} |" in next(tmp_path.glob("*-serving-cpu.md")).read_text()
