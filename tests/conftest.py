"""Shared fixtures: a `loop` parametrized over uvloop and stock asyncio, failing the test on any
exception the loop's handler sees (uvloop's and asyncpg's test bases), and a runner for
`async def` tests."""
from __future__ import annotations

import asyncio
import inspect
import os
import shutil

import pytest
import uvloop
from hypothesis import settings

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Under CI, property tests draw a fixed sequence of examples so a run is reproducible; locally
# they explore freshly each time (and a failure there prints its reproduce blob).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if IN_CI:
    settings.load_profile("ci")


def need_binary(name: str, package: str) -> str:
    """The path of a system tool, or skip (fail under CI=true) saying what to install."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is missing: install it with `apt-get install {package}`"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    errors = []
    lp.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    asyncio.set_event_loop(lp)
    yield lp
    try:
        pending = [t for t in asyncio.all_tasks(lp) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            lp.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        lp.run_until_complete(lp.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        lp.close()
    assert not errors, f"the loop's exception handler was called: {errors}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    lp = pyfuncitem.funcargs.get("loop")
    own = lp is None
    if own:
        lp = uvloop.new_event_loop()
    kwargs = {n: pyfuncitem.funcargs[n] for n in pyfuncitem._fixtureinfo.argnames}
    try:
        lp.run_until_complete(asyncio.wait_for(pyfuncitem.obj(**kwargs), 90))
    finally:
        if own:
            lp.close()
    return True
