"""TLS termination, WebSocket tunnelling and the CLI end to end (curl, SIGTERM drain)."""
from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import time

import aiohttp
import httpx
from aiohttp import web

from tests.conftest import need_binary
from tests.harness import Upstream, config, free_port, gateway, reply


def make_cert(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    c, k = tmp_path / "cert.pem", tmp_path / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(c), str(k)


async def test_tls_termination(loop, tmp_path):
    cert, key = make_cert(tmp_path)
    async with Upstream(lambda r: reply(200, r.header("x-forwarded-proto").encode())) as up:
        doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                     upstreams=[{"name": "u", "targets": [{"address": up.address}]}])
        doc["listeners"] = [{"kind": "proxy", "address": "127.0.0.1", "port": 1,
                             "tls": {"certificate": cert, "key": key}}]
        async with gateway(doc) as gw, httpx.AsyncClient(verify=cert) as c:
            r = await c.get(f"https://localhost:{gw.port}/")
            assert r.status_code == 200 and r.text == "https"


async def test_websocket_is_tunnelled(loop):
    async def ws_handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                     upstreams=[{"name": "u", "targets": [{"address": f"127.0.0.1:{port}"}]}])
        async with gateway(doc) as gw, aiohttp.ClientSession() as s:
            async with s.ws_connect(f"http://127.0.0.1:{gw.port}/ws") as ws:
                for i in range(3):
                    await ws.send_str(f"m{i}")
                    msg = await asyncio.wait_for(ws.receive(), 5)
                    assert msg.data == f"echo:m{i}"
    finally:
        await runner.cleanup()


def _start(cfg_path, port, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastgate", "run", "-c", cfg_path, "--listen", f"127.0.0.1:{port}",
                             "--pid-file", str(tmp_path / "fg.pid")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/hello", timeout=0.5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("gateway did not start: " + proc.stdout.read().decode()[-2000:])


def test_cli_run_serves_default_config_to_curl(tmp_path):
    curl = need_binary("curl", "curl")
    port, up_port = free_port(), 9001
    upstream = subprocess.Popen([sys.executable, "-m", "fastgate", "demo-upstream", "--port", str(up_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = _start("config/fastgate.yaml", port, tmp_path)
    try:
        out = subprocess.run([curl, "-s", "-i", f"http://127.0.0.1:{port}/hello"], capture_output=True, text=True)
        assert "200" in out.stdout.splitlines()[0] and "hello from fastgate" in out.stdout
        for _ in range(50):
            out = subprocess.run([curl, "-s", f"http://127.0.0.1:{port}/echo/x?y=1"], capture_output=True, text=True)
            if '"path":"/x"' in out.stdout:
                break
            time.sleep(0.1)
        assert '"path":"/x"' in out.stdout and '"query":"y=1"' in out.stdout
        out = subprocess.run([curl, "-s", "-i", f"http://127.0.0.1:{port}/users/7"], capture_output=True, text=True)
        assert '"path":"/v1/users/7"' in out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        upstream.kill()
        upstream.wait()


def test_sigterm_drains_in_flight_requests(tmp_path):
    up_port = free_port()
    slow = subprocess.Popen([sys.executable, "-c", f"""
import asyncio
from aiohttp import web
async def h(r):
    await asyncio.sleep(1.0)
    return web.Response(text='finished')
app = web.Application(); app.router.add_get('/slow', h)
web.run_app(app, host='127.0.0.1', port={up_port}, print=None)
"""])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
routes:
  - {{name: hello, paths: [/hello], mock: {{body: hi}}}}
  - {{name: slow, paths: [/slow], upstream: u}}
upstreams:
  - {{name: u, targets: [{{address: "127.0.0.1:{up_port}"}}]}}
""")
    port = free_port()
    proc = _start(str(cfg), port, tmp_path)
    try:
        for _ in range(50):
            try:
                httpx.get(f"http://127.0.0.1:{up_port}/", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)

        async def scenario():
            async with httpx.AsyncClient(timeout=10) as c:
                inflight = asyncio.ensure_future(c.get(f"http://127.0.0.1:{port}/slow"))
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                r = await inflight
                return r.status_code, r.text

        status, text = asyncio.run(scenario())
        assert (status, text) == (200, "finished")
        assert proc.wait(20) == 0
        try:
            httpx.get(f"http://127.0.0.1:{port}/hello", timeout=1)
            raise AssertionError("still accepting after drain")
        except httpx.ConnectError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        slow.kill()
        slow.wait()
