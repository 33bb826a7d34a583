"""Reference harvest clients: the plainest fast code that does the harvester's core work.

Each client sends one request per prompt to an OpenAI-compatible server, with at most
``concurrency`` requests in flight (an :class:`asyncio.Semaphore`). It parses every
body fully and extracts the sampled tokens, their logprobs and bytes, and the top-k
alternatives into flat columns. The columns go to one Parquet file, with the same
nested layout as the store's ``top_logprobs`` column. They have no resume, no journal and no validation,
so the fastest of them is the ceiling the project's harvester is measured against.

Clients:

- ``httpx-json``: ``httpx.AsyncClient`` with ``json=`` and ``response.json()`` (stdlib json);
- ``httpx-orjson``: ``httpx.AsyncClient`` with orjson for both directions;
- ``httpx2-orjson``: the same on ``httpx2``, the fork of httpx that the openai SDK 3.x uses,
  whose connection pool does far less bookkeeping per request than httpcore 1.0;
- ``aiohttp-orjson``: ``aiohttp.ClientSession`` with orjson for both directions.

Run one as a process; it prints one JSON line of results at the end::

    python -m benchmarks.reference_clients --client aiohttp-orjson \\
        --base-url http://127.0.0.1:8000/v1 --prompts prompts.jsonl --out out.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

CLIENTS = ("httpx-json", "httpx-orjson", "httpx2-orjson", "aiohttp-orjson")
FLUSH_ROWS = 512
MAX_ATTEMPTS = 6

ALTERNATIVE = pa.struct([("token", pa.string()), ("logprob", pa.float32()), ("bytes", pa.binary())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("token_bytes", pa.list_(pa.binary())),
        ("token_logprobs", pa.list_(pa.float32())),
        ("top_logprobs", pa.list_(pa.list_(ALTERNATIVE))),
    ]
)


@dataclass(slots=True)
class ClientConfig:
    client: str
    base_url: str
    prompts: Path
    out: Path
    endpoint: str = "chat"
    model: str = "mock-teacher"
    concurrency: int = 64
    max_tokens: int = 64
    top_k: int = 20


@dataclass(slots=True)
class Columns:
    """Flat columns of a batch of responses; ``*_counts`` give the nesting."""

    prompt_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_bytes: list[bytes] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_counts: list[int] = field(default_factory=list)
    top_tokens: list[str] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    top_bytes: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def add_chat(self, prompt_id: str, body: dict[str, Any]) -> None:
        choice = body["choices"][0]
        content = choice["logprobs"]["content"]
        self._add_row(prompt_id, choice["message"]["content"], choice["finish_reason"], len(content))
        for position in content:
            self.tokens.append(position["token"])
            self.token_logprobs.append(position["logprob"])
            self.token_bytes.append(bytes(position["bytes"]))
            alternatives = position["top_logprobs"]
            self.top_counts.append(len(alternatives))
            self.top_tokens.extend([a["token"] for a in alternatives])
            self.top_logprobs.extend([a["logprob"] for a in alternatives])
            self.top_bytes.extend([bytes(a["bytes"]) for a in alternatives])

    def add_completion(self, prompt_id: str, body: dict[str, Any]) -> None:
        choice = body["choices"][0]
        logprobs = choice["logprobs"]
        tokens = logprobs["tokens"]
        self._add_row(prompt_id, choice["text"], choice["finish_reason"], len(tokens))
        self.tokens.extend(tokens)
        self.token_logprobs.extend(logprobs["token_logprobs"])
        self.token_bytes.extend([t.encode() for t in tokens])
        for alternatives in logprobs["top_logprobs"]:
            self.top_counts.append(len(alternatives))
            self.top_tokens.extend(alternatives.keys())
            self.top_logprobs.extend(alternatives.values())
            self.top_bytes.extend([t.encode() for t in alternatives])

    def _add_row(self, prompt_id: str, text: str, finish_reason: str, count: int) -> None:
        self.prompt_ids.append(prompt_id)
        self.texts.append(text)
        self.finish_reasons.append(finish_reason)
        self.token_counts.append(count)

    def to_table(self) -> pa.Table:
        rows = _offsets(self.token_counts)
        alternatives = pa.StructArray.from_arrays(
            [
                pa.array(self.top_tokens, pa.string()),
                pa.array(self.top_logprobs, pa.float32()),
                pa.array(self.top_bytes, pa.binary()),
            ],
            fields=list(ALTERNATIVE),
        )
        per_position = pa.ListArray.from_arrays(_offsets(self.top_counts), alternatives)
        return pa.Table.from_arrays(
            [
                pa.array(self.prompt_ids, pa.string()),
                pa.array(self.texts, pa.string()),
                pa.array(self.finish_reasons, pa.string()),
                pa.ListArray.from_arrays(rows, pa.array(self.tokens, pa.string())),
                pa.ListArray.from_arrays(rows, pa.array(self.token_bytes, pa.binary())),
                pa.ListArray.from_arrays(rows, pa.array(self.token_logprobs, pa.float32())),
                pa.ListArray.from_arrays(rows, per_position),
            ],
            schema=OUTPUT_SCHEMA,
        )


def _offsets(counts: list[int]) -> pa.Array:
    offsets = [0]
    total = 0
    for count in counts:
        total += count
        offsets.append(total)
    return pa.array(offsets, pa.int32())


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """Read ``(id, prompt)`` pairs from a JSONL file with ``id`` and ``prompt`` keys."""
    prompts = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                record = orjson.loads(line)
                prompts.append((str(record.get("id", number)), record["prompt"]))
    return prompts


def request_payload(config: ClientConfig, prompt: str) -> dict[str, Any]:
    if config.endpoint == "chat":
        return {
            "model": config.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": config.max_tokens,
            "logprobs": True,
            "top_logprobs": config.top_k,
        }
    return {"model": config.model, "prompt": prompt, "max_tokens": config.max_tokens, "logprobs": config.top_k}


class RetryableStatus(Exception):
    def __init__(self, status: int, wait_s: float):
        self.status = status
        self.wait_s = wait_s
        super().__init__(f"HTTP {status}")


def _retry_wait(status: int, headers: Any) -> float:
    if status not in (429, 500, 502, 503, 504):
        raise RuntimeError(f"request failed with HTTP {status}, which is not retryable")
    millis = headers.get("retry-after-ms")
    return float(millis) / 1000 if millis else 0.1


# A sender posts one payload and returns the decoded JSON body, or raises RetryableStatus.
Sender = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def _harvest(config: ClientConfig, send: Sender) -> dict[str, int]:
    prompts = read_prompts(config.prompts)
    semaphore = asyncio.Semaphore(config.concurrency)
    columns = Columns()
    writer = pq.ParquetWriter(config.out, OUTPUT_SCHEMA)
    add = columns.add_chat if config.endpoint == "chat" else columns.add_completion
    counts = {"requests": 0, "responses": 0, "retries": 0}

    async def one(prompt_id: str, prompt: str) -> None:
        nonlocal columns, add
        payload = request_payload(config, prompt)
        async with semaphore:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                counts["requests"] += 1
                try:
                    body = await send(payload)
                    break
                except RetryableStatus as exc:
                    if attempt == MAX_ATTEMPTS:
                        raise
                    counts["retries"] += 1
                    await asyncio.sleep(exc.wait_s)
        add(prompt_id, body)
        counts["responses"] += 1
        if len(columns) >= FLUSH_ROWS:
            writer.write_table(columns.to_table())
            columns = Columns()
            add = columns.add_chat if config.endpoint == "chat" else columns.add_completion

    try:
        await asyncio.gather(*(one(prompt_id, prompt) for prompt_id, prompt in prompts))
        if len(columns):
            writer.write_table(columns.to_table())
    finally:
        writer.close()
    return counts


def _url(config: ClientConfig) -> str:
    suffix = "/chat/completions" if config.endpoint == "chat" else "/completions"
    return config.base_url.rstrip("/") + suffix


async def run_httpx(config: ClientConfig, use_orjson: bool, fork: bool = False) -> dict[str, int]:
    import importlib

    httpx = importlib.import_module("httpx2" if fork else "httpx")

    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    url = _url(config)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

        async def send_orjson(payload: dict[str, Any]) -> dict[str, Any]:
            response = await client.post(url, content=orjson.dumps(payload), headers=headers)
            if response.status_code != 200:
                raise RetryableStatus(response.status_code, _retry_wait(response.status_code, response.headers))
            return orjson.loads(response.content)

        async def send_json(payload: dict[str, Any]) -> dict[str, Any]:
            response = await client.post(url, json=payload)
            if response.status_code != 200:
                raise RetryableStatus(response.status_code, _retry_wait(response.status_code, response.headers))
            return response.json()

        return await _harvest(config, send_orjson if use_orjson else send_json)


async def run_aiohttp(config: ClientConfig) -> dict[str, int]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=config.concurrency)
    url = _url(config)
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(payload: dict[str, Any]) -> dict[str, Any]:
            async with session.post(url, data=orjson.dumps(payload), headers=headers) as response:
                data = await response.read()
                if response.status != 200:
                    raise RetryableStatus(response.status, _retry_wait(response.status, response.headers))
            return orjson.loads(data)

        return await _harvest(config, send)


def run(config: ClientConfig) -> dict[str, Any]:
    """Harvest every prompt with one client; return counts and work-phase timings."""
    if config.client not in CLIENTS:
        raise ValueError(f"unknown client {config.client!r}; choose one of {', '.join(CLIENTS)}")
    wall_start = time.perf_counter()
    cpu_start = time.process_time()
    if config.client == "aiohttp-orjson":
        counts = asyncio.run(run_aiohttp(config))
    else:
        use_orjson = config.client.endswith("-orjson")
        counts = asyncio.run(run_httpx(config, use_orjson, fork=config.client.startswith("httpx2")))
    return {
        "client": config.client,
        **counts,
        "work_wall_s": time.perf_counter() - wall_start,
        "work_cpu_s": time.process_time() - cpu_start,
        "rows_written": pq.ParquetFile(config.out).metadata.num_rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one reference harvest client; print a JSON line of results.")
    parser.add_argument("--client", choices=CLIENTS, required=True, help="HTTP client and JSON library")
    parser.add_argument("--base-url", required=True, help="OpenAI base URL on loopback, ending in /v1")
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL file with id and prompt keys")
    parser.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="API format")
    parser.add_argument("--model", default="mock-teacher", help="model name sent in requests")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at most")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--top-k", type=int, default=20, help="top logprobs per token")
    args = parser.parse_args(argv)
    result = run(ClientConfig(**vars(args)))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
