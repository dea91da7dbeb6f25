# cython: language_level=3
"""Compiled forms of the commonest policy hooks: a route that has only these pays a C call per
request for them, not a Python frame, its lookups and its formatting.

  LocalGcra   the rate-limit policy (policies/limits.py) with a token bucket on this host's counters:
              the key, the decision (ratelimit.Limiter.gcra_c, no result tuple), the five header
              lines formatted into one buffer (or the last ones again), the decision counted in C
              (drained into the worker's metrics at its flush)
  RedisLease  the same policy on the Redis counters in lease mode, while this worker holds leased
              tokens for the key: spent here as counters/redis.py spends them
  KeyAuth     the key-auth policy (policies/auth.py) for a request with its key in the header, one
              key, known: the header scan in C, the hash, the lookups, the identity; every other
              case (no key, several, unknown, a query string) is the policy's own answer
  JwtCached   the jwt policy (policies/jwt.py) for a token in its header that the verified-token
              cache holds, alive (offered only by a policy with no revocation list, required scopes,
              query or cookie carrier); every other case (verification, refusals) is the policy's

The policy's Python `request` is the reference: tests/property/test_hooks.py runs both over the same
requests and compares every answer, header line, identity and metric."""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.ref cimport PyObject
from libc.math cimport ceil
from libc.stdint cimport int64_t
from libc.string cimport memcpy

from .proxy cimport Exchange, WorkerState
from .ratelimit cimport Lease, Limiter
from .shm cimport fg_monotonic_ns

from .headers cimport find_header

from .capi cimport PyDict_GetItemWithError

cdef int64_t NS = 1000000000

cdef enum:
    KEY_FIXED = 0  # one bucket for the route or API (key: route|api)
    KEY_IP = 1
    KEY_CONSUMER = 2  # the client's address when nobody authenticated
    KEY_HEADER = 3

KEY_KINDS = {"route": KEY_FIXED, "api": KEY_FIXED, "ip": KEY_IP, "consumer": KEY_CONSUMER, "header": KEY_HEADER}

cdef enum:
    BUF = 512  # the fields' bytes: the policy's five constant parts and four numbers fit in this
    DIGESTS_MAX = 10000  # KeyAuth: presented keys whose digest is remembered, per worker and policy
    KEYS_MAX = 1024  # _Limit: client addresses and usernames whose bucket key is remembered, per policy


cdef inline void _add(pending, bytes name, int64_t n) except *:
    """pending[name] += n on the worker's metrics (a Counter: a dict, read as one, no __missing__)."""
    cdef PyObject* v = PyDict_GetItemWithError(pending, name)
    PyDict_SetItem(pending, name, (<object>v) + n if v != NULL else n)


cdef inline char* _put(char* p, bytes b):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


cdef inline char* _put_int(char* p, int64_t v):
    """`v` (>= 0) in decimal, as %d writes it."""
    cdef char tmp[20]
    cdef int n = 0
    if v <= 0:
        p[0] = 48
        return p + 1
    while v > 0:
        tmp[n] = <char>(48 + v % 10)
        v //= 10
        n += 1
    while n > 0:
        n -= 1
        p[0] = tmp[n]
        p += 1
    return p


