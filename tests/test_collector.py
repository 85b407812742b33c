"""A started process keeps its start-up objects out of full collections and collects young objects less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pagedserve.runtime.collector import YOUNG_COLLECTION_THRESHOLD, freeze_startup_objects


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_objects_alive_at_start_up_are_frozen_and_young_collections_are_rarer() -> None:
    gc.unfreeze()
    startup_object: list[object] = [[]]  # a container of containers: tracked by the collector
    freeze_startup_objects()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD
    assert gc.is_tracked(startup_object)
    assert not any(startup_object is referent for referent in gc.get_objects(generation=2))
