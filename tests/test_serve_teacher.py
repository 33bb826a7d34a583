"""Tests of the OpenAI-compatible teacher server over the real tiny model."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from click.testing import CliRunner

from pipeline.commands.serve_teacher import command as serve_teacher_command
from pipeline.local_teacher import TeacherModel, _RowBuilder, token_text_from_bytes
from tests.fixtures_server import load_teacher, running_teacher_server, teacher_server_url  # noqa: F401

MODEL = "stories260k"
STORY_PROMPT = "Once upon a time"
# Greedy continuation of STORY_PROMPT by stories260K, 40 new tokens, transformers 5.25 and torch 2.13 on CPU.
GREEDY_40 = (
    ", there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def teacher(model_dir: Path) -> TeacherModel:
    return load_teacher(str(model_dir))


@pytest.fixture(scope="module")
def http(teacher_server_url: str):  # noqa: F811
    # trust_env=False: a proxy from the environment must not intercept loopback traffic.
    with httpx.Client(base_url=teacher_server_url, trust_env=False, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(teacher_server_url: str):  # noqa: F811
    http_client = httpx.Client(trust_env=False, timeout=60)
    client = openai.OpenAI(base_url=teacher_server_url, api_key="test", http_client=http_client, max_retries=0)
    yield client
    client.close()


def complete(http: httpx.Client, **fields) -> dict:
    response = http.post("/completions", json={"model": MODEL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def chat(http: httpx.Client, **fields) -> dict:
    response = http.post("/chat/completions", json={"model": MODEL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reference_logprobs(teacher: TeacherModel, ids: list[int]) -> torch.Tensor:
    """Log-softmax of one full forward pass (no KV cache) at every position."""
    with torch.inference_mode():
        logits = teacher.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def match_ids(teacher: TeacherModel, prompt_ids: list[int], keys: list, logprobs: list[float], key_of) -> list[int]:
    """Recover generated token ids from their text or bytes and served logprobs.

    A few ids share a form (the byte piece <0x20> and the piece '▁' are both b' '), so
    each position takes the id with that form whose reference logprob equals the served one.
    """
    ids = list(prompt_ids)
    for key, served in zip(keys, logprobs):
        reference = reference_logprobs(teacher, ids)[-1]
        candidates = [i for i in range(teacher.vocab_size) if key_of(i) == key]
        assert candidates, f"no token has the form {key!r}"
        matching = [i for i in candidates if abs(reference[i].item() - served) < TOLERANCE]
        assert matching, f"served logprob {served} of {key!r} matches no candidate {candidates}"
        ids.append(matching[0])
    return ids[len(prompt_ids) :]


# ---------------------------------------------------------------- model card and health


def test_health_and_models(http):
    health = http.get(str(http.base_url).removesuffix("/v1/") + "/health")
    models = http.get("/models")

    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert models.status_code == 200
    assert [card["id"] for card in models.json()["data"]] == [MODEL]


# ---------------------------------------------------------------- greedy and sampling


def test_greedy_story_matches_known_text(http):
    body = complete(http, prompt=STORY_PROMPT, max_tokens=40, temperature=0)

    assert body["choices"][0]["text"] == GREEDY_40
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 40


def test_greedy_is_deterministic(http):
    request = {"prompt": "The dog", "max_tokens": 30, "temperature": 0, "logprobs": 3}
    first = complete(http, **request)
    second = complete(http, **request)
    batched = complete(http, **request, n=3)

    assert second["choices"] == first["choices"]
    texts = [choice["text"] for choice in batched["choices"]]
    assert texts == [first["choices"][0]["text"]] * 3
    # A batch of 3 rows runs other matmul kernels than one row, so logprobs agree only closely.
    batched_logprobs = batched["choices"][2]["logprobs"]["token_logprobs"]
    assert batched_logprobs == pytest.approx(first["choices"][0]["logprobs"]["token_logprobs"], abs=TOLERANCE)


def test_seed_fixes_sampled_output(http):
    request = {"prompt": STORY_PROMPT, "max_tokens": 30, "temperature": 1.0, "seed": 7, "n": 3, "logprobs": 2}
    first = complete(http, **request)
    second = complete(http, **request)
    other_seed = complete(http, **{**request, "seed": 8})

    assert first["choices"] == second["choices"]
    assert [c["text"] for c in first["choices"]] != [c["text"] for c in other_seed["choices"]]


def test_chat_seed_fixes_sampled_output(http):
    request = {"messages": user("Tom had a red"), "max_tokens": 25, "seed": 123, "logprobs": True, "top_logprobs": 3}
    first = chat(http, **request)
    second = chat(http, **request)

    assert first["choices"] == second["choices"]


def test_n_returns_distinct_choices(http):
    body = complete(http, prompt=STORY_PROMPT, max_tokens=20, temperature=1.0, seed=11, n=4, logprobs=1)

    choices = body["choices"]
    assert [choice["index"] for choice in choices] == [0, 1, 2, 3]
    assert len({choice["text"] for choice in choices}) > 1
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in choices)


def test_tiny_top_p_is_greedy(http):
    greedy = complete(http, prompt=STORY_PROMPT, max_tokens=25, temperature=0)
    nucleus = complete(http, prompt=STORY_PROMPT, max_tokens=25, temperature=1.0, top_p=1e-9, seed=5)

    assert nucleus["choices"][0]["text"] == greedy["choices"][0]["text"]


# ---------------------------------------------------------------- logprobs against a forward pass


def test_completions_logprobs_match_forward_pass(http, teacher):
    k = 5
    body = complete(http, prompt=STORY_PROMPT, max_tokens=30, temperature=1.0, seed=3, logprobs=k)
    logprobs = body["choices"][0]["logprobs"]
    prompt_ids = teacher.tokenizer(STORY_PROMPT).input_ids

    generated = match_ids(
        teacher, prompt_ids, logprobs["tokens"], logprobs["token_logprobs"], lambda i: teacher.token_texts[i]
    )
    reference = reference_logprobs(teacher, prompt_ids + generated)

    for position, token_id in enumerate(generated):
        row = reference[len(prompt_ids) + position - 1]
        top_values, top_ids = row.topk(k)
        served_top = list(logprobs["top_logprobs"][position].items())
        expected_keys = [teacher.token_texts[i] for i in top_ids.tolist()]
        assert [key for key, _ in served_top[:k]] == expected_keys
        for (_, served), expected in zip(served_top, top_values.tolist()):
            assert served == pytest.approx(expected, abs=TOLERANCE)
        assert logprobs["token_logprobs"][position] == pytest.approx(row[token_id].item(), abs=TOLERANCE)


def test_chat_logprobs_match_forward_pass(http, teacher):
    k = 20
    body = chat(http, messages=user("Lily and Ben"), max_tokens=30, seed=9, logprobs=True, top_logprobs=k)
    content = body["choices"][0]["logprobs"]["content"]
    prompt_ids = teacher.tokenizer("Lily and Ben").input_ids

    generated = match_ids(
        teacher,
        prompt_ids,
        [bytes(entry["bytes"]) for entry in content],
        [entry["logprob"] for entry in content],
        lambda i: teacher.token_bytes[i],
    )
    reference = reference_logprobs(teacher, prompt_ids + generated)

    for position, entry in enumerate(content):
        row = reference[len(prompt_ids) + position - 1]
        top_values, top_ids = row.topk(k)
        expected_bytes = [teacher.token_bytes[i] for i in top_ids.tolist()]
        served_top = entry["top_logprobs"]
        assert [bytes(alt["bytes"]) for alt in served_top] == expected_bytes
        assert [alt["logprob"] for alt in served_top] == pytest.approx(top_values.tolist(), abs=TOLERANCE)

        # The chosen token sits in the top-k list with the same logprob, or below all of it.
        token_id = generated[position]
        if token_id in top_ids.tolist():
            rank = top_ids.tolist().index(token_id)
            assert served_top[rank]["logprob"] == pytest.approx(entry["logprob"], abs=TOLERANCE)
        else:
            assert entry["logprob"] <= served_top[-1]["logprob"]


def test_legacy_dict_adds_sampled_token(http):
    body = complete(http, prompt=STORY_PROMPT, max_tokens=40, temperature=2.0, seed=1, logprobs=1)
    logprobs = body["choices"][0]["logprobs"]

    outside = [
        (token, top)
        for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"])
        if len(top) == 2
    ]
    assert outside, "temperature 2 should sample at least one token outside the top 1"
    for token, top in outside:
        assert list(top)[-1] == token


def test_logprobs_zero_returns_sampled_only(http):
    body = complete(http, prompt=STORY_PROMPT, max_tokens=5, temperature=0, logprobs=0)
    logprobs = body["choices"][0]["logprobs"]

    assert [list(top) for top in logprobs["top_logprobs"]] == [[token] for token in logprobs["tokens"]]


def test_text_offset_counts_from_prompt(http):
    body = complete(http, prompt=STORY_PROMPT, max_tokens=12, temperature=0, logprobs=1)
    logprobs = body["choices"][0]["logprobs"]
    full_text = STORY_PROMPT + body["choices"][0]["text"]

    assert logprobs["text_offset"][0] == len(STORY_PROMPT)
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        assert full_text[offset : offset + len(token)] == token


# ---------------------------------------------------------------- bytes and text


def test_token_bytes_join_to_text(http):
    for seed in range(4):
        body = chat(http, messages=user(STORY_PROMPT), max_tokens=40, temperature=1.5, seed=seed, logprobs=True)
        choice = body["choices"][0]
        joined = b"".join(bytes(entry["bytes"]) for entry in choice["logprobs"]["content"])
        assert joined == choice["message"]["content"].encode("utf-8"), f"seed {seed}"


def test_byte_fallback_token_forms(teacher):
    by_piece = dict(zip(teacher.tokenizer.convert_ids_to_tokens(list(range(teacher.vocab_size))), range(512)))

    assert teacher.token_bytes[by_piece["<0xF0>"]] == b"\xf0"
    assert teacher.token_texts[by_piece["<0xF0>"]] == "bytes:\\xf0"
    assert teacher.token_bytes[by_piece["<0x41>"]] == b"A"
    assert teacher.token_bytes[by_piece["\u2581there"]] == b" there"
    assert teacher.token_texts[teacher.tokenizer.eos_token_id] == "</s>"
    assert token_text_from_bytes("é".encode()) == "é"


def test_row_text_joins_multibyte_character(teacher):
    ids = teacher.tokenizer("a 😀 b", add_special_tokens=False).input_ids
    row = _RowBuilder(teacher, stop=())
    for token_id in ids:
        row.append(token_id, 0.0, [], [])
    completion = row.finish()

    assert completion.text == " a 😀 b"
    assert b"".join(teacher.token_bytes[i] for i in completion.token_ids) == completion.text.encode()


def test_incomplete_character_becomes_replacement(teacher):
    ids = teacher.tokenizer("a 😀", add_special_tokens=False).input_ids[:-1]
    row = _RowBuilder(teacher, stop=())
    for token_id in ids:
        row.append(token_id, 0.0, [], [])

    assert row.finish().text == " a \ufffd"


# ---------------------------------------------------------------- stop strings and lengths


def test_stop_string_cuts_text_and_tokens(http):
    body = complete(http, prompt=STORY_PROMPT, max_tokens=40, temperature=0, stop=".", logprobs=1)
    choice = body["choices"][0]

    assert choice["text"] == GREEDY_40.split(".")[0]
    assert choice["finish_reason"] == "stop"
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert body["usage"]["completion_tokens"] == len(choice["logprobs"]["tokens"])


def test_stop_inside_token_drops_token(http):
    # " there" is one token, and "ere" starts inside it.
    body = chat(http, messages=user(STORY_PROMPT), max_tokens=40, temperature=0, stop=["ere", "zzz"], logprobs=True)
    choice = body["choices"][0]
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]

    assert choice["message"]["content"] == ","
    assert tokens == [","]
    assert choice["finish_reason"] == "stop"


def test_stop_at_token_boundary(http):
    body = complete(http, prompt=STORY_PROMPT, max_tokens=40, temperature=0, stop=[" was", "Lily"])

    assert body["choices"][0]["text"] == ", there"


def test_max_tokens_gives_length(http):
    body = chat(http, messages=user(STORY_PROMPT), max_tokens=7, temperature=0, logprobs=True)
    choice = body["choices"][0]

    assert choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["content"]) == 7


def test_max_tokens_zero_is_empty(http):
    body = complete(http, prompt=STORY_PROMPT, max_tokens=0, logprobs=2)
    choice = body["choices"][0]

    assert choice["text"] == ""
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == []


def test_generated_bos_ends_with_stop(http):
    # stories260K was trained with BOS between stories and no EOS. Greedy decoding of
    # this prompt generates BOS, which starts the next story, after 160 tokens.
    body = chat(http, messages=user("Lily was happy. The end."), max_tokens=500, temperature=0, logprobs=True)
    choice = body["choices"][0]

    assert choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["content"]) == 160
    assert "<s>" not in choice["message"]["content"]


def test_usage_counts_tokenizer_tokens(http, teacher):
    prompt = "The little cat jumped over the"
    body = complete(http, prompt=prompt, max_tokens=9, temperature=0, logprobs=0)

    usage = body["usage"]
    assert usage["prompt_tokens"] == len(teacher.tokenizer(prompt).input_ids)
    assert usage["completion_tokens"] == 9
    assert usage["total_tokens"] == usage["prompt_tokens"] + 9


def test_chat_usage_counts_template_tokens(http, teacher):
    messages = [{"role": "system", "content": "A story."}, {"role": "user", "content": "Tom ran"}]
    body = chat(http, messages=messages, max_tokens=3, temperature=0)

    assert body["usage"]["prompt_tokens"] == len(teacher.tokenizer("A story.\nTom ran").input_ids)


def test_chat_default_max_tokens_fills_context(http, teacher):
    # Each " Tom ran." is 5 tokens, so BOS and 101 copies leave 6 tokens of the 512-token context.
    prompt = " ".join(["Tom ran."] * 101)
    prompt_tokens = len(teacher.tokenizer(prompt).input_ids)
    body = chat(http, messages=user(prompt), temperature=0)

    assert prompt_tokens == teacher.max_context - 6
    assert body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_template_renders_messages(teacher):
    tokenizer = copy.deepcopy(teacher.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    templated = TeacherModel(teacher.model, tokenizer, name_or_path="templated")

    ids = templated.encode_messages(user("Hi"))

    assert ids == tokenizer("user: Hi\nassistant:", add_special_tokens=False).input_ids


# ---------------------------------------------------------------- openai SDK


def test_sdk_parses_chat_logprobs(sdk):
    response = sdk.chat.completions.create(
        model=MODEL, messages=user(STORY_PROMPT), max_tokens=10, temperature=0, logprobs=True, top_logprobs=4
    )
    content = response.choices[0].logprobs.content

    assert response.choices[0].message.content == GREEDY_40[: len(response.choices[0].message.content)]
    assert len(content) == 10
    assert [len(entry.top_logprobs) for entry in content] == [4] * 10
    assert content[1].token == " there"
    assert content[1].bytes == list(b" there")
    assert content[1].top_logprobs[0].token == " there"
    assert response.usage.completion_tokens == 10


def test_sdk_parses_legacy_logprobs(sdk):
    response = sdk.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=8, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs

    assert logprobs.tokens[:2] == [",", " there"]
    assert len(logprobs.token_logprobs) == 8
    assert len(logprobs.top_logprobs) == 8
    assert list(logprobs.top_logprobs[0])[0] == ","
    assert logprobs.text_offset[0] == len(STORY_PROMPT)
    assert response.choices[0].finish_reason == "length"


def test_sdk_raises_not_found(sdk):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.completions.create(model="gpt-4", prompt="x", max_tokens=1)

    assert raised.value.code == "model_not_found"


# ---------------------------------------------------------------- errors


BAD_COMPLETIONS = [
    ({"prompt": "x"}, "model"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": 5}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": "x", "logprobs": True}, "logprobs"),
    ({"model": MODEL, "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop"),
    ({"model": MODEL, "prompt": "x", "stop": 3}, "stop"),
    ({"model": MODEL, "prompt": "x", "seed": 1.5}, "seed"),
    ({"model": MODEL, "prompt": "x", "stream": True}, "stream"),
    ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 510}, "max_tokens"),
    ({"model": MODEL, "prompt": "word " * 600}, "prompt"),
]

BAD_CHATS = [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "king", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": MODEL, "messages": user("x"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"model": MODEL, "messages": user("x"), "top_logprobs": 2}, "top_logprobs"),
    ({"model": MODEL, "messages": user("x"), "logprobs": 1}, "logprobs"),
    ({"model": MODEL, "messages": user("x"), "max_tokens": -5}, "max_tokens"),
    ({"model": MODEL, "messages": user("x"), "max_tokens": 600}, "max_tokens"),
    ({"model": MODEL, "messages": user("x"), "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": user("x"), "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": MODEL, "messages": user("x"), "max_completion_tokens": -1}, "max_completion_tokens"),
]


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETIONS)
def test_completions_rejects_invalid(http, body, param):
    response = http.post("/completions", json=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


@pytest.mark.parametrize(("body", "param"), BAD_CHATS)
def test_chat_rejects_invalid(http, body, param):
    response = http.post("/chat/completions", json=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_context_overflow_has_code(http):
    response = http.post("/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 510})

    assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"", b"\xff"])
def test_rejects_non_object_json(http, raw):
    response = http.post("/chat/completions", content=raw, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(http):
    response = http.post("/chat/completions", json={"model": "gpt-4o", "messages": user("x")})

    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "model 'gpt-4o' not found; this server serves 'stories260k'",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_unknown_route_is_json_404(http):
    response = http.get("/engines")

    assert response.status_code == 404
    assert "error" in response.json()


# ---------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_health_answers_during_generation(http, teacher_server_url):  # noqa: F811
    finished: dict[str, float] = {}

    def long_request() -> None:
        complete(http, prompt="x", max_tokens=500, temperature=1.0, seed=0, n=16)
        finished["generation"] = time.monotonic()

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.3)
    response = http.get("/health")
    finished["health"] = time.monotonic()
    worker.join()

    assert response.status_code == 200
    assert finished["health"] < finished["generation"]


@pytest.mark.slow
def test_concurrent_requests_match_sequential(teacher_server_url):  # noqa: F811
    requests = [
        {"prompt": STORY_PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": seed, "logprobs": 3}
        for seed in range(6)
    ]

    async def send_all() -> list:
        async with openai.AsyncOpenAI(
            base_url=teacher_server_url,
            api_key="test",
            http_client=httpx.AsyncClient(trust_env=False, timeout=60),
        ) as client:
            calls = [client.completions.create(model=MODEL, **request) for request in requests]
            return await asyncio.gather(*calls)

    concurrent = asyncio.run(send_all())
    with httpx.Client(base_url=teacher_server_url, trust_env=False, timeout=60) as client:
        sequential = [complete(client, **request) for request in requests]

    for together, alone in zip(concurrent, sequential):
        assert together.choices[0].text == alone["choices"][0]["text"]
        assert together.choices[0].logprobs.token_logprobs == alone["choices"][0]["logprobs"]["token_logprobs"]


# ---------------------------------------------------------------- second server and CLI


def test_served_name_override(model_dir):
    with running_teacher_server(model_dir, served_name="teacher-a") as url:
        with httpx.Client(base_url=url, trust_env=False, timeout=60) as client:
            good = client.post("/completions", json={"model": "teacher-a", "prompt": "x", "max_tokens": 1})
            bad = client.post("/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})

    assert good.status_code == 200
    assert good.json()["model"] == "teacher-a"
    assert bad.status_code == 404


def test_help_has_example_and_template():
    result = CliRunner().invoke(serve_teacher_command, ["--help"])

    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "serve-teacher ../shared/models/stories260k" in result.output
    assert "joined by newlines" in " ".join(result.output.split())


def test_missing_model_is_usage_error(tmp_path):
    result = CliRunner().invoke(serve_teacher_command, [str(tmp_path / "absent"), "--port", "0"])

    assert result.exit_code == 2
    assert f"model not found: {tmp_path / 'absent'} is not a directory and not a valid hub id" in result.output


def test_folder_without_model_is_usage_error(tmp_path):
    result = CliRunner().invoke(serve_teacher_command, [str(tmp_path), "--port", "0"])

    assert result.exit_code == 2
    assert f"{tmp_path} has no config.json; pass a transformers model directory" in result.output


def test_unknown_device_lists_values(model_dir):
    result = CliRunner().invoke(serve_teacher_command, [str(model_dir), "--port", "0", "--device", "tpu"])

    assert result.exit_code == 2
    assert "--device 'tpu' is not supported; pass one of auto, cpu, cuda, cuda:N" in result.output


def test_unresolvable_host_names_host(model_dir, monkeypatch):
    def fail_to_resolve(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr("pipeline.serve.bind_socket", fail_to_resolve)
    result = CliRunner().invoke(
        serve_teacher_command, [str(model_dir), "--host", "999.1.1.1", "--port", "0", "--device", "cpu"]
    )

    assert result.exit_code == 2
    assert "Name or service not known" in result.output
    assert "--host" in result.output
    assert "--port" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signal(model_dir, stop_signal):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve-teacher", str(model_dir), "--port", "0", "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        url = _read_url(process)
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as client:
            health = _wait_for_health(client)
            body = complete(client, prompt=STORY_PROMPT, max_tokens=40, temperature=0)
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert health.status_code == 200
    assert body["choices"][0]["text"] == GREEDY_40
    assert process.returncode == 0
    assert f"stopped after {stop_signal.name}" in stderr


def _read_url(process: subprocess.Popen) -> str:
    # The INFO start line names the URL; the port is only known once bound.
    for line in process.stderr:
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"server exited with {process.wait()} before logging its URL")


def _wait_for_health(client: httpx.Client) -> httpx.Response:
    deadline = time.monotonic() + 20
    while True:
        try:
            return client.get("/health")
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
