#!/usr/bin/env python3
"""The benchmark of Progressista: the numbers of SPEC §6, measured in one run.

    python3 bench_progressista.py                 # full run (a few minutes)
    python3 bench_progressista.py --quick         # short run (about a minute)
    python3 bench_progressista.py --json out.json # also write every figure as JSON

Machines here are shared and noisy (2 cores), so every figure is a ratio or a
median of several runs that alternate A/B/A/B within this one process run:
the client against plain ``tqdm``, the server against a bare stdlib
``ThreadingHTTPServer`` that only reads the body and answers ``{"ok": true}``,
under the same load.  Servers and load generators are subprocesses (CPU is read
from ``/proc/PID/stat``), only ever talk to 127.0.0.1, are bounded in count and
time, and are terminated by PID at the end.

For profiling, ``--load URL --seconds S`` only generates the single-update
ingest load (4 sender processes, 2 dashboards; ``--mode batch`` for arrays of
50) against a running server, e.g. ``py-spy record --pid <server pid>`` meanwhile.

Uses the standard library plus the test extra (websockets; playwright for the
dashboard row, which prints n/a when Chromium or the page hook is missing).
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRESSISTA = os.path.join(HERE, "progressista.py")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# websockets >= 17.1 asks for ``with connect(...)``; our clients outlive a block.
warnings.filterwarnings("ignore", message=r"connect\(\) must be used as a context manager")
SENDERS = 4          # sender processes of the ingest load
DASHBOARDS = 2       # WebSocket dashboards connected during the ingest load
BATCH = 50           # updates per POST in the batched load (as the client's sender)

# Full and quick settings.  Every count and duration is bounded here.
SETTINGS = {
    "full": dict(iter_n=3_000_000, update_n=1_000_000, client_pairs=11, close_runs=20,
                 rounds=3, load_seconds=4.0, lat_samples=200, scale_rounds=3,
                 dash_runs=10, alert_samples=5, redraw_runs=30, watch_seconds=10.0,
                 fleet_connections=1000, fleet_period=1.0, fleet_seconds=10.0,
                 storm_dashboards=20, storm_before=4.0, storm_seconds=15.0, page_loads=3,
                 page_seconds=8.0, many_runs=5, slow_runs=2),
    "quick": dict(iter_n=1_000_000, update_n=500_000, client_pairs=7, close_runs=8,
                  rounds=2, load_seconds=2.0, lat_samples=50, scale_rounds=2,
                  dash_runs=5, alert_samples=3, redraw_runs=10, watch_seconds=5.0,
                  fleet_connections=1000, fleet_period=1.0, fleet_seconds=5.0,
                  storm_dashboards=20, storm_before=3.0, storm_seconds=12.0, page_loads=2,
                  page_seconds=4.0, many_runs=3, slow_runs=1),
}

_children = []  # every subprocess we start, terminated by PID in cleanup()


# -- small helpers -----------------------------------------------------------

def median(values):
    return statistics.median(values) if values else float("nan")


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
    return values[k]


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESSISTA_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(argv, stdin=None):
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=clean_env(), cwd=HERE)
    _children.append(proc)
    return proc


def stop(proc, timeout=5.0):
    """Terminate one child by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    if proc in _children:
        _children.remove(proc)


def cleanup():
    for proc in list(_children):
        try:
            stop(proc)
        except Exception:
            pass


def read_line(proc, timeout):
    """One line of a child's stdout, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 1)
        if not chunk:
            return buf.decode() or None
        buf += chunk
    return buf.decode()


def drain(proc):
    """Keep reading a child's output so that it can never block on a full pipe."""
    def loop(stream):
        try:
            while stream.read(65536):
                pass
        except (OSError, ValueError):
            pass
    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=loop, args=(stream,), daemon=True).start()


class Server:
    """A server subprocess: ours (``progressista.py serve``) or the bare one."""

    def __init__(self, kind, extra=(), script=None):
        self.kind = kind
        if kind == "bare":
            argv = [sys.executable, os.path.abspath(__file__), "--_role", "bare"]
        else:
            argv = [sys.executable, script or PROGRESSISTA, "serve", "--host", "127.0.0.1",
                    "--port", "0"] + list(extra)
        self.proc = spawn(argv)
        line = read_line(self.proc, 20.0) or ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            err = ""
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
            stop(self.proc)
            raise RuntimeError("%s server did not start: %r %s" % (kind, line, err))
        self.port = int(match.group(1))
        self.url = "http://127.0.0.1:%d" % self.port
        self.pid = self.proc.pid
        drain(self.proc)

    def stop(self):
        stop(self.proc)


def post_json(port, path, obj, conn=None):
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps(obj, separators=(",", ":")).encode()
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if own:
        conn.close()
    if resp.status != 200:
        raise RuntimeError("POST %s: HTTP %d %s" % (path, resp.status, data[:200]))
    return data


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def make_update(i, n, prefix="bench"):
    """One update shaped like the client's (see RemoteTqdm._pst_payload)."""
    return {"task_id": "%s-%d" % (prefix, i), "n": n, "total": 1_000_000,
            "desc": "bench task %d" % i, "unit": "it", "status": "update",
            "rate": 1234.5 + (n % 7), "elapsed": 12.5 + n * 1e-3,
            "host": "bench-host", "pid": 4242}


