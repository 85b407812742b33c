"""The kernel profile's device time: overlapping intervals (a dependent launch waiting for the kernel before it)
count once, gaps not at all, and host events are ignored."""

from __future__ import annotations

from types import SimpleNamespace

from torch.profiler import DeviceType

from benchmarks.kernel_profile import device_time


def _event(start: float, end: float, device_type: DeviceType = DeviceType.CUDA) -> SimpleNamespace:
    return SimpleNamespace(device_type=device_type, time_range=SimpleNamespace(start=start, end=end))


def test_overlaps_count_once_and_gaps_not_at_all() -> None:
    events = [
        _event(100.0, 110.0),
        _event(105.0, 120.0),  # launched while the one before ran: 10 us of its 15 are new
        _event(108.0, 112.0),  # wholly inside the two before
        _event(130.0, 135.0),  # after 10 us with nothing queued
        _event(0.0, 500.0, DeviceType.CPU),
    ]
    assert device_time(events) == (25.0, 35.0)
    assert device_time(list(reversed(events))) == (25.0, 35.0)


def test_no_device_work_is_no_time() -> None:
    assert device_time([_event(0.0, 10.0, DeviceType.CPU), _event(5.0, 5.0)]) == (0.0, 0.0)
