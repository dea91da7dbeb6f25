"""The compiled hot path. There is no pure-Python fallback (see STYLE.md, "Build")."""
try:
    from . import headers, ratelimit, router, shm  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"fastgate's compiled modules are missing ({exc}); "
        "run `pip install -e .` (needs a C compiler)"
    ) from exc

MODULES = ("router", "headers", "shm", "ratelimit")
