"""Rows the harvester stores (responses, failures, runs) and the run's counters.

Row dicts are keyed by the column names of :mod:`storage.schema`; a response row also
carries ``"logprobs"`` (a LogprobColumns or ``None``). Nothing here reads an API key:
the teacher settings written into the run row come from ``public_dict()``.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.config import HarvestConfig
from pipeline.errors import PromptError
from pipeline.harvest_requests import WorkItem
from pipeline.parsing import ParsedResponse

INVALID_PROMPT_ERROR_TYPE = "invalid_prompt"

try:
    from importlib.metadata import version as _package_version

    PACKAGE_VERSION = _package_version("kd-pipeline")
except Exception:  # noqa: BLE001 - a source checkout without installed metadata
    PACKAGE_VERSION = "unknown"


@dataclass
class HarvestStats:
    """Counters of one run; every request ends in exactly one of the outcome counters.

    ``requests`` = ``skipped_stored`` + ``cached`` + ``responses`` + ``failed`` (+ the
    requests still in flight when a run is interrupted). ``sent`` counts HTTP attempts,
    retries included.
    """

    prompts_read: int = 0
    invalid_lines: int = 0
    blank_lines: int = 0
    requests: int = 0
    sent: int = 0
    retries: int = 0
    requeued: int = 0
    cached: int = 0
    skipped_stored: int = 0
    responses: int = 0
    incomplete: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_monotonic: float = field(default_factory=time.monotonic)
    finished_monotonic: float | None = None
    # Failed requests per cause ("ErrorType" or "ErrorType HTTP 404"), with the first message.
    failure_causes: dict[str, int] = field(default_factory=dict)
    failure_examples: dict[str, str] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        end = self.finished_monotonic if self.finished_monotonic is not None else time.monotonic()
        return end - self.started_monotonic

    def count_failure(self, error: BaseException) -> bool:
        """Count a failed request by cause; return True the first time a cause is seen."""
        cause = type(error).__name__
        status = getattr(error, "status", None)
        if status is not None:
            cause = f"{cause} HTTP {status}"
        first = cause not in self.failure_causes
        self.failure_causes[cause] = self.failure_causes.get(cause, 0) + 1
        if first:
            self.failure_examples[cause] = str(error)
        return first

    @property
    def resolved(self) -> int:
        return self.skipped_stored + self.cached + self.responses + self.failed

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("started_monotonic")
        data.pop("finished_monotonic")
        data.pop("failure_examples")
        data["wall_s"] = round(self.wall_s, 3)
        return data


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_run_id() -> str:
    return f"{utc_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _request_columns(item: WorkItem, run_id: str, prompts_path: str) -> dict[str, Any]:
    record = item.record
    return {
        "request_id": item.request_id,
        "run_id": run_id,
        "created_at": utc_now(),
        "teacher": item.teacher.name,
        "base_url": item.teacher.base_url,
        "model": item.teacher.model,
        "endpoint": item.teacher.endpoint,
        "prompt_id": record.prompt_id,
        "prompt_source": prompts_path,
        "prompt_line": record.line,
        "prompt": record.prompt,
        "messages": json.dumps(list(record.messages), ensure_ascii=False) if record.messages is not None else None,
        "sample_index": item.sample_index,
        "params": item.params_json,
        "max_tokens": item.params.get("max_tokens"),
        "temperature": item.params.get("temperature"),
        "top_logprobs_requested": item.params.get("top_logprobs") or None,
        "attempts": item.attempts,
    }


def response_row(
    item: WorkItem, parsed: ParsedResponse, latency_ms: float, *, run_id: str, prompts_path: str
) -> dict[str, Any]:
    """Build the responses row of the first choice of ``parsed``."""
    choice = parsed.choices[0]
    row = _request_columns(item, run_id, prompts_path)
    row.update(
        response_model=parsed.model,
        response=choice.text,
        finish_reason=choice.finish_reason,
        prompt_tokens=parsed.prompt_tokens,
        completion_tokens=parsed.completion_tokens,
        latency_ms=latency_ms,
        logprobs_format=choice.logprobs_format,
        logprobs=choice.logprobs,
        logprobs_lossy=choice.logprobs_lossy,
        token_bytes_match=choice.token_bytes_match,
        token_level_ok=choice.token_level_ok,
        logprobs_note=choice.logprobs_note,
    )
    return row


def failure_row(item: WorkItem, error: BaseException, *, run_id: str, prompts_path: str) -> dict[str, Any]:
    """Build the failures row of a request whose retries ran out or were not allowed."""
    row = _request_columns(item, run_id, prompts_path)
    row.update(
        error_type=type(error).__name__,
        message=str(error),
        http_status=getattr(error, "status", None),
        retryable=bool(getattr(error, "retryable", False)),
    )
    return row


def invalid_prompt_row(error: PromptError, *, run_id: str, prompts_path: str, teacher: str | None = None) -> dict[str, Any]:
    """Build the failures row of a prompt line that could not become a request."""
    return {
        "run_id": run_id,
        "created_at": utc_now(),
        "teacher": teacher,
        "prompt_source": prompts_path,
        "prompt_line": error.line,
        "attempts": 0,
        "error_type": INVALID_PROMPT_ERROR_TYPE,
        "message": str(error),
        "http_status": None,
        "retryable": False,
    }


def run_row(
    config: HarvestConfig, stats: HarvestStats, *, run_id: str, status: str,
    started_at: datetime, finished_at: datetime | None,
) -> dict[str, Any]:
    """Build the runs row; the config is the public one, without API keys."""
    return {
        "run_id": run_id,
        "status": status,
        "started_at": started_at,
        "finished_at": finished_at,
        "prompts_path": str(config.prompts_path),
        "teachers": ",".join(teacher.name for teacher in config.teachers),
        "config": json.dumps(config.public_dict(), sort_keys=True),
        "prompts_read": stats.prompts_read,
        "invalid_lines": stats.invalid_lines,
        "blank_lines": stats.blank_lines,
        "requests": stats.requests,
        "sent": stats.sent,
        "cached": stats.cached,
        "skipped_stored": stats.skipped_stored,
        "responses": stats.responses,
        "failed": stats.failed,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "wall_s": stats.wall_s,
        "hostname": socket.gethostname(),
        "version": PACKAGE_VERSION,
    }

