"""End-to-end demo behind ``make demo``: serve a teacher, harvest, query, train, evaluate.

Every step runs the real ``pipeline`` command in a subprocess, exactly as a user would
type it, so the demo doubles as a check that the commands fit together. The teacher is
served by ``pipeline serve-teacher`` on a free loopback port and stopped at the end,
whatever happens in between.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _pipeline(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _run_step(title: str, argv: list[str], *, allowed_codes: tuple[int, ...] = (0,)) -> None:
    print(f"\n== {title}\n$ {shlex.join(['pipeline', *argv[3:]])}", flush=True)
    code = subprocess.call(argv)
    if code not in allowed_codes:
        raise SystemExit(f"demo step failed: {title} exited with status {code}")


def _wait_until_ready(base_url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"teacher server exited with status {server.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/models", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"teacher server at {base_url} was not ready after {timeout_s:.0f} s")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_demo(args: argparse.Namespace) -> None:
    """Run the whole job: serve, harvest, summarise, make a student, train, evaluate."""
    out = Path(args.out).resolve()
    store = out / "store"
    student_init = out / "student-init"
    checkpoint = out / "student"
    out.mkdir(parents=True, exist_ok=True)

    port = _free_port()
    base_url = f"http://{HOST}:{port}/v1"
    served_name = "teacher"
    print(f"== Starting the teacher {args.teacher} on {base_url}", flush=True)
    server = subprocess.Popen(
        _pipeline("serve-teacher", args.teacher, "--host", HOST, "--port", str(port),
                  "--served-name", served_name)
    )
    started = time.monotonic()
    try:
        _wait_until_ready(base_url, server, timeout_s=args.server_timeout)

        # A loopback teacher needs no key; the placeholder never leaves this machine.
        env_key = {"DEMO_TEACHER_KEY": "not-needed-for-loopback"}
        os.environ.update(env_key)
        _run_step(
            "Harvest: every prompt, 4 samples each, top-20 logprobs",
            _pipeline(
                "harvest", args.prompts, "--store", str(store),
                "--base-url", base_url, "--model", served_name, "--teacher", "demo-teacher",
                "--api-key-env", "DEMO_TEACHER_KEY", "--endpoint", "chat",
                "--max-tokens", "64", "--temperature", "1.0", "--seed", "1234",
                "--samples", "4", "--top-logprobs", "20", "--concurrency", "8",
            ),
        )
        _run_step(
            "What was harvested",
            _pipeline(
                "sql", "--store", str(store),
                "SELECT teacher, finish_reason, count(*) AS responses,"
                " sum(completion_tokens) AS completion_tokens,"
                " round(avg(len(top_logprobs[1])), 1) AS alternatives_per_token"
                " FROM responses GROUP BY ALL ORDER BY responses DESC",
            ),
        )
        # Responses cut at --max-tokens are still good story text, and a story model
        # rarely finishes a story within 64 tokens, so the demo trains on them too.
        truncated = ["--include-truncated"]
        _run_step(
            "Make a smaller student from the teacher's config and tokenizer",
            _pipeline(
                "make-student", "--teacher", args.teacher, "--out", str(student_init),
                "--layers", str(args.student_layers), "--init", "copy", "--overwrite",
            ),
        )
        _run_step(
            "Train with top-k logit distillation",
            _pipeline(
                "train", "--store", str(store), "--student", str(student_init),
                "--out", str(checkpoint), "--loss", "topk", "--steps", str(args.steps),
                "--batch-size", "8", "--lr", "3e-3", "--temperature", "1.0", "--seed", "0",
                "--overwrite", *truncated,
            ),
        )
        _run_step(
            "Evaluate the student on held-out prompts",
            _pipeline("eval", "--store", str(store), "--student", str(checkpoint),
                      "--split", "heldout", *truncated),
        )
    finally:
        _stop(server)

    print(
        f"\nDemo finished in {time.monotonic() - started:.0f} s."
        f"\n  store:      {store}\n  checkpoint: {checkpoint}"
        f"\n  try:        pipeline sql --store {store} \"SELECT * FROM runs\""
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True,
                        help="transformers model directory or hub id served as the teacher")
    parser.add_argument("--out", default="demo-out", help="folder for the store and checkpoints")
    parser.add_argument("--prompts", default="prompts/demo_stories.jsonl")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--student-layers", type=int, default=2,
                        help="decoder layers of the student made from the teacher")
    parser.add_argument("--server-timeout", type=float, default=600.0,
                        help="seconds to wait for the teacher to load (hub downloads included)")
    run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    main()
