"""Typed configuration of a harvest: teachers, sampling parameters and run options.

Defaults live in the dataclass fields below and nowhere else. The CLI collects the flags
the user gave into :class:`HarvestFlags` (flags not given are ``None``) and
:func:`build_harvest_config` fills in the defaults, reads the teachers file and the API
keys, and validates everything before any request is sent. Every problem found is
collected and reported together in one :class:`ConfigError`, so a config file is fixed
in one pass.

API keys are wrapped in :class:`ApiKey`, whose ``repr`` and ``str`` never show the key.
The config written to the store or printed comes from ``public_dict()``, which leaves the
key out, and base URLs with credentials or query strings are rejected so that no secret
reaches a stored ``base_url`` either.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError
from storage.encoding import LOGPROB_ENCODINGS

log = logging.getLogger(__name__)

ENDPOINTS = ("chat", "completions")
HTTP_CLIENTS = ("aiohttp", "openai")
"""Ways to send requests: straight to an aiohttp pool (fastest), or built by the openai SDK."""
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
# Sent to loopback teachers that need no key; the openai SDK refuses an empty key.
LOOPBACK_PLACEHOLDER_KEY = "sk-no-key-loopback"

# Request body fields the harvester sets itself; a teacher's extra ``params`` must not
# override them, because the stored row would then describe a different request.
RESERVED_BODY_FIELDS = frozenset(
    {"model", "messages", "prompt", "logprobs", "top_logprobs", "max_tokens",
     "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream", "n", "echo"}
)


class ApiKey:
    """An API key that never appears in ``repr``, ``str`` or logs."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str):
        self._value = value
        self.source = source

    def reveal(self) -> str:
        """Return the key itself; call only where it is handed to the HTTP client."""
        return self._value

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher endpoint; every prompt is sent to each configured teacher."""

    name: str
    base_url: str
    model: str
    endpoint: str = "chat"
    api_key_env: str = DEFAULT_API_KEY_ENV
    api_key_file: Path | None = None
    rpm: float | None = None
    tpm: float | None = None
    concurrency: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    http_client: str = "aiohttp"
    api_key: ApiKey | None = field(default=None, repr=False, compare=False)

    def public_dict(self) -> dict[str, Any]:
        """Return the teacher's settings without the API key (safe to store and print)."""
        return {
            "name": self.name,
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": self.endpoint,
            "api_key_env": None if self.api_key_file else self.api_key_env,
            "api_key_file": str(self.api_key_file) if self.api_key_file else None,
            "api_key_source": self.api_key.source if self.api_key else None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "concurrency": self.concurrency,
            "params": dict(self.params),
            "http_client": self.http_client,
        }


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters sent with every request."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Alternatives per generated token; 0 requests no logprobs at all.
    top_logprobs: int = 20

    def params_for(self, sample_index: int) -> dict[str, Any]:
        """Return the sampling parameters of one sample (the seed is offset by its index)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": None if self.seed is None else self.seed + sample_index,
            "stop": list(self.stop) or None,
            "top_logprobs": self.top_logprobs,
        }


@dataclass(frozen=True)
class HarvestConfig:
    """A complete, validated harvest: what to send, where to store it, how to retry."""

    prompts_path: Path
    store_path: Path
    teachers: tuple[TeacherConfig, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    samples: int = 1
    concurrency: int = 16
    timeout_s: float = 120.0
    max_attempts: int = 6
    # Maximum single wait in seconds before a retry. A longer Retry-After requeues the request.
    max_retry_wait_s: float = 60.0
    # Full-jitter backoff window of the first retry, doubling with each attempt.
    backoff_initial_s: float = 1.0
    # Maximum seconds from a request's first attempt to its last, retries and waits included.
    deadline_s: float | None = 900.0
    limit: int | None = None
    cache_size: int = 10_000
    # Stop the run after this many requests in a row failed with no response in between
    # (a wrong URL, model or key); 0 never stops.
    max_consecutive_failures: int = 100
    # How new responses files store logprobs (uint8 or float32), saved as the store's
    # setting; None keeps the store's current setting.
    logprob_encoding: str | None = None
    dry_run: bool = False
    progress: bool = True
    config_path: Path | None = None

    def teacher_concurrency(self, teacher: TeacherConfig) -> int:
        return teacher.concurrency or self.concurrency

    def public_dict(self) -> dict[str, Any]:
        """Return the whole config as JSON-ready values, without any API key."""
        return {
            "prompts_path": str(self.prompts_path),
            "store_path": str(self.store_path),
            "config_path": str(self.config_path) if self.config_path else None,
            "teachers": [teacher.public_dict() for teacher in self.teachers],
            "sampling": {
                "max_tokens": self.sampling.max_tokens,
                "temperature": self.sampling.temperature,
                "top_p": self.sampling.top_p,
                "seed": self.sampling.seed,
                "stop": list(self.sampling.stop),
                "top_logprobs": self.sampling.top_logprobs,
            },
            "samples": self.samples,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
            "max_attempts": self.max_attempts,
            "max_retry_wait_s": self.max_retry_wait_s,
            "backoff_initial_s": self.backoff_initial_s,
            "deadline_s": self.deadline_s,
            "limit": self.limit,
            "cache_size": self.cache_size,
            "logprob_encoding": self.logprob_encoding,
            "max_consecutive_failures": self.max_consecutive_failures,
            "dry_run": self.dry_run,
        }


@dataclass(frozen=True)
class HarvestFlags:
    """Raw values of ``pipeline harvest`` flags; ``None`` means the flag was not given."""

    prompts_path: Path
    store_path: Path | None = None
    config_path: Path | None = None
    base_url: str | None = None
    model: str | None = None
    teacher: str | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    endpoint: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    samples: int | None = None
    concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    http_client: str | None = None
    timeout_s: float | None = None
    max_attempts: int | None = None
    max_retry_wait_s: float | None = None
    backoff_initial_s: float | None = None
    deadline_s: float | None = None
    limit: int | None = None
    cache_size: int | None = None
    max_consecutive_failures: int | None = None
    logprob_encoding: str | None = None
    dry_run: bool = False
    progress: bool = True


# --- building --------------------------------------------------------------------------


def build_harvest_config(
    flags: HarvestFlags, environ: Mapping[str, str] | None = None
) -> HarvestConfig:
    """Build and validate the harvest config; raise one ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []

    if flags.store_path is None:
        problems.append("missing --store: give the folder of the Parquet store")
    teachers = _teachers_from_flags_or_file(flags, problems)
    teachers = tuple(_with_api_key(teacher, environ, problems) for teacher in teachers)

    sampling = _override(
        SamplingConfig(),
        max_tokens=flags.max_tokens,
        temperature=flags.temperature,
        top_p=flags.top_p,
        seed=flags.seed,
        stop=tuple(flags.stop) or None,
        top_logprobs=flags.top_logprobs,
    )
    config = _override(
        HarvestConfig(
            prompts_path=flags.prompts_path,
            store_path=flags.store_path or Path("."),
            teachers=teachers,
            sampling=sampling,
            config_path=flags.config_path,
            dry_run=flags.dry_run,
            progress=flags.progress,
        ),
        samples=flags.samples,
        concurrency=flags.concurrency,
        timeout_s=flags.timeout_s,
        max_attempts=flags.max_attempts,
        max_retry_wait_s=flags.max_retry_wait_s,
        backoff_initial_s=flags.backoff_initial_s,
        limit=flags.limit,
        cache_size=flags.cache_size,
        max_consecutive_failures=flags.max_consecutive_failures,
        logprob_encoding=flags.logprob_encoding,
    )
    if flags.deadline_s is not None:
        # --deadline 0 turns the deadline off.
        config = replace(config, deadline_s=flags.deadline_s or None)
    problems.extend(validate_harvest_config(config))
    if problems:
        raise ConfigError(_format_problems(problems))
    return config


