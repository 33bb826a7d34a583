"""Work items of a harvest: one request of one prompt sample to one teacher.

A :class:`WorkItem` contains the request body exactly as it is sent, its ``request_id`` (the
digest of the canonical request, see :mod:`pipeline.request_key`), and the retry state
that must survive a requeue (attempts made, time of the first attempt).

Chat teachers get a prompt string as a single user message; completions teachers get
the string as ``prompt`` and reject chat messages, which have no faithful plain-text
form without the teacher's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import SamplingConfig, TeacherConfig
from pipeline.errors import PromptError
from pipeline.prompts import PromptRecord
from pipeline.request_key import CanonicalRequest, canonical_params_json, drop_unset

# Rough characters per token of English text, for the tpm budget before usage is known.
CHARS_PER_TOKEN_ESTIMATE = 4
# Tokens a chat template adds per message (role markers), for the same estimate.
TOKENS_PER_MESSAGE_ESTIMATE = 4


@dataclass(slots=True)
class WorkItem:
    """One request to send, with the retry state that survives a requeue."""

    teacher: TeacherConfig
    record: PromptRecord
    sample_index: int
    request_id: str
    body: dict[str, Any]
    params: dict[str, Any]
    params_json: str
    estimated_tokens: int
    attempts: int = 0
    first_attempt_at: float | None = None


def build_work_item(
    teacher: TeacherConfig, record: PromptRecord, sample_index: int, sampling: SamplingConfig,
    prompts_path: str,
) -> WorkItem:
    """Build the request of ``record``'s ``sample_index``-th sample for ``teacher``.

    Raises PromptError when the record cannot be sent to this teacher's endpoint.
    """
    if record.messages is not None and teacher.endpoint == "completions":
        raise PromptError(
            f"chat messages cannot be sent to teacher {teacher.name}'s completions endpoint;"
            " use --endpoint chat or give the line a prompt string",
            path=prompts_path,
            line=record.line,
            field="messages",
        )
    params = {**sampling.params_for(sample_index), **teacher.params}
    canonical = CanonicalRequest(
        teacher=teacher.name,
        model=teacher.model,
        endpoint=teacher.endpoint,
        prompt=record.prompt,
        messages=record.messages,
        params=params,
        sample_index=sample_index,
    )
    return WorkItem(
        teacher=teacher,
        record=record,
        sample_index=sample_index,
        request_id=canonical.request_id,
        body=request_body(teacher, record, params),
        params=params,
        params_json=canonical_params_json(params),
        estimated_tokens=estimate_prompt_tokens(record) + sampling.max_tokens,
    )


def request_body(teacher: TeacherConfig, record: PromptRecord, params: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON body for the teacher's endpoint."""
    top_logprobs = params.get("top_logprobs") or 0
    sampling = drop_unset({key: value for key, value in params.items() if key != "top_logprobs"})
    body: dict[str, Any] = {"model": teacher.model}
    if teacher.endpoint == "chat":
        body["messages"] = (
            [dict(message) for message in record.messages]
            if record.messages is not None
            else [{"role": "user", "content": record.prompt}]
        )
        body.update(sampling)
        if top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = top_logprobs
    else:
        body["prompt"] = record.prompt
        body.update(sampling)
        if top_logprobs:
            body["logprobs"] = top_logprobs
    return body


def estimate_prompt_tokens(record: PromptRecord) -> int:
    """Estimate prompt tokens from characters; the response's usage corrects it later."""
    if record.messages is None:
        return len(record.prompt or "") // CHARS_PER_TOKEN_ESTIMATE + 1
    characters = sum(len(message.get("content") or "") for message in record.messages)
    return characters // CHARS_PER_TOKEN_ESTIMATE + TOKENS_PER_MESSAGE_ESTIMATE * len(record.messages)
