"""The training-step benchmark's ratios and its loading of a baseline losses module."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_train import Variant, load_loss_sums, ratio_pairs, step_ratios

REPO_DIR = Path(__file__).resolve().parents[1]


def variants(*names: str) -> list[Variant]:
    return [Variant(name, name.split("@")[0], None) for name in names]


def test_ratio_pairs_without_baseline() -> None:
    pairs = ratio_pairs(variants("ce-reference", "sequence", "topk", "mixed"))
    assert pairs == [
        ("topk", "sequence"),
        ("topk", "ce-reference"),
        ("mixed", "sequence"),
        ("sequence", "ce-reference"),
    ]


def test_ratio_pairs_with_baseline() -> None:
    pairs = ratio_pairs(variants("ce-reference", "sequence", "topk", "sequence@before", "topk@before"))
    assert ("topk@before", "sequence@before") in pairs
    assert ("topk@before", "ce-reference") in pairs
    assert ("topk", "topk@before") in pairs
    assert ("sequence", "sequence@before") in pairs
    assert all("mixed" not in name for pair in pairs for name in pair)


def test_ratio_pairs_single_mode_empty() -> None:
    assert ratio_pairs(variants("topk")) == []


def test_step_ratios_use_median_of_rounds() -> None:
    # Per-round ratios 1.2, 0.5 and 1.5 have the median 1.2. The ratio of the
    # medians would be 0.6, and the ratio of the fastest steps is 1.0.
    wall = {"topk": [1.2, 1.0, 3.0], "sequence": [1.0, 2.0, 2.0]}
    cpu = {"topk": [1.0, 1.0, 1.0], "sequence": [1.0, 1.0, 2.0]}
    peaks = {"topk": 110.0, "sequence": 100.0}
    [row] = step_ratios("wide", wall, cpu, peaks, variants("sequence", "topk"))
    assert row["ratio"] == "topk / sequence"
    assert row["time_median"] == pytest.approx(1.2)
    assert row["time_min"] == pytest.approx(1.0)
    assert row["cpu_median"] == pytest.approx(1.0)
    assert row["peak_memory"] == pytest.approx(1.1)


def test_load_loss_sums_from_file(tmp_path: Path) -> None:
    copy = tmp_path / "losses_copy.py"
    copy.write_text((REPO_DIR / "student" / "losses.py").read_text())
    loss_sums = load_loss_sums(copy)
    assert loss_sums.__name__ == "distillation_loss_sums"
    assert loss_sums.__module__ != "student.losses"
