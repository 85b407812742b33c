"""One SamplingParams with vLLM's defaults for every way in, and `from pagedserve import LLM, SamplingParams`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from pagedserve.clients.client import PagedServeClient
from pagedserve.contract.codec import sampling_params_from_proto
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.runtime.cli import generate_parser
from pagedserve.runtime.flags import parse_args
from pagedserve.v1 import common_pb2


def test_the_top_level_package_exports_llm_and_sampling_params_lazily() -> None:
    code = ("import sys, pagedserve; light = 'torch' not in sys.modules; "
            "from pagedserve import LLM, SamplingParams; "
            "print(light, LLM.__module__, SamplingParams.__module__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)

    assert result.stdout.split() == ["True", "pagedserve.clients.llm", "pagedserve.contract.sampling_params"]


def test_the_cli_protocol_and_python_defaults_are_vllms() -> None:
    args = parse_args(generate_parser(), ["hi"], {})
    cli = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, seed=args.seed)

    assert cli == sampling_params_from_proto(common_pb2.SamplingParams()) == SamplingParams()
    assert (SamplingParams().temperature, SamplingParams().top_p, SamplingParams().max_tokens) == (1.0, 1.0, 16)


def test_the_client_refuses_max_tokens_it_cannot_send() -> None:
    async def stream() -> None:
        async with PagedServeClient("127.0.0.1:1") as client:
            async for _ in client.generate_stream("hi", SamplingParams(max_tokens=None)):
                pass

    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(stream())