cdef class _Limit:
    """What the rate-limit hooks share: the bucket's key for a request, the five header lines."""

    cdef int kind
    cdef bytes prefix, header, metric_allowed, metric_limited
    cdef bytes p0, p1, p2, p3, p4  # the fields around (remaining, reset, remaining, reset)
    cdef object policy_request  # the policy's own hook, for what the compiled one leaves to it
    cdef readonly dict keys  # client address (bytes) or username (str) -> its bucket key, up to KEYS_MAX
    # decisions not yet in the worker's metrics: added by drain(), which WorkerMetrics.flush calls
    # for each hook in its `counted` list (a hook puts itself there when it counts the first one)
    cdef int64_t n_allowed, n_limited
    cdef bint listed
    # the last header lines made, for these two numbers: a key far below its limit gets the same
    # ones request after request (a full bucket)
    cdef int64_t last_remaining, last_reset
    cdef bytes last_lines

    cdef _setup(self, str key_kind, bytes prefix, bytes header, bytes metric_allowed, bytes metric_limited,
                tuple parts, policy_request):
        if len(parts) != 5:
            raise ValueError("the fields are five constant parts around four numbers")
        if sum(len(p) for p in parts) + 80 > BUF:
            raise ValueError("rate-limit header fields too long for the compiled hook")
        self.kind = KEY_KINDS[key_kind]
        self.prefix, self.header = prefix, header
        self.metric_allowed, self.metric_limited = metric_allowed, metric_limited
        self.p0, self.p1, self.p2, self.p3, self.p4 = parts
        self.policy_request = policy_request
        self.keys = {}
        self.last_remaining = self.last_reset = -1

    cdef bytes _key(self, Exchange ex):
        cdef PyObject* known
        kind = self.kind
        if kind == KEY_IP or (kind == KEY_CONSUMER and ex.consumer is None):
            who = ex.client_ip  # one bytes object per connection: its hash is computed once
        elif kind == KEY_CONSUMER:
            who = ex.consumer.username
        elif kind == KEY_HEADER:
            return self.prefix + (find_header(ex.headers, self.header) or b"")
        else:
            return self.prefix
        # the key of a client or consumer seen lately: no concatenation, and its hash (which the
        # shared table's lookup needs) is already in the bytes object
        known = PyDict_GetItemWithError(self.keys, who)
        if known != NULL:
            return <bytes>known
        key = self.prefix + (who if type(who) is bytes else who.encode())
        if len(self.keys) >= KEYS_MAX:
            self.keys.clear()
        self.keys[who] = key
        return key

    cdef bytes _fields(self, int64_t remaining, int64_t reset_s):
        cdef char buf[BUF]
        cdef char *p = buf
        if remaining == self.last_remaining and reset_s == self.last_reset:
            return self.last_lines
        p = _put(p, self.p0)
        p = _put_int(p, remaining)
        p = _put(p, self.p1)
        p = _put_int(p, reset_s)
        p = _put(p, self.p2)
        p = _put_int(p, remaining)
        p = _put(p, self.p3)
        p = _put_int(p, reset_s)
        p = _put(p, self.p4)
        self.last_lines = PyBytes_FromStringAndSize(buf, p - buf)
        self.last_remaining, self.last_reset = remaining, reset_s
        return self.last_lines

    cdef inline int _count(self, Exchange ex, bint allowed) except -1:
        metrics = (<WorkerState>ex.proto._state).metrics
        if metrics is None:
            return 0
        if allowed:
            self.n_allowed += 1
        else:
            self.n_limited += 1
        if not self.listed:
            metrics.counted.append(self)
            self.listed = True
        return 0

    def drain(self, pending):
        """The decisions counted since the last drain, into the worker's pending metrics."""
        if self.n_allowed:
            _add(pending, self.metric_allowed, self.n_allowed)
        if self.n_limited:
            _add(pending, self.metric_limited, self.n_limited)
        self.n_allowed = self.n_limited = 0
        self.listed = False

    cdef _allowed(self, Exchange ex, bytes lines):
        self._count(ex, True)
        ex.resp_extra = ex.resp_extra + lines if ex.resp_extra else lines


