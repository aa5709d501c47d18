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
import signal
import socket
import statistics
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
                 dash_runs=10, many_runs=5, slow_runs=2),
    "quick": dict(iter_n=1_000_000, update_n=500_000, client_pairs=7, close_runs=8,
                  rounds=2, load_seconds=2.0, lat_samples=50, scale_rounds=2,
                  dash_runs=5, many_runs=3, slow_runs=1),
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

    def __init__(self, kind, extra=()):
        self.kind = kind
        if kind == "bare":
            argv = [sys.executable, os.path.abspath(__file__), "--_role", "bare"]
        else:
            argv = [sys.executable, PROGRESSISTA, "serve", "--host", "127.0.0.1",
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
    parser.add_argument("--only", default="client,ingest,latency,scale,dashboard",
                        help="comma list of sections to run (default: all)")
    parser.add_argument("--load", metavar="URL",
                        help="only generate the ingest load against a running server")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="how long --load runs (at most 600)")
    parser.add_argument("--_role", help=argparse.SUPPRESS)
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
