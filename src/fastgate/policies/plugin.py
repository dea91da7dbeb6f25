"""In-process Python plugins: a policy class named by import path, with its own config struct.

    policies:
      - type: plugin
        module: mycompany.policies:TenantPolicy
        config: {allowed: [acme, globex]}

The class (README "Plugins" has a worked example, examples/plugins/tenant.py):
    phase = "access" | "authentication" | ... | "log"    (policies/base.py PHASES; default "request")
    class Config(msgspec.Struct): ...                     (optional: validates `config`)
    def __init__(self, config, ctx)                       (ctx: policies/base.py BuildContext)
    def request(self, ex)         -> None | bytes | awaitable of either     (optional)
    def request_body(self, ex, body: bytes) -> None | bytes; body_limit = N  (optional)
    def response(self, ex, rh)    -> None; may append header lines to ex.resp_extra (optional)
"""
from __future__ import annotations

import importlib

import msgspec

from ..config.schema import Plugin
from .base import PHASE, register


def load_class(path: str):
    """Import `package.module:ClassName`; ImportError/AttributeError say what is missing."""
    mod_name, _, cls_name = path.partition(":")
    mod = importlib.import_module(mod_name)
    return getattr(mod, cls_name)


def plugin_config(cls, raw: dict):
    """The plugin's validated config: its Config struct, or the raw dict when it has none."""
    conf_type = getattr(cls, "Config", None)
    if conf_type is None:
        return raw
    return msgspec.convert(raw, conf_type)


def check_plugin(cfg: Plugin) -> list[tuple[str, str, str]]:
    """(relative path, message, hint) for each problem `fastgate check` should report."""
    try:
        cls = load_class(cfg.module)
    except (ImportError, AttributeError) as exc:
        return [("module", f"cannot import `{cfg.module}`: {exc}", "is the module on PYTHONPATH?")]
    out = []
    phase = getattr(cls, "phase", "request")
    if phase not in PHASE:
        out.append(("module", f"`{cfg.module}` has phase {phase!r}", "one of " + ", ".join(PHASE)))
    if not any(callable(getattr(cls, h, None)) for h in ("request", "request_body", "response")):
        out.append(("module", f"`{cfg.module}` has no request, request_body or response hook", ""))
    try:
        plugin_config(cls, cfg.config)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        where = ""
        if " - at `$" in msg:
            msg, _, where = msg.rpartition(" - at `$")
            where = where.rstrip("`")
        out.append(("config" + where, msg, f"see {cfg.module}.Config"))
    return out


@register(Plugin)
class PluginBuilder:
    """Builds the user's class; `check` is what `fastgate check` runs for it."""

    check = staticmethod(check_plugin)

    def __new__(cls, cfg: Plugin, ctx):
        klass = load_class(cfg.module)
        obj = klass(plugin_config(klass, cfg.config), ctx)
        if getattr(obj, "phase", None) is None:
            obj.phase = "request"
        return obj
