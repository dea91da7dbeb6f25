"""The typed part of a route's policy chain (compiled; see chain.pyx)."""
from typing import Any

class ChainCore:
    active: bool
    request: tuple[Any, ...]
    request_names: tuple[str, ...]
    body: tuple[Any, ...]
    response: tuple[Any, ...]
    response_end: tuple[Any, ...]
    done: tuple[Any, ...]
    drops: frozenset[bytes]
    body_limit: int
    policies: tuple[Any, ...]
