"""The admin API: a Starlette app (served by uvicorn in the control process, control/process.py).

JSON in and out, bearer-token authenticated. CRUD on consumers, credentials (a key is shown once, by
the call that made it), developers, apps, plans and subscriptions in the store; read views of the
running config's APIs, routes and upstreams; `POST /config` validates a new declarative config and,
when it is valid, writes the config file and asks the supervisor to reload (a byte on the
supervisor's reload pipe, else SIGHUP); `GET /audit`.
With `oauth.enabled`: apps' OAuth 2.0 client credentials (the secret shown once) and the signing
keys' rotation (control/oauth.py).
Request bodies are msgspec Structs, which also give the OpenAPI document its schemas.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import tempfile
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..config.schema import Name, Quota, RateLimitSpec, Scope
from ..errors import ConfigError, ConfigIssue
from .store import Conflict, NotFound, Store, StoreError

log = logging.getLogger("fastgate.admin")

Text = Annotated[str, Meta(max_length=1024)]
# no `\s` here: Python's (str.isspace: \x1c-\x1f, \x85) and JSON Schema's (ECMA-262: \ufeff) differ, so
# the document would allow addresses the server refuses; control characters are refused too
_NOT_IN_EMAIL = r"@\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
Email = Annotated[str, Meta(min_length=3, max_length=320, pattern=f"^[^{_NOT_IN_EMAIL}]+@[^{_NOT_IN_EMAIL}]+$")]
MAX_ID = 2**63 - 1  # SQLite's INTEGER: a larger one cannot even be compared (OverflowError)
Id = Annotated[int, Meta(ge=1, le=MAX_ID)]
SubState = Literal["active", "pending", "revoked"]


class In(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ConsumerCreate(In):
    username: Name
    custom_id: Text | None = None  # sent upstream as X-Consumer-ID (default: the username)
    plan: Name | None = None
    groups: list[Name] = []
    app_id: Id | None = None


class ConsumerUpdate(In):
    custom_id: Text | None | UnsetType = UNSET
    plan: Name | None | UnsetType = UNSET
    groups: list[Name] | UnsetType = UNSET
    app_id: Id | None | UnsetType = UNSET


class CredentialCreate(In):
    key: Annotated[str, Meta(min_length=16, max_length=512)] | None = None  # default: generated


class DeveloperCreate(In):
    email: Email
    name: Text | None = None


class DeveloperUpdate(In):
    email: Email | UnsetType = UNSET
    name: Text | None | UnsetType = UNSET


class AppCreate(In):
    name: Name
    developer_id: Id | None = None
    description: Text | None = None


class AppUpdate(In):
    name: Name | UnsetType = UNSET
    developer_id: Id | None | UnsetType = UNSET
    description: Text | None | UnsetType = UNSET


class PlanCreate(In):
    name: Name
    description: Text | None = None
    rate_limits: list[RateLimitSpec] = []
    quotas: list[Quota] = []


class PlanUpdate(In):
    description: Text | None | UnsetType = UNSET
    rate_limits: list[RateLimitSpec] | UnsetType = UNSET
    quotas: list[Quota] | UnsetType = UNSET


class SubscriptionCreate(In):
    app_id: Id
    plan: Name
    state: SubState = "pending"


class SubscriptionUpdate(In):
    plan: Name | UnsetType = UNSET
    state: SubState | UnsetType = UNSET


class OAuthClientCreate(In):
    scopes: list[Scope] = []  # what the client may ask for (within oauth.scopes, when the config lists them)


class OAuthClientUpdate(In):
    scopes: list[Scope]


# RFC 9110 §5.6.7's IMF-fixdate, the form a Sunset header (RFC 8594) carries
HttpDate = Annotated[str, Meta(pattern=r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|"
                                       r"Sep|Oct|Nov|Dec) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT$",
                               description="an HTTP-date, e.g. Wed, 01 Jan 2031 00:00:00 GMT")]
VersionState = Literal["draft", "published", "deprecated", "retired"]


class ApiStateSet(In):
    state: VersionState
    sunset: HttpDate | None = None  # the Sunset header while deprecated (default: the config's)
    successor: Name | None = None  # the version that replaces this one (default: the config's)


BODIES = [ConsumerCreate, ConsumerUpdate, CredentialCreate, DeveloperCreate, DeveloperUpdate, AppCreate, AppUpdate,
          PlanCreate, PlanUpdate, SubscriptionCreate, SubscriptionUpdate, OAuthClientCreate, OAuthClientUpdate,
          ApiStateSet]
OPTIONAL_BODIES = (CredentialCreate, OAuthClientCreate)


# --- what the endpoints answer (for the OpenAPI document only: the store's rows are sent as they are) --
class Out(msgspec.Struct, kw_only=True):
    pass


Timestamp = Annotated[str, Meta(description="UTC, ISO 8601 with milliseconds, e.g. 2025-01-31T12:00:00.000Z")]
Source = Literal["api", "config"]


class Consumer(Out):
    id: int
    username: str
    custom_id: str | None
    plan: str | None
    groups: list[str]
    app_id: int | None
    source: Source
    read_only: bool
    created_at: Timestamp
    updated_at: Timestamp


class Credential(Out):
    id: int
    consumer: str
    type: Literal["key-auth"]
    identifier: Annotated[str, Meta(description="the start of the key's SHA-256 hash, never the key")]
    state: Literal["active", "revoked"]
    created_at: Timestamp
    rotated_at: Timestamp | None
    revoked_at: Timestamp | None


class CredentialWithKey(Credential):
    key: Annotated[str, Meta(description="the API key: shown this once")]


class Developer(Out):
    id: int
    email: str
    name: str | None
    created_at: Timestamp
    updated_at: Timestamp


class App(Out):
    id: int
    name: str
    description: str | None
    developer_id: int | None
    created_at: Timestamp
    updated_at: Timestamp


class Plan(Out):
    id: int
    name: str
    description: str | None
    rate_limits: list[dict[str, Any]]
    quotas: list[dict[str, Any]]
    source: Source
    read_only: bool
    created_at: Timestamp
    updated_at: Timestamp


class Subscription(Out):
    id: int
    app_id: int
    plan: str
    state: SubState
    created_at: Timestamp
    updated_at: Timestamp


class OAuthClient(Out):
    id: int
    client_id: str
    app_id: int
    consumer: str
    scopes: list[str]
    state: Literal["active", "revoked"]
    created_at: Timestamp
    rotated_at: Timestamp | None
    revoked_at: Timestamp | None


class OAuthClientWithSecret(OAuthClient):
    client_secret: Annotated[str, Meta(description="shown this once")]


class OAuthClientRevoked(OAuthClient):
    tokens_revoked: int


class OAuthKey(Out):
    kid: str
    alg: Literal["RS256", "ES256"]
    state: Literal["next", "active", "retired"]  # next: published, signing from `signs_from`
    created_at: float
    retired_at: float | None
    drop_after: float | None
    signs_from: float | None = None


class OAuthKeyRotated(OAuthKey):
    previous: OAuthKey | None = None  # publish_ahead 0: the key this one replaced at once (now retired)
    replaced: OAuthKey | None = None  # a key scheduled before and not signing yet, replaced by this one


class AuditEntry(Out):
    id: int
    at: Timestamp
    actor: str
    action: str
    entity: str
    entity_id: str | None
    before: Any
    after: Any


class Status(Out):
    version: str
    pid: int
    supervisor: int | None
    config: str | None
    store: str
    store_schema: int


class Canary(Out):
    route: str
    upstream: str
    canary: str
    weight: float
    sticky: Any
    release: str
    state: Literal["active", "off", "rolled_back"]
    reason: str | None
    rollback: dict[str, Any] | None
    window: dict[str, int] = {}


class ApiState(Out):
    api: str
    version: str
    state: VersionState  # in force: the store's when `source` is store, else the config's
    sunset: str | None
    successor: str | None
    source: Literal["config", "store"]
    config_state: VersionState
    updated_at: Timestamp | None  # when the store's row was last set


class ApiStateRow(Out):
    api: str
    version: str
    state: VersionState
    sunset: str | None
    successor: str | None
    updated_at: Timestamp
    applies: bool  # false: the running config has no such API or version, or the row cannot apply to it
    reason: str | None


class ConfigAccepted(Out):
    status: Literal["written", "reloading"]
    reload: bool


Objects = list[dict[str, Any]]
# (method, path) → what a success answers; absent: an object
ANSWERS: dict[tuple[str, str], Any] = {
    ("GET", "/status"): Status,
    ("GET", "/consumers"): list[Consumer], ("POST", "/consumers"): Consumer, ("GET", "/consumers/{name}"): Consumer,
    ("PATCH", "/consumers/{name}"): Consumer,
    ("GET", "/consumers/{name}/credentials"): list[Credential],
    ("POST", "/consumers/{name}/credentials"): CredentialWithKey,
    ("GET", "/credentials"): list[Credential], ("GET", "/credentials/{id}"): Credential,
    ("DELETE", "/credentials/{id}"): Credential, ("POST", "/credentials/{id}/rotate"): CredentialWithKey,
    ("GET", "/developers"): list[Developer], ("POST", "/developers"): Developer,
    ("GET", "/developers/{id}"): Developer, ("PATCH", "/developers/{id}"): Developer,
    ("GET", "/apps"): list[App], ("POST", "/apps"): App, ("GET", "/apps/{id}"): App, ("PATCH", "/apps/{id}"): App,
    ("GET", "/plans"): list[Plan], ("POST", "/plans"): Plan, ("GET", "/plans/{name}"): Plan,
    ("PATCH", "/plans/{name}"): Plan,
    ("GET", "/subscriptions"): list[Subscription], ("POST", "/subscriptions"): Subscription,
    ("GET", "/subscriptions/{id}"): Subscription, ("PATCH", "/subscriptions/{id}"): Subscription,
    ("GET", "/apis"): Objects, ("GET", "/routes"): Objects, ("GET", "/upstreams"): Objects,
    ("GET", "/apis/{api}/versions/{version}/state"): ApiState, ("PUT", "/apis/{api}/versions/{version}/state"): ApiState,
    ("DELETE", "/apis/{api}/versions/{version}/state"): ApiState, ("GET", "/api-states"): list[ApiStateRow],
    ("GET", "/canaries"): list[Canary], ("POST", "/canaries/{route}/reset"): Canary,
    ("POST", "/config"): ConfigAccepted,
    ("GET", "/apps/{id}/oauth-clients"): list[OAuthClient], ("POST", "/apps/{id}/oauth-clients"): OAuthClientWithSecret,
    ("GET", "/oauth-clients"): list[OAuthClient], ("GET", "/oauth-clients/{client_id}"): OAuthClient,
    ("PATCH", "/oauth-clients/{client_id}"): OAuthClient, ("DELETE", "/oauth-clients/{client_id}"): OAuthClientRevoked,
    ("POST", "/oauth-clients/{client_id}/rotate"): OAuthClientWithSecret,
    ("GET", "/oauth-keys"): list[OAuthKey], ("POST", "/oauth-keys/rotate"): OAuthKeyRotated,
    ("GET", "/audit"): list[AuditEntry], ("GET", "/usage"): Objects,
}
_INT = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
_TIME = {"anyOf": [{"type": "string", "pattern": "^-?[0-9]{1,12}$"}, {"type": "string", "format": "date-time"},
                   {"type": "string", "format": "date"}, {"type": "string", "maxLength": 0}],
         "description": "unix seconds or an ISO 8601 date/time (empty: no bound)"}
# (method, path) → its query parameters
QUERY: dict[tuple[str, str], dict[str, dict]] = {
    ("GET", "/credentials"): {"consumer": {"type": "string"}},
    ("GET", "/subscriptions"): {"app_id": _INT},
    ("GET", "/oauth-clients"): {"app_id": _INT},
    ("GET", "/audit"): {"entity": {"type": "string"}, "limit": {**_INT, "maximum": 1000}, "before": _INT},
    ("GET", "/analytics/summary"): {"window": {"enum": ["1h", "1d"]}},
    ("GET", "/usage"): {"consumer": {"type": "string"}, "from": _TIME, "to": _TIME,
                        "granularity": {"enum": ["hour", "day"]}, "format": {"enum": ["json", "csv"]}},
}
# what else may be missing: a body's or a query's reference (a plan, an app, a developer, a consumer)
REFERS = {("POST", "/consumers"), ("PATCH", "/consumers/{name}"), ("POST", "/apps"), ("PATCH", "/apps/{id}"),
          ("POST", "/subscriptions"), ("PATCH", "/subscriptions/{id}"), ("GET", "/credentials"),
          ("GET", "/oauth-clients")}


def _changes(body: In) -> dict:
    return {k: v for k, v in msgspec.structs.asdict(body).items() if v is not UNSET}


class BadBody(Exception):
    pass


class BadQuery(Exception):
    pass


def _integral(doc):
    """JSON has one number type: 3.0 is an integer to JSON Schema, so to the document. msgspec refuses a
    float for an `int` field, and takes an int for a `float` one, so integral floats become ints."""
    if isinstance(doc, float):
        return int(doc) if doc.is_integer() else doc
    if isinstance(doc, dict):
        return {k: _integral(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_integral(v) for v in doc]
    return doc


class OAuthDisabled(StoreError):
    status = 409
    code = "oauth_disabled"


def err(status: int, error: str, **fields) -> JSONResponse:
    return JSONResponse({"error": error, **fields}, status)


class Admin:
    """The endpoints, over one store and the running config."""

    def __init__(self, store: Store, cfg, config_path: str | None, supervisor_pid: int | None, oauth=None,
                 reload_fd: int | None = None):
        self.store = store
        self.oauth = oauth  # control/oauth.py's AuthServer, or None (oauth.enabled: false)
        self.serve_oauth = False  # the token, revocation, JWKS and metadata endpoints are on this listener
        self.cfg = cfg
        self.config_path = config_path
        self.supervisor_pid = supervisor_pid
        self.reload_fd = reload_fd  # the supervisor's reload pipe (supervisor.py), when it made one
        self.config_key_hashes = frozenset(h for c in cfg.consumers for h in c.keys)
        self.host = None  # the host's shared metrics (canary state), when analytics has them

    # --- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def actor(request: Request) -> str:
        who = request.headers.get("x-fastgate-actor", "admin")[:64]
        who = "".join(ch for ch in who if ch.isprintable()) or "admin"
        client = request.client.host if request.client else "?"
        return f"{who}@{client}"

    @staticmethod
    async def body(request: Request, tp, empty_ok: bool = False):
        """The body as a `tp`; BadBody (422) names the offending field's path, e.g. `$.username`."""
        raw = await request.body()
        if not raw.strip() and empty_ok:
            return tp()
        try:
            return msgspec.convert(_integral(msgspec.json.decode(raw)), type=tp)
        except msgspec.ValidationError as exc:
            raise BadBody(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise BadBody(f"not valid JSON: {exc}") from None

    @staticmethod
    def int_param(request: Request, name: str) -> int:
        """A path's `{id}`: anything but an id that could exist (1 .. 2**63-1) is 404."""
        raw = request.path_params[name]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_ID:
            raise HTTPException(404)
        return int(raw)

    @staticmethod
    def query_str(request: Request, name: str) -> str | None:
        """A query parameter given at most once (`?a=1&a=2` is ambiguous: 422)."""
        values = request.query_params.getlist(name)
        if len(values) > 1:
            raise BadQuery(f"{name}: given more than once")
        return values[0] if values else None

    @staticmethod
    def query_int(request: Request, name: str, lo: int = 1, hi: int = MAX_ID) -> int | None:
        """An integer query parameter, None when absent; 422 `invalid_query` naming it otherwise."""
        raw = Admin.query_str(request, name)
        if raw is None:
            return None
        if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
            raise BadQuery(f"{name}: an integer from {lo} to {hi}")
        return int(raw)

    # --- consumers --------------------------------------------------------------------------------
    async def consumers(self, request: Request):
        if request.method == "GET":
            return JSONResponse(self.store.list_consumers())
        b = await self.body(request, ConsumerCreate)
        return JSONResponse(self.store.create_consumer(self.actor(request), b.username, b.custom_id, b.plan,
                                                       b.groups, b.app_id), 201)

    async def consumer(self, request: Request):
        name = request.path_params["name"]
        if request.method == "GET":
            return JSONResponse(self.store.get_consumer(name))
        if request.method == "PATCH":
            b = await self.body(request, ConsumerUpdate)
            return JSONResponse(self.store.update_consumer(self.actor(request), name, _changes(b)))
        self.store.delete_consumer(self.actor(request), name)
        return Response(status_code=204)

    # --- credentials ------------------------------------------------------------------------------
    async def consumer_credentials(self, request: Request):
        name = request.path_params["name"]
        if request.method == "GET":
            return JSONResponse(self.store.list_credentials(name))
        b = await self.body(request, CredentialCreate, empty_ok=True)
        cred, key = self.store.create_key(self.actor(request), name, b.key, self.config_key_hashes)
        return JSONResponse({**cred, "key": key}, 201, headers={"Cache-Control": "no-store"})

    async def credentials(self, request: Request):
        return JSONResponse(self.store.list_credentials(self.query_str(request, "consumer")))

    async def credential(self, request: Request):
        id_ = self.int_param(request, "id")
        if request.method == "GET":
            return JSONResponse(self.store.get_credential(id_))
        return JSONResponse(self.store.revoke_key(self.actor(request), id_))

    async def rotate(self, request: Request):
        cred, key = self.store.rotate_key(self.actor(request), self.int_param(request, "id"))
        return JSONResponse({**cred, "key": key}, headers={"Cache-Control": "no-store"})

    # --- OAuth 2.0 client credentials and signing keys (control/oauth.py) -------------------------
    def _oauth(self):
        if self.oauth is None:
            raise OAuthDisabled("the OAuth authorization server is off (oauth.enabled: false)")
        return self.oauth

    async def app_oauth_clients(self, request: Request):
        self._oauth()
        app_id = self.int_param(request, "id")
        if request.method == "GET":
            return JSONResponse(self.store.list_oauth_clients(app_id))
        b = await self.body(request, OAuthClientCreate, empty_ok=True)
        try:
            self.oauth.check_scopes(b.scopes)
        except ValueError as exc:
            raise BadBody(f"scopes: {exc}") from None
        client, secret = self.store.create_oauth_client(self.actor(request), app_id, b.scopes)
        return JSONResponse({**client, "client_secret": secret}, 201, headers={"Cache-Control": "no-store"})

    async def oauth_clients(self, request: Request):
        self._oauth()
        return JSONResponse(self.store.list_oauth_clients(self.query_int(request, "app_id")))

    async def oauth_client(self, request: Request):
        self._oauth()
        client_id = request.path_params["client_id"]
        if request.method == "GET":
            return JSONResponse(self.store.get_oauth_client(client_id))
        if request.method == "PATCH":
            b = await self.body(request, OAuthClientUpdate)
            try:
                self.oauth.check_scopes(b.scopes)
            except ValueError as exc:
                raise BadBody(f"scopes: {exc}") from None
            return JSONResponse(self.store.update_oauth_client(self.actor(request), client_id, b.scopes))
        return JSONResponse(self.store.revoke_oauth_client(self.actor(request), client_id))

    async def oauth_client_rotate(self, request: Request):
        self._oauth()
        client, secret = self.store.rotate_oauth_client(self.actor(request), request.path_params["client_id"])
        return JSONResponse({**client, "client_secret": secret}, headers={"Cache-Control": "no-store"})

    async def oauth_keys(self, request: Request):
        self._oauth()
        return JSONResponse([{k: v for k, v in key.items() if k != "public_jwk"} for key in self.store.oauth_keys()])

    async def oauth_keys_rotate(self, request: Request):
        return JSONResponse(await self._oauth().rotate(self.actor(request)))

    # --- developers, apps, plans, subscriptions ---------------------------------------------------
    async def developers(self, request: Request):
        if request.method == "GET":
            return JSONResponse(self.store.list_developers())
        b = await self.body(request, DeveloperCreate)
        return JSONResponse(self.store.create_developer(self.actor(request), b.email, b.name), 201)

    async def developer(self, request: Request):
        return await self._one(request, self.store.get_developer, DeveloperUpdate, self.store.update_developer,
                               self.store.delete_developer)

    async def apps(self, request: Request):
        if request.method == "GET":
            return JSONResponse(self.store.list_apps())
        b = await self.body(request, AppCreate)
        return JSONResponse(self.store.create_app(self.actor(request), b.name, b.developer_id, b.description), 201)

    async def app(self, request: Request):
        return await self._one(request, self.store.get_app, AppUpdate, self.store.update_app, self.store.delete_app)

    async def plans(self, request: Request):
        if request.method == "GET":
            return JSONResponse(self.store.list_plans())
        b = await self.body(request, PlanCreate)
        return JSONResponse(self.store.create_plan(self.actor(request), b.name, b.description,
                                                   msgspec.to_builtins(b.rate_limits),
                                                   msgspec.to_builtins(b.quotas)), 201)

    async def plan(self, request: Request):
        name = request.path_params["name"]
        if request.method == "GET":
            return JSONResponse(self.store.get_plan(name))
        if request.method == "PATCH":
            b = await self.body(request, PlanUpdate)
            return JSONResponse(self.store.update_plan(self.actor(request), name,
                                                       msgspec.to_builtins(_changes(b))))
        self.store.delete_plan(self.actor(request), name)
        return Response(status_code=204)

    async def subscriptions(self, request: Request):
        if request.method == "GET":
            return JSONResponse(self.store.list_subscriptions(self.query_int(request, "app_id")))
        b = await self.body(request, SubscriptionCreate)
        return JSONResponse(self.store.create_subscription(self.actor(request), b.app_id, b.plan, b.state), 201)

    async def subscription(self, request: Request):
        return await self._one(request, self.store.get_subscription, SubscriptionUpdate,
                               self.store.update_subscription, self.store.delete_subscription)

    async def _one(self, request: Request, get, update_tp, update, delete):
        id_ = self.int_param(request, "id")
        if request.method == "GET":
            return JSONResponse(get(id_))
        if request.method == "PATCH":
            b = await self.body(request, update_tp)
            return JSONResponse(update(self.actor(request), id_, _changes(b)))
        delete(self.actor(request), id_)
        return Response(status_code=204)

    # --- the running config -----------------------------------------------------------------------
    def _lifecycle(self) -> dict:
        from ..config.lifecycle import overrides_from_rows

        return overrides_from_rows(self.store.list_api_states())

    async def apis(self, request: Request):
        from ..config.lifecycle import effective_api

        overrides = self._lifecycle()
        out = []
        for api in self.cfg.apis:
            doc = msgspec.to_builtins(api)
            now = effective_api(api, overrides)
            doc["versions"] = [{**msgspec.to_builtins(v), "routes": [r.name for r in v.routes],
                                "config_state": c.state, "state_source": "config" if v is c else "store"}
                               for v, c in zip(now.versions, api.versions, strict=True)]
            out.append(doc)
        return JSONResponse(out)

    async def routes(self, request: Request):
        from ..config.lifecycle import effective_version
        from ..config.load import all_routes

        overrides = self._lifecycle()
        out = []
        for _path, r, api, ver in all_routes(self.cfg):
            doc = msgspec.to_builtins(r)
            doc["api"] = api.name if api is not None else None
            doc["version"] = ver.version if ver is not None else None
            doc["state"] = effective_version(api, ver, overrides).state if ver is not None else "published"
            out.append(doc)
        return JSONResponse(out)

    # --- API lifecycle: a version's state set at run time (config/lifecycle.py) --------------------
    def _api_version(self, request: Request):
        name, version = request.path_params["api"], request.path_params["version"]
        api = next((a for a in self.cfg.apis if a.name == name), None)
        if api is None:
            raise NotFound(f"the running config has no API `{name}`")
        ver = next((v for v in api.versions if v.version == version), None)
        if ver is None:
            raise NotFound(f"API `{name}` has no version `{version}` (versions: "
                           + ", ".join(v.version for v in api.versions) + ")")
        return api, ver

    def _api_state(self, api, ver) -> dict:
        from ..config.lifecycle import effective_version

        row = self.store.get_api_state(api.name, ver.version)
        now = effective_version(api, ver, self._lifecycle()) if row is not None else ver
        return {"api": api.name, "version": ver.version, "state": now.state, "sunset": now.sunset,
                "successor": now.successor, "source": "config" if now is ver else "store",
                "config_state": ver.state, "updated_at": row["updated_at"] if row is not None else None}

    async def api_state(self, request: Request):
        from ..config.lifecycle import refusal

        b = await self.body(request, ApiStateSet) if request.method == "PUT" else None
        api, ver = self._api_version(request)
        if b is not None:
            why = refusal(api, ver.version, b.state, b.successor)
            if why is not None:
                raise Conflict(why)
            self.store.set_api_state(self.actor(request), api.name, ver.version, b.state, b.sunset, b.successor)
        elif request.method == "DELETE":
            self.store.delete_api_state(self.actor(request), api.name, ver.version)
        return JSONResponse(self._api_state(api, ver))

    async def api_states(self, request: Request):
        from ..config.lifecycle import refusal

        apis = {a.name: a for a in self.cfg.apis}
        out = []
        for row in self.store.list_api_states():
            api = apis.get(row["api"])
            why = (refusal(api, row["version"], row["state"], row["successor"]) if api is not None
                   else f"the running config has no API `{row['api']}`")
            out.append({**row, "applies": why is None, "reason": why})
        return JSONResponse(out)

    def _canary_routes(self):
        from ..config.load import all_routes

        return {r.name: r for _p, r, _a, _v in all_routes(self.cfg) if r.canary is not None}

    async def canaries(self, request: Request):
        from ..server.canary import describe

        table = self.host.table if self.host is not None else None
        return JSONResponse([describe(table, r, r.upstream) for r in self._canary_routes().values()])

    async def canary_reset(self, request: Request):
        from ..server.canary import describe, reset

        route = self._canary_routes().get(request.path_params["route"])
        if route is None:
            return err(404, "not_found", detail="no route of that name has a canary")
        if self.host is None:
            return err(409, "conflict", detail="no shared metrics here (the gateway is not running)")
        was = reset(self.host.table, route)
        if was:
            self.store.audit(self.actor(request), "reset", "canary", route.name, {"rolled_back": True},
                             {"rolled_back": False})
        return JSONResponse(describe(self.host.table, route, route.upstream))

    async def upstreams(self, request: Request):
        return JSONResponse(msgspec.to_builtins(self.cfg.upstreams))

    async def get_config(self, request: Request):
        doc = msgspec.to_builtins(self.cfg)
        if doc.get("admin", {}).get("token"):
            doc["admin"]["token"] = "<redacted>"
        return JSONResponse(doc)

    async def post_config(self, request: Request):
        from ..config.load import load_config, parse_document

        raw = await request.body()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fmt = "json" if ctype.endswith("json") else "toml" if ctype.endswith("toml") else "yaml"
        try:
            data = parse_document(raw, fmt)
            if not isinstance(data, dict):  # an empty body, or `null`, would load as an all-defaults config
                raise ConfigError([ConfigIssue("$", f"expected a mapping, got {type(data).__name__ if data is not None else 'nothing'}",
                                               "send the whole config document")])
            cfg = load_config(data)  # the admin section's rules included (config/load.py)
        except ConfigError as exc:
            return err(422, "invalid_config", errors=[{"path": i.path, "message": i.message, "hint": i.hint}
                                                      for i in exc.issues])
        if self.config_path is None:
            return err(409, "no_config_file", detail="the gateway was started without a config file")
        try:
            text = _as_file_format(raw, fmt, data, self.config_path)
        except ValueError as exc:
            return err(415, "unsupported_format", detail=str(exc))
        before = msgspec.to_builtins(self.cfg)
        try:
            _write_atomically(self.config_path, text)
        except OSError as exc:
            return err(500, "config_not_written", detail=f"{self.config_path}: {exc.strerror}")
        after = msgspec.to_builtins(cfg)
        for doc in (before, after):
            if doc.get("admin", {}).get("token"):
                doc["admin"]["token"] = "<redacted>"
        self.store.audit(self.actor(request), "update", "config", self.config_path, before, after)
        if self.reload_fd is None and self.supervisor_pid is None:
            return JSONResponse({"status": "written", "reload": False}, 202)
        try:
            self.request_reload()
        except OSError as exc:
            return err(500, "reload_not_signalled", detail=f"config written, but the supervisor "
                       f"({self.supervisor_pid}) could not be signalled: {exc.strerror}; run `fastgate reload`")
        return JSONResponse({"status": "reloading", "reload": True}, 202)

    def request_reload(self) -> None:
        """Ask the supervisor to reload. Through its pipe when there is one: this process may have
        switched to `user:` and cannot signal a supervisor running as root (EPERM)."""
        if self.reload_fd is None:
            os.kill(self.supervisor_pid, signal.SIGHUP)
            return
        try:
            os.write(self.reload_fd, b"r")
        except BlockingIOError:  # the pipe is full of asks the supervisor has not read yet: one is enough
            pass

    # --- audit, status, openapi -------------------------------------------------------------------
    async def audit(self, request: Request):
        limit = self.query_int(request, "limit", 1, 1000)
        before = self.query_int(request, "before")
        return JSONResponse(self.store.list_audit(100 if limit is None else limit,
                                                  self.query_str(request, "entity"), before))

    async def status(self, request: Request):
        return JSONResponse({"version": __version__, "pid": os.getpid(), "supervisor": self.supervisor_pid,
                             "config": self.config_path, "store": self.store.path,
                             "store_schema": self.store.version})

    async def openapi(self, request: Request):
        scopes = list(self.oauth.cfg.scopes) if self.oauth is not None else None
        return JSONResponse(openapi_document(oauth_endpoints=self.serve_oauth, scopes=scopes))


# (method, path, handler name, summary, request body, success status)
ENDPOINTS = [
    ("GET", "/status", "status", "Version, pids, config file and store", None, 200),
    ("GET", "/consumers", "consumers", "List consumers (config ones are read-only)", None, 200),
    ("POST", "/consumers", "consumers", "Create a consumer", ConsumerCreate, 201),
    ("GET", "/consumers/{name}", "consumer", "A consumer", None, 200),
    ("PATCH", "/consumers/{name}", "consumer", "Change a consumer", ConsumerUpdate, 200),
    ("DELETE", "/consumers/{name}", "consumer", "Delete a consumer and its credentials", None, 204),
    ("GET", "/consumers/{name}/credentials", "consumer_credentials", "A consumer's credentials", None, 200),
    ("POST", "/consumers/{name}/credentials", "consumer_credentials",
     "Create an API key: the answer's `key` is shown this once", CredentialCreate, 201),
    ("GET", "/credentials", "credentials", "List credentials (?consumer=NAME)", None, 200),
    ("GET", "/credentials/{id}", "credential", "A credential (never the key)", None, 200),
    ("DELETE", "/credentials/{id}", "credential", "Revoke a credential", None, 200),
    ("POST", "/credentials/{id}/rotate", "rotate", "New key for a credential; the old one stops working",
     None, 200),
    ("GET", "/developers", "developers", "List developers", None, 200),
    ("POST", "/developers", "developers", "Create a developer", DeveloperCreate, 201),
    ("GET", "/developers/{id}", "developer", "A developer", None, 200),
    ("PATCH", "/developers/{id}", "developer", "Change a developer", DeveloperUpdate, 200),
    ("DELETE", "/developers/{id}", "developer", "Delete a developer (without apps)", None, 204),
    ("GET", "/apps", "apps", "List apps", None, 200),
    ("POST", "/apps", "apps", "Create an app", AppCreate, 201),
    ("GET", "/apps/{id}", "app", "An app", None, 200),
    ("PATCH", "/apps/{id}", "app", "Change an app", AppUpdate, 200),
    ("DELETE", "/apps/{id}", "app", "Delete an app and its subscriptions", None, 204),
    ("GET", "/plans", "plans", "List plans (config ones are read-only)", None, 200),
    ("POST", "/plans", "plans", "Create a plan", PlanCreate, 201),
    ("GET", "/plans/{name}", "plan", "A plan", None, 200),
    ("PATCH", "/plans/{name}", "plan", "Change a plan", PlanUpdate, 200),
    ("DELETE", "/plans/{name}", "plan", "Delete a plan nobody uses", None, 204),
    ("GET", "/subscriptions", "subscriptions", "List subscriptions (?app_id=N)", None, 200),
    ("POST", "/subscriptions", "subscriptions", "Subscribe an app to a plan", SubscriptionCreate, 201),
    ("GET", "/subscriptions/{id}", "subscription", "A subscription", None, 200),
    ("PATCH", "/subscriptions/{id}", "subscription", "Change a subscription's plan or state",
     SubscriptionUpdate, 200),
    ("DELETE", "/subscriptions/{id}", "subscription", "Delete a subscription", None, 204),
    ("GET", "/apis", "apis", "The running config's APIs, each version in the state in force", None, 200),
    ("GET", "/apis/{api}/versions/{version}/state", "api_state", "An API version's lifecycle state in force, "
     "and whether it is the config's or one set here", None, 200),
    ("PUT", "/apis/{api}/versions/{version}/state", "api_state", "Set an API version's lifecycle state (draft, "
     "published, deprecated, retired; with a sunset date and a successor) over the config's: every worker "
     "serves it within a second, without a reload", ApiStateSet, 200),
    ("DELETE", "/apis/{api}/versions/{version}/state", "api_state", "Drop the state set here: the version has "
     "the config's again", None, 200),
    ("GET", "/api-states", "api_states", "The lifecycle states set here, each saying whether it applies to "
     "the running config", None, 200),
    ("GET", "/routes", "routes", "The running config's routes", None, 200),
    ("GET", "/upstreams", "upstreams", "The running config's upstreams", None, 200),
    ("GET", "/canaries", "canaries", "Routes with a canary: weight, state (active, off, rolled_back), the "
     "rollback's reason and the current window's answers, errors and slow answers", None, 200),
    ("POST", "/canaries/{route}/reset", "canary_reset", "Clear a rolled-back canary: traffic goes to it again",
     None, 200),
    ("GET", "/config", "get_config", "The running config (the admin token redacted)", None, 200),
    ("POST", "/config", "post_config", "Validate a config (YAML, JSON or TOML by Content-Type); when valid, "
     "write it to the config file and reload. 422 lists every error with its path", None, 202),
    ("GET", "/apps/{id}/oauth-clients", "app_oauth_clients", "An app's OAuth 2.0 clients", None, 200),
    ("POST", "/apps/{id}/oauth-clients", "app_oauth_clients", "Create OAuth 2.0 client credentials for an app: "
     "the answer's `client_secret` is shown this once", OAuthClientCreate, 201),
    ("GET", "/oauth-clients", "oauth_clients", "List OAuth 2.0 clients (?app_id=N); never a secret", None, 200),
    ("GET", "/oauth-clients/{client_id}", "oauth_client", "An OAuth 2.0 client", None, 200),
    ("PATCH", "/oauth-clients/{client_id}", "oauth_client", "Change the scopes a client may ask for",
     OAuthClientUpdate, 200),
    ("DELETE", "/oauth-clients/{client_id}", "oauth_client", "Revoke a client and every unexpired token it was given",
     None, 200),
    ("POST", "/oauth-clients/{client_id}/rotate", "oauth_client_rotate", "New secret for a client (shown once); "
     "the old one stops working, tokens already issued stay valid", None, 200),
    ("GET", "/oauth-keys", "oauth_keys", "The OAuth signing keys still published: the active one, retired ones "
     "until their tokens expire (never a private part)", None, 200),
    ("POST", "/oauth-keys/rotate", "oauth_keys_rotate", "A new signing key: published at once, signing from "
     "`signs_from` (oauth.publish_ahead); the previous one stays in the JWKS until every token it signed has expired",
     None, 200),
    ("GET", "/audit", "audit", "Audit log, newest first (?entity=&limit=&before=ID)", None, 200),
    ("GET", "/openapi.json", "openapi", "This document", None, 200),
    ("GET", "/analytics/summary", None, "Traffic over ?window=1h|1d: rps, latency quantiles, error rate, top "
     "consumers and routes, rate-limit rejections, upstream health, worker restarts, a series for charts", None, 200),
    ("GET", "/usage", None, "The usage ledger (?consumer=&from=&to=&granularity=hour|day&format=json|csv)",
     None, 200),
]


# served without the admin token when there is no portal listener (control/oauth.py): (method, path, summary)
OAUTH_ENDPOINTS = [
    ("POST", "/oauth/token", "OAuth 2.0 token endpoint, client credentials grant (RFC 6749 §4.4): client "
     "authentication by HTTP Basic or client_id/client_secret form fields"),
    ("POST", "/oauth/revoke", "OAuth 2.0 token revocation (RFC 7009), client-authenticated"),
    ("GET", "/.well-known/jwks.json", "The token signing keys (public parts only)"),
    ("GET", "/.well-known/oauth-authorization-server", "Authorization server metadata (RFC 8414)"),
]


def openapi_document(oauth_endpoints: bool = False, scopes: list[str] | None = None) -> dict:
    """The admin API's OpenAPI document; with `oauth_endpoints`, the OAuth endpoints this listener
    also serves (without the admin token); `scopes`: `oauth.scopes`, when the config lists them (the
    only scopes a client may be given)."""
    answers = sorted({tp for tp in ANSWERS.values()}, key=repr)
    from ..config.schema import Config

    schemas, components = msgspec.json.schema_components(BODIES + answers, ref_template="#/components/schemas/{name}")
    answer_schema = dict(zip(answers, schemas[len(BODIES):], strict=True))
    # the config document's own structs (its Consumer is not the API's): prefixed `config.`
    _, config_components = msgspec.json.schema_components([Config], ref_template="#/components/schemas/config.{name}")
    components.update({f"config.{name}": schema for name, schema in config_components.items()})
    if scopes:
        for name in ("OAuthClientCreate", "OAuthClientUpdate"):
            components[name]["properties"]["scopes"]["items"] = {"enum": list(scopes)}
    components["Error"] = {"type": "object", "required": ["error"],
                           "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}
    components["ConfigErrors"] = {
        "type": "object", "required": ["error", "errors"], "properties": {
            "error": {"const": "invalid_config"}, "errors": {"type": "array", "items": {
                "type": "object", "required": ["path", "message"],
                "properties": {"path": {"type": "string"}, "message": {"type": "string"},
                               "hint": {"type": ["string", "null"]}}}}}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    paths: dict[str, dict] = {}
    for method, path, _handler, summary, body, status in ENDPOINTS:
        ok: dict[str, Any] = {"description": "OK" if status != 204 else "No content"}
        if status != 204:
            tp = ANSWERS.get((method, path))
            ok["content"] = {"application/json": {"schema": answer_schema[tp] if tp is not None else {
                "type": "object"}}}
        if path == "/usage":
            ok["content"]["text/csv"] = {"schema": {"type": "string"}}
        op: dict[str, Any] = {"summary": summary, "responses": {
            str(status): ok, "401": {"description": "missing or wrong bearer token", "content": error}}}
        params = [{"name": seg[1:-1], "in": "path", "required": True,
                   "schema": _INT if seg == "{id}" else {"type": "string"}}
                  for seg in path.split("/") if seg.startswith("{")]
        params += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in QUERY.get((method, path), {}).items()]
        if params:
            op["parameters"] = params
        if any(p["in"] == "path" for p in params) or (method, path) in REFERS:
            op["responses"]["404"] = {"description": "not found (or something the request refers to)",
                                      "content": error}
        if any(p["in"] == "query" for p in params):
            op["responses"]["422"] = {"description": "invalid_query: a query parameter, named", "content": error}
        if body is not None:
            op["requestBody"] = {"required": body not in OPTIONAL_BODIES, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
            op["responses"]["422"] = {"description": "invalid_body: the detail names the field's path ($.name)",
                                      "content": error}
        if path == "/config" and method == "POST":
            # the document's shape; the cross-checks (an unknown upstream, a duplicate route…) are the 422's
            op["requestBody"] = {"required": True, "content": {t: {"schema": {"$ref": "#/components/schemas/config.Config"}}
                                                               for t in ("application/yaml", "application/json",
                                                                         "application/toml")}}
            op["responses"]["409"] = {"description": "no_config_file: started without a config file",
                                      "content": error}
            op["responses"]["415"] = {"description": "unsupported_format: the file's format cannot hold this "
                                      "document's", "content": error}
            op["responses"]["422"] = {"description": "every error, with its path", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ConfigErrors"}}}}
        if method in ("POST", "PUT", "PATCH", "DELETE") and path != "/config":
            op["responses"]["409"] = {"description": "conflict, or read-only (declared in the config file)",
                                      "content": error}
            op["responses"]["503"] = {"description": "store_unavailable: the store lives in Redis "
                                      "(store.backend redis) and Redis cannot be reached; nothing was written, "
                                      "unless the detail says the outcome is not known",
                                      "content": error}
        if "oauth" in path:
            op["responses"]["409"] = {"description": "oauth_disabled: the OAuth authorization server is off"
                                      + (", or the client is revoked" if path.endswith("/rotate") and "clients"
                                         in path else ""), "content": error}
        paths.setdefault(path, {})[method.lower()] = op
    for method, path, summary in OAUTH_ENDPOINTS if oauth_endpoints else ():
        # RFC 6749 §3.2: parameters sent without a value are omitted, unknown ones ignored, none sent twice
        form = {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "additionalProperties": {"type": "string"},
            "required": ["grant_type"] if path == "/oauth/token" else ["token"],
            "properties": {"grant_type": {"const": "client_credentials"}, "scope": {"type": "string"},
                           "client_id": {"type": "string"}, "client_secret": {"type": "string"}}
            if path == "/oauth/token" else {
                "token": {"type": "string"}, "token_type_hint": {"type": "string"},
                "client_id": {"type": "string"}, "client_secret": {"type": "string"}}}}}
        op = {"summary": summary, "security": [] if method == "GET" else [{"client_basic": []}, {}],
              "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {
                  "type": "object"}}}}}}
        if method == "POST":
            op["requestBody"] = {"required": True, "content": form}
            op["responses"]["400"] = op["responses"]["401"] = {
                "description": "RFC 6749 §5.2 error", "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/OAuthError"}}}}
        paths[path] = {method.lower(): op}
    if oauth_endpoints:
        components["OAuthError"] = {"type": "object", "required": ["error"], "properties": {
            "error": {"enum": ["invalid_request", "invalid_client", "invalid_grant", "unauthorized_client",
                               "unsupported_grant_type", "invalid_scope"]},
            "error_description": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "fastgate admin API", "version": __version__},
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           **({"client_basic": {"type": "http", "scheme": "basic"}}
                                              if oauth_endpoints else {})}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


