"""Sequence-level CE against top-k KL distillation: two students trained from one init.

The script runs the whole job through the real ``pipeline`` commands, each in a child
process. ``serve-teacher`` serves the stories260k teacher on a free loopback port, and
``harvest`` collects every TinyStories opening with top-20 logprobs. ``make-student``
makes one smaller student init, which ``train`` trains twice (``--loss sequence`` and
``--loss topk``) with the same steps, batch size, learning rate and seed. ``eval``
measures both students, the untrained init and the teacher itself on the held-out
prompts. The teacher is stopped as soon as the harvest ends, and in any case before the
script exits.

The init is ``fresh`` (random) by default, so whatever a student knows of the teacher
came through its loss from the stored responses. A ``copy`` init (``--init copy``)
starts from the teacher's embeddings and some of its layers, and then the figures mix
what the copied weights carry with what each loss teaches. Responses cut at
``max_tokens`` are kept for training and evaluation (``--include-truncated``) because
the tiny teacher rarely finishes a story within the token budget.

The store lives in ``--out`` under a name that includes a digest of the harvest
settings. A second run with the same ``--out`` and harvest settings therefore reuses the
stored responses (the harvest resumes and sends nothing), and other harvest settings get
a store of their own instead of mixing with the first. Students are made and trained
afresh each run.

    python -m benchmarks.bench_distill                       # 7 to 11 minutes, see DISTILL.md
    python -m benchmarks.bench_distill --quick               # 1 to 2 minutes
    python -m benchmarks.bench_distill --seeds 0,1,2 --out benchmarks/out/distill-seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from benchmarks.common import (
    OUT_DIR,
    REPO_DIR,
    SHARED_DIR,
    code_version,
    machine_info,
    print_table,
)
from student.data import holdout_bucket

TEACHER_DIR = SHARED_DIR / "models" / "stories260k"
PROMPTS_PATH = SHARED_DIR / "data" / "prompts" / "tinystories_openings.jsonl"
HOST = "127.0.0.1"
LOSSES = ("sequence", "topk")
# Environment variable that carries the placeholder key, so a real OPENAI_API_KEY in the
# caller's environment is never sent, not even to the loopback teacher.
KEY_ENV = "KD_BENCH_TEACHER_KEY"
SERVER_LINE = re.compile(r"serving model .* on (http://127\.0\.0\.1:\d+/v1)")
TRAINED_LINE = re.compile(r"trained (\d+) steps in ([\d.]+) s")


@dataclass(frozen=True)
class DistillSettings:
    """Every setting of one comparison. The defaults are those of the full run."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    kd_temperature: float = 1.0
    train_seeds: tuple[int, ...] = (0,)
    holdout_fraction: float = 0.1
    student_layers: int = 2
    student_init: str = "fresh"
    student_init_seed: int = 0
    # None reads every prompt line.
    prompt_limit: int | None = None
    samples: int = 2
    max_tokens: int = 128
    sampling_temperature: float = 1.0
    sampling_seed: int = 1234
    top_logprobs: int = 20
    # The server decodes one request at a time; a few in flight keep it busy.
    concurrency: int = 4


# 96 prompts, because the held-out share of the first 48 (by a hash of prompt_id) is one prompt.
QUICK_SETTINGS = DistillSettings(steps=20, prompt_limit=96, samples=1, max_tokens=32)


class StepFailed(RuntimeError):
    """A pipeline command exited with an unexpected status."""


@dataclass
class StepResult:
    """Output and wall time of one finished pipeline command."""

    argv: list[str]
    returncode: int
    wall_s: float
    stdout: str
    stderr: str


