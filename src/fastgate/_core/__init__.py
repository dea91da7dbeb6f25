"""The compiled hot path. There is no pure-Python fallback (see STYLE.md, "Build")."""
from importlib.util import find_spec

try:
    from . import headers, ratelimit, router, shm, stats  # noqa: F401
    # the data plane imports policy and server modules, so it is not imported here; but it must exist
    if find_spec(f"{__name__}.proxy") is None or not find_spec(f"{__name__}.proxy").origin.endswith((".so", ".pyd")):
        raise ImportError("fastgate._core.proxy is not built")
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"fastgate's compiled modules are missing ({exc}); "
        "run `pip install -e .` (needs a C compiler)"
    ) from exc

MODULES = ("router", "headers", "shm", "ratelimit", "stats", "proxy")
