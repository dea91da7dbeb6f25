"""The compiled hot path. There is no pure-Python fallback (see STYLE.md, "Build")."""
from importlib.util import find_spec

try:
    from . import balance, chain, headers, ratelimit, router, shm, stats  # noqa: F401
    # the data plane (and the hooks, which cimport it) import policy and server modules, so they are
    # not imported here; but they must exist, compiled
    for _m in ("proxy", "hooks"):
        if find_spec(f"{__name__}.{_m}") is None or not find_spec(f"{__name__}.{_m}").origin.endswith((".so", ".pyd")):
            raise ImportError(f"fastgate._core.{_m} is not built")
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"fastgate's compiled modules are missing ({exc}); "
        "run `pip install -e .` (needs a C compiler)"
    ) from exc

MODULES = ("router", "headers", "shm", "ratelimit", "stats", "balance", "chain", "proxy", "hooks")
