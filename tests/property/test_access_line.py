"""The data plane's access-log lines (_core/proxy.access_line, formatted in C) against the
reference: accesslog.AccessLog.record + flush, which formats the same row with msgspec."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core.proxy import access_line
from fastgate.accesslog import AccessLog

# any byte: quotes, backslashes, controls, Latin-1; sometimes long (the line outgrows the stack buffer)
# and mostly plain ASCII with the bytes that need escaping scattered at any offset (the formatter
# copies runs of plain bytes eight at a time, then byte by byte from the first that is not)
PIECES = st.sampled_from([b"a", b"Z", b"0", b"/", b"-", b"abcdefgh", b"0123456789abcdef", b'"', b"\\", b"\x00",
                          b"\x1f", b"\t", b"\x7f", b"\x80", b"\xc3\xa9", b"\xff"])
TEXT = st.binary(max_size=24) | st.binary(min_size=300, max_size=700) | st.lists(PIECES, max_size=40).map(b"".join)
NAME = st.none() | st.text(max_size=12)  # route, api, consumer: any str (UTF-8 out)
MS = st.floats(min_value=0, max_value=1e7) | st.sampled_from([1e300, float("inf"), float("nan")])


@settings(max_examples=300, deadline=None)
@given(t=st.floats(min_value=0, max_value=4e9, allow_nan=False), rid=TEXT, trace=st.none() | TEXT,
       pid=st.integers(1, 2**22), client=TEXT, method=TEXT, path=TEXT, route=NAME, api=NAME, consumer=NAME,
       status=st.integers(100, 599), req_b=st.integers(0, 2**40), up_b=st.none() | st.integers(0, 2**40),
       resp_b=st.none() | st.integers(0, 2**40), gw=MS, up=st.none() | MS)
def test_access_line_matches_the_reference(tmp_path_factory, t, rid, trace, pid, client, method, path, route,
                                           api, consumer, status, req_b, up_b, resp_b, gw, up):
    compiled = access_line(t, rid, trace, pid, client, method, path, route, api, consumer, status, req_b,
                           -1 if up_b is None else up_b, -1 if resp_b is None else resp_b, gw,
                           -1.0 if up is None else up)
    assert compiled.endswith(b"\n") and compiled.count(b"\n") == 1
    out = tmp_path_factory.mktemp("al") / "a.log"
    ref = AccessLog(str(out))
    ref.pid = pid
    ref.record((t, rid.decode("latin-1"), trace.decode("latin-1") if trace is not None else None, 0,
                client.decode("latin-1"), method.decode("latin-1"), path.decode("latin-1"), route, api, consumer,
                status, req_b, up_b, resp_b, round(gw, 3), round(up, 3) if up is not None else None), status)
    ref.close()
    mine, theirs = json.loads(compiled), json.loads(out.read_bytes())
    for k in ("gateway_ms", "upstream_ms"):  # a time too long to write (1e300 ms) is null here
        if theirs[k] is not None and theirs[k] >= 1e60:
            assert mine[k] is None
            mine[k] = theirs[k]
    assert mine == theirs
    assert list(mine) == list(theirs)  # the same field order


def test_lines_added_are_written_in_one_batch(tmp_path):
    out = tmp_path / "a.log"
    log = AccessLog(str(out))
    lines = [access_line(1.5e9, b"r%d" % i, None, 7, b"127.0.0.1", b"GET", b"/x", "r", None, None, 200, 0, 10, -1,
                         0.25, 0.125) for i in range(3)]
    for line in lines:
        log.add(line)
    assert out.read_bytes() == b""  # kept until the tick (or BATCH lines)
    log.flush()
    assert out.read_bytes() == b"".join(lines)
    first = json.loads(lines[0])
    assert first["ts"] == "2017-07-14T02:40:00.000Z" and first["gateway_ms"] == 0.25 and first["response_bytes"] is None
    log.close()


# --- the usage ledger's per-request count, compiled (proxy.count_usage) vs control/analytics.py -----
class Who:
    def __init__(self, username, plan):
        self.username, self.plan = username, plan


class Where:
    def __init__(self, api):
        self.api = api


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(490000, 490003), st.none() | st.sampled_from(["ann", "bob"]),
                          st.sampled_from([None, "", "gold"]), st.none() | st.sampled_from([None, "", "billing"]),
                          st.integers(100, 599), st.floats(0, 100, allow_nan=False)), max_size=40))
def test_count_usage_matches_the_reference(requests):
    from fastgate._core.proxy import count_usage
    from fastgate.control.analytics import count_usage as reference

    got, want = {}, {}
    for hour, user, plan, api, status, seconds in requests:
        consumer = Who(user, plan) if user is not None else None
        route = Where(api) if api is not None else None
        count_usage(got, hour, consumer, route, status, seconds)
        reference(want, hour, consumer, route, status, seconds)
    assert got == want


def test_the_widest_numbers_fit():
    """Every integer at its widest (20 characters) and the widest times: the whole line is written."""
    big = -(2**63)
    line = access_line(4e9, b"r", None, big, b"c", b"GET", b"/", None, None, None, big, 2**63 - 1, 2**63 - 1,
                       2**63 - 1, 1e15, 1e15)
    doc = json.loads(line)
    assert doc["worker"] == big and doc["status"] == big and doc["response_bytes"] == 2**63 - 1
    assert doc["gateway_ms"] == doc["upstream_ms"] == 1e15


def test_times_on_a_half_thousandth_round_as_round_does():
    """Values whose thousandths sit on (or a hair from) a half: the digits written are round(v, 3)'s
    (these take the careful path, the rest the fast one)."""
    values = [0.0005, 1.0005, 2.675, 1234.5675, 0.0015, 9999999.9995, 0.1235, 5e-324, 0.0, 123.456,
              1.00049999, 1.00050001, 9999999.999]
    for v in values:
        line = access_line(1.5e9, b"r", None, 1, b"c", b"GET", b"/", None, None, None, 200, 0, -1, -1, v, v)
        doc = json.loads(line)
        assert doc["gateway_ms"] == doc["upstream_ms"] == round(v, 3), v


class Recorder:
    """A usage recorder's interface to the data plane: pending, hour, and the batch token replaced
    with pending (control/analytics.UsageRecorder.flush, usage_redis.RedisUsageRecorder._take)."""

    def __init__(self):
        self.pending, self.batch, self.hour = {}, object(), 490000

    def take(self, failed: bool) -> dict:
        batch = self.pending
        self.pending, self.batch = {}, object()
        if failed:  # UsageRecorder.flush when the store refuses: back into pending, merged
            from fastgate.control.analytics import merge_back

            merge_back(self.pending, batch)
            return {}
        return batch


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("req"), st.sampled_from(["ann", "bob"]), st.sampled_from([None, "gold", "silver"]),
              st.integers(0, 2), st.integers(100, 599), st.floats(0, 100, allow_nan=False)),
    st.tuples(st.just("take"), st.booleans()),
    st.tuples(st.just("hour"), st.integers(490000, 490002))), max_size=60))
def test_the_data_planes_remembered_usage_counts_add_up_to_the_reference(ops):
    """proxy._count_usage_route keeps, per route and username, the counts list it last found; over
    requests, hour changes, batches taken (written, or refused and merged back) and a plan changing
    under a username, what it counted must add up to count_usage's own counts."""
    from fastgate._core.proxy import RouteCore, count_usage, count_usage_route

    routes = []
    for api in (None, "", "billing"):
        r = RouteCore()
        r.api = api
        routes.append(r)
    plans = {"gold": "gold", "silver": "silver"}
    got, want = Recorder(), Recorder()
    got_total, want_total = {}, {}

    def add(total, batch):
        for k, c in batch.items():
            t = total.setdefault(k, [0, 0, 0])
            for i in range(3):
                t[i] += c[i]

    for op in ops:
        if op[0] == "req":
            _, user, plan, ri, status, seconds = op
            # a plan string made anew now and then: the same plan, not the same object
            plan = plans[plan] if plan is not None and status % 2 else (plan[:1] + plan[1:] if plan else None)
            consumer = Who(user, plan)
            count_usage_route(got, consumer, routes[ri], status, seconds)
            count_usage(want.pending, want.hour, consumer, routes[ri], status, seconds)
        elif op[0] == "take":
            add(got_total, got.take(op[1]))
            add(want_total, want.take(op[1]))
        else:
            got.hour = want.hour = op[1] + 0  # a new int object, as the recorders' tick makes
    add(got_total, got.take(False))
    add(want_total, want.take(False))
    assert got_total == want_total


