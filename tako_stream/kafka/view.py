"""A keyed topic folded into memory: the latest value per key, tombstones deleting, bounded.

Compacted topics keyed by id (the DLQ, control, status and result topics, the breaker's
changelog) all read the same way: a record replaces the key's value, a record with no value
deletes it, an unreadable value is skipped.  ``keep`` bounds the entries: beyond it the least
recently written key is forgotten, so a view's memory does not grow with its topic.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

V = TypeVar("V")


class KeyedView(Generic[V]):
    """Latest value per key; ``parse`` turns a record's value into ``V`` (or raises ValueError)."""

    def __init__(
        self,
        parse: Callable[[bytes], V],
        *,
        keep: int | None = None,
        name: str = "view",
        key_of: Callable[[V], str] | None = None,
    ) -> None:
        """``key_of`` files a value under the id it names rather than under the record's key
        (messages carry their own id, and a producer may key them otherwise or not at all)."""
        self._parse = parse
        self._key_of = key_of
        self._keep = keep
        self._name = name
        self._items: OrderedDict[str, V] = OrderedDict()

    def apply(self, key: bytes | None, value: bytes | None) -> V | None:
        """Fold one record in (``tako_stream.kafka.reader.tail`` calls this); the new value."""
        name = key.decode("utf-8", "replace") if key is not None else None
        if value is None:
            if name is not None:
                self.remove(name)
            return None
        try:
            parsed = self._parse(value)
        except ValueError:
            log.warning(
                "%s: skipping an unreadable record (key %r)", self._name, (name or "")[:200]
            )
            return None
        name = self._key_of(parsed) if self._key_of is not None else name
        if name is None:
            return None
        self.put(name, parsed)
        return parsed

    def put(self, key: str, value: V) -> None:
        """Write ``value`` as the newest entry, forgetting the oldest beyond ``keep``."""
        self._items.pop(key, None)
        self._items[key] = value
        while self._keep is not None and len(self._items) > self._keep:
            self._items.popitem(last=False)

    def remove(self, key: str) -> V | None:
        return self._items.pop(key, None)

    def get(self, key: str) -> V | None:
        return self._items.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def values(self) -> list[V]:
        """Oldest write first."""
        return list(self._items.values())