def _override(instance: Any, **values: Any) -> Any:
    """Return ``instance`` with the given values, skipping those that are ``None``."""
    given = {key: value for key, value in values.items() if value is not None}
    return replace(instance, **given)


def _format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid harvest config: {problems[0]}"
    lines = "\n".join(f"  - {problem}" for problem in problems)
    return f"invalid harvest config ({len(problems)} problems):\n{lines}"


def _teachers_from_flags_or_file(flags: HarvestFlags, problems: list[str]) -> list[TeacherConfig]:
    teacher_flags = {"--base-url": flags.base_url, "--model": flags.model, "--teacher": flags.teacher}
    if flags.config_path is not None:
        given = [name for name, value in teacher_flags.items() if value is not None]
        if given:
            problems.append(
                f"{', '.join(given)} cannot be combined with --config {flags.config_path}:"
                " define the teacher in the config file or drop --config"
            )
        return load_teachers_file(flags.config_path, flags, problems)

    if flags.base_url is None or flags.model is None:
        missing = [name for name in ("--base-url", "--model") if teacher_flags[name] is None]
        problems.append(
            f"missing {' and '.join(missing)}: give the teacher's --base-url and --model,"
            " or a teachers file with --config"
        )
        return []
    teacher = TeacherConfig(
        name=flags.teacher or flags.model,
        base_url=flags.base_url,
        model=flags.model,
    )
    if flags.api_key_env is not None and flags.api_key_file is not None:
        problems.append("give --api-key-env or --api-key-file, not both")
    return [_apply_flag_defaults(teacher, flags, explicit=set())]


