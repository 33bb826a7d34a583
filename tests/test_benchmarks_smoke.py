"""Smoke tests of the benchmarks: the mock teacher's formats, and every script at tiny sizes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import openai
import pytest

from benchmarks.mock_teacher import MockConfig, MockProcess, serve
from tests.conftest import REPO_DIR


@contextmanager
def mock_in_thread(config: MockConfig) -> Iterator[str]:
    """Serve the mock on its own event loop in a thread; yield the base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[asyncio.Task[None], str]:
        ready: asyncio.Future[str] = loop.create_future()
        task = asyncio.create_task(serve(config, ready))
        return task, await ready

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    task, url = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(stop(task), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)


def test_mock_process_prints_url_and_serves_chat() -> None:
    config = MockConfig(latency_ms=1, tokens=8, top_k=5)
    with MockProcess(config) as mock:
        assert mock.url.startswith("http://127.0.0.1:")
        reply = client(mock.url).chat.completions.create(
            model="mock-teacher", messages=[{"role": "user", "content": "Once"}],
            max_tokens=8, logprobs=True, top_logprobs=5,
        )
        stats = mock.stats()
    content = reply.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    assert stats["requests"] == 1
    assert stats["chat"] == 1


def test_mock_chat_logprobs_are_consistent() -> None:
    with mock_in_thread(MockConfig(latency_ms=1, tokens=16, top_k=20)) as url:
        reply = client(url).chat.completions.create(
            model="mock-teacher", messages=[{"role": "user", "content": "Once upon a time"}],
            max_tokens=16, logprobs=True, top_logprobs=20,
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 16
    for entry in choice.logprobs.content:
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0
        alternatives = entry.top_logprobs
        assert len(alternatives) == 20
        assert len({a.token for a in alternatives}) == 20
        assert [a.logprob for a in alternatives] == sorted((a.logprob for a in alternatives), reverse=True)
        assert entry.token in {a.token for a in alternatives}
        assert all(a.bytes == list(a.token.encode()) for a in alternatives)


def test_mock_completions_logprobs_are_consistent() -> None:
    with mock_in_thread(MockConfig(latency_ms=1, tokens=12, top_k=5)) as url:
        reply = client(url).completions.create(model="mock-teacher", prompt="Once", max_tokens=12, logprobs=5)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == 12
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == 12
    assert all(len(top) == 5 for top in logprobs.top_logprobs)
    assert all(token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs))
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(12)]
    assert logprobs.text_offset == offsets


def test_mock_bodies_depend_on_prompt() -> None:
    with mock_in_thread(MockConfig(latency_ms=0, tokens=8, top_k=2, pool_size=64)) as url:
        api = client(url)

        def text(prompt: str) -> str:
            return api.completions.create(model="mock-teacher", prompt=prompt, max_tokens=8, logprobs=2).choices[0].text

        first = text("prompt 1")
        repeat = text("prompt 1")
        others = {text(f"prompt {i}") for i in range(2, 12)}
    assert first == repeat
    assert len(others | {first}) > 5


def test_mock_rate_limit_has_retry_after() -> None:
    with mock_in_thread(MockConfig(latency_ms=0, tokens=4, top_k=1, fail_429=1.0, retry_after_ms=250)) as url:
        with pytest.raises(openai.RateLimitError) as caught:
            client(url).completions.create(model="mock-teacher", prompt="x", max_tokens=4, logprobs=1)
    headers = caught.value.response.headers
    assert headers["retry-after-ms"] == "250"
    assert headers["retry-after"] == "1"


def test_mock_server_error_is_500() -> None:
    with mock_in_thread(MockConfig(latency_ms=0, tokens=4, top_k=1, fail_500=1.0)) as url:
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).chat.completions.create(
                model="mock-teacher", messages=[{"role": "user", "content": "x"}], max_tokens=4,
            )
    assert caught.value.status_code == 500


def test_mock_pipelined_responses_keep_order() -> None:
    body = b'{"prompt": "x"}'
    post = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    get = b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with mock_in_thread(MockConfig(latency_ms=50, tokens=4, top_k=1)) as url:
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            # The POST waits 50 ms and the GET none, yet the POST's response must come first.
            sock.sendall(post + get)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
    first = received.index(b"text_completion")
    second = received.index(b'"object":"list"')
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert first < second


def test_mock_rejects_invalid_config() -> None:
    with pytest.raises(ValueError, match="failure rates"):
        MockConfig(fail_429=0.7, fail_500=0.5).validate()


# --- every benchmark script at tiny sizes -------------------------------------------------

SCRIPTS = {
    "bench_mock": ["--requests", "40", "--concurrency", "4", "--latency-ms", "0"],
    "bench_harvest": ["--sizes", "12", "--concurrency", "4", "--latency-ms", "5", "--tokens", "8", "--k", "3"],
    "bench_resume": ["--prompts", "10", "--concurrency", "4", "--latency-ms", "1"],
    "bench_memory": ["--sizes", "10,30", "--limit", "20", "--concurrency", "4", "--tokens", "4", "--k", "2"],
    "bench_store": ["--prompts", "4", "--tokens", "8", "--k", "5"],
    "bench_sql": ["--rows", "600", "--runs", "3", "--repeats", "1", "--cli-repeats", "1"],
    "harvest_ab": [".", "--prompts", "10", "--rounds", "1", "--concurrency", "4"],
    "profile_harvest": ["--prompts", "10", "--concurrency", "4", "--latency-ms", "1", "--rate", "50"],
    "bench_train": ["--models", "tiny", "--batch-size", "1", "--seq-len", "16", "--steps", "1", "--modes", "topk"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_tiny(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "KD_BENCH_OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *SCRIPTS[script]],
        cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = sorted(tmp_path.glob(f"{script}-*.json"))
    assert len(records) == 1, f"expected one results file, found {[p.name for p in tmp_path.iterdir()]}"
    record = json.loads(records[0].read_text())
    assert record["machine"]["nproc"] >= 1
    assert "failed" not in json.dumps(record), record
