"""Counters shared by every node through Redis: GCRA, sliding and fixed windows, as Lua scripts.

Decisions have the same meaning as the local counters (counters/local.py, _core/ratelimit.pyx):
(allowed, remaining, retry_after_s, reset_s) and (allowed, remaining) for fixed windows. A call
returns the tuple when it can decide at once, else an awaitable (an asyncio Future) of it.

Client: one pipelined connection per worker (counters/resp.py, hiredis parser): requests are
written without waiting for replies, the requests of one loop iteration share one write, replies
are matched in order. Scripts run by EVALSHA; a NOSCRIPT reply (SCRIPT FLUSH, a restarted or
failed-over Redis) is answered by sending that command again as EVAL, so callers never see it.
The clock is Redis's `TIME`, read inside each script, so nodes with skewed clocks agree.

Keys are `key_prefix + "{" + key + "}"` (plus ":sw:0"/":sw:1" for the two windows of a sliding
window, ":fw:<id>" for a fixed window): one hash tag per decision, so a Redis Cluster keeps a
decision's keys in one slot. (A "{" in key_prefix still keeps them together, but puts every key in
one slot.)
Every key written gets a PEXPIRE: a GCRA key vanishes when its bucket is full again, a sliding
window key one window after its own window ends, a fixed window key after `ttl_s`.

Modes
  exact  one atomic script call per decision: all nodes together admit exactly the limit.
  lease  per key, a worker takes up to `lease_size` tokens at once from the Redis bucket (the script
         grants min(available, lease_size)) and spends them locally with no round trip. When half
         are spent it tops the lease up to `lease_size` in the background (about two round trips
         per `lease_size` requests), so requests do not wait on Redis while tokens last; a request
         that finds none waits on the fetch in flight (one fetch shared by every request for that
         key meanwhile). It drops what is left after `min(per_s, 1 s)` from the last grant so
         unused tokens are not hoarded. A refusal
         from Redis is remembered until the moment Redis said a token comes back, so a flood of
         refused requests does not become a flood of Redis calls. When more requests wait on a
         fetch than it brought, one more fetch asks for max(lease_size, their total): each round
         trip is bounded by `timeout`. Fixed windows are always exact.

         Bounds: tokens are counted in Redis when they are leased, not when they are spent, so
         within any window at most `lease_size x workers x nodes` requests beyond the limit can
         pass (tokens leased before a refill and spent after it), and up to the same number can be
         refused below the limit (tokens stranded in other workers' leases until they expire).
         `max_overshoot` = lease_size x workers, this node's share of that bound (0 in exact mode).
         `remaining` of a leased decision is an estimate: this worker's tokens plus what Redis had
         left at the last fetch.

Failures: every Redis call is bounded by `timeout`. When Redis is slow, paused, down or the
connection resets, the connection is dropped, every pending call fails at once, and until a new
connection is up no call goes to Redis: `fail_open` decides with `fallback` (the local counters;
with no fallback it admits), `fail_closed` raises CounterBackendError (the policy answers 503).
A background task reconnects with jittered exponential back-off (50 ms -> 2 s; the back-off is
not reset by a connection that dies within 2 s, so a Redis that accepts but does not answer is not
hammered). One WARNING per outage, one INFO at recovery. An error reply (OOM, CLUSTERDOWN, a
wrong key type...) gets the failure behaviour for that call only, with a WARNING at most once a
minute. Metrics, plain ints: `errors` (failed calls, lost connections, failed reconnection
attempts), `fallbacks` (decisions made locally, or refused, because Redis was unusable),
`reconnects` (recoveries after an outage); `state` is "up" or "down".

Redis Cluster (redis+cluster://host:port,host:port or ?cluster=true): the slot map comes from
CLUSTER SLOTS, each worker keeps one pipelined connection per master and sends each decision to
its key's slot owner; MOVED updates the map (and relearns the whole map when it names a node not
connected yet), ASK is followed (ASKING + the command); at most 3 redirections per call. A node
that is unreachable fails only the keys it owns; `state` is "up" only while every slot is served.
"""
from __future__ import annotations

