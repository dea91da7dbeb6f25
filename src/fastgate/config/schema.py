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
MAX_INT = 2**53 - 1  # counts and sizes fit a C integer and a JSON number (an error with its path, not a crash)
Bytes = Annotated[int, Meta(ge=0, le=MAX_INT)]
Count = Annotated[int, Meta(ge=1, le=MAX_INT)]
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
    kind: Literal["proxy", "admin", "portal", "metrics"] = "proxy"
    address: str = "127.0.0.1"
    tls: Tls | None = None
    backlog: Annotated[int, Meta(ge=1, le=65535)] = 1024


def default_listeners() -> list[Listener]:
    return [Listener(kind="proxy", port=8000)]


# --- limits ----------------------------------------------------------------------------------------
class Limits(Base):
    max_uri_bytes: Annotated[int, Meta(ge=64, le=MAX_INT)] = 8192  # nginx large_client_header_buffers: 8k per line
    max_header_bytes: Annotated[int, Meta(ge=256, le=MAX_INT)] = 32768  # nginx: 4 x 8k buffers
    max_headers: Annotated[int, Meta(ge=1, le=10000)] = 100  # Envoy max_headers_count
    underscores_in_headers: bool = False  # nginx's default: header names with "_" are dropped
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
    """The control plane's SQLite file; with `backend: redis` (clustered nodes) the workers of every
    node learn its keys and revocations through Redis (control/directory.py) instead of the file."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    path: str = "fastgate.db"
    redis_url: str | None = None  # backend redis: default the counters' redis url
    key_prefix: Annotated[str, Meta(max_length=64)] = "fastgate:"


class Admin(Base):
    """The admin API's bearer token (control process, `kind: admin` listener)."""

    token: Annotated[str, Meta(min_length=16)] | None = None
    token_env: EnvName | None = None  # read the token from this environment variable instead
    allow_no_token: bool = False  # only on a loopback listener: serve the admin API without a token

    def __post_init__(self):
        if self.token is not None and self.token_env is not None:
            raise ValueError("give either token or token_env, not both")


class Portal(Base):
    """The developer portal (control process, `kind: portal` listener)."""

    approval: bool = False  # developers who sign up wait for an admin's approval


Scope = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[\x21\x23-\x5b\x5d-\x7e]+$")]  # RFC 6749 §3.3
HttpUrl = Annotated[str, Meta(min_length=8, max_length=2048, pattern=r"^https?://[^\s/?#]+$")]


class OAuth(Base):
    """fastgate as an OAuth 2.0 authorization server for apps (client credentials grant, RFC 6749
    §4.4), served by the control process (control/oauth.py): on the portal listener, or on the
    admin listener when there is no portal listener. Signing keys are made by the control process
    and kept in the store (private keys included: protect the SQLite file like a key file)."""

    enabled: bool = False
    # the `iss` of every token and the base of the published endpoints: scheme://host[:port] as
    # clients reach the listener, without a path (RFC 8414 §2: no query or fragment either)
    issuer: HttpUrl | None = None
    audience: Annotated[str, Meta(min_length=1, max_length=2048)] | Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=2048)]], Meta(min_length=1)] | None = None
    token_lifetime: Annotated[float, Meta(ge=60, le=86400)] = 3600.0  # `exp` - `iat`
    algorithm: Literal["RS256", "ES256"] = "RS256"  # RS256: what every verifier supports, and cheap to verify
    # a retired key stays published until every token it signed has expired, plus this margin (the
    # verifiers' clock leeway: the jwt policy's default is 30 s)
    overlap_margin: Annotated[float, Meta(ge=0, le=86400)] = 60.0
    # a rotated-in key is published this long before it signs: verifiers that cached the key set
    # (the jwt policy refetches on an unknown kid at most once per jwks_cooldown, 30 s) know it by then
    publish_ahead: Annotated[float, Meta(ge=0, le=86400)] = 60.0
    scopes: list[Scope] = []  # scopes_supported; when given, a client may only be allowed these

    def __post_init__(self):
        if self.enabled and self.issuer is None:
            raise ValueError("oauth.enabled needs `issuer` (the URL clients reach the token endpoint at, "
                             "e.g. https://auth.example.com)")
        if self.enabled and self.audience is None:
            raise ValueError("oauth.enabled needs `audience` (the `aud` of every token: your API's identifier)")


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


