"""The compiled policy hooks (_core/hooks.pyx) against their Python reference: the same requests
through both give the same answers, header lines and metrics.

LocalGcra vs RateLimitPolicy.request (the local token bucket), each over its own shared table.
Both read the clock; the rates here make a token last a whole number of seconds, far longer than
an example runs, so the two runs' few microseconds apart never change a figure."""
from __future__ import annotations

import asyncio
import collections
import os
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core.proxy import Exchange, GatewayProtocol, WorkerState
from fastgate._core.shm import SharedTable
from fastgate.config.load import load_config
from fastgate.config.schema import RateLimit
from fastgate.counters.local import Counters, LocalCounters
from fastgate.policies.base import BuildContext
from fastgate.policies.limits import RateLimitPolicy
from fastgate.server.generation import Generation


class Sink:
    """The worker's metrics, as far as a hook sees them: counts by key."""

    def __init__(self):
        self.pending = collections.Counter()
        self.counted = []  # compiled hooks with decisions not yet drained into pending

    def flush(self):
        """WorkerMetrics.flush's part before the host's table."""
        for hook in self.counted:
            hook.drain(self.pending)
        self.counted.clear()


class User:
    def __init__(self, username: str):
        self.username = username


_loop = asyncio.new_event_loop()
_gen = Generation(load_config({"routes": [{"name": "r", "paths": ["/*"], "mock": {"body": "x"}}]}))


def protocol() -> tuple[GatewayProtocol, Sink]:
    state = WorkerState(_loop, _gen, b"Date: Wed, 25 Nov 2026 00:00:00 GMT\r\n", b"0123456789abcdef")
    state.metrics = Sink()
    return GatewayProtocol(state), state.metrics


def policy(cfg: RateLimit) -> RateLimitPolicy:
    return RateLimitPolicy(cfg, BuildContext(Counters(LocalCounters(SharedTable(4096))), "r", None))


REQUEST = st.tuples(
    st.sampled_from([b"10.0.0.1", b"10.0.0.2", b"2001:db8::1"]),  # the client's address
    st.sampled_from([None, "ann", "bob"]),  # who authenticated
    st.sampled_from([None, b"k1", b"k2"]),  # the X-Key header
    st.booleans(),  # keep-alive
)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["ip", "consumer", "header", "route", "api"]), rate=st.sampled_from([1, 2, 5]),
       seconds=st.integers(1000, 100000), burst=st.integers(1, 6), requests=st.lists(REQUEST, max_size=30))
def test_local_gcra_answers_as_the_policy_does(key, rate, seconds, burst, requests):
    cfg = RateLimit(rate=rate, per=rate * seconds, burst=burst, key=key, header="X-Key")
    compiled, reference = policy(cfg), policy(cfg)
    hook = compiled.compiled_request
    assert hook is not None and hook.__self__.__class__.__name__ == "LocalGcra"
    (pa, ma), (pb, mb) = protocol(), protocol()
    for n, (ip, user, header, keep_alive) in enumerate(requests):
        answers, extras = [], []
        for proto, run in ((pa, hook), (pb, reference.request)):
            ex = Exchange(proto)
            ex.client_ip = ip
            ex.consumer = User(user) if user else None
            ex.headers = [(b"x-key", header)] if header else []
            ex.keep_alive = keep_alive
            ex.request_id = b"rid-%d" % n
            answers.append(run(ex))
            extras.append(ex.resp_extra)
        assert answers[0] == answers[1]
        assert extras[0] == extras[1]
        if n % 4 == 3:  # a worker tick between requests: the hooks drain, then count on
            ma.flush()
            mb.flush()
    ma.flush()
    mb.flush()
    assert ma.pending == mb.pending
    if requests:
        assert sum(ma.pending.values()) == len(requests)  # every decision counted, allowed or limited