import asyncio
import binascii
import hashlib
import logging
import random

from .._core.ratelimit import Lease
from ..errors import CounterBackendError
from .resp import ConnectionFailure, RedisURL, ReplyError, RespConnection, bulk, connect

log = logging.getLogger("fastgate.redis")

US = 1_000_000

# KEYS[1] = the bucket. ARGV: emission interval T (us), burst, cost, want (tokens to take: cost in
# exact mode, the lease size in lease mode). Returns {granted, remaining, retry_us, reset_us}.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local avail = math.floor((now - tat) / T + burst + 1e-9)
if avail < cost then
  local retry = math.ceil(tat + (cost - burst) * T - now)
  if retry < 1 then retry = 1 end
  if avail < 0 then avail = 0 end
  return {0, avail, retry, math.ceil(tat - now)}
end
local n = avail
if want < n then n = want end
tat = tat + n * T
local ttl = math.ceil((tat - now) / 1000)
if ttl < 1 then ttl = 1 end
redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', ttl)
local left = avail - n
local retry = 0
if left < 1 then
  retry = math.ceil(tat + (1 - burst) * T - now)
  if retry < 1 then retry = 1 end
end
return {n, left, retry, math.ceil(tat - now)}
"""

# KEYS = the two window hashes {w = window index, n = count}, used by window parity.
# ARGV: limit, window (us), cost, want. Returns {granted, remaining, retry_us, reset_us}.
SLIDING_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local idx = math.floor(now / win)
local elapsed = now - idx * win
local ck, pk = KEYS[1], KEYS[2]
if idx % 2 == 1 then ck, pk = KEYS[2], KEYS[1] end
local c = redis.call('HMGET', ck, 'w', 'n')
local p = redis.call('HMGET', pk, 'w', 'n')
local b, prev = 0, 0
if tonumber(c[1]) == idx then b = tonumber(c[2]) end
if tonumber(p[1]) == idx - 1 then prev = tonumber(p[2]) end
local est = prev * ((win - elapsed) / win) + b
local avail = math.floor(limit - est + 1e-9)
local reset = win - elapsed
-- how long until a request of `cost` could pass with `count` in this window, if nothing else comes
local function wait(count, cost)
  local room = limit - count - cost
  if room >= 0 and prev > 0 then
    local e = math.ceil(win - room * win / prev)
    if e > elapsed then return e - elapsed end
    return 1
  end
  if limit < cost then return 2 * win end
  local e = 0
  if count > 0 then e = math.ceil(win - (limit - cost) * win / count) end
  if e < 0 then e = 0 end
  return (win - elapsed) + e
end
if avail < cost then
  if avail < 0 then avail = 0 end
  return {0, avail, wait(b, cost), reset}
end
local n = avail
if want < n then n = want end
redis.call('HSET', ck, 'w', string.format('%d', idx), 'n', string.format('%d', b + n))
redis.call('PEXPIRE', ck, math.ceil((2 * win - elapsed) / 1000) + 1)
local left = avail - n
local retry = 0
if left < 1 then retry = wait(b + n, 1) end
return {n, left, retry, reset}
"""

# KEYS[1] = this window's counter. ARGV: limit, ttl (ms), cost. Returns {allowed, remaining}.
FIXED_LUA = """
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[3])
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n + cost > limit then
  local left = limit - n
  if left < 0 then left = 0 end
  return {0, left}
end
n = redis.call('INCRBY', KEYS[1], cost)
if n == cost then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, limit - n}
"""

_GCRA, _SLIDING, _FIXED = 0, 1, 2
_METHODS = ("gcra", "sliding_window", "fixed_window")
_SCRIPTS = (GCRA_LUA, SLIDING_LUA, FIXED_LUA)
_NUMKEYS = (1, 2, 1)
_NARGS = (4, 4, 3)


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