class RateLimit(Policy, tag="rate-limit"):
    """`rate` requests per `per` seconds with bursts up to `burst` (default: rate), per `key`."""

    rate: Annotated[float, Meta(gt=0)]
    per: Seconds = 1.0
    burst: Count | None = None
    algorithm: Literal["token_bucket", "gcra", "sliding_window"] = "token_bucket"
    key: Literal["ip", "route", "api", "consumer", "header"] = "ip"
    header: HeaderName | None = None  # for key: header
    backend: Literal["local", "redis"] | None = None  # default: counters.backend

    def __post_init__(self):
        if self.key == "header" and not self.header:
            raise ValueError("key `header` needs `header` (the header's name)")


# --- access and traffic (policies/access.py, threat.py, plans.py) ---------------------------------
Cidr = Annotated[str, Meta(min_length=1, max_length=64)]  # 10.0.0.0/8, 2001:db8::/32, 192.0.2.1; see check()
UaRegex = Annotated[str, Meta(min_length=1, max_length=1024)]


class IpRestriction(Policy, tag="ip-restriction"):
    """Refuse clients by address (`ex.client_ip`, after real-ip): `deny` wins, then `allow` (if any) must match."""

    allow: list[Cidr] = []
    deny: list[Cidr] = []
    status: Annotated[int, Meta(ge=400, le=599)] = 403
    message: str | None = None  # added to the JSON error as "message"

    def __post_init__(self):
        if not self.allow and not self.deny:
            raise ValueError("ip-restriction needs `allow`, `deny` or both")


class RealIp(Policy, tag="real-ip"):
    """When the TCP peer is in `trusted`, the client is the address its `header` names (nginx realip)."""

    trusted: Annotated[list[Cidr], Meta(min_length=1)]
    header: HeaderName = "x-forwarded-for"  # or x-real-ip, forwarded (RFC 7239 for=)
    recursive: bool = True  # the rightmost address not in `trusted` (nginx real_ip_recursive on)


CorsOrigin = Annotated[str, Meta(min_length=1, max_length=512)]


class Cors(Policy, tag="cors"):
    """Browser cross-origin access: preflights answered here (204), actual responses get Allow-Origin."""

    origins: Annotated[list[CorsOrigin], Meta(min_length=1)]  # https://a.example, *.example.com, *
    methods: list[Method] = msgspec.field(
        default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    headers: list[HeaderName] | None = None  # None: allow what the preflight asks for
    expose_headers: list[HeaderName] = []
    credentials: bool = False
    max_age: Annotated[int, Meta(ge=0, le=86400)] | None = None  # seconds a browser may cache a preflight

    def __post_init__(self):
        if self.credentials and "*" in self.origins:
            raise ValueError("credentials: true cannot be used with origin `*` (browsers refuse it); "
                             "list the origins")
        if self.credentials and ("*" in (self.headers or ()) or "*" in self.expose_headers):
            raise ValueError("credentials: true makes `*` in headers/expose_headers literal; list the names")


class RequestSize(Policy, tag="request-size"):
    """413 for a body above `max_bytes`: a declared length before reading; chunked bodies see `chunked`."""

    max_bytes: Bytes
    chunked: Literal["buffer", "reject"] = "buffer"  # buffer up to max_bytes (413 beyond), or 411

    def __post_init__(self):
        if self.chunked == "buffer" and self.max_bytes > 262144:
            raise ValueError("chunked: buffer holds the route's bodies in memory, up to 262144 bytes (256 KiB); "
                             "above that use chunked: reject (411 for chunked bodies)")


class JsonThreat(Policy, tag="json-threat"):
    """Refuse JSON bodies past structural limits (400 json_threat) before the upstream sees them."""

    max_depth: Annotated[int, Meta(ge=1, le=1000)] = 32
    max_keys: Count = 256  # per object
    max_string: Count = 8192  # characters, keys and values
    max_array: Count = 1024  # items per array
    max_total_keys: Count | None = None  # over the whole document
    allow_non_json: bool = False  # a body with a non-JSON content type: pass (true) or 415 (false)
    # bytes buffered to check; 413 beyond. At most 256 KiB: the engine stops reading a body past
    # protocol.BUFFER_HIGH until an upstream connection exists, which a held body never gets
    body_limit: Annotated[int, Meta(ge=1, le=262144)] = 262144


class UserAgent(Policy, tag="user-agent"):
    """Regexes (Python `re`, searched) on User-Agent: `allow` passes, then `deny` refuses; allow-only
    refuses the rest."""

    allow: list[UaRegex] = []
    deny: list[UaRegex] = []
    status: Annotated[int, Meta(ge=400, le=599)] = 403

    def __post_init__(self):
        if not self.allow and not self.deny:
            raise ValueError("user-agent needs `allow`, `deny` or both")


class RequestTermination(Policy, tag="request-termination"):
    """Answer at once (maintenance, a retired endpoint): `json` or `body`, never forwarded."""

    status: Annotated[int, Meta(ge=200, le=599)] = 503
    json: Any = None
    body: str | None = None
    content_type: Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\r\n]+$")] | None = None

    def __post_init__(self):
        if self.body is not None and self.json is not None:
            raise ValueError("give either body or json, not both")
        if self.status in (204, 304) and (self.body or self.json is not None):
            raise ValueError(f"a {self.status} response has no body")