def load_tasks(port, start, count, prefix="bench"):
    """Create/refresh tasks ``start .. start+count`` with batched POSTs."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for lo in range(start, start + count, BATCH):
            hi = min(start + count, lo + BATCH)
            post_json(port, "/progress", [make_update(i, 1, prefix) for i in range(lo, hi)],
                      conn)
    finally:
        conn.close()


# -- roles run in subprocesses -------------------------------------------------

class BareHandler(BaseHTTPRequestHandler):
    """The fair limit: HTTP/1.1 keep-alive, TCP_NODELAY, one write per response."""

    protocol_version = "HTTP/1.1"
    RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 12\r\n\r\n{\"ok\": true}")

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.wfile.write(self.RESPONSE)

    def log_message(self, *args):
        pass


def role_bare():
    class Bare(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128
    server = Bare(("127.0.0.1", 0), BareHandler)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    print("bare server at http://127.0.0.1:%d/" % server.server_address[1], flush=True)
    server.serve_forever()


def role_sender(args):
    """One load process: keep-alive POSTs over its own HTTPConnection.

    Prints "ready", reads "start_at duration" on stdin, posts from start_at to
    start_at + duration, then prints its counts and latencies as JSON.
    """
    port, mode, lo, count, seed = args.port, args.mode, args.lo, args.count, args.seed
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    ids = [lo + (seed * 7919 + k) % count for k in range(count)]  # each sender its own order
    pos = 0
    n = 1000 + seed

    def body():
        nonlocal pos, n
        if mode == "single":
            i = ids[pos]
            pos += 1
            if pos == count:
                pos = 0
                n += 1
            return dumps(make_update(i, n)).encode(), 1
        batch = []
        for _ in range(BATCH):
            batch.append(make_update(ids[pos], n))
            pos += 1
            if pos == count:
                pos = 0
                n += 1
        return dumps(batch).encode(), BATCH

    def one():
        data, k = body()
        t0 = time.perf_counter()
        conn.request("POST", "/progress", data, headers)
        resp = conn.getresponse()
        resp.read()
        return time.perf_counter() - t0, resp.status, k

    one()  # connect and warm up
    print("ready", flush=True)
    start_at, duration = map(float, sys.stdin.readline().split())
    end = start_at + duration
    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    requests = updates = errors = 0
    lat = []
    while time.time() < end:
        dt, status, k = one()
        if status == 200:
            requests += 1
            updates += k
            lat.append(round(dt * 1e6))
        else:
            errors += 1
    conn.close()
    print(json.dumps({"requests": requests, "updates": updates, "errors": errors,
                      "lat_us": lat}), flush=True)


# -- dashboards ------------------------------------------------------------------

class Dashboard:
    """A WebSocket client that reads continuously and counts what arrives."""

    def __init__(self, url):
        from websockets.sync.client import connect
        self.ws = connect(url.replace("http://", "ws://") + "/ws", max_size=None,
                          open_timeout=30, close_timeout=2)
        self.first = self.ws.recv(timeout=60)  # the snapshot
        self.bytes = self.messages = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        try:
            for msg in self.ws:
                size = len(msg) if isinstance(msg, bytes) else len(msg.encode("utf-8"))
                with self.lock:
                    self.bytes += size
                    self.messages += 1
        except Exception:
            pass

    def counters(self):
        with self.lock:
            return self.bytes, self.messages

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass
        self.thread.join(5)


def snapshot_seconds(url):
    """Time for a new /ws client to connect and receive its first message."""
    from websockets.sync.client import connect
    t0 = time.perf_counter()
    ws = connect(url.replace("http://", "ws://") + "/ws", max_size=None, open_timeout=60)
    try:
        msg = ws.recv(timeout=120)
        dt = time.perf_counter() - t0
    finally:
        ws.close()
    if '"snapshot"' not in msg[:200]:
        raise RuntimeError("first /ws message is not a snapshot")
    return dt


# -- load ----------------------------------------------------------------------

def run_load(server, mode, lo, count, seconds, dashboards=()):
    """One timed load run; returns updates/s, requests/s, latencies, CPU/update."""
    procs = []
    try:
        for s in range(SENDERS):
            procs.append(spawn([sys.executable, os.path.abspath(__file__), "--_role", "sender",
                                "--port", str(server.port), "--mode", mode, "--lo", str(lo),
                                "--count", str(count), "--seed", str(s)],
                               stdin=subprocess.PIPE))
        for p in procs:
            if (read_line(p, 30.0) or "").strip() != "ready":
                raise RuntimeError("a sender did not get ready: %s"
                                   % p.stderr.read().decode(errors="replace")[-1000:]
                                   if p.poll() is not None else "timeout")
        start_at = time.time() + 0.3
        for p in procs:
            p.stdin.write(("%.6f %.3f\n" % (start_at, seconds)).encode())
            p.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = cpu_seconds(server.pid)
        dash0 = [d.counters() for d in dashboards]
        t0 = time.perf_counter()
        time.sleep(max(0.0, start_at + seconds - time.time()))
        cpu1 = cpu_seconds(server.pid)
        dash1 = [d.counters() for d in dashboards]
        wall = time.perf_counter() - t0
        results = []
        for p in procs:
            line = read_line(p, 30.0)
            if not line:
                raise RuntimeError("a sender gave no result")
            results.append(json.loads(line))
    finally:
        for p in procs:
            stop(p)
    updates = sum(r["updates"] for r in results)
    requests = sum(r["requests"] for r in results)
    errors = sum(r["errors"] for r in results)
    lat = [x for r in results for x in r["lat_us"]]
    out = {"mode": mode, "tasks": count, "seconds": wall, "updates": updates,
           "requests": requests, "errors": errors,
           "updates_per_s": updates / wall, "requests_per_s": requests / wall,
           "p50_ms": percentile(lat, 50) / 1000.0, "p99_ms": percentile(lat, 99) / 1000.0,
           "cpu_s": cpu1 - cpu0,
           "cpu_us_per_update": (cpu1 - cpu0) / max(1, updates) * 1e6,
           "cpu_us_per_request": (cpu1 - cpu0) / max(1, requests) * 1e6}
    if dashboards:
        per = [(b1 - b0, m1 - m0) for (b0, m0), (b1, m1) in zip(dash0, dash1)]
        out["ws_bytes_per_update"] = median([b / max(1, updates) for b, _ in per])
        out["ws_messages_per_update"] = median([m / max(1, updates) for _, m in per])
        out["ws_messages_per_s"] = median([m / wall for _, m in per])
    return out


def load_only(url, seconds, mode="single"):
    """``--load``: the ingest load (single updates or batches) against a running server."""
    port = int(re.search(r":(\d+)", url.split("//", 1)[-1]).group(1))

    class Target:
        pass
    target = Target()
    target.port, target.url = port, "http://127.0.0.1:%d" % port
    target.pid = None
    load_tasks(port, 0, 1000)
    dashboards = []
    try:
        dashboards = [Dashboard(target.url) for _ in range(DASHBOARDS)]
    except Exception as exc:  # e.g. the bare server: no /ws
        print("no dashboards: %s" % exc, flush=True)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            chunk = min(10.0, deadline - time.monotonic())
            procs = []
            try:
                for s in range(SENDERS):
                    procs.append(spawn([sys.executable, os.path.abspath(__file__), "--_role",
                                        "sender", "--port", str(port), "--mode", mode,
                                        "--lo", "0", "--count", "1000", "--seed", str(s)],
                                       stdin=subprocess.PIPE))
                for p in procs:
                    read_line(p, 30.0)
                for p in procs:
                    p.stdin.write(("%.6f %.3f\n" % (time.time() + 0.2, chunk)).encode())
                    p.stdin.flush()
                res = [json.loads(read_line(p, chunk + 30.0) or "{}") for p in procs]
                print("%.0f updates/s" % (sum(r.get("updates", 0) for r in res) / chunk),
                      flush=True)
            finally:
                for p in procs:
                    stop(p)
    finally:
        for d in dashboards:
            d.close()


# -- ingest over TLS -------------------------------------------------------------
#
# The same single-update load over HTTPS and over plain HTTP, alternating, and
# what a new connection costs (connect + handshake + one POST).  Clients keep
# their connection alive, so the handshake is paid once per worker process.

def tls_sender(port, cafile, count, seed):
    """One TLS or plain load process (``cafile`` None: plain HTTP), as role_sender."""
    import ssl
    if cafile:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           context=ssl.create_default_context(cafile=cafile))
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    n, k = 1000 + seed, 0

    def one():
        nonlocal n, k
        data = dumps(make_update((seed * 7919 + k) % count, n)).encode()
        k += 1
        if k % count == 0:
            n += 1
        conn.request("POST", "/progress", data, headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status

    one()  # connect, handshake and warm up
    print("ready", flush=True)
    start_at, duration = map(float, sys.stdin.readline().split())
    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    updates = errors = 0
    while time.time() < start_at + duration:
        if one() == 200:
            updates += 1
        else:
            errors += 1
    conn.close()
    print(json.dumps({"updates": updates, "errors": errors}), flush=True)


class _TLSBenchServer:
    """``progressista.py serve`` with or without --certfile, as a subprocess."""

    def __init__(self, extra=()):
        self.proc = spawn([sys.executable, PROGRESSISTA, "serve", "--host", "127.0.0.1",
                           "--port", "0"] + list(extra))
        line = read_line(self.proc, 20.0) or ""
        match = re.search(r"(https?)://127\.0\.0\.1:(\d+)", line)
        if not match:
            stop(self.proc)
            raise RuntimeError("server did not start: %r" % line)
        self.port, self.pid = int(match.group(2)), self.proc.pid
        self.url = "%s://127.0.0.1:%d" % (match.group(1), self.port)
        drain(self.proc)

    def stop(self):
        stop(self.proc)


def _tls_load(server, cafile, seconds):
    code = ("import sys; sys.path.insert(0, %r); import bench_progressista as b; "
            "b.tls_sender(%d, %r, 1000, int(sys.argv[1]))" % (HERE, server.port, cafile))
    procs = [spawn([sys.executable, "-c", code, str(s)], stdin=subprocess.PIPE)
             for s in range(SENDERS)]
    try:
        for p in procs:
            if (read_line(p, 30.0) or "").strip() != "ready":
                raise RuntimeError("a TLS bench sender did not get ready")
        start_at = time.time() + 0.3
        for p in procs:
            p.stdin.write(("%.6f %.3f\n" % (start_at, seconds)).encode())
            p.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = cpu_seconds(server.pid)
        t0 = time.perf_counter()
        time.sleep(max(0.0, start_at + seconds - time.time()))
        cpu1 = cpu_seconds(server.pid)
        wall = time.perf_counter() - t0
        results = [json.loads(read_line(p, 30.0) or "{}") for p in procs]
    finally:
        for p in procs:
            stop(p)
    updates = sum(r.get("updates", 0) for r in results)
    return {"updates_per_s": updates / wall, "errors": sum(r.get("errors", 0) for r in results),
            "cpu_us_per_update": (cpu1 - cpu0) / max(1, updates) * 1e6}


def _new_connection_ms(server, cafile, count):
    """Median ms for connect (+ TLS handshake) + one POST + close, one at a time."""
    import ssl
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    body = json.dumps(make_update(0, 1)).encode()
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        if context is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10,
                                               context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/progress", body, {"Content-Type": "application/json"})
        conn.getresponse().read()
        conn.close()
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)


def bench_tls(report, cfg, raw):
    """Ingest over HTTPS beside plain HTTP, same load, same run, alternating."""
    import shutil
    if shutil.which("openssl") is None:
        report.add("ingest over TLS", "openssl not found", "", None)
        return
    folder = tempfile.mkdtemp(prefix="progressista-tls-")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    servers = {}
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "2", "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=120)
        servers["http"] = _TLSBenchServer()
        servers["https"] = _TLSBenchServer(["--certfile", cert, "--keyfile", key])
        cafiles = {"http": None, "https": cert}
        for name, server in servers.items():
            for lo in range(0, 1000, BATCH):
                _tls_post(server, cafiles[name], [make_update(i, 1) for i in range(lo, lo + BATCH)])
        runs = {"http": [], "https": []}
        for r in range(cfg["rounds"]):
            for name in (("http", "https") if r % 2 == 0 else ("https", "http")):
                res = _tls_load(servers[name], cafiles[name], cfg["load_seconds"])
                runs[name].append(res)
                print("    round %d %-5s %8.0f updates/s  %.1f us CPU/update%s" % (
                    r + 1, name, res["updates_per_s"], res["cpu_us_per_update"],
                    "  errors %d" % res["errors"] if res["errors"] else ""), flush=True)
        fresh = {name: _new_connection_ms(servers[name], cafiles[name], 3 * cfg["close_runs"])
                 for name in servers}
        raw["tls"] = {"runs": runs, "new_connection_ms": fresh}
        ratio = [t["updates_per_s"] / h["updates_per_s"] for t, h in zip(runs["https"],
                                                                         runs["http"])]
        cpu = [t["cpu_us_per_update"] / h["cpu_us_per_update"] for t, h in zip(runs["https"],
                                                                                runs["http"])]
        report.add("ingest over TLS: single-update POSTs, 1k tasks, keep-alive",
                   "%.0f/s vs plain HTTP %.0f/s = %.2fx" % (
                       median([t["updates_per_s"] for t in runs["https"]]),
                       median([h["updates_per_s"] for h in runs["http"]]), median(ratio)),
                   "", None, median(ratio))
        report.add("ingest over TLS: server CPU per update TLS/plain",
                   "%.2fx (%.1f vs %.1f us)" % (
                       median(cpu), median([t["cpu_us_per_update"] for t in runs["https"]]),
                       median([h["cpu_us_per_update"] for h in runs["http"]])),
                   "", None, median(cpu))
        report.add("a new connection + one POST (TLS handshake once per worker)",
                   "%.2f ms with TLS vs %.2f ms plain" % (fresh["https"], fresh["http"]),
                   "", None, fresh["https"])
    finally:
        for server in servers.values():
            server.stop()
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def _tls_post(server, cafile, obj):
    import ssl
    if cafile:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30,
                                           context=ssl.create_default_context(cafile=cafile))
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/progress", json.dumps(obj).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError("POST: HTTP %d" % resp.status)
    finally:
        conn.close()


# -- the figures ---------------------------------------------------------------

class Report:
    def __init__(self):
        self.rows = []
        self.raw = {}

    def add(self, what, measured, target, met, value=None):
        if met is None:
            flag = "n/a"
        else:
            flag = "yes" if met else "no"
        self.rows.append({"what": what, "measured": measured, "target": target, "met": flag,
                          "value": value})
        print("  %-58s %-34s %-12s %s" % (what, measured, target, flag), flush=True)


def bench_client(report, cfg, server):
    from tqdm import tqdm
    sys.path.insert(0, HERE)
    from progressista import RemoteTqdm
    devnull = open(os.devnull, "w")
    url = server.url + "/progress"
    raw = report.raw.setdefault("client", {})

    def timed(make, n, per_item):
        """(wall, process CPU) seconds of one run; CPU counts the sender thread too."""
        if per_item:
            bar = make(total=n, file=devnull)
            update = bar.update
            w, c = time.perf_counter(), time.process_time()
            for _ in range(n):
                update(1)
            w, c = time.perf_counter() - w, time.process_time() - c
            bar.close()
            return w, c
        w, c = time.perf_counter(), time.process_time()
        for _ in make(range(n), file=devnull):
            pass
        return time.perf_counter() - w, time.process_time() - c

    def remote(*args, **kwargs):
        return RemoteTqdm(*args, server_url=url, **kwargs)

    for name, per_item, n, target in (
            ("for _ in RemoteTqdm(range(N))", False, cfg["iter_n"], 1.05),
            ("bar.update(1) N times", True, cfg["update_n"], 1.10)):
        timed(tqdm, n // 10, per_item)
        timed(remote, n // 10, per_item)  # warm both paths up
        ratios, cpu_ratios, times_a, times_b = [], [], [], []
        for k in range(cfg["client_pairs"]):
            if k % 2 == 0:
                a = timed(tqdm, n, per_item)
                b = timed(remote, n, per_item)
            else:
                b = timed(remote, n, per_item)
                a = timed(tqdm, n, per_item)
            times_a.append(a[0])
            times_b.append(b[0])
            ratios.append(b[0] / a[0])
            cpu_ratios.append(b[1] / a[1] if a[1] > 0 else float("nan"))
        r = median(ratios)
        raw[name] = {"n": n, "plain_s": times_a, "remote_s": times_b, "ratios": ratios,
                     "cpu_ratios": cpu_ratios}
        report.add("client: %s vs tqdm (N=%s, %d pairs)" % (name, "{:,}".format(n), len(ratios)),
                   "%.3fx (CPU %.3fx; best %.0f vs %.0f ns/it)" % (
                       r, median(cpu_ratios), min(times_b) / n * 1e9, min(times_a) / n * 1e9),
                   "<= %.2fx" % target, r <= target, r)

    # close(): bounded final flush, and the final state must be on the server.
    closes, delivered = [], 0
    total = 5000
    for k in range(cfg["close_runs"]):
        task_id = "bench-close-%d-%d" % (os.getpid(), k)
        bar = RemoteTqdm(total=total, file=devnull, server_url=url, task_id=task_id)
        for _ in range(total):
            bar.update(1)
        if k % 2:
            time.sleep(0.3)  # half of them after the bar was first sent
        t = time.perf_counter()
        bar.close()
        closes.append(time.perf_counter() - t)
        status, body = get(server.port, "/tasks/" + task_id)
        if status == 200:
            task = json.loads(body)
            if task.get("status") == "close" and task.get("n") == total:
                delivered += 1
    raw["close_s"] = closes
    m, worst = median(closes) * 1000, max(closes) * 1000
    report.add("client: close() with a live server (median)", "%.1f ms" % m, "<= 50 ms",
               m <= 50, m)
    report.add("client: close() worst of %d" % len(closes), "%.1f ms" % worst, "<= 50 ms",
               worst <= 50, worst)
    report.add("client: final state delivered (status close, n == N)",
               "%d/%d" % (delivered, len(closes)), "all", delivered == len(closes), delivered)
    devnull.close()


# -- the client against many bars and a slow server (second release) ----------

MANY_BARS = 5_000
SLOW_DELAY = 1.0     # seconds the slow server takes to answer each request
SLOW_JOB_BARS = 20
SLOW_TIMEOUT = 2.0   # the client's default request_timeout

SLOW_JOB = r"""
import atexit, json, os, sys, time
closes, marks = [], {}
def report():  # registered first, so it runs last: after Progressista's exit flush
    marks["exit"] = time.perf_counter()
    print(json.dumps({"closes": closes, "flush": marks["exit"] - marks["work"]}), flush=True)
