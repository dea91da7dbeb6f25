"""The compiled target health and balancers (_core/balance.pyx), held against
tests/models/balance_model.py: the same targets, the same sequence of picks (each followed by the
pick's on_pick, as the data plane does), outcome reports, active-check results and load changes,
and the same clock. Deterministic balancers must pick the same target every time; the random ones
must pick among the targets the model finds available (p2c: the less loaded of two). After every
step the two agree on every target's health state."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastgate._core import balance
from tests.models import balance_model as model

DETERMINISTIC = ["round_robin", "least_connections", "consistent_hash"]
RANDOM = ["p2c", "random"]
MODEL_BALANCERS = {"round_robin": model.RoundRobin, "least_connections": model.LeastConnections,
                   "p2c": model.PowerOfTwo, "random": model.WeightedRandom,
                   "consistent_hash": model.ConsistentHash}


class Peer(balance.Peer):
    """A compiled balancer's target, as proxy.Target is (it adds the address and the pool)."""

    def __init__(self, address, weight, health):
        self.address, self.weight, self.health, self.active = address, weight, health, 0


class ModelTarget:
    def __init__(self, address, weight, health):
        self.address, self.weight, self.health, self.active = address, weight, health, 0


def health_state(h, compiled: bool) -> tuple:
    ok, fail = (h.act_ok, h.act_fail) if compiled else (h._act_ok, h._act_fail)
    return (h.active_up, ok, fail, h.failures, h.ejected_until, h.breaker, h.b_start, h.b_total, h.b_failed,
            h.b_until, h.b_probe)


PASSIVE = st.one_of(st.none(), st.builds(
    SimpleNamespace, max_failures=st.integers(0, 3), eject_for=st.sampled_from([0.0, 0.5, 2.0, 30.0]),
    failure_statuses=st.lists(st.sampled_from([500, 502, 503, 504, 429]), max_size=3)))
BREAKER = st.one_of(st.none(), st.builds(
    SimpleNamespace, window=st.sampled_from([1.0, 5.0, 10.0]), min_requests=st.integers(1, 4),
    failure_ratio=st.sampled_from([0.25, 0.5, 1.0]), open_for=st.sampled_from([0.0, 1.0, 5.0])))
WEIGHTS = st.lists(st.sampled_from([0, 1, 1, 2, 3, 50, 100, 300]), min_size=1, max_size=6)
STEP = st.sampled_from([0.0, 0.0, 0.25, 1.0, 3.0, 12.0])
OP = st.one_of(
    st.tuples(st.just("pick"), st.one_of(st.none(), st.binary(max_size=6)), st.integers(0, 63), STEP),
    st.tuples(st.just("report"), st.integers(0, 5), st.booleans(), STEP),
    st.tuples(st.just("active"), st.integers(0, 5), st.booleans(), st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.just("load"), st.integers(0, 5), st.integers(-2, 3)),
)


def build(kind, weights, passive, breaker):
    compiled = [Peer(f"10.0.0.{i}:80", w, balance.Health(f"10.0.0.{i}:80", passive, breaker))
                for i, w in enumerate(weights)]
    reference = [ModelTarget(f"10.0.0.{i}:80", w, model.TargetHealth(f"10.0.0.{i}:80", passive, breaker))
                 for i, w in enumerate(weights)]
    return compiled, balance.BALANCERS[kind](compiled), reference, MODEL_BALANCERS[kind](reference)


