"""Bounded least-recently-used cache, used by the harvester to dedupe requests in a run.

The harvester adds a request_id after its response is stored, with the finish reason.
A later duplicate prompt line (same request_id) is then not sent: it counts as
"cached" when the stored response finished with ``stop``, and as already stored when
it did not (``length``, ``content_filter``, null content), so an incomplete response
is never served as a good result. Failures are not added, so their duplicates are sent.

The cache is bounded, so memory does not grow with the number of prompts. A duplicate
that arrives after its entry was evicted is sent again, and the store writer then
skips its row because that request_id is already stored in the run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A dict with at most ``max_entries`` entries that drops the least recently used."""

    def __init__(self, max_entries: int):
        if max_entries < 0:
            raise ValueError(f"max_entries must be 0 or more, got {max_entries}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """Return the value of ``key`` and mark it most recently used, or ``None``."""
        try:
            value = self._entries[key]
        except KeyError:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        """Store ``value`` under ``key``, evicting the least recently used entry if full."""
        if self.max_entries == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1
