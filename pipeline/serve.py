"""OpenAI-compatible HTTP server over a local transformers causal LM.

Endpoints: ``GET /health`` (also ``/v1/health``), ``GET /v1/models``,
``POST /v1/completions`` (legacy: ``prompt`` string, ``logprobs`` 0..20) and
``POST /v1/chat/completions`` (``messages``, ``logprobs`` true with ``top_logprobs``
0..20). The model and its logprob, byte and template conventions are described in
:mod:`pipeline.local_teacher`.

The main design decision: requests are parsed, validated and tokenized on the event
loop, and the model runs in a worker thread (``run_in_threadpool``) behind the model's
own lock. HTTP requests are therefore accepted concurrently and ``/health`` responds
during a long generation, while the model runs one request at a time.

Format details chosen to match OpenAI:

- Invalid requests get status 400 with ``{"error": {"message", "type":
  "invalid_request_error", "param", "code"}}``. An unknown model name gets 404 with
  code ``model_not_found``. A prompt that does not fit the context with ``max_tokens``
  gets 400 with code ``context_length_exceeded``.
- Legacy ``text_offset`` counts characters from the start of the prompt, so the
  first generated token's offset is ``len(prompt)``. Each legacy ``top_logprobs``
  dict contains the top ``logprobs`` tokens, most likely first, plus the sampled token
  when it is not among them, so a dict has up to ``logprobs + 1`` entries. Chat
  ``top_logprobs`` lists hold exactly the top ``top_logprobs`` tokens.
- ``usage.completion_tokens`` is the number of returned tokens summed over choices.
- A logprob of minus infinity (a token the model can never produce) is sent as
  -9999.0, because JSON has no infinity.

Parameters that the server does not implement (``stream``, ``echo``, ``suffix``,
``logit_bias``, ``tools``, ``functions``, ``best_of`` above 1, a non-text
``response_format``, non-zero ``presence_penalty`` or ``frequency_penalty``) are
rejected with 400 rather than ignored. Other unknown fields are ignored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipeline.local_teacher import Completion, GenerationResult, SamplingParams, TeacherModel

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 128
DEFAULT_COMPLETIONS_MAX_TOKENS = 16
# OpenAI's stand-in for a logprob that is minus infinity.
MINUS_INFINITY_LOGPROB = -9999.0
_UNSUPPORTED_TRUE = ("stream", "echo")
_UNSUPPORTED_PRESENT = ("suffix", "logit_bias", "tools", "functions")
_UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")
_MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``pipeline serve-teacher``. A ``served_name`` of None means the model's basename."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8400
    served_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def resolved_served_name(self) -> str:
        return self.served_name or default_served_name(self.model)


def default_served_name(model: str) -> str:
    """Return the last path component of a model directory or hub id (``org/name`` gives ``name``)."""
    return Path(model.rstrip("/")).name


class InvalidRequestError(Exception):
    """A request the server rejects with status 400."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        self.message = message
        self.param = param
        self.code = code
        super().__init__(message)


class ModelNotFoundError(InvalidRequestError):
    status = 404

    def __init__(self, requested: str, served: str):
        super().__init__(
            f"model {requested!r} not found; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


@dataclass(frozen=True)
class _ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str


# ---------------------------------------------------------------- app


def create_app(teacher: TeacherModel, served_name: str) -> Starlette:
    """Build the Starlette app that serves ``teacher`` under the model name ``served_name``."""
    created = int(time.time())

    async def health(request: Request) -> Response:
        return _json({"status": "ok", "model": served_name})

    async def models(request: Request) -> Response:
        card = {"id": served_name, "object": "model", "created": created, "owned_by": "local"}
        return _json({"object": "list", "data": [card]})

    @_openai_errors
    async def completions(request: Request) -> Response:
        body = await _read_json_object(request)
        _check_model(body, served_name)
        parsed = _parse_completions(body, teacher)
        result = await run_in_threadpool(teacher.generate, parsed.prompt_ids, parsed.params)
        _log_generation("completions", parsed, result)
        return _json(_completions_body(teacher, served_name, parsed, result, body.get("logprobs")))

    @_openai_errors
    async def chat_completions(request: Request) -> Response:
        body = await _read_json_object(request)
        _check_model(body, served_name)
        parsed = _parse_chat(body, teacher)
        result = await run_in_threadpool(teacher.generate, parsed.prompt_ids, parsed.params)
        _log_generation("chat", parsed, result)
        return _json(_chat_body(teacher, served_name, parsed, result, bool(body.get("logprobs"))))

    routes = [
        Route("/health", health, methods=["GET"]),
        # Also under /v1, for clients that only hold the base URL.
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})