class PipelineRunner:
    """Runner of pipeline commands as child processes, which keeps each one's output in ``logs/``."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", KEY_ENV: "placeholder-for-loopback"}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", *args]

    def run(self, name: str, *args: str) -> StepResult:
        """Run ``pipeline ARGS`` and raise StepFailed unless it exits with status 0.

        The child writes to ``logs/NAME.out`` and ``logs/NAME.err`` directly, so its
        output is kept even when this process is interrupted.
        """
        argv = self.argv(*args)
        print(f"$ {shlex.join(['pipeline', *args])}", flush=True)
        out_path, err_path = self.log_dir / f"{name}.out", self.log_dir / f"{name}.err"
        start = time.perf_counter()
        with out_path.open("w") as out, err_path.open("w") as err:
            returncode = _run_child(argv, self.env, out, err)
        wall_s = time.perf_counter() - start
        result = StepResult(argv, returncode, wall_s, out_path.read_text(), err_path.read_text())

        print(f"  {name}: exit status {returncode} in {wall_s:.1f} s", flush=True)
        if returncode != 0:
            tail = (result.stderr or result.stdout)[-2000:]
            raise StepFailed(f"{name} failed with exit status {returncode}; see {err_path}\n{tail}")
        return result


def _run_child(argv: list[str], env: dict[str, str], out: IO[str], err: IO[str]) -> int:
    """Run ``argv`` to completion, or stop it with SIGTERM when this process is interrupted.

    SIGTERM, unlike the SIGKILL of ``subprocess.run``, lets ``pipeline harvest`` write
    what it received and record its run as interrupted.
    """
    child = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO_DIR)
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


class TeacherServer:
    """``pipeline serve-teacher`` on a port the server picks itself (``--port 0``)."""

    def __init__(self, runner: PipelineRunner, model_dir: Path, log_path: Path):
        self.runner = runner
        self.model_dir = model_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.served_name = model_dir.name

    def start(self, timeout_s: float = 180.0) -> str:
        """Start the server, wait until /health responds, and return its base URL."""
        argv = self.runner.argv("serve-teacher", str(self.model_dir), "--host", HOST, "--port", "0")
        print(f"$ {shlex.join(['pipeline', *argv[3:]])}", flush=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.runner.env, cwd=REPO_DIR
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                status = self.process.returncode
                raise StepFailed(f"serve-teacher exited with status {status}; see {self.log_path}")
            if not self.base_url:
                match = SERVER_LINE.search(self.log_path.read_text(errors="replace"))
                self.base_url = match.group(1) if match else ""
            if self.base_url and self._healthy():
                print(f"  teacher ready on {self.base_url}", flush=True)
                return self.base_url
            time.sleep(0.3)
        raise StepFailed(f"serve-teacher was not ready after {timeout_s:.0f} s; see {self.log_path}")

    def _healthy(self) -> bool:
        health_url = self.base_url.removesuffix("/v1") + "/health"
        try:
            return httpx.get(health_url, timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        """Stop the server with SIGTERM, or SIGKILL when it has not exited after 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        print(f"  teacher stopped (exit status {self.process.returncode})", flush=True)


def harvest(runner: PipelineRunner, settings: DistillSettings, store: Path) -> dict[str, Any]:
    """Harvest the prompts from a freshly started teacher, then stop it."""
    server = TeacherServer(runner, TEACHER_DIR, runner.log_dir / "serve-teacher.log")
    try:
        base_url = server.start()
        limit = ["--limit", str(settings.prompt_limit)] if settings.prompt_limit else []
        step = runner.run(
            "harvest", "harvest", str(PROMPTS_PATH), "--store", str(store),
            "--base-url", base_url, "--model", server.served_name, "--teacher", "stories260k",
            "--api-key-env", KEY_ENV, "--endpoint", "chat",
            "--max-tokens", str(settings.max_tokens), "--temperature", str(settings.sampling_temperature),
            "--seed", str(settings.sampling_seed), "--samples", str(settings.samples),
            "--top-logprobs", str(settings.top_logprobs), "--concurrency", str(settings.concurrency),
            "--no-progress", *limit,
        )
    finally:
        server.stop()
    return {"wall_s": step.wall_s, "summary": step.stdout.strip().splitlines()}