@cython.final
cdef class LocalGcra(_Limit):
    """RateLimitPolicy.request for a token bucket on this host's counters (`request` is the hook)."""

    cdef Limiter limiter
    cdef double rate
    cdef int64_t per_ns, burst

    def __init__(self, Limiter limiter not None, double rate, int64_t per_ns, int64_t burst, str key_kind,
                 bytes prefix not None, bytes header not None, bytes metric_allowed not None,
                 bytes metric_limited not None, tuple parts not None, refuse not None):
        if not rate > 0 or per_ns <= 0 or burst <= 0:
            raise ValueError("rate, per and burst must be positive")
        self._setup(key_kind, prefix, header, metric_allowed, metric_limited, parts, refuse)
        self.limiter = limiter
        self.rate, self.per_ns, self.burst = rate, per_ns, burst

    def request(self, Exchange ex):
        cdef int64_t remaining, retry_ns, reset_ns, reset_s
        cdef bint allowed
        key = self._key(ex)
        allowed = self.limiter.gcra_c(key, self.rate, self.per_ns, self.burst, 1, fg_monotonic_ns(),
                                      &remaining, &retry_ns, &reset_ns)
        reset_s = (reset_ns + NS - 1) // NS if reset_ns > 0 else 0
        lines = self._fields(remaining, reset_s)
        if allowed:
            self._allowed(ex, lines)
            return None
        self._count(ex, False)
        return self.policy_request(ex, lines, retry_ns)  # the policy's _refuse: the 429


@cython.final
cdef class RedisLease(_Limit):
    """RateLimitPolicy.request for a token bucket on the Redis counters in lease mode, while this
    worker holds leased tokens for the key (counters/redis.py's fast path, with its top-up when half
    the lease is spent); no lease, an empty or an expired one is the policy's (a fetch, a shared
    fetch, a recent refusal)."""

    cdef dict leases  # the counters' {key: _Lease}
    cdef object counters
    cdef int64_t low  # at or below this many tokens, the counters top the lease up (_refill)

    def __init__(self, counters not None, str key_kind, bytes prefix not None, bytes header not None,
                 bytes metric_allowed not None, bytes metric_limited not None, tuple parts not None,
                 policy_request not None):
        self._setup(key_kind, prefix, header, metric_allowed, metric_limited, parts, policy_request)
        self.counters = counters
        self.leases = counters._gcra_leases
        self.low = counters._low

    def request(self, Exchange ex):
        cdef double now, left
        cdef int64_t remaining, reset_s
        cdef Lease lease
        key = self._key(ex)
        found = self.leases.get(key)
        if found is None:
            return self.policy_request(ex)
        lease = <Lease?>found
        if lease.tokens < 1:
            return self.policy_request(ex)
        now = self.counters._loop.time()
        if not now < lease.expires:
            return self.policy_request(ex)
        lease.tokens -= 1
        if lease.tokens <= self.low and lease.waiters is None:
            self.counters._refill(lease)
        left = lease.reset_at - now
        remaining = lease.tokens + lease.remaining
        reset_s = <int64_t>ceil(left) if left > 0.0 else 0
        self._allowed(ex, self._fields(remaining, reset_s))
        return None


@cython.final
cdef class KeyAuth:
    """KeyAuthPolicy.request for its common case; `request` is the hook."""

    cdef bytes header  # lowercase
    cdef dict by_hash  # the config's keys: hex digest -> (consumer, credential id, identity headers)
    cdef object directory  # the store's keys (control/directory.py), or None
    cdef object policy_request  # the policy's own hook: every answer that is not a plain hit
    cdef object sha256
    cdef dict digests  # presented key -> its hex digest, for the keys seen lately (DIGESTS_MAX)

    def __init__(self, bytes header not None, dict by_hash not None, directory, policy_request not None):
        import hashlib

        self.header = header.lower()
        self.by_hash = by_hash
        self.directory = directory
        self.policy_request = policy_request
        self.sha256 = hashlib.sha256
        self.digests = {}

    def request(self, Exchange ex):
        cdef bytes value = None, name
        cdef Py_ssize_t hl = len(self.header), count = 0, k
        cdef const char* want = PyBytes_AS_STRING(self.header)
        cdef const char* got
        if ex.query:  # a key may be there (query:) or be refused there: the policy decides
            return self.policy_request(ex)
        for pair in ex.headers:
            if type(pair) is not tuple or len(<tuple>pair) != 2 or type((<tuple>pair)[0]) is not bytes \
                    or type((<tuple>pair)[1]) is not bytes:
                return self.policy_request(ex)  # a list a plugin built: the policy reads any pair
            name = <bytes>(<tuple>pair)[0]
            if PyBytes_GET_SIZE(name) != hl:
                continue
            got = PyBytes_AS_STRING(name)
            for k in range(hl):
                if got[k] != want[k] and not (65 <= got[k] <= 90 and got[k] + 32 == want[k]):
                    break
            else:
                count += 1
                value = <bytes>(<tuple>pair)[1]
        if count != 1:  # none (anonymous, or 401) or several (401)
            return self.policy_request(ex)
        # hashing a key costs more than the rest of the check (hashlib: an EVP context per call);
        # its digest is remembered, not the verdict: a revoked key stops at the lookups below
        digest = self.digests.get(value)
        if digest is None:
            digest = self.sha256(value).hexdigest().encode()
            if len(self.digests) >= DIGESTS_MAX:
                self.digests.clear()  # a flood of made-up keys only costs the hashing back
            self.digests[value] = digest
        hit = self.by_hash.get(digest)
        if hit is None and self.directory is not None:
            hit = self.directory.get(digest)
        if hit is None:
            return self.policy_request(ex)
        if len(<tuple>hit) == 3:  # a key of the config's: its identity headers made with it
            ex.identified((<tuple>hit)[0], (<tuple>hit)[2])
        else:  # the store's: (consumer, credential identifier)
            ex.authenticated((<tuple>hit)[0], None, (<tuple>hit)[1])
        return None


