"""Teacher rows made by the real tiny model, and stores holding them, for the student tests.

The rows are what a harvest of a stories260k teacher would store. The model samples a
continuation of each prompt. One forward pass over prompt plus continuation then gives
the real log-probabilities of the sampled tokens and the real top-k alternatives.
Token bytes are spelled the way an OpenAI-compatible server reports them: ``▁`` as a
space, ``<0xNN>`` as one byte, special tokens as their text. That spelling is written
out here rather than taken from :mod:`student.vocab`, so the fixture does not share
the mapping under test.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from storage.schema import LogprobColumns
from storage.store import Store

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def server_token_bytes(tokenizer: Any) -> list[bytes]:
    """Return the bytes a server reports for every id of a SentencePiece-style tokenizer."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table = []
    for piece in pieces:
        match = _BYTE_PIECE.fullmatch(piece)
        table.append(bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode())
    return table


def token_text(data: bytes) -> str:
    """Return a token's text form as OpenAI's legacy API writes partial UTF-8: ``bytes:\\xNN``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def load_tiny(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def sample_continuations(
    model: Any, tokenizer: Any, prompts: list[str], samples: int, max_new_tokens: int, seed: int
) -> list[list[int]]:
    """Sample ``samples`` continuations per prompt at temperature 1, cut at BOS, EOS or UNK.

    One batched, left-padded ``generate`` call: a token-by-token loop per row spends
    most of its time in per-call overhead, even on this tiny model.
    """
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.unk_token
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        output = model.generate(
            **encoded,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            eos_token_id=[1, 2],
            pad_token_id=0,
        )
    continuations = []
    for row in output[:, encoded.input_ids.shape[1] :].tolist():
        stop = next((i for i, token in enumerate(row) if token in (0, 1, 2)), len(row))
        continuations.append(row[:stop])
    return continuations


@torch.no_grad()
def score_continuations(model: Any, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Return the log-softmax over the vocabulary at every position of each sequence.

    One right-padded forward pass; causal attention keeps padding from changing the
    positions before it.
    """
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros((len(sequences), length), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[row, : len(sequence)] for row, sequence in enumerate(sequences)]


def logprob_columns(logprobs: torch.Tensor, prompt_length: int, new_ids: list[int], top_k: int, token_bytes: list[bytes]) -> LogprobColumns:
    """Return the stored logprob columns of ``new_ids`` given the scored sequence."""
    columns = LogprobColumns()
    for index, token in enumerate(new_ids):
        row = logprobs[prompt_length + index - 1]
        top = torch.topk(row, top_k)
        columns.tokens.append(token_text(token_bytes[token]))
        columns.token_bytes.append(token_bytes[token])
        columns.token_logprobs.append(float(row[token]))
        columns.top_counts.append(top_k)
        for value, alternative in zip(top.values.tolist(), top.indices.tolist()):
            columns.top_tokens.append(token_text(token_bytes[alternative]))
            columns.top_logprobs.append(value)
            columns.top_bytes.append(token_bytes[alternative])
    return columns


def request_id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def response_row(prompt_id: str, prompt: str, sample_index: int, columns: LogprobColumns | None, response: str, **extra: Any) -> dict[str, Any]:
    """Return a response row with the columns training reads; ``extra`` overrides any."""
    row = {
        "request_id": request_id(prompt_id, prompt, sample_index),
        "run_id": "student-tests",
        "created_at": datetime(2025, 1, 1, tzinfo=timezone.utc),
        "teacher": "tiny",
        "model": "stories260k",
        "endpoint": "completions",
        "prompt_id": prompt_id,
        "prompt": prompt,
        "messages": None,
        "sample_index": sample_index,
        "response": response,
        "finish_reason": "stop",
        "logprobs_format": "completions" if columns is not None else None,
        "logprobs_lossy": False if columns is not None else None,
        "token_bytes_match": columns is not None,
        "token_level_ok": columns is not None,
        "logprobs": columns,
    }
    row.update(extra)
    return row


def teacher_rows(
    model_dir: Path,
    prompts: Sequence[dict[str, str]],
    *,
    samples: int = 1,
    max_new_tokens: int = 16,
    top_k: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Return one row per prompt and sample, generated and scored by the tiny model.

    Rows are labelled ``finish_reason = 'stop'``, as if each continuation had reached a
    stop sequence, so they all count as training data by default.
    """
    model, tokenizer = load_tiny(model_dir)
    token_bytes = server_token_bytes(tokenizer)
    texts = [prompt["prompt"] for prompt in prompts]
    continuations = sample_continuations(model, tokenizer, texts, samples, max_new_tokens, seed)
    prompt_ids = [list(tokenizer(prompt["prompt"]).input_ids) for prompt in prompts]
    sequences = [prompt_ids[i // samples] + new_ids for i, new_ids in enumerate(continuations)]
    scored = score_continuations(model, sequences)
    rows = []
    for index, new_ids in enumerate(continuations):
        prompt = prompts[index // samples]
        prompt_length = len(prompt_ids[index // samples])
        columns = logprob_columns(scored[index], prompt_length, new_ids, top_k, token_bytes)
        response = b"".join(token_bytes[i] for i in new_ids).decode("utf-8", errors="replace")
        rows.append(response_row(prompt["id"], prompt["prompt"], index % samples, columns, response))
    return rows


def read_prompts(path: Path, limit: int) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(limit), handle)]


def write_store(root: Path, rows: Sequence[dict[str, Any]], run_id: str = "student-tests") -> Path:
    """Write ``rows`` into a new store at ``root`` through the real store writer."""
    store = Store(root)
    with store.writer(run_id) as writer:
        for row in rows:
            writer.add_response(row)
    return root


TEACHER_PROMPTS = 16
TEACHER_SAMPLES = 2


@lru_cache(maxsize=None)
def cached_teacher_rows(model_dir: Path, prompts_path: Path) -> tuple[dict[str, Any], ...]:
    """Rows of the standard test store, generated once per test process."""
    prompts = read_prompts(prompts_path, TEACHER_PROMPTS)
    rows = teacher_rows(model_dir, prompts, samples=TEACHER_SAMPLES, max_new_tokens=16, top_k=5)
    return tuple(rows)


def standard_store(root: Path, model_dir: Path, prompts_path: Path) -> Path:
    """Write the standard test store: real teacher rows plus one row cut at max_tokens.

    The cut row has its own prompt id, so a test can tell whether training read it.
    """
    rows = [dict(row) for row in cached_teacher_rows(model_dir, prompts_path)]
    cut = dict(rows[0])
    cut.update(request_id=request_id("cut"), prompt_id="cut-at-max-tokens", finish_reason="length")
    return write_store(root, rows + [cut])


def damage_data_pages(path: Path, column: str = "response", length: int = 400) -> None:
    """Invert up to ``length`` bytes in the middle of one column's data in a Parquet file.

    The footer stays intact, so the file still lists and opens; only reading that
    column's pages fails, as with a disk error inside a finished file.
    """
    import pyarrow.parquet as pq

    chunk = next(
        chunk
        for group in range(pq.ParquetFile(path).metadata.num_row_groups)
        for index in range(pq.ParquetFile(path).metadata.num_columns)
        if (chunk := pq.ParquetFile(path).metadata.row_group(group).column(index)).path_in_schema == column
    )
    first = chunk.dictionary_page_offset or chunk.data_page_offset
    size = chunk.total_compressed_size
    span = min(length, size // 2)
    start = first + (size - span) // 2
    data = bytearray(path.read_bytes())
    for index in range(start, start + span):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))
