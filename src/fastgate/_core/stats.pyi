"""Per-route request counts of one worker (compiled; see stats.pyx)."""
from collections.abc import Callable
from typing import final

BUCKETS: tuple[float, ...]

@final
class RouteStats:
    name: str
    lat_sum: float
    ulat_sum: float
    dirty: bool
    def __init__(self, route: str) -> None: ...
    def observe(self, status: int, seconds: float, upstream_seconds: float = -1.0) -> bool:
        """Count one answered request; True when this made the stats dirty."""
    @property
    def classes(self) -> list[int]: ...
    @property
    def lat(self) -> list[int]: ...
    @property
    def ulat(self) -> list[int]: ...
    def reset(self) -> None: ...
    def flush(self, add: Callable[[int, int], object], base: int) -> None:
        """add(index, n) for each non-zero count of the route's record at `base`, then reset."""