def _apply_flag_defaults(teacher: TeacherConfig, flags: HarvestFlags, explicit: set[str]) -> TeacherConfig:
    """Fill teacher settings that the teachers file left out from the command-line flags."""
    values: dict[str, Any] = {}
    for key, flag_value in (
        ("endpoint", flags.endpoint),
        ("rpm", flags.rpm),
        ("tpm", flags.tpm),
        ("http_client", flags.http_client),
        ("api_key_env", flags.api_key_env),
        ("api_key_file", flags.api_key_file),
    ):
        if key not in explicit and flag_value is not None:
            values[key] = flag_value
    return replace(teacher, **values)


_TEACHER_KEYS = {
    "name": str,
    "base_url": str,
    "model": str,
    "endpoint": str,
    "api_key_env": str,
    "api_key_file": str,
    "rpm": (int, float),
    "tpm": (int, float),
    "concurrency": int,
    "params": dict,
    "http_client": str,
}


def load_teachers_file(path: Path, flags: HarvestFlags, problems: list[str]) -> list[TeacherConfig]:
    """Read ``[[teachers]]`` tables from a TOML file, appending every problem to ``problems``."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        problems.append(f"teachers file {path} not found: check the --config path")
        return []
    except (OSError, tomllib.TOMLDecodeError) as error:
        problems.append(f"teachers file {path} cannot be read: {error}")
        return []

    unknown_top = sorted(set(document) - {"teachers"})
    if unknown_top:
        problems.append(f"{path}: unknown top-level keys {unknown_top}; only [[teachers]] tables are read")
    tables = document.get("teachers")
    if not isinstance(tables, list) or not tables:
        problems.append(f"{path}: no [[teachers]] table; define at least one teacher")
        return []

    teachers = []
    for number, table in enumerate(tables, start=1):
        teacher = _teacher_from_table(table, f"{path} teacher #{number}", flags, problems)
        if teacher is not None:
            teachers.append(teacher)
    return teachers


def _teacher_from_table(
    table: Any, where: str, flags: HarvestFlags, problems: list[str]
) -> TeacherConfig | None:
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table, got {type(table).__name__}")
        return None
    found_problem = False
    for key in sorted(set(table) - set(_TEACHER_KEYS)):
        problems.append(f"{where}: unknown key {key!r}; allowed keys are {sorted(_TEACHER_KEYS)}")
        found_problem = True
    for key, expected in _TEACHER_KEYS.items():
        value = table.get(key)
        if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            problems.append(f"{where}: {key} = {value!r} has the wrong type")
            found_problem = True
    for key in ("base_url", "model"):
        if key not in table:
            problems.append(f"{where}: missing {key}")
            found_problem = True
    if found_problem:
        return None

    teacher = TeacherConfig(
        name=table.get("name") or table["model"],
        base_url=table["base_url"],
        model=table["model"],
        endpoint=table.get("endpoint", "chat"),
        api_key_env=table.get("api_key_env", DEFAULT_API_KEY_ENV),
        api_key_file=Path(table["api_key_file"]) if "api_key_file" in table else None,
        rpm=table.get("rpm"),
        tpm=table.get("tpm"),
        concurrency=table.get("concurrency"),
        params=dict(table.get("params", {})),
        http_client=table.get("http_client", "aiohttp"),
    )
    if "api_key_env" in table and "api_key_file" in table:
        problems.append(f"{where}: set api_key_env or api_key_file, not both")
    return _apply_flag_defaults(teacher, flags, explicit=set(table))


# --- API keys --------------------------------------------------------------------------


def is_loopback_url(url: str) -> bool:
    """Return whether the URL's host is this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _with_api_key(teacher: TeacherConfig, environ: Mapping[str, str], problems: list[str]) -> TeacherConfig:
    key = resolve_api_key(teacher, environ, problems)
    return replace(teacher, api_key=key)