def test_rate_limit_hook_remembers_a_bounded_number_of_keys_and_counts_on_after_forgetting():
    cfg = RateLimit(rate=1, per=100000, burst=5, key="ip")
    hook = RateLimitPolicy(cfg, BuildContext(Counters(LocalCounters(SharedTable(1 << 16))), "r", None)).compiled_request
    (proto, _m), = [protocol()]

    def remaining(ip: bytes) -> int:
        ex = Exchange(proto)
        ex.client_ip, ex.consumer, ex.headers, ex.keep_alive, ex.request_id = ip, None, [], True, b"rid"
        assert hook(ex) is None
        return int(re.search(rb"X-RateLimit-Remaining: (\d+)", ex.resp_extra).group(1))

    assert remaining(b"10.9.9.9") == 4
    for i in range(3_000):  # more clients than the hook remembers the keys of (1,024)
        remaining(b"10.%d.%d.1" % (i // 256, i % 256))
        assert len(hook.__self__.keys) <= 1_024
    assert b"10.9.9.9" not in hook.__self__.keys
    assert remaining(b"10.9.9.9") == 3  # forgotten by the hook, not by the bucket


# --- KeyAuth vs KeyAuthPolicy.request ---------------------------------------------------------------
def key_auth(header: str | None, query: str | None, hide: bool, anonymous: str | None):
    from fastgate.config.schema import KeyAuth
    from fastgate.policies.auth import KeyAuthPolicy, hash_key

    cfg = load_config({"consumers": [{"username": "ann", "keys": [hash_key("ka"), hash_key("kdup")]},
                                     {"username": "bob", "keys": [hash_key("kb")]},
                                     {"username": "eve", "keys": [hash_key("kdup")]},  # one key, two owners
                                     {"username": "guest"}],
                       "routes": [{"name": "r", "paths": ["/*"], "mock": {"body": "x"}}]})
    return KeyAuthPolicy(KeyAuth(header=header, query=query, hide_credentials=hide, anonymous=anonymous),
                         BuildContext(None, "r", None, cfg))


HEADER_NAMES = [b"apikey", b"APIKey", b"x-api-key", b"X-Other"]
KEYS = [b"ka", b"kb", b"kdup", b"wrong", b""]
KEY_REQUEST = st.tuples(
    st.lists(st.tuples(st.sampled_from(HEADER_NAMES), st.sampled_from(KEYS)), max_size=3),
    st.sampled_from([b"", b"a=1", b"api_key=ka", b"apikey=kb", b"x=1&api_key=kb"]),
)


@settings(max_examples=150, deadline=None)
@given(header=st.sampled_from(["apikey", "X-API-Key"]), query=st.sampled_from([None, "api_key"]),
       hide=st.booleans(), anonymous=st.sampled_from([None, "guest"]), requests=st.lists(KEY_REQUEST, max_size=8),
       prior=st.sampled_from(["nothing", "a header added", "someone authenticated"]))
def test_key_auth_answers_as_the_policy_does(header, query, hide, anonymous, requests, prior):
    """Including what an earlier policy left on the exchange: the compiled hook's identity headers,
    made once per key, must land as authenticated() puts them (after a header added, in place of an
    earlier identity)."""
    from fastgate.policies.base import ConsumerInfo

    pol = key_auth(header, query, hide, anonymous)
    hook = pol.compiled_request
    assert hook is not None and hook.__self__.__class__.__name__ == "KeyAuth"
    (proto, _m), = [protocol()]
    for n, (headers, qs) in enumerate(requests):
        seen = []
        for run in (hook, pol.request):
            ex = Exchange(proto)
            ex.headers = list(headers)
            ex.query = qs
            ex.request_id = b"rid-%d" % n
            ex.keep_alive = True
            if prior == "a header added":
                ex.add_upstream_header(b"X-Earlier", b"1")
            elif prior == "someone authenticated":
                ex.authenticated(ConsumerInfo("zed", plan="gold"), None, b"cred-z")
            answer = run(ex)
            seen.append((answer, ex.consumer.username if ex.consumer is not None else None, ex.up_add, ex.query))
        assert seen[0] == seen[1]


def test_key_auth_hook_takes_a_known_key_itself():
    """The compiled path, not a hand-over: a known key in the header never calls the policy."""
    pol = key_auth("apikey", None, True, None)
    calls = []
    from fastgate._core.hooks import KeyAuth

    hook = KeyAuth(b"apikey", pol.by_hash, None, lambda ex: calls.append(ex)).request
    (proto, _m), = [protocol()]
    ex = Exchange(proto)
    ex.headers = [(b"ApiKey", b"kb")]
    ex.query = b""
    assert hook(ex) is None and ex.consumer.username == "bob" and calls == []
    ex = Exchange(proto)
    ex.headers = [(b"apikey", b"wrong")]
    ex.query = b""
    hook(ex)
    assert calls == [ex]  # an unknown key: the policy answers


def test_key_auth_hook_remembers_digests_not_verdicts():
    """A key's digest is remembered between requests, the answer is not: a key revoked after it
    was used (gone from the hashes) is handed to the policy at once; a flood of made-up keys past
    the remembered-digest bound leaves known keys working."""
    pol = key_auth("apikey", None, True, None)
    calls = []
    from fastgate._core.hooks import KeyAuth
    from fastgate.policies.auth import hash_key

    by_hash = dict(pol.by_hash)
    hook = KeyAuth(b"apikey", by_hash, None, lambda ex: calls.append(ex)).request
    (proto, _m), = [protocol()]

    def ask(key):
        ex = Exchange(proto)
        ex.headers = [(b"apikey", key)]
        ex.query = b""
        hook(ex)
        return ex

    assert ask(b"kb").consumer.username == "bob" and ask(b"kb").consumer.username == "bob" and calls == []
    del by_hash[hash_key("kb").removeprefix("sha256:").encode()]
    refused = ask(b"kb")
    assert calls == [refused] and refused.consumer is None
    for i in range(10_050):
        ask(b"made-up-%d" % i)
    assert len(calls) == 1 + 10_050 and ask(b"ka").consumer.username == "ann"


# --- JwtCached vs JwtPolicy.request ------------------------------------------------------------------
SECRET = "a-test-secret-of-at-least-thirty-two-bytes!"


def jwt_policy(header: str, claims_to_headers: dict):
    from fastgate.config.schema import Jwt
    from fastgate.policies.jwt import JwtPolicy

    cfg = load_config({"consumers": [{"username": "u1"}],
                       "routes": [{"name": "r", "paths": ["/*"], "mock": {"body": "x"}}]})
    import msgspec

    os.environ["FG_HOOKS_TEST_SECRET"] = SECRET
    spec = msgspec.convert({"type": "jwt", "keys": [{"algorithm": "HS256", "secret_env": "FG_HOOKS_TEST_SECRET"}],
                            "header": header,
                            "claims_to_headers": claims_to_headers}, Jwt)
    return JwtPolicy(spec, BuildContext(None, "r", None, cfg, {}))


def tokens():
    import time

    import jwt as pyjwt

    now = int(time.time())
    return [pyjwt.encode({"sub": "u1", "exp": now + 600, "scope": "read"}, SECRET, algorithm="HS256").encode(),
            pyjwt.encode({"sub": "u2", "exp": now + 600, "team": "blue", "jti": "j2"}, SECRET,
                         algorithm="HS256").encode(),
            pyjwt.encode({"exp": now + 600}, SECRET, algorithm="HS256").encode(),  # nobody: claims only
            pyjwt.encode({"sub": "u1", "exp": now - 600}, SECRET, algorithm="HS256").encode(),  # expired
            pyjwt.encode({"sub": "u1", "exp": now + 600}, "another-secret-of-at-least-32-bytes!!",
                         algorithm="HS256").encode(),  # not ours
            b"not-a-token"]


TOKENS = tokens()
CARRIER = st.lists(st.tuples(st.sampled_from([b"authorization", b"Authorization", b"x-token"]),
                             st.sampled_from([b"Bearer ", b"bearer  ", b"Basic ", b""]),
                             st.sampled_from(range(len(TOKENS))), st.sampled_from([b"", b" "])), max_size=2)


@settings(max_examples=120, deadline=None)
@given(header=st.sampled_from(["Authorization", "X-Token"]), to_headers=st.sampled_from([{}, {"team": "X-Team"}]),
       requests=st.lists(CARRIER, max_size=10))
def test_jwt_cached_answers_as_the_policy_does(header, to_headers, requests):
    compiled, reference = jwt_policy(header, to_headers), jwt_policy(header, to_headers)
    hook = compiled.compiled_request
    assert hook is not None and hook.__self__.__class__.__name__ == "JwtCached"
    (proto, _m), = [protocol()]
    for n, carriers in enumerate(requests):
        seen = []
        for run in (hook, reference.request):
            ex = Exchange(proto)
            ex.headers = [(name, scheme + TOKENS[i] + pad) for name, scheme, i, pad in carriers]
            ex.query = b""
            ex.request_id = b"rid-%d" % n
            ex.keep_alive = True
            answer = run(ex)
            seen.append((answer, ex.consumer.username if ex.consumer is not None else None, ex.claims, ex.up_add))
        assert seen[0] == seen[1]
    assert list(compiled.cache) == list(reference.cache)  # the same tokens, in the same LRU order


def test_jwt_cached_answers_a_cached_token_itself():
    pol = jwt_policy("Authorization", {})
    from fastgate._core.hooks import JwtCached

    calls = []
    hook = JwtCached(b"authorization", True, 8192, pol.cache, lambda ex: calls.append(ex)).request
    (proto, _m), = [protocol()]
    ex = Exchange(proto)
    ex.headers = [(b"Authorization", b"Bearer " + TOKENS[0])]
    ex.query = b""
    assert pol.request(ex) is None  # verified once: cached
    ex = Exchange(proto)
    ex.headers = [(b"authorization", b"Bearer " + TOKENS[0])]
    ex.query = b""
    assert hook(ex) is None and calls == [] and ex.consumer.username == "u1"


# --- RedisLease vs RateLimitPolicy.request on Redis counters in lease mode -------------------------
def lease_policy(cfg: RateLimit):
    """The policy over Redis counters that never connect: a key without a usable lease takes the
    counters' outage path (fail_open: admitted), the same for both runs."""
    from fastgate.counters.redis import RedisCounters

    redis = RedisCounters("redis://127.0.0.1:1/0", mode="lease", lease_size=5)
    redis._loop = _loop
    return RateLimitPolicy(cfg, BuildContext(Counters(LocalCounters(SharedTable(64)), redis), "r", None)), redis


# (tokens, expires in, Redis's remaining, reset in): times far from the moment either run reads the clock
LEASE = st.none() | st.tuples(st.integers(0, 4), st.sampled_from([-1.0, 0.5, 3.0]), st.integers(0, 50),
                              st.sampled_from([-1.0, 0.5, 2.5, 30.0]))


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(["ip", "consumer", "route", "header"]), leases=st.dictionaries(
           st.sampled_from([b"10.0.0.1", b"10.0.0.2"]), LEASE, max_size=2),
       requests=st.lists(st.tuples(st.sampled_from([b"10.0.0.1", b"10.0.0.2"]), st.sampled_from([None, "ann"])),
                         max_size=12))
def test_redis_lease_answers_as_the_policy_does(key, leases, requests):
    from fastgate.counters.redis import _GCRA, _Lease

    cfg = RateLimit(rate=10, per=1, burst=20, key=key, backend="redis", header="X-Key")
    (compiled, ca), (reference, cb) = lease_policy(cfg), lease_policy(cfg)
    hook = compiled.compiled_request
    assert hook is not None and hook.__self__.__class__.__name__ == "RedisLease"
    now = _loop.time()
    for counters, pol in ((ca, compiled), (cb, reference)):
        for ip, lease in leases.items():
            if lease is None:
                continue
            tokens, expires_in, remaining, reset_in = lease
            who = pol.prefix + (ip if key != "route" else b"")
            le = counters._gcra_leases[who] = _Lease(_GCRA, (who, 10, 1.0, 20), b"", 1.0)
            le.tokens, le.expires, le.remaining, le.reset_at = tokens, now + expires_in, remaining, now + reset_in
    refills = ([], [])  # (key, tokens left) each time a run asks for a top-up (a no-op here: never connected)
    for counters, seen in zip((ca, cb), refills, strict=True):
        counters._refill = lambda lease, seen=seen, top_up=counters._refill: (
            seen.append((lease.args[0], lease.tokens)), top_up(lease))
    (pa, ma), (pb, mb) = protocol(), protocol()
    for n, (ip, user) in enumerate(requests):
        seen = []
        for proto, run in ((pa, hook), (pb, reference.request)):
            ex = Exchange(proto)
            ex.client_ip = ip
            ex.consumer = User(user) if user else None
            ex.headers = [(b"X-Key", ip)]  # the header key kind: the same values as the addresses
            ex.request_id = b"rid-%d" % n
            ex.keep_alive = True
            answer = run(ex)
            seen.append((answer, ex.resp_extra))
        assert seen[0] == seen[1]
    ma.flush()
    mb.flush()
    assert ma.pending == mb.pending
    assert {k: v.tokens for k, v in ca._gcra_leases.items()} == {k: v.tokens for k, v in cb._gcra_leases.items()}
    assert refills[0] == refills[1]
    assert all(tokens <= ca._low for _key, tokens in refills[0])



def test_hooks_hand_over_what_they_do_not_expect():
    """Header pairs a plugin built as lists, and a cached token past its time: the policy answers
    (a list is read as the policy reads it; the expired token is refused)."""
    import time

    from fastgate._core.hooks import JwtCached, KeyAuth

    calls = []
    (proto, _m), = [protocol()]
    ka = key_auth("apikey", None, True, None)
    hook = KeyAuth(b"apikey", ka.by_hash, None, lambda ex: calls.append("key-auth")).request
    ex = Exchange(proto)
    ex.headers = [[b"apikey", b"kb"]]
    ex.query = b""
    hook(ex)
    assert calls == ["key-auth"]
    ex = Exchange(proto)
    ex.headers = [[b"apikey", b"kb"]]
    ex.query = b""
    assert ka.compiled_request(ex) is None and ex.consumer.username == "bob"  # as the policy reads it

    pol = jwt_policy("Authorization", {})
    ex = Exchange(proto)
    ex.headers = [(b"Authorization", b"Bearer " + TOKENS[0])]
    ex.query = b""
    assert pol.request(ex) is None  # verified: cached
    entry = pol.cache[TOKENS[0]]
    pol.cache[TOKENS[0]] = (time.time() - 1,) + entry[1:]  # its time is over
    hook = JwtCached(b"authorization", True, 8192, pol.cache, lambda ex: calls.append("jwt")).request
    ex = Exchange(proto)
    ex.headers = [(b"authorization", b"Bearer " + TOKENS[0])]
    ex.query = b""
    hook(ex)
    assert calls == ["key-auth", "jwt"]
    ex = Exchange(proto)
    ex.headers = [[b"authorization", b"Bearer " + TOKENS[0]]]
    ex.query = b""
    hook(ex)
    assert calls == ["key-auth", "jwt", "jwt"]