class PlanLimits(Policy, tag="plan-limits"):
    """The consumer's plan (`plans:`): its rate limits and calendar quotas (UTC hour/day/month)."""

    require_plan: bool = False  # no consumer, or one without a plan: 403 (else it passes)
    backend: Literal["local", "redis"] | None = None  # default: counters.backend


class ConcurrencyLimit(Policy, tag="concurrency-limit"):
    """At most `limit` requests in flight per `key` on this host (shared-memory counters)."""

    limit: Count
    key: Literal["route", "consumer", "ip"] = "route"
    status: Literal[429, 503] = 429
    ttl: Seconds = 600.0  # a place a crashed worker held is forgotten this long after the key's last use


# --- authentication and authorization ------------------------------------------------------------
JwtAlgorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
                       "ES384", "ES512", "EdDSA"]
EnvName = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
ParamName = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.~\-]+$")]


class AuthFailureLimit(Policy, tag="auth-failure-limit"):
    """Brute-force protection: a client whose requests were answered 401 `max_failures` times within
    one `window` is refused (429) for `block_for` seconds before any credential is looked at."""

    max_failures: Count = 10
    window: Seconds = 60.0
    block_for: Seconds = 300.0
    key: Literal["ip", "header"] = "ip"
    header: HeaderName | None = None  # key: header — e.g. a client id some trusted edge sets
    statuses: Annotated[list[Status], Meta(min_length=1)] = msgspec.field(default_factory=lambda: [401])

    def __post_init__(self):
        if (self.key == "header") != (self.header is not None):
            raise ValueError("key: header needs `header`, and `header` needs key: header")


class KeyAuth(Policy, tag="key-auth"):
    """An API key in a header (or, when allowed, a query parameter), matched by its SHA-256 hash
    against the consumers' `keys`."""

    header: HeaderName | None = "apikey"
    query: ParamName | None = None  # off by default: a key in the query string ends up in logs
    hide_credentials: bool = True  # the upstream never sees the key
    anonymous: str | None = None  # username used when no key is sent (absent: 401)

    def __post_init__(self):
        if self.header is None and self.query is None:
            raise ValueError("key-auth needs `header` or `query`")


class BasicAuth(Policy, tag="basic-auth"):
    """`Authorization: Basic` checked against the consumers' `basic` credentials (password hashes)."""

    hide_credentials: bool = True
    anonymous: str | None = None
    cache_size: Count = 10000  # verified Authorization values kept so the KDF does not run per request