atexit.register(report)
sys.path.insert(0, %(here)r)
from progressista import RemoteTqdm
devnull = open(os.devnull, "w")
for i in range(%(bars)d):
    bar = RemoteTqdm(total=20, file=devnull, server_url=%(url)r,
                     task_id="%(prefix)s-%%d" %% i, request_timeout=%(timeout)r)
    for _ in range(20):
        time.sleep(0.005)  # a short bar: 0.1 s of work
        bar.update(1)
    t = time.perf_counter()
    bar.close()
    closes.append(time.perf_counter() - t)
marks["work"] = time.perf_counter()
"""


class SlowHandler(BaseHTTPRequestHandler):
    """Answers every POST after SLOW_DELAY seconds; remembers the last status of each task."""

    protocol_version = "HTTP/1.1"
    statuses = {}
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(float(os.environ.get("BENCH_SLOW_DELAY", SLOW_DELAY)))
        try:
            updates = json.loads(body)
            updates = updates if isinstance(updates, list) else [updates]
            with self.lock:
                for update in updates:
                    self.statuses[update["task_id"]] = update.get("status")
        except (ValueError, KeyError, TypeError):
            pass
        self._answer(b'{"ok": true}')

    def do_GET(self):  # /closed?prefix=P: how many tasks of P ended as close
        prefix = self.path.partition("prefix=")[2]
        with self.lock:
            count = sum(1 for k, v in self.statuses.items()
                        if k.startswith(prefix) and v == "close")
        self._answer(json.dumps({"closed": count}).encode())

    def _answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def role_slow():
    class Slow(ThreadingHTTPServer):
        daemon_threads = True
    server = Slow(("127.0.0.1", 0), SlowHandler)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    print("slow server at http://127.0.0.1:%d/" % server.server_address[1], flush=True)
    server.serve_forever()


def bench_client_many(report, cfg, server):
    """5,000 bars made, then closed, in one process: RemoteTqdm vs plain tqdm."""
    from tqdm import tqdm
    sys.path.insert(0, HERE)
    from progressista import RemoteTqdm
    devnull = open(os.devnull, "w")
    url = server.url + "/progress"
    raw = report.raw.setdefault("client_many", {})

    def remote(**kwargs):
        return RemoteTqdm(server_url=url, **kwargs)

    def timed(make):
        t0 = time.perf_counter()
        bars = [make(total=10, file=devnull) for _ in range(MANY_BARS)]
        t1 = time.perf_counter()
        for bar in bars:
            bar.update(10)
            bar.close()
        t2 = time.perf_counter()
        time.sleep(0.5)  # let the sender finish before the next run
        return t1 - t0, t2 - t1

    plain, ours = [], []
    for k in range(cfg["many_runs"]):
        for make, into in ((tqdm, plain), (remote, ours))[::1 if k % 2 == 0 else -1]:
            into.append(timed(make))
    raw.update(plain=plain, remote=ours)
    create = median([b[0] / a[0] for a, b in zip(plain, ours)])
    close = median([b[1] / a[1] for a, b in zip(plain, ours)])
    both = median([sum(b) / sum(a) for a, b in zip(plain, ours)])
    report.add("client: %s bars made then closed vs tqdm (%d runs)" % (
        "{:,}".format(MANY_BARS), len(ours)),
        "%.2fx (make %.2fx, close %.2fx; %.1f vs %.1f s)" % (
            both, create, close, median([sum(b) for b in ours]),
            median([sum(a) for a in plain])),
        "<= 1.5x", both <= 1.5, both)
    devnull.close()


def bench_client_slow(report, cfg, server):
    """A job of 20 short bars against a server answering in 1 s, and a fast one."""
    slow = spawn([sys.executable, os.path.abspath(__file__), "--_role", "slow"])
    try:
        line = read_line(slow, 20.0) or ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError("slow server did not start: %r" % line)
        slow_port = int(match.group(1))
        drain(slow)
        runs = {"fast": [], "slow": []}
        closes = {"fast": [], "slow": []}
        added = {"fast": [], "slow": []}  # seconds in close() and the exit flush, per job
        delivered = []
        for k in range(cfg["slow_runs"]):
            for kind in ("fast", "slow")[::1 if k % 2 == 0 else -1]:
                port = server.port if kind == "fast" else slow_port
                prefix = "bench-slow-%d-%d-%s" % (os.getpid(), k, kind)
                source = SLOW_JOB % dict(here=HERE, bars=SLOW_JOB_BARS, prefix=prefix,
                                         url="http://127.0.0.1:%d/progress" % port,
                                         timeout=SLOW_TIMEOUT)
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", source], capture_output=True,
                                      env=clean_env(), cwd=HERE, timeout=120)
                runs[kind].append(time.perf_counter() - t)
                if proc.returncode != 0:
                    raise RuntimeError("slow job failed: %r" % proc.stderr[-2000:])
                got = json.loads(proc.stdout.decode().splitlines()[-1])
                closes[kind].extend(got["closes"])
                added[kind].append(sum(got["closes"]) + got["flush"])
                if kind == "slow":
                    delivered.append(json.loads(get(slow_port, "/closed?prefix=" + prefix)[1])
                                     ["closed"])
    finally:
        stop(slow)
    report.raw["client_slow"] = {"wall_s": runs, "close_s": closes, "added_s": added,
                                 "delivered": delivered}
    fast, slow_wall = median(runs["fast"]), median(runs["slow"])
    report.add("client: job of %d short bars, server answering in %.0f s vs fast (wall)"
               % (SLOW_JOB_BARS, SLOW_DELAY),
               "%.2f vs %.2f s (+%.2f s)" % (slow_wall, fast, slow_wall - fast), "", None,
               slow_wall - fast)
    spent = max(added["slow"])
    report.add("client: time in close() + exit flush, that slow server (worst job)",
               "%.2f s (fast server %.2f s)" % (spent, max(added["fast"])),
               "<= %.0f s (timeout, once)" % SLOW_TIMEOUT, spent <= SLOW_TIMEOUT + 0.01, spent)
    worst = max(closes["slow"]) * 1000
    report.add("client: close() against that slow server (median / worst of %d)"
               % len(closes["slow"]),
               "%.1f / %.1f ms" % (median(closes["slow"]) * 1000, worst), "<= 50 ms",
               worst <= 50, worst)
    report.add("client: final states delivered to the slow server (by the exit flush)",
               "%d/%d" % (sum(delivered), SLOW_JOB_BARS * len(delivered)), "",
               None, sum(delivered))


def bench_ingest(report, cfg, raw):
    """Bare vs ours vs ours --db (single updates), ours batched, alternating."""
    servers = {}
    dashboards = {}
    dbdir = tempfile.mkdtemp(prefix="progressista-bench-")
    dbpath = os.path.join(dbdir, "bench.db")
    try:
        servers["bare"] = Server("bare")
        servers["ours"] = Server("ours")
        servers["db"] = Server("ours", ["--db", dbpath])
        for key in ("ours", "db"):
            load_tasks(servers[key].port, 0, 1000)
            dashboards[key] = [Dashboard(servers[key].url) for _ in range(DASHBOARDS)]
        plan = [("bare", "single"), ("ours", "single"), ("db", "single"), ("ours", "batch")]
        runs = {k: [] for k in plan}
        for r in range(cfg["rounds"]):
            order = plan if r % 2 == 0 else plan[::-1]
            for key, mode in order:
                res = run_load(servers[key], mode, 0, 1000, cfg["load_seconds"],
                               dashboards.get(key, ()))
                runs[(key, mode)].append(res)
                print("    round %d %-4s %-6s %8.0f updates/s  p50 %.2f ms  p99 %.2f ms  "
                      "%.1f us CPU/update%s" % (
                          r + 1, key, mode, res["updates_per_s"], res["p50_ms"],
                          res["p99_ms"], res["cpu_us_per_update"],
                          "  errors %d" % res["errors"] if res["errors"] else ""), flush=True)
        raw["ingest"] = {"%s/%s" % k: v for k, v in runs.items()}
        status, body = get(servers["ours"].port, "/tasks/bench-0")
        task_json_bytes = len(body) if status == 200 else float("nan")
        raw["task_json_bytes"] = task_json_bytes
        raw["ingest_servers"] = {k: s.pid for k, s in servers.items()}
        return runs, task_json_bytes, servers, dashboards, dbdir
    except BaseException:
        for ds in dashboards.values():
            for d in ds:
                d.close()
        for s in servers.values():
            s.stop()
        raise


def report_ingest(report, runs, task_json_bytes):
    bare = runs[("bare", "single")]
    for key, label in (("ours", "ingest"), ("db", "ingest --db")):
        ours = runs[(key, "single")]
        thr = [o["updates_per_s"] / b["updates_per_s"] for o, b in zip(ours, bare)]
        cpu = [o["cpu_us_per_update"] / b["cpu_us_per_update"] for o, b in zip(ours, bare)]
        report.add("%s: single-update POSTs, 1k tasks, 2 dashboards" % label,
                   "%.0f/s vs bare %.0f/s" % (median([o["updates_per_s"] for o in ours]),
                                             median([b["updates_per_s"] for b in bare])),
                   "", None)
        report.add("%s: throughput ours/bare (median of %d)" % (label, len(thr)),
                   "%.2fx" % median(thr), ">= 0.5x", median(thr) >= 0.5, median(thr))
        report.add("%s: latency p50 / p99 (bare %.2f / %.2f ms)" % (
            label, median([b["p50_ms"] for b in bare]), median([b["p99_ms"] for b in bare])),
            "%.2f / %.2f ms" % (median([o["p50_ms"] for o in ours]),
                                median([o["p99_ms"] for o in ours])), "", None)
        report.add("%s: server CPU per update ours/bare" % label,
                   "%.2fx (%.1f vs %.1f us)" % (
                       median(cpu), median([o["cpu_us_per_update"] for o in ours]),
                       median([b["cpu_us_per_update"] for b in bare])),
                   "<= 2x", median(cpu) <= 2, median(cpu))
    batch = runs[("ours", "batch")]
    ratio = [o["updates_per_s"] / b["requests_per_s"] for o, b in zip(batch, bare)]
    report.add("batched ingest: arrays of %d, updates/s" % BATCH,
               "%.0f/s (%.1f us CPU/update)" % (
                   median([o["updates_per_s"] for o in batch]),
                   median([o["cpu_us_per_update"] for o in batch])), "~100,000/s", None)
    report.add("batched ingest: updates/s vs bare requests/s", "%.1fx" % median(ratio),
               ">= 8x", median(ratio) >= 8, median(ratio))
    ours = runs[("ours", "single")]
    bpu = median([o["ws_bytes_per_update"] for o in ours])
    mpu = median([o["ws_messages_per_update"] for o in ours])
    report.add("fan-out under load: ws bytes per update / task JSON",
               "%.0f B = %.2fx of %d B (%.4f msg/update, %.1f msg/s)" % (
                   bpu, bpu / task_json_bytes, task_json_bytes, mpu,
                   median([o["ws_messages_per_s"] for o in ours])),
               "<= 2x", bpu / task_json_bytes <= 2, bpu / task_json_bytes)


def bench_latency(report, cfg, server, task_json_bytes, raw):
    """Update -> dashboard latency on an idle server, and bytes per lone update."""
    from websockets.sync.client import connect
    ws = connect(server.url.replace("http://", "ws://") + "/ws", max_size=None)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    lat, sizes, timeouts = [], [], 0
    try:
        ws.recv(timeout=60)  # snapshot
        time.sleep(0.3)
        while True:  # drain what the load left behind
            try:
                ws.recv(timeout=0.3)
            except TimeoutError:
                break
        budget = time.monotonic() + cfg["lat_samples"] * 0.2 + 10
        for k in range(cfg["lat_samples"]):
            if time.monotonic() > budget:
                break
            n = 900_000_000 + k
            marker = '"n":%d' % n
            upd = make_update(0, n, prefix="bench-lat")
            t0 = time.perf_counter()
            post_json(server.port, "/progress", upd, conn)
            got = None
            deadline = t0 + 2.0
            received = 0
            while time.perf_counter() < deadline:
                try:
                    msg = ws.recv(timeout=max(0.001, deadline - time.perf_counter()))
                except TimeoutError:
                    break
                received += len(msg.encode("utf-8"))
                if marker in msg:
                    got = time.perf_counter() - t0
                    break
            if got is None:
                timeouts += 1
            else:
                lat.append(got)
                sizes.append(received)
            time.sleep(max(0.0, 0.125 - (time.perf_counter() - t0)))
    finally:
        conn.close()
        ws.close()
    raw["latency_s"] = lat
    raw["latency_timeouts"] = timeouts
    p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
    report.add("update -> dashboard latency p50 / p99 (idle, %d samples)" % len(lat),
               "%.1f / %.1f ms%s" % (p50, p99, ", %d lost" % timeouts if timeouts else ""),
               "p99 <= 150 ms", p99 <= 150 and not timeouts, p99)
    if sizes:
        lone = median(sizes)
        report.add("fan-out, lone update: ws bytes / task JSON",
                   "%.0f B = %.2fx (1 msg/update)" % (lone, lone / task_json_bytes),
                   "<= 2x", lone / task_json_bytes <= 2, lone / task_json_bytes)


def bench_scale(report, cfg, small, small_dash, raw):
    """RSS at 10k/100k tasks; ingest, CPU and snapshot from 1k to 100k tasks."""
    big = Server("ours")
    dashboards = []
    try:
        out = raw.setdefault("scale", {})
        snap_small = median([snapshot_seconds(small.url) for _ in range(3)])
        out["snapshot_1k_s"] = snap_small
        load_tasks(big.port, 0, 10_000)
        time.sleep(0.3)
        rss10 = rss_mb(big.pid)
        snap10 = median([snapshot_seconds(big.url) for _ in range(3)])
        t = time.perf_counter()
        load_tasks(big.port, 10_000, 90_000)
        load_s = time.perf_counter() - t
        time.sleep(0.3)
        rss100 = rss_mb(big.pid)
        snap100 = median([snapshot_seconds(big.url) for _ in range(3)])
        status, body = get(big.port, "/health")
        n_tasks = json.loads(body).get("tasks") if status == 200 else None
        out.update(rss_10k_mb=rss10, rss_100k_mb=rss100, snapshot_10k_s=snap10,
                   snapshot_100k_s=snap100, load_90k_s=load_s, tasks=n_tasks)
        report.add("scale: server RSS with 10,000 tasks", "%.0f MB" % rss10, "", None, rss10)
        report.add("scale: server RSS with 100,000 tasks (after load)",
                   "%.0f MB (%s tasks)" % (rss100, n_tasks), "<= 300 MB", rss100 <= 300, rss100)
        report.add("scale: snapshot time 1k / 10k / 100k tasks",
                   "%.0f / %.0f / %.0f ms" % (snap_small * 1000, snap10 * 1000,
                                               snap100 * 1000), "", None)
        dashboards = [Dashboard(big.url) for _ in range(DASHBOARDS)]
        runs = {"1k": [], "100k": []}
        for r in range(cfg["scale_rounds"]):
            order = [("1k", small, 1000, small_dash), ("100k", big, 100_000, dashboards)]
            if r % 2:
                order.reverse()
            for key, server, count, dash in order:
                res = run_load(server, "single", 0, count, cfg["load_seconds"], dash)
                runs[key].append(res)
                print("    round %d %-4s tasks %8.0f updates/s  %.1f us CPU/update  "
                      "%.0f ws B/update" % (r + 1, key, res["updates_per_s"],
                                            res["cpu_us_per_update"],
                                            res["ws_bytes_per_update"]), flush=True)
        rss_end = rss_mb(big.pid)
        out["runs"] = runs
        out["rss_100k_end_mb"] = rss_end
        thr = [b["updates_per_s"] / s["updates_per_s"] for s, b in zip(runs["1k"], runs["100k"])]
        cpu = [b["cpu_us_per_update"] / s["cpu_us_per_update"]
               for s, b in zip(runs["1k"], runs["100k"])]
        report.add("scale: ingest 100k tasks / 1k tasks",
                   "%.2fx (%.0f vs %.0f/s)" % (median(thr),
                                               median([b["updates_per_s"] for b in runs["100k"]]),
                                               median([s["updates_per_s"] for s in runs["1k"]])),
                   ">= 0.8x (flat)", median(thr) >= 0.8, median(thr))
        report.add("scale: CPU per update 100k tasks / 1k tasks",
                   "%.2fx (%.1f vs %.1f us)" % (
                       median(cpu), median([b["cpu_us_per_update"] for b in runs["100k"]]),
                       median([s["cpu_us_per_update"] for s in runs["1k"]])),
                   "<= 1.25x (flat)", median(cpu) <= 1.25, median(cpu))
        report.add("scale: server RSS, 100k tasks, after snapshots + load",
                   "%.0f MB" % rss_end, "<= 300 MB", rss_end <= 300, rss_end)
    finally:
        for d in dashboards:
            d.close()
        big.stop()


DASH_JS = """
async (runs) => {
  const P = window.__progressista;
  const all = [];
  P.tasks.forEach ? P.tasks.forEach((t, id) => all.push([id, t]))
                  : Object.keys(P.tasks).forEach(id => all.push([id, P.tasks[id]]));
  const frame = () => new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
  const js = [], withLayout = [];
  for (let k = 0; k < runs + 1; k++) {
    const delta = {};
    const now = Date.now() / 1000;
    for (let i = 0; i < 500; i++) {
      const [id, t] = all[(k * 500 + i * 7) % all.length];
      delta[id] = Object.assign({}, t, {n: (t.n || 0) + 1 + k, updated_at: now, seen_at: now,
                                        rate: 100 + k});
    }
    const msg = {type: "delta", tasks: delta, removed: [], server_time: now};
    await frame();
    const t0 = performance.now();
    P.applyMessage(msg);
    P.renderNow();
    const t1 = performance.now();
    void document.body.offsetHeight;  // style + layout the changes
    const t2 = performance.now();
    if (k > 0) { js.push(t1 - t0); withLayout.push(t2 - t0); }
  }
  return {js, withLayout, tasks: all.length};
}
"""


def bench_dashboard(report, cfg, raw):
    what = "dashboard: apply a 500-task delta, 5,000 tasks (median)"
    what2 = "dashboard: the same, incl. forced style/layout"
    if not os.path.exists(CHROMIUM):
        report.add(what, "n/a (no %s)" % CHROMIUM, "<= 16 ms", None)
        return
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        report.add(what, "n/a (playwright not installed)", "<= 16 ms", None)
        return
    server = Server("ours")
    try:
        load_tasks(server.port, 0, 5000)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(server.url + "/", wait_until="load", timeout=60000)
                try:
                    page.wait_for_function(
                        "() => window.__progressista && window.__progressista.tasks && "
                        "(window.__progressista.tasks.size || "
                        "Object.keys(window.__progressista.tasks).length) >= 5000",
                        timeout=30000)
                except Exception:
                    if not page.evaluate("() => !!window.__progressista"):
                        report.add(what, "n/a (dashboard hook missing)", "<= 16 ms", None)
                        return
                    raise
                # cards rendered: something carrying a task id is in the DOM
                page.wait_for_function(
                    "() => document.querySelectorAll('[data-task-id]').length > 0 || "
                    "document.body.innerText.indexOf('bench-') >= 0", timeout=30000)
                cards = page.evaluate("() => document.querySelectorAll('[data-task-id]').length")
                res = page.evaluate(DASH_JS, cfg["dash_runs"])
            finally:
                browser.close()
    except Exception as exc:
        report.add(what, "n/a (%s)" % str(exc).splitlines()[0][:60], "<= 16 ms", None)
        return
    finally:
        server.stop()
    raw["dashboard"] = dict(res, cards_in_dom=cards)
    m, ml = median(res["js"]), median(res["withLayout"])
    report.add(what, "%.1f ms (max %.1f; %d cards in DOM)" % (m, max(res["js"]), cards),
               "<= 16 ms", m <= 16, m)
    report.add(what2, "%.1f ms (max %.1f)" % (ml, max(res["withLayout"])), "<= 16 ms",
               ml <= 16, ml)


# -- alerts --------------------------------------------------------------------

class WebhookReceiver:
    """A webhook in this process: records when each POST arrives; answers
    ``status`` after ``delay`` seconds (500 after 1 s: a webhook that always
    fails, slowly)."""

    def __init__(self, status=200, delay=0.0):
        self.arrivals = []  # (time.time(), body)
        self.cond = threading.Condition()
        receiver = self

        class Handle(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.cond:
                    receiver.arrivals.append((time.time(), body))
                    receiver.cond.notify_all()
                if delay:
                    time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Quiet(("127.0.0.1", 0), Handle)
        self.url = "http://127.0.0.1:%d/hook" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text, timeout):
        """When the first message holding ``text`` arrived, or None."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for at, body in self.arrivals:
                    if text.encode() in body:
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