def harvest_digest(settings: DistillSettings) -> str:
    """Return a short digest of the settings that decide which requests a harvest sends."""
    fields = {
        "teacher": str(TEACHER_DIR), "prompts": str(PROMPTS_PATH), "prompt_limit": settings.prompt_limit,
        "samples": settings.samples, "max_tokens": settings.max_tokens,
        "temperature": settings.sampling_temperature, "seed": settings.sampling_seed,
        "top_logprobs": settings.top_logprobs,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def sql_rows(runner: PipelineRunner, name: str, store: Path, query: str) -> list[dict[str, Any]]:
    """Run ``pipeline sql --format json`` and return its rows."""
    step = runner.run(name, "sql", query, "--store", str(store), "--format", "json")
    return json.loads(step.stdout)


def store_summary(runner: PipelineRunner, store: Path) -> list[dict[str, Any]]:
    """Return responses, prompts and completion tokens per finish_reason."""
    return sql_rows(
        runner, "store-summary", store,
        "SELECT finish_reason, count(*) AS responses, count(DISTINCT prompt_id) AS prompts,"
        " sum(completion_tokens) AS completion_tokens FROM responses"
        " GROUP BY finish_reason ORDER BY finish_reason",
    )


def split_rows_expected(runner: PipelineRunner, store: Path, fraction: float) -> dict[str, Any]:
    """Count the stored rows on each side of the split, choosing held-out prompts by their id alone.

    Training splits by a hash of prompt_id, so the held-out count made here must equal the
    rows every ``pipeline eval --split heldout`` reads, and the rest the rows training reads.
    """
    ids = [row["prompt_id"] for row in sql_rows(
        runner, "prompt-ids", store, "SELECT DISTINCT prompt_id FROM responses ORDER BY prompt_id"
    )]
    heldout = [prompt_id for prompt_id in ids if holdout_bucket(prompt_id) < fraction]
    # The empty string is no prompt_id of this prompts file, and keeps IN () valid SQL.
    id_list = ", ".join("'" + prompt_id.replace("'", "''") + "'" for prompt_id in heldout) or "''"
    counted = sql_rows(
        runner, "split-count", store,
        f"SELECT count(*) FILTER (WHERE prompt_id IN ({id_list})) AS heldout, count(*) AS total"
        " FROM responses WHERE response IS NOT NULL AND finish_reason IN ('stop', 'length')",
    )[0]
    return {
        "prompts": len(ids),
        "heldout_prompts": len(heldout),
        "heldout_rows": counted["heldout"],
        "train_rows": counted["total"] - counted["heldout"],
    }


def make_student(runner: PipelineRunner, settings: DistillSettings, out: Path) -> dict[str, Any]:
    step = runner.run(
        "make-student", "make-student", "--teacher", str(TEACHER_DIR), "--out", str(out),
        "--layers", str(settings.student_layers), "--init", settings.student_init,
        "--seed", str(settings.student_init_seed),
    )
    info = json.loads((out / "student_info.json").read_text())
    return {"wall_s": step.wall_s, "summary": step.stdout.strip(), "info": info}


def train(runner: PipelineRunner, settings: DistillSettings, store: Path, init: Path,
          out: Path, loss: str, seed: int) -> dict[str, Any]:
    """Train one student and return its wall times and last logged loss."""
    step = runner.run(
        f"train-{loss}-seed{seed}", "train", "--store", str(store), "--student", str(init),
        "--out", str(out), "--loss", loss, "--steps", str(settings.steps),
        "--batch-size", str(settings.batch_size), "--lr", str(settings.lr),
        "--temperature", str(settings.kd_temperature), "--seed", str(seed),
        "--holdout-fraction", str(settings.holdout_fraction), "--include-truncated",
    )
    match = TRAINED_LINE.search(step.stdout)
    state = json.loads((out / "train_state.json").read_text())
    # train_state.json lists progress entries (with "loss") and held-out entries (with "val_kl").
    progress = [entry for entry in state["metrics"] if "loss" in entry]
    held_out = [entry for entry in state["metrics"] if "val_kl" in entry]
    return {
        "wall_s": step.wall_s,
        "train_loop_s": float(match.group(2)) if match else None,
        "steps": state["step"],
        "train_rows": state["mapping"]["rows_read"],
        "data_cursor": state["data_cursor"],
        "final_loss": progress[-1]["loss"] if progress else None,
        "trainer_held_out": held_out[-1] if held_out else None,
    }


def evaluate(
    runner: PipelineRunner, settings: DistillSettings, store: Path, model: Path, name: str
) -> dict[str, Any]:
    """Run ``pipeline eval --split heldout --json`` on one model and return its metrics."""
    step = runner.run(
        f"eval-{name}", "eval", "--store", str(store), "--student", str(model),
        "--split", "heldout", "--holdout-fraction", str(settings.holdout_fraction),
        "--include-truncated", "--json",
    )
    metrics = json.loads(step.stdout)
    metrics["wall_s"] = step.wall_s
    return metrics


def compare(settings: DistillSettings, out: Path) -> dict[str, Any]:
    """Run the whole comparison in ``out`` and return the result record."""
    store = out / f"store-{harvest_digest(settings)}"
    runs_dir = out / "students"
    log_dir = out / "logs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    log_dir.mkdir(parents=True)
    runner = PipelineRunner(log_dir)
    started = time.perf_counter()

    harvested = harvest(runner, settings, store)
    summary = store_summary(runner, store)
    init_dir = runs_dir / f"init-{settings.student_init}"
    student = make_student(runner, settings, init_dir)

    students: list[dict[str, Any]] = []
    for seed in settings.train_seeds:
        for loss in LOSSES:
            checkpoint = runs_dir / f"{loss}-seed{seed}"
            trained = train(runner, settings, store, init_dir, checkpoint, loss, seed)
            metrics = evaluate(runner, settings, store, checkpoint, f"{loss}-seed{seed}")
            students.append(
                {"model": f"{loss} student", "loss": loss, "seed": seed, "train": trained, "eval": metrics}
            )

    baselines = [
        {"model": "teacher (reference)", "loss": None, "seed": None, "train": None,
         "eval": evaluate(runner, settings, store, TEACHER_DIR, "teacher")},
        {"model": f"untrained {settings.student_init} init", "loss": None, "seed": None, "train": None,
         "eval": evaluate(runner, settings, store, init_dir, "init")},
    ]
    split_check = check_split(runner, settings, store, [*baselines, *students])
    return {
        "settings": dataclasses.asdict(settings),
        "harvest": harvested,
        "store": summary,
        "student_init": student,
        "models": [*baselines, *students],
        "split_check": split_check,
        "total_wall_s": time.perf_counter() - started,
    }


def check_split(
    runner: PipelineRunner, settings: DistillSettings, store: Path, models: list[dict[str, Any]]
) -> dict[str, Any]:
    """Check that every evaluation read the held-out rows chosen by prompt_id, and training the rest."""
    check = split_rows_expected(runner, store, settings.holdout_fraction)
    rows = sorted({model["eval"]["rows"] for model in models})
    positions = sorted({model["eval"]["positions"] for model in models})
    check["rows_read_by_eval"] = rows
    check["positions_by_eval"] = positions
    # train_state.json counts the rows of the first pass over the data, so the count
    # covers the whole training split only once training has started a second pass.
    trained = [model["train"] for model in models if model["train"]]
    check["rows_read_by_train"] = sorted({
        run["train_rows"] for run in trained if run["data_cursor"]["epoch"] >= 1
    })
    check["consistent"] = (
        rows == [check["heldout_rows"]]
        and len(positions) == 1
        and check["rows_read_by_train"] in ([], [check["train_rows"]])
    )
    return check


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one Markdown table row per model, plus mean ± sd rows when seeds vary."""
    settings = result["settings"]
    rows = []
    for model in result["models"]:
        metrics, trained = model["eval"], model["train"]
        rows.append({
            "model": model["model"],
            "loss": model["loss"] or "-",
            "seed": model["seed"],
            "steps": trained["steps"] if trained else 0,
            "train wall s": f"{trained['wall_s']:.1f}" if trained else None,
            "held-out KL nats/token": _fixed(metrics["kl_nats_per_token"], 4),
            "CE on teacher tokens": _fixed(metrics["ce_nats_per_token"], 4),
            "top-1 agreement": _percent(metrics["top1_agreement"]),
            "positions": metrics["positions"],
        })
    if len(settings["train_seeds"]) > 1:
        rows += [_seed_summary(result["models"], loss) for loss in LOSSES]
    return rows


def _seed_summary(models: list[dict[str, Any]], loss: str) -> dict[str, Any]:
    runs = [model for model in models if model["loss"] == loss]

    def spread(key: str, scale: float = 1.0, digits: int = 4) -> str:
        values = [scale * run["eval"][key] for run in runs]
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    return {
        "model": f"{loss} student, mean ± sd of {len(runs)} seeds",
        "loss": loss,
        "seed": "all",
        "steps": runs[0]["train"]["steps"],
        "train wall s": f"{statistics.mean(run['train']['wall_s'] for run in runs):.1f}",
        "held-out KL nats/token": spread("kl_nats_per_token"),
        "CE on teacher tokens": spread("ce_nats_per_token"),
        "top-1 agreement": spread("top1_agreement", 100, 1) + "%",
        "positions": runs[0]["eval"]["positions"],
    }


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_result(out: Path, result: dict[str, Any]) -> Path:
    """Write the record with the date, machine and code version to ``out/bench_distill-<time>.json``."""
    now = dt.datetime.now(dt.UTC)
    record = {
        "benchmark": "bench_distill",
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.bench_distill", *sys.argv[1:]]),
        "machine": machine_info(),
        "code": code_version(),
        "load_average": os.getloadavg(),
        **result,
    }
    path = out / f"bench_distill-{now.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the store, students, logs and result JSON"
                        " [default: benchmarks/out/distill, or distill-quick with --quick]")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per student [default: {DistillSettings.steps},"
                        f" {QUICK_SETTINGS.steps} with --quick]")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_SETTINGS.prompt_limit} prompts, {QUICK_SETTINGS.samples} sample,"
                        f" {QUICK_SETTINGS.max_tokens} tokens, {QUICK_SETTINGS.steps} steps")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated training seeds; each trains both students [default: 0]")
    parser.add_argument("--init", choices=("fresh", "copy"), default="fresh",
                        help="student init passed to pipeline make-student --init [default: fresh]")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> DistillSettings:
    settings = QUICK_SETTINGS if args.quick else DistillSettings()
    try:
        seeds = tuple(int(seed) for seed in args.seeds.split(","))
    except ValueError:
        raise SystemExit(
            f"--seeds {args.seeds!r} is invalid; pass comma-separated integers such as 0,1,2"
        ) from None
    steps = settings.steps if args.steps is None else args.steps
    if steps < 1:
        raise SystemExit(f"--steps {steps} is invalid; pass a positive number")
    return dataclasses.replace(settings, steps=steps, train_seeds=seeds, student_init=args.init)


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    # SystemExit unwinds through the handlers that stop the teacher and the running
    # child process, which the default SIGTERM action would leave running.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    out = (args.out or OUT_DIR / ("distill-quick" if args.quick else "distill")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for path, description in ((TEACHER_DIR, "teacher model"), (PROMPTS_PATH, "prompts file")):
        if not path.exists():
            raise SystemExit(f"{description} {path} not found; set KD_SHARED_DIR to the shared folder")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

    try:
        result = compare(settings, out)
    except StepFailed as error:
        print(f"bench_distill failed: {error}", file=sys.stderr)
        return 1

    path = write_result(out, result)
    print()
    print_table(table_rows(result))
    check = result["split_check"]
    print(f"\nheld-out split: {check['heldout_prompts']} of {check['prompts']} prompts,"
          f" {check['heldout_rows']} rows (eval read {check['rows_read_by_eval']});"
          f" training split: {check['train_rows']} rows (train read {check['rows_read_by_train']})")
    print(f"total {result['total_wall_s']:.0f} s; result: {path}")
    if not check["consistent"]:
        print("bench_distill: eval or train did not read the split chosen by prompt_id;"
              " see split_check in the result JSON", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