class HmacAuth(Policy, tag="hmac-auth"):
    """Kong-style HTTP signatures: `Authorization: hmac username="<key_id>", algorithm="hmac-sha256",
    headers="date request-line", signature="<base64>"`, keyed by the consumers' `hmac` credentials."""

    clock_skew: Seconds = 300.0
    algorithms: list[Literal["hmac-sha256", "hmac-sha384", "hmac-sha512"]] = \
        msgspec.field(default_factory=lambda: ["hmac-sha256", "hmac-sha384", "hmac-sha512"])
    enforce_headers: list[HeaderName] = []  # must be among the signed headers (date always is)
    validate_body: bool = False  # `Digest: SHA-256=<base64>` must match the body (and be signed)
    body_limit: Bytes = 1048576
    hide_credentials: bool = True
    anonymous: str | None = None


class JwtKey(Base):
    algorithm: JwtAlgorithm
    kid: str | None = None  # None: the key applies to tokens with any (or no) kid
    key: str | None = None  # PEM public key (RS/PS/ES/EdDSA)
    secret_env: EnvName | None = None  # HS*: the environment variable holding the shared secret
    issuer: str | None = None  # this key only signs for this `iss`

    def __post_init__(self):
        if self.algorithm.startswith("HS"):
            if self.secret_env is None or self.key is not None:
                raise ValueError(f"{self.algorithm} needs `secret_env` (a shared secret), not `key`")
        elif self.key is None or self.secret_env is not None:
            raise ValueError(f"{self.algorithm} needs `key` (a PEM public key), not `secret_env`")


class Jwt(Policy, tag="jwt"):
    """Bearer JWTs verified with configured keys and/or a JWKS; the algorithm comes from the key,
    never from the token."""

    keys: list[JwtKey] = []
    jwks_url: str | None = None
    jwks_algorithms: Annotated[list[JwtAlgorithm], Meta(min_length=1)] = \
        msgspec.field(default_factory=lambda: ["RS256", "ES256", "PS256", "EdDSA"])
    jwks_refresh: Seconds = 300.0
    jwks_cooldown: Seconds = 30.0  # at most one refetch per this long for an unknown kid
    jwks_timeout: Seconds = 5.0  # how long the first request waits for the key set (then 503)
    issuer: str | list[str] | None = None
    audience: str | list[str] | None = None
    leeway: Annotated[float, Meta(ge=0, le=600)] = 30.0
    max_token_bytes: Annotated[int, Meta(ge=64, le=1048576)] = 8192
    header: HeaderName | None = "authorization"  # `Authorization: Bearer <token>`; other headers: the raw token
    query: ParamName | None = None
    cookie: str | None = None
    claims_to_headers: dict[str, HeaderName] = {}
    consumer_claim: str = "sub"
    required_scopes: list[str] = []
    cache_size: Count = 10000
    # refuse tokens whose `jti` was revoked in the store (POST /oauth/revoke on this gateway's own
    # authorization server): a set lookup per request, the set reloaded with the store's keys
    check_revoked: bool = False

    def __post_init__(self):
        if not self.keys and not self.jwks_url:
            raise ValueError("jwt needs `keys` or `jwks_url`")
        if self.jwks_url is not None and not self.jwks_url.startswith(("http://", "https://")):
            raise ValueError("jwks_url must be an http:// or https:// URL")
        if self.header is None and self.query is None and self.cookie is None:
            raise ValueError("jwt needs `header`, `query` or `cookie`")
        if any(a.startswith("HS") for a in self.jwks_algorithms):
            raise ValueError("jwks_algorithms cannot include HS*: a key set is public, an HMAC key is a secret")


class Introspection(Policy, tag="introspection"):
    """OAuth 2.0 token introspection (RFC 7662) of the bearer token at the authorization server."""

    endpoint: str
    client_id: str
    client_secret_env: EnvName
    timeout: Seconds = 2.0
    cache_ttl: Annotated[float, Meta(ge=0, le=60)] = 60.0  # never past the token's exp
    required_scopes: list[str] = []
    consumer_claim: str = "sub"
    max_token_bytes: Annotated[int, Meta(ge=64, le=1048576)] = 8192
    cache_size: Count = 10000

    def __post_init__(self):
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http:// or https:// URL")


class Acl(Policy, tag="acl"):
    """Consumer groups allowed / denied (deny wins)."""

    allow: list[Name] = []
    deny: list[Name] = []

    def __post_init__(self):
        if not self.allow and not self.deny:
            raise ValueError("acl needs `allow` or `deny`")


