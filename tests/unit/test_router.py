"""Router, parse_pattern and normalize_path by example. Most tests run on both the compiled module
("core") and the reference model ("model"), so the examples also pin the model down."""
from __future__ import annotations

import importlib.machinery

import pytest

from fastgate._core import router as core
from tests.models import router_model as model


@pytest.fixture(params=[model, core], ids=["model", "core"])
def impl(request):
    return request.param


def one(impl, pattern, host=None, methods=(), priority=0):
    return impl.Router([(host, methods, pattern, priority, "v")])


def test_router_is_compiled():
    assert core.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


# --- patterns ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "pattern, names",
    [
        ("/", ()),
        ("/a/b", ()),
        ("/u/{id}", ("id",)),
        ("/u/{id}/f/{rest*}", ("id", "rest")),
        ("/s/*", ("*",)),
        ("/*", ("*",)),
        ("/{a}/{b}/{c_1}", ("a", "b", "c_1")),
        ("/{_x}//{Y9}/", ("_x", "Y9")),
        ("/a.b/~c-d/%2F", ()),
    ],
)
def test_parse_pattern(impl, pattern, names):
    assert impl.parse_pattern(pattern) == names


@pytest.mark.parametrize(
    "pattern, fragment",
    [
        ("", "must start with '/'"),
        ("a/b", "must start with '/'"),
        ("/file.{ext}", "mixes text"),
        ("/a{b}c", "mixes text"),
        ("/a*", "mixes text"),
        ("/{}", "parameter name ''"),
        ("/{1x}", "parameter name '1x'"),
        ("/{a-b}", "parameter name 'a-b'"),
        ("/{*}", "parameter name ''"),
        ("/{a**}", "parameter name 'a*'"),
        ("/{ a }", "parameter name ' a '"),
        ("/*/a", "must be the last segment"),
        ("/{rest*}/a", "must be the last segment"),
        ("/{a}/{a}", "duplicate parameter name 'a'"),
        ("/{a}/{a*}", "duplicate parameter name 'a'"),
        ("/{a", "mixes text"),
        ("/a}", "mixes text"),
    ],
)
def test_invalid_patterns(impl, pattern, fragment):
    with pytest.raises(ValueError, match="invalid route pattern") as ei:
        impl.parse_pattern(pattern)
    assert repr(pattern) in str(ei.value)
    if impl is core:
        assert fragment in str(ei.value)
    with pytest.raises(ValueError, match=r"route entry 1: invalid route pattern") as ei:
        impl.Router([(None, (), "/ok", 0, 1), (None, (), pattern, 0, 2)])
    assert repr(pattern) in str(ei.value)


def test_pattern_must_be_str():
    with pytest.raises(TypeError, match="must be a str"):
        core.parse_pattern(b"/a")


def test_static_and_empty_segments_are_exact(impl):
    r = impl.Router([(None, (), "/a/", 0, "slash"), (None, (), "/a", 0, "bare"), (None, (), "/a//b", 0, "gap")])
    assert r.match(b"GET", b"", b"/a/") == ("slash", ())
    assert r.match(b"GET", b"", b"/a") == ("bare", ())
    assert r.match(b"GET", b"", b"/a//b") == ("gap", ())
    assert r.match(b"GET", b"", b"/a/b") is None
    assert r.match(b"GET", b"", b"/A") is None
    assert r.match(b"GET", b"", b"a") is None
    assert r.match(b"GET", b"", b"") is None


def test_root(impl):
    r = one(impl, "/")
    assert r.match(b"GET", b"", b"/") == ("v", ())
    assert r.match(b"GET", b"", b"//") is None


def test_param_matches_one_nonempty_segment(impl):
    r = one(impl, "/u/{id}/x")
    assert r.match(b"GET", b"", b"/u/42/x") == ("v", (b"42",))
    assert r.match(b"GET", b"", b"/u/%2F%20\xff/x") == ("v", (b"%2F%20\xff",))
    assert r.match(b"GET", b"", b"/u//x") is None
    assert r.match(b"GET", b"", b"/u/4/2/x") is None
    assert r.match(b"GET", b"", b"/u/42") is None