def _heads(cmd: bytes, first: bytes) -> tuple[bytes, ...]:
    """The fixed start of each script's command: *N, EVALSHA sha (or EVAL body), numkeys."""
    return tuple(b"*%d\r\n" % (3 + nk + na) + bulk(cmd) + bulk(first(i)) + bulk(b"%d" % nk)
                 for i, (nk, na) in enumerate(zip(_NUMKEYS, _NARGS, strict=True)))


_EVALSHA_HEADS = _heads(b"EVALSHA", lambda i: _sha(_SCRIPTS[i]))
_EVAL_HEADS = _heads(b"EVAL", lambda i: _SCRIPTS[i].encode())
_EVALSHA_GCRA, _EVALSHA_SLIDING = _EVALSHA_HEADS[_GCRA], _EVALSHA_HEADS[_SLIDING]
_COST1 = bulk(b"1") * 2  # cost 1, want 1
_SETUP = tuple(("SCRIPT", "LOAD", s) for s in _SCRIPTS)  # on every new connection
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
SLOTS = 16384


def _num(x) -> bytes:
    if isinstance(x, float):
        return b"%d" % x if x.is_integer() else repr(x).encode()
    return b"%d" % x


def _args(*args) -> bytes:
    return b"".join(bulk(_num(a)) for a in args)


# Tokens of one key this worker took from Redis, and the fetch in flight: a compiled class so that
# the rate-limit hook (hooks.RedisLease) reads its fields as C fields.
_Lease = Lease


