"""Pure-Python reference for _core/stats.pyx: a route's counts as lists, buckets by bisect."""
from __future__ import annotations

import bisect

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NB = len(BUCKETS) + 1


class Model:
    def __init__(self):
        self.reset()

    def reset(self):
        self.classes = [0] * 6
        self.lat = [0] * NB
        self.ulat = [0] * NB
        self.lat_sum = self.ulat_sum = 0.0
        self.dirty = False

    def observe(self, status: int, seconds: float, upstream_seconds: float = -1.0) -> bool:
        self.classes[status // 100 if 100 <= status < 600 else 0] += 1
        self.lat[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.lat_sum += seconds
        if upstream_seconds >= 0:
            self.ulat[bisect.bisect_left(BUCKETS, upstream_seconds)] += 1
            self.ulat_sum += upstream_seconds
        was = self.dirty
        self.dirty = True
        return not was

    def flush(self, base: int) -> list[tuple[int, int]]:
        out = [(base + i, n) for i, n in enumerate(self.classes) if n]
        at = base + 6
        for counts, total in ((self.lat, self.lat_sum), (self.ulat, self.ulat_sum)):
            out += [(at + i, n) for i, n in enumerate(counts) if n]
            if sum(counts):
                out += [(at + NB, int(total * 1e6)), (at + NB + 1, sum(counts))]
            at += NB + 2
        self.reset()
        return out