def test_catch_all(impl):
    for pattern in ("/static/*", "/static/{rest*}"):
        r = one(impl, pattern)
        assert r.match(b"GET", b"", b"/static/") == ("v", (b"",))
        assert r.match(b"GET", b"", b"/static/a") == ("v", (b"a",))
        assert r.match(b"GET", b"", b"/static/a/b/") == ("v", (b"a/b/",))
        assert r.match(b"GET", b"", b"/static") is None
        assert r.match(b"GET", b"", b"/staticx/a") is None
    r = one(impl, "/*")
    assert r.match(b"GET", b"", b"/") == ("v", (b"",))
    assert r.match(b"GET", b"", b"/a//b") == ("v", (b"a//b",))
    r = one(impl, "/u/{id}/f/{rest*}")
    assert r.match(b"GET", b"", b"/u/7/f/a/b") == ("v", (b"7", b"a/b"))


def test_params_are_returned_in_pattern_order(impl):
    r = one(impl, "/{z}/{a}/{m*}")
    assert r.match(b"GET", b"", b"/1/2/3/4") == ("v", (b"1", b"2", b"3/4"))


# --- hosts ------------------------------------------------------------------------------------

def test_exact_host_is_case_insensitive_and_ignores_the_port(impl):
    r = one(impl, "/", host="Api.Example.com")
    for host in (b"api.example.com", b"API.EXAMPLE.COM", b"api.example.com:8080", b"api.example.com:"):
        assert r.match(b"GET", host, b"/") == ("v", ()), host
    for host in (b"", b"example.com", b"x.api.example.com", b"api.example.com.", b"api.example.co"):
        assert r.match(b"GET", host, b"/") is None, host


def test_wildcard_host(impl):
    r = one(impl, "/", host="*.example.com")
    for host in (b"a.example.com", b"a.b.example.com", b"A.EXAMPLE.com:443", b"-.example.com"):
        assert r.match(b"GET", host, b"/") == ("v", ()), host
    for host in (b"example.com", b".example.com", b"aexample.com", b"", b"a.example.com.evil"):
        assert r.match(b"GET", host, b"/") is None, host


def test_ipv6_host(impl):
    r = one(impl, "/", host="[::1]")
    assert r.match(b"GET", b"[::1]:8000", b"/") == ("v", ())
    assert r.match(b"GET", b"[::1]", b"/") == ("v", ())
    assert r.match(b"GET", b"[::2]:8000", b"/") is None
    assert one(impl, "/", host="[::1]").match(b"GET", b"[::1]:", b"/") == ("v", ())


def test_empty_host_matches_only_hostless_entries(impl):
    r = impl.Router([("a.com", (), "/", 5, "host"), ("*.com", (), "/", 5, "wild"), (None, (), "/", 0, "any")])
    assert r.match(b"GET", b"", b"/") == ("any", ())
    assert r.match(b"GET", b":80", b"/") == ("any", ())
    assert r.match(b"GET", b"a.com", b"/") == ("host", ())


@pytest.mark.parametrize(
    "host",
    ["", "*", "*.", "a.*.com", "*a.com", "a*.com", "*.*.com", "a.com*", "a com", " a.com", "a..com",
     ".a.com", "a.com.", "a.com:80", "ex\u00e4mple.com", "a/b", "[::1", "*.[::1]"],
)
def test_invalid_hosts(impl, host):
    with pytest.raises(ValueError, match="route entry 0: invalid route host") as ei:
        one(impl, "/", host=host)
    assert repr(host) in str(ei.value)


def test_host_error_hints():
    with pytest.raises(ValueError, match=r"'\*' is only allowed as a whole first label"):
        one(core, "/", host="a.*.com")
    with pytest.raises(ValueError, match="empty"):
        one(core, "/", host="")
    with pytest.raises(ValueError, match="without a port"):
        one(core, "/", host="a.com:80")


# --- methods ----------------------------------------------------------------------------------

def test_methods(impl):
    r = one(impl, "/", methods=("GET", "HEAD"))
    assert r.match(b"GET", b"", b"/") == ("v", ())
    assert r.match(b"HEAD", b"", b"/") == ("v", ())
    assert r.match(b"get", b"", b"/") is None
    assert r.match(b"POST", b"", b"/") is None
    assert r.match(b"", b"", b"/") is None
    assert one(impl, "/").match(b"BREW", b"", b"/") == ("v", ())


def test_bad_methods(impl):
    with pytest.raises(TypeError):
        one(impl, "/", methods="GET")
    with pytest.raises(ValueError, match="invalid route method 'G T'"):
        one(impl, "/", methods=("G T",))


# --- the winner -------------------------------------------------------------------------------