class RedisCounters:
    """See the module docstring."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", mode: str = "lease", lease_size: int = 10,
                 timeout: float = 0.05, on_failure: str = "fail_open", key_prefix: str = "fastgate:",
                 fallback=None, workers: int = 1, *, coalesce: bool = True, connect_timeout: float | None = None):
        if mode not in ("exact", "lease"):
            raise ValueError(f"mode must be 'exact' or 'lease', not {mode!r}")
        if on_failure not in ("fail_open", "fail_closed"):
            raise ValueError(f"on_failure must be 'fail_open' or 'fail_closed', not {on_failure!r}")
        if lease_size < 1 or timeout <= 0:
            raise ValueError("lease_size and timeout must be positive")
        self.url = RedisURL(url)
        self.mode = mode
        self.lease = mode == "lease"
        self.lease_size = int(lease_size)
        self.timeout = float(timeout)
        self.connect_timeout = connect_timeout if connect_timeout is not None else max(1.0, self.timeout)
        self.fail_open = on_failure == "fail_open"
        self.on_failure = on_failure
        self.key_prefix = key_prefix
        self._pre = key_prefix.encode() + b"{"
        self.fallback = fallback
        self.workers = max(1, int(workers))
        self.max_overshoot = self.lease_size * self.workers if self.lease else 0
        self._low = self.lease_size // 2  # a lease this low is topped up in the background
        self.coalesce = coalesce
        # metrics
        self.state = "down"
        self.errors = 0  # failed calls, lost connections, failed connection attempts
        self.fallbacks = 0  # decisions made by the fallback (or failed closed) because Redis was unusable
        self.reconnects = 0  # connections made again after an outage
        self._conn: RespConnection | None = None  # the one connection (not in cluster mode)
        self._cluster = _Cluster() if self.url.cluster else None
        self._loop = None
        self._closed = False
        self._reconnecting = None
        self._sweeper = None
        self._delay = 0.05
        self._up_since = 0.0
        self._down_since = 0.0
        self._warned = False
        self._quiet_until = 0.0  # error replies: one warning a minute
        self._params: dict = {}
        self._gcra_leases: dict = {}
        self._sliding_leases: dict = {}

    # -- life ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (bounded by connect_timeout); if Redis is not there yet, start down and keep trying."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        try:
            await self._connect()
        except Exception as e:
            self.errors += 1
            self._outage(f"cannot connect: {_why(e)}")
            self._reconnecting = self._loop.create_task(self._reconnect())
        if self.lease:
            self._sweeper = self._loop.call_later(2.0, self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        task, self._reconnecting = self._reconnecting, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        conns = [self._conn] if self._conn is not None else []
        self._conn = None
        if self._cluster is not None:
            conns += self._cluster.conns.values()
            self._cluster.conns = {}
        self.state = "down"
        for conn in conns:
            conn.close()

    async def _connect(self) -> None:
        if self._cluster is not None:
            return await self._connect_cluster()
        conn = await connect(self.url, self.timeout, self.connect_timeout, self._lost, _SETUP, self.coalesce)
        if self._closed:
            conn.close()
            return
        self._conn = conn
        self.state = "up"
        self._up_since = self._loop.time()

    async def _connect_cluster(self) -> None:
        """Learn the slot map, connect to every master missing a connection; raise unless all slots are served."""
        cl = self._cluster
        slots = None
        for conn in list(cl.conns.values()):
            try:
                slots = await conn.execute("CLUSTER", "SLOTS")
                break
            except Exception:
                continue
        if slots is None:
            why = None
            for host, port in self.url.seeds:
                try:
                    conn = await connect(self.url.at(host, port), self.timeout, self.connect_timeout,
                                         None, (), self.coalesce)
                except Exception as e:
                    why = e
                    continue
                try:
                    slots = await conn.execute("CLUSTER", "SLOTS")
                    break
                except Exception as e:
                    why = e
                finally:
                    conn.close()
            if slots is None:
                raise why or ConnectionFailure("no cluster seed answered")
        cl.load(slots, self.url.seeds[0][0])
        missing = [a for a in cl.masters if a not in cl.conns]
        if missing:
            await asyncio.gather(*(self._connect_node(a) for a in missing), return_exceptions=True)
        if self._closed:
            return
        uncovered = cl.uncovered()
        if uncovered:
            if self.state == "up":
                self.state = "down"
                self._outage(uncovered)
            raise ConnectionFailure(uncovered)
        self.state = "up"
        self._up_since = self._loop.time()

    async def _connect_node(self, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        conn = await connect(self.url.at(host, int(port)), self.timeout, self.connect_timeout, self._lost,
                             _SETUP, self.coalesce)
        conn.addr = addr
        if self._closed or addr in self._cluster.conns:
            conn.close()
            return
        self._cluster.conns[addr] = conn

    def _lost(self, conn: RespConnection, exc: Exception) -> None:
        cl = self._cluster
        if cl is not None:
            if cl.conns.get(conn.addr) is not conn:
                return
            del cl.conns[conn.addr]
        elif conn is not self._conn:
            return
        else:
            self._conn = None
        self.state = "down"
        self.errors += 1
        if self._closed:
            return
        if self._loop.time() - self._up_since > 2.0:  # it was up a while: start again from the shortest wait
            self._delay = 0.05
        self._outage(_why(exc) if cl is None else f"{conn.addr}: {_why(exc)}")
        self._reconnect_soon()

    def _reconnect_soon(self) -> None:
        if self._reconnecting is None and not self._closed:
            self._reconnecting = self._loop.create_task(self._reconnect())

    def _outage(self, why: str) -> None:
        self._down_since = self._loop.time()
        if not self._warned:
            self._warned = True
            then = "deciding with the local counters" if self.fail_open else "refusing with 503"
            log.warning("redis counters at %s unavailable (%s): %s until it is back", self.url, why, then)

    async def _reconnect(self) -> None:
        try:
            while not self._closed:
                delay = self._delay
                await asyncio.sleep(random.uniform(delay / 2, delay))
                self._delay = min(delay * 2, 2.0)
                try:
                    await self._connect()
                except Exception:
                    self.errors += 1
                    continue
                if self.state == "up":
                    if self._warned:  # an outage was declared: this is a recovery
                        self._warned = False
                        self.reconnects += 1
                        log.info("redis counters at %s are back after %.1f s", self.url,
                                 self._loop.time() - self._down_since)
                return
        finally:
            self._reconnecting = None

    def _link(self, key: bytes) -> RespConnection | None:
        """The connection for `key` when not the single one: its cluster node's, if up."""
        cl = self._cluster
        if cl is None:
            return None
        return cl.conns.get(cl.slots[key_slot(self._pre + key + b"}")])

    def command(self, key: bytes, *args) -> asyncio.Future:
        """Any command on the connection that serves the Redis key `prefix{key}` (its cluster node's),
        bounded by `timeout`; raises ConnectionFailure at once while Redis is down. For the policies
        that keep data rather than counts (the shared proxy cache)."""
        conn = self._link(key) if self._cluster is not None else self._conn
        if conn is None or conn.closed:
            raise ConnectionFailure("redis is down")
        return conn.execute(*args)

    def full_key(self, key: bytes) -> bytes:
        return self._pre + key + b"}"

    # -- decisions -------------------------------------------------------------------------------
    def gcra(self, key: bytes, rate: float, per_s: float, burst: int, cost: int = 1):
        if self.lease:
            lease = self._gcra_leases.get(key)
            if lease is not None and lease.tokens >= cost:
                now = self._loop.time()
                if now < lease.expires:
                    lease.tokens -= cost
                    if lease.tokens <= self._low and lease.waiters is None:
                        self._refill(lease)
                    left = lease.reset_at - now
                    return True, lease.tokens + lease.remaining, 0.0, left if left > 0.0 else 0.0
            return self._leased(self._gcra_leases, lease, _GCRA, (key, rate, per_s, burst, cost))
        conn = self._conn or self._link(key)
        if conn is None:
            return self._down(_GCRA, (key, rate, per_s, burst, cost))
        tail = self._gcra_tail(key, rate, per_s, burst)
        tail += _COST1 if cost == 1 else bulk(b"%d" % cost) * 2
        fut = self._loop.create_future()
        conn.request(_EVALSHA_GCRA + tail, self._on_exact, (fut, _GCRA, tail, (key, rate, per_s, burst, cost), conn, 0))
        return fut

    def sliding_window(self, key: bytes, limit: int, window_s: float, cost: int = 1):
        if self.lease:
            lease = self._sliding_leases.get(key)
            if lease is not None and lease.tokens >= cost:
                now = self._loop.time()
                if now < lease.expires:
                    lease.tokens -= cost
                    if lease.tokens <= self._low and lease.waiters is None:
                        self._refill(lease)
                    left = lease.reset_at - now
                    return True, lease.tokens + lease.remaining, 0.0, left if left > 0.0 else 0.0
            return self._leased(self._sliding_leases, lease, _SLIDING, (key, limit, window_s, cost))
        conn = self._conn or self._link(key)
        if conn is None:
            return self._down(_SLIDING, (key, limit, window_s, cost))
        tail = self._sliding_tail(key, limit, window_s)
        tail += _COST1 if cost == 1 else bulk(b"%d" % cost) * 2
        fut = self._loop.create_future()
        conn.request(_EVALSHA_SLIDING + tail, self._on_exact, (fut, _SLIDING, tail, (key, limit, window_s, cost), conn, 0))
        return fut

    def fixed_window(self, key: bytes, limit: int, window_id: int, ttl_s: float, cost: int = 1):
        """Always exact (one script call), in lease mode too."""
        conn = self._conn or self._link(key)
        if conn is None:
            return self._down(_FIXED, (key, limit, window_id, ttl_s, cost))
        rk = b"%s%s}:fw:%d" % (self._pre, key, window_id)
        tail = b"$%d\r\n%s\r\n%s" % (len(rk), rk, _args(limit, max(1, round(ttl_s * 1000)), cost))
        fut = self._loop.create_future()
        conn.request(_EVALSHA_HEADS[_FIXED] + tail, self._on_exact,
                     (fut, _FIXED, tail, (key, limit, window_id, ttl_s, cost), conn, 0))
        return fut

    def _gcra_tail(self, key: bytes, rate: float, per_s: float, burst: int) -> bytes:
        """The packed key and the first two arguments (T in us, burst)."""
        p = self._params.get((_GCRA, rate, per_s, burst))
        if p is None:
            p = self._params[(_GCRA, rate, per_s, burst)] = _args(per_s / rate * US, burst)
        rk = self._pre + key + b"}"
        return b"$%d\r\n%s\r\n%s" % (len(rk), rk, p)

    def _sliding_tail(self, key: bytes, limit: int, window_s: float) -> bytes:
        """The two packed window keys and the first two arguments (limit, window in us)."""
        p = self._params.get((_SLIDING, limit, window_s))
        if p is None:
            p = self._params[(_SLIDING, limit, window_s)] = _args(limit, round(window_s * US))
        base = self._pre + key
        n = len(base) + 6
        return b"$%d\r\n%s}:sw:0\r\n$%d\r\n%s}:sw:1\r\n%s" % (n, base, n, base, p)

    # -- replies ---------------------------------------------------------------------------------
    def _on_exact(self, reply, ctx) -> None:
        """ctx = (future, kind, packed tail, decision args, connection, redirections)."""
        fut = ctx[0]
        if type(reply) is list:
            if not fut.done():
                if ctx[1] == _FIXED:
                    fut.set_result((reply[0] == 1, reply[1]))
                    return
                granted, remaining, retry_us, reset_us = reply
                if granted:
                    fut.set_result((True, remaining, 0.0, reset_us / US))
                else:
                    fut.set_result((False, remaining, retry_us / US, reset_us / US))
            return
        if fut.done() or self._again(reply, ctx[1], ctx[2], self._on_exact, ctx):
            return
        self._failed(fut, ctx[1], ctx[3], reply)

    def _again(self, reply, kind: int, tail: bytes, cb, ctx) -> bool:
        """Send a command again where it can succeed: as EVAL after NOSCRIPT (which also caches the
        script), to another cluster node after MOVED / ASK. ctx ends with (connection, redirections)."""
        if not isinstance(reply, ReplyError):
            return False
        text = str(reply)
        conn = ctx[-2]
        if text.startswith("NOSCRIPT"):
            head = _EVAL_HEADS[kind]
        elif self._cluster is not None and text.startswith(("MOVED ", "ASK ")) and ctx[-1] < 3:
            kind_, _slot, addr = (text.split() + ["", ""])[:3]
            conn = self._cluster.conns.get(addr)
            if kind_ == "MOVED":
                self._cluster.moved(int(_slot), addr)
                if conn is None:
                    self._reconnect_soon()  # a node we do not know yet: learn the map again
            if conn is not None and kind_ == "ASK" and not conn.closed:
                conn.request(_ASKING, _ignore, None)
            head = _EVALSHA_HEADS[kind]
        else:
            return False
        if conn is None or conn.closed:
            return False
        ctx = ctx[:-2] + (conn, ctx[-1] + 1)
        conn.request(head + tail, cb, ctx)
        return True

    # -- failure -----------------------------------------------------------------------------------
    def _down(self, kind: int, args: tuple):
        """Redis is not usable now: decide locally or refuse, at once."""
        self.fallbacks += 1
        if not self.fail_open:
            raise CounterBackendError("redis counters unavailable")
        if self.fallback is not None:
            return getattr(self.fallback, _METHODS[kind])(*args)
        return _admit(kind, args)

    def _resolve_down(self, fut, kind: int, args: tuple) -> None:
        if fut.done():
            return
        try:
            fut.set_result(self._down(kind, args))
        except Exception as e:
            fut.set_exception(e)

    def _failed(self, fut, kind: int, args: tuple, why) -> None:
        """A call failed (connection lost, timed out, error reply): the failure behaviour."""
        self._count_failure(why)
        self._resolve_down(fut, kind, args)

    def _count_failure(self, why) -> None:
        if not isinstance(why, ConnectionFailure):
            self.errors += 1  # connection failures were counted once, by _lost
            now = self._loop.time()
            if now >= self._quiet_until:
                self._quiet_until = now + 60.0
                log.warning("redis counters call failed (%s): %s", why, "using the local counters"
                            if self.fail_open else "refusing with 503")

    # -- lease -------------------------------------------------------------------------------------
    def _leased(self, leases: dict, lease: _Lease | None, kind: int, args: tuple):
        """No usable local token: share the fetch in flight, repeat a recent refusal, or fetch."""
        cost = args[-1]
        now = self._loop.time()
        if lease is not None:
            if lease.waiters is not None:  # a fetch is in flight: share it
                fut = self._loop.create_future()
                lease.waiters.append((fut, cost))
                return fut
            if now < lease.refused_until and cost >= lease.refused_cost:
                left = lease.reset_at - now
                return False, 0, lease.refused_until - now, left if left > 0.0 else 0.0
            if now >= lease.expires:
                lease.tokens = 0  # what is left of an expired lease is not ours any more
        conn = self._conn or self._link(args[0])
        if conn is None:
            return self._down(kind, args)
        if lease is None:
            if kind == _GCRA:
                _key, rate, per_s, burst, _cost = args
                tail, ttl = self._gcra_tail(args[0], rate, per_s, burst), min(per_s, 1.0)
            else:
                _key, limit, window_s, _cost = args
                tail, ttl = self._sliding_tail(args[0], limit, window_s), min(window_s, 1.0)
            lease = leases[args[0]] = _Lease(kind, args[:-1], tail, ttl)
        fut = self._loop.create_future()
        lease.waiters = [(fut, cost)]
        self._fetch(conn, lease, cost, max(self.lease_size, cost))
        return fut

    def _refill(self, lease: _Lease) -> None:
        """Half the lease is spent and no fetch is in flight: top it up to `lease_size` in the
        background, so the requests meanwhile spend what is left instead of waiting on the round
        trip (a request that finds it empty waits on this fetch). A top-up never takes the lease
        beyond `lease_size`. Not while Redis's last refusal holds, nor while it is down, nor for
        a second after a top-up failed (an error reply: counted in `errors`, logged)."""
        now = self._loop.time()
        if now < lease.refused_until or now < lease.refill_after:
            return
        conn = self._conn or self._link(lease.args[0])
        if conn is None or conn.closed:
            return
        lease.waiters = []
        self._fetch(conn, lease, 1, self.lease_size - lease.tokens)

    def _fetch(self, conn: RespConnection, lease: _Lease, cost: int, want: int) -> None:
        lease.want = want
        tail = lease.tail + bulk(b"%d" % cost) + bulk(b"%d" % want)
        conn.request(_EVALSHA_HEADS[lease.kind] + tail, self._on_lease, (lease, tail, conn, 0))

    def _on_lease(self, reply, ctx) -> None:
        """ctx = (lease, packed tail, connection, redirections)."""
        lease = ctx[0]
        if type(reply) is not list:
            if self._again(reply, lease.kind, ctx[1], self._on_lease, ctx):
                return
            waiters, lease.waiters = lease.waiters or [], None
            if not waiters:  # a top-up nobody waited for: counted, and no other for a second
                self._count_failure(reply)
                lease.refill_after = self._loop.time() + 1.0
            for fut, cost in waiters:
                self._failed(fut, lease.kind, lease.args + (cost,), reply)
            return
        granted, remaining, retry_us, reset_us = reply
        now = self._loop.time()
        waiters, lease.waiters = lease.waiters or [], None
        lease.remaining = remaining
        lease.reset_at = now + reset_us / US
        reset = reset_us / US
        if granted:
            if now >= lease.expires:
                lease.tokens = 0
            lease.tokens += granted
            lease.expires = now + lease.ttl
        rest = None
        for i, (fut, cost) in enumerate(waiters):
            if fut.done():
                continue
            if lease.tokens < cost:
                rest = [w for w in waiters[i:] if not w[0].done()]
                break
            lease.tokens -= cost
            fut.set_result((True, lease.tokens + remaining, 0.0, reset))
        if not rest:
            if granted < lease.want:  # Redis had no more: none to ask for before it said one is due
                lease.refused_until = now + retry_us / US
                lease.refused_cost = 1
            return
        if granted and granted >= lease.want:  # Redis gave all we asked for and more are waiting
            conn = ctx[2]
            if not conn.closed:
                lease.waiters = rest
                self._fetch(conn, lease, rest[0][1], max(self.lease_size, sum(c for _f, c in rest)))
            else:
                for fut, cost in rest:
                    self._resolve_down(fut, lease.kind, lease.args + (cost,))
            return
        retry = retry_us / US  # granted == 0: until `cost` tokens; a partial grant: until the next token
        lease.refused_until = now + retry
        lease.refused_cost = rest[0][1] if not granted else 1
        for fut, _cost in rest:
            fut.set_result((False, 0, retry, reset))

    def _sweep(self) -> None:
        """Forget leases that expired and have nothing in flight."""
        now = self._loop.time()
        for leases in (self._gcra_leases, self._sliding_leases):
            stale = [k for k, v in leases.items()
                     if v.waiters is None and now >= v.expires and now >= v.refused_until]
            for k in stale:
                del leases[k]
        if not self._closed:
            self._sweeper = self._loop.call_later(2.0, self._sweep)


