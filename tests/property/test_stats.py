"""The compiled per-route counters (_core/stats.pyx), held against tests/models/stats_model.py."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fastgate import metrics
from fastgate._core.stats import BUCKETS, RouteStats
from tests.models.stats_model import BUCKETS as MODEL_BUCKETS
from tests.models.stats_model import Model

# latencies around every bucket bound (equal to a bound is that bucket: bisect_left), and beyond
SECONDS = st.one_of(st.sampled_from(BUCKETS), st.floats(0, 30, allow_nan=False),
                    st.sampled_from([0.0, 1e-9, 10.000001, 1e6]))
UPSTREAM = st.one_of(st.just(-1.0), SECONDS)
STATUS = st.one_of(st.integers(100, 599), st.sampled_from([0, 99, 600, 999]))
OP = st.one_of(st.tuples(st.just("observe"), STATUS, SECONDS, UPSTREAM),
               st.tuples(st.just("flush"), st.integers(0, 10_000)))


def test_buckets_are_the_metrics_buckets():
    assert BUCKETS == MODEL_BUCKETS == metrics.BUCKETS
    assert metrics.RECORD == 6 + 2 * (len(BUCKETS) + 1 + 2)


@given(st.lists(OP, max_size=60))
def test_route_stats_match_the_model(ops):
    rs, model = RouteStats("r"), Model()
    for op in ops:
        if op[0] == "observe":
            assert rs.observe(*op[1:]) == model.observe(*op[1:])
        else:
            got: list = []
            rs.flush(lambda i, n, got=got: got.append((i, n)), op[1])
            assert got == model.flush(op[1])
        assert rs.classes == model.classes and rs.lat == model.lat and rs.ulat == model.ulat
        assert rs.lat_sum == model.lat_sum and rs.ulat_sum == model.ulat_sum and rs.dirty == model.dirty
