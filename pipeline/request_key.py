"""Canonical form of a teacher request and the ``request_id`` digest derived from it.

The ``request_id`` is the resume key of the store: a harvest skips every request whose id
is already stored, and the in-run cache dedupes on it. It therefore covers everything
that can change the teacher's output: teacher name, model, endpoint, prompt or messages,
every sampling parameter and the sample index. It leaves out the prompt's line number,
its ``id`` and the run, so a prompt moved to another line or file is still recognised
as already harvested.

The canonical form is JSON with sorted keys and no whitespace, so two dicts that differ
only in key order get the same id. Parameters that are not set are left out instead of
being written as ``null``, so adding a new optional parameter later keeps old ids valid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# Bumped only when the canonical form itself changes; a new version makes every id new.
CANONICAL_VERSION = 1

REQUEST_ID_HEX_CHARS = 32


@dataclass(frozen=True, slots=True)
class CanonicalRequest:
    """Everything that determines a teacher's output for one request."""

    teacher: str
    model: str
    endpoint: str
    prompt: str | None
    messages: tuple[Mapping[str, Any], ...] | None
    params: Mapping[str, Any]
    sample_index: int

    def to_json(self) -> bytes:
        """Return the canonical JSON bytes (sorted keys, unset values left out)."""
        data: dict[str, Any] = {
            "v": CANONICAL_VERSION,
            "teacher": self.teacher,
            "model": self.model,
            "endpoint": self.endpoint,
            "params": drop_unset(self.params),
            "sample_index": self.sample_index,
        }
        if self.messages is not None:
            data["messages"] = list(self.messages)
        else:
            data["prompt"] = self.prompt
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)

    @property
    def request_id(self) -> str:
        """The 32-hex-character BLAKE2b digest of :meth:`to_json`."""
        return request_id_of(self.to_json())


def drop_unset(params: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``params`` without ``None`` values and empty sequences (``stop=[]``)."""
    set_params = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 0:
            continue
        set_params[key] = value
    return set_params


def canonical_params_json(params: Mapping[str, Any]) -> str:
    """Return the canonical JSON text of sampling parameters, as stored in ``params``."""
    return orjson.dumps(drop_unset(params), option=orjson.OPT_SORT_KEYS).decode()


def request_id_of(canonical_json: bytes) -> str:
    digest = hashlib.blake2b(canonical_json, digest_size=REQUEST_ID_HEX_CHARS // 2)
    return digest.hexdigest()
