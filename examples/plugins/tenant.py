"""A worked example of a fastgate plugin: only known tenants get through, and everyone is told who.

    policies:
      - type: plugin
        module: tenant:TenantPolicy          # this file on PYTHONPATH as `tenant`
        config: {header: X-Tenant, allowed: [acme, globex], max_body: 4096, forbidden_words: [DROP]}

- request: reads the tenant header; an unknown tenant gets a 403 at once (no coroutine), a known
  one is forwarded with `X-Tenant-Verified: <name>` for the upstream;
- request_body: (once the whole body is in, up to max_body bytes) refuses bodies that contain a
  forbidden word with 422;
- response: adds `X-Served-Tenant: <name>` to the response the client gets.
"""
from __future__ import annotations

import msgspec


class TenantPolicy:
    phase = "authorization"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        allowed: list[str]
        header: str = "X-Tenant"
        max_body: int = 65536
        forbidden_words: list[str] = []

    def __init__(self, config: Config, ctx):
        self.header = config.header.lower().encode()
        self.allowed = {t.encode() for t in config.allowed}
        self.body_limit = config.max_body  # request_body sees at most this much (larger: 413)
        self.forbidden = [w.encode() for w in config.forbidden_words]
        if not self.forbidden:
            self.request_body = None  # no body hook: the route streams bodies instead of buffering

    def request(self, ex):
        tenant = ex.header(self.header)
        if tenant not in self.allowed:
            return ex.reply(403, "unknown_tenant")
        ex.scratch = tenant
        ex.add_upstream_header(b"X-Tenant-Verified", tenant)
        return None

    def request_body(self, ex, body: bytes):
        if any(w in body for w in self.forbidden):
            return ex.reply(422, "forbidden_content")
        return None

    def response(self, ex, rh):
        ex.resp_extra += b"X-Served-Tenant: " + ex.scratch + b"\r\n"