# --- authentication and errors ---------------------------------------------------------------------
class BearerAuth:
    """Every request needs `Authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.token is not None:
            got = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    got = value
            scheme, _, cred = got.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(cred.strip(), self.token):
                resp = JSONResponse({"error": "unauthorized"}, 401,
                                    headers={"WWW-Authenticate": 'Bearer realm="fastgate-admin"'})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _store_error(request, exc: StoreError):
    return err(exc.status, exc.code, detail=str(exc))


async def _bad_body(request, exc: BadBody):
    return err(422, "invalid_body", detail=str(exc))


async def _bad_query(request, exc: BadQuery):
    return err(422, "invalid_query", detail=str(exc))


async def _http_error(request, exc: HTTPException):
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
    return JSONResponse({"error": reason}, exc.status_code, headers=exc.headers)


async def _crash(request, exc: Exception):  # Starlette re-raises it afterwards: uvicorn logs the traceback
    return err(500, "internal_error")


def create_app(store: Store, cfg, token: str | None, config_path: str | None = None,
               supervisor_pid: int | None = None, analytics=None, oauth=None, serve_oauth: bool = False,
               reload_fd: int | None = None):
    """The admin API (an ASGI app). `oauth`: control/oauth.py's AuthServer when `oauth.enabled`;
    `serve_oauth`: also serve its public endpoints here, without the admin token (no portal listener)."""
    admin = Admin(store, cfg, config_path, supervisor_pid, oauth, reload_fd)
    admin.serve_oauth = serve_oauth and oauth is not None
    admin.host = getattr(analytics, "host", None)
    methods: dict[tuple[str, str], list[str]] = {}
    for method, path, handler, *_ in ENDPOINTS:
        if handler is not None:  # None: served by control/dashboard.py
            methods.setdefault((path, handler), []).append(method)
    routes = [Route(path, getattr(admin, handler), methods=m) for (path, handler), m in methods.items()]
    if analytics is not None:  # GET /analytics/summary, GET /usage (control/dashboard.py)
        from .dashboard import api_routes

        routes += api_routes(analytics)
    app = Starlette(routes=routes, exception_handlers={
        StoreError: _store_error, BadBody: _bad_body, BadQuery: _bad_query, HTTPException: _http_error, Exception: _crash})
    app.state.admin = admin
    outer = BearerAuth(app, token)
    if analytics is not None:  # /dashboard: its own cookie login; everything else: the bearer token
        from .dashboard import with_dashboard

        outer = with_dashboard(outer, analytics, token)
    if admin.serve_oauth:  # /oauth/token and friends: the client's own credentials, not the admin token
        from .oauth import create_oauth_app, with_oauth

        outer = with_oauth(outer, create_oauth_app(oauth))
    return outer


# --- the config file -------------------------------------------------------------------------------
def resolve_token(cfg) -> str | None:
    """The admin token, or None (allowed only on loopback). Raises ValueError with a clear message."""
    a = cfg.admin
    if a.token_env is not None:
        token = os.environ.get(a.token_env, "")
        if len(token) < 16:
            raise ValueError(f"admin.token_env: ${a.token_env} is {'unset' if not token else 'shorter than 16 characters'}")
        return token
    if a.token is not None:
        return a.token
    from ..config.load import admin_issues

    problems = admin_issues(cfg)
    if problems:
        raise ValueError("; ".join(f"{p.path}: {p.message} ({p.hint})" for p in problems))
    return None


def _as_file_format(raw: bytes, fmt: str, data, path: str) -> bytes:
    """The text to write: the body itself when the file's parser reads it (comments survive),
    else the document re-serialised in the file's format."""
    from ..config.load import _format_of

    target = _format_of(path)
    if target == fmt or (target == "yaml" and fmt == "json"):
        return raw
    if target == "json":
        return json.dumps(data, indent=2).encode() + b"\n"
    if target == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False).encode()
    raise ValueError(f"the config file {path} is {target.upper()}: send {target.upper()}")


def _write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastgate-config-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
