"""The compiled shared table and limiter, held against tests/models/ratelimit_model.py."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core.ratelimit import Limiter
from fastgate._core.shm import SharedTable
from tests.models.ratelimit_model import Model

S = 1_000_000_000
KEYS = st.sampled_from([b"a", b"b", b"rl:route:ip:127.0.0.1", b"\x00", b"x" * 300])

gcra_op = st.tuples(st.just("gcra"), KEYS, st.sampled_from([0.5, 1.0, 3.0, 7.5, 100.0, 1e6]),
                    st.sampled_from([S // 10, S, 60 * S]), st.integers(1, 20), st.integers(1, 4))
sliding_op = st.tuples(st.just("sliding_window"), KEYS, st.integers(1, 20), st.sampled_from([S // 10, S, 60 * S]),
                       st.integers(1, 4))
fixed_op = st.tuples(st.just("fixed_window"), KEYS, st.integers(1, 20), st.integers(0, 3),
                     st.sampled_from([S // 2, 10 * S]), st.integers(1, 4))
acquire_op = st.tuples(st.just("acquire"), KEYS, st.integers(1, 5), st.sampled_from([S, 30 * S]))
release_op = st.tuples(st.just("release"), KEYS)
add_op = st.tuples(st.just("add"), KEYS, st.integers(-5, 5), st.sampled_from([0, S, 10 * S]))
get_op = st.tuples(st.just("get"), KEYS)

# time moves forward by steps from 0 (a burst at one instant) to minutes
STEP = st.sampled_from([0, 0, 0, 1, 999, S // 1000, S // 10, S // 3, S, 7 * S, 61 * S, 3600 * S])


def _run(ops):
    table = SharedTable(4096)
    lim = Limiter(table)
    model = Model()
    now = 10**12  # an arbitrary CLOCK_MONOTONIC-like start
    for step, op in ops:
        now += step
        name, key, *args = op
        if name == "add":
            got, want = table.add(key, *args, now_ns=now), model.add(key, *args, now)
        elif name == "get":
            got, want = table.get(key, now_ns=now), model.get(key, now)
        elif name == "release":
            got, want = lim.release(key, now_ns=now), model.release(key, now)
        else:
            got = getattr(lim, name)(key, *args, now_ns=now)
            want = getattr(model, name)(key, *args, now)
        assert got == want, (name, key, args, now)
    assert table.full_events == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(STEP, st.one_of(gcra_op, sliding_op, fixed_op, acquire_op, release_op, add_op, get_op)),
                max_size=60))
def test_every_operation_matches_the_model(ops):
    _run(ops)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(STEP, gcra_op), min_size=1, max_size=80))
def test_gcra_matches_the_model(ops):
    _run(ops)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(STEP, sliding_op), min_size=1, max_size=80))
def test_sliding_window_matches_the_model(ops):
    _run(ops)


@settings(max_examples=150, deadline=None)
@given(rate=st.floats(0.1, 1000), per=st.sampled_from([S, 60 * S]), burst=st.integers(1, 50))
def test_a_fresh_key_allows_exactly_burst_at_once(rate, per, burst):
    lim = Limiter(SharedTable(64))
    now = 5 * 10**12
    got = [lim.gcra(b"k", rate, per, burst, now_ns=now) for _ in range(burst + 3)]
    assert [g[0] for g in got] == [True] * burst + [False] * 3
    assert [g[1] for g in got[:burst]] == list(range(burst - 1, -1, -1))
    t = max(1, int(per / rate))
    assert all(g[2] == t for g in got[burst:])  # one emission interval until the next token
    # after exactly that wait, one more passes and the next is refused again
    assert lim.gcra(b"k", rate, per, burst, now_ns=now + t)[0]
    assert not lim.gcra(b"k", rate, per, burst, now_ns=now + t)[0]


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(1, 40), window=st.sampled_from([S, 60 * S]), frac=st.floats(0, 0.999))
def test_sliding_window_retry_after_is_when_it_passes(limit, window, frac):
    """A refused request retried exactly `retry_after` later passes; one ns earlier it does not."""
    start = (10**13 // window) * window + int(frac * window)
    for _ in range(2):  # fill this window, then test from the next one (previous window weighs in)
        lim = Limiter(SharedTable(64))
        now = start
        while lim.sliding_window(b"k", limit, window, now_ns=now)[0]:
            pass
        allowed, remaining, retry, reset = lim.sliding_window(b"k", limit, window, now_ns=now)
        assert not allowed and remaining == 0 and retry > 0
        early = Limiter(SharedTable(64))
        while early.sliding_window(b"k", limit, window, now_ns=now)[0]:
            pass
        if retry > 1:
            assert not early.sliding_window(b"k", limit, window, now_ns=now + retry - 1)[0]
        assert lim.sliding_window(b"k", limit, window, now_ns=now + retry)[0]
        start += window


def test_values_expire_and_count_as_fresh():
    table = SharedTable(64)
    assert table.add(b"q", 5, ttl_ns=S, now_ns=10 * S) == 5
    assert table.get(b"q", now_ns=10 * S + S - 1) == 5
    assert table.get(b"q", now_ns=11 * S) == 0
    assert table.add(b"q", 1, now_ns=11 * S) == 1


def test_a_full_table_evicts_stale_keys_first_then_counts_full_events():
    table = SharedTable(1024)
    now = 100 * S
    for i in range(512):  # half full of keys that expire in 1 s
        table.add(b"old%d" % i, 1, ttl_ns=S, now_ns=now)
    assert table.full_events == 0 and table.used == 512
    later = now + 2 * S  # all stale now: new keys reuse their slots before empty ones
    for i in range(512):
        table.add(b"new%d" % i, 7, ttl_ns=3600 * S, now_ns=later)
    assert table.full_events == 0 and table.evictions > 0
    assert table.used < 1024
    # keep adding live keys until some key's probe window is all live: it evicts one, and says so
    live = [b"new%d" % i for i in range(512)]
    for i in range(5000):
        key = b"fill%d" % i
        table.add(key, 7, ttl_ns=3600 * S, now_ns=later)
        live.append(key)
        if table.full_events:
            break
    assert table.full_events == 1
    assert table.get(live[-1], now_ns=later) == 7
    assert sum(table.get(k, now_ns=later) == 7 for k in live) == len(live) - 1


def test_capacity_rounds_up_and_bad_arguments_are_refused():
    assert SharedTable(100).capacity == 128
    assert SharedTable(1).capacity == 64
    lim = Limiter(SharedTable(64))
    for bad in [dict(rate=0), dict(per_ns=0), dict(burst=0), dict(cost=0)]:
        args = dict(rate=1.0, per_ns=S, burst=1, cost=1) | bad
        try:
            lim.gcra(b"k", args["rate"], args["per_ns"], args["burst"], args["cost"])
        except ValueError as exc:
            assert next(iter(bad)) in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
    try:
        SharedTable(0)
    except ValueError:
        pass
    else:
        raise AssertionError("capacity 0 was accepted")
