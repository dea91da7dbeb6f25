"""The data plane (compiled; see proxy.pyx). What policies and plugins use is `Exchange`."""
import asyncio
from typing import Any, final

from .balance import Health, Peer, UpstreamCore
from .stats import RouteStats

IDEMPOTENT: frozenset[bytes]

def hex16(v: int) -> bytes:
    """The 16 hex digits the data plane writes for v (request and trace ids)."""

def llhttp_direct() -> bool:
    """True when request HTTP versions and methods are read from llhttp's state (the import-time probe passed)."""

def keep_alive_direct() -> bool:
    """True when a request's keep-alive is read from llhttp's flags (the import-time probe passed)."""

@final
class Exchange:
    """One request/response. A policy's hooks receive it; fields not listed here are internal."""
    proto: GatewayProtocol
    route: RouteCore | None  # server.generation.CompiledRoute
    method: bytes
    version: int  # 10 or 11
    keep_alive: bool
    request_id: bytes
    headers: list[tuple[bytes, bytes]]  # the request's header fields as received
    target_path: bytes  # path and query sent upstream
    path: bytes  # the normalised request path (no query)
    query: bytes  # the raw query string, without "?"
    host: bytes  # the authority routed on
    params: tuple[bytes, ...]  # the route pattern's captured {params}, in order
    client_ip: bytes  # the peer, or who a trusted proxy says the client is
    consumer: Any  # policies.base.Consumer, set by an authentication policy
    claims: Any  # what authentication verified (JWT claims, introspection answer)
    resp_extra: bytes  # header lines policies add to the response
    up_add: tuple[tuple[bytes, bytes], ...]  # header pairs policies add for the upstream
    up_drop: frozenset[bytes] | None
    resp_drop: frozenset[bytes] | None
    scratch: Any  # per-request state a policy keeps between its hooks
    status: int  # the upstream's status, once its head arrived
    capture: Capture | None
    cache_key: Any
    local: bytes | None  # a response the gateway writes itself
    body_bytes: int
    def __init__(self, proto: GatewayProtocol) -> None: ...
    def header(self, name: bytes) -> bytes | None:
        """The first value of the request header `name` (lowercase bytes), or None."""
    def reply(self, status: int, reason: str, extra_headers: bytes = b"", **fields: Any) -> bytes:
        """A complete JSON error response for a policy to return: {"error": reason, ...fields}."""
    def add_upstream_header(self, name: bytes, value: bytes) -> None: ...
    def drop_upstream_header(self, name: bytes) -> None: ...
    def authenticated(self, consumer: Any, claims: Any = None, credential: bytes | None = None) -> None: ...

@final
class WorkerState:
    loop: asyncio.AbstractEventLoop
    gen: Any  # server.generation.Generation
    connections: set[GatewayProtocol]
    date: bytes
    draining: bool
    now: float
    requests: int
    metrics: Any
    access_log: Any
    usage: Any
    spans: Any
    def __init__(self, loop: asyncio.AbstractEventLoop, gen: Any, date: bytes, rid_prefix: bytes) -> None: ...
    def new_request_id(self) -> bytes: ...
    def use_router(self, router: Any) -> None:
        """Match new requests with `router` (Generation.set_lifecycle rebuilt it)."""

@final
class GatewayProtocol:
    """asyncio protocol of one client connection."""
    transport: asyncio.Transport | None
    client_ip: bytes
    def __init__(self, state: WorkerState, scheme: bytes = b"http") -> None: ...
    @property
    def date(self) -> bytes: ...
    def count(self, key: bytes, n: int = 1) -> None:
        """Bump a host-wide metric (metrics.py key format)."""
    def check(self, now: float) -> None:
        """Timeouts, called by the worker's tick."""
    def drain(self, now: float) -> None: ...
    def abort(self) -> None: ...

@final
class RouteCore:
    """The typed fields of server.generation.CompiledRoute (read by the data plane in C)."""
    stats: RouteStats
    name: str
    group: UpstreamCore | None
    mock: tuple[bytes, bytes] | None
    preserve_host: bool
    req_drop: frozenset[bytes]
    req_add: tuple[tuple[bytes, bytes], ...]
    resp_add: bytes
    resp_remove: frozenset[bytes]
    api: str | None
    version: str | None
    chain: Any  # policies.base.Chain
    canary: Any  # server.canary.Canary | None

class Target(Peer):
    address: str
    host: str
    port: int
    idle: list[UpstreamProtocol]
    host_header: bytes
    def __init__(self, address: str, host: str, port: int, weight: int, pool_cfg: Any, health: Health,
                 host_header: bytes) -> None: ...
    def take_idle(self) -> UpstreamProtocol | None: ...
    def give_back(self, conn: UpstreamProtocol, now: float) -> None: ...
    def sweep_idle(self, now: float) -> None: ...
    def close_all(self) -> None: ...

@final
class UpstreamProtocol:
    target: Target
    transport: asyncio.Transport | None
    ex: Exchange | None
    requests: int
    closed: bool
    def __init__(self, target: Target) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

class Capture:
    """Where a response goes when policies need its body (ex.capture, set by a response hook)."""
    tee: bool
    cap: int
    head: bytes
    body: bytearray
    over: bool
    def __init__(self, tee: bool, cap: int) -> None: ...

async def connect(loop: asyncio.AbstractEventLoop, target: Target, timeout: float) -> UpstreamProtocol: ...
