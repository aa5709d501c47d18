"""Tests for progressista.py, grouped by the module's sections.

Servers bind 127.0.0.1 on a free port and are stopped by the test that made
them; the ``no_leaks`` fixture fails a test that leaves threads behind.
"""
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import progressista

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "progressista.py")


# -- fixtures and helpers ----------------------------------------------------

class FakeClock:
    """An injectable clock: tests move time instead of sleeping."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves threads (servers, dashboards) or open bars behind.

    The client's sender thread is process-wide by design and is not a leak.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
                  and t.name != "progressista-sender"]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, "threads left running: %s" % [t.name for t in leaked]
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is not None:
        open_bars = [b for b in getattr(tqdm_std.tqdm, "_instances", ()) if not b.disable]
        assert not open_bars, "bars left open: %r" % open_bars


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server_factory():
    """Start servers on free ports; every one is stopped after the test."""
    servers = []

    def start(**options):
        srv = progressista.make_server("127.0.0.1", 0, **options).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def server(server_factory):
    return server_factory()


def request(url, method="GET", data=None, headers=None, raw=None, timeout=5):
    """One HTTP request; returns (status, parsed JSON or text, headers)."""
    body = raw if raw is not None else (None if data is None else json.dumps(data).encode())
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if body is not None and "Content-Type" not in req.headers:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text, hdrs = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        status, text, hdrs = exc.code, exc.read(), exc.headers
    ctype = hdrs.get("Content-Type", "")
    if "json" in ctype:
        return status, json.loads(text), hdrs
    return status, text.decode("utf-8", "replace"), hdrs


def post(srv, data, **kw):
    return request(srv.url + "/progress", "POST", data, **kw)


def tasks(srv, **kw):
    status, body, _ = request(srv.url + "/tasks", **kw)
    assert status == 200, body
    return body["tasks"]


def wait_for(predicate, timeout=5.0, interval=0.02):
    """Poll until ``predicate()`` is truthy; returns its value or fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1fs" % timeout)
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server(*args, env=None, cwd=None, python_flags=()):
    """``python3 progressista.py serve --port 0 ...`` as a subprocess; returns (proc, url)."""
    import re
    proc = subprocess.Popen(
        [sys.executable, *python_flags, SCRIPT if cwd is None else "progressista.py",
         "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    line = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, "http://127.0.0.1:%s" % match.group(1).decode()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("server did not start: %r" % line)


# -- wire helpers ------------------------------------------------------------

def test_finite_makes_anything_json_safe():
    assert progressista._finite(float("inf")) is None
    assert progressista._finite(float("nan")) is None
    assert progressista._finite(None) is None
    assert progressista._finite(3) == 3
    assert progressista._finite("x") is None


def test_summarize_is_one_line():
    assert progressista._summarize(ValueError("bad row 17\nmore")) == "ValueError: bad row 17"
    assert progressista._summarize(KeyError()) == "KeyError"


# -- client ------------------------------------------------------------------

# (client tests go here)


# -- patch -------------------------------------------------------------------

# (patch and run tests go here)


# -- store -------------------------------------------------------------------

# (store tests go here)


# -- websocket ---------------------------------------------------------------

# (websocket tests go here)


# -- http --------------------------------------------------------------------

# (http tests go here)


# -- dashboard ---------------------------------------------------------------

# (dashboard and browser tests go here)


# -- cli ---------------------------------------------------------------------

# (cli tests go here)