def test_priority_wins_over_everything(impl):
    r = impl.Router([
        ("a.com", ("GET",), "/x/y", 0, "specific"),
        (None, (), "/*", 1, "priority"),
    ])
    assert r.match(b"GET", b"a.com", b"/x/y") == ("priority", (b"x/y",))


def test_huge_priorities(impl):
    r = impl.Router([(None, (), "/", 2**70, "big"), (None, (), "/", 2**70 - 1, "less"), (None, (), "/", -(2**80), "neg")])
    assert r.match(b"GET", b"", b"/") == ("big", ())


def test_host_rank(impl):
    r = impl.Router([
        (None, ("GET",), "/a", 0, "any"),
        ("*.com", (), "/{p}", 0, "short-wild"),
        ("*.b.com", (), "/{p}", 0, "long-wild"),
        ("a.b.com", (), "/*", 0, "exact"),
    ])
    assert r.match(b"GET", b"a.b.com", b"/a") == ("exact", (b"a",))
    assert r.match(b"GET", b"x.b.com", b"/a") == ("long-wild", (b"a",))
    assert r.match(b"GET", b"x.c.com", b"/a") == ("short-wild", (b"a",))
    assert r.match(b"GET", b"c", b"/a") == ("any", ())


def test_specificity(impl):
    r = impl.Router([
        (None, (), "/*", 0, "catch"),
        (None, (), "/{x}/{y}", 0, "pp"),
        (None, (), "/{x}/b", 0, "ps"),
        (None, (), "/a/{y}", 0, "sp"),
        (None, (), "/a/*", 0, "sc"),
    ])
    assert r.match(b"GET", b"", b"/a/b") == ("sp", (b"b",))       # (2,1) > (2,0) > (1,2) > (1,1) > (0,)
    assert r.match(b"GET", b"", b"/z/b") == ("ps", (b"z",))
    assert r.match(b"GET", b"", b"/z/q") == ("pp", (b"z", b"q"))
    assert r.match(b"GET", b"", b"/a/b/c") == ("sc", (b"b/c",))
    assert r.match(b"GET", b"", b"/z") == ("catch", (b"z",))
    assert r.match(b"GET", b"", b"/a/") == ("sc", (b"",))


def test_backtracking(impl):
    # the static branch "/a/b" is a dead end for "/a/b/c"; the param branch must still be found
    r = impl.Router([(None, (), "/a/b", 0, "ab"), (None, (), "/{x}/b/c", 0, "xbc"), (None, (), "/a/{y}/d", 0, "ayd")])
    assert r.match(b"GET", b"", b"/a/b/c") == ("xbc", (b"a",))
    assert r.match(b"GET", b"", b"/a/b/d") == ("ayd", (b"b",))


def test_method_list_beats_any_method(impl):
    r = impl.Router([(None, (), "/", 0, "any"), (None, ("GET",), "/", 0, "get")])
    assert r.match(b"GET", b"", b"/") == ("get", ())
    assert r.match(b"POST", b"", b"/") == ("any", ())


def test_declaration_order_breaks_the_last_tie(impl):
    r = impl.Router([(None, (), "/{a}", 0, "first"), (None, (), "/{b}", 0, "second"), (None, ("GET",), "/{c}", 0, "get")])
    assert r.match(b"POST", b"", b"/x") == ("first", (b"x",))
    r = impl.Router([(None, ("GET",), "/", 0, "first"), (None, ("POST", "GET"), "/", 0, "second")])
    assert r.match(b"GET", b"", b"/") == ("first", ())


def test_len_and_empty_router(impl):
    assert len(impl.Router([])) == 0
    assert impl.Router([]).match(b"GET", b"a.com", b"/") is None
    assert len(impl.Router([(None, (), "/", 0, 1)] * 3)) == 3


def test_entry_shape_errors():
    with pytest.raises(TypeError, match="route entry 0 must be a 5-tuple"):
        core.Router([(None, (), "/")])
    with pytest.raises(TypeError, match="route entry 0"):
        core.Router([(None, (), "/", "high", 1)])


def test_match_wants_bytes():
    r = one(core, "/")
    with pytest.raises(TypeError):
        r.match("GET", b"", b"/")
    with pytest.raises(TypeError):
        r.match(b"GET", None, b"/")


def test_values_are_returned_as_is():
    marker = object()
    r = core.Router([(None, (), "/", 0, marker), (None, (), "/{x}", 0, marker)])
    assert r.match(b"GET", b"", b"/")[0] is marker
    assert r.match(b"GET", b"", b"/q")[0] is marker


