"""Trainer lifecycle on the real tiny model and a store of its own outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import ConfigError
from student.config import StudentSpec, TrainConfig
from student.data import IGNORE_INDEX, Sample, collate
from student.model import make_student
from student.trainer import Trainer, _Window, format_progress, learning_rate, run_training
from tests.fixtures_student import cached_teacher_rows, standard_store, write_store

PROGRESS_LINE = re.compile(
    r"^step \d{5}/\d{5} \| loss \d+\.\d{4} \| ce \d+\.\d{2} \| kl (\d+\.\d{3}|-)"
    r" \| lr \d\.\de[-+]\d{2} \| tokens_per_sec \d+ \| mapped \d+\.\d%$"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir: Path, stories_prompts: Path) -> Path:
    return standard_store(tmp_path_factory.mktemp("store"), model_dir, stories_prompts)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("student")
    make_student(model_dir, out, StudentSpec(layers=2, init="copy"))
    return out


def config_for(store: Path, student_dir: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        store_dir=store, student=str(student_dir), out_dir=out, steps=4, batch_size=4,
        lr=3e-3, log_every=2, holdout_fraction=0.25, device="cpu", dtype="float32",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_learning_rate_schedule() -> None:
    config = TrainConfig(store_dir=".", student="x", out_dir="o", steps=11, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    rates = [learning_rate(step, config) for step in range(11)]
    assert rates[:2] == pytest.approx([0.5, 1.0])
    assert rates[2] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))


def test_progress_line_format() -> None:
    entry = {"loss": 2.341, "ce": 2.3, "kl": 0.041, "lr": 3e-4, "tokens_per_sec": 12345.4, "mapped_share": 1.0}
    line = format_progress(50, 300, entry)
    assert line == (
        "step 00050/00300 | loss 2.3410 | ce 2.30 | kl 0.041 | lr 3.0e-04"
        " | tokens_per_sec 12345 | mapped 100.0%"
    )
    assert format_progress(1, 2, dict(entry, kl=None)).split(" | ")[3] == "kl -"


def test_config_errors_reported_together(tmp_path: Path) -> None:
    config = TrainConfig(
        store_dir=tmp_path / "missing", student=str(tmp_path / "no-model"), out_dir=tmp_path / "out",
        loss="reverse_kl", steps=0, alpha=1.5, temperature=0.0, holdout_fraction=1.0,
    )
    with pytest.raises(ConfigError) as caught:
        config.validate()
    message = str(caught.value)
    for flag in ("--store", "--student", "--loss", "--steps", "--alpha", "--temperature", "--holdout-fraction"):
        assert flag in message, flag
    assert message.startswith("7 invalid train settings")


@pytest.mark.slow
def test_setup_rejects_store_without_rows(store: Path, student_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(config_for(store, student_dir, tmp_path / "out", where="prompt_id = 'nobody'"))
    with pytest.raises(ConfigError, match="no rows .* match the training filters"):
        trainer.setup()
    trainer.cleanup()


@pytest.fixture()
def trainer(store: Path, student_dir: Path, tmp_path: Path):
    trainer = Trainer(config_for(store, student_dir, tmp_path / "out"))
    trainer.setup()
    yield trainer
    trainer.cleanup()


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.slow
def test_accumulation_is_token_weighted(trainer: Trainer) -> None:
    samples = list(islice(trainer.samples, 3))
    # Mask most targets of the first sample so the micro-batches differ in token count.
    first = samples[0]
    first.target_ids = first.target_ids[:-12] + [IGNORE_INDEX] * 12
    first.teacher = {t: d for t, d in first.teacher.items() if first.target_ids[t] != IGNORE_INDEX}
    assert first.num_targets < samples[1].num_targets
    pad, width = trainer.pad_id, trainer.vocab_size
    split = [collate(samples[:1], pad, width), collate(samples[1:], pad, width)]
    whole = [collate(samples, pad, width)]

    trainer._accumulate_gradients(split)
    accumulated = gradients(trainer.model)
    trainer._accumulate_gradients(whole)
    single = gradients(trainer.model)
    for name, grad in single.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-7)

    # Averaging each micro-batch on its own weighs tokens unequally: a different gradient.
    for batch in split:
        sums = trainer._loss_step(batch)
        (sums.loss / batch.num_targets / len(split)).backward()
    per_batch_mean = gradients(trainer.model)
    name = "model.embed_tokens.weight"
    assert not torch.allclose(per_batch_mean[name], single[name], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_all_masked_window_skips_step(trainer: Trainer) -> None:
    empty = Sample("empty", [1, 403, 407], [IGNORE_INDEX] * 3, True)
    batch = collate([empty, empty], trainer.pad_id, trainer.vocab_size)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    totals = trainer._accumulate_gradients([batch])
    assert totals["loss_sum"].item() == 0.0
    for name, param in trainer.model.named_parameters():
        assert torch.isfinite(param.grad).all(), name
        assert torch.count_nonzero(param.grad) == 0, name
    trainer.model.zero_grad(set_to_none=True)

    trainer._next_window = lambda: [batch]
    window = _Window()
    trainer._train_step(window)
    assert trainer.skipped_steps == 1
    assert window.loss_sum == 0.0
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name


@pytest.mark.slow
def test_short_run_loss_decreases(store: Path, student_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "trained"
    lines: list[str] = []
    config = config_for(
        store, student_dir, out, loss="topk", steps=24, batch_size=8, log_every=4, eval_rows=16
    )
    summary = run_training(config, progress=lines.append)

    progress = [line for line in lines if line.startswith("step ")]
    # Step 1 on its own, then every 4 steps.
    assert [line.split(" |")[0] for line in progress] == [
        "step 00001/00024", *(f"step {step:05d}/00024" for step in range(4, 25, 4))
    ]
    for line in progress:
        assert PROGRESS_LINE.match(line), line
    losses = [entry["loss"] for entry in summary_history(out) if "loss" in entry]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(math.isfinite(loss) for loss in losses)
    assert summary.final_eval.kl_nats_per_token < summary.baseline_eval.kl_nats_per_token

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 24
    assert state["finished"] is True
    assert state["config"]["loss"] == "topk"
    assert state["data_cursor"]["epoch"] >= 1
    assert state["mapping"]["mapped_position_share"] == 1.0
    assert state["wall_time_s"] > 0
    # The row cut at max_tokens is not training data by default.
    assert state["mapping"]["rows_read"] == summary.mapping.rows_read
    assert summary.mapping.rows_token_level == summary.mapping.rows_read
    assert any("held-out after" in line for line in summary.lines())


def summary_history(out: Path) -> list[dict]:
    return json.loads((out / "train_state.json").read_text())["metrics"]


@pytest.mark.slow
def test_cut_rows_excluded_unless_included(store: Path, student_dir: Path, tmp_path: Path) -> None:
    def rows_read(batch_size: int = 40, **overrides) -> int:
        config = config_for(store, student_dir, tmp_path / "out", steps=1, batch_size=batch_size,
                            holdout_fraction=0.0, overwrite=True, **overrides)
        return run_training(config, progress=lambda line: None).mapping.rows_read

    assert rows_read() == 32
    assert rows_read(include_truncated=True) == 33
    assert rows_read(batch_size=1, where="finish_reason = 'length'") == 1
    with pytest.raises(ConfigError, match="no rows"):
        rows_read(where="prompt_id = 'cut-at-max-tokens'")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sequence", "mixed"])
def test_cli_train_runs_each_loss(store: Path, student_dir: Path, tmp_path: Path, loss: str) -> None:
    out = tmp_path / loss
    result = CliRunner().invoke(
        cli,
        ["train", "--store", str(store), "--student", str(student_dir), "--out", str(out),
         "--loss", loss, "--steps", "2", "--batch-size", "4", "--log-every", "1",
         "--device", "cpu", "--holdout-fraction", "0", "--grad-accum-steps", "2"],
    )
    assert result.exit_code == 0, result.output
    progress = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert len(progress) == 2
    assert all(PROGRESS_LINE.match(line) for line in progress), progress
    kl_fields = {line.split(" | ")[3] for line in progress}
    if loss == "sequence":
        assert kl_fields == {"kl -"}
    else:
        assert "kl -" not in kl_fields
    assert "trained 2 steps" in result.output
    assert (out / "train_state.json").is_file()


@pytest.mark.slow
def test_cli_train_lists_every_bad_flag(store: Path, student_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["train", "--store", str(store), "--student", str(student_dir), "--out", str(tmp_path / "o"),
         "--loss", "kl", "--steps", "0", "--alpha", "2", "--device", "tpu"],
    )
    assert result.exit_code == 2
    assert "'kl' is not one of 'sequence', 'topk', 'mixed'" in result.output

    result = CliRunner().invoke(
        cli,
        ["train", "--store", str(store), "--student", str(student_dir), "--out", str(tmp_path / "o"),
         "--steps", "0", "--alpha", "2", "--device", "tpu"],
    )
    assert result.exit_code == 2
    for text in ("3 invalid train settings", "--steps", "--alpha", "--device 'tpu'", "cuda:N"):
        assert text in result.output, text


def train_cli(store: Path, student: Path | str, out: Path, *extra: str):
    return CliRunner().invoke(
        cli,
        ["train", "--store", str(store), "--student", str(student), "--out", str(out), "--steps", "1",
         "--batch-size", "4", "--device", "cpu", "--holdout-fraction", "0", *extra],
    )


@pytest.mark.slow
def test_cli_uncreatable_out_is_usage_error(store: Path, student_dir: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (Path("/proc/nope/x"), afile / "x", afile):
        result = train_cli(store, student_dir, out)
        assert result.exit_code == 2, result.output
        assert f"cannot create --out {out}" in result.output
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_cli_nonempty_out_needs_overwrite(store: Path, student_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = train_cli(store, student_dir, out)
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_cli_missing_student_names_model(store: Path, tmp_path: Path) -> None:
    result = train_cli(store, "/nonexistent", tmp_path / "out")
    assert result.exit_code == 2
    assert "model not found: /nonexistent is not a directory and not a valid hub id" in result.output


def store_without_logprobs(root: Path, model_dir: Path, prompts: Path, stripped_share: float) -> Path:
    rows = [dict(row) for row in cached_teacher_rows(model_dir, prompts)]
    stripped = int(len(rows) * stripped_share)
    for row in rows[:stripped]:
        row.update(logprobs=None, logprobs_format=None, logprobs_lossy=None, token_level_ok=False)
    return write_store(root, rows)


@pytest.mark.slow
def test_cli_topk_without_any_logprobs_rejected(
    model_dir: Path, stories_prompts: Path, student_dir: Path, tmp_path: Path
) -> None:
    store = store_without_logprobs(tmp_path / "store", model_dir, stories_prompts, 1.0)
    result = train_cli(store, student_dir, tmp_path / "out", "--loss", "topk")
    assert result.exit_code == 2
    assert "--loss sequence" in result.output
    assert not (tmp_path / "out" / "train_state.json").exists()


@pytest.mark.slow
def test_cli_topk_warns_rows_without_logprobs(
    model_dir: Path, stories_prompts: Path, student_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_without_logprobs(tmp_path / "store", model_dir, stories_prompts, 0.5)
    with caplog.at_level(logging.WARNING, logger="student.trainer"):
        result = train_cli(store, student_dir, tmp_path / "out", "--loss", "topk")
    assert result.exit_code == 0, result.output
    warning = "16 of 32 training rows have no teacher logprobs; they train on cross-entropy only"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [warning]
    assert f"warning: {warning}" in result.output


def start_training(store: Path, student_dir: Path, out: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "pipeline.cli", "train", "--store", str(store), "--student", str(student_dir),
        "--out", str(out), "--steps", "100000", "--batch-size", "2", "--log-every", "1",
        "--device", "cpu", "--holdout-fraction", "0",
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parents[1],
    )


@pytest.mark.slow
@pytest.mark.parametrize(("stop_signal", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_interrupted_checkpoint(
    store: Path, student_dir: Path, tmp_path: Path, stop_signal: signal.Signals, status: int
) -> None:
    out = tmp_path / "out"
    process = start_training(store, student_dir, out)
    try:
        for line in process.stdout:
            if line.startswith("step 00002/"):
                break
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == status, stderr
    assert f"interrupted by {stop_signal.name}" in stderr
    assert str(out) in stderr
    state = json.loads((out / "train_state.json").read_text())
    assert state["interrupted"] == stop_signal.name
    assert state["finished"] is False
    assert state["step"] >= 2
    assert (out / "model.safetensors").is_file()
