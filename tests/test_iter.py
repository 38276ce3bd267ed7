"""The batching helper of the projection's writes."""

from __future__ import annotations

import gc

from evals_orm._iter import batched_without_gc


def test_batches_are_drawn_with_the_collector_paused_and_emptied_after_use() -> None:
    """The collector is off while a batch is in use; asking for the next empties the last."""
    assert gc.isenabled()
    contents: list[list[int]] = []
    handed: list[list[int]] = []
    for batch in batched_without_gc(iter(range(5)), 2):
        assert not gc.isenabled()
        contents.append(list(batch))
        handed.append(batch)
    assert [[0, 1], [2, 3], [4]] == contents
    assert [[], [], []] == handed
    assert gc.isenabled()


def test_a_collector_switched_off_by_the_caller_stays_off() -> None:
    """The helper leaves the collector as it found it, also when the consumer stops early."""
    gc.disable()
    try:
        for _ in batched_without_gc(range(5), 2):
            break
        assert not gc.isenabled()
    finally:
        gc.enable()
    for _ in batched_without_gc(range(5), 2):
        break
    assert gc.isenabled()
