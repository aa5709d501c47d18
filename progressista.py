#!/usr/bin/env python3
"""Progressista: tqdm progress bars from anywhere, live in one browser tab.

Workers on any number of processes and machines push their ``tqdm`` bars to
one small server; a dashboard in the browser shows them all, live.

    $ python3 progressista.py serve                 # the server and dashboard
    $ python3 progressista.py run train.py -- --lr 3e-4   # every tqdm remote

    >>> from progressista import RemoteTqdm          # or: drop-in, by hand
    >>> for batch in RemoteTqdm(loader, desc="epoch 1", meta={"lr": 3e-4}):
    ...     step(batch)

The whole tool is this one file: the client (``RemoteTqdm``), the patcher, the
server (stdlib ``http.server`` plus a hand-written RFC 6455 WebSocket), the
embedded dashboard and the command line.  Copy it anywhere.  The server side
needs only the standard library; ``tqdm`` is imported when a bar is made.

License: MIT.
"""

import atexit
import base64
import codecs
import collections
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import socket
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"
__all__ = [
    "RemoteTqdm", "install", "uninstall", "run", "demo",
    "TaskStore", "Hub", "ProgressServer", "make_server", "serve",
    "accept_key", "encode_frame", "read_frame", "main",
]

log = logging.getLogger("progressista")

DEFAULT_SERVER_URL = "http://localhost:8000/progress"
STATUSES = ("active", "stale", "close", "error")
MAX_BODY = 1 << 20  # POST bodies above this are refused with 413


# -- wire helpers ------------------------------------------------------------

def _dumps(obj):
    """Compact JSON, the one encoding used on every wire of this module."""
    return json.dumps(obj, separators=(",", ":"))


def _env_float(name, default):
    """A float from the environment; a bad value falls back, never raises."""
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def _finite(value):
    """A JSON-safe number from whatever tqdm holds (numpy, inf, nan, None)."""
    if value is None:
        return None
    if type(value) is not float:
        try:  # an int beyond a float's range is no number to the server either
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            return None
        value = value if type(value) is int else as_float
    if type(value) is float and not math.isfinite(value):
        return None
    return value


def _ssl_context():
    """The client side's TLS context: the system's CAs, or a private CA's PEM.

    ``$PROGRESSISTA_CA_BUNDLE`` names a PEM file of CA certificates, for a
    server whose certificate a private CA (or ``openssl`` itself) signed.  The
    client, ``run``, ``watch``, ``wait`` and ``notify`` all verify through it.
    """
    import ssl
    return ssl.create_default_context(cafile=os.environ.get("PROGRESSISTA_CA_BUNDLE") or None)


def _group_of(task_id):
    """A task's group: its id before the first ``:`` (an id without one is
    a group of its own)."""
    return task_id.partition(":")[0]


def _member_of(task_id):
    """A task's member in its group: after the first ``:``, up to the first
    ``/`` (``run-7:rank-3/2`` is the second bar of member ``rank-3``)."""
    head, colon, tail = task_id.partition(":")
    return tail.partition("/")[0] if colon else head


def _summarize(exc):
    """One line for the dashboard: ``ValueError: bad row 17``."""
    name = type(exc).__name__
    try:
        text = str(exc).strip().splitlines()
    except Exception:  # a broken __str__ must not hide the failure itself
        text = []
    line = "%s: %s" % (name, text[0]) if text else name
    return line[:500]


# -- client ------------------------------------------------------------------

HEARTBEAT_SECONDS = 5.0  # an open bar with no progress still says "alive"
EARLY_CLOSE_HOLD = 0.5   # a loop left by GeneratorExit waits this long to learn why
CLOSE_WAIT = 0.05        # close() waits at most this long for its final state
# Least time between two timed rounds of the sender: what falls due meanwhile
# goes together.  Each round takes the GIL from the job a few times, which on
# a loaded machine can cost the job a scheduler slice each.
TICK_SECONDS = 0.1
IDLE_SECONDS = 2.0       # a bar that has not changed for this long is idle...
IDLE_LOOK = 1.0          # ...and looked at this often, not every push_every
BUSY_RETRY = 2.0         # a 429 without Retry-After: try that update again this much later
MAX_ANSWER = 65536       # bytes of an answer's head, or body, that the sender reads
_HOST = socket.gethostname()


MAX_BATCH = 50  # updates per request at most (1 MiB is the server's limit)


class _Refused(OSError):
    """The server said the input itself is bad: sending it again won't help."""

    STATUSES = (400, 413, 422)


class _Busy(OSError):
    """429: the server is full for now; the same update may fit later."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class _WrongSetup(OSError):
    """The server refused us (401, 403, 404), or its certificate: say so once."""

    STATUSES = (401, 403, 404)


class _BadSetting(Exception):
    """An argument the remote half can't use: that bar stays local only.

    Not a ValueError: a ``meta`` value whose ``__str__`` raises one must not
    pass for the cycles and NaNs that merely drop ``meta``.
    """


_said = set()  # what _say() already printed in this process
_said_lock = threading.Lock()


def _say(text, key=None):
    """One line on stderr, once per process for each ``key`` (default: the text)."""
    key = text if key is None else key
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    line = "progressista: " + text
    tqdm_std = sys.modules.get("tqdm.std")
    try:
        if tqdm_std is not None:
            # As tqdm prints: the bars on stderr step aside for the line and
            # come back under it.  Without tqdm's lock, which another
            # process may hold: a race here costs a redraw, never a hang.
            tqdm_std.tqdm.write(line, file=sys.stderr, nolock=True)
            return
    except Exception:
        pass
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:  # no stderr (pythonw, closed): nothing to say it on
        pass


def _shown_url(url):
    """A URL as messages show it: no user info, query or fragment (tokens hide there)."""
    text = str(url).split("?", 1)[0].split("#", 1)[0]
    text = re.sub(r"//[^/]*@", "//", text)
    return text if len(text) <= 120 else text[:117] + "..."


_URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7f))  # printable ASCII stays as it is


def _target_of(url):
    """``(scheme, host, port, request target, Host header)`` of an http(s) URL.

    Raises ValueError for a URL no request can be made to.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("it must start with http:// or https://")
    host = parts.hostname
    if not host or any(c.isspace() or c in "\0/\\" for c in host):
        raise ValueError("it has no usable host")
    port = parts.port  # raises ValueError when out of range
    if port == 0:
        raise ValueError("port 0 is no server's port")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    # Spaces, controls and non-ASCII percent-encoded: nothing can break the request line.
    target = urllib.parse.quote(target, safe=_URL_SAFE)
    netloc = parts.netloc.rpartition("@")[2]
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), target, netloc


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789"
                         "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OWN_HEADERS = ("content-length", "transfer-encoding", "connection")


def _checked_headers(*sources):
    """Merge header mappings (later wins, names case-insensitive) and check each.

    Raises _BadSetting naming the header, never showing a value (a token).
    """
    merged = {}
    for source in sources:
        try:
            pairs = dict(source or {})
        except Exception:
            raise _BadSetting("headers must be a dict of names and values, not %s"
                              % type(source).__name__) from None
        for name, value in pairs.items():
            if not isinstance(name, str):
                raise _BadSetting("a header name must be a string, not %s" % type(name).__name__)
            for old in [k for k in merged if k.lower() == name.lower()]:
                del merged[old]
            merged[name] = value
    for name, value in merged.items():
        if not name or not _TOKEN_CHARS.issuperset(name):
            raise _BadSetting("%r is not an HTTP header name" % name[:40])
        if name.lower() in _OWN_HEADERS:
            raise _BadSetting("the %s header is progressista's own to set" % name)
        if not isinstance(value, str):
            raise _BadSetting("the value of header %s must be a string, not %s"
                              % (name, type(value).__name__))
        if "\r" in value or "\n" in value or "\0" in value:
            raise _BadSetting("the value of header %s holds a line break or NUL" % name)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise _BadSetting("the value of header %s holds characters HTTP can't carry"
                              % name) from None
    return merged


def _seconds(name, value):
    """A finite number of seconds, or _BadSetting saying which setting is wrong."""
    try:
        seconds = float(value)
    except Exception:
        shown = repr(value)[:40] if isinstance(value, (str, int, float)) else type(value).__name__
        raise _BadSetting("%s must be a number of seconds, not %s" % (name, shown)) from None
    if not math.isfinite(seconds):
        raise _BadSetting("%s must be a finite number of seconds, not %r" % (name, seconds))
    return seconds


def _meta_text(value):
    """json.dumps' fallback for a ``meta`` value: its text, or a clear _BadSetting."""
    try:
        return str(value)
    except Exception as exc:
        raise _BadSetting("meta holds a %s that can't be shown as text (%s)"
                          % (type(value).__name__, _summarize(exc))) from None


class _Connection:
    """One kept-alive HTTP/1.1 connection; each exchange has one total deadline.

    ``http.client`` times out per read, so a server that drips a byte a second
    could hold the sender forever; every wait here is bounded by what is left
    of the deadline instead.
    """

    def __init__(self, scheme, host, port):
        self.scheme, self.host, self.port = scheme, host, port
        self.sock = None
        self.buffer = b""

    def close(self):
        sock, self.sock, self.buffer = self.sock, None, b""
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    @staticmethod
    def _left(deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the server did not answer in time")
        return left

    def _connect(self, deadline, context):
        sock = socket.create_connection((self.host, self.port), timeout=self._left(deadline))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                import select
                import ssl
                sock = context().wrap_socket(sock, server_hostname=self.host,
                                             do_handshake_on_connect=False)
                sock.setblocking(False)
                while True:  # the handshake, under the same deadline
                    try:
                        sock.do_handshake()
                        break
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                        write = isinstance(exc, ssl.SSLWantWriteError)
                        left = self._left(deadline)
                        if hasattr(select, "poll"):  # a busy job may hold fds past 1024
                            poller = select.poll()
                            poller.register(sock, select.POLLOUT if write else select.POLLIN)
                            poller.poll(left * 1000)
                        else:  # Windows
                            select.select([], [sock], [], left) if write else select.select(
                                [sock], [], [], left)
        except BaseException:
            sock.close()
            raise
        self.sock, self.buffer = sock, b""

    def _fill(self, deadline):
        self.sock.settimeout(self._left(deadline))
        data = self.sock.recv(MAX_ANSWER)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        self.buffer += data

    def _line(self, deadline):
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
                return line
            if len(self.buffer) > MAX_ANSWER:
                raise OSError("an answer line is too long")
            self._fill(deadline)

    def _exact(self, n, deadline):
        while len(self.buffer) < n:
            self._fill(deadline)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def exchange(self, request, deadline, context):
        """Send one request; return ``(status, headers, body)``.

        A kept-alive connection the server has since closed gets one retry on
        a fresh one.  On any failure the connection is closed.
        """
        try:
            for attempt in (0, 1):
                reused = self.sock is not None
                if not reused:
                    self._connect(deadline, context)
                try:
                    view = memoryview(request)
                    while view:
                        self.sock.settimeout(self._left(deadline))
                        view = view[self.sock.send(view):]
                    first = self._line(deadline)
                    break
                except TimeoutError:
                    raise
                except OSError:
                    self.close()
                    if attempt or not reused:
                        raise
            return self._answer(first, deadline)
        except BaseException:
            self.close()
            raise

    def _answer(self, first, deadline):
        while True:
            parts = first.split(None, 2)
            if (len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3
                    or not parts[1].isdigit()):
                raise OSError("the server's answer is not HTTP")
            status = int(parts[1])
            headers, size = {}, 0
            while True:
                line = self._line(deadline)
                size += len(line)
                if size > MAX_ANSWER:
                    raise OSError("the server's answer head is too long")
                if line in (b"\r\n", b"\n"):
                    break
                name, colon, value = line.decode("latin-1").partition(":")
                if not colon:
                    raise OSError("the server's answer has a broken header")
                name, value = name.strip().lower(), value.strip()
                if name == "content-length" and headers.get(name, value) != value:
                    raise OSError("the server's answer has two lengths")
                headers[name] = value
            if 100 <= status < 200:  # 100 Continue and the like: the answer follows
                first = self._line(deadline)
                continue
            break
        keep = (parts[0] == b"HTTP/1.1" and "close" not in headers.get("connection", "").lower())
        body = b""
        if status in (204, 304):
            pass
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = self._line(deadline).split(b";", 1)[0].strip()
                try:
                    size = int(line, 16)
                except ValueError:
                    raise OSError("the server's answer has a broken chunk") from None
                if size == 0:
                    while self._line(deadline) not in (b"\r\n", b"\n"):
                        pass
                    break
                if len(body) + size > MAX_ANSWER:
                    keep = False  # a big answer: not worth reading to keep the connection
                    break
                body += self._exact(size + 2, deadline)[:size]
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise OSError("the server's answer has a broken length") from None
            if 0 <= length <= MAX_ANSWER:
                body = self._exact(length, deadline)
            else:
                keep = False
        else:
            keep = False  # the body runs to the end of the connection: don't wait for it
        if not keep or self.buffer:
            self.close()
        return status, headers, body


def _error_text(body, secrets):
    """The server's ``{"error": ...}`` as a short printable line, tokens scrubbed."""
    try:
        text = json.loads(body.decode("utf-8"))["error"]
    except Exception:
        return ""
    if not isinstance(text, str):
        return ""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "...")
    text = "".join(c for c in text if c.isprintable())
    return text[:120]


class _Final:
    """The last state of a closed bar, waiting to be delivered."""

    __slots__ = ("bar", "payload", "hold_until", "thread", "done", "_pst_entry")

    def __init__(self, bar, payload, hold_until, thread):
        self.bar, self.payload = bar, payload
        self.hold_until, self.thread = hold_until, thread
        self.done = threading.Event()
        self._pst_entry = None


