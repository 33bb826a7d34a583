"""Progress bar of a harvest on stderr, shown only on a terminal.

The bar is off when stderr is not a TTY (logs, pipes, CI) or with ``--no-progress``, so
redirected output never fills with control sequences. Its total is an estimate: prompt
lines (counted once by a fast byte scan, blank lines included) x teachers x samples.
Redraws are throttled by rich's own refresh thread, so updating per request is cheap.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from pipeline.config import HarvestConfig
from pipeline.harvest_rows import HarvestStats

_COUNT_CHUNK_BYTES = 1 << 20


def count_lines(path: Path) -> int:
    """Count newline-terminated lines (plus a last unterminated one) without decoding."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(_COUNT_CHUNK_BYTES):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


class HarvestProgress:
    """Context manager that shows and updates the bar, or does nothing when disabled."""

    def __init__(self, config: HarvestConfig, stats: HarvestStats):
        self.stats = stats
        self.enabled = config.progress and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._config = config

    def __enter__(self) -> HarvestProgress:
        if not self.enabled:
            return self
        lines = count_lines(self._config.prompts_path)
        if self._config.limit is not None:
            lines = min(lines, self._config.limit)
        total = lines * len(self._config.teachers) * self._config.samples
        self._progress = Progress(
            TextColumn("harvest"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task("harvest", total=total, detail="")
        self._progress.start()
        return self

    def update(self) -> None:
        if self._progress is None:
            return
        stats = self.stats
        detail = (
            f"stored {stats.responses}  failed {stats.failed}  cached {stats.cached}"
            f"  skipped {stats.skipped_stored}  retries {stats.retries}"
        )
        self._progress.update(self._task, completed=stats.resolved + stats.invalid_lines, detail=detail)

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self.update()
            self._progress.stop()