class _Cluster:
    """The slot map of a Redis Cluster and one connection per master."""

    __slots__ = ("slots", "masters", "conns")

    def __init__(self):
        self.slots: list[str] = [""] * SLOTS  # slot -> "host:port" of its master ("" = unserved)
        self.masters: set[str] = set()
        self.conns: dict[str, RespConnection] = {}

    def load(self, reply, default_host: str) -> None:
        """Apply a CLUSTER SLOTS reply."""
        slots = [""] * SLOTS
        masters = set()
        for entry in reply:
            first, last, master = entry[0], entry[1], entry[2]
            host = master[0].decode() if master[0] and master[0] != b"?" else default_host
            addr = f"{host}:{master[1]}"
            masters.add(addr)
            slots[first:last + 1] = [addr] * (last - first + 1)
        self.slots, self.masters = slots, masters

    def moved(self, slot: int, addr: str) -> None:
        self.slots[slot] = addr
        self.masters.add(addr)

    def uncovered(self) -> str:
        """Why not every slot is served ("" when all are)."""
        down = {a for a in self.slots if a not in self.conns}
        if not down:
            return ""
        if "" in down:
            return f"{self.slots.count('')} slots have no master"
        return "cannot reach " + ", ".join(sorted(down))


def key_slot(name: bytes) -> int:
    """Redis Cluster's slot of a key name: CRC16 (XMODEM) of its hash tag, or of all of it."""
    s = name.find(b"{")
    if s != -1:
        e = name.find(b"}", s + 1)
        if e > s + 1:
            name = name[s + 1:e]
    return binascii.crc_hqx(name, 0) & (SLOTS - 1)


def _ignore(_reply, _arg) -> None:
    pass


def _admit(kind: int, args: tuple):
    """fail_open with no fallback: admit."""
    if kind == _GCRA:
        _key, _rate, _per, burst, cost = args
        return True, max(0, burst - cost), 0.0, 0.0
    if kind == _SLIDING:
        _key, limit, _window, cost = args
        return True, max(0, limit - cost), 0.0, 0.0
    _key, limit, _wid, _ttl, cost = args
    return True, max(0, limit - cost)


def _why(e: BaseException) -> str:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return str(e) or type(e).__name__