def run(kind, weights, passive, breaker, ops):
    compiled, cb, reference, mb = build(kind, weights, passive, breaker)
    cb.seed(12345)
    index = {id(t): i for i, t in enumerate(compiled)}
    now = 100.0
    picks = 0
    for op in ops:
        if op[0] == "pick":
            _, key, mask, step = op
            now += step
            cex = tuple(t for i, t in enumerate(compiled) if mask >> i & 1)
            mex = tuple(t for i, t in enumerate(reference) if mask >> i & 1)
            got = cb.pick(key, now, cex) if cex else cb.pick(key, now)
            want = mb.pick(key, now, mex)
            gi = None if got is None else index[id(got)]
            if kind in DETERMINISTIC:
                assert gi == (None if want is None else reference.index(want)), op
            else:
                up = [i for i, t in enumerate(reference) if t.weight > 0 and t.health.available(now)
                      and t not in mex]
                assert (gi is None) == (not up) and (gi is None or gi in up), (op, gi, up)
                if kind == "p2c" and len(up) == 2:
                    loads = [(reference[i].active + 1) / reference[i].weight for i in up]
                    if loads[0] != loads[1]:
                        assert gi == up[loads.index(min(loads))]
            if gi is not None:
                picks += 1
                compiled[gi].health.on_pick()
                reference[gi].health.on_pick()
        elif op[0] == "report":
            _, i, ok, step = op
            now += step
            if i < len(weights):
                compiled[i].health.report(ok, now)
                reference[i].health.report(ok, now)
        elif op[0] == "active":
            _, i, ok, healthy, unhealthy = op
            if i < len(weights):
                compiled[i].health.active_result(ok, healthy, unhealthy)
                reference[i].health.active_result(ok, healthy, unhealthy)
        else:
            _, i, delta = op
            if i < len(weights):
                compiled[i].active = reference[i].active = max(0, compiled[i].active + delta)
        for c, r in zip(compiled, reference, strict=True):
            assert health_state(c.health, True) == health_state(r.health, False), op
            assert c.health.available(now) == r.health.available(now)


@pytest.mark.parametrize("kind", DETERMINISTIC + RANDOM)
@given(weights=WEIGHTS, passive=PASSIVE, breaker=BREAKER, ops=st.lists(OP, max_size=40))
def test_balancer_and_health_match_the_model(kind, weights, passive, breaker, ops):
    run(kind, weights, passive, breaker, ops)


@given(passive=PASSIVE, status=st.integers(-5, 1200))
def test_failing_status_is_membership_in_fail_statuses(passive, status):
    h = balance.Health("a:1", passive)
    assert h.failing_status(status) == (status in model.TargetHealth("a:1", passive).fail_statuses)


@given(st.binary(max_size=40))
def test_key_hash_matches_the_model(data):
    assert balance.key_hash(data) == model.key_hash(data)


def shares(kind, weights, n=30_000, loads=None):
    targets = [Peer(f"10.0.0.{i}:80", w, balance.Health(f"10.0.0.{i}:80")) for i, w in enumerate(weights)]
    for t, load in zip(targets, loads or [0] * len(targets), strict=True):
        t.active = load
    b = balance.BALANCERS[kind](targets)
    b.seed(7)
    counts = Counter(targets.index(b.pick(None, 0.0)) for _ in range(n))
    return [counts[i] / n for i in range(len(weights))]


def test_weighted_random_follows_the_weights():
    got = shares("random", [1, 2, 7])
    assert got == pytest.approx([0.1, 0.2, 0.7], abs=0.015)


def test_p2c_spreads_equal_loads_evenly_and_avoids_the_busy_target():
    assert shares("p2c", [1, 1, 1, 1]) == pytest.approx([0.25] * 4, abs=0.015)
    # one target far busier: it loses every comparison, so it is never picked
    busy = shares("p2c", [1, 1, 1], loads=[0, 0, 50])
    assert busy[2] == 0 and busy[0] == pytest.approx(0.5, abs=0.02)


def test_consistent_hash_keeps_a_key_on_its_target_and_walks_past_a_down_one():
    targets = [Peer(f"10.0.0.{i}:80", 100, balance.Health(f"10.0.0.{i}:80")) for i in range(3)]
    ring = balance.ConsistentHash(targets)
    first = {k: ring.pick(k, 0.0) for k in (b"alice", b"bob", b"carol", b"dave", b"erin")}
    assert all(ring.pick(k, 1.0) is t for k, t in first.items())
    down = first[b"alice"]
    down.health.active_result(False, 1, 1)
    moved = ring.pick(b"alice", 2.0)
    assert moved is not None and moved is not down
    assert all(ring.pick(k, 2.0) is t for k, t in first.items() if t is not down)


def test_empty_and_zero_weight_upstreams_pick_nothing():
    for kind in balance.BALANCERS:
        assert balance.BALANCERS[kind]([Peer("a:1", 0, balance.Health("a:1"))]).pick(b"k", 0.0) is None
        assert balance.BALANCERS[kind]([]).pick(None, 0.0) is None
