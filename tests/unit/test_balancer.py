"""The ring's hash spreads keys that differ in a character or two (user1, user2, ...)."""
from __future__ import annotations

import bisect
import random
import zlib

from fastgate._core.balance import key_hash

NAMES = [f"user{i}".encode() for i in range(16)]


def owners(hash_fn, ports) -> set[int]:
    """The targets (by port) that 16 sequential names pick on a two-target ring, as ConsistentHash
    builds it (160 points per target)."""
    ring = sorted((hash_fn(f"127.0.0.1:{p}#{i}".encode()), p) for p in ports for i in range(160))
    points = [h for h, _p in ring]
    return {ring[bisect.bisect_left(points, hash_fn(n)) % len(ring)][1] for n in NAMES}


def test_sequential_keys_spread_over_both_targets_of_every_ring():
    rng = random.Random(7)
    rings = [rng.sample(range(20000, 60000), 2) for _ in range(300)]
    assert all(len(owners(key_hash, ports)) == 2 for ports in rings)
    # CRC-32 alone (linear) put all 16 on one target in some of these very rings
    assert any(len(owners(zlib.crc32, ports)) == 1 for ports in rings)


def test_key_hash_is_32_bits_and_stable():
    assert key_hash(b"user1") == key_hash(b"user1") and 0 <= key_hash(b"user1") < 2**32
    assert len({key_hash(n) for n in NAMES}) == len(NAMES)