class RequireScopes(Policy, tag="require-scopes"):
    """Scopes (JWT `scope`/`scp`, introspection `scope`) and claim values the token must carry."""

    scopes: list[str] = []
    claims: dict[str, Any] = {}


class ProxyCache(Policy, tag="proxy-cache"):
    """Upstream responses kept per worker (an LRU) or in Redis, honouring Cache-Control and Vary."""

    ttl: Seconds = 60.0  # when the response says nothing (s-maxage / max-age win)
    methods: list[Literal["GET", "HEAD"]] = msgspec.field(default_factory=lambda: ["GET", "HEAD"])
    statuses: list[Status] = msgspec.field(default_factory=lambda: [200, 203, 204, 300, 301, 404, 410])
    vary_headers: list[HeaderName] = []  # request headers that are part of the key
    query: bool = True  # the query string is part of the key
    max_entries: Count = 10000
    max_body: Bytes = 1048576  # larger responses are passed through, not stored
    cache_authenticated: bool = False  # cache answers to requests with credentials (Authorization, a consumer)
    backend: Literal["local", "redis"] = "local"  # redis: one cache shared by every worker of every node


class ResponseBody(Policy, tag="response-body"):
    """JSON response body edits: remove fields, rename fields (dotted paths, `*` for every array item
    or object member). The response is held back whole, up to `max_bytes` (past it: 502)."""

    remove: list[Annotated[str, Meta(min_length=1, max_length=512)]] = []
    rename: dict[Annotated[str, Meta(min_length=1, max_length=512)], Annotated[str, Meta(min_length=1,
                                                                                            max_length=128)]] = {}
    max_bytes: Annotated[int, Meta(ge=1, le=64 << 20)] = 1048576

    def __post_init__(self):
        if not self.remove and not self.rename:
            raise ValueError("response-body needs `remove` or `rename`")


TemplateValue = Annotated[str, Meta(max_length=4096)]  # may use $(header.x), $(query.x), $(consumer.username)...
QueryName = Annotated[str, Meta(min_length=1, max_length=256)]


class QueryTransform(Base):
    """Edits of the query string sent upstream (names and values as decoded; re-encoded when set)."""

    add: dict[QueryName, TemplateValue] = {}  # only when absent
    remove: list[QueryName] = []
    rename: dict[QueryName, QueryName] = {}
    replace: dict[QueryName, TemplateValue] = {}  # only when present


class RequestTransformer(Policy, tag="request-transformer"):
    """Request edits in the order remove → rename → replace → add → append (headers), then the path and
    the query. `add` sets a header only when absent, `replace` only when present, `append` always."""

    add: dict[HeaderName, TemplateValue] = {}
    remove: list[HeaderName] = []
    rename: dict[HeaderName, HeaderName] = {}
    replace: dict[HeaderName, TemplateValue] = {}
    append: dict[HeaderName, TemplateValue] = {}
    query: QueryTransform | None = None
    path: Annotated[str, Meta(min_length=1, max_length=2048)] | None = None  # /v2/{id}: the route's params


class ResponseTransformer(Policy, tag="response-transformer"):
    """Response header edits (remove → rename → replace → add → append) on the upstream's answer."""

    add: dict[HeaderName, TemplateValue] = {}
    remove: list[HeaderName] = []
    rename: dict[HeaderName, HeaderName] = {}
    replace: dict[HeaderName, TemplateValue] = {}
    append: dict[HeaderName, TemplateValue] = {}


class OpenApiValidation(Policy, tag="openapi-validation"):
    """Validate requests against an OpenAPI 3.0/3.1 document: path, query and header parameters and
    JSON bodies. 400 `validation_failed` with details; 415 for a body type the operation refuses."""

    spec: Annotated[str, Meta(min_length=1)]  # a YAML or JSON file
    operation: Annotated[str, Meta(min_length=1)] | None = None  # operationId; default: method + path
    validate: list[Literal["path", "query", "headers", "body"]] = msgspec.field(
        default_factory=lambda: ["path", "query", "headers", "body"])
    body_limit: Annotated[int, Meta(ge=1, le=262144)] = 262144
    status: Status = 400


