"""fastgate: an API gateway whose request hot path is compiled."""
from ._version import __version__

__all__ = ["__version__"]
