"""The harvest command's GC settings: applied during the run, restored afterwards."""

from __future__ import annotations

import gc

from pipeline.commands.harvest import GC_THRESHOLDS, _tuned_gc


def test_tuned_gc_applies_and_restores() -> None:
    before = gc.get_threshold()
    with _tuned_gc():
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_tuned_gc_restores_after_error() -> None:
    before = gc.get_threshold()
    try:
        with _tuned_gc():
            raise RuntimeError("stop")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
