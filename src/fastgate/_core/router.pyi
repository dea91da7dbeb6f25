"""Route matching and request-path normalisation (compiled; see router.pyx)."""
from collections.abc import Iterable, Sequence
from typing import final

Entry = tuple[str | None, Sequence[str], str, int, object]
"""(host, methods, pattern, priority, value); an entry's index is its declaration order."""

@final
class Router:
    def __init__(self, entries: Iterable[Entry]) -> None:
        """Compile the entries; ValueError names the entry and its bad pattern, host or method."""
    def match(self, method: bytes, host: bytes, path: bytes) -> tuple[object, tuple[bytes, ...]] | None:
        """(value, params) of the winning entry, or None. `host` is the raw Host header value."""
    def __len__(self) -> int: ...

def parse_pattern(pattern: str) -> tuple[str, ...]:
    """The param names of `pattern` in order (a bare `*` is named "*"); ValueError if invalid."""

def normalize_path(path: bytes) -> bytes | None:
    """The normalised path, `path` itself when unchanged, or None when the request gets a 400."""
