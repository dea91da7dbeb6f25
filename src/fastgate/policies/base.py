"""The policy engine: phases, the registry of policy builders, and the per-route chain.

A policy object may have these hooks (all optional):
  request(ex)             after the head; returns at once whenever it can:
      None        continue with the next policy
      bytes       a complete response the gateway sends instead of proxying (e.g. a 429)
      awaitable   only when the policy must wait (Redis, a key-set fetch, introspection); the
                  chain resumes with the awaitable's result, which is None or bytes as above
  request_body(ex, body)  after the whole body (the route buffers up to `body_limit`): None or bytes
  response(ex, rh)        on the upstream's response head; may set ex.capture = Capture(tee, cap)
                          (_core/proxy.pyx) to receive the body in response_end
  response_end(ex, body)  the whole upstream body, in reverse phase order: with a held capture a
                          transform returns the body to send (None: unchanged); with a tee the
                          client already has it (a cache stores it)
  done(ex)                once per routed exchange, when it finished or its client went away
                          (release what `request` took: a concurrency place, say)
Hooks may append header lines (b"Name: value\\r\\n") to `ex.resp_extra`, sent with the response.
Chains are built once per config generation (`build_chain`), ordered by phase, then by where the
policy was attached (global → API → route), then by declaration order.
"""
from __future__ import annotations

from .._core.chain import ChainCore
from .._core.headers import CheckedHeader

PHASES = ("access", "authentication", "authorization", "limits", "request", "cache", "upstream", "response",
          "log")
PHASE = {name: i for i, name in enumerate(PHASES)}

BUILDERS: dict[type, object] = {}
COMPILED_ELSEWHERE = frozenset({"request-headers", "response-headers"})  # folded into the route's headers


def register(config_type):
    """Class decorator: `@register(schema.RateLimit) class RateLimitPolicy: ...`."""

    def deco(cls):
        BUILDERS[config_type] = cls
        return cls

    return deco


IDENTITY_HEADERS = frozenset((b"x-consumer-id", b"x-consumer-username", b"x-consumer-plan", b"x-consumer-groups",
                              b"x-credential-identifier", b"x-authenticated-scope"))
"""Headers the gateway sets for the upstream after authentication; copies a client sends are dropped
on every route, so an upstream can trust them."""


def _pair(name: bytes, value: bytes) -> tuple:
    """A header pair checked now (the data plane copies it as it is), or, if it cannot be sent, a
    plain pair: the request that would send it is refused then, as for any header a policy adds."""
    try:
        return CheckedHeader(name, value)
    except ValueError:
        return (name, value)


class ConsumerInfo:
    """Who made the request, as authentication policies find it (from config or the store)."""

    __slots__ = ("id", "username", "plan", "groups", "headers")

    def __init__(self, username: str, id: str | None = None, plan: str | None = None, groups=()):
        self.username = username
        self.id = id or username
        self.plan = plan
        self.groups = frozenset(groups)
        h = [_pair(b"X-Consumer-ID", self.id.encode()), _pair(b"X-Consumer-Username", username.encode())]
        if plan:
            h.append(_pair(b"X-Consumer-Plan", plan.encode()))
        if self.groups:
            h.append(_pair(b"X-Consumer-Groups", ",".join(sorted(self.groups)).encode()))
        self.headers = tuple(h)

    def __repr__(self) -> str:
        return f"ConsumerInfo({self.username!r})"


class BuildContext:
    """What a policy may use when it is built: the counters, the route and API names, the whole
    config, the consumers by username, and `owner`: where this policy instance was attached
    ("global#i", "api:NAME#i" or "route:NAME#i"), which names the state it shares — a global
    rate limit counts across every route."""

    __slots__ = ("counters", "route", "api", "owner", "config", "consumers", "directory")

    def __init__(self, counters, route: str, api: str | None, config=None, consumers=None, directory=None):
        self.counters = counters
        self.directory = directory  # control/directory.py: consumers and keys from the store, or None
        self.route = route
        self.api = api
        self.owner = ""
        self.config = config
        self.consumers = consumers if consumers is not None else {}


def attached(cfg, api, route) -> list[tuple[str, object]]:
    """(owner, policy) for every policy that applies to `route`: global, then API, then route."""
    out = [(f"global#{i}", p) for i, p in enumerate(cfg.policies)]
    if api is not None:
        out += [(f"api:{api.name}#{i}", p) for i, p in enumerate(api.policies)]
    out += [(f"route:{route.name}#{i}", p) for i, p in enumerate(route.policies)]
    return out


