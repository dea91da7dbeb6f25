"""API lifecycle states set at run time over the config's.

The config declares each API version with a state (draft, published, deprecated, retired). The admin
API may set another one at run time (`PUT /apis/{api}/versions/{version}/state`), kept in the store's
`api_states` table; the workers get the rows with the store's other entities (control/directory.py)
and recompile the routes whose state changed (server/generation.py). This module says what the
effective versions are: the config's, with every applicable row laid over them.

A row for an API or version the running config does not have is ignored (a config change may leave
one behind: the admin API lists it as `orphan`). So is a successor the API does not have, and a
draft state for the version the API names as `default_version` (which must be routed).
"""
from __future__ import annotations

import msgspec

from .schema import Api, ApiVersion, Config

Override = tuple  # (state, sunset, successor)


def overrides_from_rows(rows) -> dict[tuple[str, str], Override]:
    """{(api, version): (state, sunset, successor)} from api_states rows (tuples or dicts)."""
    out = {}
    for row in rows:
        if isinstance(row, dict):
            row = (row["api"], row["version"], row["state"], row["sunset"], row["successor"])
        api, version, state, sunset, successor = row
        out[(api, version)] = (state, sunset, successor)
    return out


def refusal(api: Api, version: str, state: str, successor: str | None) -> str | None:
    """Why a row cannot apply to `api` (None: it can)."""
    names = [v.version for v in api.versions]
    if version not in names:
        return f"API `{api.name}` has no version `{version}` (versions: {', '.join(names)})"
    if successor is not None and successor not in names:
        return f"unknown successor `{successor}` (versions: {', '.join(names)})"
    if successor == version:
        return "a version cannot succeed itself"
    if state == "draft" and api.version_by != "path" and api.default_version == version:
        return f"`{version}` is the API's default_version, which must be routed: name another one in the config first"
    return None


def effective_version(api: Api, ver: ApiVersion, overrides: dict) -> ApiVersion:
    o = overrides.get((api.name, ver.version))
    if o is None or refusal(api, ver.version, o[0], o[2]) is not None:
        return ver
    state, sunset, successor = o
    return msgspec.structs.replace(ver, state=state, sunset=sunset if sunset is not None else ver.sunset,
                                   successor=successor if successor is not None else ver.successor)


def effective_api(api: Api, overrides: dict) -> Api:
    versions = [effective_version(api, v, overrides) for v in api.versions]
    if all(a is b for a, b in zip(versions, api.versions, strict=True)):
        return api
    return msgspec.structs.replace(api, versions=versions)


def with_lifecycle(cfg: Config, overrides: dict) -> Config:
    """`cfg` with the effective API versions (the same object when no row applies)."""
    if not overrides:
        return cfg
    apis = [effective_api(a, overrides) for a in cfg.apis]
    if all(a is b for a, b in zip(apis, cfg.apis, strict=True)):
        return cfg
    return msgspec.structs.replace(cfg, apis=apis)