cdef inline bint _name_is(bytes name, bytes want) noexcept:
    """`name.lower() == want` for a lowercase `want`, without making the lowercase copy."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(want), k
    cdef const char* a
    cdef const char* b
    cdef char c
    if PyBytes_GET_SIZE(name) != n:
        return False
    a = PyBytes_AS_STRING(name)
    b = PyBytes_AS_STRING(want)
    for k in range(n):
        c = a[k]
        if 65 <= c <= 90:
            c += 32
        if c != b[k]:
            return False
    return True


@cython.final
cdef class JwtCached:
    """JwtPolicy.request when its verified-token cache answers; `request` is the hook."""

    cdef bytes header  # lowercase
    cdef bint bearer
    cdef Py_ssize_t max_bytes
    cdef object cache  # the policy's OrderedDict: token -> (valid until, claims, consumer, key, adds, cred, jti)
    cdef object move_to_end
    cdef object policy_request
    cdef object wall  # time.time

    def __init__(self, bytes header not None, bint bearer, Py_ssize_t max_bytes, cache not None,
                 policy_request not None):
        import time

        self.header = header.lower()
        self.bearer = bearer
        self.max_bytes = max_bytes
        self.cache = cache
        self.move_to_end = cache.move_to_end
        self.policy_request = policy_request
        self.wall = time.time

    def request(self, Exchange ex):
        cdef bytes value = None, token
        cdef Py_ssize_t count = 0
        cdef tuple hit
        for pair in ex.headers:
            if type(pair) is not tuple or len(<tuple>pair) != 2 or type((<tuple>pair)[0]) is not bytes \
                    or type((<tuple>pair)[1]) is not bytes:
                return self.policy_request(ex)  # a list a plugin built: the policy reads any pair
            if _name_is(<bytes>(<tuple>pair)[0], self.header):
                count += 1
                value = <bytes>(<tuple>pair)[1]
        if count != 1:
            return self.policy_request(ex)
        if self.bearer:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return self.policy_request(ex)
            token = token.strip()
        else:
            token = value.strip()
        if not token or PyBytes_GET_SIZE(token) > self.max_bytes:
            return self.policy_request(ex)
        hit = self.cache.get(token)
        if hit is None or not (hit[0] > self.wall() and hit[3].alive):
            return self.policy_request(ex)  # not verified yet, expired, or its key is gone
        self.move_to_end(token)
        consumer = hit[2]
        if consumer is not None:
            ex.authenticated(consumer, hit[1], hit[5])
        else:
            ex.claims = hit[1]
        for name, v in <tuple>hit[4]:
            ex.add_upstream_header(name, v)
        return None