def test_reinit_replaces_routes():
    r = one(core, "/a")
    r.__init__([(None, (), "/b", 0, "b")])
    assert r.match(b"GET", b"", b"/a") is None
    assert r.match(b"GET", b"", b"/b") == ("b", ())
    assert len(r) == 1


def test_ten_thousand_routes():
    n = 10_000
    entries = [(None, ("GET",), f"/api/r{i}/items/{{id}}", 0, i) for i in range(n)]
    entries += [(f"h{i}.example.com", (), "/x", 0, -i) for i in range(n)]
    entries.append(("*.example.com", (), "/x", 0, "wild"))
    r = core.Router(entries)
    assert len(r) == 2 * n + 1
    for i in list(range(0, n, 97)) + [n - 1]:
        assert r.match(b"GET", b"", f"/api/r{i}/items/{i * 7}".encode()) == (i, (str(i * 7).encode(),))
        assert r.match(b"GET", f"H{i}.Example.com:80".encode(), b"/x") == (-i, ())
    assert r.match(b"GET", b"", f"/api/r{n}/items/1".encode()) is None
    assert r.match(b"POST", b"", b"/api/r5/items/1") is None
    assert r.match(b"GET", b"", b"/api/r5/items/") is None
    assert r.match(b"GET", b"h.example.com", b"/x") == ("wild", ())


def test_deep_patterns_use_the_heap_path():
    depth = 100                                      # deeper than match()'s on-stack buffers
    pattern = "/" + "/".join(f"{{p{i}}}" for i in range(depth))
    r = core.Router([(None, (), pattern, 0, "deep"), (None, (), "/*", 0, "catch")])
    path = "/" + "/".join(str(i) for i in range(depth))
    assert r.match(b"GET", b"", path.encode()) == ("deep", tuple(str(i).encode() for i in range(depth)))
    assert r.match(b"GET", b"", path.encode() + b"/x") == ("catch", (path.encode()[1:] + b"/x",))


# --- normalize_path ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "path, expected",
    [
        (b"/", b"/"),
        (b"/a/b", b"/a/b"),
        (b"/a/./b", b"/a/b"),
        (b"/a/b/../c", b"/a/c"),
        (b"/a/.", b"/a/"),
        (b"/a/..", b"/"),
        (b"/a/b/..", b"/a/"),
        (b"/.", b"/"),
        (b"/./", b"/"),
        (b"/a//..", b"/a/"),
        (b"//..", b"/"),
        (b"/a//b", b"/a//b"),
        (b"/.a/..b/.../a.", b"/.a/..b/.../a."),
        (b"/%41%7a%30%2D%2e%5F%7E", b"/Az0-._~"),
        (b"/%2f%3a%20%25%c3%a9", b"/%2F%3A%20%25%C3%A9"),
        (b"/a/%2e%2e/b", b"/b"),
        (b"/a/%2E/b", b"/a/b"),
        (b"/a/.%2e", b"/"),
        (b"/a%2fb/..", b"/"),
        (b"/a?b=c", b"/a?b=c"),
        (b"/" + b"x" * 5000 + b"/%2e", b"/" + b"x" * 5000 + b"/"),
    ],
)
def test_normalize_path(impl, path, expected):
    assert impl.normalize_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [b"", b"a/b", b"*", b"/..", b"/../a", b"/a/../..", b"/%2e%2e", b"/a/%2E%2E/%2e.", b"/a b", b"/a\tb",
     b"/a\x00", b"/\x7f", b"/\x80", b"/caf\xc3\xa9", b"/a#b", b"/%", b"/%4", b"/%4g", b"/%g4", b"/a%",
     b"/%%41", b"/" + b"x" * 5000 + b"/%zz"],
)
def test_normalize_path_rejects(impl, path):
    assert impl.normalize_path(path) is None


def test_normalize_path_returns_the_same_object_when_unchanged():
    for path in (b"/", b"/a/b/", b"/%2F%20", b"/a//b", b"/" + b"y" * 4000):
        assert core.normalize_path(path) is path
    assert core.normalize_path(b"/%2f") == b"/%2F"


def test_normalize_path_wants_bytes():
    with pytest.raises(TypeError):
        core.normalize_path("/a")
    with pytest.raises(TypeError):
        core.normalize_path(None)
