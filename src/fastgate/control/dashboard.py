"""The analytics endpoints of the admin API and the dashboard (admin side, under /dashboard).

`GET /analytics/summary` and `GET /usage` sit behind the admin API's bearer token like every other
endpoint. The dashboard is for a browser: it takes the same token once, from a login form or a
`?token=` (then redirects without it), and keeps it as an HttpOnly, SameSite=Strict cookie holding
an HMAC of the token (not the token). Its charts are SVG drawn here: no JavaScript, nothing fetched
from elsewhere. Its numbers come from the same `Analytics.summary` the API answers.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from urllib.parse import parse_qs, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .analytics import WINDOWS, parse_time, to_csv

COOKIE = "fastgate_dashboard"
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                          autoescape=True, trim_blocks=True, lstrip_blocks=True)


def _bad(detail: str) -> JSONResponse:
    return JSONResponse({"error": "invalid_query", "detail": detail}, 422)


def _repeated(request: Request) -> JSONResponse | None:
    """`?to=1&to=2` is ambiguous: 422, as the admin API answers it."""
    for name in set(request.query_params):
        if len(request.query_params.getlist(name)) > 1:
            return _bad(f"{name}: given more than once")
    return None


def api_routes(analytics) -> list[Route]:
    async def summary(request: Request):
        if (bad := _repeated(request)) is not None:
            return bad
        window = request.query_params.get("window", "1h")
        if window not in WINDOWS:
            return _bad("window: 1h or 1d")
        return JSONResponse(analytics.summary(window))

    async def usage(request: Request):
        if (bad := _repeated(request)) is not None:
            return bad
        q = request.query_params
        gran = q.get("granularity", "hour")
        fmt = q.get("format", "json")
        if gran not in ("hour", "day"):
            return _bad("granularity: hour or day")
        if fmt not in ("json", "csv"):
            return _bad("format: json or csv")
        try:
            start, end = parse_time(q.get("from")), parse_time(q.get("to"))
        except ValueError:
            return _bad("from, to: unix seconds or an ISO 8601 date/time")
        rows = analytics.usage(q.get("consumer") or None, start, end, gran)
        if fmt == "csv":
            return Response(to_csv(rows), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="usage.csv"'})
        return JSONResponse(rows)

    return [Route("/analytics/summary", summary, methods=["GET"]), Route("/usage", usage, methods=["GET"])]


# --- charts ----------------------------------------------------------------------------------------
W, H, PAD_L, PAD_B, PAD_T = 640, 180, 56, 22, 10
COLORS = ("#2563eb", "#d97706", "#dc2626", "#059669")


def _fmt(v: float, unit: str = "") -> str:
    if unit == "s":
        return f"{v * 1000:.3g} ms" if v < 1 else f"{v:.3g} s"
    if unit == "%":
        return f"{v * 100:.3g}%"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def chart(series: list[dict], keys: list[str], title: str, unit: str = "", bars: bool = False) -> dict:
    """An SVG line (or bar) chart of `keys` over the summary's series: a dict the template draws."""
    n = len(series)
    vals = [[(p.get(k) or 0) for p in series] for k in keys]
    top = max([max(v) if v else 0 for v in vals] + [0])
    top = top * 1.1 if top > 0 else 1
    iw, ih = W - PAD_L - 8, H - PAD_B - PAD_T

    def x(i):
        return PAD_L + (iw * i / max(1, n - 1))

    def y(v):
        return PAD_T + ih - ih * v / top

    lines, rects = [], []
    for j, (k, vs) in enumerate(zip(keys, vals, strict=True)):
        if bars:
            bw = max(1.0, iw / max(1, n) - 1)
            for i, v in enumerate(vs):
                if v:
                    rects.append({"x": round(PAD_L + iw * i / max(1, n), 1), "y": round(y(v), 1), "w": round(bw, 1),
                                  "h": round(PAD_T + ih - y(v), 1), "color": COLORS[j % 4], "title": f"{k}: {v}"})
        else:
            pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vs))
            lines.append({"key": k, "points": pts, "color": COLORS[j % 4]})
    ticks = [{"y": round(y(top * f / 1.1), 1), "label": _fmt(top * f / 1.1, unit)} for f in (0, 0.55, 1.1)]
    first = series[0]["ts"] if series else 0
    last = series[-1]["ts"] if series else 0
    import time

    return {"title": title, "w": W, "h": H, "lines": lines, "rects": rects, "ticks": ticks, "x0": PAD_L,
            "x1": W - 8, "ybase": PAD_T + ih, "keys": [{"key": k, "color": COLORS[j % 4]} for j, k in enumerate(keys)],
            "from": time.strftime("%H:%M", time.gmtime(first)), "to": time.strftime("%H:%M UTC", time.gmtime(last))}


# --- the dashboard app -----------------------------------------------------------------------------
def with_dashboard(api, analytics, token: str | None):
    """An ASGI app: /dashboard… to the dashboard (cookie login), everything else to `api`."""
    cookie_value = hmac.new((token or "").encode(), b"fastgate-dashboard", hashlib.sha256).hexdigest()

    def authed(request: Request) -> bool:
        if token is None:
            return True
        got = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(got.encode(), cookie_value.encode())

    def _set_cookie(resp: Response, request: Request) -> Response:
        resp.set_cookie(COOKIE, cookie_value, httponly=True, samesite="strict", path="/dashboard",
                        secure=request.url.scheme == "https")
        return resp

    async def login_form(request: Request):
        return HTMLResponse(_env.get_template("dashboard_login.html").render(error=None))

    async def login(request: Request):
        body = (await request.body())[:4096].decode("utf-8", "replace")
        given = (parse_qs(body).get("token") or [""])[0]
        if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
            return HTMLResponse(_env.get_template("dashboard_login.html").render(error="wrong token"), 401)
        return _set_cookie(RedirectResponse("/dashboard", 303), request)

    async def logout(request: Request):
        resp = RedirectResponse("/dashboard/login", 303)
        resp.delete_cookie(COOKIE, path="/dashboard")
        return resp

    async def page(request: Request):
        q = dict(request.query_params)
        given = q.pop("token", None)
        if given is not None:  # a link with ?token=: set the cookie, then drop the token from the URL
            if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
                return HTMLResponse(_env.get_template("dashboard_login.html").render(error="wrong token"), 401)
            target = "/dashboard" + (("?" + urlencode(q)) if q else "")
            return _set_cookie(RedirectResponse(target, 303), request)
        if not authed(request):
            return RedirectResponse("/dashboard/login", 303)
        window = q.get("window", "1h")
        if window not in WINDOWS:
            window = "1h"
        s = analytics.summary(window)
        series = s["series"]
        charts = [
            chart(series, ["rps"], "Requests per second"),
            chart(series, ["p50", "p95", "p99"], "Latency (gateway)", "s"),
            chart(series, ["error_rate"], "Error rate (5xx)", "%"),
            chart(series, ["limited"], "Rate-limit rejections", bars=True),
            chart(series, ["restarts"], "Worker restarts", bars=True),
        ]
        html = _env.get_template("dashboard_main.html").render(s=s, charts=charts, window=window,
                                                                windows=list(WINDOWS), fmt=_fmt)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    dash = Starlette(routes=[
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/login", login_form, methods=["GET"]),
        Route("/dashboard/login", login, methods=["POST"]),
        Route("/dashboard/logout", logout, methods=["POST", "GET"]),
    ])

    async def app(scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == "/dashboard" or scope["path"].startswith("/dashboard/")):
            await dash(scope, receive, send)
        else:
            await api(scope, receive, send)

    return app