class _Sender:
    """The one background thread of a process that talks to the servers.

    Bars register here.  A heap says when each open bar is next due a look
    (every ``push_every`` seconds; the job's loop does nothing extra), and
    when each closed bar's final state may go; a round takes only what is
    due, so its work follows what changed, not how many bars are open.  The
    bars that changed, or are due a heartbeat, go as one batched POST per
    server.  Only the latest state of each bar is kept, so a slow or dead
    server never queues anything up.  Every failure is swallowed.
    """

    def __init__(self):
        # Re-entrant: a bar the job dropped can be collected, and closed by
        # tqdm's __del__, on whichever thread lets go of it last, this one too.
        self.lock = threading.RLock()
        self.wake = threading.Event()
        # id(bar) -> bar, the open bars of this process; weak, so a bar the job
        # drops unclosed is still collected (and closed by tqdm's __del__)
        self.bars = weakref.WeakValueDictionary()
        self.finals = {}    # id(bar) -> _Final, closed bars not yet delivered
        # Heaps of (when, seq, id(bar)): when a bar is next looked at, and
        # when a final state may go.  An entry counts only while its seq is
        # the object's _pst_entry.  Finals go as soon as they are due (a
        # close() may be waiting); looks only in rounds TICK_SECONDS apart.
        self.due = []
        self.due_finals = []
        self.seqs = itertools.count()
        self.conns = {}     # (scheme, host, port) -> _Connection
        self.targets = {}   # url -> what _target_of() made of it
        self.ssl_context = None
        self.send_lock = threading.Lock()  # one request on the wire at a time
        self.thread = None
        self.stopped = False
        self.closing = False  # the exit flush has begun: nothing is "for later" now
        self.failing = False  # the last send failed: don't make close() wait
        self.stalled = False  # ...and it failed by timing out: don't retry at exit
        self.quick = True     # the last answer came within CLOSE_WAIT
        self.inflight_since = None  # when the request on the wire was started
        self.sleep_until = 0.0      # when the sender thread means to wake next
        self.last_looks = -1e9      # when the bars were last looked at
        self.backoff_until = 0.0    # the sender itself rests (after an unexpected error)
        self.resting = {}           # route -> until when its server rests, after a failure
        self.last_flush = None      # (budget began, ended) of the last flush()

    # The job's side: cheap, never blocks but for close()'s bounded wait.

    def _schedule(self, when, key, item):
        """Make ``item`` (a bar or a _Final) due at ``when``; call with the lock held."""
        seq = next(self.seqs)
        item._pst_entry = seq
        heapq.heappush(self.due_finals if type(item) is _Final else self.due, (when, seq, key))

    def register(self, bar):
        first = time.monotonic()
        with self.lock:
            self.bars[id(bar)] = bar
            self._schedule(first, id(bar), bar)
            self._ensure_thread()
            nudge = self._late_for(first, bar)
        if nudge:
            self.wake.set()

    def _late_for(self, when, bar):
        """Would the sender, asleep, miss ``when`` by more than a round?

        Only then is it woken (bars made in a burst are first read together,
        in one batch), and not for a server that rests after a failure.
        Call with the lock held.
        """
        if self.sleep_until <= max(when, self.backoff_until) + TICK_SECONDS:
            return False
        try:
            return self.resting.get(bar._pst_route(), 0.0) <= when
        except Exception:
            return True

    def _answering(self, now):
        """The server answers fast: worth close() waiting CLOSE_WAIT for it."""
        since = self.inflight_since
        return (not self.failing and self.quick
                and (since is None or now - since < CLOSE_WAIT))

    def finish(self, bar, payload, hold=False):
        """Queue a closed bar's last state; wait for it, briefly, unless ``hold``.

        Only the process's last open bar waits: while others are open the
        process goes on, and this state goes in the sender's next round
        (TICK_SECONDS at most), so closing thousands of bars costs no round
        trip each.  The last one's wait covers them all, and so does the
        exit flush.
        """
        now = time.monotonic()
        final = _Final(bar, payload, now + EARLY_CLOSE_HOLD if hold else 0.0,
                       threading.get_ident())
        with self.lock:
            self.bars.pop(id(bar), None)
            if self.stopped:
                return
            self.finals[id(bar)] = final
            self._schedule(final.hold_until or now, id(bar), final)
            self._ensure_thread()
            nudge = self._late_for(final.hold_until or now, bar)
            last = not self.bars
        wait = (not hold and last and self._answering(now)
                and threading.current_thread() is not self.thread)
        if wait or nudge:
            self.wake.set()
        if wait:
            final.done.wait(min(CLOSE_WAIT, bar._pst_timeout))

    def mark_failed(self, exc, thread=None):
        """An uncaught exception: open bars (of ``thread``) end as ``error``."""
        summary = _summarize(exc)
        waits = []
        now = time.monotonic()
        with self.lock:
            for key, bar in list(self.bars.items()):
                if thread is not None and bar._pst_thread != thread:
                    continue
                bar._pst_closed = True
                del self.bars[key]
                try:
                    payload = bar._pst_payload("error", summary)
                except Exception:
                    continue
                final = self.finals[key] = _Final(bar, payload, 0.0, thread)
                self._schedule(now, key, final)
                waits.append(final)
            for key, final in self.finals.items():
                if final.hold_until and (thread is None or final.thread == thread):
                    final.payload["status"], final.payload["error"] = "error", summary
                    final.hold_until = 0.0
                    self._schedule(now, key, final)
                    waits.append(final)
            self._ensure_thread()
        self.wake.set()
        return waits

    def flush(self, waits, timeout=None):
        """Wait, bounded, until the given finals are delivered.

        Flushes back to back (a crash hook, then the exit) share one budget.
        """
        if not waits or threading.current_thread() is self.thread:
            return
        if timeout is None:
            timeout = max(final.bar._pst_timeout for final in waits)
        now = time.monotonic()
        began = now
        if self.last_flush is not None and now - self.last_flush[1] < 1.0:
            began = self.last_flush[0]
        deadline = began + timeout
        try:
            for final in waits:
                left = deadline - time.monotonic()
                if left <= 0 or self.failing:
                    break
                final.done.wait(left)
        finally:
            self.last_flush = (began, time.monotonic())

    def shutdown(self):
        """At interpreter exit: one last bounded delivery, then go quiet.

        The sender thread still does the sending (so nothing can overtake a
        final state); a server that just timed out is not waited for again,
        one that refused gets one more quick try.
        """
        with self.lock:
            self.closing = True
            now = time.monotonic()
            for key, bar in list(self.bars.items()):
                bar._pst_closed = True
                try:
                    self.finals[key] = _Final(bar, bar._pst_payload("close"), 0.0, None)
                except Exception:  # a half-torn bar: the others still go
                    continue
            self.bars.clear()
            waits = list(self.finals.values())
            for key, final in self.finals.items():
                final.hold_until = 0.0
                self._schedule(now, key, final)
            if waits and not self.stalled:
                self.failing, self.backoff_until = False, 0.0
                self.resting.clear()
                self._ensure_thread()
        if waits and not self.stalled:
            self.wake.set()
            self.flush(waits)
        self.stopped = True
        self.wake.set()

    # The sender thread's side.

    def _ensure_thread(self):
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="progressista-sender",
                                           daemon=True)
            self.thread.start()

    def _loop(self):
        while not self.stopped:
            self.wake.wait(self._next_wait())
            self.wake.clear()
            if not self.stopped:
                try:
                    self._tick()
                except Exception:  # never let one odd round end the reporting
                    log.debug("progressista sender tick failed", exc_info=True)
                    self.backoff_until = time.monotonic() + 1.0

    def _next_wait(self):
        now = time.monotonic()
        with self.lock:
            soonest = now + 1.0
            if self.due:  # rounds of looks TICK_SECONDS apart: what falls due meanwhile goes together
                soonest = min(soonest, max(self.due[0][0], self.last_looks + TICK_SECONDS))
            if self.due_finals:
                soonest = min(soonest, self.due_finals[0][0])
            wait = min(1.0, max(0.0, max(soonest, self.backoff_until) - now))
            self.sleep_until = now + wait
        return wait

    def _tick(self):
        """Collect the due states and send them, one batch per destination."""
        now = time.monotonic()
        if now < self.backoff_until:
            return
        looks, ready = [], []
        with self.lock:
            due, finals = self.due_finals, self.finals
            while due and due[0][0] <= now:
                _, seq, key = heapq.heappop(due)
                final = finals.get(key)
                if final is not None and final._pst_entry == seq:
                    ready.append(final)
            due, bars = self.due, self.bars
            if due and due[0][0] <= now and now - self.last_looks >= TICK_SECONDS:
                self.last_looks = now
                while due and due[0][0] <= now:
                    _, seq, key = heapq.heappop(due)
                    bar = bars.get(key)
                    if bar is not None and bar._pst_entry == seq:
                        looks.append(bar)
            for bar in looks:
                # A bar idle for a while is looked at once a second at most:
                # thousands of idle bars must not cost the job its CPU.
                every = bar._pst_every
                if now - bar._pst_changed_at > IDLE_SECONDS and every < IDLE_LOOK:
                    every = IDLE_LOOK
                self._schedule(now + every, id(bar), bar)
        groups = {}
        for bar in looks:
            try:  # a half-torn or odd bar is skipped, never the round
                sig = (bar.n, bar.total, bar.desc, bar.postfix, bar.unit)
                if sig == bar._pst_sig:
                    if now - bar._pst_sent_at < HEARTBEAT_SECONDS:
                        continue
                else:
                    bar._pst_changed_at = now
                payload = bar._pst_payload(None)
                if bar._pst_sig is None:
                    payload["status"] = "start"
                groups.setdefault(bar._pst_route(), []).append((bar, payload, sig, None))
            except Exception:
                continue
        for final in ready:
            try:
                groups.setdefault(final.bar._pst_route(), []).append(
                    (final.bar, final.payload, None, final))
            except Exception:  # can never be sent: don't let it wait for ever
                self._delivered([(final.bar, None, None, final)], now)
        for route, items in groups.items():
            until = self.resting.get(route, 0.0)
            if until > now:  # that server failed: it rests, the others don't
                self._later(items, until)
                continue
            for start in range(0, len(items), MAX_BATCH):
                if not self._send(items[start:start + MAX_BATCH], now, route):
                    self._later(items[start + MAX_BATCH:], self.resting.get(route))
                    break

    def _send(self, items, now, route):
        """Send one batch; False when the server could not be reached."""
        owner = items[0][0]
        payloads = [item[1] for item in items]
        started = self.inflight_since = time.monotonic()
        try:
            owner._post(payloads[0] if len(payloads) == 1 else payloads)
        except (_Refused, _Busy) as exc:
            self.inflight_since = None
            self._answered(started, route)
            if len(items) > 1:
                # A batch is taken whole or not at all: halve it until the
                # odd update is alone, so one bar can't hold back the others.
                half = len(items) // 2
                if not self._send(items[:half], now, route):
                    self._later(items[half:], self.resting.get(route))
                    return False
                return self._send(items[half:], now, route)
            if isinstance(exc, _Busy) and not self.closing:
                self._later(items, time.monotonic() + exc.retry_after)  # full: try later
            else:
                self._delivered(items, now)  # bad input: sending it again won't help
            return True
        except BaseException as exc:  # whatever _post raises is swallowed, by contract
            self.inflight_since = None
            wrong = isinstance(exc, _WrongSetup)
            if wrong:
                _say(str(exc), key="setup")
            self.failing = True
            self.stalled = time.monotonic() - started >= owner._pst_timeout * 0.5
            until = self.resting[route] = time.monotonic() + (
                5.0 if wrong else min(owner._pst_every * 4 + 0.5, 5.0))
            for bar, _, _, final in items:
                bar._pst_sent_at = now
            self._later(items, until)  # close() stops waiting, retries go on
            return False
        self.inflight_since = None
        self._answered(started, route)
        self._delivered(items, now)
        return True

    def _answered(self, started, route):
        self.failing = self.stalled = False
        self.resting.pop(route, None)
        self.quick = time.monotonic() - started <= CLOSE_WAIT

    def _later(self, items, when):
        """Send these again: finals at ``when`` (None: at once), open bars
        at ``when``, or at their next look when ``when`` is None."""
        if not items:
            return
        with self.lock:
            for bar, _, _, final in items:
                if final is not None:
                    if when is not None:
                        final.done.set()  # close() stops waiting; it goes later
                    if self.finals.get(id(bar)) is final:
                        self._schedule(when or 0.0, id(bar), final)
                elif when is not None and self.bars.get(id(bar)) is bar:
                    self._schedule(when, id(bar), bar)

    def _delivered(self, items, now):
        with self.lock:
            for bar, _, sig, final in items:
                bar._pst_sent_at = now
                if final is None:
                    bar._pst_sig = sig
                elif self.finals.get(id(bar)) is final:
                    del self.finals[id(bar)]
        for _, _, _, final in items:
            if final is not None:
                final.done.set()

    def _context(self):
        if self.ssl_context is None:
            try:
                self.ssl_context = _ssl_context()
            except Exception as exc:
                raise _WrongSetup("can't use the CA bundle PROGRESSISTA_CA_BUNDLE=%s (%s); "
                                  "bars are not reported" % (
                                      os.environ.get("PROGRESSISTA_CA_BUNDLE"),
                                      _summarize(exc))) from None
        return self.ssl_context

    def post(self, url, payload, headers, timeout):
        """One HTTP POST of JSON over a kept-alive connection; raises on failure.

        The whole exchange (connect, TLS, send, answer) ends by ``timeout``.
        """
        deadline = time.monotonic() + timeout
        target = self.targets.get(url)
        if target is None:
            if len(self.targets) > 64:
                self.targets.clear()
            target = self.targets[url] = _target_of(url)
        scheme, host, port, path, netloc = target
        body = _dumps(payload).encode()
        fields = {"host": ("Host", netloc),
                  "content-type": ("Content-Type", "application/json")}
        for name, value in headers.items():
            fields[name.lower()] = (name, value)
        head = ["POST %s HTTP/1.1" % path, "Content-Length: %d" % len(body)]
        head.extend("%s: %s" % pair for pair in fields.values())
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        if not self.send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("another send is still waiting on the server")
        try:
            key = (scheme, host, port)
            conn = self.conns.get(key)
            if conn is None:
                conn = self.conns[key] = _Connection(scheme, host, port)
            try:
                status, answer_headers, answer = conn.exchange(request, deadline, self._context)
            except OSError as exc:
                import ssl
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise _WrongSetup(
                        "the certificate of %s could not be verified (%s); for a private CA "
                        "set PROGRESSISTA_CA_BUNDLE; bars are not reported"
                        % (_shown_url(url), exc.verify_message or exc)) from None
                if isinstance(exc, ssl.SSLError) and not isinstance(
                        exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
                    raise _WrongSetup("TLS with %s failed (%s); bars are not reported"
                                      % (_shown_url(url), exc.reason or exc)) from None
                raise
        finally:
            self.send_lock.release()
        if status < 300:
            return
        server = "%s://%s" % (scheme, netloc)
        if status in _Refused.STATUSES:
            raise _Refused("HTTP %d from %s" % (status, server))
        if status == 429:
            try:
                retry = min(60.0, max(0.5, float(answer_headers.get("retry-after", ""))))
            except ValueError:
                retry = BUSY_RETRY
            raise _Busy("HTTP 429 from %s" % server, retry)
        if status in _WrongSetup.STATUSES:
            sent_token = any(name.lower() == "authorization" for name in headers)
            why = _error_text(answer, list(headers.values()))
            if status == 401 and sent_token:
                text = "the server at %s refused the token (401)" % server
            elif status == 401:
                text = ("the server at %s wants a token (401): set PROGRESSISTA_API_TOKEN"
                        % server)
            elif status == 403:
                text = "the server at %s refused the request (403%s)" % (
                    server, ": " + why if why else "")
            else:
                text = "the server at %s has no %s (404)" % (server, _shown_url(path))
            raise _WrongSetup(text + "; bars are not reported")
        raise OSError("HTTP %d from %s" % (status, server))


_sender = None
_sender_lock = threading.Lock()


def _get_sender():
    """The process's sender, made on first use with its exit and fork hooks."""
    global _sender
    if _sender is None:
        with _sender_lock:
            if _sender is None:
                _install_process_hooks()
                _sender = _Sender()
    return _sender


_hooks_installed = False


def _install_process_hooks():
    """Exit flush, fork reset and crash reporting; done once, on first bar."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)
    previous_hook = sys.excepthook

    def excepthook(exc_type, exc, tb):
        global _crash_seen
        _crash_seen = True
        waits = _report_crash(exc, None)
        previous_hook(exc_type, exc, tb)
        if waits:
            _sender.flush(waits)

    sys.excepthook = excepthook
    previous_thread_hook = threading.excepthook

    def thread_excepthook(args):
        waits = _report_crash(args.exc_value, args.thread.ident if args.thread else None)
        previous_thread_hook(args)
        if waits:
            _sender.flush(waits)

    threading.excepthook = thread_excepthook


def _report_crash(exc, thread):
    if _sender is None or exc is None or isinstance(exc, SystemExit):
        return []
    try:
        return _sender.mark_failed(exc, thread)
    except Exception:
        return []


_crash_seen = False  # our sys.excepthook ran


def _at_exit():
    if _sender is not None:
        try:
            # The job may have replaced sys.excepthook (rich, IPython...); the
            # interpreter still leaves a fatal exception in sys.last_value.
            last = getattr(sys, "last_value", None)
            if last is not None and not _crash_seen:
                _report_crash(last, None)
            _sender.shutdown()
        except Exception:
            pass


def _after_fork():
    """A forked child starts with no sender: the parent's bars stay the parent's.

    What the parent already said on stderr stays said.
    """
    global _sender, _sender_lock, _said_lock
    _sender_lock = threading.Lock()
    _said_lock = threading.Lock()
    _sender = None


class _NullFile:
    """Where the local display goes when a batch job has no terminal."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


_install_defaults = {}  # what patch.install() was given, under explicit keywords
_bar_numbers = itertools.count(1)  # default task ids; next() is atomic


class _RemoteMixin:
    """What ``RemoteTqdm`` adds to a tqdm class: the remote half.

    Nothing here runs per iteration.  The sender thread reads ``n``, ``total``
    and the rest from the bar on its own schedule; the job only pays at
    construction and at ``close()``.
    """

    _pst_closed = True  # until __init__ succeeds, close() is local only
    _pst_entry = None   # the sender's schedule entry that counts for this bar
    _pst_changed_at = 0.0  # when the sender last saw the bar change (monotonic)

    def __init__(self, *args, server_url=None, task_id=None, push_every=None,
                 request_timeout=None, meta=None, headers=None, **kwargs):
        if kwargs.get("disable", False) is None:
            target = kwargs.get("file") or sys.stderr
            try:
                tty = target.isatty()
            except Exception:
                tty = False
            if not tty:  # a batch job: no local bar, but still a remote one
                kwargs["disable"], kwargs["file"] = False, _NullFile()
        super().__init__(*args, **kwargs)
        if self.disable:
            return
        try:
            self._pst_settle(server_url, task_id, push_every, request_timeout, meta, headers)
            self._pst_closed = False
            _get_sender().register(self)
        except Exception as exc:  # a bad argument: this bar stays local, the job goes on
            self._pst_closed = True
            _say("%s; this bar is not reported" % (
                exc if isinstance(exc, _BadSetting) else _summarize(exc)))

    def _pst_settle(self, server_url, task_id, push_every, request_timeout, meta, headers):
        """Check the remote half's settings and keep them; _BadSetting says what's wrong."""
        defaults = _install_defaults
        url = server_url or defaults.get("server_url") or os.environ.get(
            "PROGRESSISTA_SERVER_URL") or DEFAULT_SERVER_URL
        if not isinstance(url, str):
            raise _BadSetting("server_url must be a string, not %s" % type(url).__name__)
        try:
            parts = urllib.parse.urlsplit(url)
            if parts.path in ("", "/"):
                url = urllib.parse.urlunsplit(parts._replace(path="/progress"))
            _target_of(url)
        except ValueError as exc:
            raise _BadSetting("server_url %r can't be used (%s)" % (_shown_url(url), exc)) from None
        self._pst_url = url
        if task_id is None or (isinstance(task_id, str) and not task_id):
            task_id = self._pst_default_id()
        self._pst_id = str(task_id)[:256]
        try:
            self._pst_id.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadSetting("task_id %r is not valid Unicode text" % self._pst_id[:40]) from None
        every, name = push_every, "push_every"
        if every is None:
            every = defaults.get("push_every")
        if every is None:
            every, name = _env_float("PROGRESSISTA_PUSH_INTERVAL", 0.25), \
                "PROGRESSISTA_PUSH_INTERVAL"
        self._pst_every = max(0.0, _seconds(name, every))
        timeout, name = request_timeout, "request_timeout"
        if timeout is None:
            timeout = defaults.get("request_timeout")
        if timeout is None:
            timeout, name = _env_float("PROGRESSISTA_REQUEST_TIMEOUT", 2.0), \
                "PROGRESSISTA_REQUEST_TIMEOUT"
        timeout = _seconds(name, timeout)
        if not timeout > 0:
            raise _BadSetting("%s must be more than 0 seconds, not %r" % (name, timeout))
        self._pst_timeout = min(timeout, 3600.0)  # what sockets and waits can take
        all_meta = dict(defaults.get("meta") or {})
        if isinstance(meta, dict):
            all_meta.update(meta)
        try:
            text = json.dumps(all_meta, default=_meta_text, allow_nan=False) if all_meta else ""
            self._pst_meta = json.loads(text) if 0 < len(text) <= 16384 else None
        except (TypeError, ValueError, RecursionError):  # cycles, NaN, too big: drop
            self._pst_meta = None
        token = os.environ.get("PROGRESSISTA_API_TOKEN")
        self._pst_headers = _checked_headers(
            {"Authorization": "Bearer " + token} if token else None,
            defaults.get("headers"), headers)
        self._pst_header_key = tuple(sorted(self._pst_headers.items()))
        self._pst_error = None
        self._pst_sig = None
        self._pst_sent_at = -1e9
        self._pst_changed_at = time.monotonic()
        self._pst_thread = threading.get_ident()
        self._pst_pid = os.getpid()

    def _pst_default_id(self):
        """The task id of a bar made without one: unique per bar, named for its host."""
        # A counter, not id(self): a bar made right after another is freed
        # can get its address, and two bars must never share a task.
        return "%s:%d-%d-%d" % (_HOST, time.time() * 1000, os.getpid(), next(_bar_numbers))

    def _pst_route(self):
        """Bars that share this key share one batched request."""
        return (type(self)._post, self._pst_url, self._pst_header_key)

    def _pst_payload(self, status, error=None):
        """The bar's state as one update object; pure but for reading the bar."""
        start = getattr(self, "start_t", None)
        elapsed = None
        if start is not None:
            end = getattr(self, "_pst_end_t", None)
            elapsed = (end if end is not None else self._time()) - start
        rate = None
        try:
            dt = self._ema_dt()
            if dt:
                rate = self._ema_dn() / dt
        except Exception:
            pass
        if rate is None and elapsed:
            rate = (self.n - getattr(self, "initial", 0)) / elapsed
        desc, postfix, total = self.desc, self.postfix, _finite(self.total)
        # Within the server's limits, so one odd bar can't get a batch refused.
        return {
            "task_id": self._pst_id,
            "n": max(_finite(self.n) or 0, 0),
            "total": total if total is None or total >= 0 else None,
            "desc": str(desc)[:1024] if desc else None,
            "unit": str(self.unit)[:64],
            "status": status or "update",
            "rate": _finite(rate),
            "elapsed": _finite(elapsed),
            "error": error[:4096] if error else None,
            "meta": self._pst_meta,
            "postfix": str(postfix)[:1024] if postfix else None,
            "host": _HOST,
            "pid": self._pst_pid,
            "timestamp": time.time(),
        }

    def _post(self, payload):
        """Perform one HTTP send of ``payload`` (one update or a list of them).

        Called on the sender thread.  Override to observe or redirect sends;
        whatever it raises is swallowed and the state is sent again later.
        """
        _get_sender().post(self._pst_url, payload, self._pst_headers, self._pst_timeout)

    def close(self):
        if self._pst_closed or getattr(self, "_pst_pid", None) != os.getpid():
            return super().close()
        self._pst_closed = True
        # A for loop abandoned early closes us from GeneratorExit: a break, or an
        # exception on its way up.  Hold the final state briefly so the crash
        # hooks can turn it into an error before anything says "completed".
        early = isinstance(sys.exc_info()[1], GeneratorExit)
        try:
            super().close()
        finally:
            try:
                self._pst_end_t = self._time()
                status = "error" if self._pst_error else "close"
                _get_sender().finish(self, self._pst_payload(status, self._pst_error),
                                     hold=early)
            except Exception:
                pass

    def __exit__(self, exc_type, exc_value, traceback):
        if (exc_value is not None and not self._pst_closed
                and not (isinstance(exc_value, SystemExit) and exc_value.code in (0, None))):
            self._pst_error = _summarize(exc_value)
        return super().__exit__(exc_type, exc_value, traceback)


_remote_classes = {}


def _remote_class(base):
    """The remote twin of a tqdm class (cached, so patching twice is stable)."""
    if issubclass(base, _RemoteMixin):  # already remote: tqdm is patched by install()
        return base
    cls = _remote_classes.get(base)
    if cls is None:
        name = "RemoteTqdm" if base.__module__ == "tqdm.std" else "Remote" + base.__name__
        # Named where pickle finds it (see __getattr__), and keeping the base's
        # docstring after ours: tqdm's own CLI reads its options from it.
        cls = type(name, (_RemoteMixin, base), {
            "__module__": "progressista" if __name__ == "__main__" else __name__,
            "__doc__": RemoteTqdm_doc + "\n" + (base.__doc__ or ""), "__qualname__": name})
        _remote_classes[base] = cls
    return cls


RemoteTqdm_doc = """A drop-in ``tqdm`` that also shows the bar on a Progressista server.

Same arguments and local display as ``tqdm``; extra keywords, each with an
environment default: ``server_url`` ($PROGRESSISTA_SERVER_URL), ``task_id``,
``push_every`` ($PROGRESSISTA_PUSH_INTERVAL, 0.25 s), ``request_timeout``
($PROGRESSISTA_REQUEST_TIMEOUT, 2 s: the deadline of one whole send), ``meta``
(a JSON-able dict) and ``headers`` (``Authorization: Bearer
$PROGRESSISTA_API_TOKEN`` when set).  An argument the remote half can't use
leaves a plain local bar and one line on stderr; it never raises.
"""


def _import_tqdm():
    try:
        import tqdm.std
    except ImportError:
        raise ImportError("the Progressista client needs tqdm: pip install 'tqdm>=4.66'") from None
    return tqdm.std


def __getattr__(name):
    """Make ``RemoteTqdm`` on first use, so the server never imports tqdm."""
    if name == "RemoteTqdm":
        cls = _remote_class(_import_tqdm().tqdm)
        globals()["RemoteTqdm"] = cls
        return cls
    if name.startswith("Remote") and name.isidentifier():
        # Another process pickled a remote class by name (process_map with
        # spawn pickles ``tqdm_class.set_lock``): make the same twin here.
        import importlib
        for cls in list(_remote_classes.values()):
            if cls.__name__ == name:
                return cls
        _import_tqdm()
        for module_name in ("tqdm.asyncio", "tqdm.std", "tqdm.notebook"):
            try:
                module = importlib.import_module(module_name)
            except Exception:
                continue
            for base in list(vars(module).values()):
                if (isinstance(base, type) and base.__module__.startswith("tqdm")
                        and not issubclass(base, _RemoteMixin)
                        and "Remote" + base.__name__ == name):
                    return _remote_class(base)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


# -- patch -------------------------------------------------------------------

_patched = []  # (owner, attribute, original), to undo in uninstall()

# tqdm modules whose bar classes and trange helpers install() replaces
_PATCH_MODULES = ("tqdm", "tqdm.std", "tqdm.auto", "tqdm.autonotebook",
                  "tqdm.asyncio", "tqdm.notebook")
_PATCH_CLASS_NAMES = ("tqdm", "tqdm_asyncio", "tqdm_notebook")
_PATCH_RANGE_NAMES = ("trange", "tarange", "tnrange")


def _remote_trange(cls):
    def trange(*args, **kwargs):
        """``tqdm.trange``, remote: a RemoteTqdm over ``range(*args)``."""
        return cls(range(*args), **kwargs)
    trange._pst_class = cls
    return trange


def install(server_url=None, **defaults):
    """Make every ``tqdm`` bar made from now on a remote one.

    Replaces the bar classes of ``tqdm``, ``tqdm.std``, ``tqdm.auto``,
    ``tqdm.autonotebook``, ``tqdm.asyncio`` and ``tqdm.notebook`` (and their
    ``trange`` helpers), then every module attribute anywhere that still
    points at one of the originals (``from tqdm import tqdm`` done earlier).
    ``defaults`` are ``RemoteTqdm`` keywords (``push_every``, ``meta``,
    ``headers``, ``request_timeout``, ``token``) for bars that don't set them.
    Call it from ``sitecustomize.py``; ``uninstall()`` undoes it.
    """
    import importlib
    _import_tqdm()
    uninstall()
    token = defaults.pop("token", None)
    if token:
        defaults["headers"] = dict(defaults.get("headers") or {},
                                   Authorization="Bearer " + token)
    _install_defaults.clear()
    _install_defaults.update(defaults, server_url=server_url)
    replacements = {}  # id(original) -> (original, replacement)
    for module_name in _PATCH_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # tqdm.notebook without IPython and the like
            continue
        for name in _PATCH_CLASS_NAMES:
            original = module.__dict__.get(name)
            if isinstance(original, type) and not issubclass(original, _RemoteMixin):
                replacements[id(original)] = (original, _remote_class(original))
        for name in _PATCH_RANGE_NAMES:
            original = module.__dict__.get(name)
            if callable(original) and not hasattr(original, "_pst_class"):
                cls_name = {"trange": "tqdm", "tarange": "tqdm_asyncio",
                            "tnrange": "tqdm_notebook"}[name]
                base = module.__dict__.get(cls_name)
                if isinstance(base, type) and id(base) in replacements:
                    replacements[id(original)] = (
                        original, _remote_trange(replacements[id(base)][1]))
    this = sys.modules.get(__name__)
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if module is this or not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            pair = replacements.get(id(value))
            if pair is not None and pair[0] is value:
                try:
                    setattr(module, name, pair[1])
                except Exception:  # a read-only module: leave it alone
                    continue
                _patched.append((module, name, value))
        if str(getattr(module, "__name__", "")).startswith("tqdm."):
            # tqdm.contrib's helpers (process_map, thread_map, tenumerate...)
            # bind ``tqdm_class=tqdm_auto`` as a default when defined: swap it.
            for value in list(namespace.values()):
                for attr in ("__defaults__", "__kwdefaults__"):
                    old = getattr(value, attr, None) if callable(value) else None
                    if not isinstance(old, (tuple, dict)):
                        continue
                    items = old.items() if isinstance(old, dict) else enumerate(old)
                    swap = {k: replacements[id(v)][1] for k, v in items
                            if id(v) in replacements and replacements[id(v)][0] is v}
                    if swap:
                        new = dict(old) if isinstance(old, dict) else list(old)
                        for k, v in swap.items():
                            new[k] = v
                        try:
                            setattr(value, attr, new if isinstance(old, dict) else tuple(new))
                        except Exception:
                            continue
                        _patched.append((value, attr, old))


def uninstall():
    """Undo ``install()``: every patched name gets its original back."""
    while _patched:
        module, name, original = _patched.pop()
        try:
            setattr(module, name, original)
        except Exception:
            pass
    _install_defaults.clear()


def run(target, args=(), module=False, **options):
    """Run a script (or ``module=True``: a module) as ``__main__``, every bar remote.

    ``sys.argv`` is what the target would see; returns its exit status.  An
    uncaught exception prints its traceback, marks the open bars ``error``
    and returns 1.  ``options`` go to ``install()``.
    """
    import runpy
    import traceback
    install(**options)
    sys.argv = [target] + list(args)  # for a module, runpy swaps in its path
    sys.path.insert(0, os.getcwd() if module else os.path.dirname(os.path.abspath(target)))
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code not in (None, 0):
            _flush_crash(exc)
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException as exc:
        waits = _report_crash(exc, None)
        tb = exc.__traceback__
        # Print the traceback as Python would have: from the target's frames.
        ours = (os.path.abspath(__file__), os.path.abspath(runpy.__file__))
        while tb is not None and (tb.tb_frame.f_code.co_filename.startswith("<frozen")
                                  or os.path.abspath(tb.tb_frame.f_code.co_filename) in ours):
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        if waits:
            _sender.flush(waits)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    return 0


def _flush_crash(exc):
    """``sys.exit(1)`` from the target: its open bars did not complete."""
    waits = _sender.mark_failed(exc) if _sender is not None else []
    if waits:
        _sender.flush(waits)


# -- store -------------------------------------------------------------------

class BadRequest(ValueError):
    """An input the server refuses, with the HTTP status to answer."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _reject_constant(name):
    raise BadRequest("invalid JSON: %s is not allowed" % name)


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json(body):
    """Bytes to JSON, strictly: UTF-8, no NaN/Infinity, bounded nesting."""
    try:
        return _decoder.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest("invalid JSON: %s" % exc) from None


MAX_ID = 256
MAX_META = 16384
_STR_LIMITS = {"task_id": MAX_ID, "desc": 1024, "unit": 64, "error": 4096,
               "host": 256, "postfix": 1024}
_NUMBER_FIELDS = ("n", "total", "rate", "elapsed", "timestamp")
_INCOMING_STATUS = {"start": "active", "update": "active", "close": "close", "error": "error"}
_ENDING_OR_START = ("start", "close", "error")
_PLAIN_FIELDS = ("desc", "unit", "rate", "elapsed", "error", "host", "pid", "postfix", "meta")


def _is_number(value):
    kind = type(value)
    if kind is int:  # JSON allows any size; beyond float64 nothing downstream can use it
        return -sys.float_info.max <= value <= sys.float_info.max
    return kind is float and math.isfinite(value)


def check_update(update, current=None):
    """Refuse an update object that is not what the protocol says.

    ``current`` is the stored task, if any: an unchanged ``meta`` is not
    measured again (clients send it every time).
    """
    if type(update) is not dict:
        raise BadRequest("an update must be a JSON object")
    task_id = update.get("task_id")
    if type(task_id) is not str or not task_id:
        raise BadRequest("task_id is required and must be a non-empty string")
    for key, value in update.items():
        if key in _STR_LIMITS:
            if value is None and key != "task_id":
                continue
            if type(value) is not str:
                raise BadRequest("%s must be a string" % key)
            if len(value) > _STR_LIMITS[key]:
                raise BadRequest("%s is longer than %d characters" % (key, _STR_LIMITS[key]))
        elif key in _NUMBER_FIELDS:
            if value is None and key != "n":
                continue
            if not _is_number(value):
                raise BadRequest("%s must be a finite number" % key)
            if key in ("n", "total") and value < 0:
                raise BadRequest("%s must not be negative" % key)
        elif key == "status":
            if type(value) is not str or value not in _INCOMING_STATUS:
                raise BadRequest("status must be one of start, update, close, error")
        elif key == "meta":
            if value is None or (current is not None and value == current["meta"]):
                continue
            if type(value) is not dict:
                raise BadRequest("meta must be an object")
            if len(_dumps(value)) > MAX_META:
                raise BadRequest("meta is larger than %d bytes" % MAX_META)
        elif key == "pid":
            if value is not None and type(value) is not int:
                raise BadRequest("pid must be an integer")


def _new_task(task_id, now):
    return {"task_id": task_id, "desc": None, "n": 0, "total": None, "unit": None,
            "status": "active", "rate": None, "elapsed": None, "error": None,
            "meta": None, "host": None, "pid": None, "postfix": None,
            "created_at": now, "updated_at": now, "seen_at": now}


JSON_CHUNK = 1000  # tasks per piece when a big task map is streamed


def _json_pieces(head, tasks, tail):
    """``head``, the tasks as JSON object members, ``tail``: in pieces, as bytes.

    The last piece is exactly ``tail``.  Task dicts are read without the
    store lock (their keys never change, so encoding can't fail; a task
    changed meanwhile is dirty and goes out again with the next delta).
    """
    items = iter(tasks.items())
    text, first = head, True
    while True:
        batch = dict(itertools.islice(items, JSON_CHUNK))
        if not batch:
            break
        text += ("" if first else ",") + _dumps(batch)[1:-1]
        yield text.encode()
        text, first = "", False
    if text:
        yield text.encode()
    yield tail.encode()


class TaskStore:
    """All tasks, in memory, with the bookkeeping that keeps updates O(1).

    Active tasks sit in ``_live`` ordered by last progress, ended ones in
    ``_ended`` ordered by end time, stale ones in ``_stale``: the stale sweep,
    retention and the task cap only ever look at the front of a queue.  Each
    change is recorded in ``dirty``/``removed`` for the WebSocket hub (and in
    ``db_dirty``/``db_removed`` for the database), never copied or encoded
    here.  ``clock`` is injectable for tests.
    """

    def __init__(self, stale_seconds=0.0, retention_seconds=86400.0, max_tasks=100000,
                 clock=time.time):
        self.stale_seconds = float(stale_seconds or 0)
        self.retention_seconds = float(retention_seconds or 0)
        self.max_tasks = int(max_tasks)
        self.clock = clock
        self.lock = threading.Lock()
        self.changed = threading.Event()  # set when dirty/removed gain something
        self.tasks = {}
        self._live = collections.OrderedDict()
        self._stale = collections.OrderedDict()
        self._ended = collections.OrderedDict()
        self.dirty, self.removed = set(), set()
        self.persist = False  # set by the database: track db_dirty/db_removed too
        self.db_dirty, self.db_removed = set(), set()
        self.updates_received = 0
        self.updates_rejected = 0

    def __len__(self):
        return len(self.tasks)

    # Ingest.

    def ingest(self, data):
        """Apply one update object or a list of them: all, or none if any is bad."""
        updates = data if type(data) is list else [data]
        with self.lock:
            try:
                tasks = self.tasks
                for update in updates:
                    task_id = update.get("task_id") if type(update) is dict else None
                    check_update(update, tasks.get(task_id) if type(task_id) is str else None)
                new_ids = {u["task_id"] for u in updates if u["task_id"] not in tasks}
                if new_ids:
                    self._make_room(len(new_ids), {u["task_id"] for u in updates})
                now = self.clock()
                for update in updates:
                    self._apply(update, now)
                self.updates_received += len(updates)
            except BadRequest:
                self.updates_rejected += len(updates)
                raise
        if not self.changed.is_set():
            self.changed.set()
        return len(updates)

    def _apply(self, update, now):
        task_id = update["task_id"]
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = _new_task(task_id, now)
            self._live[task_id] = None
            self.removed.discard(task_id)  # removed and made again: a delta says it once
            progressed = True
        elif (task["status"] == "close" or task["status"] == "error") \
                and update.get("status") not in _ENDING_OR_START:
            # An ended task takes only a new start (a rerun) or a new ending: a
            # late update that lost a race with its own close changes nothing.
            task["seen_at"] = now
            self.dirty.add(task_id)
            return
        else:
            progressed = False
        for key in _PLAIN_FIELDS:
            if key in update:
                task[key] = update[key]
        if "n" in update and update["n"] != task["n"]:
            task["n"] = update["n"]
            progressed = True
        if "total" in update and update["total"] != task["total"]:
            task["total"] = update["total"]
            progressed = True
        old = task["status"]
        wanted = _INCOMING_STATUS.get(update.get("status"))
        if wanted is None or wanted == "active":
            if old == "stale" and progressed:
                del self._stale[task_id]
                self._live[task_id] = None
                task["status"] = "active"
            elif wanted and (old == "close" or old == "error"):
                del self._ended[task_id]
                self._live[task_id] = None
                task["status"] = "active"
                if "error" not in update:
                    task["error"] = None
                progressed = True
            elif progressed and old == "active":
                self._live.move_to_end(task_id)
        elif wanted != old:  # close or error
            if old == "active":
                del self._live[task_id]
            elif old == "stale":
                del self._stale[task_id]
            else:
                del self._ended[task_id]
            self._ended[task_id] = None
            task["status"] = wanted
            if wanted == "close" and "error" not in update:
                task["error"] = None
            progressed = True
        if progressed:
            task["updated_at"] = now
        task["seen_at"] = now
        self.dirty.add(task_id)
        if self.persist:
            self.db_dirty.add(task_id)

    def _make_room(self, count, keep=()):
        """Evict for ``count`` new tasks: oldest ended first, then oldest stale.

        Tasks in ``keep`` (the ones the same batch updates) are never evicted.
        """
        excess = len(self.tasks) + count - self.max_tasks
        if excess <= 0:
            return
        victims = []
        for queue in (self._ended, self._stale):
            for task_id in queue:
                if len(victims) == excess:
                    break
                if task_id not in keep:
                    victims.append(task_id)
        if len(victims) < excess:
            raise BadRequest("task limit of %d reached, all of them active" % self.max_tasks, 429)
        for victim in victims:
            self._remove(victim)

    def _remove(self, task_id):
        task = self.tasks.pop(task_id)
        {"active": self._live, "stale": self._stale}.get(task["status"], self._ended).pop(
            task_id, None)
        self.dirty.discard(task_id)
        self.removed.add(task_id)
        if self.persist:
            self.db_dirty.discard(task_id)
            self.db_removed.add(task_id)

    # Housekeeping.

    def sweep(self, now=None):
        """Turn quiet tasks stale and forget ended ones past retention."""
        now = self.clock() if now is None else now
        changed = False
        with self.lock:
            if self.stale_seconds > 0:
                limit = now - self.stale_seconds
                while self._live:
                    task_id = next(iter(self._live))
                    task = self.tasks[task_id]
                    if task["updated_at"] > limit:
                        break
                    del self._live[task_id]
                    self._stale[task_id] = None
                    task["status"] = "stale"
                    self.dirty.add(task_id)
                    if self.persist:
                        self.db_dirty.add(task_id)
                    changed = True
            if self.retention_seconds > 0:
                limit = now - self.retention_seconds
                while self._ended:
                    task_id = next(iter(self._ended))
                    if self.tasks[task_id]["updated_at"] > limit:
                        break
                    self._remove(task_id)
                    changed = True
        if changed:
            self.changed.set()

    def load(self, tasks):
        """Take tasks restored from the database, then apply the stale and retention rules.

        A stored ``stale`` comes back ``active`` and is judged again by this
        server's ``stale_seconds``, as a live task would be.
        """
        with self.lock:
            for task in sorted(tasks, key=lambda t: t["updated_at"]):
                task_id = task["task_id"]
                if task["status"] == "stale":
                    task["status"] = "active"
                self.tasks[task_id] = task
                {"active": self._live}.get(task["status"], self._ended)[task_id] = None
        self.sweep()
        with self.lock:  # a smaller --max-tasks than the file's: oldest ended go first
            while len(self.tasks) > self.max_tasks and (self._ended or self._stale):
                self._remove(next(iter(self._ended or self._stale)))

    # Reading and deleting.

    def get_json(self, task_id):
        with self.lock:
            task = self.tasks.get(task_id)
            return None if task is None else _dumps(task)

    def select(self, statuses=None):
        """A copy of the index (of tasks in ``statuses``), to encode outside the lock."""
        with self.lock:
            if statuses is None:
                return dict(self.tasks)
            return {k: t for k, t in self.tasks.items() if t["status"] in statuses}

    def delete(self, task_id):
        with self.lock:
            if task_id not in self.tasks:
                return False
            self._remove(task_id)
        self.changed.set()
        return True

    def delete_where(self, statuses, older_than=None):
        """Remove every task in ``statuses`` with no progress for ``older_than`` s."""
        with self.lock:
            limit = None if older_than is None else self.clock() - older_than
            victims = [k for k, t in self.tasks.items() if t["status"] in statuses
                       and (limit is None or t["updated_at"] <= limit)]
            for task_id in victims:
                self._remove(task_id)
        if victims:
            self.changed.set()
        return victims

    def counts(self):
        with self.lock:
            return {"active": len(self._live), "stale": len(self._stale),
                    "close": sum(1 for k in self._ended if self.tasks[k]["status"] == "close"),
                    "error": sum(1 for k in self._ended if self.tasks[k]["status"] == "error")}

    def take_changes(self):
        """Hand the hub what changed since last time (call with ``lock`` held)."""
        dirty, removed = self.dirty, self.removed
        self.dirty, self.removed = set(), set()
        return {k: self.tasks[k] for k in dirty}, list(removed)


SCHEMA_VERSION = 1


class DatabaseError(Exception):
    """The ``--db`` file can't be used; the message says why and what to do."""


class Database:
    """Write-behind persistence of a ``TaskStore`` in SQLite (WAL).

    Requests never touch the database: they mark tasks dirty, and a thread
    writes the dirty ones in one transaction every ``interval`` seconds and
    at shutdown.  A ``kill -9`` so loses at most the last interval; a clean
    stop loses nothing.  The file is held in exclusive locking mode, so a
    second server on the same file is refused instead of interleaving.
    """

    def __init__(self, path, store, interval=0.5):
        self.path, self.store, self.interval = path, store, interval
        self.conn = None
        self.lock = threading.Lock()
        self.thread = None
        self.stopping = threading.Event()

    def open(self):
        """Open (or create) the file, check it, and load its tasks into the store."""
        if "\0" in str(self.path):
            raise DatabaseError("%r: a path can't contain a NUL character" % (self.path,))
        try:
            self.conn = sqlite3.connect(self.path, check_same_thread=False,
                                        isolation_level=None, timeout=0.5)
            self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            # The version first: a newer file is refused before anything in it changes.
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DatabaseError(
                    "%s has schema version %d, newer than this Progressista understands (%d): "
                    "upgrade progressista or use another file" % (self.path, version,
                                                                  SCHEMA_VERSION))
            if version == 0:  # not ours yet: it must be empty, not another program's
                tables = [name for (name,) in self.conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")]
                if tables:
                    raise DatabaseError(
                        "%s is a database of something else (tables: %s): use another --db "
                        "file" % (self.path, ", ".join(sorted(tables))[:200]))
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise DatabaseError("%s: could not switch to WAL mode (got %s)" % (self.path, mode))
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("BEGIN IMMEDIATE")  # takes and keeps the write lock
            self.conn.execute("CREATE TABLE IF NOT EXISTS tasks "
                              "(task_id TEXT PRIMARY KEY, data TEXT NOT NULL)")
            if version < SCHEMA_VERSION:
                self.conn.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
            self.conn.execute("COMMIT")
            rows = self.conn.execute("SELECT data FROM tasks").fetchall()
            tasks = [json.loads(data) for (data,) in rows]
            for task in tasks:
                if type(task) is not dict or type(task.get("task_id")) is not str \
                        or task.get("status") not in STATUSES \
                        or not _is_number(task.get("updated_at")):
                    raise ValueError("bad row %.60r" % (task,))
        except DatabaseError:
            self.close()
            raise
        except sqlite3.OperationalError as exc:
            self.close()
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise DatabaseError("%s is in use by another Progressista server "
                                    "(stop it, or use another --db file)" % self.path) from None
            raise DatabaseError("cannot open %s: %s (is the path writable?)"
                                % (self.path, text)) from None
        except sqlite3.DatabaseError as exc:
            self.close()
            raise DatabaseError("%s is not a usable SQLite database (%s): move it aside or "
                                "use another --db file" % (self.path, exc)) from None
        except (ValueError, KeyError, TypeError) as exc:
            self.close()
            raise DatabaseError("%s holds a task that can't be read (%s)" % (self.path, exc)) \
                from None
        self.store.persist = True  # first: what load's sweep expires is deleted from the file
        self.store.load(tasks)
        log.info("restored %d tasks from %s", len(tasks), self.path)

    def start(self):
        self.thread = threading.Thread(target=self._loop, name="progressista-db", daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stopping.wait(self.interval):
            try:
                self.flush()
            except Exception:  # whatever it is, keep the thread: the next flush retries
                log.exception("writing %s failed; will retry", self.path)

    def flush(self):
        """Write what changed since the last flush, in one transaction."""
        store = self.store
        with self.lock:  # taken first: two flushes commit in the order they took their rows
            if self.conn is None:
                return 0
            with store.lock:
                if not store.db_dirty and not store.db_removed:
                    return 0
                dirty, removed = store.db_dirty, store.db_removed
                store.db_dirty, store.db_removed = set(), set()
                rows = [(k, store.tasks[k]) for k in dirty if k in store.tasks]
            rows = [(k, _dumps(task)) for k, task in rows]  # encoded outside the store lock
            try:
                self.conn.execute("BEGIN")
                self.conn.executemany("DELETE FROM tasks WHERE task_id=?",
                                      [(k,) for k in removed])
                self.conn.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?)", rows)
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                with store.lock:  # put them back, so the next flush retries
                    store.db_dirty.update(k for k, _ in rows if k in store.tasks)
                    store.db_removed.update(removed)
                raise
        return len(rows) + len(removed)

    def stop(self):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(5)
        try:
            self.flush()
        finally:
            self.close()

    def close(self):
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


# -- websocket ---------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_WS_MESSAGE = 1 << 16  # what a dashboard may send us; more closes with 1009
MAX_WS_BACKLOG = 64       # messages queued for one dashboard before it is dropped
WS_PING_SECONDS = 20.0
WS_IDLE_SECONDS = 60.0    # no frame (not even a pong) for this long: gone


class ProtocolError(Exception):
    """A WebSocket peer broke RFC 6455; ``code`` is the close code to send."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code, self.reason = code, reason


def accept_key(key):
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    digest = hashlib.sha1((key.strip() + WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def _mask(data, mask):
    """XOR ``data`` with the 4-byte ``mask``, a whole integer at a time."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _frame_header(n, opcode=0x1, fin=True, mask_bit=0):
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return struct.pack("!BB", first, mask_bit | n)
    if n < 65536:
        return struct.pack("!BBH", first, mask_bit | 126, n)
    return struct.pack("!BBQ", first, mask_bit | 127, n)


def encode_frame(payload, opcode=0x1, fin=True, mask=None):
    """One frame: the server's (unmasked) or, with a 4-byte ``mask``, a client's."""
    header = _frame_header(len(payload), opcode, fin, 0x80 if mask is not None else 0)
    if mask is not None:
        return header + mask + _mask(payload, mask)
    return header + payload


def _read_exact(stream, n):
    data = stream.read(n)
    if data is None or len(data) < n:
        raise ConnectionError("connection closed mid-frame")
    return data


def read_frame(stream, max_payload=MAX_WS_MESSAGE, require_mask=True):
    """Read one frame from a binary stream: ``(fin, opcode, payload)``.

    Checks what RFC 6455 section 5 asks of a client's frame before reading its
    payload: no reserved bits, a mask, control frames short and unfragmented,
    a length that is sane and within ``max_payload``.
    """
    first, second = _read_exact(stream, 2)
    fin, opcode = bool(first & 0x80), first & 0x0F
    if first & 0x70:
        raise ProtocolError(1002, "reserved bits set")
    if opcode in (0x3, 0x4, 0x5, 0x6, 0x7) or opcode > 0xA:
        raise ProtocolError(1002, "unknown opcode %d" % opcode)
    masked, length = bool(second & 0x80), second & 0x7F
    if opcode >= 0x8 and (not fin or length > 125):
        raise ProtocolError(1002, "control frames must be short and unfragmented")
    if length == 126:
        length = struct.unpack("!H", _read_exact(stream, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", _read_exact(stream, 8))[0]
        if length >> 63:
            raise ProtocolError(1002, "frame length has its top bit set")
    if require_mask and not masked:
        raise ProtocolError(1002, "client frames must be masked")
    if length > max_payload:
        raise ProtocolError(1009, "frame larger than %d bytes" % max_payload)
    mask = _read_exact(stream, 4) if masked else None
    payload = _read_exact(stream, length) if length else b""
    return fin, opcode, (_mask(payload, mask) if mask else payload)


class WebSocket:
    """One dashboard connection: its socket, its send lock, its backlog.

    The handler thread reads (``serve``); a writer thread of its own drains
    the backlog, so a dashboard that reads slowly only ever blocks itself,
    and one that falls ``MAX_WS_BACKLOG`` messages behind is dropped.
    """

    def __init__(self, sock, rfile, max_message=MAX_WS_MESSAGE, on_message=None):
        self.sock, self.rfile = sock, rfile
        self.max_message = max_message
        self.on_message = on_message
        self.send_lock = threading.Lock()
        self.cond = threading.Condition()
        self.backlog = collections.deque()  # frames: bytes, or an iterable of bytes
        self.closed = False
        self.last_seen = time.monotonic()
        self.last_ping = 0.0
        self.writer = threading.Thread(target=self._write_loop, name="progressista-ws-writer",
                                       daemon=True)

    def start(self):
        self.writer.start()

    def send(self, frame):
        """Queue an encoded frame; False (and the connection dropped) if too far behind."""
        with self.cond:
            if self.closed:
                return False
            if len(self.backlog) >= MAX_WS_BACKLOG:
                overflow = True
            else:
                overflow = False
                self.backlog.append(frame)
                self.cond.notify()
        if overflow:
            log.info("dropping a dashboard that fell %d messages behind", MAX_WS_BACKLOG)
            self.abort()
            return False
        return True

    def _write_loop(self):
        while True:
            with self.cond:
                while not self.backlog and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                frame = self.backlog.popleft()
            try:
                with self.send_lock:
                    if type(frame) is bytes:
                        self.sock.sendall(frame)
                    else:  # encoded as it goes out, on this thread (a snapshot)
                        for part in frame:
                            self.sock.sendall(part)
            except OSError:
                self.abort()
                return

    def _send_now(self, frame, wait=None):
        """Send ahead of the backlog.  With ``wait`` (seconds), never block longer:
        a writer stuck on a peer that doesn't read must not hold up a close."""
        if not self.send_lock.acquire(timeout=-1 if wait is None else wait):
            self.abort()
            return
        try:
            if wait is None:
                self.sock.sendall(frame)
            elif self.sock.send(frame, getattr(socket, "MSG_DONTWAIT", 0)) < len(frame):
                raise BlockingIOError("peer is not reading")
        except OSError:
            self.abort()
        finally:
            self.send_lock.release()

    def close(self, code=1000, reason=""):
        """Start the closing handshake (the reader finishes it), or just go."""
        if not self.closed:
            self._send_now(encode_frame(struct.pack("!H", code) + reason.encode()[:120], 0x8),
                           wait=1.0)
        self.abort()

    def abort(self):
        """Drop the connection now; both threads notice and end."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self):
        """Read frames until the peer closes, breaks the protocol or goes away."""
        fragments, opcode, size, decoder = None, 0, 0, None
        try:
            while not self.closed:
                fin, op, payload = read_frame(self.rfile, self.max_message)
                self.last_seen = time.monotonic()
                if op == 0x8:
                    self._on_close(payload)
                    return
                if op == 0x9:
                    self._send_now(encode_frame(payload, 0xA))
                    continue
                if op == 0xA:
                    continue
                if op == 0x0:
                    if fragments is None:
                        raise ProtocolError(1002, "continuation frame with nothing to continue")
                else:
                    if fragments is not None:
                        raise ProtocolError(1002, "new message before the last one ended")
                    fragments, opcode, size = [], op, 0
                    decoder = codecs.getincrementaldecoder("utf-8")() if op == 0x1 else None
                size += len(payload)
                if size > self.max_message:
                    raise ProtocolError(1009, "message larger than %d bytes" % self.max_message)
                if decoder is not None:
                    try:
                        fragments.append(decoder.decode(payload, final=fin))
                    except UnicodeDecodeError:
                        raise ProtocolError(1007, "text message is not UTF-8") from None
                else:
                    fragments.append(payload)
                if fin:
                    message = "".join(fragments) if opcode == 0x1 else b"".join(fragments)
                    fragments = None
                    if self.on_message is not None:
                        self.on_message(self, message)
        except ProtocolError as exc:
            log.debug("websocket protocol error: %s", exc.reason)
            self.close(exc.code, exc.reason)
        except (ConnectionError, OSError, ValueError):
            self.abort()

    def _on_close(self, payload):
        """Echo the peer's Close (RFC 6455 5.5.1), then end the connection."""
        code = 1000
        if len(payload) == 1:
            code = 1002
        elif len(payload) >= 2:
            received = struct.unpack("!H", payload[:2])[0]
            valid = (1000 <= received <= 1014 and received not in (1004, 1005, 1006)) \
                or 3000 <= received <= 4999
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                valid, received = False, 1007
            code = received if valid else (1007 if received == 1007 else 1002)
        self.close(code)


def _snapshot_frames(tasks, now):
    """The snapshot message as frames, encoded lazily as they are sent.

    A large state goes as one fragmented message (RFC 6455 5.4), a few
    hundred KB per frame, so no buffer ever holds all of it.
    """
    if len(tasks) <= JSON_CHUNK:
        yield encode_frame(_dumps({"type": "snapshot", "tasks": tasks,
                                   "server_time": now}).encode())
        return
    pieces = _json_pieces('{"type":"snapshot","server_time":%s,"tasks":{' % _dumps(now),
                          tasks, "}}")
    previous, opcode = next(pieces), 0x1
    for piece in pieces:
        yield encode_frame(previous, opcode, fin=False)
        previous, opcode = piece, 0x0
    yield encode_frame(previous, opcode, fin=True)


class Hub:
    """The set of dashboards, and the one thread that feeds them.

    On a change it waits out the rest of ``interval`` since its last message,
    then encodes one delta of whatever changed meanwhile, once for everyone:
    each dashboard gets at most one message per interval, and its cost does
    not depend on how many updates came in.  The same thread pings idle
    dashboards and runs the store's sweep once a second.
    """

    def __init__(self, store, interval=0.1):
        self.store = store
        self.interval = interval
        self.clients = set()  # guarded by store.lock, so snapshots line up with deltas
        self.thread = None
        self.stopping = False

    def attach(self, ws):
        """Send ``ws`` the snapshot and subscribe it, atomically w.r.t. deltas."""
        store = self.store
        with store.lock:
            # Copying the tasks is quick; encoding them is not, so that is
            # left to the dashboard's writer thread, with the deltas queued
            # behind it.  Copies, not the live tasks: every later delta must
            # be newer than the snapshot, or a bar could step backwards.
            tasks = {task_id: dict(task) for task_id, task in store.tasks.items()}
            ws.send(_snapshot_frames(tasks, store.clock()))
            self.clients.add(ws)

    def detach(self, ws):
        with self.store.lock:
            self.clients.discard(ws)

    def start(self):
        self.thread = threading.Thread(target=self._loop, name="progressista-hub", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.store.changed.set()
        if self.thread is not None:
            self.thread.join(5)
        with self.store.lock:
            clients = list(self.clients)
        for ws in clients:
            ws.close(1001, "server shutting down")

    def _loop(self):
        store = self.store
        last_sent = last_sweep = 0.0
        while not self.stopping:
            store.changed.wait(1.0)
            if self.stopping:
                return
            try:
                now = time.monotonic()
                if now - last_sweep >= 1.0:
                    last_sweep = now
                    store.sweep()
                    self._ping_idle(now)
                wait = last_sent + self.interval - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                store.changed.clear()
                last_sent = time.monotonic()
                self.broadcast()
            except Exception:  # one bad round must not end every dashboard's feed
                log.exception("dashboard broadcast failed; carrying on")

    def broadcast(self):
        """Encode what changed once and queue it for every dashboard."""
        store = self.store
        with store.lock:
            if not store.dirty and not store.removed:
                return
            tasks, removed = store.take_changes()
            targets = list(self.clients)
            now = store.clock()
        if not targets:
            return
        # Encoded outside the lock, so ingest never waits on it; a task that
        # changes meanwhile is dirty again and goes out in the next delta.
        text = _dumps({"type": "delta", "tasks": tasks, "removed": removed,
                       "server_time": now})
        frame = encode_frame(text.encode("utf-8"))
        for ws in targets:
            ws.send(frame)

    def _ping_idle(self, now):
        with self.store.lock:
            clients = list(self.clients)
        for ws in clients:
            quiet = now - ws.last_seen
            if quiet > WS_IDLE_SECONDS:
                ws.abort()
            elif quiet > WS_PING_SECONDS and now - ws.last_ping > WS_PING_SECONDS:
                ws.last_ping = now
                ws.send(encode_frame(b"", 0x9))


# -- http --------------------------------------------------------------------

def _is_loopback(host):
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_date_cache = [0, ""]


def _http_date():
    """The Date header, formatted once a second rather than per response."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))]
    return _date_cache[1]


class _Headers(dict):
    """Request headers by lower-cased name; ``get`` ignores case as email's does."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name):
        return dict.get(self, name.lower())

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


MAX_HEADERS = 100


def _parse_version(version):
    """``HTTP/1.1`` -> (1, 1); ValueError for anything else."""
    if not version.startswith("HTTP/"):
        raise ValueError(version)
    major, minor = version[5:].split(".")
    if not (major.isdigit() and minor.isdigit() and len(major) < 10 and len(minor) < 10):
        raise ValueError(version)
    return int(major), int(minor)


class Handler(BaseHTTPRequestHandler):
    """The HTTP API, the dashboard page and the WebSocket upgrade.

    Every response is written in one ``sendall`` (headers and body together)
    on a ``TCP_NODELAY`` socket, so keep-alive clients never wait on Nagle's
    algorithm and delayed ACKs.
    """

    protocol_version = "HTTP/1.1"
    server_version = "Progressista/" + __version__
    sys_version = ""
    timeout = 30  # an idle or half-open connection is closed after this
    request_seconds = 10.0  # headers and body must arrive within this of the request line
    _deadline_timeout = False

    def setup(self):
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def handle_one_request(self):
        # Between two requests a connection is idle, and may be closed to make
        # room for another (see ProgressServer.process_request).
        self.server.idle[self.connection] = None
        if self._deadline_timeout:  # a body read ran on the request's deadline
            self._deadline_timeout = False
            self.connection.settimeout(self.timeout)
        super().handle_one_request()

    def parse_request(self):
        """The request line and headers, as http.server does, minus its cost.

        http.server parses headers with the email package, more than half of
        the CPU of a small POST; this reads the same lines with the same
        limits (a line over 64 KiB or over 100 headers is 431) into a dict.
        """
        self.server.idle.pop(self.connection, None)
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:
            return False
        if len(words) != 3:
            self.send_error(400, "Bad request syntax (%r)" % requestline[:200])
            return False
        command, path, version = words
        try:
            number = _parse_version(version)
        except ValueError:
            self.send_error(400, "Bad request version (%r)" % version[:50])
            return False
        if number >= (2, 0):
            self.send_error(505, "Invalid HTTP version (%s)" % version[5:])
            return False
        self.close_connection = number < (1, 1)
        self.command, self.request_version = command, version
        self.path = "/" + path.lstrip("/") if path.startswith("//") else path
        headers = self.headers = _Headers()
        readline, last = self.rfile.readline, None
        self._deadline = deadline = time.monotonic() + self.request_seconds
        for _ in range(MAX_HEADERS + 1):
            if time.monotonic() > deadline:  # a slow drip of header lines
                self.send_error(408, "request headers not received in time")
                return False
            line = readline(65537)
            if len(line) > 65536:
                self.send_error(431, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            if line[:1] in (b" ", b"\t") and last is not None:  # obsolete line folding
                headers[last] += " " + line.strip().decode("iso-8859-1")
                continue
            name, sep, value = line.partition(b":")
            if not sep or not name.strip():
                self.send_error(400, "Malformed header line")
                return False
            last = name.strip().decode("iso-8859-1").lower()
            value = value.strip().decode("iso-8859-1")
            headers[last] = headers[last] + ", " + value if last in headers else value
        else:
            self.send_error(431, "Too many headers")
            return False
        connection = headers.get("connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if headers.get("expect", "").lower() == "100-continue" and number >= (1, 1):
            if not self.handle_expect_100():
                return False
        return True

    # Responses.

    def _head(self, status, content_type, length, headers=()):
        """The status line and headers, as bytes; ``length`` None means chunked."""
        if getattr(self, "_unread_body", False) or (
                length is None and self.request_version != "HTTP/1.1"):
            self.close_connection = True
        lines = ["HTTP/1.1 %d %s" % (status, self.responses.get(status, ("",))[0]),
                 "Server: " + self.server_version, "Date: " + _http_date()]
        if status != 204:  # a 204 has neither (RFC 9110 8.6)
            lines.append("Content-Type: " + content_type)
            if length is not None:
                lines.append("Content-Length: %d" % length)
            elif not self.close_connection:
                lines.append("Transfer-Encoding: chunked")
        if self.close_connection:
            lines.append("Connection: close")
        lines.extend(self._cors_headers())
        lines.extend("%s: %s" % pair for pair in headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _respond(self, status, body=b"", content_type="application/json", headers=()):
        head = self._head(status, content_type, len(body), headers)
        self.wfile.write(head if self.command == "HEAD" else head + body)
        self.log_request(status, len(body))

    def _respond_pieces(self, status, pieces, content_type="application/json"):
        """A big body in chunked transfer coding, encoded as it is written."""
        self.wfile.write(self._head(status, content_type, None))
        if self.command != "HEAD":
            for piece in pieces:
                if self.close_connection:
                    self.wfile.write(piece)
                elif piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if not self.close_connection:
                self.wfile.write(b"0\r\n\r\n")
        self.log_request(status)

    def _json(self, status, text, headers=()):
        self._respond(status, text.encode() if isinstance(text, str) else text,
                      headers=headers)

    def _error(self, status, message, headers=()):
        self._json(status, _dumps({"error": message}), headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, 501...) as JSON too."""
        self.close_connection = True
        if not hasattr(self, "command") or self.command is None:
            self.command = ""
        self._respond(code, _dumps({"error": message or self.responses.get(
            code, ("error",))[0]}).encode())

    def log_request(self, code="-", size="-"):
        if log.isEnabledFor(logging.DEBUG):
            self.log_message('"%s %s" %s %s', self.command, self._path_for_log(), code, size)

    def log_message(self, format, *args):
        """One place for log lines; the query string (a ?token=) never reaches it."""
        log.debug("%s " + format, self.address_string(), *args)

    def _path_for_log(self):
        return getattr(self, "path", "").split("?", 1)[0]

    # Request plumbing.

    def _split(self):
        path, _, query = self.path.partition("?")
        self.route = path
        self.query = urllib.parse.parse_qs(query, keep_blank_values=True) if query else {}
        # A body we won't read would be taken for the next request: a response
        # to such a request closes the connection (_read_body clears this).
        self._unread_body = bool(self.headers.get("Transfer-Encoding")) or \
            self.headers.get("Content-Length", "0").strip() not in ("", "0")

    def _authorized(self):
        tokens = self.server.tokens
        if not tokens:
            return True
        given = None
        header = self.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        elif "token" in self.query:
            given = self.query["token"][0]
        if not given:
            return False
        given = given.encode("utf-8", "replace")
        ok = False
        for token in tokens:  # compare with all of them, in constant time each
            ok |= hmac.compare_digest(given, token.encode("utf-8"))
        return ok

    def _origin_allowed(self, origin):
        """Same origin as the Host we were asked for, or one of ``--allow-origin``."""
        allowed = self.server.allow_origins
        if origin in allowed or "*" in allowed:
            return True
        host = self.headers.get("Host", "")
        return bool(host) and urllib.parse.urlsplit(origin).netloc.lower() == host.lower()

    def _cors_headers(self):
        origin = self.headers.get("Origin") if hasattr(self, "headers") else None
        allowed = self.server.allow_origins
        if not origin or not allowed or not (origin in allowed or "*" in allowed):
            return []
        return ["Access-Control-Allow-Origin: " + origin, "Vary: Origin"]

    def _guard(self, write=False):
        """Auth, and refuse writes from foreign web pages; True if we may go on."""
        if not self._authorized():
            self._error(401, "unauthorized: send Authorization: Bearer <token> or ?token=",
                        [("WWW-Authenticate", "Bearer")])
            return False
        origin = self.headers.get("Origin")
        if write and origin and not self._origin_allowed(origin):
            self._error(403, "cross-origin request refused (see --allow-origin)")
            return False
        return True

    def _read_body(self):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("chunked bodies are not supported: send Content-Length", 411)
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise BadRequest("Content-Length required", 411)
        try:
            if not length.strip().isdigit() or not length.strip().isascii():
                raise ValueError  # int() would take "+5", "1_000", "-0"
            length = int(length)
        except ValueError:
            self.close_connection = True
            raise BadRequest("invalid Content-Length") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise BadRequest("body larger than %d bytes" % MAX_BODY, 413)
        # The body must come within the request deadline, however it trickles.
        self.connection.settimeout(max(0.05, self._deadline - time.monotonic()))
        self._deadline_timeout = True
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise BadRequest("request body not received in time", 408) from None
        if len(body) < length:
            self.close_connection = True
            raise BadRequest("body shorter than Content-Length")
        self._unread_body = False
        if not body.strip():
            raise BadRequest("empty body: send an update object or an array of them")
        return body

    def _statuses(self):
        wanted = self.query.get("status")
        if not wanted:
            return None
        statuses = set(",".join(wanted).split(","))
        unknown = statuses - set(STATUSES)
        if unknown:
            raise BadRequest("unknown status %s: use %s" % (
                ", ".join(sorted(unknown)), ", ".join(STATUSES)))
        return statuses

    # Methods.

    def do_GET(self):
        self._split()
        route = self.route
        try:
            if route == "/health":
                return self._health()
            if route in ("/", "/index.html", "/static/index.html"):
                return self._page()
            if not self._guard():
                return
            if route == "/tasks":
                tasks = self.server.store.select(self._statuses())
                if len(tasks) <= JSON_CHUNK:
                    return self._json(200, _dumps({"tasks": tasks}))
                return self._respond_pieces(200, _json_pieces('{"tasks":{', tasks, "}}"))
            if route.startswith("/tasks/"):
                text = self.server.store.get_json(urllib.parse.unquote(route[7:]))
                if text is None:
                    return self._error(404, "no such task")
                return self._json(200, text)
            if route == "/ws":
                return self._websocket()
            if route == "/metrics":
                ctype = "text/plain; version=0.0.4; charset=utf-8"
                if len(self.server.store) <= JSON_CHUNK:
                    return self._respond(200, self.server.metrics().encode(), ctype)
                return self._respond_pieces(
                    200, (piece.encode() for piece in _metrics_pieces(self.server)), ctype)
            if route in ("/progress",):
                return self._error(405, "use POST", [("Allow", "POST")])
            self._error(404, "not found: %s" % route)
        except BadRequest as exc:
            self._error(exc.status, str(exc))

    def do_HEAD(self):
        if self.path.partition("?")[0] == "/ws":
            self._split()
            return self._error(405, "the WebSocket needs GET", [("Allow", "GET")])
        self.do_GET()

    def do_POST(self):
        self._split()
        try:
            if self.route != "/progress":
                return self._not_allowed()
            if not self._guard(write=True):
                return
            data = parse_json(self._read_body())
            count = self.server.store.ingest(data)
            self._json(200, b'{"ok":true,"accepted":%d}' % count)
        except BadRequest as exc:
            self._error(exc.status, str(exc))

    def do_DELETE(self):
        self._split()
        try:
            if not (self.route == "/tasks" or self.route.startswith("/tasks/")):
                return self._not_allowed()
            if not self._guard(write=True):
                return
            store = self.server.store
            if self.route == "/tasks":
                statuses = self._statuses()
                if statuses is None:
                    raise BadRequest("say which tasks: DELETE /tasks?status=close[&older_than=S]")
                older_than = None
                if "older_than" in self.query:
                    try:
                        older_than = float(self.query["older_than"][0])
                        if not math.isfinite(older_than) or older_than < 0:
                            raise ValueError
                    except ValueError:
                        raise BadRequest("older_than must be a number of seconds") from None
                return self._json(200, _dumps({"removed": store.delete_where(statuses,
                                                                              older_than)}))
            removed = store.delete(urllib.parse.unquote(self.route[7:]))
            self._json(200, _dumps({"removed": removed}))
        except BadRequest as exc:
            self._error(exc.status, str(exc))

    def do_OPTIONS(self):
        self._split()
        origin = self.headers.get("Origin")
        if origin and self._cors_headers():
            return self._respond(204, headers=[
                ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                ("Access-Control-Max-Age", "600")])
        self._not_allowed()

    def _not_allowed(self):
        known = self.route in ("/", "/health", "/metrics", "/ws", "/progress", "/tasks",
                               "/static/index.html", "/index.html") \
            or self.route.startswith("/tasks/")
        if not known:
            return self._error(404, "not found: %s" % self.route)
        allow = "POST" if self.route == "/progress" else (
            "GET, HEAD, DELETE" if self.route.startswith("/tasks") else "GET, HEAD")
        self._error(405, "method not allowed", [("Allow", allow)])

    def do_PUT(self):
        self._split()
        self._not_allowed()

    do_PATCH = do_PUT

    # Endpoints.

    def _health(self):
        server = self.server
        self._json(200, _dumps({"status": "ok", "tasks": len(server.store),
                                "auth_required": bool(server.tokens),
                                "authorized": self._authorized(),
                                "version": __version__}))

    def _page(self):
        self._respond(200, INDEX_HTML_BYTES, "text/html; charset=utf-8", [
            ("Content-Security-Policy", _page_csp()),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
            ("Cache-Control", "no-cache")])

    def _websocket(self):
        headers = self.headers
        if "websocket" not in headers.get("Upgrade", "").lower():
            return self._error(426, "this is the WebSocket endpoint: send Upgrade: websocket",
                               [("Upgrade", "websocket")])
        if "upgrade" not in headers.get("Connection", "").lower():
            return self._error(400, "Connection: Upgrade header missing")
        if headers.get("Sec-WebSocket-Version", "").strip() != "13":
            return self._error(426, "only WebSocket version 13 is supported",
                               [("Sec-WebSocket-Version", "13")])
        key = headers.get("Sec-WebSocket-Key", "").strip()
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            return self._error(400, "Sec-WebSocket-Key must be 16 bytes in base64")
        origin = headers.get("Origin")
        if origin and not self._origin_allowed(origin):
            return self._error(403, "WebSocket from a foreign origin refused (see --allow-origin)")
        self.close_connection = True
        self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                          % accept_key(key)).encode("ascii"))
        self.log_request(101)
        self.connection.settimeout(None)  # the hub's pings find dead peers instead
        ws = WebSocket(self.connection, self.rfile)
        server, hub = self.server, self.server.hub
        with server.ws_lock:
            server.ws_count += 1
        try:
            ws.start()
            hub.attach(ws)
            ws.serve()
        finally:
            hub.detach(ws)
            ws.abort()
            with server.ws_lock:
                server.ws_count -= 1


_csp_cache = []


def _page_csp():
    """A strict CSP admitting exactly the page's own inline script and style."""
    if not _csp_cache:
        page = INDEX_HTML_BYTES.decode("utf-8")
        hashes = {}
        for tag in ("script", "style"):
            hashes[tag] = " ".join(
                "'sha256-%s'" % base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
                for body in re.findall(r"<%s>(.*?)</%s>" % (tag, tag), page, re.S))
        _csp_cache.append(
            "default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'" % (hashes["script"] or "'none'", hashes["style"] or "'none'"))
    return _csp_cache[0]


class ProgressServer(ThreadingHTTPServer):
    """The server: a store, a hub, and a thread per connection (capped)."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128
    max_connections = 1024

    def __init__(self, address, store=None, tokens=(), allow_origins=(), db=None,
                 handler=Handler):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.store = store if store is not None else TaskStore()
        self.hub = Hub(self.store)
        self.tokens = [t for t in tokens if t]
        self.allow_origins = list(allow_origins)
        self.db = db
        self.ws_lock = threading.Lock()
        self.ws_count = 0
        self.open_connections = 0
        self.sockets = set()  # open connections, closed by stop()
        self.idle = {}  # connections waiting for their next request, oldest first
        self.thread = None
        super().__init__(address, handler)

    @property
    def url(self):
        host, port = self.server_address[:2]
        if ":" in host:
            host = "[%s]" % host
        elif host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        return "http://%s:%d" % (host, port)

    def process_request(self, request, client_address):
        """Make room for a new connection, or refuse it cheaply.

        At ``max_connections``, the connection idle the longest between two
        requests is closed to make room: idle sockets can't starve a client
        that has something to say.  Only when none is idle is it a 503.
        """
        with self.ws_lock:
            victim = None
            if self.open_connections >= self.max_connections:
                victim = next(iter(self.idle), None)
                if victim is not None:
                    del self.idle[victim]
            full = self.open_connections >= self.max_connections and victim is None
            if not full:
                self.open_connections += 1
                self.sockets.add(request)
        if victim is not None:
            try:
                victim.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if full:
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nContent-Length: 33\r\nConnection: "
                                b"close\r\n\r\n{\"error\":\"too many connections\"}")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.ws_lock:
                self.open_connections -= 1
                self.sockets.discard(request)
                self.idle.pop(request, None)

    def handle_error(self, request, client_address):
        log.debug("connection error from %s", client_address[0], exc_info=True)

    def metrics(self):
        return _metrics_text(self)

    def start(self, background=True):
        """Start the hub and the database writer, and serve on a thread of its
        own (for tests and embedding; returns self) or, with ``background``
        false, in this thread until ``shutdown()``."""
        self.hub.start()
        if self.db is not None:
            self.db.start()
        if not background:
            self.serve_forever()
            return self
        self.thread = threading.Thread(target=self.serve_forever, name="progressista-http",
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self):
        """Stop serving, close the dashboards, flush the database."""
        if self.thread is not None:
            self.shutdown()
            self.thread.join(5)
            self.thread = None
        self.hub.stop()
        self.server_close()
        self.close_connections()
        if self.db is not None:
            self.db.stop()

    def close_connections(self):
        """End every open connection, so no handler thread outlives the server."""
        with self.ws_lock:
            sockets = list(self.sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _metrics_text(server):
    """Prometheus text exposition (format 0.0.4) of the tasks and the server."""
    return "".join(_metrics_pieces(server))


def _metrics_pieces(server):
    """The exposition in pieces of ``JSON_CHUNK`` lines, to stream a big one."""
    def label(value):
        return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")

    def number(value):
        if value is None:
            return "NaN"
        try:
            return repr(float(value))
        except OverflowError:  # a JSON integer beyond float64
            return "+Inf" if value > 0 else "-Inf"

    def ratio(t):
        if not t["total"]:
            return None
        try:
            return t["n"] / t["total"]
        except OverflowError:
            return float("inf")

    store = server.store
    per_task = [
        ("progressista_task_n", "Units done (tqdm's n).", lambda t: t["n"]),
        ("progressista_task_total", "Units expected (tqdm's total); NaN when unknown.",
         lambda t: t["total"]),
        ("progressista_task_progress_ratio", "n / total (1 when done); NaN when total is unknown.",
         ratio),
        ("progressista_task_rate", "Smoothed units per second, as tqdm computes it.",
         lambda t: t["rate"]),
        ("progressista_task_updated_timestamp_seconds", "Server time of the last progress.",
         lambda t: t["updated_at"]),
    ]
    with store.lock:
        rows = [('task_id="%s",status="%s"' % (label(t["task_id"]), t["status"]), t)
                for t in store.tasks.values()]
        received, rejected = store.updates_received, store.updates_rejected
    counts = dict.fromkeys(STATUSES, 0)  # from the same rows, so the two always agree
    for _, t in rows:
        counts[t["status"]] += 1
    for name, help_text, get in per_task:
        yield "# HELP %s %s\n# TYPE %s gauge\n" % (name, help_text, name)
        for start in range(0, len(rows), JSON_CHUNK):
            yield "".join("%s{%s} %s\n" % (name, labels, number(get(t)))
                          for labels, t in rows[start:start + JSON_CHUNK])
    yield "# HELP progressista_tasks Tasks by status.\n# TYPE progressista_tasks gauge\n"
    yield "".join('progressista_tasks{status="%s"} %d\n' % (s, counts[s]) for s in STATUSES)
    yield ("# HELP progressista_updates_received_total Updates accepted.\n"
           "# TYPE progressista_updates_received_total counter\n"
           "progressista_updates_received_total %d\n" % received)
    yield ("# HELP progressista_updates_rejected_total Updates refused as bad input.\n"
           "# TYPE progressista_updates_rejected_total counter\n"
           "progressista_updates_rejected_total %d\n" % rejected)
    yield ("# HELP progressista_websocket_clients Dashboards connected now.\n"
           "# TYPE progressista_websocket_clients gauge\n"
           "progressista_websocket_clients %d\n" % server.ws_count)


def make_server(host="127.0.0.1", port=8000, tokens=(), db=None, stale_seconds=0.0,
                retention_seconds=86400.0, allow_origins=(), max_tasks=100000,
                clock=time.time):
    """Build a ready-to-start server (``.start()`` in the background, or ``serve``)."""
    store = TaskStore(stale_seconds, retention_seconds, max_tasks, clock)
    database = None
    if db:
        database = Database(db, store)
        database.open()
    try:
        return ProgressServer((host, port), store, tokens, allow_origins, database)
    except BaseException:
        if database is not None:
            database.close()
        raise


def serve(host="127.0.0.1", port=8000, **options):
    """Run the server in the foreground until Ctrl-C or SIGTERM."""
    import signal
    server = make_server(host, port, **options)
    if not _is_loopback(host) and not server.tokens:
        log.warning("binding %s without a token: anyone who can reach this port can read "
                    "and write progress (use --token)", host)

    def on_term(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    # Before the URL is printed: whoever reads it may send SIGTERM at once.
    previous = signal.signal(signal.SIGTERM, on_term)
    print("Progressista %s: dashboard at %s/  (POST updates to %s/progress)"
          % (__version__, server.url, server.url), flush=True)
    if _is_loopback(host):
        print("Listening on loopback only: other machines can't reach it "
              "(--host 0.0.0.0 --token T opens it up).", flush=True)
    try:
        server.start(background=False)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            server.stop()  # a second SIGTERM meanwhile must not cut this short
        finally:
            signal.signal(signal.SIGTERM, previous)
        print("Progressista stopped.", flush=True)


# -- dashboard ---------------------------------------------------------------

# The page is index.html, byte for byte: edit index.html, then run
# .ci/embed_index.py to copy it here (a test proves the two are identical).
INDEX_HTML = r'''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Progressista</title>
<link rel="icon" href="data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect x='1' y='6' width='14' height='4' rx='2' fill='%23d0d7de'/%3E%3Crect x='1' y='6' width='9' height='4' rx='2' fill='%230969da'/%3E%3C/svg%3E">
<style>
:root {
  --bg: #f6f7f9; --panel: #ffffff; --text: #1f2328; --muted: #656d76;
  --border: #d8dee4; --track: #e9edf1; --chip: #eef1f4; --hover: #eef1f4;
  --blue: #0969da; --amber: #b07800; --red: #cf222e; --green: #1a7f37;
  --amber-bg: #fff8e1; --red-bg: #ffebe9; --focus: #0969da;
  --shadow: 0 1px 2px rgba(31, 35, 40, .06);
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0d1117; --panel: #161b22; --text: #e6edf3; --muted: #8d96a0;
    --border: #30363d; --track: #262c34; --chip: #21262d; --hover: #21262d;
    --blue: #4493f8; --amber: #d29922; --red: #f85149; --green: #3fb950;
    --amber-bg: #2b2111; --red-bg: #2d1517; --focus: #4493f8;
    --shadow: none;
  }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
html { -webkit-text-size-adjust: 100%; }
body {
  margin: 0; background: var(--bg); color: var(--text);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: 12.5px; }
button {
  font: inherit; color: var(--text); background: var(--panel); border: 1px solid var(--border);
  border-radius: 6px; padding: 5px 10px; cursor: pointer; white-space: nowrap;
}
button:hover:not(:disabled) { background: var(--hover); }
button:disabled { opacity: .5; cursor: default; }
button:focus-visible, input:focus-visible { outline: 2px solid var(--focus); outline-offset: 1px; }
button[aria-pressed="true"] { border-color: var(--blue); color: var(--blue); }

/* ---- header ---- */
.topbar {
  position: sticky; top: 0; z-index: 10; display: flex; flex-wrap: wrap; align-items: center;
  gap: 8px 12px; padding: 10px 16px; background: var(--panel); border-bottom: 1px solid var(--border);
}
.brand { display: flex; align-items: center; gap: 8px; }
.brand h1 { margin: 0; font-size: 17px; font-weight: 650; letter-spacing: -.01em; }
.logo { width: 18px; height: 8px; border-radius: 4px; background: linear-gradient(90deg, var(--blue) 62%, var(--track) 62%); }
.conn { display: inline-flex; align-items: center; gap: 6px; font-size: 12.5px; color: var(--muted);
  border: 1px solid var(--border); border-radius: 999px; padding: 2px 9px 2px 8px; white-space: nowrap; }
.conn .dot { width: 8px; height: 8px; border-radius: 50%; background: var(--muted); }
.conn[data-state="live"] .dot { background: var(--green); }
.conn[data-state="connecting"] .dot, .conn[data-state="reconnecting"] .dot { background: var(--amber); }
.conn[data-state="unauthorized"] .dot, .conn[data-state="offline"] .dot { background: var(--red); }
.conn[data-state="unauthorized"] { color: var(--red); border-color: var(--red); }
#filter {
  flex: 1 1 220px; min-width: 0; font: inherit; color: var(--text); background: var(--bg);
  border: 1px solid var(--border); border-radius: 6px; padding: 5px 10px;
}
.actions { display: flex; flex-wrap: wrap; gap: 6px; }
.banner { margin: 12px 16px 0; padding: 10px 14px; border-radius: 8px; border: 1px solid var(--red);
  background: var(--red-bg); color: var(--text); overflow-wrap: anywhere; }
.toast { position: fixed; left: 50%; bottom: 16px; transform: translateX(-50%); max-width: calc(100% - 32px);
  background: var(--text); color: var(--bg); padding: 8px 14px; border-radius: 8px; z-index: 20;
  overflow-wrap: anywhere; box-shadow: 0 4px 14px rgba(0, 0, 0, .2); }

/* ---- sections ---- */
main { padding: 4px 16px 40px; max-width: 1600px; margin: 0 auto; }
body.disconnected main { opacity: .72; }
.section { margin-top: 18px; }
.section-title { display: flex; align-items: baseline; gap: 8px; margin: 0 0 8px; font-size: 13px;
  font-weight: 650; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); }
.section-title::before { content: ""; width: 8px; height: 8px; border-radius: 2px; align-self: center; background: var(--muted); }
#section-active .section-title::before { background: var(--blue); }
#section-stale .section-title::before { background: var(--amber); }
#section-error .section-title::before { background: var(--red); }
#section-close .section-title::before { background: var(--green); }
.count { font-variant-numeric: tabular-nums; color: var(--text); background: var(--chip); border-radius: 999px;
  padding: 0 8px; font-size: 12px; letter-spacing: 0; }
.shown { font-weight: 400; text-transform: none; letter-spacing: 0; font-size: 12px; }
.more { display: block; margin: 10px auto 0; color: var(--blue); }
.empty { margin: 0; color: var(--muted); font-size: 13px; font-style: italic; }
.list { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 310px), 1fr)); gap: 10px; }
.hint { margin-top: 18px; padding: 14px 16px; border: 1px dashed var(--border); border-radius: 8px;
  background: var(--panel); color: var(--muted); }
.hint h2 { margin: 0 0 6px; font-size: 15px; color: var(--text); }
.hint p { margin: 6px 0; }
.hint code { display: block; padding: 6px 10px; margin: 4px 0 8px; background: var(--bg); border-radius: 6px;
  color: var(--text); white-space: pre-wrap; overflow-wrap: anywhere; }

/* ---- groups ---- */
.group { grid-column: 1 / -1; min-width: 0; border: 1px solid var(--border); border-radius: 10px; padding: 8px;
  background: color-mix(in srgb, var(--panel) 45%, var(--bg)); }
.group-header { display: flex; flex-wrap: wrap; align-items: center; gap: 4px 12px; padding: 0 2px 8px; min-width: 0; }
.group-toggle { display: inline-flex; align-items: center; gap: 6px; border: 0; background: none; padding: 2px 4px;
  font-weight: 600; min-width: 0; max-width: 100%; }
.group-toggle .chev { width: 0; height: 0; border: 5px solid transparent; border-top-color: var(--muted);
  margin-top: 5px; flex: none; }
.group-toggle[aria-expanded="false"] .chev { border-top-color: transparent; border-left-color: var(--muted); margin: 0 0 0 4px; }
.group-name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.group-count, .group-progress { color: var(--muted); font-size: 12.5px; font-variant-numeric: tabular-nums; }
.group-bar { flex: 1 1 120px; max-width: 320px; }
.group.collapsed { padding-bottom: 0; }

/* ---- cards ---- */
.card {
  min-width: 0; position: relative; background: var(--panel); border: 1px solid var(--border);
  border-left: 3px solid var(--muted); border-radius: 8px; padding: 9px 12px 10px; box-shadow: var(--shadow);
}
body.many .card { content-visibility: auto; contain-intrinsic-size: auto 120px; }
.card.active { border-left-color: var(--blue); }
.card.stale { border-left-color: var(--amber); }
.card.error { border-left-color: var(--red); }
.card.close { border-left-color: var(--green); }
.card-head { display: flex; align-items: flex-start; gap: 8px; }
.card-titles { flex: 1; min-width: 0; }
.task-id { font-weight: 600; overflow-wrap: anywhere; word-break: break-word; }
.desc { color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.discard { flex: none; border: 0; background: none; color: var(--muted); font-size: 18px; line-height: 1;
  padding: 1px 6px 3px; border-radius: 6px; }
.discard:hover:not(:disabled) { color: var(--red); }
.bar { position: relative; height: 6px; margin: 8px 0 6px; background: var(--track); border-radius: 3px; overflow: hidden; }
.bar-fill { position: absolute; left: 0; top: 0; bottom: 0; width: 0; background: var(--blue); border-radius: 3px;
  transition: width .25s ease-out; }
.stale .bar-fill { background: var(--amber); }
.error .bar-fill { background: var(--red); }
.close .bar-fill { background: var(--green); }
.group-bar { margin: 0; }
.group-bar .bar-fill { background: var(--blue); }
.group[data-status="stale"] .group-bar .bar-fill { background: var(--amber); }
.group[data-status="error"] .group-bar .bar-fill { background: var(--red); }
.group[data-status="close"] .group-bar .bar-fill { background: var(--green); }
.bar.indeterminate .bar-fill { width: 35%; animation: indet 1.4s ease-in-out infinite; transition: none; }
.bar.unknown .bar-fill { width: 100%; opacity: .35; transition: none; }
@keyframes indet { 0% { left: -35%; } 100% { left: 100%; } }
@media (prefers-reduced-motion: reduce) {
  .bar-fill { transition: none; }
  .bar.indeterminate .bar-fill { animation: none; left: 0; width: 100%; opacity: .35; }
}
.line { display: flex; flex-wrap: wrap; gap: 2px 12px; font-variant-numeric: tabular-nums; font-size: 13px; }
.percent { font-weight: 600; }
.rate, .elapsed, .eta { color: var(--muted); }
.age, .host, .postfix { font-size: 12.5px; color: var(--muted); overflow-wrap: anywhere; }
.age { margin-top: 2px; }
.age.stuck { color: var(--amber); }
.age.silent { color: var(--red); }
.postfix { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.meta { list-style: none; display: flex; flex-wrap: wrap; gap: 4px; margin: 6px 0 0; padding: 0; }
.meta-chip { max-width: 100%; background: var(--chip); border-radius: 4px; padding: 0 6px; font-size: 12px;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.error-line { margin-top: 6px; padding: 4px 8px; border-radius: 4px; background: var(--red-bg); color: var(--red);
  font-size: 12.5px; overflow-wrap: anywhere; display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 4; overflow: hidden; }
@media (max-width: 560px) {
  .topbar { position: static; padding: 8px 10px; }
  .actions button { padding: 4px 8px; font-size: 13px; }
  main { padding: 0 10px 32px; }
  #filter { flex-basis: 100%; order: 3; }
  .actions { order: 4; }
  .group { padding: 6px; }
  .group-bar { max-width: none; }
}
</style>
</head>
<body>
<header class="topbar">
  <div class="brand"><span class="logo" aria-hidden="true"></span><h1>Progressista</h1></div>
  <div id="conn" class="conn" data-state="connecting" role="status" aria-live="polite"><span class="dot" aria-hidden="true"></span><span id="conn-text">connecting&hellip;</span></div>
  <input id="filter" type="search" placeholder="Filter: id, description, host, meta&hellip;" aria-label="Filter tasks" autocomplete="off" spellcheck="false">
  <div class="actions">
    <button id="btn-clear-close" type="button" title="Remove all completed tasks">Clear completed</button>
    <button id="btn-clear-stale" type="button" title="Remove all tasks that need attention">Clear stale</button>
    <button id="btn-group" type="button" aria-pressed="true" title="Group tasks by the id prefix before the first colon">Group</button>
    <button id="btn-notify" type="button" aria-pressed="false" title="Browser notification when a task completes or fails">Notify</button>
  </div>
</header>
<div id="banner" class="banner" role="alert" hidden></div>
<main id="main">
  <section id="empty-hint" class="hint" hidden>
    <h2>No tasks yet</h2>
    <p>Run any script that uses tqdm with its bars sent here:</p>
    <code id="hint-run">python3 progressista.py run your_script.py</code>
    <p>or push a bar by hand:</p>
    <code id="hint-curl">curl -X POST /progress -d '{"task_id":"demo","n":1,"total":10}'</code>
  </section>
  <section id="section-active" class="section" data-status="active">
    <h2 class="section-title"><span class="section-name">Active</span><span class="count" id="count-active">0</span><span class="shown" id="shown-active" hidden></span></h2>
    <p class="empty" id="empty-active">Nothing here.</p>
    <div class="list" id="list-active"></div>
    <button type="button" class="more" id="more-active" data-status="active" hidden></button>
  </section>
  <section id="section-stale" class="section" data-status="stale">
    <h2 class="section-title"><span class="section-name">Needs Attention</span><span class="count" id="count-stale">0</span><span class="shown" id="shown-stale" hidden></span></h2>
    <p class="empty" id="empty-stale">Nothing here.</p>
    <div class="list" id="list-stale"></div>
    <button type="button" class="more" id="more-stale" data-status="stale" hidden></button>
  </section>
  <section id="section-error" class="section" data-status="error">
    <h2 class="section-title"><span class="section-name">Failed</span><span class="count" id="count-error">0</span><span class="shown" id="shown-error" hidden></span></h2>
    <p class="empty" id="empty-error">Nothing here.</p>
    <div class="list" id="list-error"></div>
    <button type="button" class="more" id="more-error" data-status="error" hidden></button>
  </section>
  <section id="section-close" class="section" data-status="close">
    <h2 class="section-title"><span class="section-name">Completed</span><span class="count" id="count-close">0</span><span class="shown" id="shown-close" hidden></span></h2>
    <p class="empty" id="empty-close">Nothing here.</p>
    <div class="list" id="list-close"></div>
    <button type="button" class="more" id="more-close" data-status="close" hidden></button>
  </section>
</main>
<div id="toast" class="toast" role="status" hidden></div>
<template id="tpl-card"><article class="card"><div class="card-head"><div class="card-titles"><div class="task-id"></div><div class="desc"></div></div><button type="button" class="discard" aria-label="Discard task">&times;</button></div><div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100"><div class="bar-fill"></div></div><div class="line stats"><span class="percent"></span><span class="progress-text"></span><span class="rate"></span></div><div class="line times"><span class="elapsed"></span><span class="eta"></span></div><div class="age"></div><div class="host"></div><div class="postfix"></div><ul class="meta"></ul><div class="error-line"></div></article></template>
<template id="tpl-group"><div class="group"><div class="group-header"><button type="button" class="group-toggle" aria-expanded="true"><span class="chev" aria-hidden="true"></span><span class="group-name"></span></button><span class="group-count"></span><span class="group-progress"></span><div class="bar group-bar"><div class="bar-fill"></div></div></div><div class="list group-body"></div></div></template>
<script>
(function () {
  'use strict';

  // ---- constants and small helpers ------------------------------------
  var STATUSES = ['active', 'stale', 'error', 'close'];
  var STUCK_AFTER = 30;    // s without progress before an active bar is called stuck
  var ALIVE_WITHIN = 45;   // s since last contact (heartbeats included) to call it alive
  var TITLE = 'Progressista';
  var $ = function (id) { return document.getElementById(id); };

  function store(key, value) {
    try {
      if (value === undefined) return window.localStorage.getItem('progressista.' + key);
      window.localStorage.setItem('progressista.' + key, value);
    } catch (e) { /* storage unavailable: settings are per page view */ }
    return null;
  }

  var params = new URLSearchParams(location.search);
  var token = params.get('token');

  function apiUrl(path, query) {
    var q = new URLSearchParams(query || {});
    if (token) q.set('token', token);
    var s = q.toString();
    return path + (s ? '?' + s : '');
  }

  // ---- formatting (tqdm-like) -------------------------------------------
  var SI = ['', 'k', 'M', 'G', 'T', 'P', 'E', 'Z'];
  function sizeof(x) {
    for (var i = 0; i < SI.length; i++) {
      var a = Math.abs(x);
      if (a < 999.5) {
        if (a < 99.95) return (a < 9.995 ? x.toFixed(2) : x.toFixed(1)) + SI[i];
        return x.toFixed(0) + SI[i];
      }
      x /= 1000;
    }
    return x.toFixed(1) + 'Y';
  }
  // Units an SI prefix joins, as in "61.3 GB" (other units read "312k row").
  var PREFIXED = { B: 1, b: 1, bit: 1, Hz: 1 };
  function fmtNum(x, scale) {
    if (typeof x !== 'number' || !isFinite(x)) return '?';
    if (!scale) return x.toLocaleString('en-US', { maximumFractionDigits: 2 });
    if (Math.abs(x) < 1000) return Number.isInteger(x) ? String(x) : String(+x.toFixed(2));
    return sizeof(x);
  }
  function withUnit(s, unit) {  // "61.3G" + "B" -> "61.3 GB"
    if (!unit) return s;
    if (!PREFIXED[unit]) return s + ' ' + unit;
    var last = s.charAt(s.length - 1);
    return /[kMGTPEZY]/.test(last) ? s.slice(0, -1) + ' ' + last + unit : s + ' ' + unit;
  }
  // "n / total unit" (or "n unit"): exact counts, as tqdm shows them, while
  // they are short; SI-scaled from 100k on, and always for bytes and the like.
  function fmtProgress(n, total, unit) {
    var big = Math.max(Math.abs(n) || 0, total ? Math.abs(total) : 0);
    var scale = PREFIXED[unit] ? big >= 1000 : big >= 1e5;
    if (!total) return withUnit(fmtNum(n, scale), unit);
    if (PREFIXED[unit]) return withUnit(fmtNum(n, scale), unit) + ' / ' + withUnit(fmtNum(total, scale), unit);
    return withUnit(fmtNum(n, scale) + ' / ' + fmtNum(total, scale), unit);
  }
  function fmtRate(rate, unit) {
    if (typeof rate !== 'number' || !isFinite(rate) || rate <= 0) return '';
    if (rate < 1) return sizeof(1 / rate) + ' s/' + unit;
    return withUnit(sizeof(rate), unit) + '/s';
  }
  function pad2(v) { return v < 10 ? '0' + v : String(v); }
  function fmtInterval(t) {
    t = Math.max(0, Math.floor(t));
    var h = Math.floor(t / 3600), m = Math.floor(t / 60) % 60, s = t % 60;
    return h ? h + ':' + pad2(m) + ':' + pad2(s) : pad2(m) + ':' + pad2(s);
  }
  function fmtAge(s) {
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm';
    var h, m, d;
    if (s < 86400) {
      h = Math.floor(s / 3600); m = Math.floor(s / 60) % 60;
      return m ? h + 'h ' + m + 'm' : h + 'h';
    }
    d = Math.floor(s / 86400); h = Math.floor(s / 3600) % 24;
    return h ? d + 'd ' + h + 'h' : d + 'd';
  }
  function num(x) { return typeof x === 'number' && isFinite(x) ? x : null; }
  function metaValue(v) {
    if (typeof v === 'string') return v;
    try { return JSON.stringify(v); } catch (e) { return String(v); }
  }

  // ---- clock ------------------------------------------------------------
  var clockOffset = 0;  // server_time - browser time, seconds
  function serverNow() { return Date.now() / 1000 + clockOffset; }

  function activityKey(t) {
    return num(t.updated_at) || num(t.seen_at) || num(t.created_at) || 0;
  }

  function ageInfo(t, now) {
    var upd = activityKey(t);
    var seen = Math.max(num(t.seen_at) || upd, upd);
    var sinceUpd = now - upd, sinceSeen = now - seen;
    if (t.status === 'close') return ['finished ' + fmtAge(sinceUpd) + ' ago', 'age'];
    if (t.status === 'error') return ['failed ' + fmtAge(sinceUpd) + ' ago', 'age'];
    if (t.status === 'active' && sinceUpd < STUCK_AFTER) return ['updated ' + fmtAge(sinceUpd) + ' ago', 'age'];
    if (sinceSeen < ALIVE_WITHIN) {
      if (seen - upd >= 1) {  // contact after the last progress: a heartbeat
        return ['no progress for ' + fmtAge(sinceUpd) + ', alive (heartbeat ' + fmtAge(sinceSeen) + ' ago)', 'age stuck'];
      }
      return ['no progress for ' + fmtAge(sinceUpd), 'age stuck'];
    }
    return ['no contact for ' + fmtAge(sinceSeen), 'age silent'];
  }

  // ---- state ------------------------------------------------------------
  // A section (and a group) keeps its items in an array sorted newest first;
  // only the first `limit` items that pass the filter are in the DOM, so the
  // cost of a frame follows what is on screen, not the number of tasks. A
  // card's element is made the first time it is shown.
  var tasks = new Map();    // task_id -> latest task object
  var cards = new Map();    // task_id -> card record
  var groups = new Map();   // status + '\n' + prefix -> group record
  var pending = new Map();  // task_id -> task object, or null for removal
  var refileAll = true;     // next render files every card again (snapshot, grouping)
  var gotSnapshot = false;
  var grouping = store('group') !== '0';
  var collapsed = new Set();
  var filterTerms = [];
  var counts = { active: 0, stale: 0, error: 0, close: 0 };
  var PAGE = 100;           // cards shown per section (group members included) before "Show more"
  var sections = {};
  STATUSES.forEach(function (s) {
    sections[s] = {
      status: s, items: [], limit: PAGE, sort: false, dirty: true, matching: 0, beyond: 0,
      list: $('list-' + s), count: $('count-' + s), shown: $('shown-' + s),
      empty: $('empty-' + s), more: $('more-' + s)
    };
  });
  var tplCard = $('tpl-card').content.firstElementChild;
  var tplGroup = $('tpl-group').content.firstElementChild;
  var byKey = function (a, b) { return b.key - a.key; };

  function prefixOf(id) {
    var i = id.indexOf(':');
    return i > 0 ? id.slice(0, i) : null;
  }

  function setText(el, s) {
    if (el._t === s) return;
    el._t = s;
    var node = el.firstChild;
    if (node && node.nodeType === 3 && !node.nextSibling) node.data = s;
    else el.textContent = s;
  }
  function setHidden(el, yes) {
    if (el._h !== yes) { el._h = yes; el.hidden = yes; }
  }
  function setShown(el, s) {  // text, hidden when empty
    setText(el, s);
    setHidden(el, !s);
  }
  function setTitle(el, s) {
    if (el._title !== s) { el._title = s; el.title = s; }
  }

  // ---- incoming messages ------------------------------------------------
  var notifyQueue = [];

  function noteTransition(prev, t) {
    if (!notifyOn || !prev || prev.status === t.status) return;
    if (t.status === 'close' || t.status === 'error') notifyQueue.push(t);
  }

  function applyMessage(msg) {
    if (!msg || typeof msg !== 'object') return;
    if (typeof msg.server_time === 'number') clockOffset = msg.server_time - Date.now() / 1000;
    var incoming = msg.tasks && typeof msg.tasks === 'object' ? msg.tasks : {};
    var id, t, prev;
    if (msg.type === 'snapshot') {
      var next = new Map();
      for (id in incoming) {
        t = incoming[id];
        if (!t || typeof t !== 'object') continue;
        t.task_id = id;
        noteTransition(tasks.get(id), t);
        next.set(id, t);
      }
      tasks.forEach(function (_, oldId) { if (!next.has(oldId)) pending.set(oldId, null); });
      tasks.clear();
      next.forEach(function (task, tid) { tasks.set(tid, task); pending.set(tid, task); });
      refileAll = true;
      gotSnapshot = true;
    } else if (msg.type === 'delta') {
      for (id in incoming) {
        t = incoming[id];
        if (!t || typeof t !== 'object') continue;
        prev = tasks.get(id);
        t.task_id = id;
        noteTransition(prev, t);
        tasks.set(id, t);
        pending.set(id, t);
      }
      var removed = Array.isArray(msg.removed) ? msg.removed : [];
      for (var i = 0; i < removed.length; i++) {
        id = String(removed[i]);
        tasks.delete(id);
        pending.set(id, null);
      }
    } else {
      return;
    }
    if (notifyQueue.length) flushNotifications();
    schedule();
  }

  function removeLocal(ids) {
    ids.forEach(function (id) {
      if (tasks.delete(id)) pending.set(id, null);
    });
    schedule();
  }

  // ---- render scheduling ------------------------------------------------
  var frame = 0, timer = 0;
  function schedule() {
    if (frame || timer) return;
    if (document.hidden) timer = setTimeout(renderNow, 1000);
    else frame = requestAnimationFrame(renderNow);
  }
  function renderNow() {
    if (frame) cancelAnimationFrame(frame);
    if (timer) clearTimeout(timer);
    frame = timer = 0;
    render();
  }

  // ---- cards ------------------------------------------------------------
  function newRecord(id) {
    return { id: id, t: null, el: null, status: null, group: null, key: 0, match: true,
      search: null, painted: false, metaKey: null, pct: null, cN: 0, cT: 0 };
  }

  function cardElement(rec) {
    if (rec.el) return rec.el;
    // walk #tpl-card's fixed structure (cheaper than a querySelector per field)
    var el = tplCard.cloneNode(true), head = el.firstElementChild, titles = head.firstElementChild;
    var stats, times, discard = titles.nextElementSibling;
    rec.el = el;
    rec.idEl = titles.firstElementChild; rec.descEl = rec.idEl.nextElementSibling;
    rec.bar = head.nextElementSibling; rec.fill = rec.bar.firstElementChild;
    stats = rec.bar.nextElementSibling; times = stats.nextElementSibling;
    rec.percent = stats.children[0]; rec.progress = stats.children[1]; rec.rate = stats.children[2];
    rec.elapsed = times.children[0]; rec.eta = times.children[1];
    rec.age = times.nextElementSibling; rec.host = rec.age.nextElementSibling;
    rec.postfix = rec.host.nextElementSibling; rec.meta = rec.postfix.nextElementSibling;
    rec.error = rec.meta.nextElementSibling;
    el.dataset.taskId = rec.id;
    setText(rec.idEl, rec.id);
    rec.idEl.title = rec.id;
    discard.setAttribute('aria-label', 'Discard task ' + rec.id);
    discard.title = 'Discard';
    setHidden(rec.meta, true);
    return el;
  }

  function searchOf(rec) {
    if (rec.search === null) {
      var t = rec.t, parts = [rec.id, t.desc == null ? '' : t.desc, t.host == null ? '' : t.host];
      var meta = t.meta && typeof t.meta === 'object' ? t.meta : null;
      for (var k in meta) parts.push(k, metaValue(meta[k]));
      rec.search = parts.join('\n').toLowerCase();
    }
    return rec.search;
  }

  // Write a card's DOM from its task (only for cards that are shown).
  function paint(rec, now) {
    var t = rec.t, el = cardElement(rec), status = t.status;
    rec.painted = true;
    if (el._status !== status) { el._status = status; el.className = 'card ' + status; el.dataset.status = status; }
    var desc = t.desc == null ? '' : String(t.desc);
    setShown(rec.descEl, desc);
    setTitle(rec.descEl, desc);

    var n = num(t.n) || 0, total = num(t.total), rate = num(t.rate), elapsed = num(t.elapsed);
    if (!(total > 0)) total = null;
    var unit = t.unit ? String(t.unit) : 'it';
    var mode, pct = null;
    if (total) {
      pct = Math.min(100, Math.max(0, n / total * 100));
      mode = 'bar';
    } else {
      mode = status === 'active' ? 'bar indeterminate' : 'bar unknown';
    }
    if (rec.bar._mode !== mode) { rec.bar._mode = mode; rec.bar.className = mode; }
    var w = pct === null ? '' : pct.toFixed(2) + '%';
    if (rec.pct !== w) {
      rec.pct = w;
      rec.fill.style.width = w;
      if (pct === null) rec.bar.removeAttribute('aria-valuenow');
      else rec.bar.setAttribute('aria-valuenow', String(Math.floor(pct)));
    }
    setShown(rec.percent, pct === null ? '' : (n >= total ? '100' : String(Math.min(99, Math.floor(pct)))) + '%');
    setText(rec.progress, fmtProgress(n, total, unit));
    setShown(rec.rate, fmtRate(rate, unit));
    setShown(rec.elapsed, elapsed === null ? '' : 'elapsed ' + fmtInterval(elapsed));
    setAge(rec, now);

    var host = t.host == null ? '' : String(t.host);
    if (t.pid != null) host += (host ? ' \u00b7 ' : '') + 'pid ' + t.pid;
    setShown(rec.host, host);
    setShown(rec.postfix, t.postfix == null ? '' : String(t.postfix));
    var err = t.error == null ? '' : String(t.error);
    setShown(rec.error, err);
    setTitle(rec.error, err);

    var meta = t.meta && typeof t.meta === 'object' ? t.meta : null;
    var metaKey = meta ? metaValue(meta) : '';
    if (metaKey !== rec.metaKey) {
      rec.metaKey = metaKey;
      rec.meta.textContent = '';
      var keys = meta ? Object.keys(meta) : [];
      for (var i = 0; i < keys.length; i++) {
        var chip = document.createElement('li');
        var text = keys[i] + '=' + metaValue(meta[keys[i]]);
        chip.className = 'meta-chip';
        chip.textContent = text;
        chip.title = text;
        rec.meta.appendChild(chip);
      }
      setHidden(rec.meta, keys.length === 0);
    }
  }

  // The ticking part of a card: its age line, and the ETA while progress is recent.
  function setAge(rec, now) {
    var t = rec.t, info = ageInfo(t, now);
    setText(rec.age, info[0]);
    if (rec.age._cls !== info[1]) { rec.age._cls = info[1]; rec.age.className = info[1]; }
    var n = num(t.n) || 0, total = num(t.total), rate = num(t.rate), eta = '';
    if (t.status === 'active' && total > n && rate > 0 && info[1] === 'age') {
      eta = 'ETA ' + fmtInterval((total - n) / rate);
    }
    setShown(rec.eta, eta);
  }

  // ---- groups -----------------------------------------------------------
  function getGroup(status, prefix) {
    var gkey = status + '\n' + prefix;
    var g = groups.get(gkey);
    if (!g) {
      var el = tplGroup.cloneNode(true);
      g = {
        isGroup: true, gkey: gkey, status: status, prefix: prefix, el: el, items: [], size: 0, key: 0,
        win: [], take: 0, matching: 0, lone: null, collapsed: collapsed.has(prefix),
        sort: false, dirty: true, summary: true, bodyDirty: true,
        body: el.querySelector('.group-body'), toggle: el.querySelector('.group-toggle'),
        name: el.querySelector('.group-name'), count: el.querySelector('.group-count'),
        progress: el.querySelector('.group-progress'), bar: el.querySelector('.group-bar'),
        fill: el.querySelector('.bar-fill')
      };
      el._group = g;
      el.dataset.group = prefix;
      el.dataset.status = status;
      setText(g.name, prefix);
      g.name.title = prefix;
      setCollapsed(g, g.collapsed);
      groups.set(gkey, g);
    }
    return g;
  }

  function setCollapsed(g, yes) {
    g.collapsed = yes;
    g.dirty = true;
    setHidden(g.body, yes);
    g.el.classList.toggle('collapsed', yes);
    g.toggle.setAttribute('aria-expanded', yes ? 'false' : 'true');
  }

  function updateGroup(g) {
    var sumN = 0, sumT = 0, withTotal = 0, unit = null, sameUnit = true;
    for (var i = 0; i < g.items.length; i++) {
      var t = g.items[i].t, n = num(t.n) || 0, total = num(t.total), u = t.unit || 'it';
      if (total > 0) { sumN += n; sumT += total; withTotal++; }
      if (unit === null) unit = u; else if (unit !== u) sameUnit = false;
    }
    var size = g.items.length;
    setText(g.count, size + (size === 1 ? ' task' : ' tasks'));
    var text = '', w = '';
    if (withTotal) {
      var pct = Math.min(100, sumN / sumT * 100);
      text = fmtProgress(sumN, sumT, sameUnit && unit ? unit : '') + ' \u00b7 ' +
        (sumN >= sumT ? 100 : Math.min(99, Math.floor(pct))) + '%';
      if (withTotal < size) text += ' (' + withTotal + ' of ' + size + ' with a total)';
      w = pct.toFixed(2) + '%';
    }
    setText(g.progress, text);
    setHidden(g.bar, !withTotal);
    if (g.fill._w !== w) { g.fill._w = w; g.fill.style.width = w; }
  }

  // Sort a group's members, refresh its header, count those passing the filter.
  function settleGroup(g) {
    var sec = sections[g.status];
    if (!g.size) {
      groups.delete(g.gkey);
      sec.sort = sec.dirty = sec.stale = true;
      return;
    }
    if (g.sort) {
      if (g.stale) g.items = g.items.filter(function (r) { return r.group === g; });
      g.stale = false;
      g.items.sort(byKey);
      g.sort = false;
      g.dirty = true;
    }
    if (g.summary) { updateGroup(g); g.summary = false; }
    if (g.dirty) {
      var matching = 0, lone = null;
      for (var i = 0; i < g.items.length; i++) {
        if (g.items[i].match && !matching++) lone = g.items[i];
      }
      // a group with one shown member is no box: that card sits in the
      // section's list, in its own place by activity
      g.lone = matching === 1 ? lone : null;
      var key = (g.lone || g.items[0]).key;
      if (key !== g.key) { g.key = key; sec.sort = true; }
      g.matching = matching;
      g.dirty = false;
      g.bodyDirty = true;
      sec.dirty = true;
    }
  }

  // ---- filing and rendering -----------------------------------------------
  function file(rec, status) {
    rec.status = status;
    counts[status]++;
    var prefix = grouping ? prefixOf(rec.id) : null, box = sections[status];
    if (prefix !== null) {
      var g = getGroup(status, prefix);
      if (!g.listed) { g.listed = true; box.items.push(g); box.sort = box.dirty = true; }
      g.size++;
      g.summary = true;
      rec.group = g;
      box = g;
    }
    box.items.push(rec);
    box.sort = box.dirty = true;
  }

  function unfile(rec) {
    if (!rec.status) return;
    counts[rec.status]--;
    var box = rec.group || sections[rec.status];
    box.sort = box.dirty = true;
    box.stale = true;  // its entry in box.items is dropped at the next sort, this frame
    if (rec.group) { rec.group.size--; rec.group.summary = true; }
    rec.status = null;
    rec.group = null;
  }

  function refile() {
    refileAll = false;
    STATUSES.forEach(function (s) {
      var sec = sections[s];
      counts[s] = 0;
      sec.items = [];
      sec.sort = sec.dirty = true;
      sec.stale = false;
    });
    groups.forEach(function (g) {
      g.items = [];
      g.size = 0;
      g.sort = g.dirty = g.summary = true;
      g.stale = g.listed = false;
    });
    cards.forEach(function (rec) { rec.status = null; rec.group = null; file(rec, rec.t.status); });
  }

  // Make container's element children exactly the items of win, in order,
  // touching only what differs.
  var stamp = 0;
  function reconcile(container, win, now) {
    var mark = ++stamp, i, el, next;
    for (i = 0; i < win.length; i++) (win[i].isGroup ? win[i].el : cardElement(win[i]))._stamp = mark;
    for (el = container.firstElementChild; el; el = next) {
      next = el.nextElementSibling;
      if (el._stamp !== mark) el.remove();
    }
    var c = container.firstElementChild;
    for (i = 0; i < win.length; i++) {
      var it = win[i];
      el = it.el;
      // a group coming back into the list brings its body along: members
      // changed while it was out of the page are repainted there
      var back = !el.parentNode;
      if (!it.isGroup) {
        if (!it.painted) paint(it, now);
        else if (back) setAge(it, now);
      }
      if (c === el) c = c.nextElementSibling;
      else container.insertBefore(el, c);
      if (it.isGroup && (it.bodyDirty || back)) {
        reconcile(it.body, it.win, now);
        it.bodyDirty = false;
      }
    }
  }

  function renderSection(sec, now) {
    if (sec.sort) {
      if (sec.stale) {
        sec.items = sec.items.filter(function (it) {
          return it.isGroup ? groups.get(it.gkey) === it : it.status === sec.status && !it.group;
        });
        sec.stale = false;
      }
      sec.items.sort(byKey);
      sec.sort = false;
    }
    // the budget counts cards; a group takes what is left of it for its
    // members (a collapsed group costs one line)
    var win = [], matching = 0, beyond = 0, budget = sec.limit;
    for (var i = 0; i < sec.items.length; i++) {
      var it = sec.items[i], m = it.isGroup ? it.matching : (it.match ? 1 : 0);
      if (!m) continue;
      matching += m;
      if (budget <= 0) { beyond += m; continue; }
      if (it.isGroup && it.lone) { win.push(it.lone); budget--; it.take = -1; continue; }
      win.push(it);
      if (!it.isGroup) { budget--; continue; }
      var take = it.collapsed ? 0 : Math.min(m, budget);
      budget -= it.collapsed ? 1 : take;
      if (!it.collapsed) beyond += m - take;
      if (take !== it.take || it.bodyDirty) {
        var gw = [];
        for (var j = 0; j < it.items.length && gw.length < take; j++) if (it.items[j].match) gw.push(it.items[j]);
        it.win = gw;
        it.take = take;
        it.bodyDirty = true;
      }
    }
    reconcile(sec.list, win, now);
    sec.matching = matching;
    sec.beyond = beyond;
    sec.dirty = false;
  }

  function render() {
    var now = serverNow(), filtering = filterTerms.length > 0;
    pending.forEach(function (t, id) {
      var rec = cards.get(id);
      if (t === null) {
        if (rec) { unfile(rec); contribute(rec, null); if (rec.el) rec.el.remove(); cards.delete(id); }
        return;
      }
      if (!rec) { rec = newRecord(id); cards.set(id, rec); }
      if (STATUSES.indexOf(t.status) < 0) t.status = 'active';
      rec.t = t;
      rec.search = null;
      rec.painted = false;
      contribute(rec, t);
      var match = filtering ? matches(searchOf(rec)) : true, key = activityKey(t);
      if (refileAll) { rec.key = key; rec.match = match; return; }
      if (rec.status !== t.status) {
        unfile(rec);
        rec.key = key;
        rec.match = match;
        file(rec, t.status);
      } else {
        var box = rec.group || sections[rec.status];
        if (key !== rec.key) { rec.key = key; box.sort = box.dirty = true; }
        if (match !== rec.match) { rec.match = match; box.dirty = true; }
        if (rec.group) rec.group.summary = true;
      }
      if (rec.el && rec.el.isConnected) paint(rec, now);
    });
    pending.clear();
    if (refileAll) refile();
    groups.forEach(function (g) { if (!g.size || g.sort || g.dirty || g.summary) settleGroup(g); });
    STATUSES.forEach(function (s) { if (sections[s].dirty || sections[s].sort) renderSection(sections[s], now); });
    updateChrome();
  }

  // ---- filter -------------------------------------------------------------
  function matches(search) {
    for (var i = 0; i < filterTerms.length; i++) {
      if (search.indexOf(filterTerms[i]) < 0) return false;
    }
    return true;
  }

  function applyFilter() {
    var value = $('filter').value.trim().toLowerCase();
    filterTerms = value ? value.split(/\s+/) : [];
    var filtering = filterTerms.length > 0;
    cards.forEach(function (rec) {
      var m = filtering ? matches(searchOf(rec)) : true;
      if (m !== rec.match && rec.status) {
        rec.match = m;
        (rec.group || sections[rec.status]).dirty = true;
      }
    });
    renderNow();
  }

  // ---- counts, empty lines, title ----------------------------------------
  function updateChrome() {
    var filtering = filterTerms.length > 0;
    STATUSES.forEach(function (s) {
      var sec = sections[s], matching = sec.matching;
      setText(sec.count, String(counts[s]));
      setShown(sec.shown, filtering && counts[s] ? matching + (matching === 1 ? ' match' : ' matches') : '');
      setShown(sec.more, sec.beyond > 0 ? 'Show ' + PAGE + ' more (' + sec.beyond + ' not shown)' : '');
      setHidden(sec.empty, matching > 0);
      setText(sec.empty, filtering && counts[s] ? 'No matches.' : 'Nothing here.');
    });
    $('btn-clear-close').disabled = counts.close === 0;
    $('btn-clear-stale').disabled = counts.stale === 0;
    setHidden($('empty-hint'), !(gotSnapshot && cards.size === 0));
    document.body.classList.toggle('many', cards.size > 300);
    updateTitle(false);
  }

  // Overall progress of the running (active + stale) bars with a known total,
  // kept as running sums by render() and recomputed exactly once a second.
  var progN = 0, progT = 0;
  function contribute(rec, t) {
    var total = t && (t.status === 'active' || t.status === 'stale') ? num(t.total) : null;
    var n = total > 0 ? Math.min(Math.max(num(t.n) || 0, 0), total) : 0;
    if (!(total > 0)) total = 0;
    progN += n - (rec.cN || 0);
    progT += total - (rec.cT || 0);
    rec.cN = n;
    rec.cT = total;
  }

  function updateTitle(exact) {
    if (exact) {
      progN = progT = 0;
      cards.forEach(function (rec) { progN += rec.cN; progT += rec.cT; });
    }
    var running = counts.active + counts.stale, title = TITLE;
    if (running) {
      title = '(' + running + ' active' + (progT > 0 ? ', ' + Math.floor(Math.min(progN / progT, 1) * 100 + 1e-9) + '%' : '') + ') ' + TITLE;
    }
    if (document.title !== title) document.title = title;
  }

  function tick() {
    updateConnText();
    if (!document.hidden) {
      var now = serverNow();
      cards.forEach(function (rec) { if (rec.el && rec.el.isConnected) setAge(rec, now); });
    }
    updateTitle(true);
  }

  // ---- REST actions ---------------------------------------------------------
  var toastTimer = 0;
  function toast(text) {
    var el = $('toast');
    el.textContent = text;
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { el.hidden = true; }, 5000);
  }

  function request(method, path, query) {
    return fetch(apiUrl(path, query), { method: method, cache: 'no-store', headers: { Accept: 'application/json' } })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (body) {
          if (!r.ok) throw new Error((body && body.error) || ('HTTP ' + r.status));
          return body;
        });
      });
  }

  function discard(id, button) {
    button.disabled = true;
    request('DELETE', '/tasks/' + encodeURIComponent(id)).then(function (body) {
      if (body.removed === true || body.removed === false) removeLocal([id]);
    }).catch(function (e) {
      button.disabled = false;
      toast('Could not discard ' + id + ': ' + e.message);
    });
  }

  function clearStatus(status, button, label) {
    button.disabled = true;
    request('DELETE', '/tasks', { status: status }).then(function (body) {
      if (Array.isArray(body.removed)) removeLocal(body.removed.map(String));
    }).catch(function (e) {
      toast('Could not clear ' + label + ': ' + e.message);
    }).then(function () { button.disabled = counts[status] === 0; });
  }

  // ---- notifications --------------------------------------------------------
  var notifyOn = false;
  var notifyBtn = $('btn-notify');
  var canNotify = typeof window.Notification === 'function';

  function updateNotifyButton() {
    if (!canNotify) { notifyBtn.hidden = true; return; }
    var perm = Notification.permission;
    notifyBtn.disabled = perm === 'denied';
    notifyBtn.setAttribute('aria-pressed', notifyOn ? 'true' : 'false');
    notifyBtn.textContent = perm === 'denied' ? 'Notify: blocked' : 'Notify';
    notifyBtn.title = perm === 'denied' ? 'Notifications are blocked in this browser'
      : 'Browser notification when a task completes or fails (' + (notifyOn ? 'on' : 'off') + ')';
  }

  function flushNotifications() {
    var list = notifyQueue;
    notifyQueue = [];
    if (!notifyOn || !canNotify || Notification.permission !== 'granted') return;
    try {
      if (list.length > 3) {
        var failed = list.filter(function (t) { return t.status === 'error'; }).length;
        new Notification('Progressista: ' + list.length + ' tasks ended', {
          body: (list.length - failed) + ' completed, ' + failed + ' failed', tag: 'progressista-batch'
        });
        return;
      }
      list.forEach(function (t) {
        var failedOne = t.status === 'error';
        new Notification((failedOne ? 'Failed: ' : 'Completed: ') + t.task_id, {
          body: failedOne ? String(t.error || t.desc || '') : String(t.desc || ''), tag: 'progressista-' + t.task_id
        });
      });
    } catch (e) { /* some platforms only allow service-worker notifications */ }
  }

  notifyBtn.addEventListener('click', function () {
    if (notifyOn) {
      notifyOn = false;
      store('notify', '0');
      updateNotifyButton();
      return;
    }
    var done = function (perm) {
      notifyOn = perm === 'granted';
      store('notify', notifyOn ? '1' : '0');
      updateNotifyButton();
    };
    try {
      var p = Notification.requestPermission(done);
      if (p && p.then) p.then(done);
    } catch (e) { updateNotifyButton(); }
  });
  if (canNotify) notifyOn = Notification.permission === 'granted' && store('notify') === '1';
  updateNotifyButton();

  // ---- connection -----------------------------------------------------------
  var ws = null, attempt = 0, retryTimer = 0, retryAt = 0, connState = 'connecting', authBlocked = false;
  var wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + apiUrl('/ws');

  function setConn(state) {
    connState = state;
    $('conn').dataset.state = state;
    document.body.classList.toggle('disconnected', state !== 'live' && gotSnapshot);
    updateConnText();
  }

  function updateConnText() {
    var text;
    switch (connState) {
      case 'live': text = 'live'; break;
      case 'connecting': text = 'connecting\u2026'; break;
      case 'unauthorized': text = 'unauthorized'; break;
      case 'offline': text = 'offline'; break;
      default:
        var left = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
        text = retryTimer && left > 0 ? 'reconnecting in ' + left + 's' : 'reconnecting\u2026';
    }
    setText($('conn-text'), text);
  }

  function showBanner(text) {
    var b = $('banner');
    if (text) b.textContent = text;
    b.hidden = !text;
  }

  function parseJson(text) {
    try { return JSON.parse(text); } catch (e) { /* maybe bare NaN / Infinity */ }
    try {
      return JSON.parse(String(text).replace(/("(?:[^"\\]|\\.)*")|-?\bInfinity\b|\bNaN\b/g,
        function (m, str) { return str || 'null'; }));
    } catch (e) { return null; }
  }

  // The first attempt opens the socket at once. Later attempts ask /health
  // first: a server that is down then costs one failed request per attempt,
  // and a token problem is told apart from a network one.
  var probing = false;
  function connect() {
    clearTimeout(retryTimer);
    retryTimer = 0;
    if (ws || probing) return;
    if (attempt === 0 && !authBlocked) { openSocket(); return; }
    probing = true;
    if (!authBlocked) setConn('reconnecting');
    probe(function (health) {
      probing = false;
      if (!health) backoff();
      else if (health.auth_required && !health.authorized) blockAuth();
      else openSocket();
    });
  }

  function probe(done) {
    fetch(apiUrl('/health'), { cache: 'no-store' })
      .then(function (r) { return r.json(); })
      .then(done, function () { done(null); });
  }

  function openSocket() {
    if (!authBlocked) setConn(attempt ? 'reconnecting' : 'connecting');
    var sock, heard = false;
    try { sock = new WebSocket(wsUrl); } catch (e) { backoff(); return; }
    ws = sock;
    sock.onmessage = function (ev) {
      var msg = parseJson(ev.data);
      heard = true;
      if (msg && msg.type === 'snapshot') {
        attempt = 0;
        authBlocked = false;
        showBanner('');
        applyMessage(msg);
        setConn('live');
        return;
      }
      applyMessage(msg);
    };
    sock.onclose = function () {
      if (ws !== sock) return;
      ws = null;
      if (heard) { backoff(); return; }
      probe(function (health) {
        if (health && health.auth_required && !health.authorized) blockAuth();
        else backoff();
      });
    };
  }

  function blockAuth() {
    authBlocked = true;
    setConn('unauthorized');
    showBanner(token
      ? 'Unauthorized: the token in the URL was not accepted. Add ?token=... with a valid token to the URL.'
      : 'Unauthorized: this server needs a token. Add ?token=... to the URL.');
    scheduleRetry(30);
  }

  function backoff() {
    authBlocked = false;
    showBanner('');
    var delay = Math.min(10, 0.5 * Math.pow(2, attempt)) * (0.8 + Math.random() * 0.4);
    attempt++;
    scheduleRetry(delay);
    setConn(navigator.onLine === false ? 'offline' : 'reconnecting');
  }

  function scheduleRetry(seconds) {
    clearTimeout(retryTimer);
    retryAt = Date.now() + seconds * 1000;
    retryTimer = setTimeout(connect, seconds * 1000);
  }

  window.addEventListener('online', function () { if (!ws && !authBlocked) connect(); });
  window.addEventListener('offline', function () { if (!ws) setConn('offline'); });

  // ---- wiring -----------------------------------------------------------------
  var filterFrame = 0;
  $('filter').addEventListener('input', function () {
    if (!filterFrame) filterFrame = requestAnimationFrame(function () { filterFrame = 0; applyFilter(); });
  });
  document.addEventListener('keydown', function (e) {
    var f = $('filter');
    if (e.key === '/' && document.activeElement !== f && !(e.target && /^(INPUT|TEXTAREA)$/.test(e.target.tagName))) {
      e.preventDefault();
      f.focus();
    } else if (e.key === 'Escape' && document.activeElement === f && f.value) {
      f.value = '';
      applyFilter();
    }
  });

  $('main').addEventListener('click', function (e) {
    var target = e.target;
    var btn = target.closest && target.closest('.discard');
    if (btn) {
      var card = btn.closest('.card');
      if (card) discard(card.dataset.taskId, btn);
      return;
    }
    var more = target.closest && target.closest('.more');
    if (more) {
      var box = more.dataset.status ? sections[more.dataset.status] : more.closest('.group')._group;
      box.limit += PAGE;
      box.dirty = true;
      renderNow();
      return;
    }
    var toggle = target.closest && target.closest('.group-toggle');
    if (toggle) {
      var g = toggle.closest('.group')._group;
      var yes = !g.collapsed;
      if (yes) collapsed.add(g.prefix); else collapsed.delete(g.prefix);
      groups.forEach(function (other) { if (other.prefix === g.prefix) setCollapsed(other, yes); });
      renderNow();
    }
  });

  $('btn-clear-close').addEventListener('click', function () { clearStatus('close', this, 'completed tasks'); });
  $('btn-clear-stale').addEventListener('click', function () { clearStatus('stale', this, 'stale tasks'); });

  var groupBtn = $('btn-group');
  function updateGroupButton() {
    groupBtn.setAttribute('aria-pressed', grouping ? 'true' : 'false');
    groupBtn.title = 'Group tasks by the id prefix before the first colon (' + (grouping ? 'on' : 'off') + ')';
  }
  groupBtn.addEventListener('click', function () {
    grouping = !grouping;
    store('group', grouping ? '1' : '0');
    updateGroupButton();
    refileAll = true;
    renderNow();
  });
  updateGroupButton();

  document.addEventListener('visibilitychange', function () {
    if (!document.hidden) { if (timer) renderNow(); tick(); }
  });

  var origin = location.origin && location.origin !== 'null' ? location.origin : 'http://localhost:8000';
  $('hint-run').textContent = 'PROGRESSISTA_SERVER_URL=' + origin + '/progress python3 progressista.py run your_script.py';
  $('hint-curl').textContent = 'curl -X POST ' + origin + "/progress -d '" + '{"task_id":"demo","n":1,"total":10}' + "'";

  window.__progressista = {
    tasks: tasks,
    cards: cards,
    applyMessage: applyMessage,
    renderNow: renderNow
  };

  setInterval(tick, 1000);
  updateChrome();
  connect();
})();
</script>
</body>
</html>
'''
INDEX_HTML_BYTES = INDEX_HTML.encode("utf-8")


# -- cli ---------------------------------------------------------------------

def demo(server_url=None, duration=20.0):
    """Push a handful of bars in every state, for a look at the dashboard."""
    cls = _remote_class(_import_tqdm().tqdm)
    run_id = "demo-%s" % time.strftime("%H%M%S")
    quiet = dict(server_url=server_url, file=_NullFile(), mininterval=0.05)
    for _ in cls(range(120), desc="finished: 120 files copied", unit="file",
                 task_id=run_id + ":finished", **quiet):
        time.sleep(0.005)
    try:
        with cls(total=100, desc="fails at row 37", unit="row",
                 task_id=run_id + ":failed", **quiet) as bar:
            for row in range(100):
                if row == 37:
                    raise ValueError("bad row 37")
                bar.update(1)
                time.sleep(0.01)
    except ValueError:
        pass
    stalled = cls(total=100, desc="stalls at 40% (alive, no progress)",
                  task_id=run_id + ":stalled", **quiet)
    stalled.update(40)
    running = cls(total=3000, desc="running: training epoch 3", unit="batch",
                  task_id=run_id + ":running", **quiet)
    unknown = cls(desc="streaming, total unknown", unit="B", unit_scale=True,
                  task_id=run_id + ":unknown-total", **quiet)
    with_meta = cls(total=500, desc="with meta", unit="img", task_id=run_id + ":meta",
                    meta={"model": "resnet50", "lr": 0.0003, "gpu": 0, "dataset": "imagenet"},
                    **quiet)
    deadline = time.monotonic() + duration if duration else float("inf")
    try:
        while time.monotonic() < deadline:
            running.update(3)
            unknown.update(48_000)
            with_meta.update(1)
            running.set_postfix(loss="%.3f" % (2.0 / (1 + running.n / 300)))
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    for bar in (running, unknown, with_meta, stalled):
        bar.close()
    return 0


def _env_list(*names):
    values = []
    for name in names:
        values.extend(v.strip() for v in os.environ.get(name, "").split(",") if v.strip())
    return values


def _build_parser():
    import argparse
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="progressista", description="tqdm progress bars from anywhere, live in a browser.")
    parser.add_argument("--version", action="version", version="progressista " + __version__)
    parser.add_argument("--log-level", default=env("PROGRESSISTA_LOG_LEVEL", "INFO"),
                        help="DEBUG shows every request (default INFO)")
    commands = parser.add_subparsers(dest="command", metavar="{serve,run,demo}")
    commands.required = True

    p = commands.add_parser("serve", help="run the server and dashboard")
    p.add_argument("--host", default=env("PROGRESSISTA_HOST", "127.0.0.1"),
                   help="address to bind ($PROGRESSISTA_HOST; default 127.0.0.1, loopback only)")
    p.add_argument("--port", default=env("PROGRESSISTA_PORT", "8000"),
                   help="port ($PROGRESSISTA_PORT; default 8000; 0 picks a free one)")
    p.add_argument("--token", action="append", default=None,
                   help="API token, repeatable ($PROGRESSISTA_API_TOKEN, $PROGRESSISTA_API_TOKENS)")
    p.add_argument("--db", default=env("PROGRESSISTA_DB"),
                   help="SQLite file to keep tasks in ($PROGRESSISTA_DB; default memory only)")
    p.add_argument("--stale-seconds", default=env("PROGRESSISTA_STALE_SECONDS", "0"),
                   help="no progress for this long: Needs Attention (default 0, off)")
    p.add_argument("--retention-seconds", default=env("PROGRESSISTA_RETENTION_SECONDS", "86400"),
                   help="forget ended tasks after this long (default 86400)")
    p.add_argument("--allow-origin", action="append", default=None,
                   help="web origin allowed cross-site, repeatable ($PROGRESSISTA_ALLOW_ORIGINS)")
    p.add_argument("--max-tasks", default=env("PROGRESSISTA_MAX_TASKS", "100000"),
                   help="task cap; the oldest ended tasks are evicted first (default 100000)")

    p = commands.add_parser("run", help="run a script or module with every tqdm bar remote",
                            usage="progressista run [options] (script.py | -m module) [-- args]")
    p.add_argument("-m", dest="module", help="run a module, as python -m does")
    p.add_argument("target", nargs="?", help="the script to run")
    p.add_argument("--server-url", help="where to POST ($PROGRESSISTA_SERVER_URL)")
    p.add_argument("--push-every", help="least seconds between sends of one bar")
    p.add_argument("--token", help="API token ($PROGRESSISTA_API_TOKEN)")
    p.add_argument("--meta", help="JSON object attached to every bar")

    p = commands.add_parser("demo", help="push a few bars in every state to a server")
    p.add_argument("--server-url", help="where to POST ($PROGRESSISTA_SERVER_URL)")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds to keep the live bars moving (0: until Ctrl-C)")
    return parser


def _number(parser, name, text, kind=float, minimum=0):
    try:
        value = kind(text)
        if value < minimum or (kind is float and not math.isfinite(value)):
            raise ValueError
        return value
    except (TypeError, ValueError):
        parser.error("%s must be a number >= %s, got %r" % (name, minimum, text))


_RUN_VALUED = ("-m", "--server-url", "--push-every", "--token", "--meta", "--log-level")


def _split_run_args(argv):
    """Split ``run`` arguments into ours and the target's.

    As with ``python script.py args``, everything after the script (or ``-m
    module``) is the target's, and a ``--`` right after it is dropped.  Our
    own options may also stand between the target and a ``--``:
    ``run train.py --server-url URL -- --lr 3``.
    """
    i = 1
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return argv[:i], argv[i + 1:]
        if token == "-m":
            i += 1
            break
        if token in _RUN_VALUED:
            i += 2
        elif token.startswith("-"):
            i += 1
        else:
            break
    else:
        return argv, []
    ours, rest = argv[:i + 1], argv[i + 1:]
    if "--" in rest:
        cut = rest.index("--")
        between, k = rest[:cut], 0
        while k < len(between) and between[k] in _RUN_VALUED[1:]:
            k += 2
        if k == len(between):
            return ours + between, rest[cut + 1:]
    return ours, rest


def main(argv=None):
    """The command line: ``serve``, ``run`` and ``demo``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    script_args = []
    if argv[:1] == ["run"]:
        argv, script_args = _split_run_args(argv)
    args = parser.parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        parser.error("--log-level must be DEBUG, INFO, WARNING or ERROR")
    if args.command != "run":  # a run target configures logging itself, as under python
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.command == "serve":
        tokens = args.token or _env_list("PROGRESSISTA_API_TOKEN", "PROGRESSISTA_API_TOKENS")
        origins = args.allow_origin or _env_list("PROGRESSISTA_ALLOW_ORIGINS")
        options = dict(
            tokens=tokens, db=args.db, allow_origins=origins,
            stale_seconds=_number(parser, "--stale-seconds", args.stale_seconds),
            retention_seconds=_number(parser, "--retention-seconds", args.retention_seconds),
            max_tasks=_number(parser, "--max-tasks", args.max_tasks, int, 1))
        port = _number(parser, "--port", args.port, int)
        if port > 65535:
            parser.error("--port must be 0..65535")
        try:
            serve(args.host, port, **options)
        except DatabaseError as exc:
            print("progressista: error: %s" % exc, file=sys.stderr)
            return 1
        except OSError as exc:
            print("progressista: error: cannot listen on %s:%s: %s"
                  % (args.host, port, exc.strerror or exc), file=sys.stderr)
            return 1
        return 0

    if args.command == "demo":
        url = args.server_url or os.environ.get("PROGRESSISTA_SERVER_URL") or DEFAULT_SERVER_URL
        print("Pushing demo bars to %s%s. The stalled one moves to Needs Attention when "
              "the server runs with --stale-seconds (e.g. 10)." % (
                  url, " for %g s" % args.duration if args.duration else " until Ctrl-C"),
              flush=True)
        return demo(args.server_url, args.duration)

    # run
    if args.module and args.target:
        parser.error("run takes a script or -m module, not both")
    target = args.module or args.target
    if not target:
        parser.error("run needs a script path or -m module")
    options = {}
    if args.server_url:
        options["server_url"] = args.server_url
    if args.push_every is not None:
        options["push_every"] = _number(parser, "--push-every", args.push_every)
    if args.token:
        options["token"] = args.token
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except ValueError as exc:
            parser.error("--meta must be a JSON object: %s" % exc)
        if not isinstance(meta, dict):
            parser.error("--meta must be a JSON object, like '{\"run\": 7}'")
        options["meta"] = meta
    if not args.module and not os.path.exists(target):
        parser.error("no such script: %s" % target)
    return run(target, script_args, module=bool(args.module), **options)


def _register_aliases():
    """``progressista.client`` and ``progressista.patch`` are this module too.

    Run as a script, the module is also registered as ``progressista`` so that
    a target importing it gets this same module, not a second copy.  Vendored
    under another name, the aliases follow that name and never clash.
    """
    module = sys.modules[__name__]
    base = "progressista" if __name__ == "__main__" else __name__
    if __name__ == "__main__":
        sys.modules.setdefault("progressista", module)
    for sub in ("client", "patch"):
        sys.modules.setdefault(base + "." + sub, module)


client = patch = sys.modules[__name__]
_register_aliases()

if __name__ == "__main__":
    sys.exit(main())
