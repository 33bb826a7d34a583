"""Evaluation metrics against values computed from the stored teacher logprobs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from student.config import EvalConfig
from student.data import RowQuery, is_heldout, iter_rows
from student.evaluate import evaluate_model, evaluate_store
from storage.store import Store
from student.model import load_student
from tests.fixtures_student import damage_data_pages, standard_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir: Path, stories_prompts: Path) -> Path:
    root = tmp_path_factory.mktemp("store")
    # The checks compare the model's metrics with the stored logprobs to 1e-4, so the
    # store keeps them exactly instead of in the default 1/8-nat steps.
    Store(root).set_logprob_encoding("float32")
    return standard_store(root, model_dir, stories_prompts)


def expected_metrics(store: Path) -> dict[str, float]:
    """Metrics of the teacher against itself, from the stored rows alone.

    The teacher's own CE on its tokens is the mean negative stored logprob. KL from its
    renormalised top-k to its full distribution is -log(mass of the top-k), because on
    the k ids the student's probabilities equal the teacher's. The sampled token joins
    the top-k when it is missing from it.
    """
    ce, kl, positions = 0.0, 0.0, 0
    for row in iter_rows(RowQuery(store)):
        for index, token in enumerate(row["tokens"]):
            chosen = row["token_logprobs"][index]
            alternatives = row["top_logprobs"][index]
            mass = {alt["bytes"]: alt["logprob"] for alt in alternatives}
            mass.setdefault(row["token_bytes"][index], chosen)
            ce -= chosen
            kl -= math.log(sum(math.exp(lp) for lp in mass.values()))
            positions += 1
    return {"ce": ce / positions, "kl": kl / positions, "positions": positions}


def test_teacher_against_itself(store: Path, model_dir: Path) -> None:
    model, tokenizer = load_student(model_dir, torch.device("cpu"))
    result = evaluate_model(
        model, tokenizer, RowQuery(store), device=torch.device("cpu"), dtype=torch.float32, batch_size=5
    )
    expected = expected_metrics(store)

    assert result.positions == expected["positions"]
    assert result.kl_positions == expected["positions"]
    assert result.rows == 32
    assert result.ce_nats_per_token == pytest.approx(expected["ce"], abs=1e-4)
    assert result.kl_nats_per_token == pytest.approx(expected["kl"], abs=1e-4)
    # The teacher's most likely alternative is its own argmax at every position.
    assert result.top1_agreement == 1.0
    assert result.mapping["mapped_position_share"] == 1.0


def test_split_uses_checkpoint_holdout_fraction(store: Path, model_dir: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(model_dir, checkpoint)
    (checkpoint / "train_state.json").write_text(json.dumps({"config": {"holdout_fraction": 0.4}}))

    heldout = evaluate_store(EvalConfig(store_dir=store, student=str(checkpoint), split="heldout", device="cpu"))
    train = evaluate_store(EvalConfig(store_dir=store, student=str(checkpoint), split="train", device="cpu"))

    prompt_ids = [row["prompt_id"] for row in iter_rows(RowQuery(store))]
    expected_heldout = sum(is_heldout(p, 0.4) for p in prompt_ids)
    assert heldout.holdout_fraction == 0.4
    assert heldout.rows == expected_heldout
    assert 0 < heldout.rows < 32
    assert heldout.rows + train.rows == 32


def test_eval_cli_json_and_text(store: Path, model_dir: Path) -> None:
    runner = CliRunner()
    as_json = runner.invoke(
        cli, ["eval", "--store", str(store), "--student", str(model_dir), "--split", "all", "--json", "--device", "cpu"]
    )
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.output)
    for key in ("kl_nats_per_token", "ce_nats_per_token", "top1_agreement", "rows", "positions"):
        assert key in result, key
    assert result["rows"] == 32
    assert result["top1_agreement"] == 1.0

    as_text = runner.invoke(
        cli, ["eval", "--store", str(store), "--student", str(model_dir), "--split", "all", "--device", "cpu"]
    )
    assert as_text.exit_code == 0, as_text.output
    assert f"kl_nats_per_token  {result['kl_nats_per_token']:.4f}" in as_text.output
    assert "top1_agreement     100.00%" in as_text.output


def test_eval_cli_without_rows_fails(store: Path, model_dir: Path) -> None:
    result = CliRunner().invoke(
        cli, ["eval", "--store", str(store), "--student", str(model_dir), "--split", "all",
              "--where", "prompt_id = 'nobody'", "--device", "cpu"]
    )
    assert result.exit_code == 2
    assert "no positions to evaluate" in result.output
    assert "--include-truncated" in result.output
    assert "top1_agreement     n/a\n" in result.output
    assert "n/a%" not in result.output


def test_trained_student_closer_than_fresh(store: Path, model_dir: Path, tmp_path: Path) -> None:
    from student.config import StudentSpec, TrainConfig
    from student.model import make_student
    from student.trainer import run_training

    fresh = tmp_path / "fresh"
    make_student(model_dir, fresh, StudentSpec(layers=1, hidden_size=32, heads=4, kv_heads=2, init="fresh"))
    trained = tmp_path / "trained"
    run_training(
        TrainConfig(store_dir=store, student=str(fresh), out_dir=trained, steps=15, batch_size=8,
                    lr=1e-2, holdout_fraction=0.0, device="cpu", dtype="float32", log_every=5),
        progress=lambda line: None,
    )

    def kl(student: Path) -> float:
        config = EvalConfig(store_dir=store, student=str(student), split="all", device="cpu")
        return evaluate_store(config).kl_nats_per_token

    assert kl(trained) < kl(fresh) - 0.5


def damaged_copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged-store"
    shutil.copytree(store, copy)
    damage_data_pages(max((copy / "responses").glob("*.parquet"), key=lambda p: p.stat().st_size))
    return copy


@pytest.mark.parametrize("command", ["eval", "train"])
def test_cli_damaged_page_names_check(store: Path, model_dir: Path, tmp_path: Path, command: str) -> None:
    damaged = damaged_copy(store, tmp_path)
    arguments = [command, "--store", str(damaged), "--student", str(model_dir), "--device", "cpu",
                 "--split" if command == "eval" else "--out", "all" if command == "eval" else str(tmp_path / "o")]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 1, result.output
    assert f"run `pipeline check --store {damaged} --deep`" in result.output
    assert "part-" in result.output
    assert not isinstance(result.exception, AssertionError)
    assert "Traceback" not in result.output
