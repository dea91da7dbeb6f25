"""The config document's shape: msgspec Structs only, no I/O.

Keys are snake_case. Durations are seconds (floats), sizes are bytes. Defaults follow nginx and Envoy
where they have one (noted beside each field).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta


class Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


Port = Annotated[int, Meta(ge=1, le=65535)]
Seconds = Annotated[float, Meta(gt=0, le=86400 * 365)]
OptSeconds = Annotated[float, Meta(ge=0, le=86400 * 365)]  # 0 = off
Bytes = Annotated[int, Meta(ge=0)]
Count = Annotated[int, Meta(ge=1)]
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
Status = Annotated[int, Meta(ge=100, le=599)]
Method = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
HeaderName = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]


# --- listeners -------------------------------------------------------------------------------------
class Tls(Base):
    certificate: str
    key: str


class Listener(Base):
    port: Port
    kind: Literal["proxy", "admin", "portal"] = "proxy"
    address: str = "127.0.0.1"
    tls: Tls | None = None
    backlog: Annotated[int, Meta(ge=1, le=65535)] = 1024


def default_listeners() -> list[Listener]:
    return [Listener(kind="proxy", port=8000)]


# --- limits ----------------------------------------------------------------------------------------
class Limits(Base):
    max_uri_bytes: Annotated[int, Meta(ge=64)] = 8192  # nginx large_client_header_buffers: 8k per line
    max_header_bytes: Annotated[int, Meta(ge=256)] = 32768  # nginx: 4 x 8k buffers
    max_headers: Annotated[int, Meta(ge=1, le=10000)] = 100  # Envoy max_headers_count
    max_body_bytes: Bytes = 1048576  # nginx client_max_body_size 1m; 0 = unlimited
    header_timeout: Seconds = 10.0  # from a request's first byte to its last header byte
    body_timeout: Seconds = 60.0  # nginx client_body_timeout (between two reads)
    keepalive_timeout: Seconds = 75.0  # nginx keepalive_timeout
    keepalive_requests: Count = 1000  # nginx keepalive_requests
    send_timeout: Seconds = 60.0  # nginx send_timeout (client not reading)
    max_connections: Count = 16384  # per worker; past it new connections are closed at once
    drain_timeout: Seconds = 30.0  # SIGTERM: in-flight requests get this long


# --- counters and store ----------------------------------------------------------------------------
class RedisCounters(Base):
    url: str = "redis://127.0.0.1:6379/0"
    mode: Literal["exact", "lease"] = "lease"
    lease_size: Count = 10
    timeout: Seconds = 0.05
    on_failure: Literal["fail_open", "fail_closed"] = "fail_open"
    key_prefix: str = "fastgate:"


class Counters(Base):
    backend: Literal["local", "redis"] = "local"
    capacity: Annotated[int, Meta(ge=64, le=1 << 24)] = 65536
    redis: RedisCounters | None = None


class Store(Base):
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: str = "fastgate.db"
    redis_url: str | None = None


# --- upstreams -------------------------------------------------------------------------------------
class Target(Base):
    address: Annotated[str, Meta(min_length=3)]  # host:port
    weight: Annotated[int, Meta(ge=0, le=10000)] = 100


class Timeouts(Base):
    connect: Seconds = 5.0
    read: Seconds = 60.0  # nginx proxy_read_timeout: between two reads
    write: Seconds = 60.0
    total: OptSeconds = 0.0  # whole exchange; 0 = off


class Pool(Base):
    max_idle: Annotated[int, Meta(ge=0, le=100000)] = 64  # idle keep-alive connections per target
    idle_timeout: Seconds = 50.0  # keep below the upstream's own (nginx/Node default 60 s)
    max_requests: Count = 1000  # per upstream connection


class ActiveHealth(Base):
    path: str = "/health"
    interval: Seconds = 5.0
    timeout: Seconds = 1.0
    healthy_threshold: Count = 2
    unhealthy_threshold: Count = 3
    healthy_statuses: list[Status] = []  # empty = 200-399


class PassiveHealth(Base):
    max_failures: Count = 5  # consecutive failures (connect errors, resets, timeouts, 5xx below)
    eject_for: Seconds = 30.0
    failure_statuses: list[Status] = msgspec.field(default_factory=lambda: [502, 503, 504])


class CircuitBreaker(Base):
    window: Seconds = 10.0
    min_requests: Count = 20
    failure_ratio: Annotated[float, Meta(gt=0, le=1)] = 0.5
    open_for: Seconds = 30.0


class Health(Base):
    active: ActiveHealth | None = None
    passive: PassiveHealth | None = PassiveHealth()


class Upstream(Base):
    name: Name
    targets: Annotated[list[Target], Meta(min_length=1)]
    balancer: Literal["round_robin", "least_connections", "consistent_hash", "p2c", "random"] = "round_robin"
    hash_on: Literal["ip", "header", "cookie", "consumer"] = "ip"
    hash_key: str | None = None  # header or cookie name for hash_on header/cookie
    host_header: str | None = None  # Host sent upstream (default: the target's address)
    timeouts: Timeouts = Timeouts()
    pool: Pool = Pool()
    retries: Annotated[int, Meta(ge=0, le=10)] = 2
    health: Health = Health()
    circuit_breaker: CircuitBreaker | None = None

    def __post_init__(self):
        if self.balancer == "consistent_hash" and self.hash_on in ("header", "cookie") and not self.hash_key:
            raise ValueError(f"hash_on {self.hash_on!r} needs hash_key (the {self.hash_on} name)")
        if not any(t.weight for t in self.targets):
            raise ValueError("at least one target needs a weight above 0")


# --- policies (tagged by `type`) -------------------------------------------------------------------
class Policy(Base, tag_field="type"):
    pass


class RequestHeaders(Policy, tag="request-headers"):
    add: dict[HeaderName, str] = {}
    remove: list[HeaderName] = []


class ResponseHeaders(Policy, tag="response-headers"):
    add: dict[HeaderName, str] = {}
    remove: list[HeaderName] = []


AnyPolicy = RequestHeaders | ResponseHeaders


# --- routes and APIs -------------------------------------------------------------------------------
class Mock(Base):
    status: Status = 200
    headers: dict[HeaderName, str] = {}
    body: str | None = None
    json: Any = None

    def __post_init__(self):
        if self.body is not None and self.json is not None:
            raise ValueError("give either body or json, not both")


class Route(Base):
    name: Name
    paths: Annotated[list[str], Meta(min_length=1)]
    hosts: list[str] = []
    methods: list[Method] = []
    priority: int = 0
    upstream: str | None = None
    mock: Mock | None = None
    strip_path: bool = False  # remove the pattern's static prefix (the part before `*`)
    path_rewrite: str | None = None  # template using the pattern's {params}, e.g. /v2/users/{id}
    preserve_host: bool = False  # send the client's Host upstream
    policies: list[AnyPolicy] = []

    def __post_init__(self):
        if (self.upstream is None) == (self.mock is None):
            raise ValueError("a route needs exactly one of `upstream` or `mock`")
        if self.strip_path and self.path_rewrite:
            raise ValueError("strip_path and path_rewrite exclude each other")


class ApiVersion(Base):
    version: Name
    state: Literal["draft", "published", "deprecated", "retired"] = "published"
    routes: list[Route] = []
    sunset: str | None = None  # HTTP-date sent in the Sunset header while deprecated
    successor: str | None = None  # version name that replaces this one


class Api(Base):
    name: Name
    versions: Annotated[list[ApiVersion], Meta(min_length=1)]
    base_path: str = ""
    policies: list[AnyPolicy] = []


# --- plans and consumers ---------------------------------------------------------------------------
class RateLimitSpec(Base):
    rate: Annotated[float, Meta(gt=0)]
    per: Seconds = 1.0
    burst: Count | None = None


class Quota(Base):
    limit: Count
    period: Literal["hour", "day", "month"] = "day"


class Plan(Base):
    name: Name
    rate_limits: list[RateLimitSpec] = []
    quotas: list[Quota] = []


class Consumer(Base):
    username: Name
    plan: str | None = None
    groups: list[Name] = []


# --- the document ----------------------------------------------------------------------------------
class Config(Base):
    workers: Annotated[int, Meta(ge=1, le=1024)] | Literal["auto"] = 1
    listeners: list[Listener] = msgspec.field(default_factory=default_listeners)
    limits: Limits = Limits()
    counters: Counters = Counters()
    store: Store = Store()
    upstreams: list[Upstream] = []
    routes: list[Route] = []
    apis: list[Api] = []
    plans: list[Plan] = []
    consumers: list[Consumer] = []
    policies: list[AnyPolicy] = []  # global: apply to every route
    server_header: bool = False  # send `Server: fastgate` on gateway-generated responses
    access_log: str | None = None
    user: str | None = None  # started as root: workers switch to this user (and its group) after fork
    group: str | None = None
