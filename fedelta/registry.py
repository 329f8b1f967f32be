"""Named components selected by one config key: LoRA rules, aggregators (merge
operators among them), server optimizers, codecs, sparsity methods and tasks all
register the same way.

A registry maps each name a config may give to the component it selects; a name
it does not hold raises a :class:`~fedelta.config.ConfigError` naming the key and
the choices. A component declares what it can do as class attributes (flags) and
builds itself from a config (``from_config``), so the build layer asks components
instead of repeating their names, and adding one touches its own file and its
registry entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from fedelta.config import check_choice

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """The components ``key`` may select, by name, in registration order.

    Parameters
    ----------
    key : str
        The config key whose value is a name in this registry (``strategy.lora``).
    entries : iterable
        Components registered under their ``name`` attribute.
    """

    def __init__(self, key: str, entries: Iterable[T] = ()) -> None:
        self.key = key
        self._entries: dict[str, T] = {}
        self._summaries: dict[str, str] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: T, *, name: str | None = None, summary: str | None = None) -> T:
        """Add ``entry`` under ``name`` (default: its ``name`` attribute); usable as a
        class decorator. ``summary`` overrides the entry's own for this name (one class
        registered under several names, like the merge aggregators)."""
        name = name or entry.name
        if name in self._entries:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        self._entries[name] = entry
        self._summaries[name] = summary or getattr(entry, "summary", "")
        return entry

    def summary(self, name: str) -> str:
        """One line on what ``name`` does (the capability matrix and docs show it)."""
        self[name]
        return self._summaries[name]

    def __getitem__(self, name: str) -> T:
        check_choice(self.key, name, self._entries)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.key!r}, {list(self._entries)})"