def _openai_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Turn the handler's exceptions into OpenAI-style JSON errors."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except InvalidRequestError as error:
            logger.info("rejected %s with %d: %s", request.url.path, error.status, error.message)
            return _error(error.status, error.message, "invalid_request_error", error.param, error.code)
        except Exception as error:  # noqa: BLE001 - the client gets a 500 and the log the traceback
            logger.exception("request to %s failed", request.url.path)
            return _error(500, f"internal server error: {type(error).__name__}: {error}", "server_error")

    return wrapped


async def _http_exception(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return _error(error.status_code, message, "invalid_request_error")


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return _json(body, status=status)


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _log_generation(endpoint: str, parsed: _ParsedRequest, result: GenerationResult) -> None:
    logger.debug(
        "%s: prompt_tokens=%d completion_tokens=%s n=%d seed=%d",
        endpoint,
        result.prompt_tokens,
        [len(c.token_ids) for c in result.completions],
        parsed.params.n,
        result.seed,
    )


# ---------------------------------------------------------------- request parsing


async def _read_json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequestError(f"request body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_model(body: dict[str, Any], served_name: str) -> None:
    model = _require(body, "model", str)
    if model != served_name:
        raise ModelNotFoundError(model, served_name)


def _parse_completions(body: dict[str, Any], teacher: TeacherModel) -> _ParsedRequest:
    _reject_unsupported(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequestError("missing required field 'prompt'", param="prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError(
            f"'prompt' must be a string, got {type(prompt).__name__}; send one prompt per request",
            param="prompt",
        )
    logprobs = _optional_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    max_tokens = _optional_int(body, "max_tokens", 0, None)
    if max_tokens is None:
        max_tokens = DEFAULT_COMPLETIONS_MAX_TOKENS
    prompt_ids = teacher.encode_prompt(prompt)
    _check_context(teacher, len(prompt_ids), max_tokens, "prompt")
    params = _sampling_params(body, max_tokens, logprobs or 0)
    return _ParsedRequest(prompt_ids=prompt_ids, params=params, prompt_text=prompt)


def _parse_chat(body: dict[str, Any], teacher: TeacherModel) -> _ParsedRequest:
    _reject_unsupported(body)
    messages = _parse_messages(body)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequestError(
            f"'logprobs' must be a boolean, got {type(logprobs).__name__}", param="logprobs"
        )
    top_logprobs = _optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs': true", param="top_logprobs")

    max_tokens = _optional_int(body, "max_completion_tokens", 0, None)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 0, None)
    prompt_ids = teacher.encode_messages(messages)
    if max_tokens is None:
        # As with OpenAI, no limit means up to the end of the context window.
        max_tokens = max(teacher.max_context - len(prompt_ids), 0)
    _check_context(teacher, len(prompt_ids), max_tokens, "messages")
    params = _sampling_params(body, max_tokens, top_logprobs or 0)
    return _ParsedRequest(prompt_ids=prompt_ids, params=params, prompt_text="")


def _parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = _require(body, "messages", list)
    if not messages:
        raise InvalidRequestError("'messages' must contain at least one message", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{param} must be an object, got {type(message).__name__}", param=param)
        role = message.get("role")
        if role not in _MESSAGE_ROLES:
            raise InvalidRequestError(
                f"{param}.role must be one of {', '.join(_MESSAGE_ROLES)}, got {role!r}",
                param=f"{param}.role",
            )
        parsed.append({"role": role, "content": _message_text(message.get("content"), f"{param}.content")})
    return parsed


def _message_text(content: Any, param: str) -> str:
    """Return a message's text; content may be a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidRequestError(
                    f"{param} parts must be {{'type': 'text', 'text': str}}; this server accepts text only",
                    param=param,
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(
        f"{param} must be a string or a list of text parts, got {type(content).__name__}", param=param
    )


def _sampling_params(body: dict[str, Any], max_tokens: int, top_logprobs: int) -> SamplingParams:
    temperature = _optional_number(body, "temperature", 0.0, 2.0)
    top_p = _optional_number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0.0:
        raise InvalidRequestError("'top_p' must be greater than 0", param="top_p")
    n = _optional_int(body, "n", 1, MAX_CHOICES)
    seed = _optional_int(body, "seed", None, None)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        n=1 if n is None else n,
        seed=seed,
        stop=_parse_stop(body),
        top_logprobs=top_logprobs,
    )


def _parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("'stop' must be a string or a list of strings", param="stop")
    if any(s == "" for s in stops):
        raise InvalidRequestError("'stop' strings must not be empty", param="stop")
    return tuple(stops)


def _check_context(teacher: TeacherModel, prompt_tokens: int, max_tokens: int, prompt_param: str) -> None:
    if prompt_tokens >= teacher.max_context:
        raise InvalidRequestError(
            f"the prompt has {prompt_tokens} tokens, but the model's context is {teacher.max_context} tokens; "
            "shorten the prompt",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if prompt_tokens + max_tokens > teacher.max_context:
        raise InvalidRequestError(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of "
            f"{teacher.max_context} tokens; set max_tokens to at most {teacher.max_context - prompt_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _reject_unsupported(body: dict[str, Any]) -> None:
    for name in _UNSUPPORTED_TRUE:
        if body.get(name):
            raise InvalidRequestError(f"'{name}' is not supported by this server; remove it", param=name)
    for name in _UNSUPPORTED_PRESENT:
        if body.get(name):
            raise InvalidRequestError(f"'{name}' is not supported by this server; remove it", param=name)
    for name in _UNSUPPORTED_NONZERO:
        if body.get(name, 0) not in (0, None):
            raise InvalidRequestError(f"'{name}' is not supported by this server; use 0", param=name)
    if body.get("best_of") not in (None, 1):
        raise InvalidRequestError("'best_of' is not supported by this server; use n", param="best_of")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise InvalidRequestError(
            "'response_format' other than {'type': 'text'} is not supported by this server; remove it",
            param="response_format",
        )


def _require(body: dict[str, Any], name: str, kind: type) -> Any:
    if name not in body or body[name] is None:
        raise InvalidRequestError(f"missing required field '{name}'", param=name)
    value = body[name]
    if not isinstance(value, kind):
        raise InvalidRequestError(
            f"'{name}' must be of type {kind.__name__}, got {type(value).__name__}", param=name
        )
    return value


def _optional_int(body: dict[str, Any], name: str, minimum: int | None, maximum: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int subclass in Python, but true is no count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"'{name}' must be an integer, got {value!r}", param=name)
    if minimum is not None and value < minimum:
        raise InvalidRequestError(f"'{name}' must be at least {minimum}, got {value}", param=name)
    if maximum is not None and value > maximum:
        raise InvalidRequestError(f"'{name}' must be at most {maximum}, got {value}", param=name)
    return value


def _optional_number(body: dict[str, Any], name: str, minimum: float, maximum: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"'{name}' must be a number, got {value!r}", param=name)
    if not minimum <= value <= maximum:
        raise InvalidRequestError(f"'{name}' must be between {minimum} and {maximum}, got {value}", param=name)
    return float(value)


# ---------------------------------------------------------------- response bodies


def _completions_body(
    teacher: TeacherModel,
    served_name: str,
    parsed: _ParsedRequest,
    result: GenerationResult,
    logprobs: int | None,
) -> dict[str, Any]:
    prompt_length = len(parsed.prompt_text)
    choices = []
    for index, completion in enumerate(result.completions):
        choice_logprobs = None
        if logprobs is not None:
            choice_logprobs = _legacy_logprobs(teacher, completion, prompt_length)
        choices.append(
            {
                "index": index,
                "text": completion.text,
                "logprobs": choice_logprobs,
                "finish_reason": completion.finish_reason,
            }
        )
    return {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": served_name,
        "choices": choices,
        "usage": _usage(result),
    }


def _legacy_logprobs(teacher: TeacherModel, completion: Completion, prompt_length: int) -> dict[str, Any]:
    texts = teacher.token_texts
    top_dicts = []
    for token_id, logprob, top_ids, top_values in zip(
        completion.token_ids, completion.logprobs, completion.top_ids, completion.top_logprobs
    ):
        alternatives = {texts[i]: _finite(v) for i, v in zip(top_ids, top_values)}
        alternatives.setdefault(texts[token_id], _finite(logprob))
        top_dicts.append(alternatives)
    return {
        "tokens": [texts[i] for i in completion.token_ids],
        "token_logprobs": [_finite(v) for v in completion.logprobs],
        "top_logprobs": top_dicts,
        "text_offset": [prompt_length + offset for offset in completion.text_offsets],
    }


def _chat_body(
    teacher: TeacherModel,
    served_name: str,
    parsed: _ParsedRequest,
    result: GenerationResult,
    logprobs: bool,
) -> dict[str, Any]:
    choices = []
    for index, completion in enumerate(result.completions):
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": completion.text, "refusal": None},
                "logprobs": _chat_logprobs(teacher, completion) if logprobs else None,
                "finish_reason": completion.finish_reason,
            }
        )
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served_name,
        "choices": choices,
        "usage": _usage(result),
    }


def _chat_logprobs(teacher: TeacherModel, completion: Completion) -> dict[str, Any]:
    content = []
    for token_id, logprob, top_ids, top_values in zip(
        completion.token_ids, completion.logprobs, completion.top_ids, completion.top_logprobs
    ):
        entry = _chat_token(teacher, token_id, logprob)
        entry["top_logprobs"] = [_chat_token(teacher, i, v) for i, v in zip(top_ids, top_values)]
        content.append(entry)
    return {"content": content, "refusal": None}


def _chat_token(teacher: TeacherModel, token_id: int, logprob: float) -> dict[str, Any]:
    return {
        "token": teacher.token_texts[token_id],
        "logprob": _finite(logprob),
        "bytes": list(teacher.token_bytes[token_id]),
    }


def _usage(result: GenerationResult) -> dict[str, int]:
    completion_tokens = sum(len(c.token_ids) for c in result.completions)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": result.prompt_tokens + completion_tokens,
    }


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MINUS_INFINITY_LOGPROB


# ---------------------------------------------------------------- running the server


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose ``run`` returns normally after SIGINT or SIGTERM.

    Stock uvicorn (0.55) re-raises the signal after its graceful shutdown, so the
    process dies by the signal. This subclass keeps the graceful shutdown and then
    returns. ``stop_signal`` is the signal that stopped it, if any.
    """

    stop_signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: Any) -> None:
        self.stop_signal = sig
        self.handle_exit(sig, frame)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket; port 0 picks a free port (read it from ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def build_server(app: Starlette) -> GracefulServer:
    """Build a uvicorn server for ``app`` that logs through the standard logging setup."""
    # log_config=None: uvicorn's loggers propagate to the root logger that the CLI configures.
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5, lifespan="off")
    return GracefulServer(config)


def base_url(sock: socket.socket) -> str:
    """Return the ``http://host:port/v1`` URL that clients use for a bound socket."""
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"
