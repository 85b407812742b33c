"""Requests: the status transition table, stop checks, and the token ids a worker bans before min_tokens."""

from __future__ import annotations

from typing import Any

import pytest

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.scheduling.request import (
    FinishReason,
    Request,
    RequestStatus,
    Sequence,
    banned_token_ids,
    check_stop,
)

EOS = 2


def _request(**params: Any) -> Request:
    return Request("r", (5, 6, 7), SamplingParams(**params), (EOS,), 0.0)


def _after(*outputs: int) -> Sequence:
    return Sequence(seq_id=0, index=0, output_token_ids=list(outputs))


def test_request_follows_the_transition_table() -> None:
    request = _request()
    for status in (RequestStatus.RUNNING, RequestStatus.PREEMPTED, RequestStatus.RUNNING,
                   RequestStatus.SWAPPED, RequestStatus.RUNNING, RequestStatus.FINISHED):
        request.set_status(status)
    assert request.status is RequestStatus.FINISHED
    assert request.is_finished


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (RequestStatus.WAITING, RequestStatus.SWAPPED),
        (RequestStatus.WAITING, RequestStatus.FINISHED),
        (RequestStatus.PREEMPTED, RequestStatus.SWAPPED),
        (RequestStatus.FINISHED, RequestStatus.RUNNING),
        (RequestStatus.ABORTED, RequestStatus.WAITING),
    ],
)
def test_request_rejects_a_transition_outside_the_table(start: RequestStatus, target: RequestStatus) -> None:
    request = _request()
    request.status = start
    with pytest.raises(ValueError, match=f"no transition {start.name} -> {target.name}"):
        request.set_status(target)


def test_empty_prompt_is_rejected() -> None:
    with pytest.raises(ValueError, match="prompt_token_ids must not be empty"):
        Request("r", (), SamplingParams(), (EOS,), 0.0)


def test_eos_stops_with_its_token_id() -> None:
    request = _request()
    assert check_stop(request, _after(9, EOS), None) == (FinishReason.STOP, EOS)


def test_eos_is_ignored_with_ignore_eos() -> None:
    request = _request(ignore_eos=True)
    assert check_stop(request, _after(EOS), None) is None


def test_stop_token_id_stops_with_its_token_id() -> None:
    request = _request(stop_token_ids=(42,))
    assert check_stop(request, _after(42), None) == (FinishReason.STOP, 42)


def test_stop_tokens_do_not_stop_before_min_tokens() -> None:
    request = _request(min_tokens=2, stop_token_ids=(42,))
    assert check_stop(request, _after(EOS), None) is None
    assert check_stop(request, _after(9, 42), None) == (FinishReason.STOP, 42)


def test_max_tokens_finishes_with_length() -> None:
    request = _request(max_tokens=2)
    assert check_stop(request, _after(9), None) is None
    assert check_stop(request, _after(9, 9), None) == (FinishReason.LENGTH, None)


def test_eos_as_the_last_allowed_token_reports_stop() -> None:
    request = _request(max_tokens=2)
    assert check_stop(request, _after(9, EOS), None) == (FinishReason.STOP, EOS)


def test_max_model_len_finishes_with_length() -> None:
    request = _request(max_tokens=None)
    assert check_stop(request, _after(9), 5) is None
    assert check_stop(request, _after(9, 9), 5) == (FinishReason.LENGTH, None)


def test_eos_and_stop_ids_are_banned_only_while_min_tokens_applies() -> None:
    request = _request(temperature=0.5, top_k=-1, seed=7, min_tokens=3, stop_token_ids=(42, EOS), logprobs=2,
                       prompt_logprobs=1)
    assert banned_token_ids(request) == (EOS, 42)
    assert banned_token_ids(_request(stop_token_ids=(42,))) == ()


def test_eos_is_left_unbanned_with_ignore_eos() -> None:
    request = _request(min_tokens=1, ignore_eos=True, stop_token_ids=(42,))
    assert banned_token_ids(request) == (42,)
