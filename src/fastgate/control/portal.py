"""The developer portal: a Starlette app with server-rendered pages (Jinja2), served by the control
process (control/process.py) on the `kind: portal` listener, over the same store as the admin API.

- Catalog of the running config's APIs (draft versions hidden) and of its plain routes, grouped by
  their first path segment; search; an API's versions, deprecation notices and operations, with the
  API's OpenAPI document (`apis[].openapi`) rendered when it names one.
- Developers sign up and sign in: passwords hashed with scrypt (n=2**14, r=8, p=1, random salt);
  server-side sessions (a random token in an HttpOnly SameSite=Lax cookie, stored hashed); a CSRF
  token per session checked on every form POST; sign-in failures limited per client address and
  per account; new developers optionally wait for an admin's approval (`portal.approval`).
- Apps: create, subscribe to a plan (pending when the plan says `approval: true`), API keys shown
  once, rotated, revoked — through the same store calls as the admin API, so the workers see them
  within a second (control/directory.py). An app's keys belong to one consumer, `app-<id>`, whose
  plan is that of the app's latest active subscription.
- OAuth 2.0 client credentials (with `oauth.enabled`, control/oauth.py): an app with an active
  subscription can get a client id and secret (the secret shown once), rotate the secret, revoke.
- Try-it: the portal sends the request itself to the gateway's proxy listener on loopback.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import logging
import os
import secrets
import ssl
import time
from collections import deque
from urllib.parse import parse_qs, quote, urlencode

import yaml
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .store import Store, StoreError, StoreUnavailable

log = logging.getLogger("fastgate.portal")

COOKIE = "fg_portal"
SESSION_TTL = 8 * 3600.0
LOGIN_FAILURES = 5  # per LOGIN_WINDOW seconds, per client address and per account: then 429
LOGIN_WINDOW = 300.0
TRY_TIMEOUT = 5.0
TRY_BODY_LIMIT = 64 * 1024
FORM_LIMIT = 64 * 1024
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}


# --- passwords -------------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _alg, n, r, p, salt, digest = stored.split("$")
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=32)
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


_DUMMY_HASH = hash_password(secrets.token_hex(8))  # checked for unknown accounts: the same time taken


# --- the catalog -----------------------------------------------------------------------------------
def _resolve(doc: dict, node, depth: int = 0):
    """`node` with its local `$ref`s inlined (8 levels deep at most: recursive schemas stay refs)."""
    if depth > 8:
        return node
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target = doc
            for part in ref[2:].split("/"):
                target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
            return _resolve(doc, target, depth + 1)
        return {k: _resolve(doc, v, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(doc, v, depth + 1) for v in node]
    return node


def _pretty(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _content(doc: dict, content) -> list[dict]:
    out = []
    for ctype, media in (content or {}).items():
        media = _resolve(doc, media or {})
        examples = []
        if "example" in media:
            examples.append(("example", _pretty(media["example"])))
        for name, ex in (media.get("examples") or {}).items():
            if isinstance(ex, dict) and "value" in ex:
                examples.append((ex.get("summary") or name, _pretty(ex["value"])))
        schema = media.get("schema")
        out.append({"type": ctype, "schema": _pretty(schema) if schema is not None else None, "examples": examples})
    return out


def openapi_operations(doc: dict, base_path: str) -> list[dict]:
    """The operations of an OpenAPI 3 document, ready to render."""
    ops = []
    for path, item in (doc.get("paths") or {}).items():
        item = _resolve(doc, item or {})
        shared = item.get("parameters") or []
        for method in METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            params = []
            for p in shared + (op.get("parameters") or []):
                p = _resolve(doc, p)
                if isinstance(p, dict):
                    params.append({"name": p.get("name"), "in": p.get("in"), "required": bool(p.get("required")),
                                   "description": p.get("description") or "",
                                   "schema": _pretty(p["schema"]) if "schema" in p else ""})
            body = _resolve(doc, op.get("requestBody") or {})
            responses = []
            for code, resp in (op.get("responses") or {}).items():
                resp = _resolve(doc, resp or {})
                responses.append({"code": str(code), "description": resp.get("description") or "",
                                  "content": _content(doc, resp.get("content"))})
            ops.append({"method": method.upper(), "path": path, "try_path": base_path + path,
                        "summary": op.get("summary") or "", "description": op.get("description") or "",
                        "operation_id": op.get("operationId") or "", "deprecated": bool(op.get("deprecated")),
                        "parameters": params,
                        "body": {"required": bool(body.get("required")), "description": body.get("description") or "",
                                 "content": _content(doc, body.get("content"))} if body else None,
                        "responses": responses})
    return ops


def route_operations(routes, base_path: str) -> list[dict]:
    return [{"method": m, "path": base_path + p, "try_path": base_path + p, "summary": f"route {r.name}",
             "description": "", "operation_id": r.name, "deprecated": False, "parameters": [], "body": None,
             "responses": []}
            for r in routes for p in r.paths for m in (r.methods or ["GET"])]


def load_openapi(path: str, config_path: str | None) -> dict:
    if not os.path.isabs(path) and config_path:
        near_config = os.path.join(os.path.dirname(os.path.abspath(config_path)), path)
        if os.path.exists(near_config) or not os.path.exists(path):
            path = near_config
    with open(path, "rb") as f:
        doc = yaml.safe_load(f)  # JSON is YAML
    if not isinstance(doc, dict):
        raise ValueError("not an OpenAPI document (no top-level object)")
    return doc


def build_catalog(cfg, config_path: str | None) -> dict[str, dict]:
    """slug → entry: the config's APIs (kind `api`) and its plain routes grouped by their first path
    segment (kind `routes`, slug `routes-<segment>`)."""
    entries: dict[str, dict] = {}
    for api in cfg.apis:
        versions = [v for v in api.versions if v.state != "draft"]
        if not versions:
            continue
        entry = {"slug": api.name, "kind": "api", "title": api.name, "description": "", "base_path": api.base_path,
                 "versions": [{"version": v.version, "state": v.state, "sunset": v.sunset, "successor": v.successor,
                               "routes": [r.name for r in v.routes]} for v in versions],
                 "openapi_error": None, "ops": []}
        if api.openapi:
            try:
                doc = load_openapi(api.openapi, config_path)
                info = doc.get("info") or {}
                entry["title"] = f"{api.name} — {info['title']}" if info.get("title") else api.name
                entry["description"] = str(info.get("description") or "")
                entry["api_version"] = str(info.get("version") or "")
                entry["ops"] = openapi_operations(doc, api.base_path)
            except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as exc:
                log.warning("portal: API %s: OpenAPI document %s: %s", api.name, api.openapi, exc)
                entry["openapi_error"] = f"{api.openapi}: {exc}"
        if not entry["ops"]:
            entry["ops"] = route_operations([r for v in versions if v.state != "retired" for r in v.routes],
                                            api.base_path)
        entries[api.name] = entry
    groups: dict[str, list] = {}
    for r in cfg.routes:
        first = r.paths[0].lstrip("/").split("/", 1)[0]
        seg = first if first and not any(c in first for c in "{*:") else "root"
        groups.setdefault(seg, []).append(r)
    for seg, routes in sorted(groups.items()):
        slug = f"routes-{seg}"
        entries.setdefault(slug, {
            "slug": slug, "kind": "routes", "title": f"/{seg}" if seg != "root" else "/", "base_path": "",
            "description": "Routes of the gateway outside any API: " + ", ".join(r.name for r in routes),
            "versions": [], "openapi_error": None, "ops": route_operations(routes, "")})
    return entries


def _matches(entry: dict, q: str) -> bool:
    hay = " ".join([entry["slug"], entry["title"], entry["description"], entry["base_path"]]
                   + [f"{o['method']} {o['path']} {o['summary']} {o['operation_id']}" for o in entry["ops"]])
    return all(word in hay.lower() for word in q.lower().split())


# --- the app ---------------------------------------------------------------------------------------
class Forbidden(Exception):
    pass


class Portal:
    def __init__(self, store: Store, cfg, token: str | None = None, config_path: str | None = None, tls: bool = False,
                 analytics=None, oauth=None):
        self.store = store
        self.oauth = oauth  # control/oauth.py's AuthServer, or None
        self.analytics = analytics
        self.cfg = cfg
        self.admin_token = token
        self.secure_cookie = tls
        self.config_path = config_path
        self._catalog = build_catalog(cfg, config_path)
        self._catalog_states: dict = {}  # the store's API lifecycle rows the catalog shows
        self.plan_approval = {p.name: p.approval for p in cfg.plans}
        self.failures: dict[str, deque] = {}
        # session id → (when, app id, what is shown once: an API key, or (client_id, client_secret))
        self.flash: dict[int, tuple[float, int, str | tuple[str, str]]] = {}
        self.env = Environment(loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                               autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
        proxy = next((li for li in cfg.listeners if li.kind == "proxy"), None)
        self.proxy = None
        if proxy is not None:
            host = proxy.address
            if host in ("", "0.0.0.0"):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            self.proxy = (host, proxy.port, proxy.tls is not None)

    # --- plumbing ---------------------------------------------------------------------------------
    def page(self, name: str, request: Request, status: int = 200, **ctx) -> HTMLResponse:
        sess = request.state.session
        ctx.setdefault("title", "Developer portal")
        html = self.env.get_template(name).render(request=request, session=sess, csrf=sess["csrf"],
                                                   developer=request.state.developer, **ctx)
        return HTMLResponse(html, status, headers={"Cache-Control": "no-store",
                                                   "X-Frame-Options": "DENY",
                                                   "Content-Security-Policy": "default-src 'self'; "
                                                   "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"})

    def message(self, request: Request, status: int, text: str) -> HTMLResponse:
        return self.page("message.html", request, status, message=text, title=f"{status}")

    def handler(self, fn, need_login: bool = False):
        """Wrap a page: the session (made, anonymous, when there is none), the CSRF check on POST, the
        developer signed in."""
        async def endpoint(request: Request) -> Response:
            token = request.cookies.get(COOKIE)
            sess = self.store.get_session(token) if token else None
            new_token = None
            if sess is None:
                new_token, sess = self.store.create_session(None, SESSION_TTL)
            request.state.session = sess
            request.state.developer = None
            if sess["developer_id"] is not None:
                acct = self.store.portal_account(developer_id=sess["developer_id"])
                request.state.developer = acct if acct and acct["state"] == "active" else None
            form: dict[str, str] = {}
            if request.method == "POST":
                form = await self.form(request)
                if new_token is not None or not hmac.compare_digest(form.get("csrf", ""), sess["csrf"]):
                    resp = self.message(request, 403, "This form has expired or did not come from this portal "
                                                      "(CSRF check failed). Reload the page and try again.")
                    return self.cookie(resp, new_token)
            if need_login and request.state.developer is None:
                resp = RedirectResponse("/signin?next=" + quote(request.url.path), 303)
                return self.cookie(resp, new_token)
            try:
                resp = await fn(request, form)
            except StoreUnavailable:
                raise  # the generic 503 page (create_portal's handler), not the store's words
            except StoreError as exc:
                resp = self.message(request, exc.status, str(exc))
            except Forbidden as exc:
                resp = self.message(request, 404, str(exc) or "not found")
            return self.cookie(resp, new_token)
        return endpoint

    def cookie(self, resp: Response, token: str | None) -> Response:
        if token is not None:
            resp.set_cookie(COOKIE, token, max_age=int(SESSION_TTL), path="/", httponly=True, samesite="lax",
                            secure=self.secure_cookie)
        return resp

    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > FORM_LIMIT:
                break
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded" or len(raw) > FORM_LIMIT:
            return {}
        return {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}

    @property
    def catalog(self) -> dict[str, dict]:
        """The catalog, with each API version in the state in force: rebuilt when an admin set one
        (the store's api_states, config/lifecycle.py)."""
        from ..config.lifecycle import overrides_from_rows, with_lifecycle

        states = overrides_from_rows(self.store.list_api_states())
        if states != self._catalog_states:
            self._catalog = build_catalog(with_lifecycle(self.cfg, states), self.config_path)
            self._catalog_states = states
        return self._catalog

    def entry(self, request: Request) -> dict:
        slug = request.path_params["slug"]
        if request.url.path.startswith("/routes/"):
            slug = "routes-" + slug
        e = self.catalog.get(slug)
        if e is None:
            raise Forbidden(f"no API `{slug}`")
        return e

    def my_app(self, request: Request, app_id) -> dict:
        try:
            app = self.store.get_app(int(app_id))
        except (ValueError, TypeError, StoreError):
            raise Forbidden("no such app") from None
        if app["developer_id"] != request.state.developer["id"]:
            raise Forbidden("no such app")
        return app

    def actor(self, request: Request) -> str:
        d = request.state.developer
        client = request.client.host if request.client else "?"
        return f"portal:{d['email'] if d else 'anonymous'}@{client}"

    # --- catalog ----------------------------------------------------------------------------------
    async def catalog_page(self, request: Request, form):
        q = request.query_params.get("q", "").strip()[:200]
        entries = [e for e in self.catalog.values() if not q or _matches(e, q)]
        return self.page("catalog.html", request, q=q, apis=[e for e in entries if e["kind"] == "api"],
                         groups=[e for e in entries if e["kind"] == "routes"])

    async def api_page(self, request: Request, form):
        e = self.entry(request)
        apps = self.store.list_apps_of(request.state.developer["id"]) if request.state.developer else []
        plans = [{**p, "approval": self.plan_approval.get(p["name"], False)} for p in self.store.list_plans()]
        return self.page("api.html", request, api=e, apps=apps, plans=plans, title=e["title"])

    async def operation_page(self, request: Request, form):
        e = self.entry(request)
        try:
            n = int(request.path_params["n"])
            op = e["ops"][n]
        except (ValueError, IndexError):
            raise Forbidden("no such operation") from None
        result = None
        if request.method == "POST":
            result = await self.try_it(form)
        return self.page("operation.html", request, api=e, op=op, n=n, result=result, sent=form,
                         title=f"{op['method']} {op['path']}")

    async def try_it(self, form: dict) -> dict:
        if self.proxy is None:
            return {"error": "this gateway has no proxy listener"}
        method = form.get("method", "GET").upper()
        path = form.get("path", "/")
        if method not in {m.upper() for m in METHODS} or not path.startswith("/") or any(c in path for c in "\r\n "):
            return {"error": "give a method and a path starting with /"}
        headers = {"Accept": "application/json, */*"}
        if form.get("key"):
            headers["apikey"] = form["key"].strip()
        body = form.get("body", "").encode() or None
        if body is not None:
            headers["Content-Type"] = form.get("content_type") or "application/json"
        host, port, tls = self.proxy

        def send():
            if tls:
                conn = http.client.HTTPSConnection(host, port, timeout=TRY_TIMEOUT,
                                                   context=ssl._create_unverified_context())  # our own listener
            else:
                conn = http.client.HTTPConnection(host, port, timeout=TRY_TIMEOUT)
            try:
                started = time.monotonic()
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read(TRY_BODY_LIMIT + 1)
                return {"status": resp.status, "reason": resp.reason, "headers": resp.getheaders(),
                        "body": data[:TRY_BODY_LIMIT].decode("utf-8", "replace"),
                        "truncated": len(data) > TRY_BODY_LIMIT, "ms": round((time.monotonic() - started) * 1000, 1)}
            finally:
                conn.close()

        try:
            return await asyncio.to_thread(send)
        except (OSError, http.client.HTTPException) as exc:
            return {"error": f"the gateway did not answer: {exc}"}

    # --- accounts ---------------------------------------------------------------------------------
    async def signup(self, request: Request, form):
        if request.method == "GET":
            return self.page("signup.html", request, title="Sign up")
        email = form.get("email", "").strip().lower()
        name = form.get("name", "").strip()[:200] or None
        password = form.get("password", "")
        error = None
        if not (3 <= len(email) <= 320 and "@" in email and " " not in email):
            error = "Give a valid email address."
        elif not 10 <= len(password) <= 1024:
            error = "Choose a password of at least 10 characters."
        elif self.store.portal_account(email=email) is not None:
            error = "An account with this email already exists: sign in."
        if error:
            return self.page("signup.html", request, 400, error=error, email=email, name=name or "", title="Sign up")
        pw_hash = await asyncio.to_thread(hash_password, password)
        state = "pending" if self.cfg.portal.approval else "active"
        try:
            self.store.create_portal_developer(self.actor(request), email, name, pw_hash, state)
        except StoreUnavailable:
            raise
        except StoreError:
            return self.page("signup.html", request, 409, error="An account with this email already exists.",
                             email=email, title="Sign up")
        if state == "pending":
            return self.message(request, 202, "Thanks for signing up. An administrator will approve your account; "
                                              "you can sign in once they have.")
        return RedirectResponse("/signin?" + urlencode({"email": email, "new": "1"}), 303)

    def _limited(self, *keys: str) -> bool:
        cutoff = time.monotonic() - LOGIN_WINDOW
        hit = False
        for k in keys:
            q = self.failures.get(k)
            while q and q[0] < cutoff:
                q.popleft()
            if q is not None and not q:
                del self.failures[k]
            elif q is not None and len(q) >= LOGIN_FAILURES:
                hit = True
        return hit

    async def signin(self, request: Request, form):
        if request.method == "GET":
            return self.page("signin.html", request, email=request.query_params.get("email", ""),
                             new=request.query_params.get("new"), next=request.query_params.get("next", ""),
                             title="Sign in")
        email = form.get("email", "").strip().lower()[:320]
        nxt = form.get("next", "")
        nxt = nxt if nxt.startswith("/") and not nxt.startswith("//") else "/apps"
        ip_key, acct_key = f"ip:{request.client.host if request.client else '?'}", f"account:{email}"
        if self._limited(ip_key, acct_key):
            return self.page("signin.html", request, 429, email=email, next=nxt, title="Sign in",
                             error="Too many failed sign-ins: wait a few minutes and try again.")
        acct = self.store.portal_account(email=email)
        ok = await asyncio.to_thread(check_password, form.get("password", ""),
                                     acct["password_hash"] if acct else _DUMMY_HASH)
        if not ok or acct is None:
            now = time.monotonic()
            for k in (ip_key, acct_key):
                self.failures.setdefault(k, deque()).append(now)
            return self.page("signin.html", request, 401, email=email, next=nxt, title="Sign in",
                             error="Wrong email or password.")
        if acct["state"] != "active":
            return self.page("signin.html", request, 403, email=email, next=nxt, title="Sign in",
                             error="Your account is waiting for an administrator's approval."
                             if acct["state"] == "pending" else "Your account is disabled.")
        self.failures.pop(acct_key, None)
        self.store.delete_session(request.cookies.get(COOKIE, ""))  # a new session: no fixation
        token, _sess = self.store.create_session(acct["id"], SESSION_TTL)
        return self.cookie(RedirectResponse(nxt, 303), token)

    async def signout(self, request: Request, form):
        self.store.delete_session(request.cookies.get(COOKIE, ""))
        resp = RedirectResponse("/", 303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    async def approve(self, request: Request):
        """`POST /admin/developers/{id}/approve` with the admin token (Authorization: Bearer): no
        cookie, so no CSRF token either."""
        given = request.headers.get("authorization", "")
        if self.admin_token is None or not hmac.compare_digest(given.encode(), f"Bearer {self.admin_token}".encode()):
            return Response(b'{"error": "unauthorized"}', 401, media_type="application/json")
        try:
            row = self.store.set_portal_state("admin", int(request.path_params["id"]), "active")
        except StoreUnavailable:
            raise
        except (ValueError, StoreError) as exc:
            return Response(json.dumps({"error": str(exc)}).encode(), 404, media_type="application/json")
        return Response(json.dumps(row).encode(), media_type="application/json")

    async def pending(self, request: Request):
        given = request.headers.get("authorization", "")
        if self.admin_token is None or not hmac.compare_digest(given.encode(), f"Bearer {self.admin_token}".encode()):
            return Response(b'{"error": "unauthorized"}', 401, media_type="application/json")
        return Response(json.dumps(self.store.list_portal_accounts("pending")).encode(),
                        media_type="application/json")

    # --- apps -------------------------------------------------------------------------------------
    def _sync_consumer(self, request: Request, app: dict) -> dict | None:
        """The app's consumer, made on first need, on the plan of its latest active subscription."""
        active = [s for s in self.store.list_subscriptions(app["id"]) if s["state"] == "active"]
        consumer = self.store.app_consumer(app["id"])
        plan = active[-1]["plan"] if active else None
        if consumer is None and active:
            consumer = self.store.create_consumer(self.actor(request), f"app-{app['id']}", plan=plan,
                                                  app_id=app["id"])
        elif consumer is not None and consumer["plan"] != plan:
            consumer = self.store.update_consumer(self.actor(request), consumer["username"], {"plan": plan})
        return consumer

    async def apps_page(self, request: Request, form):
        dev = request.state.developer
        error = None
        if request.method == "POST":
            name = form.get("name", "").strip()
            if not name or len(name) > 128 or not all(c.isalnum() or c in "_.-" for c in name):
                error = "An app's name is letters, digits, `_`, `.` and `-`."
            else:
                try:
                    app = self.store.create_app(self.actor(request), name, dev["id"],
                                                form.get("description", "").strip()[:1024] or None)
                    return RedirectResponse(f"/apps/{app['id']}", 303)
                except StoreUnavailable:
                    raise
                except StoreError:
                    error = f"You already have an app named {name}."
        return self.page("apps.html", request, 400 if error else 200, apps=self.store.list_apps_of(dev["id"]),
                         error=error, title="Your apps")

    async def app_page(self, request: Request, form):
        app = self.my_app(request, request.path_params["id"])
        consumer = self._sync_consumer(request, app)
        keys = self.store.list_credentials(consumer["username"]) if consumer else []
        shown = shown_client = None
        f = self.flash.pop(request.state.session["id"], None)
        if f is not None and f[1] == app["id"] and time.monotonic() - f[0] < 300:
            if isinstance(f[2], tuple):
                shown_client = f[2]
            else:
                shown = f[2]
        clients = self.store.list_oauth_clients(app["id"]) if self.oauth is not None else []
        subs = [{**s, "approval": self.plan_approval.get(s["plan"], False)} for s in self.store.list_subscriptions(app["id"])]
        plans = [{**p, "approval": self.plan_approval.get(p["name"], False)} for p in self.store.list_plans()]
        return self.page("app.html", request, app=app, consumer=consumer, keys=keys, shown_key=shown, subs=subs,
                         plans=plans, usage=self.usage(consumer), can_key=any(s["state"] == "active" for s in subs),
                         oauth=self.oauth, clients=clients, shown_client=shown_client,
                         token_endpoint=self.oauth.metadata()["token_endpoint"] if self.oauth else None,
                         title=f"App {app['name']}")

    def usage(self, consumer: dict | None) -> dict:
        """The app's hourly requests, errors and average latency over the last 7 days, and its plan's
        quotas used in the current UTC hour/day/month, from the usage ledger (exact counts)."""
        empty = {"available": self.analytics is not None, "rows": [], "max": 0, "quotas": [], "chart": None}
        if consumer is None or self.analytics is None:
            return empty
        from ..policies.plans import period_window

        now = time.time()
        try:
            rows = self.analytics.usage(consumer=consumer["username"], start=int(now) - 7 * 86400)
            quotas = []
            plan = self.store.get_plan(consumer["plan"]) if consumer.get("plan") else None
            for q in (plan or {}).get("quotas", []):
                period = q.get("period", "day")
                _wid, start, _end = period_window(period, now)
                used = sum(r["requests"] for r in self.analytics.usage(consumer=consumer["username"],
                                                                        start=int(start)))
                quotas.append({"period": period, "limit": q["limit"], "used": used,
                               "percent": min(100.0, round(100 * used / q["limit"], 1))})
        except Exception as exc:  # noqa: BLE001 - the ledger is optional: the page still renders
            log.warning("portal: usage of %s: %s", consumer["username"], exc)
            return {**empty, "available": False}
        per: dict[str, list[float]] = {}
        for r in rows:
            c = per.setdefault(r["period"], [0, 0, 0.0])
            c[0] += r["requests"]
            c[1] += r["errors"]
            c[2] += (r["avg_latency_ms"] or 0) * r["requests"]
        out = [{"period": p, "requests": n, "errors": e, "latency_ms": round(lat / n, 2) if n else None}
               for p, (n, e, lat) in sorted(per.items())]
        return {"available": True, "rows": out, "max": max((r["requests"] for r in out), default=0),
                "quotas": quotas, "chart": _usage_chart(out)}

    async def subscribe(self, request: Request, form):
        app = self.my_app(request, form.get("app_id"))
        plan = self.store.get_plan(form.get("plan", ""))
        state = "pending" if self.plan_approval.get(plan["name"], False) else "active"
        if not any(s["plan"] == plan["name"] for s in self.store.list_subscriptions(app["id"])):
            self.store.create_subscription(self.actor(request), app["id"], plan["name"], state)
        self._sync_consumer(request, app)
        return RedirectResponse(f"/apps/{app['id']}", 303)

    def _my_key(self, request: Request, app: dict) -> int:
        consumer = self.store.app_consumer(app["id"])
        try:
            cid = int(request.path_params["cid"])
        except ValueError:
            raise Forbidden("no such key") from None
        if consumer is None or self.store.get_credential(cid)["consumer"] != consumer["username"]:
            raise Forbidden("no such key")
        return cid

    def _show_once(self, request: Request, app: dict, key: str | tuple[str, str]) -> Response:
        self.flash[request.state.session["id"]] = (time.monotonic(), app["id"], key)
        return RedirectResponse(f"/apps/{app['id']}", 303)

    async def create_key(self, request: Request, form):
        app = self.my_app(request, request.path_params["id"])
        consumer = self._sync_consumer(request, app)
        if consumer is None or consumer["plan"] is None:
            return self.message(request, 409, "Subscribe this app to a plan (and wait for its approval, if the "
                                              "plan needs one) before asking for a key.")
        _cred, key = self.store.create_key(self.actor(request), consumer["username"],
                                           taken=frozenset(h for c in self.cfg.consumers for h in c.keys))
        return self._show_once(request, app, key)

    async def rotate_key(self, request: Request, form):
        app = self.my_app(request, request.path_params["id"])
        _cred, key = self.store.rotate_key(self.actor(request), self._my_key(request, app))
        return self._show_once(request, app, key)

    async def revoke_key(self, request: Request, form):
        app = self.my_app(request, request.path_params["id"])
        self.store.revoke_key(self.actor(request), self._my_key(request, app))
        return RedirectResponse(f"/apps/{app['id']}", 303)

    # --- OAuth 2.0 client credentials -------------------------------------------------------------
    def _my_client(self, request: Request, app: dict) -> str:
        if self.oauth is None:
            raise Forbidden("OAuth is not enabled on this gateway")
        client_id = request.path_params["client_id"]
        try:
            client = self.store.get_oauth_client(client_id)
        except StoreError:
            raise Forbidden("no such client") from None
        if client["app_id"] != app["id"]:
            raise Forbidden("no such client")
        return client_id

    async def create_client(self, request: Request, form):
        app = self.my_app(request, request.path_params["id"])
        if self.oauth is None:
            raise Forbidden("OAuth is not enabled on this gateway")
        consumer = self._sync_consumer(request, app)
        if consumer is None or consumer["plan"] is None:
            return self.message(request, 409, "Subscribe this app to a plan (and wait for its approval, if the "
                                              "plan needs one) before asking for client credentials.")
        # a developer's client may ask for every scope the gateway lists; an admin can narrow it (PATCH)
        client, secret = self.store.create_oauth_client(self.actor(request), app["id"], sorted(self.oauth.supported_scopes))
        return self._show_once(request, app, (client["client_id"], secret))

    async def rotate_client(self, request: Request, form):
        app = self.my_app(request, request.path_params["id"])
        client, secret = self.store.rotate_oauth_client(self.actor(request), self._my_client(request, app))
        return self._show_once(request, app, (client["client_id"], secret))

    async def revoke_client(self, request: Request, form):
        app = self.my_app(request, request.path_params["id"])
        self.store.revoke_oauth_client(self.actor(request), self._my_client(request, app))
        return RedirectResponse(f"/apps/{app['id']}", 303)


def create_portal(store: Store, cfg, token: str | None = None, config_path: str | None = None,
                  tls: bool = False, analytics=None, oauth=None) -> Starlette:
    p = Portal(store, cfg, token, config_path, tls, analytics, oauth)
    h = p.handler
    routes = [
        Route("/", h(p.catalog_page), methods=["GET"]),
        Route("/apis/{slug}", h(p.api_page), methods=["GET"]),
        Route("/routes/{slug}", h(p.api_page), methods=["GET"]),
        Route("/apis/{slug}/ops/{n}", h(p.operation_page), methods=["GET", "POST"]),
        Route("/routes/{slug}/ops/{n}", h(p.operation_page), methods=["GET", "POST"]),
        Route("/signup", h(p.signup), methods=["GET", "POST"]),
        Route("/signin", h(p.signin), methods=["GET", "POST"]),
        Route("/signout", h(p.signout), methods=["POST"]),
        Route("/apps", h(p.apps_page, True), methods=["GET", "POST"]),
        Route("/apps/{id}", h(p.app_page, True), methods=["GET"]),
        Route("/subscribe", h(p.subscribe, True), methods=["POST"]),
        Route("/apps/{id}/keys", h(p.create_key, True), methods=["POST"]),
        Route("/apps/{id}/keys/{cid}/rotate", h(p.rotate_key, True), methods=["POST"]),
        Route("/apps/{id}/keys/{cid}/revoke", h(p.revoke_key, True), methods=["POST"]),
        Route("/apps/{id}/oauth-clients", h(p.create_client, True), methods=["POST"]),
        Route("/apps/{id}/oauth-clients/{client_id}/rotate", h(p.rotate_client, True), methods=["POST"]),
        Route("/apps/{id}/oauth-clients/{client_id}/revoke", h(p.revoke_client, True), methods=["POST"]),
        Route("/admin/developers/pending", p.pending, methods=["GET"]),
        Route("/admin/developers/{id}/approve", p.approve, methods=["POST"]),
    ]
    async def unavailable(request, exc):  # the store in Redis is away (control/replica.py): nothing written
        return HTMLResponse("<!doctype html><title>503</title><p>The portal cannot save anything right now. "
                            "Try again in a moment.</p>", 503, headers={"Cache-Control": "no-store", "Retry-After": "1"})

    app = Starlette(routes=routes, exception_handlers={StoreUnavailable: unavailable})
    app.state.portal = p
    return app


__all__ = ["create_portal", "hash_password", "check_password", "build_catalog"]


def _usage_chart(rows: list[dict], now: float | None = None, hours: int = 24) -> dict | None:
    """The last `hours` UTC hours (empty ones included): bars of requests with errors on top, and
    the average latency as dots joined by a line — SVG coordinates for the template."""
    if not rows:
        return None
    by_period = {r["period"]: r for r in rows}
    last = int(now if now is not None else time.time()) // 3600
    slots = []
    for hour in range(last - hours + 1, last + 1):
        period = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(hour * 3600))
        slots.append(by_period.get(period) or {"period": period, "requests": 0, "errors": 0, "latency_ms": None})
    w, h, pad = 640, 160, 24
    top = max(r["requests"] for r in slots) or 1
    lat_top = max((r["latency_ms"] or 0) for r in slots) or 1
    step = (w - 2 * pad) / len(slots)
    bars, dots = [], []
    for i, r in enumerate(slots):
        x = pad + i * step
        bh = (h - 2 * pad) * r["requests"] / top
        eh = (h - 2 * pad) * r["errors"] / top
        if r["requests"]:
            bars.append({"x": round(x + step * 0.1, 1), "w": round(max(1.0, step * 0.8), 1),
                         "y": round(h - pad - bh, 1), "h": round(bh, 1), "ey": round(h - pad - eh, 1),
                         "eh": round(eh, 1), "title": f"{r['period']}: {r['requests']} requests, {r['errors']} "
                                                      f"errors, {r['latency_ms']} ms average"})
        if r["latency_ms"] is not None:
            dots.append((round(x + step / 2, 1), round(h - pad - (h - 2 * pad) * r["latency_ms"] / lat_top, 1)))
    return {"w": w, "h": h, "pad": pad, "bars": bars, "dots": dots, "line": " ".join(f"{x},{y}" for x, y in dots),
            "top": top, "lat_top": round(lat_top, 2), "first": slots[0]["period"][11:16],
            "last": slots[-1]["period"][11:16]}
