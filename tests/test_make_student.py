"""Students made from the tiny teacher: layer choice, copied and sliced weights, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import cli
from pipeline.errors import ConfigError
from student.config import StudentSpec
from student.model import create_student, teacher_layer_for


@pytest.fixture(scope="module")
def teacher(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


@pytest.mark.parametrize(
    ("student_layers", "teacher_layers", "expected"),
    [(2, 5, [0, 2]), (4, 8, [0, 2, 4, 6]), (5, 5, [0, 1, 2, 3, 4]), (1, 5, [0]), (3, 4, [0, 1, 3])],
)
def test_teacher_layer_for(student_layers: int, teacher_layers: int, expected: list[int]) -> None:
    assert [teacher_layer_for(i, student_layers, teacher_layers) for i in range(student_layers)] == expected


def test_copy_init_takes_every_kth_layer(model_dir: Path, teacher) -> None:
    student, _, info = create_student(model_dir, StudentSpec(layers=2, init="copy"))
    assert info["copied_layers"] == [0, 2]
    assert info["tensors"] == {"copied": 20, "sliced": 0, "fresh": 0}
    assert student.config.num_hidden_layers == 2

    for student_layer, teacher_layer in enumerate(info["copied_layers"]):
        mine = dict(student.model.layers[student_layer].named_parameters())
        theirs = dict(teacher.model.layers[teacher_layer].named_parameters())
        for name, value in mine.items():
            torch.testing.assert_close(value, theirs[name], rtol=0, atol=0)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    # The classifier stays tied to the embedding, as in the teacher.
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


def test_copy_of_all_layers_reproduces_teacher(model_dir: Path, teacher) -> None:
    student, tokenizer, _ = create_student(model_dir, StudentSpec(layers=5, init="copy"))
    ids = tokenizer("Once upon a time, there was", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


def test_copy_init_slices_narrower_widths(model_dir: Path, teacher) -> None:
    spec = StudentSpec(layers=2, hidden_size=32, intermediate_size=64, heads=4, kv_heads=2, init="copy")
    student, tokenizer, info = create_student(model_dir, spec)

    assert info["tensors"] == {"copied": 0, "sliced": 20, "fresh": 0}
    assert student.config.head_dim == 8
    q_proj = student.model.layers[1].self_attn.q_proj.weight
    assert q_proj.shape == (32, 32)
    torch.testing.assert_close(q_proj, teacher.model.layers[2].self_attn.q_proj.weight[:32, :32])
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, :32])

    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert student(ids).logits.shape == (1, ids.shape[1], 512)


def test_fresh_init_is_random(model_dir: Path, teacher) -> None:
    student, _, info = create_student(model_dir, StudentSpec(layers=2, init="fresh", seed=3))
    assert "tensors" not in info
    weight = student.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(weight, teacher.model.layers[0].self_attn.q_proj.weight)
    # Fresh weights follow the config's initializer_range (0.02 for this teacher).
    assert weight.std().item() == pytest.approx(0.02, rel=0.15)

    again, _, _ = create_student(model_dir, StudentSpec(layers=2, init="fresh", seed=3))
    torch.testing.assert_close(again.model.layers[0].self_attn.q_proj.weight, weight)


def test_invalid_sizes_reported_together(model_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        create_student(model_dir, StudentSpec(layers=0, heads=-1, init="distil"))
    message = str(caught.value)
    assert "3 invalid make-student settings" in message
    assert "--init 'distil'" in message
    assert "--layers must be >= 1" in message
    assert "--heads must be >= 1" in message

    with pytest.raises(ConfigError) as caught:
        create_student(model_dir, StudentSpec(layers=2, hidden_size=30, heads=4, kv_heads=3))
    message = str(caught.value)
    assert "--hidden-size 30 is not divisible by --heads 4" in message
    assert "--heads 4 is not divisible by --kv-heads 3" in message


def test_cli_saves_loadable_student(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = CliRunner().invoke(
        cli,
        ["make-student", "--teacher", str(model_dir), "--out", str(out), "--layers", "2",
         "--hidden-size", "32", "--heads", "4", "--kv-heads", "2", "--init", "copy"],
    )
    assert result.exit_code == 0, result.output
    assert "2 layers, layers [0, 2] copied" in result.output

    for name in ("config.json", "model.safetensors", "tokenizer.json", "student_info.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "student_info.json").read_text())
    assert info["spec"]["hidden_size"] == 32

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    teacher_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert model.config.num_hidden_layers == 2
    assert model.config.hidden_size == 32
    text = "Once upon a time, there was a \U0001F60A"
    assert tokenizer(text).input_ids == teacher_tokenizer(text).input_ids


def test_cli_rejects_bad_sizes(model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["make-student", "--teacher", str(model_dir), "--out", str(tmp_path / "s"),
         "--layers", "0", "--hidden-size", "0"],
    )
    assert result.exit_code == 2
    assert "--layers must be >= 1" in result.output
    assert "--hidden-size must be >= 1" in result.output
    assert not (tmp_path / "s").exists()


def test_cli_lists_init_choices(model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["make-student", "--teacher", str(model_dir), "--out", str(tmp_path / "s"), "--layers", "1",
              "--init", "prune"],
    )
    assert result.exit_code == 2
    assert "'copy'" in result.output
    assert "'fresh'" in result.output


def make_student_cli(model_dir: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        cli, ["make-student", "--teacher", str(model_dir), "--out", str(out), "--layers", "1", *extra]
    )


def test_cli_out_under_file_names_out(model_dir: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile / "x", afile):
        result = make_student_cli(model_dir, out)
        assert result.exit_code == 2, result.output
        assert f"cannot create --out {out}" in result.output
        assert "Traceback" not in result.output
        assert "cannot load teacher" not in result.output


def test_cli_uncreatable_out_is_usage_error(model_dir: Path) -> None:
    result = make_student_cli(model_dir, Path("/proc/nope/x"))
    assert result.exit_code == 2, result.output
    assert "cannot create --out /proc/nope/x" in result.output


def test_cli_nonempty_out_needs_overwrite(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    refused = make_student_cli(model_dir, out)
    assert refused.exit_code == 2
    assert "--overwrite" in refused.output
    assert not (out / "config.json").exists()

    replaced = make_student_cli(model_dir, out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "config.json").is_file()


def test_cli_rejects_student_larger_than_teacher(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "big"
    result = CliRunner().invoke(
        cli, ["make-student", "--teacher", str(model_dir), "--out", str(out), "--layers", "99", "--heads", "64"]
    )
    assert result.exit_code == 2
    assert "--layers 99 exceeds the teacher's num_hidden_layers 5" in result.output
    assert "--heads 64 exceeds" in result.output
    assert "--allow-larger" in result.output
    assert not out.exists()


def test_allow_larger_accepts_more_layers(model_dir: Path) -> None:
    student, _, info = create_student(model_dir, StudentSpec(layers=6, init="fresh", allow_larger=True))
    assert student.config.num_hidden_layers == 6


def test_cli_missing_teacher_is_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["make-student", "--teacher", str(tmp_path / "nothing"), "--out", str(tmp_path / "s"), "--layers", "1"]
    )
    assert result.exit_code == 2
    assert f"model not found: {tmp_path / 'nothing'} is not a directory and not a valid hub id" in result.output


def test_cli_teacher_without_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        cli, ["make-student", "--teacher", str(empty), "--out", str(tmp_path / "s"), "--layers", "1"]
    )
    assert result.exit_code == 2
    assert f"{empty} has no config.json; pass a transformers model directory" in result.output
    assert not (tmp_path / "s").exists()
