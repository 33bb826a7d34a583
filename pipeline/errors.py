"""Exceptions raised by the harvester, the response parser and the store.

One tree, so callers catch at the level they can handle::

    KDError
    ├── ConfigError              invalid flags or config file (exit status 2)
    ├── PromptError              one invalid line of a prompts file
    ├── ResponseFormatError      a teacher body that cannot become a stored row
    │   ├── TruncatedBodyError       body is not complete JSON (retryable)
    │   └── MissingLogprobsError     logprobs requested, none returned (not retried)
    ├── TeacherError             the request to a teacher failed
    │   ├── RateLimitError           HTTP 429 or an embedded 429 (retryable)
    │   ├── ServerError              HTTP 5xx or an embedded 5xx (retryable)
    │   ├── ClientError              other HTTP 4xx (not retried)
    │   └── TransportError           timeout, refused or dropped connection (retryable)
    └── StoreError               the Parquet store cannot be used as asked
        ├── StoreLockedError         another harvest holds the store's write lock
        └── DamagedFileError         a Parquet file cannot be read

Every error carries enough context to act on (the file and line, the HTTP status, the
request id) and chains its cause with ``raise ... from``. None carries an API key:
messages are built from values that never include one.
"""

from __future__ import annotations


class KDError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(KDError):
    """Invalid command-line flags or config file; nothing was sent."""


class PromptError(KDError):
    """One invalid line of a prompts file."""

    def __init__(self, message: str, *, path: str, line: int, field: str | None = None):
        self.path = path
        self.line = line
        self.field = field
        super().__init__(f"{path}:{line}: {message}")


class ResponseFormatError(KDError):
    """A teacher body that cannot be parsed into a stored row."""

    retryable = False


class TruncatedBodyError(ResponseFormatError):
    """A body that stops before its JSON is complete: the transfer was cut, so retry."""

    retryable = True


class MissingLogprobsError(ResponseFormatError):
    """Logprobs were requested and the teacher returned none: a configuration problem."""


class TeacherError(KDError):
    """A request to a teacher failed.

    ``status`` is the HTTP status (or the status embedded in a 200 body), ``None`` for
    transport failures; ``retry_after`` is the server's requested wait in seconds, if any.
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ):
        self.status = status
        self.retry_after = retry_after
        self.request_id = request_id
        super().__init__(message)


class RateLimitError(TeacherError):
    retryable = True


class ServerError(TeacherError):
    retryable = True


class ClientError(TeacherError):
    retryable = False


class TransportError(TeacherError):
    retryable = True


class StoreError(KDError):
    """The store cannot be used as requested."""


class StoreLockedError(StoreError):
    """Another harvest process holds the store's write lock."""


class DamagedFileError(StoreError):
    """A Parquet file in the store is unreadable (truncated, empty or corrupt)."""

    def __init__(self, message: str, *, path: str):
        self.path = path
        super().__init__(f"{path}: {message}")