class Plugin(Policy, tag="plugin"):
    """Your own policy class, imported by path (`package.module:ClassName`), run in the worker.

    The class's nested `Config` (a msgspec Struct) validates `config`; see README "Plugins"."""

    module: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")]
    config: dict[str, Any] = {}


AnyPolicy = RequestHeaders | ResponseHeaders | RateLimit | AuthFailureLimit | IpRestriction | RealIp | Cors | RequestSize | JsonThreat | UserAgent | RequestTermination | PlanLimits | ConcurrencyLimit | KeyAuth | BasicAuth | HmacAuth | Jwt | Introspection | Acl | RequireScopes | ProxyCache | ResponseBody | RequestTransformer | ResponseTransformer | OpenApiValidation | Plugin


# --- routes and APIs -------------------------------------------------------------------------------
class MockExample(Base):
    """A mock answered with an example of an OpenAPI 3.0/3.1 document (openapi_examples.py)."""

    spec: Annotated[str, Meta(min_length=1)]  # a YAML or JSON file, relative to the working directory
    operation: Annotated[str, Meta(min_length=1)]  # an operationId, or `GET /pets/{id}`
    status: Status | None = None  # default: the lowest 2xx response with an example (or without content)
    example: Annotated[str, Meta(min_length=1)] | None = None  # a name in `examples`; default: the first
    media_type: Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\r\n]+$")] | None = None


class Mock(Base):
    status: Status = 200
    headers: dict[HeaderName, str] = {}
    body: str | None = None
    json: Any = None
    openapi: MockExample | None = None  # the body, status and Content-Type from an OpenAPI example

    def __post_init__(self):
        if self.body is not None and self.json is not None:
            raise ValueError("give either body or json, not both")
        if self.openapi is not None:
            if self.body is not None or self.json is not None:
                raise ValueError("give either openapi or body/json, not both")
            if self.status != 200:
                raise ValueError("with openapi, choose the response with openapi.status")


class CanaryRollback(Base):
    """Send nothing more to the canary when, over `window` seconds, it answered at least
    `min_requests` times and its error share or its p99 latency (to the response head) is too high."""

    window: Annotated[float, Meta(ge=1, le=86400)] = 60.0
    min_requests: Count = 20
    max_error_rate: Annotated[float, Meta(ge=0, le=1)] | None = 0.05  # share of 5xx answers (502/504 too)
    max_p99: Seconds | None = None  # seconds to the upstream's response head


class Canary(Base):
    upstream: Name  # the canary's upstream (the route's own `upstream` is the stable one)
    weight: Annotated[float, Meta(ge=0, le=100)] = 10.0  # percent of requests; 100 = blue-green switch
    sticky: Literal["none", "cookie", "consumer", "ip"] = "none"
    cookie: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")] = (
        "fastgate_canary")
    release: Name = "1"  # a new value starts afresh after a rollback
    rollback: CanaryRollback | None = None


class Route(Base):
    name: Name
    paths: Annotated[list[str], Meta(min_length=1)]
    hosts: list[str] = []
    methods: list[Method] = []
    priority: Annotated[int, Meta(ge=-MAX_INT, le=MAX_INT)] = 0
    upstream: str | None = None
    mock: Mock | None = None
    strip_path: bool = False  # remove the pattern's static prefix (the part before `*`)
    path_rewrite: str | None = None  # template using the pattern's {params}, e.g. /v2/users/{id}
    preserve_host: bool = False  # send the client's Host upstream
    canary: Canary | None = None  # part of the traffic to another upstream (server/canary.py)
    policies: list[AnyPolicy] = []

    def __post_init__(self):
        if (self.upstream is None) == (self.mock is None):
            raise ValueError("a route needs exactly one of `upstream` or `mock`")
        if self.canary is not None and self.upstream is None:
            raise ValueError("a canary needs the route to have an `upstream`")
        if self.canary is not None and self.canary.upstream == self.upstream:
            raise ValueError("the canary's upstream is the route's own")
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
    # how a request picks a version: by its routes' own paths (e.g. /v1/...), or, with the versions
    # sharing paths, by a header (default `Api-Version`) or a query parameter (default `version`)
    version_by: Literal["path", "header", "query"] = "path"
    version_key: HeaderName | None = None
    default_version: Name | None = None  # header/query: the version a request naming none gets
    policies: list[AnyPolicy] = []
    openapi: str | None = None  # an OpenAPI document (YAML or JSON file): the developer portal renders it


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
    policies: list[AnyPolicy] = []  # run for the plan's consumers, right after authentication
    approval: bool = False  # developer-portal subscriptions to this plan wait for an admin (state pending)


