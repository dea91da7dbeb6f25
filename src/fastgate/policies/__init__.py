"""Policies: what the gateway does to each request, compiled into one chain per route."""
from __future__ import annotations

import importlib

from .base import BUILDERS, PHASES  # noqa: F401

# where each policy type's builder lives: a worker imports only the modules its config uses (the
# JWT one alone pulls in `cryptography`, several MB in every worker's RSS)
MODULE_OF = {
    "rate-limit": "limits", "ip-restriction": "access", "real-ip": "access", "cors": "access",
    "request-size": "access", "user-agent": "access", "request-termination": "access",
    "json-threat": "threat", "plan-limits": "plans", "concurrency-limit": "plans", "key-auth": "auth",
    "basic-auth": "auth", "hmac-auth": "auth", "acl": "auth", "require-scopes": "auth", "jwt": "jwt",
    "introspection": "introspection", "proxy-cache": "cache", "response-body": "cache",
    "request-transformer": "transform", "response-transformer": "transform",
    "openapi-validation": "openapi", "plugin": "plugin", "auth-failure-limit": "bruteforce",
}


def policy_tags(cfg) -> set[str]:
    """The policy types a config uses (globally, in APIs, routes, consumers and plans)."""
    from ..config.load import all_routes

    found = list(cfg.policies) + [p for a in cfg.apis for p in a.policies]
    found += [p for _path, r, _a, _v in all_routes(cfg) for p in r.policies]
    found += [p for c in cfg.consumers for p in c.policies] + [p for pl in cfg.plans for p in pl.policies]
    return {type(p).__struct_config__.tag for p in found}


def load_builders(cfg=None) -> None:
    """Import the policy modules so each registers its builder: those `cfg` uses, or all of them."""
    names = set(MODULE_OF.values()) if cfg is None else {MODULE_OF[t] for t in policy_tags(cfg) if t in MODULE_OF}
    for name in sorted(names):
        importlib.import_module(f"{__name__}.{name}")
