"""Config: msgspec schema (schema.py) and a loader that reports every error (load.py)."""
from .load import load_config, load_file, parse_document
from .schema import Config

__all__ = ["Config", "load_config", "load_file", "parse_document"]