class Chain(ChainCore):
    """A route's compiled policies: request hooks (after the head), body hooks (after the whole
    body, which the route then buffers up to `body_limit`), and request headers never forwarded.
    The fields are ChainCore's (_core/chain.pyx), typed: the data plane reads them in C."""

    __slots__ = ()

    def __init__(self, policies: list, labels: list[str] | None = None):
        self.policies = tuple(policies)
        labels = labels or [type(p).__name__ for p in policies]
        # a policy may offer a compiled form of its request hook (`compiled_request`, _core/hooks.pyx)
        self.request = tuple(getattr(p, "compiled_request", None) or p.request for p in policies
                             if getattr(p, "request", None) is not None)
        self.request_names = tuple(label for p, label in zip(policies, labels, strict=True)
                                   if getattr(p, "request", None) is not None)
        self.response = tuple(p.response for p in policies if getattr(p, "response", None) is not None)
        self.done = tuple(p.done for p in policies if getattr(p, "done", None) is not None)
        # the response travels back through the phases: a transform ("response") runs before the
        # cache ("cache") stores what the client gets
        self.response_end = tuple(p.response_end for p in reversed(policies)
                                  if getattr(p, "response_end", None) is not None)
        self.body = tuple(p.request_body for p in policies if getattr(p, "request_body", None) is not None)
        drops = set()
        for p in policies:
            drops.update(getattr(p, "drop_request_headers", ()))
        self.drops = frozenset(drops)
        limits = [p.body_limit for p in policies if getattr(p, "request_body", None) is not None]
        self.body_limit = min(limits) if limits else 0
        self.active = bool(self.request or self.body)  # anything to run when a request's head is in

    def __bool__(self) -> bool:
        return self.active


NO_POLICIES = Chain([])


class ConsumerPolicies:
    """Policies attached to consumers and plans: they run right after authentication (at the
    start of the authorization phase, whatever their own phase: an access policy such as
    request-termination too), in phase order among themselves — the consumer's own, then its
    plan's. Built once per (route, consumer) on first use, never per request."""

    phase = "authorization"

    def __init__(self, ctx: BuildContext):
        self.ctx = BuildContext(ctx.counters, ctx.route, ctx.api, ctx.config, ctx.consumers)
        cfg = ctx.config
        self.consumer_cfg = {c.username: c for c in cfg.consumers if c.policies}
        self.plan_cfg = {p.name: p for p in cfg.plans if p.policies}
        self.chains: dict[str, tuple] = {}

    @staticmethod
    def needed(cfg) -> bool:
        return any(c.policies for c in cfg.consumers) or any(p.policies for p in cfg.plans)

    def _chain(self, consumer) -> tuple:
        name = consumer.username
        hooks = self.chains.get(name)
        if hooks is None:
            attached_ = []
            c = self.consumer_cfg.get(name)
            if c is not None:
                attached_ += [(f"consumer:{name}#{i}", p) for i, p in enumerate(c.policies)]
            plan = self.plan_cfg.get(consumer.plan) if consumer.plan else None
            if plan is not None:
                attached_ += [(f"plan:{plan.name}#{i}", p) for i, p in enumerate(plan.policies)]
            chain = build_chain(attached_, self.ctx) if attached_ else NO_POLICIES
            hooks = self.chains[name] = chain.request
        return hooks

    def request(self, ex):
        if ex.consumer is None:
            return None
        hooks = self._chain(ex.consumer)
        for i, hook in enumerate(hooks):
            r = hook(ex)
            if r is None:
                continue
            if type(r) is bytes:
                return r
            return self._rest(ex, r, hooks, i + 1)
        return None

    @staticmethod
    async def _rest(ex, first, hooks, i):
        r = await first
        if r is not None:
            return r
        for hook in hooks[i:]:
            r = hook(ex)
            if r is not None and type(r) is not bytes:
                r = await r
            if r is not None:
                return r
        return None


def build_chain(policies: list[tuple[str, object]], ctx: BuildContext) -> Chain:
    """Build the policies that have a builder (header policies are compiled elsewhere), ordered
    by phase, then by attachment (global → API → route), then by declaration order."""
    built = []
    for order, (owner, cfg) in enumerate(policies):
        cls = BUILDERS.get(type(cfg))
        if cls is None:
            tag = type(cfg).__struct_config__.tag
            if tag in COMPILED_ELSEWHERE:
                continue
            # never let a configured policy (an authentication one, say) be skipped in silence
            raise ValueError(f"policy type `{tag}` has no implementation in this build")
        ctx.owner = owner
        p = cls(cfg, ctx)
        # the metrics label: the policy's type tag and where it was attached
        built.append((PHASE[p.phase], order, p, f"{type(cfg).__struct_config__.tag}@{owner}"))
    if ctx.config is not None and not ctx.owner.startswith(("consumer:", "plan:")) \
            and ConsumerPolicies.needed(ctx.config):
        built.append((PHASE["authorization"], -1, ConsumerPolicies(ctx), "consumer-policies"))
    if not built:
        return NO_POLICIES  # one shared empty chain: 10,000 routes without policies need no 10,000 copies
    built.sort(key=lambda t: (t[0], t[1]))
    return Chain([t[2] for t in built], [t[3] for t in built])
