"""Every exception fastgate raises, in one tree."""
from __future__ import annotations


class FastgateError(Exception):
    """Base of every fastgate error."""


class ConfigIssue(tuple):
    """(path, message, hint) of one problem found in a config document."""

    __slots__ = ()

    def __new__(cls, path: str, message: str, hint: str = ""):
        return super().__new__(cls, (path, message, hint))

    path = property(lambda self: self[0])
    message = property(lambda self: self[1])
    hint = property(lambda self: self[2])

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class ConfigError(FastgateError, ValueError):
    """A config document has one or more problems; `.issues` lists them all."""

    def __init__(self, issues: list[ConfigIssue], source: str = ""):
        self.issues = list(issues)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + f"{len(self.issues)} config error(s):\n" + "\n".join(f"  {i}" for i in self.issues))


class OpenApiImportError(FastgateError, ValueError):
    """`fastgate import` cannot turn an OpenAPI document into config; `.issues` lists every problem
    (paths are JSON pointers into the document, `--option`s, or `$.…` paths of the resulting config)."""

    def __init__(self, issues: list[ConfigIssue], source: str = ""):
        self.issues = list(issues)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + f"{len(self.issues)} problem(s):\n" + "\n".join(f"  {i}" for i in self.issues))


class GatewayError(FastgateError):
    """An HTTP-facing failure: carries its status and a stable reason."""

    status = 502
    reason = "bad_gateway"

    def __init__(self, detail: str = "", status: int | None = None, reason: str | None = None):
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason
        super().__init__(detail or self.reason)


class UpstreamConnectError(GatewayError):
    status, reason = 502, "upstream_connect_failed"


class UpstreamResetError(GatewayError):
    status, reason = 502, "upstream_reset"


class UpstreamProtocolError(GatewayError):
    status, reason = 502, "upstream_bad_response"


class UpstreamTimeout(GatewayError):
    status, reason = 504, "upstream_timeout"


class NoHealthyUpstream(GatewayError):
    status, reason = 503, "no_healthy_upstream"


class CounterBackendError(FastgateError):
    """The counters backend (Redis) failed or timed out."""


class InternalError(FastgateError):
    """A bug in fastgate."""
