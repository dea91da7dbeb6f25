"""Compiled forms of the commonest policy hooks (see hooks.pyx)."""
from collections.abc import Callable
from typing import final

from .proxy import Exchange
from .ratelimit import Limiter

KEY_KINDS: dict[str, int]

@final
class LocalGcra:
    """RateLimitPolicy.request for a token bucket on this host's counters."""
    def __init__(self, limiter: Limiter, rate: float, per_ns: int, burst: int, key_kind: str, prefix: bytes,
                 header: bytes, metric_allowed: bytes, metric_limited: bytes,
                 parts: tuple[bytes, bytes, bytes, bytes, bytes],
                 refuse: Callable[[Exchange, bytes, int], bytes]) -> None: ...
    def drain(self, pending: dict[bytes, int]) -> None:
        """Adds the decisions counted since the last drain to the worker's pending metrics."""
    def request(self, ex: Exchange) -> bytes | None:
        """None: allowed (the rate-limit fields added to the response); else the 429 to send."""

@final
class KeyAuth:
    """KeyAuthPolicy.request for one known key in the header; every other case is the policy's."""
    def __init__(self, header: bytes, by_hash: dict, directory: object | None,
                 policy_request: Callable[[Exchange], bytes | None]) -> None: ...
    def request(self, ex: Exchange) -> bytes | None: ...

@final
class JwtCached:
    """JwtPolicy.request when its verified-token cache answers; every other case is the policy's."""
    def __init__(self, header: bytes, bearer: bool, max_bytes: int, cache: object,
                 policy_request: Callable[[Exchange], object]) -> None: ...
    def request(self, ex: Exchange) -> None | object: ...

@final
class RedisLease:
    """RateLimitPolicy.request on Redis counters in lease mode while a lease has tokens."""
    def __init__(self, counters: object, key_kind: str, prefix: bytes, header: bytes, metric_allowed: bytes,
                 metric_limited: bytes, parts: tuple[bytes, bytes, bytes, bytes, bytes],
                 policy_request: Callable[[Exchange], object]) -> None: ...
    def drain(self, pending: dict[bytes, int]) -> None: ...
    def request(self, ex: Exchange) -> object: ...