def resolve_api_key(
    teacher: TeacherConfig, environ: Mapping[str, str], problems: list[str]
) -> ApiKey | None:
    """Read the teacher's key from its file or variable; loopback teachers may go without."""
    if teacher.api_key_file is not None:
        try:
            value = Path(teacher.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            problems.append(
                f"teacher {teacher.name}: API key file {teacher.api_key_file} cannot be read"
                f" ({error.strerror or type(error).__name__})"
            )
            return None
        if not value:
            problems.append(f"teacher {teacher.name}: API key file {teacher.api_key_file} is empty")
            return None
        return ApiKey(value, f"file {teacher.api_key_file}")

    value = environ.get(teacher.api_key_env, "").strip()
    if value:
        return ApiKey(value, f"environment variable {teacher.api_key_env}")
    if is_loopback_url(teacher.base_url):
        if teacher.api_key_env != DEFAULT_API_KEY_ENV:
            # A variable named on purpose but unset is more likely a typo than a request for
            # the placeholder, so warn. The run goes on because loopback teachers rarely check keys.
            log.warning(
                "teacher %s: environment variable %s is not set; sending a placeholder key to"
                " the loopback teacher at %s", teacher.name, teacher.api_key_env, teacher.base_url,
            )
        return ApiKey(LOOPBACK_PLACEHOLDER_KEY, "placeholder for a loopback teacher")
    problems.append(
        f"teacher {teacher.name}: environment variable {teacher.api_key_env} is not set;"
        f" export it with the API key of {teacher.base_url}, or name another variable"
        " with --api-key-env (api_key_env) or a file with --api-key-file (api_key_file)"
    )
    return None


# --- validation ------------------------------------------------------------------------


def validate_harvest_config(config: HarvestConfig) -> list[str]:
    """Return every problem of ``config`` as a message naming the value and its fix."""
    problems: list[str] = []
    if not config.prompts_path.is_file():
        problems.append(f"prompts file {config.prompts_path} not found or not a file")
    if config.store_path.exists() and not config.store_path.is_dir():
        problems.append(f"--store {config.store_path} exists and is not a folder")
    problems.extend(_validate_teachers(config.teachers))
    problems.extend(_validate_sampling(config.sampling))
    if config.logprob_encoding is not None and config.logprob_encoding not in LOGPROB_ENCODINGS:
        problems.append(
            f"--logprob-encoding {config.logprob_encoding!r} is not one of {', '.join(LOGPROB_ENCODINGS)}"
        )

    positive_ints = {"--samples": config.samples, "--concurrency": config.concurrency,
                     "--max-attempts": config.max_attempts}
    for flag, value in positive_ints.items():
        if value < 1:
            problems.append(f"{flag} {value} must be at least 1")
    if config.limit is not None and config.limit < 1:
        problems.append(f"--limit {config.limit} must be at least 1")
    if config.cache_size < 0:
        problems.append(f"--cache-size {config.cache_size} must be 0 (no cache) or more")
    if config.max_consecutive_failures < 0:
        problems.append(
            f"--max-consecutive-failures {config.max_consecutive_failures} must be 0 (never stop) or more"
        )
    _check_seconds(problems, "--timeout", config.timeout_s, allow_zero=False)
    _check_seconds(problems, "--max-retry-wait", config.max_retry_wait_s, allow_zero=True)
    _check_seconds(problems, "--backoff-initial", config.backoff_initial_s, allow_zero=False)
    if config.deadline_s is not None:
        _check_seconds(problems, "--deadline", config.deadline_s, allow_zero=False)
    return problems


def _check_seconds(problems: list[str], flag: str, value: float, *, allow_zero: bool) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "more than 0"
        problems.append(f"{flag} {value} must be a finite number of seconds, {bound}")


def _validate_sampling(sampling: SamplingConfig) -> list[str]:
    problems = []
    if sampling.max_tokens < 1:
        problems.append(f"--max-tokens {sampling.max_tokens} must be at least 1")
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        problems.append(f"--temperature {sampling.temperature} must be 0 or more")
    if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
        problems.append(f"--top-p {sampling.top_p} must be in (0, 1]")
    if sampling.top_logprobs < 0:
        problems.append(f"--top-logprobs {sampling.top_logprobs} must be 0 (no logprobs) or more")
    return problems


def _validate_teachers(teachers: tuple[TeacherConfig, ...]) -> list[str]:
    problems = []
    seen: set[str] = set()
    for teacher in teachers:
        where = f"teacher {teacher.name!r}"
        if not teacher.name.strip():
            problems.append("a teacher has an empty name: set name (or --teacher)")
        if teacher.name in seen:
            problems.append(f"{where} is defined twice: give each teacher its own name")
        seen.add(teacher.name)
        problems.extend(f"{where}: {p}" for p in _validate_base_url(teacher.base_url))
        if not teacher.model.strip():
            problems.append(f"{where}: empty model name")
        if teacher.endpoint not in ENDPOINTS:
            problems.append(f"{where}: endpoint {teacher.endpoint!r} is not one of {', '.join(ENDPOINTS)}")
        for name, value in (("rpm", teacher.rpm), ("tpm", teacher.tpm)):
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{where}: {name} {value} must be more than 0")
        if teacher.concurrency is not None and teacher.concurrency < 1:
            problems.append(f"{where}: concurrency {teacher.concurrency} must be at least 1")
        if teacher.http_client not in HTTP_CLIENTS:
            problems.append(
                f"{where}: http_client {teacher.http_client!r} is not one of {', '.join(HTTP_CLIENTS)}"
            )
        reserved = sorted(RESERVED_BODY_FIELDS & set(teacher.params))
        if reserved:
            problems.append(
                f"{where}: params {reserved} are set by the harvester;"
                " use the matching --flags (e.g. --max-tokens, --samples) instead"
            )
    return problems


def _validate_base_url(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return [f"base URL {url!r} is invalid ({error})"]
    problems = []
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"base URL {url!r} must look like http://HOST:PORT/v1")
    if parts.username or parts.password:
        problems.append(
            "base URL contains credentials; remove them and pass the key through"
            " --api-key-env or --api-key-file"
        )
    if parts.query or parts.fragment:
        problems.append(f"base URL {parts.scheme}://{parts.hostname}:{port}{parts.path} must not have a query string or fragment")
    return problems

