"""Hypothesis: the compiled router agrees with tests/models/router_model.py.

Routes are drawn from tiny alphabets (a few static words, params, catch-alls, three priorities,
overlapping exact and wildcard hosts, two methods) and most request paths are instances of the
drawn patterns, so several entries usually match one request and every tie-break rule is exercised.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastgate._core import router as core
from tests.models import router_model as model

SETTINGS = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WORDS = ["a", "b", "ab", ""]
HOSTS = [None, None, None, "a.com", "A.com", "b.a.com", "*.a.com", "*.com", "*.b.a.com", "[::1]"]
METHODS = [(), (), ("GET",), ("POST",), ("GET", "POST")]
PRIORITIES = [0, 0, 0, 1, -1, 2**70]
REQ_HOSTS = [b"", b"a.com", b"A.COM:8080", b"x.a.com", b"b.a.com", b"x.b.a.com", b"X.B.A.com:1", b"com",
             b".a.com", b"a.com:", b"[::1]:8000", b"[::1]", b"other.org", b"a.a.com", b"b.A.com", b":80"]
REQ_METHODS = [b"GET", b"POST", b"PUT"]
VALUES = ["a", "b", "x", "ab"]
TAILS = ["", "a", "a/b", "x/", "/"]


@st.composite
def patterns(draw):
    body = draw(st.lists(st.one_of(st.sampled_from(WORDS), st.just(None)), max_size=4))   # None = a param
    tail = draw(st.sampled_from([None, None, "*", "rest*"]))
    segs = [w if w is not None else f"{{p{i}}}" for i, w in enumerate(body)]
    if tail == "*":
        segs.append("*")
    elif tail:
        segs.append("{rest*}")
    if not segs:
        segs = [""]
    return "/" + "/".join(segs)


routes = st.lists(
    st.tuples(st.sampled_from(HOSTS), st.sampled_from(METHODS), patterns(), st.sampled_from(PRIORITIES)),
    min_size=1, max_size=12,
).map(lambda rs: [(h, m, p, prio, f"v{i}") for i, (h, m, p, prio) in enumerate(rs)])


@st.composite
def instance(draw, pattern):
    """A path that `pattern` matches (or nearly: a value may be empty, a tail may be missing)."""
    out = []
    for seg in pattern[1:].split("/"):
        if seg == "*" or seg.endswith("*}"):
            tail = draw(st.sampled_from(TAILS + [None]))
            if tail is None:
                return "/" + "/".join(out)
            out.append(tail)
        elif seg.startswith("{"):
            out.append(draw(st.sampled_from(VALUES + [""])))
        else:
            out.append(seg)
    return "/" + "/".join(out)


@st.composite
def requests(draw, entries):
    method = draw(st.sampled_from(REQ_METHODS))
    host = draw(st.sampled_from(REQ_HOSTS))
    if draw(st.integers(0, 4)):
        path = draw(instance(draw(st.sampled_from(entries))[2]))
    else:
        path = "/" + "/".join(draw(st.lists(st.sampled_from(WORDS + ["x"]), max_size=5)))
    return method, host, path.encode()


@settings(SETTINGS, max_examples=600)
@given(st.data(), routes)
def test_router_matches_model(data, entries):
    compiled = core.Router(entries)
    oracle = model.Router(entries)
    assert len(compiled) == len(oracle) == len(entries)
    hits = 0
    for _ in range(8):
        method, host, path = data.draw(requests(entries))
        expected = oracle.match(method, host, path)
        assert compiled.match(method, host, path) == expected, (method, host, path)
        hits += expected is not None
    event(f"{hits}/8 requests matched")


@settings(SETTINGS, max_examples=300)
@given(routes, st.binary(max_size=12), st.binary(max_size=12), st.sampled_from(REQ_METHODS + [b"", b"get"]))
def test_router_on_arbitrary_bytes(entries, host, tail, method):
    path = b"/" + tail
    assert core.Router(entries).match(method, host, path) == model.Router(entries).match(method, host, path)
    assert core.Router(entries).match(method, host, tail) == model.Router(entries).match(method, host, tail)


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except ValueError:
        return ("ValueError", None)


@settings(SETTINGS, max_examples=500)
@given(st.text(alphabet="/{}*ab_1.- ", max_size=12))
def test_parse_pattern_matches_model(pattern):
    assert _outcome(core.parse_pattern, pattern) == _outcome(model.parse_pattern, pattern)


@settings(SETTINGS, max_examples=500)
@given(st.text(alphabet="*.abAB1-_:[] ", max_size=10))
def test_host_validation_matches_model(host):
    def build(impl):
        return len(impl.Router([(host, (), "/", 0, 1)]))
    assert _outcome(build, core) == _outcome(build, model)


PATH_TOKENS = [b"/", b".", b"..", b"a", b"Z", b"~", b"-", b"%2e", b"%2E", b"%2f", b"%2F", b"%41", b"%7e",
               b"%7E", b"%3a", b"%25", b"2e", b"E", b"?"]
BAD_TOKENS = [b"%", b"%4", b"%g1", b"%e", b"#", b" ", b"\x00", b"\x80", b"\x7f"]
SEGMENTS = [b"", b".", b"..", b".", b"..", b"a", b"bc", b"...", b".a", b"%2e", b"%2E", b"%2e%2E", b".%2e",
            b"%2E.", b"%41", b"%7e", b"%2f", b"a%2Fb", b"-_~"]


def _check_normalize(path):
    expected = model.normalize_path(path)
    got = core.normalize_path(path)
    assert got == expected
    if expected == path:
        assert got is path
    if got is not None:
        assert core.normalize_path(got) == got          # idempotent
        assert got.startswith(b"/")
    event("invalid" if got is None else "unchanged" if got is path else "normalised")


@settings(SETTINGS, max_examples=1000)
@given(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8),
       st.sampled_from([b"/", b"/", b"/", b"/", b"", b"."]),
       st.one_of(st.none(), st.none(), st.none(), st.tuples(st.integers(0, 60), st.sampled_from(BAD_TOKENS))))
def test_normalize_path_dot_segments_match_model(segments, prefix, bad):
    path = prefix + b"/".join(segments)
    if bad is not None:
        at = bad[0] % (len(path) + 1)
        path = path[:at] + bad[1] + path[at:]
    _check_normalize(path)


@settings(SETTINGS, max_examples=1000)
@given(st.lists(st.sampled_from(PATH_TOKENS * 4 + BAD_TOKENS), max_size=14))
def test_normalize_path_encodings_match_model(tokens):
    _check_normalize(b"/" + b"".join(tokens))


@settings(SETTINGS, max_examples=500)
@given(st.binary(max_size=16))
def test_normalize_path_on_arbitrary_bytes(raw):
    for path in (raw, b"/" + raw):
        assert core.normalize_path(path) == model.normalize_path(path)


@pytest.mark.parametrize("n", [1, 3])
def test_model_and_core_agree_on_a_fixed_table(n):
    # a deterministic sanity check that runs even with hypothesis' example count turned down
    entries = [(None, (), "/a/{x}", 0, "ax"), ("*.a.com", (), "/*", 0, "wild"), (None, ("GET",), "/a/b", 0, "ab")] * n
    for req in [(b"GET", b"x.a.com", b"/a/b"), (b"POST", b"", b"/a/b"), (b"GET", b"", b"/a/b")]:
        assert core.Router(entries).match(*req) == model.Router(entries).match(*req)