def test_a_route_forgets_the_usage_counts_of_a_batch_taken():
    """What a route remembers is for the recorder's current batch only: once the batch is taken,
    the next request starts afresh, so the route never holds more than one batch's consumers."""
    from fastgate._core.proxy import RouteCore, count_usage_route

    route, rec = RouteCore(), Recorder()
    for user in ("ann", "bob", "cy"):
        count_usage_route(rec, Who(user, None), route, 200, 0.5)
    assert len(route.usage_slots) == 3
    assert rec.take(False) == {(490000, u, "", ""): [1, 0, 500000] for u in ("ann", "bob", "cy")}
    count_usage_route(rec, Who("ann", None), route, 503, 0.25)
    assert list(route.usage_slots) == ["ann"]
    assert rec.pending == {(490000, "ann", "", ""): [1, 1, 250000]}


def test_the_line_list_survives_every_flush(tmp_path):
    """The data plane holds AccessLog.lines itself (WorkerState.access_log): a flush, by BATCH or
    by the tick, must empty that very list, never put a new one in its place."""
    from fastgate.accesslog import BATCH

    log = AccessLog(str(tmp_path / "a.log"))
    held = log.lines
    for i in range(BATCH + 3):  # one flush by BATCH on the way
        log.add(b'{"n":%d}\n' % i)
    assert log.lines is held and len(held) == 3
    log.flush()
    assert log.lines is held and held == []
    assert [json.loads(x)["n"] for x in (tmp_path / "a.log").read_text().splitlines()] == list(range(BATCH + 3))
    log.close()