KeyHash = Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
PasswordHash = Annotated[str, Meta(pattern=r"^(pbkdf2_sha256\$[0-9]+\$[^$]+\$[^$]+|scrypt\$[0-9]+\$[^$]+\$[0-9]+\$[0-9]+\$[^$]+)$")]


class BasicCredential(Base):
    username: Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^:\x00-\x1f\x7f]+$")]
    password_hash: PasswordHash  # Django's formats: pbkdf2_sha256$iterations$salt$b64hash, scrypt$n$salt$r$p$b64hash


class HmacCredential(Base):
    key_id: Annotated[str, Meta(min_length=1, max_length=256, pattern=r'^[^"\x00-\x1f\x7f]+$')]
    secret_env: EnvName  # HMAC needs the secret itself: it is read from this variable at build time


class Consumer(Base):
    username: Name
    id: str | None = None  # sent upstream as X-Consumer-ID (default: the username)
    plan: str | None = None
    groups: list[Name] = []
    keys: list[KeyHash] = []  # key-auth: "sha256:<hex>" of each API key, never the key
    basic: list[BasicCredential] = []
    hmac: list[HmacCredential] = []
    policies: list[AnyPolicy] = []  # run for this consumer, right after authentication


# --- observability ---------------------------------------------------------------------------------
class AccessLog(Base):
    path: Annotated[str, Meta(min_length=1)]
    sample: Annotated[float, Meta(gt=0, le=1)] = 1.0  # the share of requests logged (errors: always)


class Otlp(Base):
    """OpenTelemetry export (otel.py): a SERVER span per proxied request, OTLP/HTTP JSON."""

    endpoint: Annotated[str, Meta(pattern=r"^https?://[^/\s]+(/\S*)?$")]  # e.g. http://127.0.0.1:4318/v1/traces
    service_name: Annotated[str, Meta(min_length=1, max_length=128)] = "fastgate"
    sample: Annotated[float, Meta(ge=0, le=1)] = 1.0  # for traces the gateway starts; else the parent's flag
    timeout: Seconds = 2.0
    max_queue: Annotated[int, Meta(ge=512, le=1_000_000)] = 8192  # spans waiting; past it batches are dropped
    headers: dict[HeaderName, str] = {}  # e.g. an API key for a hosted collector


class Metrics(Base):
    # also count requests by consumer: fastgate_consumer_requests_total{route,consumer,status}
    # (one series per consumer seen: mind the cardinality)
    consumer_label: bool = False


class Tracing(Base):
    propagate: bool = True  # W3C traceparent: forwarded when valid, generated when absent or invalid
    otlp: Otlp | None = None

    def __post_init__(self):
        if self.otlp is not None and not self.propagate:
            raise ValueError("otlp export needs propagate: true")


# --- the document ----------------------------------------------------------------------------------
class Config(Base):
    workers: Annotated[int, Meta(ge=1, le=1024)] | Literal["auto"] = 1
    listeners: list[Listener] = msgspec.field(default_factory=default_listeners)
    limits: Limits = Limits()
    counters: Counters = Counters()
    store: Store = Store()
    admin: Admin = Admin()
    portal: Portal = Portal()
    oauth: OAuth = OAuth()
    upstreams: list[Upstream] = []
    routes: list[Route] = []
    apis: list[Api] = []
    plans: list[Plan] = []
    consumers: list[Consumer] = []
    policies: list[AnyPolicy] = []  # global: apply to every route
    server_header: bool = False  # send `Server: fastgate` on gateway-generated responses
    access_log: str | AccessLog | None = None  # a path, or {path, sample}
    tracing: Tracing = Tracing()
    metrics: Metrics = Metrics()
    latency_headers: bool = False  # X-Gateway-Latency / X-Upstream-Latency (ms) on proxied responses
    user: str | None = None  # started as root: workers switch to this user (and its group) after fork
    group: str | None = None