ALERT_WINDOW = 2.0


def bench_alert_latency(report, cfg, raw):
    """A failing update -> the webhook's receipt: at most the window + 1 s."""
    receiver = WebhookReceiver()
    server = Server("ours", ["--notify", receiver.url, "--notify-window", str(ALERT_WINDOW)])
    lat = []
    try:
        for k in range(cfg["alert_samples"]):
            task_id = "alert-%d:rank-0" % k
            t0 = time.time()
            post_json(server.port, "/progress", {"task_id": task_id, "status": "error",
                                                 "error": "RuntimeError: bench"})
            at = receiver.wait_for(task_id, ALERT_WINDOW + 30)
            if at is None:
                raise RuntimeError("no alert for %s" % task_id)
            lat.append(at - t0)
    finally:
        server.stop()
        receiver.stop()
    raw["alert_latency_s"] = lat
    target = ALERT_WINDOW + 1.0
    report.add("alert: failing update -> webhook (%g s window, max of %d)"
               % (ALERT_WINDOW, len(lat)),
               "%.2f s (median %.2f s)" % (max(lat), median(lat)),
               "<= %.0f s" % target, max(lat) <= target, max(lat))


def _failer(port, stop_at, rate=50.0):
    """Alongside the load: a new failing task every 1/rate s, each its own group."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    k = 0
    try:
        while time.time() < stop_at:
            post_json(port, "/progress", {"task_id": "failing-%d:rank-0" % k, "status": "error",
                                          "error": "RuntimeError: bench"}, conn)
            k += 1
            time.sleep(1.0 / rate)
    finally:
        conn.close()
    return k


def bench_alert_ingest(report, cfg, raw):
    """Ingest with a webhook that always fails (500 after 1 s) vs with none."""
    failing = WebhookReceiver(status=500, delay=1.0)
    servers = {"none": Server("ours"),
               "failing": Server("ours", ["--notify", failing.url, "--notify-window", "1"])}
    runs = {"none": [], "failing": []}
    try:
        for server in servers.values():
            load_tasks(server.port, 0, 1000)
        for _ in range(cfg["rounds"]):
            for key in ("none", "failing"):
                server = servers[key]
                stop_at = time.time() + cfg["load_seconds"] + 1.0
                failer = threading.Thread(target=_failer, args=(server.port, stop_at),
                                          daemon=True)
                failer.start()
                runs[key].append(run_load(server, "single", 0, 1000, cfg["load_seconds"]))
                failer.join(60)
    finally:
        for server in servers.values():
            server.stop()
        failing.stop()
    raw["alert_ingest"] = runs
    none = median([r["updates_per_s"] for r in runs["none"]])
    with_hook = median([r["updates_per_s"] for r in runs["failing"]])
    ratio = with_hook / none
    report.add("alert: ingest with an always-failing webhook vs none",
               "%.0f vs %.0f updates/s (%.2fx; %d webhook tries)"
               % (with_hook, none, ratio, len(failing.arrivals)),
               ">= 0.90x", ratio >= 0.90, ratio)
# -- terminal ------------------------------------------------------------------

WATCH_TASKS = 10_000


def watch_tasks(count=WATCH_TASKS, now=None):
    """Tasks as ``/ws`` sends them: a mix of groups and lone bars in every state."""
    now = time.time() if now is None else now
    tasks = {}
    for i in range(count):
        task_id = "run-%d:rank-%d" % (i % 40, i) if i % 4 else "host-%d" % i
        status = ("active", "active", "active", "active", "stale", "error", "close")[i % 7]
        tasks[task_id] = {
            "task_id": task_id, "desc": "bench task %d" % i, "n": i * 37 % 1000, "total": 1000,
            "unit": "it", "status": status, "rate": 12.5, "elapsed": 80.0,
            "error": "ValueError: bad row %d" % i if status == "error" else None,
            "meta": {"lr": 0.001}, "host": "bench-host", "pid": 4242, "postfix": None,
            "created_at": now - 100, "updated_at": now - 100 + i * 0.01, "seen_at": now}
    return tasks


def bench_redraw(report, cfg):
    """One full-screen frame of ``watch`` (120 x 40) with 10,000 tasks, in this process."""
    sys.path.insert(0, HERE)
    import progressista
    view = progressista.TaskView()
    view.apply({"type": "snapshot", "tasks": watch_tasks(), "server_time": time.time()})
    format_meter = progressista._tqdm_format_meter()
    header = ["progressista watch · http://127.0.0.1:8000 · live · q quits", ""]
    times = []
    for _ in range(cfg["redraw_runs"]):
        cpu = time.process_time()
        lines = progressista.render(view, 120, 40, header=header, format_meter=format_meter)
        "\x1b[H" + "\x1b[K\r\n".join(lines) + "\x1b[K\x1b[J"
        times.append((time.process_time() - cpu) * 1000)
    report.raw["watch_redraw_ms"] = times
    m = median(times)
    report.add("watch: one redraw, %s tasks, 120x40 (median CPU)" % format(WATCH_TASKS, ","),
               "%.1f ms (max %.1f)" % (m, max(times)), "<= 50 ms", m <= 50, m)


def bench_watch_cpu(report, cfg):
    """CPU of a ``watch`` on a terminal (a pty) while 10,000 tasks update, each once a second."""
    import pty
    server = Server("ours")
    master = None
    try:
        updates = {"active": "update", "stale": "update", "close": "close", "error": "error"}
        tasks = [dict({k: t[k] for k in ("task_id", "desc", "n", "total", "unit", "rate",
                                         "elapsed", "error", "meta", "host", "pid")},
                      status=updates[t["status"]]) for t in watch_tasks().values()]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for lo in range(0, len(tasks), 500):
            post_json(server.port, "/progress", tasks[lo:lo + 500], conn)
        master, slave = pty.openpty()
        import fcntl
        import struct
        import termios
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        proc = subprocess.Popen([sys.executable, PROGRESSISTA, "watch", "--server-url",
                                 server.url], stdin=slave, stdout=slave, stderr=slave,
                                env=clean_env(), cwd=HERE, start_new_session=True)
        _children.append(proc)
        os.close(slave)
        shown = []

        def read_screen():
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                if not data:
                    return
                shown.append(len(data))
        reader = threading.Thread(target=read_screen, daemon=True)
        reader.start()
        time.sleep(2.0)  # connected, snapshot drawn
        seconds = cfg["watch_seconds"]
        rounds, start_cpu, started = 0, cpu_seconds(proc.pid), time.monotonic()
        bytes_before = sum(shown)
        while time.monotonic() - started < seconds:
            round_start = time.monotonic()
            rounds += 1
            for lo in range(0, len(tasks), 500):  # every task, once a second
                batch = [{"task_id": t["task_id"], "n": (t["n"] + rounds) % 1000,
                          "rate": 12.5 + rounds % 3} for t in tasks[lo:lo + 500]]
                post_json(server.port, "/progress", batch, conn)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - round_start)))
        elapsed = time.monotonic() - started
        used = cpu_seconds(proc.pid) - start_cpu
        screen_bytes = sum(shown) - bytes_before
        conn.close()
        os.write(master, b"q")
        proc.wait(10)
        _children.remove(proc)
    finally:
        if master is not None:
            os.close(master)
        server.stop()
    updates = rounds * len(tasks) / elapsed
    report.raw["watch_cpu"] = dict(cpu_seconds=used, seconds=elapsed, updates_per_s=updates,
                                   screen_bytes_per_s=screen_bytes / elapsed)
    report.add("watch: CPU while %s tasks update (%.0f updates/s)"
               % (format(WATCH_TASKS, ","), updates),
               "%.0f%% of a core (%.0f KB/s to the tty)" % (100 * used / elapsed,
                                                          screen_bytes / elapsed / 1024),
               "", None, used / elapsed)


# -- fleet scale (second release) ----------------------------------------------

FLEET_PROCS = 4        # load processes holding the fleet's connections between them
STORM_RATE = 200       # POSTs/s of the worker that posts through a storm
PAGE_UPDATES = 5000    # updates/s while the 100,000-task page is measured


def role_paced(args):
    """A worker posting at ``--rate`` POSTs/s over one keep-alive connection, each
    one update or an array of ``--batch``.

    Prints "ready", reads "start_at duration", then prints its samples as
    JSON: [seconds since start_at, latency in us, status] for each POST.
    """
    port, rate, count, batch = args.port, args.rate, args.count, args.batch
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    k = [0]

    def one():
        k[0] += 1
        if batch > 1:
            data = dumps([make_update((k[0] * 7919 + j * 104729) % count, 2000 + k[0])
                          for j in range(batch)]).encode()
        else:
            data = dumps(make_update((k[0] * 7919) % count, 2000 + k[0])).encode()
        t0 = time.time()
        try:
            conn.request("POST", "/progress", data, headers)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            status = 0
            conn.close()
        return t0, time.time() - t0, status

    one()
    print("ready", flush=True)
    start_at, duration = map(float, sys.stdin.readline().split())
    end, interval, samples = start_at + duration, 1.0 / rate, []
    due = start_at
    while due < end:
        time.sleep(max(0.0, due - time.time()))
        t0, dt, status = one()
        samples.append([round(t0 - start_at, 4), round(dt * 1e6), status])
        due = max(due + interval, time.time() - interval)  # no burst to catch up
    conn.close()
    print(json.dumps(samples), flush=True)


def _ws_handshake(sock, port):
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13"
                  "\r\n\r\n" % (port, key)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed during the handshake")
        head += data
    head, _, rest = head.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
    return rest


def _read_first_message(sock, rest):
    """Read (and skip over) frames until the first message ends; returns its size."""
    buf, skip, ending, size = bytearray(rest), 0, False, 0
    while True:
        while True:
            if skip:
                take = min(skip, len(buf))
                del buf[:take]
                skip -= take
                size += take
                if skip:
                    break
                if ending:
                    return size
                continue
            if len(buf) < 2:
                break
            first, n = buf[0], buf[1] & 0x7F
            length = {126: 4, 127: 10}.get(n, 2)
            if len(buf) < length:
                break
            if n == 126:
                n = struct.unpack("!H", bytes(buf[2:4]))[0]
            elif n == 127:
                n = struct.unpack("!Q", bytes(buf[2:10]))[0]
            del buf[:length]
            skip, ending = n, bool(first & 0x80) and (first & 0x0F) in (0, 1)
            if not skip and ending:
                return size
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed before the snapshot ended")
        buf += data


def role_dashboards(args):
    """``--count`` dashboards connecting at once; each reads its snapshot, then stays
    (reading deltas) for ``duration``.  Prints JSON: per dashboard, seconds from
    start_at to its whole snapshot, its size, and an error if any."""
    port, count = args.port, args.count
    print("ready", flush=True)
    start_at, duration = map(float, sys.stdin.readline().split())
    results = [None] * count

    def one(k):
        sock = None
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=120)
            rest = _ws_handshake(sock, port)
            size = _read_first_message(sock, rest)
            results[k] = {"seconds": time.time() - start_at, "bytes": size}
            sock.settimeout(0.5)
            while time.time() < start_at + duration:
                try:
                    if not sock.recv(1 << 20):
                        break
                except socket.timeout:
                    pass
        except Exception as exc:
            results[k] = {"error": "%s: %s" % (type(exc).__name__, exc)}
        finally:
            if sock is not None:
                sock.close()

    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    threads = [threading.Thread(target=one, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)


def role_fleet(args):
    """``--count`` keep-alive connections, each POSTing one update every ``--period`` s,
    staggered; prints "ready CONNECT_ERRORS", reads "start_at duration", then
    prints latencies (us) and the errors (non-200, resets, closes) as JSON."""
    import heapq
    import selectors
    port, count, period, lo = args.port, args.count, args.period, args.lo
    socks, connect_errors = [], 0
    for k in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            socks.append(sock)
        except OSError:
            connect_errors += 1
    print("ready %d" % connect_errors, flush=True)
    start_at, duration = map(float, sys.stdin.readline().split())
    end = start_at + duration
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    sel = selectors.DefaultSelector()
    due = [(start_at + period * (k + args.seed / float(FLEET_PROCS)) / len(socks), k)
           for k in range(len(socks))]
    heapq.heapify(due)
    sent_at, bufs, rounds = {}, {}, [0] * len(socks)
    lat, errors, alive = [], {}, set(range(len(socks)))

    def fail(k, why):
        errors[why] = errors.get(why, 0) + 1
        alive.discard(k)
        if k in sent_at:
            del sent_at[k]
            sel.unregister(socks[k])

    while True:
        now = time.time()
        while due and due[0][0] <= now:
            when, k = heapq.heappop(due)
            if when >= end or k not in alive:
                continue
            rounds[k] += 1
            body = dumps(make_update(lo + (k * 100 + rounds[k]) % 100_000, rounds[k])).encode()
            try:
                socks[k].send(b"POST /progress HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                              b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))
            except OSError as exc:
                fail(k, type(exc).__name__)
                continue
            sent_at[k], bufs[k] = now, b""
            sel.register(socks[k], selectors.EVENT_READ, k)
        if not sent_at and (not due or time.time() >= end):
            break
        if time.time() > end + 15:
            for k in list(sent_at):
                fail(k, "timeout")
            break
        timeout = max(0.0, min(0.05, due[0][0] - time.time())) if due else 0.05
        for key, _ in sel.select(timeout):
            k = key.data
            try:
                data = socks[k].recv(65536)
            except OSError as exc:
                fail(k, type(exc).__name__)
                continue
            if not data:
                fail(k, "closed")
                continue
            buf = bufs[k] + data
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                bufs[k] = buf
                continue
            match = re.search(rb"(?i)content-length:\s*(\d+)", buf[:head_end])
            if len(buf) < head_end + 4 + (int(match.group(1)) if match else 0):
                bufs[k] = buf
                continue
            status = int(buf[9:12])
            sel.unregister(socks[k])
            t0 = sent_at.pop(k)
            if status == 200:
                lat.append(round((time.time() - t0) * 1e6))
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1
            heapq.heappush(due, (t0 + period, k))
    for sock in socks:
        sock.close()
    print(json.dumps({"lat_us": lat, "errors": errors, "connections": len(socks),
                      "connect_errors": connect_errors}), flush=True)


def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Sampler:
    """Peak RSS (MB) and thread count of a process, sampled every 50 ms."""

    def __init__(self, pid):
        self.pid, self.peak_rss, self.peak_threads = pid, 0.0, 0
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stopping:
            try:
                self.peak_rss = max(self.peak_rss, rss_mb(self.pid))
                self.peak_threads = max(self.peak_threads, proc_status(self.pid, "Threads"))
            except OSError:
                return
            time.sleep(0.05)

    def stop(self):
        self.stopping = True
        self.thread.join(2)
        return self.peak_rss, self.peak_threads


def _role(name, *extra):
    return [sys.executable, os.path.abspath(__file__), "--_role", name] + [str(x) for x in extra]


def first_release_script(rev, tmpdir):
    """The first release's progressista.py (``git show REV:progressista.py``), or None."""
    if not rev:
        return None
    try:
        text = subprocess.run(["git", "show", "%s:progressista.py" % rev], cwd=HERE,
                              capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = os.path.join(tmpdir, "progressista_first_release.py")
    with open(path, "wb") as f:
        f.write(text)
    return path


def fleet_run(kind, cfg, script=None):
    """1,000 keep-alive connections (100,000 tasks on ours) posting once per period."""
    server = Server(kind, script=script)
    procs, sampler = [], None
    try:
        if kind != "bare":
            load_tasks(server.port, 0, 100_000)
        time.sleep(0.5)
        rss0, threads0 = rss_mb(server.pid), proc_status(server.pid, "Threads")
        per = cfg["fleet_connections"] // FLEET_PROCS
        sampler = Sampler(server.pid)
        t_connect = time.perf_counter()
        for s in range(FLEET_PROCS):
            procs.append(spawn(_role("fleet", "--port", server.port, "--count", per,
                                     "--period", cfg["fleet_period"], "--lo", 0,
                                     "--seed", s), stdin=subprocess.PIPE))
        connect_errors = 0
        for p in procs:
            line = (read_line(p, 120.0) or "").split()
            if not line or line[0] != "ready":
                raise RuntimeError("a fleet process did not get ready")
            connect_errors += int(line[1])
        connect_s = time.perf_counter() - t_connect
        deadline = time.monotonic() + 15  # accepted connections may still wait in the backlog
        while proc_status(server.pid, "Threads") < threads0 + 0.95 * cfg["fleet_connections"] \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        rss_conn = rss_mb(server.pid)
        threads_conn = proc_status(server.pid, "Threads")
        start_at = time.time() + 0.5
        for p in procs:
            p.stdin.write(("%.6f %.3f\n" % (start_at, cfg["fleet_seconds"])).encode())
            p.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = cpu_seconds(server.pid)
        results = []
        for p in procs:
            line = read_line(p, cfg["fleet_seconds"] + 60.0)
            if not line:
                raise RuntimeError("a fleet process gave no result")
            results.append(json.loads(line))
        cpu = cpu_seconds(server.pid) - cpu0
        peak_rss, peak_threads = sampler.stop()
        sampler = None
    finally:
        if sampler is not None:
            sampler.stop()
        for p in procs:
            stop(p)
        server.stop()
    lat = [x for r in results for x in r["lat_us"]]
    errors = {}
    for r in results:
        for why, n in r["errors"].items():
            errors[why] = errors.get(why, 0) + n
    return {"kind": kind, "connections": sum(r["connections"] for r in results),
            "connect_errors": connect_errors, "connect_s": connect_s, "posts": len(lat),
            "errors": errors, "p50_ms": percentile(lat, 50) / 1000.0,
            "p99_ms": percentile(lat, 99) / 1000.0, "max_ms": max(lat or [0]) / 1000.0,
            "rss_before_mb": rss0, "rss_connected_mb": rss_conn, "rss_peak_mb": peak_rss,
            "threads_before": threads0, "threads_connected": threads_conn,
            "threads_peak": peak_threads, "cpu_s": cpu,
            "cpu_us_per_post": cpu / max(1, len(lat)) * 1e6}


def bench_fleet(report, cfg, raw):
    out = raw.setdefault("fleet", {})
    for kind in ("bare", "ours"):
        res = out[kind] = fleet_run(kind, cfg)
        print("    %-4s %d connections (%.1f s to connect), %d POSTs, p50 %.1f / p99 %.1f / "
              "max %.1f ms, errors %s, RSS %.0f -> %.0f MB (peak %.0f), threads %d -> %d"
              % (kind, res["connections"], res["connect_s"], res["posts"], res["p50_ms"],
                 res["p99_ms"], res["max_ms"], res["errors"] or 0, res["rss_before_mb"],
                 res["rss_connected_mb"], res["rss_peak_mb"], res["threads_before"],
                 res["threads_connected"]), flush=True)
    ours, bare = out["ours"], out["bare"]
    n = cfg["fleet_connections"]
    served = ours["connections"] == n and not ours["connect_errors"] and not ours["errors"]
    report.add("fleet: %d keep-alive connections, 100k tasks: served" % n,
               "%d/%d, errors %s (bare: %d/%d, %s)" % (
                   ours["connections"], n, ours["errors"] or ours["connect_errors"] or 0,
                   bare["connections"], n, bare["errors"] or bare["connect_errors"] or 0),
               "all, no 503/reset", served)
    report.add("fleet: POST p50 / p99 (%d POST/s)" % round(n / cfg["fleet_period"]),
               "%.1f / %.1f ms (bare %.1f / %.1f)" % (ours["p50_ms"], ours["p99_ms"],
                                                       bare["p50_ms"], bare["p99_ms"]),
               "p99 <= 50 ms", ours["p99_ms"] <= 50, ours["p99_ms"])
    per_conn = (ours["rss_connected_mb"] - ours["rss_before_mb"]) / max(1, ours["connections"])
    report.add("fleet: server RSS, 100k tasks + %d connections" % n,
               "%.0f MB peak (%.0f KB/connection; %d threads)" % (
                   ours["rss_peak_mb"], per_conn * 1024, ours["threads_connected"]),
               "<= 400 MB", ours["rss_peak_mb"] <= 400, ours["rss_peak_mb"])


def storm_run(kind, cfg, script=None, warm=True):
    """20 dashboards connect at once to 100,000 tasks while a worker posts."""
    server = Server(kind, script=script)
    procs, sampler = [], None
    before_s, storm_s = cfg["storm_before"], cfg["storm_seconds"]
    try:
        load_tasks(server.port, 0, 100_000)
        time.sleep(0.5)
        rss_cold = rss_mb(server.pid)
        if warm:  # one dashboard was open before: the text cache is filled (see README)
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            try:
                _read_first_message(sock, _ws_handshake(sock, server.port))
            finally:
                sock.close()
            time.sleep(0.5)
        worker = spawn(_role("paced", "--port", server.port, "--rate", STORM_RATE,
                             "--count", 100_000), stdin=subprocess.PIPE)
        dash = spawn(_role("dashboards", "--port", server.port, "--count",
                           cfg["storm_dashboards"]), stdin=subprocess.PIPE)
        procs = [worker, dash]
        for p in procs:
            if (read_line(p, 30.0) or "").strip() != "ready":
                raise RuntimeError("a storm process did not get ready")
        rss0 = rss_mb(server.pid)
        start_at = time.time() + 0.3
        worker.stdin.write(("%.6f %.3f\n" % (start_at, before_s + storm_s)).encode())
        worker.stdin.flush()
        dash.stdin.write(("%.6f %.3f\n" % (start_at + before_s, storm_s - 0.5)).encode())
        dash.stdin.flush()
        time.sleep(max(0.0, start_at + before_s - 0.5 - time.time()))
        rss_before = rss_mb(server.pid)
        sampler = Sampler(server.pid)
        samples = json.loads(read_line(worker, before_s + storm_s + 60.0) or "[]")
        snaps = json.loads(read_line(dash, 120.0) or "[]")
        peak_rss, _ = sampler.stop()
        sampler = None
    finally:
        if sampler is not None:
            sampler.stop()
        for p in procs:
            stop(p)
        server.stop()
    done = [s["seconds"] for s in snaps if s and "seconds" in s]  # from the storm's start
    failed = [s.get("error") for s in snaps if not s or "seconds" not in s]
    storm_end = before_s + (max(done) if done else storm_s)
    before = [us for t, us, st in samples if t < before_s and st == 200]
    during = [us for t, us, st in samples if before_s <= t <= storm_end and st == 200]
    errors = sum(1 for t, us, st in samples if st != 200)
    return {"kind": kind, "rss_cold_mb": rss_cold, "rss_start_mb": rss0, "rss_before_mb": rss_before,
            "rss_peak_mb": peak_rss, "snapshots": len(done), "failed": failed,
            "snapshot_s_median": median(done), "snapshot_s_max": max(done or [float("nan")]),
            "snapshot_mb": median([s["bytes"] / 1e6 for s in snaps if s and "bytes" in s]),
            "posts_before": len(before), "posts_during": len(during), "post_errors": errors,
            "p99_before_ms": percentile(before, 99) / 1000.0,
            "p99_during_ms": percentile(during, 99) / 1000.0,
            "max_during_ms": max(during or [0]) / 1000.0,
            "p50_during_ms": percentile(during, 50) / 1000.0}


def bench_storm(report, cfg, raw, first_script=None):
    out = raw.setdefault("storm", {})
    kinds = [("ours", None, True), ("ours, cold", None, False)]
    if first_script:
        kinds.append(("first release", first_script, True))
    for kind, script, warm in kinds:
        res = out[kind] = storm_run("ours", cfg, script, warm)
        print("    %-13s %d/%d snapshots (%.1f MB each) in %.2f s median, %.2f s last; "
              "POST p99 %.1f ms before, %.1f ms during (max %.1f, %d posts, %d errors); "
              "RSS %.0f -> peak %.0f MB" % (
                  kind, res["snapshots"], cfg["storm_dashboards"], res["snapshot_mb"],
                  res["snapshot_s_median"], res["snapshot_s_max"], res["p99_before_ms"],
                  res["p99_during_ms"], res["max_during_ms"], res["posts_during"],
                  res["post_errors"], res["rss_before_mb"], res["rss_peak_mb"]), flush=True)
    ours, cold = out["ours"], out["ours, cold"]
    first = out.get("first release")
    n = cfg["storm_dashboards"]
    report.add("storm: %d dashboards at once, 100k tasks: POST p99 during" % n,
               "%.1f ms (before %.1f%s)" % (
                   ours["p99_during_ms"], ours["p99_before_ms"],
                   "; first release %.0f ms" % first["p99_during_ms"] if first else ""),
               "<= 100 ms", ours["p99_during_ms"] <= 100 and not ours["post_errors"],
               ours["p99_during_ms"])
    report.add("storm: the same, text cache cold (a first storm)",
               "%.1f ms (before %.1f)" % (cold["p99_during_ms"], cold["p99_before_ms"]),
               "<= 100 ms", cold["p99_during_ms"] <= 100 and not cold["post_errors"],
               cold["p99_during_ms"])
    report.add("storm: every dashboard got its whole snapshot",
               "%d/%d, last after %.1f s (cold %.1f s%s)" % (
                   ours["snapshots"], n, ours["snapshot_s_max"], cold["snapshot_s_max"],
                   "; first release %.1f s" % first["snapshot_s_max"] if first else ""),
               "all", ours["snapshots"] == n and cold["snapshots"] == n)
    grow = (ours["rss_peak_mb"] - ours["rss_before_mb"]) / n
    report.add("storm: server memory per connecting dashboard",
               "%.1f MB (peak %.0f MB; text cache %.0f MB, shared%s)" % (
                   grow, ours["rss_peak_mb"], ours["rss_start_mb"] - ours["rss_cold_mb"],
                   "; first release %.1f MB" % ((first["rss_peak_mb"] - first["rss_before_mb"])
                                                / n) if first else ""),
               "~ one piece (%d KB)" % (262144 // 1024), None, grow)


PAGE_INIT_JS = """
(() => {
  // Time the page's own work per frame: what its WebSocket handler did since
  // the last frame, plus the frame's rAF callbacks and the style/layout they
  // cause (forced here, measured, instead of after the callback).
  const W = window, B = W.__bench = {frames: [], messages: [], pendingMsg: 0};
  const raf = W.requestAnimationFrame.bind(W);
  let frameTs = -1, frameWork = 0;
  W.requestAnimationFrame = function (cb) {
    return raf(function (ts) {
      if (ts !== frameTs) {
        if (frameTs >= 0 && B.recording) B.frames.push(frameWork);
        frameTs = ts; frameWork = B.pendingMsg; B.pendingMsg = 0;
      }
      const t0 = performance.now();
      cb(ts);
      if (document.body) void document.body.offsetHeight;
      frameWork += performance.now() - t0;
    });
  };
  const d = Object.getOwnPropertyDescriptor(WebSocket.prototype, 'onmessage');
  Object.defineProperty(WebSocket.prototype, 'onmessage', {
    configurable: true,
    get() { return d.get.call(this); },
    set(fn) {
      d.set.call(this, function (ev) {
        const t0 = performance.now();
        const r = fn.call(this, ev);
        const dt = performance.now() - t0;
        B.pendingMsg += dt;
        if (B.recording) B.messages.push(dt);
        return r;
      });
    }
  });
})();
"""

PAGE_READY_JS = """
(n) => {
  const P = window.__progressista;
  if (P && P.tasks && P.tasks.size >= n && document.querySelector('[data-task-id]'))
    return performance.now();
  return 0;
}
"""


def bench_page(report, cfg, raw):
    """The page on 100,000 tasks: first paint, then frame work under 5,000 updates/s."""
    what = "page, 100k tasks: snapshot received, parsed, first painted"
    what2 = "page, 100k tasks: frame work under 5,000 updates/s (median)"
    if not os.path.exists(CHROMIUM):
        report.add(what, "n/a (no %s)" % CHROMIUM, "<= 2 s", None)
        return
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        report.add(what, "n/a (playwright not installed)", "<= 2 s", None)
        return
    out = raw.setdefault("page", {})
    server = Server("ours")
    worker = None
    try:
        load_tasks(server.port, 0, 100_000)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                firsts = []
                for _ in range(cfg["page_loads"]):
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    page.add_init_script(PAGE_INIT_JS)
                    page.goto(server.url + "/", wait_until="commit", timeout=60000)
                    handle = page.wait_for_function(PAGE_READY_JS, arg=100_000, polling="raf",
                                                    timeout=60000)
                    firsts.append(handle.json_value() / 1000.0)
                    cards = page.evaluate("() => document.querySelectorAll('[data-task-id]')"
                                          ".length")
                    if len(firsts) < cfg["page_loads"]:
                        page.close()
                out["first_paint_s"] = firsts
                out["cards_in_dom"] = cards
                worker = spawn(_role("paced", "--port", server.port, "--rate",
                                     PAGE_UPDATES / BATCH, "--batch", BATCH,
                                     "--count", 100_000), stdin=subprocess.PIPE)
                if (read_line(worker, 30.0) or "").strip() != "ready":
                    raise RuntimeError("the page's worker did not get ready")
                seconds = cfg["page_seconds"]
                start_at = time.time() + 0.3
                worker.stdin.write(("%.6f %.3f\n" % (start_at, seconds + 1.5)).encode())
                worker.stdin.flush()
                time.sleep(max(0.0, start_at + 1.0 - time.time()))  # the load settles
                page.evaluate("() => { window.__bench.frames = []; window.__bench.messages = [];"
                              " window.__bench.recording = true; }")
                time.sleep(seconds)
                res = page.evaluate("() => { window.__bench.recording = false; "
                                    "return window.__bench; }")
                samples = json.loads(read_line(worker, 60.0) or "[]")
            finally:
                browser.close()
    except Exception as exc:
        report.add(what, "n/a (%s)" % str(exc).splitlines()[0][:60], "<= 2 s", None)
        return
    finally:
        if worker is not None:
            stop(worker)
        server.stop()
    frames, messages = res["frames"], res["messages"]
    posted = sum(1 for _, _, st in samples if st == 200) * BATCH / max(1e-9, seconds + 1.5)
    out.update(frames_ms=frames, messages_ms=messages, updates_per_s=posted)
    first = median(firsts)
    report.add(what, "%.2f s (median of %d; %d cards in DOM)" % (first, len(firsts), cards),
               "<= 2 s", first <= 2.0, first)
    m = median(frames)
    report.add(what2, "%.1f ms (p95 %.1f, %d frames in %.0f s; %.0f updates/s posted)" % (
        m, percentile(frames, 95), len(frames), seconds, posted), "<= 16 ms", m <= 16, m)


# -- main ----------------------------------------------------------------------

def print_table(report, header):
    rows = report.rows
    w1 = max(len(r["what"]) for r in rows)
    w2 = max(len(r["measured"]) for r in rows)
    w3 = max(len(r["target"]) for r in rows)
    print()
    for line in header:
        print(line)
    print()
    print("%-*s  %-*s  %-*s  %s" % (w1, "what", w2, "measured", w3, "target", "met"))
    print("%s  %s  %s  %s" % ("-" * w1, "-" * w2, "-" * w3, "---"))
    for r in rows:
        print("%-*s  %-*s  %-*s  %s" % (w1, r["what"], w2, r["measured"], w3, r["target"],
                                        r["met"] if r["met"] != "n/a" or r["target"] else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--only",
                        default="client,ingest,latency,scale,dashboard,alerts,terminal,fleet,"
                                "storm,page",
                        help="comma list of sections to run (default: all)")
    parser.add_argument("--load", metavar="URL",
                        help="only generate the ingest load against a running server")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="how long --load runs (at most 600)")
    parser.add_argument("--first-release", default="21eedb3", metavar="REV",
                        help="git revision of the first release, run side by side in the "
                             "storm (default: %(default)s; '' to skip)")
    parser.add_argument("--_role", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=STORM_RATE, help=argparse.SUPPRESS)
    parser.add_argument("--period", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("single", "batch"),
                        help="with --load: single-update POSTs (default) or arrays of %d" % BATCH)
    parser.add_argument("--lo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._role == "bare":
        return role_bare()
    if args._role == "sender":
        return role_sender(args)
    if args._role == "paced":
        return role_paced(args)
    if args._role == "dashboards":
        return role_dashboards(args)
    if args._role == "fleet":
        return role_fleet(args)
    if args._role == "slow":
        return role_slow()
    if args.load:
        host = args.load.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost"):
            parser.error("--load only targets 127.0.0.1")
        try:
            load_only(args.load, min(600.0, args.seconds), args.mode or "single")
        finally:
            cleanup()
        return 0

    cfg = SETTINGS["quick" if args.quick else "full"]
    sections = set(args.only.split(","))
    header = ["Progressista benchmark (%s run)" % ("quick" if args.quick else "full"),
              "date:    %s" % datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "nproc:   %d" % os.cpu_count(),
              "python:  %s (%s)" % (platform.python_version(), sys.executable),
              "machine: %s" % " ".join(platform.uname()[0:3:2])]
    try:
        import tqdm
        header.append("tqdm:    %s" % tqdm.__version__)
    except ImportError:
        pass
    for line in header:
        print(line)
    report = Report()
    started = time.monotonic()
    servers, dashboards, dbdir = {}, {}, None
    try:
        if "client" in sections:
            print("\n[client]", flush=True)
            server = Server("ours")
            try:
                bench_client(report, cfg, server)
                bench_client_many(report, cfg, server)
                bench_client_slow(report, cfg, server)
            finally:
                server.stop()
        task_json_bytes = None
        if sections & {"ingest", "latency", "scale"}:
            print("\n[server ingest: %d sender processes, %d dashboards, %.0f s runs]"
                  % (SENDERS, DASHBOARDS, cfg["load_seconds"]), flush=True)
            runs, task_json_bytes, servers, dashboards, dbdir = bench_ingest(
                report, cfg, report.raw)
            report_ingest(report, runs, task_json_bytes)
        if "ingest" in sections:
            print("\n[ingest over TLS beside plain HTTP: %d sender processes, %.0f s runs]"
                  % (SENDERS, cfg["load_seconds"]), flush=True)
            bench_tls(report, cfg, report.raw)
        if "latency" in sections:
            print("\n[update -> dashboard latency]", flush=True)
            bench_latency(report, cfg, servers["ours"], task_json_bytes, report.raw)
        if "scale" in sections:
            print("\n[scale]", flush=True)
            for key in ("bare", "db"):
                if key in servers:
                    if key in dashboards:
                        for d in dashboards.pop(key):
                            d.close()
                    servers.pop(key).stop()
            bench_scale(report, cfg, servers["ours"], dashboards.get("ours", ()), report.raw)
        for ds in dashboards.values():
            for d in ds:
                d.close()
        dashboards = {}
        for s in servers.values():
            s.stop()
        servers = {}
        if "dashboard" in sections:
            print("\n[dashboard]", flush=True)
            bench_dashboard(report, cfg, report.raw)
        if "alerts" in sections:
            print("\n[alerts]", flush=True)
            bench_alert_latency(report, cfg, report.raw)
            bench_alert_ingest(report, cfg, report.raw)
        if "terminal" in sections:
            print("\n[terminal: watch]", flush=True)
            bench_redraw(report, cfg)
            bench_watch_cpu(report, cfg)
        if "fleet" in sections:
            print("\n[fleet: %d keep-alive connections, one POST each per %.1f s]"
                  % (cfg["fleet_connections"], cfg["fleet_period"]), flush=True)
            bench_fleet(report, cfg, report.raw)
        if "storm" in sections:
            print("\n[storm: %d dashboards at once on 100,000 tasks, a worker posting %d/s]"
                  % (cfg["storm_dashboards"], STORM_RATE), flush=True)
            tmpdir = tempfile.mkdtemp(prefix="progressista-bench-")
            try:
                bench_storm(report, cfg, report.raw,
                            first_release_script(args.first_release, tmpdir))
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        if "page" in sections:
            print("\n[page: 100,000 tasks]", flush=True)
            bench_page(report, cfg, report.raw)
    finally:
        for ds in dashboards.values():
            for d in ds:
                d.close()
        for s in servers.values():
            s.stop()
        cleanup()
        if dbdir:
            for name in os.listdir(dbdir):
                os.unlink(os.path.join(dbdir, name))
            os.rmdir(dbdir)
    elapsed = time.monotonic() - started
    header.append("elapsed: %.0f s" % elapsed)
    print_table(report, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "settings": cfg, "rows": report.rows,
                       "raw": report.raw}, f, indent=1, default=str)
        print("\nwrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
