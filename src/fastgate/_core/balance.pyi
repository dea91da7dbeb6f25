"""Target health and load balancers (compiled; see balance.pyx)."""
from typing import Any

HASH_ON: dict[str, int]
BALANCERS: dict[str, type[Balancer]]

def key_hash(data: bytes) -> int:
    """CRC-32 then MurmurHash3's finalizer: a 32-bit hash of a consistent-hash key."""

class Health:
    address: str
    active_up: bool
    act_ok: int
    act_fail: int
    failures: int
    max_failures: int
    eject_for: float
    ejected_until: float
    breaker: int  # 0 closed, 1 open, 2 half-open
    b_window: float
    b_min: int
    b_ratio: float
    b_open_for: float
    b_start: float
    b_total: int
    b_failed: int
    b_until: float
    b_probe: bool
    fail_statuses: frozenset[int]
    def __init__(self, address: str, passive: Any = None, breaker: Any = None) -> None: ...
    def available(self, now: float) -> bool: ...
    def on_pick(self) -> None: ...
    def report(self, ok: bool, now: float) -> None: ...
    def active_result(self, ok: bool, healthy_threshold: int, unhealthy_threshold: int) -> None: ...
    def failing_status(self, status: int) -> bool: ...
    def snapshot(self, now: float) -> dict[str, Any]: ...

class Peer:
    weight: int
    active: int
    health: Health

class Balancer:
    targets: list[Peer]
    def __init__(self, targets: list[Peer]) -> None: ...
    def seed(self, seed: int) -> None: ...
    def pick(self, key: bytes | None, now: float, exclude: tuple[Peer, ...] = ()) -> Peer | None: ...

class RoundRobin(Balancer): ...
class LeastConnections(Balancer): ...
class PowerOfTwo(Balancer): ...
class WeightedRandom(Balancer): ...
class ConsistentHash(Balancer): ...

class UpstreamCore:
    name: str
    targets: list[Any]
    balancer: Balancer
    hash_on: int
    hash_key: bytes
    connect_timeout: float
    read_timeout: float
    write_timeout: float
    total_timeout: float
    retries: int
