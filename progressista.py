#!/usr/bin/env python3
"""Progressista: tqdm progress bars from anywhere, live in one browser tab.

Workers on any number of processes and machines push their ``tqdm`` bars to
one small server; a dashboard in the browser shows them all, live.

    $ python3 progressista.py serve                 # the server and dashboard
    $ python3 progressista.py run train.py -- --lr 3e-4   # every tqdm remote
    $ python3 progressista.py watch                 # the same live view, in a terminal
    $ python3 progressista.py wait run-7 && ./next-step.sh

    >>> from progressista import RemoteTqdm          # or: drop-in, by hand
    >>> for batch in RemoteTqdm(loader, desc="epoch 1", meta={"lr": 3e-4}):
    ...     step(batch)

The whole tool is this one file, in this order: the client (``RemoteTqdm``),
the patcher, the store, alerts (webhooks), the WebSocket (RFC 6455, server
and client side), the HTTP server (stdlib ``http.server``), the terminal view
(``watch``, ``wait``), the embedded dashboard and the command line.  Copy it anywhere.  The server side
needs only the standard library; ``tqdm`` is imported when a bar is made.

License: MIT.
"""

import atexit
import base64
import codecs
import collections
import errno
import hashlib
import heapq
import hmac
import http.client
import io
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
    "Notifier", "Webhook", "notify_test",
    "WebSocketClient", "HandshakeRefused", "watch", "wait",
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
# Three heartbeats missed: the page and ``watch`` show an open task as "no
# contact" (its process was killed, or its close was lost), stale or not.
NO_CONTACT_SECONDS = 3 * HEARTBEAT_SECONDS
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


def _seconds_setting(name, value, defaults, env, fallback):
    """``(name, seconds)``: the keyword, else install()'s default, else the
    environment's, checked and named as the user gave it (for what a refusal
    says)."""
    if value is None:
        value = defaults.get(name)
    if value is None:
        name, value = env, _env_float(env, fallback)
    return name, _seconds(name, value)


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
        final = _Final(bar, payload, now + _early_close_hold() if hold else 0.0,
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
                bar, payload = final.bar, final.payload
                batch = groups.setdefault(bar._pst_route(), [])
                if bar._pst_sig is None and bar._pst_open_status == "start":
                    # A bar reusing the id of one that ended, ending before its
                    # first send: reopen the task first, or the server takes
                    # this close for a late one of the bar before.
                    opening = {k: v for k, v in payload.items() if k != "error"}
                    opening["status"] = "start"
                    batch.append((bar, opening, None, None))
                batch.append((bar, payload, None, final))
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
    _hook_ipython()  # a notebook cell's exception never reaches the hooks above


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


# Ids from the scheduler (SPEC section 8): one id per rank or array task,
# reused by the bars a process makes one after another; a bar made while
# another is open takes the lowest free "/k".
_job_slots = {}  # id from the environment -> slots (1, 2, ...) held by open bars
_job_lock = threading.RLock()  # re-entrant: tqdm's __del__ may close a bar inside


def _size_from(text):
    """An expected group size from the environment: a positive integer, or None."""
    text = (text or "").strip()
    return int(text) if text.isdigit() and 0 < int(text) <= 10 ** 9 else None


def _job_from_env(environ=None):
    """``(task id, expected group size)`` from the scheduler's variables, or
    ``(None, None)`` outside of one.  First match wins."""
    env = os.environ if environ is None else environ
    get = env.get
    if get("PROGRESSISTA_JOB"):
        return ("%s:%s-%d" % (get("PROGRESSISTA_JOB"), _HOST, os.getpid()),
                _size_from(get("PROGRESSISTA_GROUP_SIZE")))
    if get("SLURM_ARRAY_JOB_ID") and get("SLURM_ARRAY_TASK_ID"):
        return ("slurm-%s:%s" % (get("SLURM_ARRAY_JOB_ID"), get("SLURM_ARRAY_TASK_ID")),
                _size_from(get("SLURM_ARRAY_TASK_COUNT")))
    if get("SLURM_JOB_ID") and get("SLURM_PROCID"):
        return ("slurm-%s:rank-%s" % (get("SLURM_JOB_ID"), get("SLURM_PROCID")),
                _size_from(get("SLURM_NTASKS")))
    if get("RANK") and get("WORLD_SIZE"):
        run_id = get("TORCHELASTIC_RUN_ID")
        if not run_id or run_id == "none":  # torchrun's default --rdzv-id names no run
            run_id = "%s-%s" % (get("MASTER_ADDR", ""), get("MASTER_PORT", ""))
        return "torch-%s:rank-%s" % (run_id, get("RANK")), _size_from(get("WORLD_SIZE"))
    return None, None


def _default_task_id():
    """``(task id, slot to release at close or None, expected size or None)``."""
    base, size = _job_from_env()
    if base is None:  # a counter, not id(self): a freed bar's address comes back
        return "%s:%d-%d-%d" % (_HOST, time.time() * 1000, os.getpid(),
                                next(_bar_numbers)), None, None
    base = base[:MAX_ID - 8]  # room for "/k"
    with _job_lock:
        held = _job_slots.setdefault(base, set())
        k = 1
        while k in held:
            k += 1
        held.add(k)
    return (base if k == 1 else "%s/%d" % (base, k)), (base, k), size


def _release_slot(slot):
    with _job_lock:
        held = _job_slots.get(slot[0])
        if held is not None:
            held.discard(slot[1])
            if not held:
                del _job_slots[slot[0]]


def _checked_group_size(value):
    """The ``group_size`` keyword: a positive integer, or None with one line on stderr."""
    if value is None:
        return None
    import operator
    if type(value) is not bool:
        try:
            number = operator.index(value)
            if 0 < number <= 10 ** 9:
                return number
        except TypeError:
            pass
    try:
        print("progressista: group_size must be a positive integer, got %r: not sent"
              % (value,), file=sys.stderr)
    except Exception:
        pass
    return None


class _RemoteMixin:
    """What ``RemoteTqdm`` adds to a tqdm class: the remote half.

    Nothing here runs per iteration.  The sender thread reads ``n``, ``total``
    and the rest from the bar on its own schedule; the job only pays at
    construction and at ``close()``.
    """

    _pst_closed = True  # until __init__ succeeds, close() is local only
    _pst_slot = None  # (id from the environment, k) while this bar holds "/k"
    _pst_open_status = "update"  # the status of an open bar's sends after the first
    _pst_entry = None   # the sender's schedule entry that counts for this bar
    _pst_changed_at = 0.0  # when the sender last saw the bar change (monotonic)

    def __init__(self, *args, server_url=None, task_id=None, push_every=None,
                 request_timeout=None, meta=None, headers=None, group_size=None, **kwargs):
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
            self._pst_settle(server_url, task_id, push_every, request_timeout, meta, headers,
                             group_size)
            self._pst_closed = False
            _get_sender().register(self)
        except Exception as exc:  # a bad argument: this bar stays local, the job goes on
            self._pst_closed = True
            _say("%s; this bar is not reported" % (
                exc if isinstance(exc, _BadSetting) else _summarize(exc)))

    def _pst_settle(self, server_url, task_id, push_every, request_timeout, meta, headers,
                    group_size=None):
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
        # Without one, the id is chosen last (_default_task_id), once nothing can fail.
        self._pst_id = None
        if not (task_id is None or (isinstance(task_id, str) and not task_id)):
            self._pst_id = str(task_id)[:256]
            try:
                self._pst_id.encode("utf-8")
            except UnicodeEncodeError:
                raise _BadSetting("task_id %r is not valid Unicode text"
                                  % self._pst_id[:40]) from None
        self._pst_every = max(0.0, _seconds_setting(
            "push_every", push_every, defaults, "PROGRESSISTA_PUSH_INTERVAL", 0.25)[1])
        name, timeout = _seconds_setting("request_timeout", request_timeout, defaults,
                                         "PROGRESSISTA_REQUEST_TIMEOUT", 2.0)
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
        size = group_size if group_size is not None else defaults.get("group_size")
        if self._pst_id is None:
            self._pst_id, self._pst_slot, env_size = _default_task_id()
            if self._pst_slot is not None:
                # The id is reused: say "start" every time, so this bar reopens
                # it even if the last bar's close arrives after our first send.
                self._pst_open_status = "start"
            if size is None:
                size = env_size
        self._pst_group_size = _checked_group_size(size)

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
        payload = {
            "task_id": self._pst_id,
            "n": max(_finite(self.n) or 0, 0),
            "total": total if total is None or total >= 0 else None,
            "desc": str(desc)[:1024] if desc else None,
            "unit": str(self.unit)[:64],
            "status": status or self._pst_open_status,
            "rate": _finite(rate),
            "elapsed": _finite(elapsed),
            "error": error[:4096] if error else None,
            "meta": self._pst_meta,
            "postfix": str(postfix)[:1024] if postfix else None,
            "host": _HOST,
            "pid": self._pst_pid,
            "timestamp": time.time(),
        }
        if self._pst_group_size is not None:
            payload["group_size"] = self._pst_group_size
        return payload

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
        if self._pst_slot is not None:  # the next bar of this process may take the id
            _release_slot(self._pst_slot)
            self._pst_slot = None
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
(a JSON-able dict), ``headers`` (``Authorization: Bearer
$PROGRESSISTA_API_TOKEN`` when set) and ``group_size`` (how many members the
bar's group will have).  An argument the remote half can't use leaves a plain
local bar and one line on stderr; it never raises.

Without ``task_id``, a bar started by Slurm, torchrun or under
$PROGRESSISTA_JOB takes its id (and group size) from the environment: one
id per rank or array task, reused by bars made one after another, with
``/2``, ``/3``... for a bar made while another is open.
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


# tqdm modules patched when they are imported rather than by install(): a
# notebook kernel imports IPython after sitecustomize has run, and tqdm.auto
# and tqdm.autonotebook decide at import time between a widget and a text bar;
# tqdm.notebook imports IPython and ipywidgets (0.3 s) that a script may never use.
_LAZY_MODULES = ("tqdm.auto", "tqdm.autonotebook", "tqdm.asyncio", "tqdm.notebook")


def install(server_url=None, **defaults):
    """Make every ``tqdm`` bar made from now on a remote one.

    Replaces the bar classes of ``tqdm``, ``tqdm.std``, ``tqdm.auto``,
    ``tqdm.autonotebook``, ``tqdm.asyncio`` and ``tqdm.notebook`` (and their
    ``trange`` helpers), then every module attribute anywhere that still
    points at one of the originals (``from tqdm import tqdm`` done earlier).
    Of these modules, the ones not imported yet are patched when they are, so
    that ``tqdm.auto`` still picks a widget under a notebook kernel started
    after the patch, and a plain script never imports IPython.
    ``defaults`` are ``RemoteTqdm`` keywords (``push_every``, ``meta``,
    ``headers``, ``request_timeout``, ``token``, ``group_size``) for bars that
    don't set them.
    Call it from ``sitecustomize.py``; ``uninstall()`` undoes it.
    """
    _import_tqdm()
    uninstall()
    token = defaults.pop("token", None)
    if token:
        defaults["headers"] = dict(defaults.get("headers") or {},
                                   Authorization="Bearer " + token)
    _install_defaults.clear()
    _install_defaults.update(defaults, server_url=server_url)
    with _patch_lock:
        _patch_loaded()
    if _import_hook not in sys.meta_path:
        sys.meta_path.insert(0, _import_hook)


def _patch_loaded():
    """Patch the tqdm modules imported so far, and every name bound to their bars."""
    replacements = {}  # id(original) -> (original, replacement)
    for module_name in _PATCH_MODULES:
        module = sys.modules.get(module_name)
        if module is None or module_name in _import_hook.running:
            continue  # not imported yet (the import hook will), or half-imported
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


def _unpatch():
    """Every patched name gets its original back (the defaults stay)."""
    while _patched:
        module, name, original = _patched.pop()
        try:
            setattr(module, name, original)
        except Exception:
            pass


def uninstall():
    """Undo ``install()``: every patched name gets its original back."""
    try:
        sys.meta_path.remove(_import_hook)
    except ValueError:
        pass
    with _patch_lock:
        _unpatch()
    _install_defaults.clear()


_patch_lock = threading.RLock()  # guards _patched


class _TqdmImportHook:
    """Patches ``tqdm.auto`` and its kin when they are imported after install().

    A meta path finder that only wraps the loader of those few modules: the
    module runs against the unpatched tqdm (so its classes are built on the
    originals and ``tqdm.auto`` makes the choice it would make without us),
    then everything loaded is patched again, exactly as install() would have.
    """

    def __init__(self):
        self.local = threading.local()  # this thread's depth of wrapped imports
        self.running = set()  # names of the wrapped modules being executed

    def find_spec(self, name, path=None, target=None):
        if name not in _LAZY_MODULES or getattr(self.local, "finding", False):
            return None
        import importlib.util
        self.local.finding = True
        try:
            spec = importlib.util.find_spec(name)
        except Exception:
            return None
        finally:
            self.local.finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchingLoader(spec.loader, self)
        return spec


class _PatchingLoader:
    """The real loader of a lazily patched tqdm module, patching after it runs."""

    def __init__(self, loader, hook):
        self.loader, self.hook = loader, hook

    def __getattr__(self, name):  # get_source, is_package... as the real one
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        local = self.hook.local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        self.hook.running.add(module.__name__)
        try:
            if depth == 0:
                with _patch_lock:
                    _unpatch()
            self.loader.exec_module(module)
        finally:
            self.hook.running.discard(module.__name__)
            local.depth = depth
            if depth == 0 and _import_hook in sys.meta_path:  # still installed
                with _patch_lock:
                    _unpatch()
                    _patch_loaded()


_import_hook = _TqdmImportHook()


# IPython catches the exception that ends a cell, so neither sys.excepthook nor
# the exit hook ever sees it: a loop left by it would end as completed.  Where
# IPython runs (a notebook kernel, the ipython shell), a loop closed early in a
# cell holds its final state until the cell ends, and the cell's error decides.

CELL_HOLD = 10.0  # at most this long, for a cell that carries on after the loop
_cell_thread = None  # the thread running the current cell, between pre and post_run_cell


def _hook_ipython():
    """Follow IPython's cells, when this process runs them; called once, on the first bar."""
    global _cell_thread
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        if shell is None:
            return
        shell.events.register("pre_run_cell", _pre_run_cell)
        shell.events.register("post_run_cell", _post_run_cell)
    except Exception:  # an IPython too old, or something that only looks like it
        return
    _cell_thread = threading.main_thread().ident  # the first bar is made in a cell


def _pre_run_cell(info=None):
    global _cell_thread
    _cell_thread = threading.get_ident()


def _post_run_cell(result=None):
    """The cell ended: its early-closed loops end ``error`` if it failed, else ``close``."""
    global _cell_thread
    thread, _cell_thread = _cell_thread, None
    sender, error = _sender, getattr(result, "error_in_exec", None)
    if sender is None or thread is None:
        return
    try:
        summary = _summarize(error) if error is not None else None
        with sender.lock:
            for final in sender.finals.values():
                if final.hold_until and final.thread == thread:
                    if summary:
                        final.payload["status"], final.payload["error"] = "error", summary
                    final.hold_until = 0.0
        sender.wake.set()
    except Exception:
        pass


def _early_close_hold():
    """How long a loop closed by GeneratorExit on this thread waits to learn why."""
    return CELL_HOLD if _cell_thread == threading.get_ident() else EARLY_CLOSE_HOLD


def run(target, args=(), module=False, **options):
    """Run a script (or ``module=True``: a module) as ``__main__``, every bar remote.

    ``sys.argv`` is what the target would see, and ``__file__`` is absolute,
    as under ``python``; returns its exit status.  An uncaught exception
    prints its traceback, marks the open bars ``error`` and returns 1.
    ``options`` go to ``install()``, here and in every Python child the
    target starts (see ``_children_site``).
    """
    import runpy
    import traceback
    install(**options)
    sys.argv = [target] + list(args)  # for a module, runpy swaps in its path
    sys.path.insert(0, os.getcwd() if module else os.path.dirname(os.path.abspath(target)))
    site_dir, pythonpath = _children_site(options), os.environ.get("PYTHONPATH")
    if site_dir:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site_dir, pythonpath]))
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif os.path.isfile(target) and not target.endswith((".pyc", ".pyo")):
            _run_file(target)
        else:  # a directory or zip with __main__.py, or compiled code
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
    finally:
        if site_dir:
            if pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = pythonpath
            import shutil
            shutil.rmtree(site_dir, ignore_errors=True)
    return 0


def _run_file(target):
    """``runpy.run_path`` for a plain script, with ``__file__`` absolute.

    Python 3.9+ makes a script's ``__file__`` (and so its tracebacks)
    absolute but leaves ``sys.argv[0]`` as typed; run_path would give the
    path it is given to both.  Scripts that chdir and then open files next
    to ``__file__`` (Hydra does) need the absolute one.
    """
    import builtins
    import io
    import types
    path = os.path.abspath(target)
    with io.open_code(path) as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __cached__=None, __loader__=None, __package__=None,
                         __spec__=None, __builtins__=builtins)
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    finally:
        sys.modules["__main__"] = saved


# What the children of ``run`` find first on their PYTHONPATH.  It runs the
# sitecustomize it hides (Python imports only the first one on the path), then
# loads this very file and installs the patch with run's options.  Nothing in
# it may break the child: a Python without tqdm just runs unreported.
_CHILD_SITECUSTOMIZE = '''\
"""Written by `progressista run`: every Python child of the job reports its bars."""
import sys


def _progressista_child(name, path, options):
    import importlib, importlib.machinery, importlib.util, json, os
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if not (p and os.path.abspath(p) == here)]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if spec is not None and spec.loader is not None:  # the one this file hides
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # as site.py reports it, and carry on
            if sys.flags.verbose:
                sys.excepthook(*sys.exc_info())
            else:
                sys.stderr.write("Error in sitecustomize; set PYTHONVERBOSE for traceback:\\n"
                                 "%%s: %%s\\n" %% (exc.__class__.__name__, exc))
    try:
        module = sys.modules.get(name)
        if module is None and "." in name:
            # Vendored (mypkg._vendor.progressista): import it with its packages,
            # from where the parent found it; by file alone, the child's own
            # import of the package would break later.
            root = path
            for _ in name.split("."):
                root = os.path.dirname(root)
            sys.path.insert(0, root)
            try:
                module = importlib.import_module(name)
            finally:
                sys.path.remove(root)
        elif module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        module.install(**json.loads(options))
    except Exception:
        pass


try:
    _progressista_child(%r, %r, %r)
except Exception:  # an odd interpreter runs unreported, never broken
    pass
del _progressista_child
'''


def _children_site(options):
    """A new directory holding ``sitecustomize.py`` for run's children, or None.

    ``run`` puts it first on its children's ``PYTHONPATH``, so that a Python
    child started fresh (``multiprocessing`` with ``spawn`` or ``forkserver``,
    ``subprocess.run([sys.executable, ...])``) reports with the same server,
    token and meta as the target; forked children inherit the patch anyway.
    """
    import tempfile
    try:
        text = json.dumps(options, default=str)
        site_dir = tempfile.mkdtemp(prefix="progressista-run-")  # 0700: the token is in it
    except (TypeError, ValueError, OSError):
        return None
    name = "progressista" if __name__ == "__main__" else __name__
    try:
        with open(os.path.join(site_dir, "sitecustomize.py"), "w", encoding="utf-8") as f:
            f.write(_CHILD_SITECUSTOMIZE % (name, os.path.abspath(__file__), text))
    except OSError:
        import shutil
        shutil.rmtree(site_dir, ignore_errors=True)
        return None
    return site_dir


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


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_META_DEPTH = 32


def _lone_surrogate(value):
    """True if a string anywhere in ``value`` (keys too) holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif kind is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
    return False


def parse_json(body):
    """Bytes to JSON, strictly: UTF-8, no NaN/Infinity, bounded nesting, and
    no lone surrogate (``"\\udc80"``) in any string, keys included."""
    try:
        text = body.decode("utf-8")
        data = _decoder.decode(text)
        # Valid UTF-8 has no surrogates: only a \u escape can make one.
        if "\\u" in text and _SURROGATE_ESCAPE.search(text) and _lone_surrogate(data):
            raise BadRequest("invalid JSON: a lone surrogate (\\ud800-\\udfff) is not text")
        return data
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest("invalid JSON: %s" % exc) from None


MAX_ID = 256
MAX_GROUP_SIZE = 10 ** 9
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


def _meta_problem(meta):
    """What makes ``meta`` unfit to keep and send on, or None.

    Nested more than ``MAX_META_DEPTH`` levels (no reader should ever hit a
    recursion limit), a non-finite number (``1e999`` parses to infinity,
    which no browser's JSON takes), a lone surrogate in a string or key.
    """
    stack = [(meta, 1)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            if depth > MAX_META_DEPTH:
                return "nests deeper than %d levels" % MAX_META_DEPTH
            for child in (item.values() if kind is dict else item):
                stack.append((child, depth + 1))
            if kind is dict:
                stack.extend((key, depth) for key in item)
        elif kind is float:
            if not math.isfinite(item):
                return "holds a number that is not finite"
        elif kind is str:
            if not item.isascii() and _lone_surrogate(item):
                return "holds a lone surrogate, which is not text"
        elif not (item is None or kind is bool or kind is int):
            return "holds a value that is not JSON"
    return None


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
            if not value.isascii() and _lone_surrogate(value):
                raise BadRequest("%s holds a lone surrogate, which is not text" % key)
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
            problem = _meta_problem(value)
            if problem:
                raise BadRequest("meta " + problem)
            if len(_dumps(value)) > MAX_META:
                raise BadRequest("meta is larger than %d bytes" % MAX_META)
        elif key == "pid":
            if value is not None and type(value) is not int:
                raise BadRequest("pid must be an integer")
        elif key == "group_size":  # bool is no int here: type(), not isinstance()
            if value is not None and (type(value) is not int or not 1 <= value <= MAX_GROUP_SIZE):
                raise BadRequest("group_size must be an integer from 1 to %d" % MAX_GROUP_SIZE)


def _new_task(task_id, now):
    return {"task_id": task_id, "desc": None, "n": 0, "total": None, "unit": None,
            "status": "active", "rate": None, "elapsed": None, "error": None,
            "meta": None, "host": None, "pid": None, "postfix": None, "group_size": None,
            "created_at": now, "updated_at": now, "seen_at": now}


JSON_CHUNK = 1000  # tasks per piece when a big task map is streamed
# The task index is also kept split in this many buckets (by hash of the id),
# so a snapshot is encoded one bucket per short hold of the store lock.
SNAPSHOT_BUCKETS = 256
_encode = json.JSONEncoder(separators=(",", ":")).encode  # _dumps, minus making an encoder


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
        self._buckets = [{} for _ in range(SNAPSHOT_BUCKETS)]  # the same tasks, split
        self._live = collections.OrderedDict()
        self._stale = collections.OrderedDict()
        self._ended = collections.OrderedDict()
        self.dirty, self.removed = set(), set()
        # '"id":{task}' texts of tasks unchanged since a snapshot encoded them:
        # valid while the id is not in dirty, dropped when the hub takes it.
        self.encoded = {}
        self.persist = False  # set by the database: track db_dirty/db_removed too
        self.db_dirty, self.db_removed = set(), set()
        self.updates_received = 0
        self.updates_rejected = 0
        self._groups = {}  # group name -> _Group: its tasks and counts, kept as tasks change
        self.group_sizes = {}  # group name -> latest expected size (update field group_size)
        self.on_status = None  # alerts: on_status(task, old status or None), lock held

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
        before = None if task is None else task["status"]
        if task is None:
            task = self.tasks[task_id] = _new_task(task_id, now)
            self._buckets[hash(task_id) % SNAPSHOT_BUCKETS][task_id] = task
            self._live[task_id] = None
            self.removed.discard(task_id)  # removed and made again: a delta says it once
            self._group_add(task)
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
        if update.get("group_size") is not None:
            self._set_group_size(task, update["group_size"])
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
        if task["status"] != old:
            self._group_move(task_id, old, task["status"])
        self.dirty.add(task_id)
        if self.persist:
            self.db_dirty.add(task_id)
        if self.on_status is not None and task["status"] != before:
            self.on_status(task, before)

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
        self._buckets[hash(task_id) % SNAPSHOT_BUCKETS].pop(task_id, None)
        {"active": self._live, "stale": self._stale}.get(task["status"], self._ended).pop(
            task_id, None)
        self._group_discard(task)
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
                    self._group_move(task_id, "active", "stale")
                    self.dirty.add(task_id)
                    if self.persist:
                        self.db_dirty.add(task_id)
                    if self.on_status is not None:
                        self.on_status(task, "active")
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
                size = task.get("group_size")
                if type(size) is not int or not 1 <= size <= MAX_GROUP_SIZE:
                    size = None  # a file from before group sizes, or a bad value: unknown
                task["group_size"] = size
                self.tasks[task_id] = task
                self._buckets[hash(task_id) % SNAPSHOT_BUCKETS][task_id] = task
                {"active": self._live}.get(task["status"], self._ended)[task_id] = None
                self._group_add(task)
                if size is not None:  # saved on its tasks: the latest one's is the group's
                    self.group_sizes[_group_of(task_id)] = size
            for name, size in self.group_sizes.items():
                for task in self._groups[name].tasks.values():
                    task["group_size"] = size
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
        """A copy of the index (of tasks in ``statuses``), to encode outside the lock.

        Copied a bucket per lock hold, so a big store never holds up ingest
        for long; a task lives in one bucket for good, so none is seen twice.
        """
        selected = {}
        for bucket in self._buckets:
            with self.lock:
                if statuses is None:
                    selected.update(bucket)
                else:
                    selected.update((k, t) for k, t in bucket.items() if t["status"] in statuses)
        return selected

    def encode_bucket(self, index):
        """Bucket ``index`` as JSON object members (no braces), under the lock.

        A task's text is kept until it changes, so the next dashboard to
        connect mostly joins strings: a reload of a page on 100,000 tasks
        costs milliseconds of encoding, not a second.
        """
        with self.lock:
            cache, dirty, parts = self.encoded, self.dirty, []
            for task_id, task in self._buckets[index].items():
                text = cache.get(task_id)
                if text is None or task_id in dirty:
                    text = _encode({task_id: task})[1:-1]
                    if task_id not in dirty:
                        cache[task_id] = text
                parts.append(text)
            return ",".join(parts)

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
        cache = self.encoded
        if cache:
            for task_id in dirty:
                cache.pop(task_id, None)
            for task_id in removed:
                cache.pop(task_id, None)
        return {k: self.tasks[k] for k in dirty}, list(removed)

    # Groups (SPEC section 8): a job's ranks or array tasks, by task id prefix.

    def _group_add(self, task):
        task_id = task["task_id"]
        name = _group_of(task_id)
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group()
        group.tasks[task_id] = task
        member = _member_of(task_id)
        group.members[member] = group.members.get(member, 0) + 1
        group.counts[task["status"]] += 1
        size = self.group_sizes.get(name)
        if size is not None:
            task["group_size"] = size

    def _group_discard(self, task):
        task_id = task["task_id"]
        name = _group_of(task_id)
        group = self._groups[name]
        del group.tasks[task_id]
        if not group.tasks:  # an empty group is forgotten, its size too
            del self._groups[name]
            self.group_sizes.pop(name, None)
            return
        member = _member_of(task_id)
        left = group.members[member] - 1
        if left:
            group.members[member] = left
        else:
            del group.members[member]
        group.counts[task["status"]] -= 1

    def _group_move(self, task_id, old, new):
        counts = self._groups[_group_of(task_id)].counts
        counts[old] -= 1
        counts[new] += 1

    def _set_group_size(self, task, size):
        """The latest size wins, and every task of the group shows it.

        Touching all of the group's tasks happens only when the size changes
        (a job sends one size from every member), never on a plain update.
        """
        name = _group_of(task["task_id"])
        if self.group_sizes.get(name) == size:
            task["group_size"] = size
            return
        self.group_sizes[name] = size
        for task_id, member_task in self._groups[name].tasks.items():
            if member_task["group_size"] != size:
                member_task["group_size"] = size
                self.dirty.add(task_id)
                if self.persist:
                    self.db_dirty.add(task_id)

    def groups(self, statuses=None):
        """``{name: entry}`` of every group, or of those with a task in ``statuses``.

        The lock is held only to copy each group's task list and counts; the
        sums are made outside it (as ``/tasks`` encodes outside it).
        """
        with self.lock:
            copies = [(name, list(group.tasks.values()), dict(group.counts),
                       len(group.members), self.group_sizes.get(name))
                      for name, group in self._groups.items()
                      if statuses is None or any(group.counts[s] for s in statuses)]
        return {copy[0]: _group_entry(*copy[1:]) for copy in copies}

    def group(self, name):
        """One group's entry (as in :meth:`groups`), or None when it has no task."""
        with self.lock:
            group = self._groups.get(name)
            if group is None:
                return None
            copy = (list(group.tasks.values()), dict(group.counts), len(group.members),
                    self.group_sizes.get(name))
        return _group_entry(*copy)


class _Group:
    """One group's index: its tasks (id -> task), members (-> task count), counts."""

    __slots__ = ("tasks", "members", "counts")

    def __init__(self):
        self.tasks, self.members = {}, {}
        self.counts = dict.fromkeys(STATUSES, 0)


def _is_main_bar(task_id):
    """A member's main bar: its task without ``/k`` (``run:rank-3``, not ``run:rank-3/2``)."""
    head, colon, tail = task_id.partition(":")
    return not colon or "/" not in tail


def _group_entry(tasks, counts, members, expected):
    """A group as ``/groups`` shows it, from its tasks (read without the lock:
    a value changed meanwhile is as fresh as a ``/tasks`` answer).

    Sums are over main bars; ``rate`` and ``eta`` over the active ones (an
    ended bar makes no more progress, and what a failed one left undone will
    not be done).
    """
    n = total = rate = remaining = mains = 0
    active = False
    created_at = updated_at = None
    for task in tasks:
        created, updated = task["created_at"], task["updated_at"]
        if created_at is None or created < created_at:
            created_at = created
        if updated_at is None or updated > updated_at:
            updated_at = updated
        if not _is_main_bar(task["task_id"]):
            continue
        mains += 1
        task_n, task_total = task["n"], task["total"]
        try:  # an int near float64's limit plus a float overflows: the sums become unknown
            n += task_n
            if total is not None:
                total = None if task_total is None else total + task_total
            if task["status"] == "active":
                active = True
                rate += task["rate"] or 0
                if remaining is not None:
                    remaining = None if task_total is None \
                        else remaining + max(0, task_total - task_n)
        except (OverflowError, TypeError):
            n = total = rate = remaining = float("nan")
    eta = None
    if active and remaining is not None and rate > 0:
        try:
            eta = _finite(remaining / rate)
        except OverflowError:
            pass
    done = counts["active"] == 0 and counts["stale"] == 0 and (
        expected is None or members >= expected)
    return {"tasks": len(tasks), "members": members, "expected": expected, "counts": counts,
            "n": _finite(n), "total": _finite(total) if mains else None, "rate": _finite(rate),
            "eta": eta, "created_at": created_at, "updated_at": updated_at, "done": done}


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

    log_every = 60.0  # seconds between two log lines about failing writes

    def __init__(self, path, store, interval=0.5):
        self.path, self.store, self.interval = path, store, interval
        self.conn = None
        self.lock = threading.Lock()
        self.thread = None
        self.stopping = threading.Event()
        self.write_errors = 0  # failed flushes, for /metrics
        self.trouble = None  # why writes fail now (for /health), None while they work
        self._logged_at = None

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
            except sqlite3.Error:
                pass  # counted and logged by flush; the next one retries
            except Exception as exc:  # whatever it is, keep the thread: the next flush retries
                self._failed(exc, traceback=True)

    def _failed(self, exc, traceback=False):
        """A flush failed: count it, say why on /health, log it once a minute at most."""
        self.write_errors += 1
        self.trouble = "database writes to %s failing: %s" % (self.path, exc)
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self.log_every:
            self._logged_at = now
            log.error("writing %s failed (%d times so far): %s; updates are kept in memory "
                      "and written when it works again (said once a minute)",
                      self.path, self.write_errors, exc, exc_info=traceback)

    def _worked(self):
        if self.trouble is not None:
            self.trouble = self._logged_at = None
            log.warning("writing %s works again: every update is saved", self.path)

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
                try:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the rows go back to dirty below either way
                with store.lock:  # put them back, so the next flush retries
                    store.db_dirty.update(k for k, _ in rows if k in store.tasks)
                    store.db_removed.update(removed)
                self._failed(sys.exc_info()[1])
                raise
            self._worked()
        return len(rows) + len(removed)

    def stop(self):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(5)
        try:
            self.flush()
        except sqlite3.Error as exc:  # flush logged it, rate-limited: say what it cost
            log.error("could not write the last updates to %s at shutdown (%s): they are "
                      "lost", self.path, exc)
        finally:
            self.close()

    def close(self):
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


# -- alerts ------------------------------------------------------------------
#
# The server tells people who aren't watching.  The store calls
# ``Notifier.observe`` (under its lock) whenever a task's status changes; that
# is one append to a queue.  One thread gathers what came in for a window
# from the first event, checks then which of the groups that ended are still
# done, and sends each webhook one digest with everything.

NOTIFY_EVENTS = ("fail", "stall", "finish", "done")
DEFAULT_NOTIFY_ON = ("fail", "stall", "done")
_STATUS_EVENT = {"error": "fail", "stale": "stall", "close": "finish"}
_NOTIFY_PREFIXES = (("slack+", "slack"), ("discord+", "discord"), ("ntfy+", "ntfy"))
DISCORD_MAX = 2000  # characters of a Discord message


def parse_notify_events(text):
    """``"fail,done"`` to a tuple of events; ValueError names the bad one."""
    events = tuple(dict.fromkeys(e.strip() for e in str(text).split(",") if e.strip()))
    for event in events:
        if event not in NOTIFY_EVENTS:
            raise ValueError("unknown event %r: use any of %s" % (event, ", ".join(NOTIFY_EVENTS)))
    if not events:
        raise ValueError("no events given: use any of %s" % ", ".join(NOTIFY_EVENTS))
    return events


def _url_for_log(url):
    """Scheme and host of a webhook URL, all a log line may show of it (the path is
    the secret)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(bad URL)"
    if ":" in host:
        host = "[%s]" % host
    return "%s://%s%s" % (parts.scheme, host, ":%d" % port if port else "")


class Webhook:
    """One ``--notify`` URL: its kind (``json``, ``slack``, ``discord``,
    ``ntfy``) and the URL it posts to, the kind's prefix removed.

    ``str()`` is the scheme and host only, safe to log.
    """

    def __init__(self, url):
        kind, target = "json", str(url)
        for prefix, name in _NOTIFY_PREFIXES:
            if target.startswith(prefix):
                kind, target = name, target[len(prefix):]
                break
        try:
            parts = urllib.parse.urlsplit(target)
            parts.port  # a bad port raises here, not later on the delivery thread
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            shown = _url_for_log(target) if "://" in target else "a URL without http(s)://"
            raise ValueError(
                "not a webhook URL (%s): use http(s)://..., slack+https://..., "
                "discord+https://... or ntfy+https://host/topic" % shown)
        if kind == "ntfy" and parts.path.strip("/") == "":
            raise ValueError("an ntfy URL needs its topic: ntfy+https://host/topic")
        self.kind = kind
        self.headers = {}
        if parts.username is not None:  # user:password@ becomes Basic auth (ntfy's way)
            auth = "%s:%s" % (urllib.parse.unquote(parts.username),
                              urllib.parse.unquote(parts.password or ""))
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
            netloc = parts.netloc.rpartition("@")[2]
            target = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        self.url = target
        self.safe = _url_for_log(target)

    def __str__(self):
        return self.safe if self.kind == "json" else "%s %s" % (self.kind, self.safe)

    def request(self, text, events=(), title="Progressista"):
        """The body and headers this kind of receiver takes for one message."""
        headers = dict(self.headers, **{"User-Agent": "progressista/" + __version__})
        if self.kind == "ntfy":
            headers["Content-Type"] = "text/plain; charset=utf-8"
            headers["Title"] = _header_text(title)
            if any(e["event"] == "fail" for e in events):
                headers["Priority"] = "high"
            return text.encode("utf-8"), headers
        headers["Content-Type"] = "application/json"
        if self.kind == "slack":
            # Slack reads <...> as links and mentions (<!channel>): a task's text must not.
            text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            body = {"text": text}
        elif self.kind == "discord":
            if len(text) > DISCORD_MAX:
                text = text[:DISCORD_MAX - 1] + "…"
            body = {"content": text, "allowed_mentions": {"parse": []}}  # no @everyone
        else:
            body = {"text": text, "events": list(events)}
        return _dumps(body).encode("utf-8"), headers

    def send(self, text, events=(), title="Progressista", timeout=5.0):
        """One attempt: the HTTP status, or None and the reason when nothing answered."""
        import urllib.error
        import urllib.request
        body, headers = self.request(text, events, title)
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with _webhook_opener(self.url.startswith("https:")).open(req, timeout=timeout) \
                    as resp:
                resp.read(65536)
                return resp.status, None
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code, None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            text = "%s: %s" % (type(exc).__name__, reason) if str(reason) else type(exc).__name__
            return None, text.replace(self.url, self.safe)[:200]


def _webhook_opener(https):
    """urllib without redirects (a webhook that redirects is answered as it is:
    a POST must not turn GET), with the shared TLS context for https."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    handlers = [NoRedirect()]
    if https:
        handlers.append(urllib.request.HTTPSHandler(context=_ssl_context()))
    return urllib.request.build_opener(*handlers)


def _header_text(text):
    """A header value from any text: RFC 2047 when it is not Latin-1 (ntfy reads both)."""
    text = " ".join(str(text).split())[:250]
    try:
        text.encode("latin-1")
        return text
    except UnicodeEncodeError:
        return "=?utf-8?b?%s?=" % base64.b64encode(text.encode("utf-8")).decode()


def _retryable(status):
    return status is None or status == 429 or status >= 500


def deliver(hooks, text, events=(), title="Progressista", attempts=3, timeout=5.0,
            delays=(1.0, 2.0), wait=time.sleep):
    """Send one message to every webhook: up to ``attempts`` tries each, with
    ``delays`` between rounds, on network errors, 5xx and 429.

    Returns ``{hook: (status, reason)}`` of the last try.  A message given up
    on is logged once, naming the scheme and host only.
    """
    results, pending = {}, list(hooks)
    for attempt in range(attempts):
        if attempt and wait(delays[min(attempt - 1, len(delays) - 1)]):
            for hook in pending:  # told to stop waiting: the server is shutting down
                log.warning("alert to %s dropped at shutdown: %s", hook,
                            results[hook][1] or "HTTP %d" % results[hook][0])
            break
        retry = []
        for hook in pending:
            results[hook] = status, reason = hook.send(text, events, title, timeout)
            if status is not None and 200 <= status < 300:
                log.debug("alert delivered to %s (HTTP %d)", hook, status)
            elif _retryable(status) and attempt + 1 < attempts:
                retry.append(hook)
            else:
                log.warning("alert to %s dropped after %d attempt%s: %s", hook, attempt + 1,
                            "s" if attempt else "", reason or "HTTP %d" % status)
        pending = retry
        if not pending:
            break
    return results


def _duration(seconds):
    """``42s``, ``12m05s``, ``1h02m``: short enough for a phone's notification."""
    seconds = int(round(max(0.0, seconds or 0.0)))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)


def _one_line(text, limit=120):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


_AUTO_MEMBER = re.compile(r"[0-9]{10,}-[0-9]+-[0-9]+\Z")  # a bar's default id: host:ms-pid-n


def _event_item(task, kind):
    """How a task is named in a digest line: its member (not a default id's
    number when there is a description) and, for a failure, its error."""
    head, colon, member = task["task_id"].partition(":")
    parts = [member] if colon and not (task.get("desc") and _AUTO_MEMBER.match(member)) else []
    if task.get("desc"):
        parts.append('"%s"' % _one_line(task["desc"], 40))
    parts = [" ".join(parts)] if parts else []
    if kind == "fail" and task.get("error"):
        parts.append(_one_line(task["error"]))
    elif kind == "stall" and task.get("total"):
        parts.append("at %.0f%%" % (task["n"] / task["total"] * 100))
    return ": ".join(parts) if kind == "fail" else " ".join(parts)


_EVENT_WORDS = (("fail", "failed"), ("stall", "stalled"), ("finish", "finished"))


def digest(events, max_groups=10, max_items=3):
    """``(title, text)`` of one message for a window's events, grouped by group.

    ``run-7: 3 failed (rank-0: RuntimeError: CUDA out of memory; …), done in
    1h02m: 5 completed, 3 failed``: counts by event, the first few task ids
    with their error lines.  A task that did the same twice counts once.
    """
    groups = {}
    for event in events:
        entry = groups.setdefault(event["group"], {})
        if event["event"] == "done":
            entry["done"] = event
        else:
            entry.setdefault(event["event"], {})[event["task_id"]] = event["task"]
    totals = dict.fromkeys(NOTIFY_EVENTS, 0)
    lines, short = [], []
    for name, entry in groups.items():
        parts, heads = [], []
        for kind, word in _EVENT_WORDS:
            tasks = list(entry.get(kind, {}).values())
            if not tasks:
                continue
            totals[kind] += len(tasks)
            items = [item for item in (_event_item(t, kind) for t in tasks[:max_items]) if item]
            if len(tasks) > max_items:
                items.append("+%d more" % (len(tasks) - max_items))
            heads.append("%d %s" % (len(tasks), word))
            parts.append(heads[-1] + (" (%s)" % "; ".join(items) if items else ""))
        done = entry.get("done")
        if done is not None and not (len(done["task_ids"]) == 1 and any(
                done["task_ids"][0] in entry.get(kind, ()) for kind, _ in _EVENT_WORDS)):
            # (a group of one task whose end is on this line already says nothing new)
            totals["done"] += 1
            counts = ", ".join("%d %s" % (done["counts"][s], word) for s, word in
                               (("close", "completed"), ("error", "failed"))
                               if done["counts"].get(s))
            heads.append("done in %s" % _duration(done["elapsed"]))
            parts.append(heads[-1] + (": " + counts if counts else ""))
        if len(lines) < max_groups:
            lines.append("%s: %s" % (name, ", ".join(parts)))
        short.append("%s: %s" % (name, ", ".join(heads)))
    if len(groups) > max_groups:
        lines.append("… and %d more groups" % (len(groups) - max_groups))
    summary = ", ".join(
        ["%d %s" % (totals[k], word) for k, word in _EVENT_WORDS if totals[k]]
        + (["%d group%s done" % (totals["done"], "s" * (totals["done"] > 1))]
           if totals["done"] else []))
    if len(groups) == 1:
        return _one_line(short[0], 250), lines[0]
    title = "Progressista: %s in %d groups" % (summary, len(groups))
    return title, "\n".join([title] + lines)


def _group_states(store, names):
    """``{group: summary}`` (``TaskStore.group``'s, plus ``task_ids``) of the
    ``names`` that still have tasks."""
    found = {}
    for name in names:
        summary = store.group(name)
        if summary is None:
            continue
        with store.lock:
            group = store._groups.get(name)
            summary["task_ids"] = list(group.tasks) if group is not None else []
        found[name] = summary
    return found


class Notifier:
    """Alerts to webhooks: status changes in (``observe``), digests out.

    ``observe`` is called by the store under its lock and only appends to a
    queue; one daemon thread does the rest, so ingest never waits on a
    webhook.  Events are gathered for ``window`` seconds from the first one;
    then each webhook gets one message for all of them.  A group that ended
    in the window is ``done`` only if it still is when the window closes.
    """

    timeout = 5.0          # seconds per HTTP attempt
    attempts = 3
    retry_delays = (1.0, 2.0)
    max_queue = 100000     # events held at once; more are counted, not kept

    def __init__(self, urls, events=DEFAULT_NOTIFY_ON, window=10.0):
        self.hooks = [url if isinstance(url, Webhook) else Webhook(url) for url in urls]
        self.events = frozenset(parse_notify_events(
            events if isinstance(events, str) else ",".join(events)))
        self.window = max(0.0, float(window))
        statuses = {s for s, e in _STATUS_EVENT.items() if e in self.events}
        if "done" in self.events:
            statuses |= {"close", "error"}
        self._statuses = frozenset(statuses)  # the task statuses worth queueing
        self.store = None
        self.queue = collections.deque()
        self.wake = threading.Event()
        self.stopping = False
        self.stopped = threading.Event()  # cuts a retry's backoff short
        self.thread = None
        self.overflow = 0
        self.reported = {}  # group: its updated_at when reported done
        self.messages = 0   # digests handed to deliver(), for tests and curiosity

    def __str__(self):
        return "%s to %s, %g s digest" % (", ".join(e for e in NOTIFY_EVENTS if e in self.events),
                                          ", ".join(map(str, self.hooks)), self.window)

    def attach(self, store):
        """Watch ``store`` from now on (after ``--db`` is loaded: restored tasks
        raise nothing for the state they were saved in)."""
        self.store = store
        store.on_status = self.observe

    def observe(self, task, old):
        """The store's hook: ``task`` changed from status ``old`` (None: new).

        Called with the store's lock held, so it only queues a copy."""
        if task["status"] in self._statuses:
            if len(self.queue) < self.max_queue:
                self.queue.append(dict(task))
            else:
                self.overflow += 1
            if not self.wake.is_set():
                self.wake.set()

    def start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="progressista-alerts",
                                           daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout=None):
        """Send what is gathered now (one attempt per webhook), then end the thread."""
        self.stopping = True
        self.stopped.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(self.timeout * len(self.hooks) + 2 if timeout is None else timeout)
            self.thread = None

    def _loop(self):
        events, ended, deadline = [], {}, None
        while True:
            self.wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            self.wake.clear()
            while self.queue:
                task = self.queue.popleft()
                task_id, group = task["task_id"], _group_of(task["task_id"])
                kind = _STATUS_EVENT[task["status"]]
                if kind in self.events:
                    events.append({"event": kind, "task_id": task_id, "group": group,
                                   "task": task})
                if task["status"] != "stale":
                    ended[group] = None
                if deadline is None:
                    deadline = time.monotonic() + self.window
            if deadline is not None and (self.stopping or time.monotonic() >= deadline):
                try:
                    self._close_window(events, ended)
                except Exception:  # never lose the thread: the next window tries again
                    log.exception("alerts: a digest failed; carrying on")
                events, ended, deadline = [], {}, None
            if self.stopping:
                return

    def _close_window(self, events, ended):
        if "done" in self.events and ended:
            for group, state in _group_states(self.store, ended).items():
                if not state["done"] or self.reported.get(group) == state["updated_at"]:
                    continue
                self.reported[group] = state["updated_at"]
                events.append({"event": "done", "group": group,
                               "counts": {"close": state["counts"]["close"],
                                          "error": state["counts"]["error"]},
                               "task_ids": state["task_ids"],
                               "elapsed": state["updated_at"] - state["created_at"]})
            if len(self.reported) > 20000:  # forget the oldest half: bounded memory
                for group in list(self.reported)[:10000]:
                    del self.reported[group]
        if self.overflow:
            log.warning("alerts: %d events over the %d the queue holds were not itemised",
                        self.overflow, self.max_queue)
            self.overflow = 0
        if not events:
            return
        title, text = digest(events)
        self.messages += 1
        deliver(self.hooks, text, events, title, 1 if self.stopping else self.attempts,
                self.timeout, self.retry_delays, self.stopped.wait)


def notify_test(url, text=None, timeout=5.0):
    """``progressista notify URL [TEXT]``: one test message; ``(status, reason)``."""
    hook = url if isinstance(url, Webhook) else Webhook(url)
    text = text or ("Progressista test alert from %s: this webhook works."
                    % socket.gethostname())
    return deliver([hook], text, [], "Progressista test", timeout=timeout)[hook]


# -- websocket ---------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_WS_MESSAGE = 1 << 16  # what a dashboard may send us; more closes with 1009
MAX_WS_BACKLOG = 64       # messages queued for one dashboard before it is dropped
WS_PING_SECONDS = 20.0
WS_IDLE_SECONDS = 60.0    # no frame (not even a pong) for this long: gone
WS_SEND_SECONDS = 20.0    # a frame (or a snapshot piece) not taken by the peer in this long: gone
WS_PIECE_BYTES = 1 << 18  # a big snapshot goes out in frames of about this size
# The CLI server asks the interpreter to switch threads every millisecond
# instead of every 5: a thread encoding a snapshot, or any busy one, then
# delays a request's next step by 1 ms, not 5, and a storm of reloads keeps
# workers' POST p99 at tens of ms instead of near 100 (see the README).
SERVER_SWITCH_INTERVAL = 0.001


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

    ``require_mask`` is true where a server reads a client's frames (which
    must be masked) and false where a client reads a server's (which must
    not be).

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
    if not require_mask and masked:  # RFC 6455 5.1: a client refuses them too
        raise ProtocolError(1002, "server frames must not be masked")
    if length > max_payload:
        raise ProtocolError(1009, "frame larger than %d bytes" % max_payload)
    mask = _read_exact(stream, 4) if masked else None
    payload = _read_exact(stream, length) if length else b""
    return fin, opcode, (_mask(payload, mask) if mask else payload)


def _send_nowait(sock, data):
    """Send what the socket takes now, without blocking: the count sent.

    A TLS socket refuses ``MSG_DONTWAIT``: it sends once there is room (a
    control frame is one small record)."""
    if hasattr(sock, "do_handshake"):  # ssl.SSLSocket
        import select
        if hasattr(select, "poll"):  # any fd number, unlike select()
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            room = poller.poll(0)
        else:
            room = select.select([], [sock], [], 0)[1]
        return sock.send(data) if room else 0
    return sock.send(data, getattr(socket, "MSG_DONTWAIT", 0))


class _Message:
    """One message put together from its data frames (RFC 6455 5.4).

    Text is decoded as it comes, so a character cut between two frames is
    fine and bad UTF-8 is caught at once; the cap holds for the whole
    message, not per frame.  Server and client read messages the same way.
    """

    def __init__(self, max_size):
        self.max_size = max_size
        self.parts = None  # None between messages
        self.size = 0
        self.decoder = None

    def add(self, fin, opcode, payload):
        """Add a data frame; returns the whole message on its last frame, else None."""
        if opcode == 0x0:
            if self.parts is None:
                raise ProtocolError(1002, "continuation frame with nothing to continue")
        else:
            if self.parts is not None:
                raise ProtocolError(1002, "new message before the last one ended")
            self.parts, self.size = [], 0
            self.decoder = codecs.getincrementaldecoder("utf-8")() if opcode == 0x1 else None
        self.size += len(payload)
        if self.size > self.max_size:
            raise ProtocolError(1009, "message larger than %d bytes" % self.max_size)
        if self.decoder is not None:
            try:
                self.parts.append(self.decoder.decode(payload, final=fin))
            except UnicodeDecodeError:
                raise ProtocolError(1007, "text message is not UTF-8") from None
        else:
            self.parts.append(payload)
        if not fin:
            return None
        parts, self.parts = self.parts, None
        return "".join(parts) if self.decoder is not None else b"".join(parts)


class WebSocket:
    """One dashboard connection: its socket, its send lock, its backlog.

    The handler thread reads (``serve``); a writer thread of its own drains
    the backlog, so a dashboard that reads slowly only ever blocks itself,
    and one that falls ``MAX_WS_BACKLOG`` messages behind is dropped.  The
    hub also drops one whose writer has waited ``WS_SEND_SECONDS`` on a
    single frame (see ``stuck``): a peer that stops reading goes, however
    many frames it keeps sending us.
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
        self.sending_since = None  # monotonic time the frame being written was started
        self.pending = None  # while a big snapshot goes out: where it starts in Hub.missed
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
                        self._write(frame)
                    else:  # encoded as it goes out, on this thread (a snapshot)
                        for part in frame:
                            self._write(part)
                            if self.closed:
                                break
            except OSError:
                self.abort()
                return
            finally:
                if hasattr(frame, "close"):
                    frame.close()  # a snapshot cut short still ends (see Hub._buckets)
                frame = None  # hold nothing while waiting for the next

    def _write(self, data):
        self.sending_since = time.monotonic()
        self.sock.sendall(data)
        self.sending_since = None

    def stuck(self, now):
        """True when one frame has been waiting on the peer for ``WS_SEND_SECONDS``."""
        since = self.sending_since
        return since is not None and now - since > WS_SEND_SECONDS

    def _send_now(self, frame, wait=None):
        """Send ahead of the backlog.  With ``wait`` (seconds), never block longer:
        a writer stuck on a peer that doesn't read must not hold up a close."""
        if not self.send_lock.acquire(timeout=-1 if wait is None else wait):
            self.abort()
            return
        try:
            if wait is None:
                self.sock.sendall(frame)
            elif _send_nowait(self.sock, frame) < len(frame):
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
        incoming = _Message(self.max_message)
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
                message = incoming.add(fin, op, payload)
                if message is not None and self.on_message is not None:
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
        if not self.closed:
            self._send_now(encode_frame(struct.pack("!H", code), 0x8), wait=1.0)
        with self.cond:
            answered, self.closed = not self.closed, True
            self.cond.notify_all()
        if answered:
            self._linger()

    def _linger(self, seconds=1.0):
        """After the closing handshake: our FIN first, then the peer's, briefly.

        Closing a socket that still has unread bytes from the peer (its TLS
        close_notify, say) sends a reset, and a reset can make the peer drop
        our Close frame before reading it.  Raw reads: what comes now is
        discarded, TLS or not.
        """
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
            self.sock.settimeout(seconds)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and socket.socket.recv(self.sock, 4096):
                pass
        except (OSError, ValueError):
            pass


def _snapshot_frames(head, members, tail):
    """One message, ``head`` + the ``members`` texts joined by commas + ``tail``,
    as frame headers and payloads (bytes) encoded lazily as they are sent.

    A fragmented message (RFC 6455 5.4) of frames of about
    ``WS_PIECE_BYTES``: while one is written nothing else of it is held.
    """
    parts, size, opcode = [head], len(head), 0x1
    for member in members:
        if not member:
            continue
        if len(parts) > 1 or opcode == 0x0:
            parts.append(",")
        parts.append(member)
        size += len(member) + 1
        if size >= WS_PIECE_BYTES:
            payload = "".join(parts).encode()
            parts, size = [], 0
            yield _frame_header(len(payload), opcode, fin=False)
            yield payload
            payload, opcode = None, 0x0
    parts.append(tail)
    payload = "".join(parts).encode()
    yield _frame_header(len(payload), opcode, fin=True)
    yield payload


class Hub:
    """The set of dashboards, and the one thread that feeds them.

    On a change it waits out the rest of ``interval`` since its last message,
    then encodes one delta of whatever changed meanwhile, once for everyone:
    each dashboard gets at most one message per interval, and its cost does
    not depend on how many updates came in.  The same thread pings idle
    dashboards, drops stuck ones and runs the store's sweep once a second.

    A snapshot never copies the tasks.  Up to ``JSON_CHUNK`` tasks, it is
    encoded at once under the store lock.  Beyond, the dashboard's writer
    encodes it one bucket of the store per short lock hold (see
    ``TaskStore.encode_bucket``), one snapshot at a time across dashboards
    (``encoders``), so ingest never waits long and a storm of reloads costs
    the CPU of one encoder.  Meanwhile the dashboard is ``snapshotting``: it
    gets no deltas; the changes they would have carried are kept in
    ``missed`` (one list for all such dashboards, ``ws.pending`` being where
    each one's starts), and when its last bucket is encoded they go back
    into the store's changes, for the next delta: values never older than
    the snapshot's, nothing missed, each task once in the snapshot.
    """

    def __init__(self, store, interval=0.1):
        self.store = store
        self.interval = interval
        self.clients = set()  # guarded by store.lock, so snapshots line up with deltas
        self.snapshotting = set()  # dashboards whose big snapshot is still going out
        self.missed = []  # (changed ids, removed ids) of each delta since the oldest of them began
        self.missed_base = 0  # the round number of missed[0]
        self.encoders = threading.BoundedSemaphore(1)
        self.thread = None
        self.stopping = False

    def attach(self, ws):
        """Send ``ws`` the snapshot and subscribe it, atomically w.r.t. deltas."""
        store = self.store
        with store.lock:
            now = store.clock()
            if len(store.tasks) <= JSON_CHUNK:
                ws.send(encode_frame(_dumps({"type": "snapshot", "tasks": store.tasks,
                                             "server_time": now}).encode()))
                self.clients.add(ws)
                return
            ws.pending = self.missed_base + len(self.missed)
            self.snapshotting.add(ws)
        ws.send(_snapshot_frames('{"type":"snapshot","server_time":%s,"tasks":{' % _dumps(now),
                                 self._buckets(ws), "}}"))

    def _buckets(self, ws):
        """The store's buckets as JSON texts, for ``ws``'s snapshot; then subscribe it."""
        store = self.store
        try:
            for index in range(SNAPSHOT_BUCKETS):
                if ws.closed:
                    return
                with self.encoders:
                    text = store.encode_bucket(index)
                yield text
        finally:
            with store.lock:
                if ws in self.snapshotting:
                    start = ws.pending - self.missed_base
                    self._unsubscribe(ws)
                    if not ws.closed:
                        self.clients.add(ws)
                        tasks = store.tasks
                        for changed, removed in self.missed[start:]:
                            store.dirty.update(k for k in changed if k in tasks)
                            store.removed.update(k for k in removed if k not in tasks)
                    self._trim_missed()
            if store.dirty or store.removed:
                store.changed.set()

    def _unsubscribe(self, ws):  # with store.lock held
        self.clients.discard(ws)
        self.snapshotting.discard(ws)
        ws.pending = None

    def _trim_missed(self):
        """Forget the changes no snapshotting dashboard still needs (lock held)."""
        if not self.snapshotting:
            self.missed_base += len(self.missed)
            self.missed = []
            return
        oldest = min(ws.pending for ws in self.snapshotting) - self.missed_base
        if oldest > 0:
            del self.missed[:oldest]
            self.missed_base += oldest

    def detach(self, ws):
        with self.store.lock:
            self._unsubscribe(ws)
            self._trim_missed()

    def start(self):
        self.thread = threading.Thread(target=self._loop, name="progressista-hub", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.store.changed.set()
        if self.thread is not None:
            self.thread.join(5)
        with self.store.lock:
            clients = list(self.clients) + list(self.snapshotting)
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
            if self.snapshotting:  # kept for the dashboards whose snapshot is still going out
                self.missed.append((tasks.keys(), removed))
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
            clients = list(self.clients) + list(self.snapshotting)
        for ws in clients:
            quiet = now - ws.last_seen
            if ws.stuck(now):
                log.info("dropping a dashboard that has not read for %.0f s", WS_SEND_SECONDS)
                ws.abort()
            elif quiet > WS_IDLE_SECONDS:
                ws.abort()
            elif quiet > WS_PING_SECONDS and now - ws.last_ping > WS_PING_SECONDS:
                ws.last_ping = now
                ws.send(encode_frame(b"", 0x9))


# The client side of the same protocol, for ``watch`` and ``wait``: the frame
# functions above, with the roles swapped (we mask, the server must not).

MAX_WS_CLIENT_MESSAGE = 1 << 30  # a snapshot of 100,000 tasks is ~40 MB; a guard, not a cap


class HandshakeRefused(ConnectionError):
    """The server answered the WebSocket handshake with an HTTP error
    (``status`` 401 or 403 for a refused token)."""

    def __init__(self, status, reason):
        super().__init__("HTTP %d: %s" % (status, reason))
        self.status, self.reason = status, reason


class WebSocketClient:
    """One client connection to ``/ws``: connect, ``recv`` messages, ``close``.

    ``recv`` answers pings and echoes a close on its own, and reassembles
    fragmented messages; it is meant for one reading thread, while ``send``
    and ``close`` may come from another (the send lock keeps frames whole).
    """

    def __init__(self, sock, rfile, max_message=MAX_WS_CLIENT_MESSAGE):
        self.sock, self.rfile = sock, rfile
        self.max_message = max_message
        self.send_lock = threading.Lock()
        self.closed = False

    @classmethod
    def connect(cls, url, headers=None, timeout=10.0):
        """Open ``url`` (``ws://``, ``wss://``, or ``http(s)://`` meaning the
        same); raises ``OSError`` when unreachable, ``HandshakeRefused`` for an
        HTTP answer other than 101, ``ProtocolError`` for a wrong accept key."""
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme in ("wss", "https")
        if parts.scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
            raise ValueError("not a WebSocket URL: %r" % url)
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if secure:
                sock = _ssl_context().wrap_socket(sock, server_hostname=parts.hostname)
            key = base64.b64encode(os.urandom(16)).decode("ascii")
            host = parts.hostname if ":" not in parts.hostname else "[%s]" % parts.hostname
            if parts.port:
                host += ":%d" % parts.port
            lines = ["GET %s HTTP/1.1" % ((parts.path or "/") + ("?" + parts.query if parts.query
                                                                 else "")),
                     "Host: " + host, "Upgrade: websocket", "Connection: Upgrade",
                     "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13",
                     "User-Agent: progressista/" + __version__]
            lines += ["%s: %s" % item for item in (headers or {}).items()]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
            rfile = sock.makefile("rb")
            status, fields = cls._read_head(rfile)
            if status != 101:
                reason = ""
                length = fields.get("content-length", "")
                if length.isdigit() and int(length) <= 65536:
                    body = rfile.read(int(length))
                    try:
                        reason = json.loads(body)["error"]
                    except (ValueError, KeyError, TypeError):
                        reason = body.decode("utf-8", "replace").strip()
                raise HandshakeRefused(status, str(reason)[:200] or "handshake refused")
            if "websocket" not in fields.get("upgrade", "").lower() or \
                    fields.get("sec-websocket-accept", "") != accept_key(key):
                raise ProtocolError(1002, "the server's handshake answer does not match our key")
            sock.settimeout(None)
            return cls(sock, rfile)
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _read_head(rfile):
        """Status and lower-cased fields of an HTTP answer, bounded as the server's reads are."""
        line = rfile.readline(65537)
        match = re.match(rb"HTTP/1\.[01] (\d{3})", line)
        if not match:
            raise ConnectionError("not an HTTP answer: %r" % line[:80])
        fields = {}
        for _ in range(100):
            line = rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                return int(match.group(1)), fields
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        raise ConnectionError("too many header fields in the handshake answer")

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)

    def send(self, payload, opcode=0x1):
        """Send one masked frame (RFC 6455 5.3: a fresh random mask each)."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        frame = encode_frame(payload, opcode, mask=os.urandom(4))
        with self.send_lock:
            self.sock.sendall(frame)

    def recv(self):
        """The next text (``str``) or binary (``bytes``) message.

        Raises ``ConnectionError`` when the connection ends (after echoing
        the server's close), ``ProtocolError`` (after closing with its code)
        when the server breaks the protocol, ``socket.timeout`` on a timeout.
        """
        incoming = _Message(self.max_message)
        try:
            while True:
                fin, op, payload = read_frame(self.rfile, self.max_message, require_mask=False)
                if op == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1000
                    self.close(code if 1000 <= code < 5000 and code not in (1005, 1006)
                               else 1000)
                    raise ConnectionError("the server closed the connection (%d)" % code)
                if op == 0x9:
                    self.send(payload, 0xA)
                    continue
                if op == 0xA:
                    continue
                message = incoming.add(fin, op, payload)
                if message is not None:
                    return message
        except ProtocolError as exc:
            self.close(exc.code, exc.reason)
            raise
        except ValueError as exc:  # a read on a socket another thread closed
            self.abort()
            raise ConnectionError(str(exc)) from None

    def close(self, code=1000, reason=""):
        """Send a close frame (once) and drop the connection."""
        if not self.closed:
            try:
                self.sock.settimeout(1.0)
                self.send(struct.pack("!H", code) + reason.encode()[:120], 0x8)
            except OSError:
                pass
        self.abort()

    def abort(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# -- http --------------------------------------------------------------------
#
# Two parts, as in http.server: the protocol (``_Protocol``: strict RFC 9112
# parsing, reads bounded in size and in time, responses with exact lengths,
# one catch-all error path) and the endpoints (``Handler``), which are
# declared once in ``Handler.routes``.  404, 405 with ``Allow``, OPTIONS, the
# token, ``Host`` and ``Origin`` checks all come from that table.

def _is_loopback(host):
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host(text):
    """``host[:port]`` -> (host lower-cased, port or None); ValueError when malformed."""
    text = text.strip().lower()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())) \
                or not host:
            raise ValueError(text)
        ipaddress.IPv6Address(host)
        return "[%s]" % host, rest[1:] or None
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, None
    elif not (port.isdigit() or port == ""):
        raise ValueError(text)
    if not host or not re.match(r"[a-z0-9._~!$&'()*+,;=%-]+\Z", host):
        raise ValueError(text)
    return host, port or None


def _loopback_name(host):
    """``localhost``, ``*.localhost``, 127.0.0.0/8 or ``[::1]`` (host without port)."""
    host = host[:-1] if host.endswith(".") else host
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") else host).is_loopback
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


def _tokens_of(value):
    """A comma list header (``Connection``, ``Upgrade``) as lower-cased tokens."""
    return [item.strip(" \t").lower() for item in value.split(",")]


MAX_HEADERS = 100
MAX_LINE = 65536
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 5.6.2
_BAD_FIELD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls but HT: NUL, bare CR...
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")  # visible ASCII, nothing else (RFC 3986)
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
_ABSOLUTE = re.compile(rb"https?://([^/?#]*)", re.I)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_TIMEOUTS = (socket.timeout, TimeoutError)  # two classes until Python 3.10
LEVELS = ("none", "read", "write")  # what a caller may do; a route needs one of them


_NETWORK_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN,
                   errno.ESHUTDOWN, errno.EBADF, errno.ETIMEDOUT}


def _network_error(exc):
    """True for an OSError of the connection itself (gone, reset, timed out)."""
    return isinstance(exc, _TIMEOUTS + (ConnectionError,)) or exc.errno in _NETWORK_ERRNOS \
        or type(exc).__module__ == "ssl"


class _RequestTimeout(Exception):
    """The request's head and body did not arrive within its deadline."""


class _SocketReader(io.RawIOBase):
    """The raw side of a connection's ``rfile``: each ``recv`` holds the deadline.

    Buffered reads (``readline``, ``read(n)``) call ``readinto`` once per
    ``recv``; while a request is coming in, each call's socket timeout is cut
    to what is left of the request's deadline, so the deadline holds however
    slowly the bytes drip, inside a line too.  Between requests the socket
    keeps its idle timeout.  ``arm()`` starts the deadline at the next byte.
    """

    def __init__(self, sock, idle_timeout, seconds):
        self.sock, self.idle_timeout, self.seconds = sock, idle_timeout, seconds
        self.deadline = None
        self.armed = False
        self.cut = False  # the socket timeout was lowered for the deadline

    def readable(self):
        return True

    def arm(self):
        self.deadline, self.armed = None, True

    def start(self):
        """The request has begun (its first byte was buffered before)."""
        self.armed = False
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds

    def readinto(self, buffer):
        deadline = self.deadline
        binding = False
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _RequestTimeout()
            if self.idle_timeout is None or left < self.idle_timeout:
                self.sock.settimeout(left)
                self.cut = binding = True
        try:
            n = self.sock.recv_into(buffer)
        except _TIMEOUTS:
            if binding:
                raise _RequestTimeout() from None
            raise
        if self.armed and n:
            self.armed = False
            self.deadline = time.monotonic() + self.seconds
        return n

    def end(self):
        """The request is in: back to the idle timeout (for writes too)."""
        self.deadline, self.armed = None, False
        if self.cut:
            self.cut = False
            self.sock.settimeout(self.idle_timeout)


class _SocketWriter:
    """``wfile``: each write is one ``sendall``."""

    closed = False

    def __init__(self, sock):
        self.sock = sock

    def write(self, data):
        self.sock.sendall(data)
        return len(data)

    def flush(self):
        pass

    def close(self):
        self.closed = True


class _Protocol(BaseHTTPRequestHandler):
    """HTTP/1.1 as RFC 9112 says, and nothing of the endpoints.

    A request is read with bounded reads (a line of at most 64 KiB, at most
    100 header lines) and within ``request_seconds`` of its first byte, both
    held per ``recv``.  Anything malformed is a JSON 4xx and the connection
    closes.  ``dispatch()`` (the endpoint side) runs under one catch-all: an
    exception becomes a JSON 500 and one ERROR log line with the traceback,
    never a connection dropped without an answer.  Every response goes out in
    one ``sendall`` on a ``TCP_NODELAY`` socket with an exact
    ``Content-Length`` (or chunked, for a streamed body).
    """

    protocol_version = "HTTP/1.1"
    server_version = "Progressista/" + __version__
    sys_version = ""
    timeout = 30  # an idle or half-open connection is closed after this
    request_seconds = 10.0  # head and body must arrive within this of the first byte

    def setup(self):
        self.connection = sock = self.request
        sock.settimeout(self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.reader = _SocketReader(sock, self.timeout, self.request_seconds)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = _SocketWriter(sock)

    def finish(self):
        try:
            self.rfile.close()
        except OSError:
            pass

    def handle_one_request(self):
        self.close_connection = True
        self.command, self.path, self.headers = None, "", _Headers()
        self.request_version = "HTTP/1.1"
        self._started = self._unread_body = False
        self.authority = self._access = None
        server = self.server
        # Waiting for the next request, head included, a connection is idle and
        # may be closed to make room for another (ProgressServer.process_request).
        with server.ws_lock:
            server.idle[self.connection] = None
        self.reader.arm()
        try:
            if not self._read_head():
                return
            with server.ws_lock:
                if server.idle.pop(self.connection, False) is False:
                    return  # closed to make room meanwhile: nothing to answer
            try:
                self.dispatch()
            except BadRequest as exc:
                if self._started:
                    raise
                self._error(exc.status, str(exc))
        except _RequestTimeout:
            self._fail(408, "request not received in time (%g s)" % self.request_seconds)
        except Exception as exc:
            if isinstance(exc, OSError) and _network_error(exc):
                # The socket timed out, or the peer went: nobody to answer.
                self.close_connection = True
                log.debug("connection from %s ended", self.address_string(), exc_info=True)
            else:
                log.error("%s %s failed", self.command, self._path_for_log(), exc_info=True)
                self._fail(500, "internal server error (logged on the server)")
        finally:
            if self.close_connection:
                with server.ws_lock:
                    server.idle.pop(self.connection, None)

    def _fail(self, status, message):
        """Answer an error if no response has begun; the connection closes either way."""
        self.close_connection = True
        if not self._started:
            try:
                self._error(status, message)
            except OSError:
                pass

    # Parsing.

    def _line(self):
        """One line, without its CRLF (or bare LF); None at EOF or mid-line EOF."""
        line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise BadRequest("line too long", 431)
        if not line.endswith(b"\n"):
            return None
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        return line

    def _read_head(self):
        """Read and check the request line and header fields; False to stop."""
        try:
            for _ in range(8):  # a few empty lines before a request are allowed
                line = self.rfile.readline(MAX_LINE + 1)
                if line not in (b"\r\n", b"\n"):
                    break
            else:
                return False
            if not line:
                return False
            self.reader.start()
            if len(line) > MAX_LINE:
                raise BadRequest("request line too long", 414)
            if not line.endswith(b"\n"):
                return False  # the peer went away mid-line
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            self.requestline = line.decode("latin-1")
            self._parse_request_line(line)
            self._parse_fields()
            self._check_head()
        except BadRequest as exc:
            self.close_connection = True
            self._error(exc.status, str(exc))
            return False
        return True

    def _parse_request_line(self, line):
        parts = line.split(b" ")
        if len(parts) != 3 or b"\r" in line or b"\t" in line:
            raise BadRequest("malformed request line (%r)" % line[:200].decode("latin-1"))
        method, target, version = parts
        match = _VERSION.match(version)
        if match is None or not _TOKEN.match(method):
            raise BadRequest("malformed request line (%r)" % line[:200].decode("latin-1"))
        if (match.group(1), match.group(2)) not in ((b"1", b"0"), (b"1", b"1")):
            raise BadRequest("HTTP version %s is not supported" % version.decode(), 505)
        self.request_version = version.decode()
        self.close_connection = version == b"HTTP/1.0"
        self.command = method.decode()
        if not _TARGET.match(target):
            raise BadRequest("malformed request target")
        self.authority = None
        absolute = _ABSOLUTE.match(target)
        if absolute is not None:  # absolute-form: routed by its path (RFC 9112 3.2.2)
            self.authority = absolute.group(1).decode()
            target = target[absolute.end():] or b"/"
            if target[:1] == b"?":
                target = b"/" + target
        if target[:1] != b"/":
            raise BadRequest("request target must be a path or an absolute URL")
        path = target.decode("ascii")
        self.path = "/" + path.lstrip("/") if path.startswith("//") else path

    def _parse_fields(self):
        headers = self.headers
        for _ in range(MAX_HEADERS + 1):
            line = self._line()
            if line is None:
                raise ConnectionError("peer closed mid-head")
            if not line:
                return
            if line[:1] in (b" ", b"\t"):
                raise BadRequest("header line starts with whitespace (obs-fold)")
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise BadRequest("malformed header line")
            value = value.strip(b" \t")
            if _BAD_FIELD.search(value):
                raise BadRequest("control character in header %s" % name.decode())
            key, text = name.decode("ascii").lower(), value.decode("latin-1")
            if key in headers:
                if key in ("content-length", "host", "authorization", "transfer-encoding"):
                    raise BadRequest("repeated %s header" % name.decode())
                headers[key] = headers[key] + ", " + text
            else:
                headers[key] = text
        raise BadRequest("too many headers", 431)

    def _check_head(self):
        headers = self.headers
        if "transfer-encoding" in headers:
            if any(c != "chunked" for c in _tokens_of(headers["transfer-encoding"])):
                raise BadRequest("transfer coding not supported", 501)
            raise BadRequest("chunked request bodies are not accepted: send Content-Length")
        length = headers.get("content-length")
        self.content_length = None
        if length is not None:
            if not (length.isdigit() and length.isascii()) or len(length) > 18:
                raise BadRequest("invalid Content-Length")
            self.content_length = int(length)
        # A body nobody reads would be taken for the next request: a response
        # to such a request closes the connection (read_body clears this).
        self._unread_body = bool(self.content_length)
        if "host" not in headers and self.request_version == "HTTP/1.1":
            raise BadRequest("Host header required")
        connection = _tokens_of(headers.get("connection", ""))
        if "close" in connection:
            self.close_connection = True
        elif "keep-alive" in connection:
            self.close_connection = False
        if headers.get("expect", "").lower() == "100-continue" \
                and self.request_version == "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def read_body(self, limit=MAX_BODY):
        """The request body (at most ``limit`` bytes), within the request's deadline."""
        length = self.content_length
        if length is None:
            self.close_connection = True
            raise BadRequest("Content-Length required", 411)
        if length > limit:
            self.close_connection = True
            raise BadRequest("body larger than %d bytes" % limit, 413)
        try:
            body = self.rfile.read(length)
        except _RequestTimeout:
            self.close_connection = True
            raise BadRequest("request body not received in time", 408) from None
        if len(body) < length:
            self.close_connection = True
            raise BadRequest("body shorter than Content-Length")
        self._unread_body = False
        self.reader.end()
        return body

    # Responses.

    def _head(self, status, content_type, length, headers=()):
        """The status line and headers, as bytes; ``length`` None means chunked."""
        self.reader.end()
        self._started = True
        if self._unread_body or (length is None and self.request_version != "HTTP/1.1"):
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
        """http.server's own errors, as JSON too."""
        self.close_connection = True
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def _cors_headers(self):
        return []

    def log_request(self, code="-", size="-"):
        if log.isEnabledFor(logging.DEBUG):
            self.log_message('"%s %s" %s %s', self.command, self._path_for_log(), code, size)

    def log_message(self, format, *args):
        """One place for log lines; the query string (a ?token=) never reaches it."""
        log.debug("%s " + format, self.address_string(), *args)

    def _path_for_log(self):
        return (getattr(self, "path", None) or "").split("?", 1)[0]

    def dispatch(self):
        raise NotImplementedError


Route = collections.namedtuple("Route", "method pattern endpoint access")
Route.__doc__ = """One endpoint: ``method`` and ``pattern`` (a path; ``{name}`` matches
the rest of it, percent-decoded as UTF-8 and passed as a keyword), the
``endpoint`` function (called with the handler), and the ``access`` it
needs: ``"none"`` (anyone), ``"read"`` or ``"write"``."""


class _Router:
    """``Handler.routes`` indexed: exact paths in a dict, patterns in order."""

    def __init__(self, routes):
        self.exact, self.patterns = {}, []
        for route in routes:
            if route.access not in LEVELS:
                raise ValueError("access must be one of %s: %r" % (LEVELS, route))
            if "{" in route.pattern:
                regex = re.compile("".join(
                    "(?P<%s>.+)" % part[1:-1] if part.startswith("{") else re.escape(part)
                    for part in re.split(r"(\{\w+\})", route.pattern)) + r"\Z")
                for known in self.patterns:
                    if known[0].pattern == regex.pattern:
                        known[1][route.method] = route
                        break
                else:
                    self.patterns.append((regex, {route.method: route}))
            else:
                self.exact.setdefault(route.pattern, {})[route.method] = route

    def match(self, path):
        """(methods -> route, raw parameters) for ``path``, or (None, None)."""
        methods = self.exact.get(path)
        if methods is not None:
            return methods, {}
        for regex, methods in self.patterns:
            found = regex.match(path)
            if found:
                return methods, found.groupdict()
        return None, None


def _path_param(text):
    """A path parameter, strictly percent-decoded as UTF-8 (``+`` stays ``+``)."""
    if _BAD_PERCENT.search(text):
        raise BadRequest("bad percent-encoding in the path")
    try:
        return urllib.parse.unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the path is not UTF-8 once percent-decoded") from None


class Handler(_Protocol):
    """The endpoints: the HTTP API, the dashboard page and the WebSocket upgrade.

    Each is a method taking the request (and the parameters of its path
    pattern), declared once in ``routes`` at the end of the class.
    """

    def dispatch(self):
        self._split()
        server = self.server
        if server.loopback and not self._host_allowed():
            host = self._host_for_check()
            return self._refuse(403, "Host %r is not this server's name (DNS rebinding?); "
                                "allow it with --allow-host" % host,
                                "Host not allowed", detail=" (Host %r)" % host[:100])
        methods, params = server.router.match(self.route)
        if methods is None:
            return self._error(404, "not found: %s" % self.route)
        method = self.command
        route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if route is None:
            allow = self._allow(methods)
            if method == "OPTIONS" and self._cors_headers():
                return self._respond(204, headers=[
                    ("Access-Control-Allow-Methods", allow + ", OPTIONS"),
                    ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                    ("Access-Control-Max-Age", "600")])
            return self._error(405, "method not allowed", [("Allow", allow)])
        if route.access != "none":
            level = self.access()
            if level == "none":
                return self._refuse(
                    401, "unauthorized: send Authorization: Bearer <token> or ?token=",
                    "token not accepted" if self._given_token() else "no token sent",
                    headers=[("WWW-Authenticate", "Bearer")])
            if LEVELS.index(level) < LEVELS.index(route.access):
                return self._refuse(403, "%s token" % ("read-only" if level == "read" else level),
                                    "read-only token")
        origin = self.headers.get("Origin")
        if origin is not None and (route.access == "write" or "upgrade" in self.headers) \
                and not self._origin_allowed(origin):
            return self._refuse(403, "cross-origin request refused (see --allow-origin)",
                                "foreign Origin")
        route.endpoint(self, **{k: _path_param(v) for k, v in params.items()})

    @staticmethod
    def _allow(methods):
        names = list(methods)
        if "GET" in names and "HEAD" not in names:
            names.insert(names.index("GET") + 1, "HEAD")
        return ", ".join(names)

    # Request plumbing.

    def _split(self):
        path, _, query = self.path.partition("?")
        self.route = path
        self.query_string = query
        self.query = urllib.parse.parse_qs(query, keep_blank_values=True) if query else {}

    def _given_token(self):
        """The token the caller sent, as bytes (UTF-8 however it came), or None."""
        header = self.headers.get("Authorization")
        if header is not None:
            scheme, _, rest = header.partition(" ")
            if scheme.lower() == "bearer":
                return rest.strip(" \t").encode("latin-1")  # the bytes as they came
        for item in self.query_string.split("&"):
            name, _, value = item.partition("=")
            if name == "token":
                return urllib.parse.unquote_to_bytes(value.replace("+", " ")).strip(b" \t")
        return None

    def access(self):
        """``"none"``, ``"read"`` or ``"write"``: what the caller's token allows."""
        if self._access is not None:
            return self._access
        levels = self.server.token_levels
        if not levels:
            level = "write"
        else:
            given, level = self._given_token(), "none"
            if given:
                for token, granted in levels.items():  # all of them, each in constant time
                    if hmac.compare_digest(given, token) \
                            and LEVELS.index(granted) > LEVELS.index(level):
                        level = granted
        self._access = level
        return level

    def _authorized(self):
        return self.access() != "none"

    def _refuse(self, status, message, reason, headers=(), detail=""):
        """Answer a refusal, and say so in the log (at most once a minute per
        address and reason; never the token)."""
        self.server.note_refused(self.client_address[0], reason, "%s %s%s" % (
            self.command, self._path_for_log(), detail))
        self._error(status, message, headers)

    def _host_for_check(self):
        if self.authority is not None:  # absolute-form: its authority is the Host
            return self.authority
        return self.headers.get("Host", "")

    def _host_allowed(self):
        """On a loopback server, only loopback names and ``--allow-host`` names."""
        text = self._host_for_check()
        if not text and self.request_version == "HTTP/1.0":
            return True  # no Host at all: not a browser, so no rebinding
        try:
            host, port = _split_host(text)
        except ValueError:
            return False
        allowed = self.server.allow_hosts
        return _loopback_name(host) or "*" in allowed or host.rstrip(".") in allowed \
            or text.strip().lower() in allowed

    def _origin_allowed(self, origin):
        """Same origin as the Host we were asked for, or one of ``--allow-origin``."""
        allowed = self.server.allow_origins
        if origin in allowed or "*" in allowed:
            return True
        scheme, sep, rest = origin.partition("://")
        host = self._host_for_check().strip().lower()
        if not sep or not host or scheme.lower() not in ("http", "https") or "/" in rest:
            return False
        try:
            return _split_host(rest) == _split_host(host)
        except ValueError:
            return False

    def _cors_headers(self):
        origin = self.headers.get("Origin")
        allowed = self.server.allow_origins
        if not origin or not allowed or not (origin in allowed or "*" in allowed):
            return []
        return ["Access-Control-Allow-Origin: " + origin, "Vary: Origin"]

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

    # Endpoints.

    def _health(self):
        server = self.server
        body = {"status": "ok", "tasks": len(server.store),
                "auth_required": bool(server.token_levels),
                "authorized": self._authorized(), "access": self.access(),
                "version": __version__}
        trouble = server.db.trouble if server.db is not None else None
        if trouble:
            body["status"], body["reason"] = "degraded", trouble
        self._json(200, _dumps(body))

    def _page(self):
        self._respond(200, INDEX_HTML_BYTES, "text/html; charset=utf-8", [
            ("Content-Security-Policy", _page_csp()),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
            ("Cache-Control", "no-cache")])

    def _post_progress(self):
        data = parse_json(self.read_body())
        count = self.server.store.ingest(data)
        self._json(200, b'{"ok":true,"accepted":%d}' % count)

    def _get_tasks(self):
        tasks = self.server.store.select(self._statuses())
        if len(tasks) <= JSON_CHUNK:
            return self._json(200, _dumps({"tasks": tasks}))
        self._respond_pieces(200, _json_pieces('{"tasks":{', tasks, "}}"))

    def _get_groups(self):
        """SPEC section 8: each group's members, expected size, counts, sums, ETA, done."""
        groups = self.server.store.groups(self._statuses())
        if len(groups) <= JSON_CHUNK:
            return self._json(200, _dumps({"groups": groups}))
        self._respond_pieces(200, _json_pieces('{"groups":{', groups, "}}"))

    def _delete_tasks(self):
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
        self._json(200, _dumps({"removed": self.server.store.delete_where(statuses,
                                                                          older_than)}))

    def _get_task(self, task_id):
        text = self.server.store.get_json(task_id)
        if text is None:
            return self._error(404, "no such task")
        self._json(200, text)

    def _delete_task(self, task_id):
        self._json(200, _dumps({"removed": self.server.store.delete(task_id)}))

    def _metrics(self):
        ctype = "text/plain; version=0.0.4; charset=utf-8"
        if len(self.server.store) <= JSON_CHUNK:
            return self._respond(200, self.server.metrics().encode(), ctype)
        self._respond_pieces(200, (piece.encode() for piece in _metrics_pieces(self.server)),
                             ctype)

    def _websocket(self):
        headers = self.headers
        if self.command != "GET":
            return self._error(405, "the WebSocket needs GET", [("Allow", "GET")])
        if "websocket" not in _tokens_of(headers.get("Upgrade", "")):
            return self._error(426, "this is the WebSocket endpoint: send Upgrade: websocket",
                               [("Upgrade", "websocket")])
        if "upgrade" not in _tokens_of(headers.get("Connection", "")):
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
        server, hub = self.server, self.server.hub
        with server.ws_lock:
            full = server.ws_count >= server.max_dashboards
            if not full:
                server.ws_count += 1
        if full:
            return self._error(503, "too many dashboards (%d) connected: try again later"
                               % server.max_dashboards, [("Retry-After", "5")])
        try:
            self.close_connection = True
            self.reader.end()
            self._started = True
            self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                              % accept_key(key)).encode("ascii"))
            self.log_request(101)
            self.connection.settimeout(None)  # the hub's pings find dead peers instead
            ws = WebSocket(self.connection, self.rfile)
            try:
                ws.start()
                hub.attach(ws)
                ws.serve()
            finally:
                hub.detach(ws)
                ws.abort()
        finally:
            with server.ws_lock:
                server.ws_count -= 1

    # The routing table: one row per endpoint.  HEAD is served wherever GET is.
    routes = (
        Route("GET", "/", _page, "none"),
        Route("GET", "/index.html", _page, "none"),
        Route("GET", "/static/index.html", _page, "none"),
        Route("GET", "/health", _health, "none"),
        Route("POST", "/progress", _post_progress, "write"),
        Route("GET", "/tasks", _get_tasks, "read"),
        Route("GET", "/groups", _get_groups, "read"),
        Route("DELETE", "/tasks", _delete_tasks, "write"),
        Route("GET", "/tasks/{task_id}", _get_task, "read"),
        Route("DELETE", "/tasks/{task_id}", _delete_task, "write"),
        Route("GET", "/metrics", _metrics, "read"),
        Route("GET", "/ws", _websocket, "read"),
    )


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
    request_queue_size = 1024  # 1,000 workers starting at once connect without SYN retries
    max_connections = 1024
    max_dashboards = 256
    refusal_log_seconds = 60.0  # one INFO line per client address and reason this often
    notifier = None  # a Notifier (alerts), started and stopped with the server

    def __init__(self, address, store=None, tokens=(), allow_origins=(), db=None,
                 handler=Handler, allow_hosts=(), read_tokens=(), ssl_context=None):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.store = store if store is not None else TaskStore()
        self.hub = Hub(self.store)
        tokens = [t.strip(" \t") for t in tokens]
        if not all(tokens):
            raise ValueError("an empty token would turn authentication off: give a real token")
        self.tokens = tokens
        # What each token may do, by its UTF-8 bytes (see Handler.access).
        self.token_levels = {t.encode("utf-8"): "write" for t in tokens}
        read_tokens = [t.strip(" \t") for t in read_tokens]
        if not all(read_tokens):
            raise ValueError("an empty read token: give a real token")
        self.read_tokens = read_tokens
        for token in read_tokens:  # a token given as both keeps full access
            self.token_levels.setdefault(token.encode("utf-8"), "read")
        self.ssl_context = ssl_context  # server side: HTTPS and WSS (see _tls_accept)
        self.allow_origins = list(allow_origins)
        self.allow_hosts = {h.strip().lower().rstrip(".") for h in allow_hosts if h.strip()}
        self.db = db
        self.router = _Router(handler.routes)
        self.ws_lock = threading.Lock()  # guards ws_count, open_connections, sockets, idle
        self.ws_count = 0
        self.open_connections = 0
        self.sockets = set()  # open connections, closed by stop()
        self.idle = {}  # connections waiting for their next request, oldest first
        self.refused_lock = threading.Lock()
        self.refused = {}  # (address, reason) -> when it was last logged
        self.thread = None
        super().__init__(address, handler)
        self.loopback = _is_loopback(self.server_address[0])

    @property
    def url(self):
        host, port = self.server_address[:2]
        if ":" in host:
            host = "[%s]" % host
        elif host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        return "%s://%s:%d" % ("https" if self.ssl_context else "http", host, port)

    def note_refused(self, address, reason, what):
        """Log a refused request at INFO, once a minute per address and reason."""
        now = time.monotonic()
        with self.refused_lock:
            last = self.refused.get((address, reason))
            if last is not None and now - last < self.refusal_log_seconds:
                return
            if len(self.refused) >= 4096:  # a flood of addresses: forget the old ones
                self.refused = {k: t for k, t in self.refused.items()
                                if now - t < self.refusal_log_seconds}
            self.refused[(address, reason)] = now
        log.info("refused %s from %s: %s (said once a minute per client and reason)",
                 what, address, reason)

    def process_request(self, request, client_address):
        """Make room for a new connection, or refuse it cheaply.

        At ``max_connections``, the connection idle the longest (between two
        requests, or still waiting for a request's head) is closed to make
        room: idle sockets can't starve a client that has something to say.
        Only when none is idle is it a 503.
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
            body = b'{"error":"too many connections"}'
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nContent-Length: %d\r\nConnection: "
                                b"close\r\nRetry-After: 1\r\n\r\n%s" % (len(body), body))
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
        log.error("connection from %s failed", client_address[0], exc_info=True)

    def metrics(self):
        return _metrics_text(self)

    def start(self, background=True):
        """Start the hub and the database writer, and serve on a thread of its
        own (for tests and embedding; returns self) or, with ``background``
        false, in this thread until ``shutdown()``."""
        self.hub.start()
        if self.db is not None:
            self.db.start()
        if self.notifier is not None:
            self.notifier.start()
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
        if self.notifier is not None:
            self.notifier.stop()
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

    # TLS.  The accept loop only accepts; the handshake happens here, on the
    # connection's own thread and within ``handshake_seconds`` however slowly
    # the bytes come, so a peer that never says hello, or speaks plain HTTP to
    # this port, costs one connection and never a stuck thread.

    handshake_seconds = 10.0

    def finish_request(self, request, client_address):
        if self.ssl_context is None:
            return super().finish_request(request, client_address)
        tls = self._tls_accept(request, client_address)
        if tls is None:
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            with self.ws_lock:
                self.sockets.discard(tls)
                self.idle.pop(tls, None)
            self.shutdown_request(tls)

    def _tls_accept(self, sock, client_address):
        """The TLS socket after a finished handshake, or None (connection closed)."""
        import ssl
        with self.ws_lock:  # silent until the handshake ends: first to go when full
            if sock not in self.sockets:
                return None
            self.idle[sock] = None
        tls = None
        deadline = time.monotonic() + self.handshake_seconds
        try:
            sock.settimeout(self.handshake_seconds)
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                return None
            if first != b"\x16":  # not a TLS handshake record
                if first.isupper():
                    self._answer_plain_http(sock)
                self.note_refused(client_address[0], "plain HTTP to the HTTPS port",
                                  "a connection")
                return None
            tls = self.ssl_context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)
            with self.ws_lock:  # the plain socket object is spent: track the TLS one
                closing = self.idle.pop(sock, False) is False  # taken to make room
                self.sockets.discard(sock)
                if not closing:
                    self.sockets.add(tls)
                    self.idle[tls] = None
            if closing:
                tls.close()
                return None
            # One deadline for the whole handshake: the ssl module counts the
            # socket's timeout from the start of do_handshake, not per recv.
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no TLS handshake within %g s" % self.handshake_seconds)
            tls.settimeout(left)
            tls.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            if isinstance(exc, ssl.SSLError):
                reason = str(exc.reason or exc)
                if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
                    reason += ": the client does not trust this certificate (give it the " \
                              "CA, e.g. with $PROGRESSISTA_CA_BUNDLE)"
                self.note_refused(client_address[0], "TLS handshake failed (%s)" % reason,
                                  "a connection")
            else:
                log.debug("TLS handshake with %s ended: %r", client_address[0], exc)
            if tls is not None:
                with self.ws_lock:
                    self.sockets.discard(tls)
                    self.idle.pop(tls, None)
                tls.close()
            return None
        finally:
            with self.ws_lock:
                self.idle.pop(sock, None)
        with self.ws_lock:
            taken = self.idle.pop(tls, False) is False  # closed to make room meanwhile
            if taken:
                self.sockets.discard(tls)
        if taken:
            tls.close()
            return None
        return tls

    @staticmethod
    def _answer_plain_http(sock):
        """Tell a plain HTTP client (curl http://...) to use https, then close."""
        body = b'{"error":"this server speaks HTTPS: use an https:// URL"}'
        try:
            sock.settimeout(1.0)
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0  # read what it sent, so no RST eats the answer
            while time.monotonic() < deadline and sock.recv(65536):
                pass
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
        ("progressista_task_total_units", "Units expected (tqdm's total); NaN when unknown.",
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
    yield ("# HELP progressista_db_write_errors_total Failed writes to the --db file.\n"
           "# TYPE progressista_db_write_errors_total counter\n"
           "progressista_db_write_errors_total %d\n"
           % (server.db.write_errors if server.db is not None else 0))
    yield from _group_metrics(store.groups(), label, number)


def _group_metrics(groups, label, number):
    """The groups of SPEC section 8: tasks by status, expected size, progress."""
    names = sorted(groups)
    yield ("# HELP progressista_group_tasks Tasks of a group (task id before ':') by status.\n"
           "# TYPE progressista_group_tasks gauge\n")
    for start in range(0, len(names), JSON_CHUNK):
        yield "".join('progressista_group_tasks{group="%s",status="%s"} %d\n'
                      % (label(name), status, groups[name]["counts"][status])
                      for name in names[start:start + JSON_CHUNK] for status in STATUSES)
    yield ("# HELP progressista_group_expected Members a group expects (group_size); "
           "NaN when unknown.\n# TYPE progressista_group_expected gauge\n")
    for start in range(0, len(names), JSON_CHUNK):
        yield "".join('progressista_group_expected{group="%s"} %s\n'
                      % (label(name), number(groups[name]["expected"]))
                      for name in names[start:start + JSON_CHUNK])
    yield ("# HELP progressista_group_progress_ratio Sum of n / sum of total over the main "
           "bars of a group, members not started yet counted as 0%; NaN when a total is "
           "unknown.\n"
           "# TYPE progressista_group_progress_ratio gauge\n")
    for start in range(0, len(names), JSON_CHUNK):
        yield "".join('progressista_group_progress_ratio{group="%s"} %s\n'
                      % (label(name), number(_group_ratio(groups[name])))
                      for name in names[start:start + JSON_CHUNK])


def _group_ratio(entry):
    """How far the group is: members not started yet count as 0% done, each
    the size of an average started one (so 400 of 1,000 done reads 0.4)."""
    n, total, expected = entry["n"], entry["total"], entry["expected"]
    if not total or n is None:
        return None
    try:
        members = entry["members"]
        if expected is not None and expected > members:
            total = total / members * expected
        return n / total
    except OverflowError:
        return float("inf")


class CertificateError(ValueError):
    """The ``--certfile`` / ``--keyfile`` pair can't be used (the message says why)."""


_tls_socket_class = []


def _server_ssl_context(certfile, keyfile):
    """The server side's TLS context, from a PEM certificate (chain) and its key."""
    try:
        import ssl
    except ImportError:  # a Python built without OpenSSL
        raise CertificateError("this Python has no ssl module: TLS is unavailable") from None
    for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise CertificateError("cannot read %s %s: %s"
                                   % (option, path, exc.strerror or exc)) from None
    if not _tls_socket_class:
        class _TLSSocket(ssl.SSLSocket):
            """An SSL socket whose shutdown() another thread may call at any time.

            ``SSLSocket.shutdown`` forgets its TLS state first, so a reader in
            another thread may then fail with ValueError or read raw bytes;
            here shutdown only ends the TCP stream, and the reader sees EOF.
            """

            def shutdown(self, how):
                socket.socket.shutdown(self, how)

        _tls_socket_class.append(_TLSSocket)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _tls_socket_class[0]

    def no_passphrase():
        raise CertificateError("--keyfile %s is encrypted: give an unencrypted key (openssl "
                               "req ... -noenc, or openssl pkey -in KEY -out PLAIN)" % keyfile)
    try:
        context.load_cert_chain(certfile, keyfile, password=no_passphrase)
    except ssl.SSLError as exc:
        raise CertificateError(
            "cannot use --certfile %s with --keyfile %s (%s): both must be PEM files, the "
            "certificate first, then its unencrypted private key" % (certfile, keyfile, exc)
        ) from None
    return context


def make_server(host="127.0.0.1", port=8000, tokens=(), db=None, stale_seconds=0.0,
                retention_seconds=86400.0, allow_origins=(), max_tasks=100000,
                clock=time.time, allow_hosts=(), notify=(), notify_on=DEFAULT_NOTIFY_ON,
                notify_window=10.0, read_tokens=(), certfile=None, keyfile=None):
    """Build a ready-to-start server (``.start()`` in the background, or ``serve``).

    ``notify`` is a list of webhook URLs (alerts); a bad one raises ValueError.
    ``read_tokens`` may read everything and write nothing; ``certfile`` and
    ``keyfile`` (PEM, both or neither) serve HTTPS and WSS.
    """
    if bool(certfile) != bool(keyfile):
        raise CertificateError("TLS needs both --certfile and --keyfile")
    ssl_context = _server_ssl_context(certfile, keyfile) if certfile else None
    notifier = Notifier(notify, notify_on, notify_window) if notify else None
    store = TaskStore(stale_seconds, retention_seconds, max_tasks, clock)
    database = None
    if db:
        database = Database(db, store)
        database.open()
    if notifier is not None:
        notifier.attach(store)  # after the restore: restored states raise no alert
    try:
        server = ProgressServer((host, port), store, tokens, allow_origins, database,
                                allow_hosts=allow_hosts, read_tokens=read_tokens,
                                ssl_context=ssl_context)
        server.notifier = notifier
        return server
    except BaseException:
        if database is not None:
            database.close()
        raise


def serve(host="127.0.0.1", port=8000, **options):
    """Run the server in the foreground until Ctrl-C or SIGTERM."""
    import signal
    server = make_server(host, port, **options)
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL)  # this process is the server's alone
    if not _is_loopback(host) and not server.token_levels:
        log.warning("binding %s without a token: anyone who can reach this port can read "
                    "and write progress (use --token)", host)
    if not _is_loopback(host) and server.token_levels and server.ssl_context is None:
        log.warning("binding %s with tokens over plain HTTP: tokens travel in clear text "
                    "(serve HTTPS with --certfile and --keyfile)", host)
    if server.read_tokens and not server.tokens:
        log.warning("only read-only tokens: nobody can send progress or delete tasks "
                    "(give workers a --token)")

    def on_term(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    # Before the URL is printed: whoever reads it may send SIGTERM at once.
    previous = signal.signal(signal.SIGTERM, on_term)
    print("Progressista %s: dashboard at %s/  (POST updates to %s/progress)"
          % (__version__, server.url, server.url), flush=True)
    if _is_loopback(host):
        print("Listening on loopback only: other machines can't reach it "
              "(--host 0.0.0.0 --token T opens it up).", flush=True)
    if server.notifier is not None:
        print("Alerts: %s.%s" % (server.notifier, " (stall needs --stale-seconds)" if "stall" in
                                 server.notifier.events and not server.store.stale_seconds
                                 else ""), flush=True)
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


# -- terminal ----------------------------------------------------------------
# ``watch`` and ``wait``: the dashboard's live view in a terminal, and an exit
# status for scripts, both fed by the WebSocket client above.

SECTIONS = (("active", "Active"), ("stale", "Needs Attention"),
            ("error", "Failed"), ("close", "Completed"))
SECTION_NAMES = dict(SECTIONS)
WATCH_REDRAW_SECONDS = 0.25   # at most 4 redraws a second
WATCH_SUMMARY_SECONDS = 10.0  # piped: a summary line at most this often
WAIT_LOST_SECONDS = 30.0      # wait: a server gone this long after we connected is gone
WAIT_SETTLE_SECONDS = 1.0     # wait: done must hold this long (a job's next bar may be on its way)
_PREFIXED_UNITS = ("B", "b", "bit", "Hz")  # units the page scales (k, M, ...) at any size
# Control characters (C0, DEL, C1) in a task's strings would be escape codes
# on the user's terminal: they are shown as spaces.
_CONTROL = dict.fromkeys(itertools.chain(range(0x20), range(0x7F, 0xA0)), " ")


class WatchError(Exception):
    """``watch`` or ``wait`` can't reach the server (``kind`` ``"down"``) or the
    server refuses the token (``"refused"``); the message is one line for stderr."""

    def __init__(self, message, kind):
        super().__init__(message)
        self.message, self.kind = message, kind


def _server_base(server_url=None):
    """``scheme://host:port`` of the server, as the client finds it; the path is ignored."""
    url = server_url or os.environ.get("PROGRESSISTA_SERVER_URL") or DEFAULT_SERVER_URL
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the server URL must be http:// or https://, got %r" % url)
    return "%s://%s" % (parts.scheme, parts.netloc.rpartition("@")[2])


def _printable(value):
    return ("" if value is None else str(value)).translate(_CONTROL)


def _filter_terms(words):
    """The dashboard's filter: every whitespace-separated word, lower-cased."""
    return " ".join(words or ()).lower().split()


def _search_text(task_id, task):
    """What the filter looks in, as on the page: id, description, host, meta."""
    parts = [task_id, task.get("desc") or "", task.get("host") or ""]
    meta = task.get("meta")
    if isinstance(meta, dict):
        for key, value in meta.items():
            parts.append(key)
            parts.append(value if isinstance(value, str)
                         else json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(str(part) for part in parts).lower()


def _activity(task):
    """Newest first: last progress, else last contact, else creation (the page's order)."""
    return _finite(task.get("updated_at")) or _finite(task.get("seen_at")) \
        or _finite(task.get("created_at")) or 0


class TaskView:
    """The tasks a terminal shows, kept up to date from ``/ws`` messages.

    Only the tasks passing the filter ``words`` (or the predicate ``keep``)
    are kept.  ``apply`` returns what changed as ``(task_id, old, new)``
    triples (``None`` for absent), so a reconnect's fresh snapshot reads as
    the changes missed meanwhile.
    """

    def __init__(self, words=(), keep=None):
        self.terms = _filter_terms(words)
        self.keep = keep
        self.tasks = {}
        self.offset = 0.0  # server clock minus ours
        self.snapshots = 0

    def matches(self, task_id, task):
        if self.keep is not None and not self.keep(task_id):
            return False
        if not self.terms:
            return True
        text = _search_text(task_id, task)
        return all(term in text for term in self.terms)

    def now(self):
        return time.time() + self.offset

    def apply(self, message):
        if not isinstance(message, dict):
            return []
        if isinstance(message.get("server_time"), (int, float)):
            self.offset = message["server_time"] - time.time()
        incoming = message.get("tasks")
        incoming = incoming if isinstance(incoming, dict) else {}
        changes = []
        tasks = self.tasks
        if message.get("type") == "snapshot":
            self.snapshots += 1
            for task_id in [t for t in tasks if t not in incoming]:
                changes.append((task_id, tasks.pop(task_id), None))
        else:
            for task_id in message.get("removed") or ():
                old = tasks.pop(task_id, None) if isinstance(task_id, str) else None
                if old is not None:
                    changes.append((task_id, old, None))
        for task_id, task in incoming.items():
            if not isinstance(task, dict):
                continue
            old = tasks.get(task_id)
            if self.matches(task_id, task):
                if old != task:
                    tasks[task_id] = task
                    changes.append((task_id, old, task))
            elif old is not None:
                del tasks[task_id]
                changes.append((task_id, old, None))
        return changes

    def counts(self):
        counts = dict.fromkeys(STATUSES, 0)
        for task in self.tasks.values():
            status = task.get("status")
            counts[status if status in counts else "active"] += 1
        return counts


def _plain_meter(n, total, elapsed, rate, unit, postfix=None):
    """A tqdm-like meter without tqdm: `` 45% 450/1000 it [01:02<01:15, 7.20it/s]``."""
    def clock(seconds):
        seconds = int(max(0, seconds))
        h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
        return "%d:%02d:%02d" % (h, m, s) if h else "%02d:%02d" % (m, s)
    rate_text = ("%.2f%s/s" % (rate, unit)) if rate else "?%s/s" % unit
    if total:
        left = clock((total - n) / rate) if rate else "?"
        text = "%3d%% %g/%g %s [%s<%s, %s" % (min(100, 100 * n // total), n, total, unit,
                                             clock(elapsed), left, rate_text)
    else:
        text = "%g%s [%s, %s" % (n, unit, clock(elapsed), rate_text)
    return text + (", " + postfix if postfix else "") + "]"


def _meter(task, width, now, ascii_only=False, format_meter=None):
    """One task's (or group's) meter in tqdm's own format, ``width`` columns or free."""
    n = _finite(task.get("n")) or 0
    total = _finite(task.get("total"))
    total = total if total and total > 0 else None
    elapsed = max(0, _finite(task.get("elapsed")) or 0)
    rate = _finite(task.get("rate"))
    rate = rate if rate and rate > 0 else None
    unit = _printable(task.get("unit") or "it")[:20]
    postfix = _printable(task.get("postfix"))[:200] or None  # tqdm's set_postfix text
    idle = None
    if task.get("status") in ("active", "stale") and not task.get("_group"):
        seen = max(_finite(task.get("seen_at")) or 0, _activity(task))
        if now - seen >= NO_CONTACT_SECONDS:
            idle = "no contact for %s" % _age(now - seen)
        elif task.get("status") == "stale":
            idle = "no progress for %s" % _age(now - _activity(task))
    if idle is not None:
        postfix = idle if postfix is None else postfix + ", " + idle
    if format_meter is not None:
        big = max(abs(n), total or 0)
        try:
            return format_meter(n, total, elapsed, ncols=width, prefix="", unit=unit, rate=rate,
                                postfix=postfix, ascii=ascii_only or None,
                                unit_scale=unit in _PREFIXED_UNITS or big >= 1e5)
        except Exception:  # tqdm's formatting of odd numbers is no reason to stop watching
            pass
    return _plain_meter(n, total, elapsed, rate, unit, postfix)


def _age(seconds):
    seconds = int(max(0, seconds))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm" % (seconds // 60)
    if seconds < 86400:
        return "%dh %dm" % (seconds // 3600, seconds // 60 % 60)
    return "%dd %dh" % (seconds // 86400, seconds // 3600 % 24)


def _tqdm_format_meter():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm.format_meter


def _group_task(name, members, expected, started):
    """A group's summed pseudo-task (the page's group header): Σn and Σtotal over
    the members with a total, Σrate, the longest elapsed."""
    n = total = rate = elapsed = 0
    with_total, units = 0, set()
    for task in members:
        task_total = _finite(task.get("total"))
        if task_total and task_total > 0:
            n += _finite(task.get("n")) or 0
            total += task_total
            with_total += 1
        rate += _finite(task.get("rate")) or 0
        elapsed = max(elapsed, _finite(task.get("elapsed")) or 0)
        units.add(task.get("unit") or "it")
    if not with_total:
        n = sum(_finite(task.get("n")) or 0 for task in members)
    label = "%s (%d tasks%s)" % (_printable(name), len(members),
                                 ", %d/%d started" % (started, expected) if expected else "")
    # MB/s plus rows/s is no rate: mixed units keep the sums, and no rate (an
    # elapsed of 0 also keeps tqdm from making one up from n / elapsed)
    one_unit = units.pop() if len(units) == 1 else None
    return label, {"n": n, "total": total or None,
                   "rate": (rate or None) if one_unit else None,
                   "elapsed": elapsed if one_unit else 0,
                   "unit": one_unit or "", "status": "active", "_group": True}


def _layout(view):
    """Each section's entries, newest first: ``(key, task_id, task)`` for a
    task, ``(key, name, [(key, task_id, task), ...])`` for a group of 2 or more."""
    buckets = {status: {} for status in STATUSES}
    for task_id, task in view.tasks.items():
        status = task.get("status")
        bucket = buckets[status if status in buckets else "active"]
        group = task_id.partition(":")[0] if ":" in task_id else None
        entry = (_activity(task), task_id, task)
        if group is None:
            bucket[task_id] = entry
        else:
            found = bucket.get(group)
            if found is None:
                bucket[group] = entry
            elif type(found[2]) is list:
                found[2].append(entry)
                if entry[0] > found[0]:
                    bucket[group] = (entry[0], group, found[2])
            else:
                bucket[group] = (max(found[0], entry[0]), group, [found, entry])
    return {status: sorted(bucket.values(), key=lambda e: e[0], reverse=True)
            for status, bucket in buckets.items()}


def _group_sizes(view, names):
    """For the groups in ``names``: (members started, expected size or None) over all
    sections; the expected size is the newest task's ``group_size``."""
    wanted = set(names)
    members, expected = {}, {}
    for task_id, task in view.tasks.items():
        group = _group_of(task_id)
        if group not in wanted:
            continue
        members.setdefault(group, set()).add(_member_of(task_id))
        size = task.get("group_size")
        if isinstance(size, int) and size >= 1:
            key = _activity(task)
            if group not in expected or key >= expected[group][0]:
                expected[group] = (key, size)
    return {group: (len(members[group]), expected[group][1] if group in expected else None)
            for group in members}


def _fit(text, width):
    if width is None or len(text) <= width:
        return text
    return text[:max(0, width - 1)] + "…"


def render(view, width=None, height=None, now=None, header=(), ascii_only=False,
           format_meter="tqdm"):
    """The watch screen as lines: the four sections with counts, newest first,
    group lines with their sums, error lines, cut to ``height`` with ``… N more``.

    Without ``width`` and ``height``, every task is listed and no meter is
    fitted to a width (``--once`` and piped output).  ``format_meter`` is
    tqdm's when it can be imported; ``None`` gives a plain meter.
    """
    if format_meter == "tqdm":
        format_meter = _tqdm_format_meter()
    now = view.now() if now is None else now
    ellipsis = "..." if ascii_only else "…"
    layout = _layout(view)
    counts = {status: sum(len(e[2]) if type(e[2]) is list else 1 for e in entries)
              for status, entries in layout.items()}
    lines = [_fit(line, width) for line in header]
    budget = None if height is None else max(0, height - len(lines) - len(SECTIONS))

    def need(entries):
        total = 0
        for entry in entries:
            if type(entry[2]) is list:
                total += 1 + len(entry[2]) + sum(1 for e in entry[2] if e[2].get("error")
                                                 and e[2].get("status") == "error")
            else:
                total += 1 + (1 if entry[2].get("error") and entry[2].get("status") == "error"
                              else 0)
        return total

    quotas = {}
    if budget is not None:
        needs = {status: need(layout[status]) for status, _ in SECTIONS}
        left, pending = budget, sorted(needs, key=needs.get)
        while pending:  # water-filling: small sections whole, the rest share what is left
            status = pending.pop(0)
            quotas[status] = min(needs[status], -(-left // (len(pending) + 1)))
            left -= quotas[status]
        for status, _ in SECTIONS:  # rounding leaves a few rows: to the first in need
            extra = min(left, needs[status] - quotas[status])
            quotas[status] += extra
            left -= extra
        groups = [entry[1] for entries in layout.values() for entry in entries[:max(quotas.values()
                                                                                      or [0])]
                  if type(entry[2]) is list]
    else:
        groups = [entry[1] for entries in layout.values() for entry in entries
                  if type(entry[2]) is list]
    sizes = _group_sizes(view, groups) if groups else {}

    for status, title in SECTIONS:
        lines.append(_fit("%s (%d)" % (title, counts[status]), width))
        quota = quotas.get(status)
        rows, more = _rows(layout[status], status, quota, sizes), 0
        if quota is not None and _shown(rows[:quota]) < counts[status]:
            rows = rows[:quota - 1] if quota else []
            more = counts[status] - _shown(rows) if quota else 0
        elif quota is not None:
            rows = rows[:quota]  # every task fits; only error lines may not
        label_width = max([len(indent) + len(label) for indent, label, _, error in rows
                           if error is None] or [0])
        if width is not None:  # tqdm's meter needs ~45 columns besides its bar
            label_width = min(label_width, max(16, min(width * 2 // 5, width - 55)))
        meter_width = None if width is None else max(10, width - label_width - 1)
        for indent, label, task, error in rows:
            if error is not None:
                lines.append(_fit(indent + _printable(error), width))
            else:
                lines.append(_fit(_fit(indent + label, label_width).ljust(label_width) + " " +
                                  _meter(task, meter_width, now, ascii_only, format_meter), width))
        if more:
            lines.append(_fit("  %s %d more" % (ellipsis, more), width))
    if ascii_only:
        lines = [line.replace("…", "...").replace("·", "-") for line in lines]
    return lines


def _task_label(task_id, task):
    """What a task line starts with: its description, then its id (as tqdm puts desc first)."""
    desc = task.get("desc")
    return _printable(desc) + " · " + _printable(task_id) if desc else _printable(task_id)


def _rows(entries, status, quota, sizes):
    """A section's rows ``(indent, label, task, error)``, a few beyond ``quota`` at most:
    group lines, their members, lone tasks, and the error line of a failed task."""
    rows = []

    def add(indent, label, task):
        rows.append((indent, label, task, None))
        if status == "error" and task.get("error"):
            rows.append((indent + "  ", None, None, task["error"]))

    for _, name, item in entries:
        if quota is not None and len(rows) > quota:
            break
        if type(item) is not list:
            add("  ", _task_label(name, item), item)
            continue
        started, expected = sizes.get(name, (len(item), None))
        rows.append(("  ",) + _group_task(name, [e[2] for e in item], expected, started) + (None,))
        item.sort(key=lambda e: e[0], reverse=True)
        cut = len(name) + 1
        for _, task_id, task in item:
            if quota is not None and len(rows) > quota:
                break
            add("    ", _task_label(task_id[cut:], task), task)
    return rows


def _shown(rows):
    """How many tasks ``rows`` show (group lines and error lines are not tasks)."""
    return sum(1 for indent, label, task, error in rows
               if error is None and not task.get("_group"))


class _Feed:
    """A reader thread on ``/ws`` that reconnects by itself.

    Events go to ``events`` (a queue) as ``(kind, value)``: ``("up", None)``,
    ``("message", obj)``, ``("down", reason)`` and, when the server refuses the
    token, ``("refused", reason)`` (it then stops).  ``wake`` is called after
    each event (a screen's select loop writes to its pipe).
    """

    def __init__(self, base, token=None, wake=None):
        import queue
        self.base = base
        self.url = base + "/ws"
        self.headers = {"Authorization": "Bearer " + token} if token else {}
        self.events = queue.Queue()
        self.wake = wake
        self.stopping = threading.Event()
        self.ws = None
        self.thread = threading.Thread(target=self._run, name="progressista-watch", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        ws = self.ws
        if ws is not None:
            ws.close(1001)
        self.thread.join(5)

    def _emit(self, kind, value=None):
        self.events.put((kind, value))
        if self.wake is not None:
            self.wake()

    def _run(self):
        delay = 0.25
        while not self.stopping.is_set():
            try:
                ws = connect_watch(self.base, self.headers)
            except WatchError as exc:
                if exc.kind == "refused":
                    self._emit("refused", exc.message)
                    return
                self._emit("down", exc.message)
                self.stopping.wait(delay)
                delay = min(5.0, delay * 2)
                continue
            self.ws, delay = ws, 0.25
            if self.stopping.is_set():
                ws.close(1001)
                return
            self._emit("up")
            try:
                while True:
                    self._emit("message", json.loads(ws.recv()))
            except (OSError, ProtocolError, ValueError) as exc:
                ws.abort()
                self.ws = None
                if not self.stopping.is_set():
                    self._emit("down", "connection lost: %s" % (exc.reason if isinstance(
                        exc, ProtocolError) else exc))


def connect_watch(base, headers, timeout=10.0):
    """``/ws`` of the server at ``base``; ``WatchError(text, "refused"|"down")``
    with a one-line reason when it can't be had."""
    try:
        return WebSocketClient.connect(base + "/ws", headers, timeout)
    except HandshakeRefused as exc:
        if exc.status == 401 and "Authorization" not in headers:
            raise WatchError("%s needs a token: give --token or set $PROGRESSISTA_API_TOKEN"
                             % base, "refused") from None
        if exc.status == 401:
            raise WatchError("%s refused the token (HTTP 401)" % base, "refused") from None
        if exc.status == 403:
            raise WatchError("%s refused us (HTTP 403: %s)" % (base, exc.reason),
                             "refused") from None
        raise WatchError("%s answered HTTP %d: %s" % (base, exc.status, exc.reason),
                         "down") from None
    except ProtocolError as exc:
        raise WatchError("%s: %s" % (base, exc.reason), "down") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise WatchError("cannot reach %s: %s" % (base, reason), "down") from None


def _snapshot(base, headers):
    """Connect, read the first message (the snapshot), close."""
    ws = connect_watch(base, headers)
    try:
        ws.settimeout(60.0)
        try:
            message = json.loads(ws.recv())
        except (OSError, ProtocolError, ValueError) as exc:
            raise WatchError("%s: no snapshot: %s" % (base, exc), "down") from None
    finally:
        ws.close()
    return message


def _can_encode(stream, text):
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def _status_line(task_id, task, now, format_meter):
    """Piped: ``12:03:04 Failed  epoch 3 · run-7:rank-3  37%|███▋ | 37/100 [...]``."""
    status = task.get("status") if task.get("status") in SECTION_NAMES else "active"
    line = "%s %-15s %s  %s" % (time.strftime("%H:%M:%S"), SECTION_NAMES[status],
                                _task_label(task_id, task),
                                _meter(task, None, now, False, format_meter))
    if status == "error" and task.get("error"):
        line += "  " + _printable(task["error"])
    return line


def _summary_line(view):
    counts = view.counts()
    return "%s %s" % (time.strftime("%H:%M:%S"), " · ".join(
        "%d %s" % (counts[status], title.lower()) for status, title in SECTIONS))


def watch(words=(), server_url=None, token=None, once=False, json_lines=False,
          out=None, err=None, screen=None):
    """``progressista watch``: the live view of a server's tasks in a terminal.

    ``screen`` (default: ``out`` is a terminal) chooses the full-screen view;
    otherwise plain lines, or JSON lines with ``json_lines``.  Returns the exit
    status: 0, or 1 when the server can't be reached (``once``) or refuses the
    token.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    token = token if token is not None else os.environ.get("PROGRESSISTA_API_TOKEN")
    try:
        base = _server_base(server_url)
    except ValueError as exc:
        print("progressista: %s" % exc, file=err)
        return 1
    headers = {"Authorization": "Bearer " + token} if token else {}
    view = TaskView(words)
    format_meter = _tqdm_format_meter()
    if once:
        try:
            changes = view.apply(_snapshot(base, headers))
        except WatchError as exc:
            print("progressista: %s" % exc.message, file=err)
            return 1
        if json_lines:
            for task_id, _, task in changes:
                out.write(_dumps({"type": "task", "task": dict(task, task_id=task_id)}) + "\n")
        else:
            out.write("".join(line + "\n" for line in render(
                view, header=(), format_meter=format_meter)))
        out.flush()
        return 0
    if screen is None:
        screen = not json_lines and hasattr(out, "isatty") and out.isatty()
    if screen:
        return _watch_screen(view, base, token, out, err, format_meter)
    return _watch_lines(view, base, token, out, err, format_meter, json_lines)


def _watch_lines(view, base, token, out, err, format_meter, json_lines):
    """Piped: one line per status change and a summary every 10 s at most; or JSON lines."""
    import queue
    feed = _Feed(base, token).start()
    down_since, changed, last_summary = None, False, 0.0
    try:
        while True:
            try:
                kind, value = feed.events.get(timeout=1.0)
            except queue.Empty:
                kind = None
            if kind == "refused":
                print("progressista: %s" % value, file=err, flush=True)
                return 1
            if kind == "down" and down_since is None:
                down_since = time.monotonic()
                print("progressista: %s; reconnecting" % value, file=err, flush=True)
            elif kind == "up" and down_since is not None:
                down_since = None
                print("progressista: reconnected to %s" % base, file=err, flush=True)
            elif kind == "message":
                first = view.snapshots == 0
                changes = view.apply(value)
                lines = []
                if json_lines:
                    for task_id, _, task in changes:
                        lines.append(_dumps({"type": "removed", "task_id": task_id}
                                            if task is None else
                                            {"type": "task", "task": dict(task, task_id=task_id)}))
                elif first:
                    lines.append(_summary_line(view))
                    last_summary = time.monotonic()
                else:
                    now = view.now()
                    for task_id, old, task in changes:
                        changed = True
                        if task is not None and (old is None or old.get("status")
                                                 != task.get("status")):
                            lines.append(_status_line(task_id, task, now, format_meter))
                if lines:
                    out.write("".join(line + "\n" for line in lines))
                    out.flush()
            if not json_lines and changed and \
                    time.monotonic() - last_summary >= WATCH_SUMMARY_SECONDS:
                out.write(_summary_line(view) + "\n")
                out.flush()
                changed, last_summary = False, time.monotonic()
    except KeyboardInterrupt:
        return 0
    finally:
        feed.stop()


def _watch_screen(view, base, token, out, err, format_meter):
    """The full-screen view: alternate screen, redrawn in place, ``q`` to leave."""
    import queue
    import select
    import signal
    keys = sys.stdin if sys.stdin is not None and sys.stdin.isatty() else None
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)

    def wake(*_):
        try:
            os.write(wake_w, b".")
        except OSError:  # full: a wake-up is already pending
            pass

    saved_tty, handlers = None, {}
    main_thread = threading.current_thread() is threading.main_thread()
    feed = _Feed(base, token, wake)
    ascii_only = not _can_encode(out, "█…·")
    status, down_since, last_text = "connecting", None, None
    last_draw, dirty, failure = 0.0, True, None
    try:
        if keys is not None:
            import termios
            import tty
            saved_tty = termios.tcgetattr(keys.fileno())
            tty.setcbreak(keys.fileno())  # keys one at a time, no echo; Ctrl-C still a signal
        if main_thread:
            if hasattr(signal, "SIGWINCH"):
                handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, wake)

            def terminate(signum, frame):
                raise SystemExit(128 + signum)
            for signum in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
                if signum is not None:
                    handlers[signum] = signal.signal(signum, terminate)
        out.write("\x1b[?1049h\x1b[?25l")  # the alternate screen, no cursor
        out.flush()
        feed.start()
        size = None
        while True:
            wait = max(0.0, last_draw + WATCH_REDRAW_SECONDS - time.monotonic()) if dirty \
                else max(0.0, last_draw + 1.0 - time.monotonic())  # ages tick every second
            ready = select.select([wake_r] + ([keys] if keys is not None else []), [], [], wait)[0]
            if wake_r in ready:
                os.read(wake_r, 4096)
            if keys is not None and keys in ready:
                pressed = os.read(keys.fileno(), 64)
                if not pressed or b"q" in pressed.lower() or b"\x03" in pressed:
                    return 0
            while True:
                try:
                    kind, value = feed.events.get_nowait()
                except queue.Empty:
                    break
                if kind == "message":
                    if view.apply(value):
                        dirty = True
                elif kind == "up":
                    status, down_since, dirty = "live", None, True
                elif kind == "down":  # the header says for how long, from down_since
                    down_since, dirty = down_since or time.time(), True
                elif kind == "refused":
                    failure = value
                    return 1
            try:
                current = os.get_terminal_size(out.fileno())
            except (AttributeError, ValueError, OSError):  # not a terminal after all
                current = os.terminal_size((80, 24))
            if current != size:
                size, dirty = current, True
            if time.monotonic() - last_draw >= 1.0:
                dirty = True
            if not dirty or time.monotonic() - last_draw < WATCH_REDRAW_SECONDS:
                continue
            shown = status
            if down_since is not None:
                shown = "reconnecting, server away for %s" % _age(time.time() - down_since)
            header = ["progressista watch · %s · %s%s · q quits" % (
                base, shown, " · filter: " + " ".join(view.terms) if view.terms else "")]
            if size.lines >= 15:
                header.append("")
            lines = render(view, size.columns, size.lines, header=header,
                           ascii_only=ascii_only, format_meter=format_meter)
            text = "\x1b[H" + "\x1b[K\r\n".join(lines[:size.lines]) + "\x1b[K\x1b[J"
            if text != last_text:
                out.write(text)
                out.flush()
                last_text = text
            last_draw, dirty = time.monotonic(), False
    except KeyboardInterrupt:
        return 0
    finally:
        feed.stop()
        try:
            out.write("\x1b[?25h\x1b[?1049l")  # the cursor and the screen as they were
            out.flush()
        except (OSError, ValueError):
            pass
        if saved_tty is not None:
            import termios
            termios.tcsetattr(keys.fileno(), termios.TCSADRAIN, saved_tty)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)
        if failure is not None:
            print("progressista: %s" % failure, file=err, flush=True)


def _wait_state(tasks, names):
    """Per NAME: its status counts, members started, expected size, done."""
    state = {}
    for name in names:
        state[name] = {"counts": dict.fromkeys(STATUSES, 0), "members": set(), "expected": None,
                       "newest": None}
    groups = {name: name for name in names if ":" not in name}
    exact = [name for name in names if ":" in name]
    for task_id, task in tasks.items():
        matched = []
        group = groups.get(_group_of(task_id))
        if group is not None:
            matched.append(group)
        for name in exact:
            if task_id == name or task_id.startswith(name + "/"):
                matched.append(name)
        for name in matched:
            entry = state[name]
            status = task.get("status")
            entry["counts"][status if status in STATUSES else "active"] += 1
            entry["members"].add(_member_of(task_id))
            size = task.get("group_size")
            if ":" not in name and isinstance(size, int) and size >= 1:
                key = _activity(task)
                if entry["newest"] is None or key >= entry["newest"]:
                    entry["newest"], entry["expected"] = key, size
    for entry in state.values():
        counts = entry["counts"]
        entry["tasks"] = sum(counts.values())
        entry["members"] = len(entry["members"])
        entry["done"] = entry["tasks"] > 0 and not counts["active"] and not counts["stale"] \
            and (entry["expected"] is None or entry["members"] >= entry["expected"])
    return state


def _wait_line(state):
    parts = []
    for name, entry in state.items():
        if not entry["tasks"]:
            parts.append("%s: not on the server yet" % name)
            continue
        counts = entry["counts"]
        text = " · ".join("%d %s" % (counts[status], title.lower())
                          for status, title in SECTIONS if counts[status])
        if entry["expected"] is not None:
            text += " · %d/%d started" % (entry["members"], entry["expected"])
        parts.append("%s: %s%s" % (name, text, " (done)" if entry["done"] else ""))
    return "progressista wait: " + "; ".join(parts)


def wait(names, server_url=None, token=None, timeout=None, err=None):
    """``progressista wait``: block until every NAME (a group or a task id) is done.

    Returns 0 when all their tasks closed, 1 when any failed, 2 on timeout,
    3 when the server can't be reached or refuses the token.  A NAME not yet
    on the server is waited for; one line per change of counts goes to ``err``.
    """
    import queue
    err = sys.stderr if err is None else err
    names = list(dict.fromkeys(names))
    token = token if token is not None else os.environ.get("PROGRESSISTA_API_TOKEN")
    try:
        base = _server_base(server_url)
    except ValueError as exc:
        print("progressista: %s" % exc, file=err)
        return 3
    deadline = None if timeout is None else time.monotonic() + timeout
    groups = {name for name in names if ":" not in name}
    exact = tuple(name for name in names if ":" in name)
    view = TaskView(keep=lambda task_id: _group_of(task_id) in groups or (
        task_id.startswith(exact) and any(task_id == name or task_id.startswith(name + "/")
                                          for name in exact)))
    feed = _Feed(base, token).start()
    connected, down_since, last_line, done_since, state = False, None, None, None, {}
    try:
        while True:
            now = time.monotonic()
            if done_since is not None and now - done_since >= WAIT_SETTLE_SECONDS \
                    and feed.events.empty():
                return 1 if any(entry["counts"]["error"] for entry in state.values()) else 0
            left = None if deadline is None else deadline - now
            if left is not None and left <= 0 and done_since is None:
                print("progressista wait: timed out after %gs" % timeout, file=err, flush=True)
                return 2
            pause = 1.0 if done_since is None else done_since + WAIT_SETTLE_SECONDS - now
            try:
                kind, value = feed.events.get(timeout=max(0.0, min(pause, left or pause)
                                                          if done_since is None else pause))
            except queue.Empty:
                kind = None
            if kind == "refused":
                print("progressista: %s" % value, file=err, flush=True)
                return 3
            if kind == "down":
                if not connected:
                    print("progressista: %s" % value, file=err, flush=True)
                    return 3
                if down_since is None:
                    down_since = time.monotonic()
                    print("progressista wait: %s; reconnecting" % value, file=err, flush=True)
            elif kind == "up":
                connected, down_since = True, None
            elif kind == "message":
                view.apply(value)
                if not feed.events.empty():
                    continue  # judge the newest state, not every step to it
                state = _wait_state(view.tasks, names)
                line = _wait_line(state)
                if line != last_line:
                    print(line, file=err, flush=True)
                    last_line = line
                if not all(entry["done"] for entry in state.values()):
                    done_since = None
                elif done_since is None:
                    done_since = time.monotonic()
            if connected and down_since is not None and \
                    time.monotonic() - down_since > WAIT_LOST_SECONDS:
                print("progressista wait: %s is gone (no answer for %gs)"
                      % (base, WAIT_LOST_SECONDS), file=err, flush=True)
                return 3
    except KeyboardInterrupt:
        return 130
    finally:
        feed.stop()


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
/* the job line: every task of the prefix, whatever its section (SPEC 8) */
.group-job { flex: 1 1 100%; display: flex; flex-wrap: wrap; align-items: center; gap: 4px 12px; min-width: 0;
  color: var(--muted); font-size: 12.5px; font-variant-numeric: tabular-nums; }
.group-job-bar { flex: 0 1 200px; height: 4px; }
.job-percent { font-weight: 600; color: var(--text); }
.group-job-bar .bar-fill { background: var(--blue); }
.group-job[data-state="failed"] .group-job-bar .bar-fill { background: var(--red); }
.group-job[data-state="done"] .group-job-bar .bar-fill { background: var(--green); }

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
.read-only .discard, .read-only #btn-clear-close, .read-only #btn-clear-stale { display: none; }
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
<template id="tpl-group"><div class="group"><div class="group-header"><button type="button" class="group-toggle" aria-expanded="true"><span class="chev" aria-hidden="true"></span><span class="group-name"></span></button><span class="group-count"></span><span class="group-progress"></span><div class="bar group-bar"><div class="bar-fill"></div></div><div class="group-job" hidden><div class="bar group-job-bar"><div class="bar-fill"></div></div><span class="job-percent"></span><span class="job-started"></span><span class="job-counts"></span><span class="job-rate"></span><span class="job-eta"></span></div></div><div class="list group-body"></div></div></template>
<script>
(function () {
  'use strict';

  // ---- constants and small helpers ------------------------------------
  var STATUSES = ['active', 'stale', 'error', 'close'];
  var STUCK_AFTER = 30;    // s without progress before an active bar is called stuck
  // An open bar says something at least every 5 s (progress or heartbeat):
  // three missed heartbeats and it shows as "no contact", whatever the
  // server's --stale-seconds says (a process killed, a close lost).
  var ALIVE_WITHIN = 15;   // s since last contact (heartbeats included) to call it alive
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
  // The token is kept for this tab's requests and reconnects only: out of
  // the address bar, so it is not bookmarked, shared or shown on a screen.
  if (params.has('token')) {
    params.delete('token');
    var rest = params.toString();
    try {
      history.replaceState(history.state, '', location.pathname + (rest ? '?' + rest : '') + location.hash);
    } catch (e) { /* a sandboxed frame: the address stays as it was */ }
  }

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
  // one formatter for every number (toLocaleString with options makes a new one per call)
  var plainNumber = new Intl.NumberFormat('en-US', { maximumFractionDigits: 2 });
  function fmtNum(x, scale) {
    if (typeof x !== 'number' || !isFinite(x)) return '?';
    if (!scale) return plainNumber.format(x);
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
    if (sinceSeen >= ALIVE_WITHIN) return ['no contact for ' + fmtAge(sinceSeen), 'age silent'];
    if (t.status === 'active' && sinceUpd < STUCK_AFTER) return ['updated ' + fmtAge(sinceUpd) + ' ago', 'age'];
    {
      if (seen - upd >= 1) {  // contact after the last progress: a heartbeat
        return ['no progress for ' + fmtAge(sinceUpd) + ', alive (heartbeat ' + fmtAge(sinceSeen) + ' ago)', 'age stuck'];
      }
      return ['no progress for ' + fmtAge(sinceUpd), 'age stuck'];
    }
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
  var fullSync = false;     // next render takes every task of the map (a snapshot came)
  var gotSnapshot = false;
  var grouping = store('group') !== '0';
  var collapsed = new Set();
  var filterTerms = [];
  var counts = { active: 0, stale: 0, error: 0, close: 0 };
  var PAGE = 100;           // cards shown per section (group members included) before "Show more"
  var sections = {};
  STATUSES.forEach(function (s) {
    sections[s] = {
      status: s, log: [], size: 0, moved: [], limit: PAGE, sort: false, dirty: true, matching: 0, beyond: 0,
      list: $('list-' + s), count: $('count-' + s), shown: $('shown-' + s),
      empty: $('empty-' + s), more: $('more-' + s)
    };
  });
  var tplCard = $('tpl-card').content.firstElementChild;
  var tplGroup = $('tpl-group').content.firstElementChild;
  var byKey = function (a, b) { return b.key - a.key; };

  // Put a group's items back in order, newest first. Entries whose key
  // changed or that were just filed (g.moved) are taken out, sorted and
  // merged back; entries that left (keep() false) are dropped: linear passes
  // and k log k compares, not a sort of every member.
  var moveMark = 0;
  function resort(box, keep) {
    var items = box.items, moved = box.moved, i, it;
    var stale = box.stale;
    box.moved = [];
    box.stale = false;
    box.sort = false;
    if (moved.length * 8 > items.length) {
      if (stale) items = items.filter(keep);
      items.sort(byKey);
      box.items = items;
      return;
    }
    var mark = ++moveMark, rest = [], fresh = [];
    for (i = 0; i < moved.length; i++) moved[i]._mv = mark;
    for (i = 0; i < items.length; i++) {
      it = items[i];
      if (it._mv !== mark && (!stale || keep(it))) rest.push(it);
    }
    for (i = 0; i < moved.length; i++) {
      it = moved[i];
      if (it._mv === mark && keep(it)) { it._mv = 0; fresh.push(it); }
    }
    fresh.sort(byKey);
    var out = new Array(rest.length + fresh.length), a = 0, b = 0, k = 0;
    while (a < rest.length && b < fresh.length) out[k++] = rest[a].key >= fresh[b].key ? rest[a++] : fresh[b++];
    while (a < rest.length) out[k++] = rest[a++];
    while (b < fresh.length) out[k++] = fresh[b++];
    box.items = out;
  }

  // A section's entries (cards, and group boxes) sit in sec.log, oldest
  // first. An entry whose key changed, or that was just filed, is appended
  // again (sec.moved, sorted) and its old place left dead: an entry is live
  // where it._sec === sec and it._at is its index. A frame then costs what
  // changed, not the 100,000 tasks a section may hold; the log is rebuilt
  // when an entry comes in older than the newest, or the dead pile up.
  var byKeyAsc = function (a, b) { return a.key - b.key; };
  function resortSection(sec) {
    var log = sec.log, moved = sec.moved, mark = ++moveMark, fresh = [], i, it, last = null;
    sec.moved = [];
    sec.sort = false;
    for (i = 0; i < moved.length; i++) {
      it = moved[i];
      if (it._sec === sec && it._mv !== mark) { it._mv = mark; fresh.push(it); }
    }
    fresh.sort(byKeyAsc);
    for (i = log.length - 1; i >= 0; i--) {  // the newest live entry that stays
      it = log[i];
      if (it._at === i && it._sec === sec && it._mv !== mark) { last = it; break; }
    }
    if ((!fresh.length || !last || fresh[0].key >= last.key) &&
        log.length + fresh.length <= 2 * sec.size + 1024) {
      for (i = 0; i < fresh.length; i++) { fresh[i]._at = log.length; log.push(fresh[i]); }
      return;
    }
    var rest = [], out = [], a = 0, b = 0;
    for (i = 0; i < log.length; i++) {
      it = log[i];
      if (it._at === i && it._sec === sec && it._mv !== mark) rest.push(it);
    }
    while (a < rest.length && b < fresh.length) out.push(rest[a].key <= fresh[b].key ? rest[a++] : fresh[b++]);
    while (a < rest.length) out.push(rest[a++]);
    while (b < fresh.length) out.push(fresh[b++]);
    for (i = 0; i < out.length; i++) out[i]._at = i;
    sec.log = out;
  }

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
      // 100,000 tasks come this way: the map is filled once, and render()
      // goes through it (fullSync) rather than through a pending entry each
      var has = Object.prototype.hasOwnProperty, valid = function (x) { return x && typeof x === 'object'; };
      tasks.forEach(function (prevTask, oldId) {
        t = has.call(incoming, oldId) ? incoming[oldId] : null;
        if (!valid(t)) pending.set(oldId, null);
        else noteTransition(prevTask, t);
      });
      tasks.clear();
      for (id in incoming) {
        t = incoming[id];
        if (!valid(t)) continue;
        t.task_id = id;
        tasks.set(id, t);
      }
      pending.forEach(function (task, tid) { if (task !== null || tasks.has(tid)) pending.delete(tid); });
      fullSync = true;
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
      search: null, painted: false, metaKey: null, pct: null, cN: 0, cT: 0, job: null, js: null, jm: null,
      _sec: null, _at: -1, _mv: 0 };
  }

  // A card that leaves the page gives its element back (releaseCard) for the
  // next card shown: with 100,000 tasks the newest 100 change every frame,
  // and the page holds elements for what it shows, not for every task seen.
  var cardPool = [];
  function releaseCard(el) {
    var rec = el._rec;
    if (!rec || rec.el !== el) return;
    rec.el = null;
    rec.painted = false;
    el._rec = null;
    if (cardPool.length < 2 * PAGE) cardPool.push(el);
  }

  function cardElement(rec) {
    if (rec.el) return rec.el;
    // walk #tpl-card's fixed structure (cheaper than a querySelector per field)
    var el = cardPool.pop() || tplCard.cloneNode(true), head = el.firstElementChild, titles = head.firstElementChild;
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
    el._rec = rec;
    rec.pct = rec.metaKey = null;  // what a reused element shows is another card's
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
        isGroup: true, gkey: gkey, status: status, prefix: prefix, el: el, items: [], moved: [], size: 0, key: 0,
        sumN: 0, sumT: 0, withTotal: 0, units: new Map(),
        _sec: null, _at: -1, _mv: 0,
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

  // A box's own sums are kept as its members come, change and go (each
  // member's part is kept on it to be taken back), so a frame costs the
  // members that changed, not the size of every box they are in.
  function groupAdd(g, rec) {
    var t = rec.t, n = num(t.n) || 0, total = num(t.total), w = total > 0 ? 1 : 0;
    rec.gN = w ? n : 0;
    rec.gT = w ? total : 0;
    rec.gW = w;
    rec.gU = t.unit || 'it';
    g.sumN += rec.gN;
    g.sumT += rec.gT;
    g.withTotal += w;
    g.units.set(rec.gU, (g.units.get(rec.gU) || 0) + 1);
  }
  function groupRemove(g, rec) {
    g.sumN -= rec.gN;
    g.sumT -= rec.gT;
    g.withTotal -= rec.gW;
    var left = g.units.get(rec.gU) - 1;
    if (left) g.units.set(rec.gU, left); else g.units.delete(rec.gU);
  }

  function updateGroup(g) {
    var sumN = g.sumN, sumT = g.sumT, withTotal = g.withTotal;
    var sameUnit = g.units.size === 1, unit = sameUnit ? g.units.keys().next().value : null;
    var size = g.size;
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
    paintJob(g);
  }

  // ---- jobs (SPEC 8) ------------------------------------------------------
  // A job is every task of a prefix, whatever its section. Each box of the
  // prefix shows its members against the expected size (task.group_size),
  // the members' states (by their main bar: the task without "/k"), the sum
  // of the main bars, their rate and the ETA, as GET /groups computes them.
  // Each task adds its share and takes it back when it changes, so an update
  // costs the same in a job of 10 or of 100,000.
  var jobs = new Map();     // prefix -> job record
  var jobsDirty = new Set();
  function jobShare(rec, t) {
    var j = rec.job, s = rec.js;
    if (j) {  // take back the old share
      j.tasks--;
      var left = j.members.get(rec.jm) - 1;
      if (left) j.members.set(rec.jm, left); else j.members.delete(rec.jm);
      if (s) {
        j.mains[s.status]--;
        var uses = j.units.get(s.unit) - 1;
        if (uses) j.units.set(s.unit, uses); else j.units.delete(s.unit);
        j.n -= s.n;
        if (s.total === null) j.noTotal--; else j.total -= s.total;
        if (s.status === 'active') {
          j.active--;
          j.rate -= s.rate;
          if (s.total === null) j.remUnknown--; else j.rem -= s.rem;
        }
      }
      jobsDirty.add(j);
      if (!j.tasks) jobs.delete(j.prefix);
    }
    rec.job = rec.js = null;
    var prefix = t ? prefixOf(rec.id) : null;
    if (prefix === null) return;
    j = jobs.get(prefix);
    if (!j) {
      j = { prefix: prefix, tasks: 0, members: new Map(), mains: { active: 0, stale: 0, close: 0, error: 0 },
        n: 0, total: 0, noTotal: 0, active: 0, rate: 0, rem: 0, remUnknown: 0, expected: null,
        units: new Map() };
      jobs.set(prefix, j);
    }
    var tail = rec.id.slice(prefix.length + 1), slash = tail.indexOf('/');
    rec.job = j;
    rec.jm = slash < 0 ? tail : tail.slice(0, slash);
    j.tasks++;
    j.members.set(rec.jm, (j.members.get(rec.jm) || 0) + 1);
    var size = num(t.group_size);
    if (size !== null && size >= 1) j.expected = size;  // the server sets the latest on every task
    jobsDirty.add(j);
    if (slash >= 0) return;
    var n = Math.max(num(t.n) || 0, 0), total = num(t.total), status = t.status;
    if (total !== null && total < 0) total = null;
    s = rec.js = { status: status, n: n, total: total, rate: 0, rem: 0, unit: t.unit ? String(t.unit) : 'it' };
    j.mains[status]++;
    j.units.set(s.unit, (j.units.get(s.unit) || 0) + 1);
    j.n += n;
    if (total === null) j.noTotal++; else j.total += total;
    if (status === 'active') {
      j.active++;
      s.rate = Math.max(num(t.rate) || 0, 0);
      j.rate += s.rate;
      if (total === null) j.remUnknown++; else { s.rem = Math.max(total - n, 0); j.rem += s.rem; }
    }
  }
  // Repaint the job line of each box of a changed job (only that line: a
  // box's own sums are redone when one of its members changes).
  function markJobs() {
    jobsDirty.forEach(function (j) {
      if (!j.active) j.rate = j.rem = 0;  // no drift left behind by sums of floats
      for (var i = 0; i < STATUSES.length; i++) {
        var g = groups.get(STATUSES[i] + '\n' + j.prefix);
        if (g) paintJob(g);
      }
    });
    jobsDirty.clear();
  }
  function paintJob(g) {
    var j = jobs.get(g.prefix), el = g.job || (g.job = jobElements(g.el));
    setHidden(el.row, !j);
    if (!j) return;
    var unit = j.units.size === 1 ? j.units.keys().next().value : '';  // mixed units: counts only
    var members = j.members.size, m = j.mains, mains = m.active + m.stale + m.close + m.error;
    setText(el.started, j.expected !== null ? fmtNum(members) + ' / ' + fmtNum(j.expected) + ' started'
      : fmtNum(members) + (members === 1 ? ' member' : ' members'));
    // the bar: blue while a member runs, then green, or red when one failed
    var state = m.active || m.stale ? 'running' : m.error ? 'failed' : 'done';
    if (el.row._state !== state) { el.row._state = state; el.row.dataset.state = state; }
    setText(el.counts, fmtNum(m.close) + ' done \u00b7 ' + fmtNum(m.error) + ' failed \u00b7 ' +
      fmtNum(m.active) + ' running' + (m.stale ? ' \u00b7 ' + fmtNum(m.stale) + ' stalled' : ''));
    // members not started yet count as 0% done, each the size of an average started one
    var known = mains > 0 && !j.noTotal && j.total > 0, w = '', pct = '';
    if (known) {
      var whole = j.expected !== null && j.expected > members ? j.total / members * j.expected : j.total;
      var ratio = Math.min(1, Math.max(0, j.n / whole));
      w = (ratio * 100).toFixed(2) + '%';
      pct = (j.n >= whole ? 100 : Math.min(99, Math.floor(ratio * 100))) + '%';
    }
    setHidden(el.bar, !known);
    if (el.fill._w !== w) { el.fill._w = w; el.fill.style.width = w; }
    setShown(el.percent, pct);
    setTitle(el.bar, known ? fmtProgress(j.n, j.total, unit) + ' over the main bars of the members started' : '');
    // bytes/s plus rows/s is no rate: with mixed units the line keeps counts and the bar only
    var rate = j.active && unit ? j.rate : 0, early = j.expected !== null && members < j.expected;
    setShown(el.rate, rate > 0 ? fmtRate(rate, unit || 'it') : '');
    setShown(el.eta, rate > 0 && !j.remUnknown ? 'ETA ' + fmtInterval(j.rem / rate) + (early ? ' (started ones)' : '') : '');
  }
  function jobElements(groupEl) {
    var row = groupEl.querySelector('.group-job'), bar = row.firstElementChild, percent = bar.nextElementSibling;
    var started = percent.nextElementSibling, counts = started.nextElementSibling, rate = counts.nextElementSibling;
    return { row: row, bar: bar, fill: bar.firstElementChild, percent: percent, started: started, counts: counts,
      rate: rate, eta: rate.nextElementSibling };
  }

  // Sort a group's members, refresh its header, count those passing the filter.
  function settleGroup(g) {
    var sec = sections[g.status];
    if (!g.size) {
      groups.delete(g.gkey);
      if (g._sec === sec) { g._sec = null; sec.size--; }
      sec.sort = sec.dirty = true;
      return;
    }
    if (g.sort) {
      resort(g, function (r) { return r.group === g; });
      g.dirty = true;
    }
    if (g.summary) { updateGroup(g); g.summary = false; }
    if (g.dirty) {
      var matching = 0, lone = null;
      if (filterTerms.length) {
        for (var i = 0; i < g.items.length; i++) {
          if (g.items[i].match && !matching++) lone = g.items[i];
        }
      } else {  // every member matches
        matching = g.size;
        lone = g.items[0];
      }
      // a group with one shown member is no box: that card sits in the
      // section's list, in its own place by activity
      g.lone = matching === 1 ? lone : null;
      var key = (g.lone || g.items[0]).key;
      if (key !== g.key) { g.key = key; sec.sort = true; sec.moved.push(g); }
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
      if (!g.listed) {
        g.listed = true;
        g._sec = box;
        box.size++;
        box.moved.push(g);
        box.sort = box.dirty = true;
      }
      g.size++;
      g.summary = true;
      rec.group = g;
      groupAdd(g, rec);
      g.items.push(rec);
      g.moved.push(rec);
      g.sort = g.dirty = true;
      return;
    }
    rec._sec = box;
    box.size++;
    box.moved.push(rec);
    box.sort = box.dirty = true;
  }

  function unfile(rec) {
    if (!rec.status) return;
    counts[rec.status]--;
    var box = rec.group || sections[rec.status];
    box.sort = box.dirty = true;
    box.stale = true;  // its entry in a group's items is dropped at the next sort, this frame
    if (rec.group) { groupRemove(rec.group, rec); rec.group.size--; rec.group.summary = true; }
    else if (rec._sec) { rec._sec = null; box.size--; }  // its entry in the log is dead
    rec.status = null;
    rec.group = null;
  }

  function refile() {
    refileAll = false;
    STATUSES.forEach(function (s) {
      var sec = sections[s];
      counts[s] = 0;
      sec.log = [];
      sec.size = 0;
      sec.moved = [];
      sec.sort = sec.dirty = true;
      sec.stale = false;
    });
    groups.forEach(function (g) {
      g.items = [];
      g.moved = [];
      g.size = 0;
      g.sumN = g.sumT = g.withTotal = 0;
      g.units = new Map();
      g.sort = g.dirty = g.summary = true;
      g.stale = g.listed = false;
      g._sec = null;
    });
    cards.forEach(function (rec) {
      rec.status = rec.group = rec._sec = null;
      file(rec, rec.t.status);
    });
  }

  // Make container's element children exactly the items of win, in order,
  // touching only what differs.
  var stamp = 0;
  function reconcile(container, win, now) {
    var mark = ++stamp, i, el, next;
    for (i = 0; i < win.length; i++) if (win[i].el) win[i].el._stamp = mark;
    for (el = container.firstElementChild; el; el = next) {
      next = el.nextElementSibling;
      if (el._stamp !== mark) { el.remove(); releaseCard(el); }
    }
    var c = container.firstElementChild;
    for (i = 0; i < win.length; i++) {
      var it = win[i];
      el = it.isGroup ? it.el : cardElement(it);
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
    if (sec.sort) resortSection(sec);
    // the budget counts cards; a group takes what is left of it for its
    // members (a collapsed group costs one line)
    var win = [], matching = 0, beyond = 0, budget = sec.limit, filtering = filterTerms.length > 0;
    for (var i = sec.log.length - 1; i >= 0; i--) {  // newest first
      var it = sec.log[i];
      if (it._at !== i || it._sec !== sec) continue;  // a dead entry
      var m = it.isGroup ? it.matching : (it.match ? 1 : 0);
      if (!m) continue;
      if (budget <= 0 && !filtering) {  // without a filter every card matches: the rest is counted
        beyond += counts[sec.status] - matching;
        matching = counts[sec.status];
        break;
      }
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
    if (fullSync) {
      fullSync = false;
      tasks.forEach(take);
    }
    pending.forEach(take);
    function take(t, id) {
      var rec = cards.get(id);
      if (t === null) {
        if (rec) { unfile(rec); contribute(rec, null); jobShare(rec, null); if (rec.el) rec.el.remove(); cards.delete(id); }
        return;
      }
      if (!rec) { rec = newRecord(id); cards.set(id, rec); }
      if (STATUSES.indexOf(t.status) < 0) t.status = 'active';
      rec.t = t;
      rec.search = null;
      rec.painted = false;
      contribute(rec, t);
      jobShare(rec, t);
      var match = filtering ? matches(searchOf(rec)) : true, key = activityKey(t);
      if (refileAll) { rec.key = key; rec.match = match; return; }
      if (rec.status !== t.status) {
        unfile(rec);
        rec.key = key;
        rec.match = match;
        file(rec, t.status);
      } else {
        var box = rec.group || sections[rec.status];
        if (key !== rec.key) { rec.key = key; box.moved.push(rec); box.sort = box.dirty = true; }
        if (match !== rec.match) { rec.match = match; box.dirty = true; }
        if (rec.group) {
          groupRemove(rec.group, rec);
          groupAdd(rec.group, rec);
          rec.group.summary = true;
        }
      }
      if (rec.el && rec.el.isConnected) paint(rec, now);
    }
    pending.clear();
    if (jobsDirty.size) markJobs();
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
      var now = serverNow(), shown = $('main').getElementsByClassName('card');
      for (var i = 0; i < shown.length; i++) if (shown[i]._rec) setAge(shown[i]._rec, now);
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
      .then(function (health) { applyAccess(health); done(health); }, function () { done(null); });
  }

  // A read-only token may look at everything and change nothing: the page
  // hides Discard, Clear completed and Clear stale for it.
  function applyAccess(health) {
    if (health && health.access) document.body.classList.toggle('read-only', health.access === 'read');
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
  probe(function () {});
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
    # A job (SPEC section 8): an array of 8 tasks of which 3 have started so far.
    array_id = "demo-array-%s" % time.strftime("%H%M%S")
    for _ in cls(range(40), desc="array task 0: shard 0", unit="file", group_size=8,
                 task_id=array_id + ":0", **quiet):
        pass
    shards = [cls(total=400, desc="array task %d: shard %d" % (k, k), unit="file",
                  group_size=8, task_id="%s:%d" % (array_id, k), **quiet) for k in (1, 2)]
    deadline = time.monotonic() + duration if duration else float("inf")
    try:
        while time.monotonic() < deadline:
            running.update(3)
            unknown.update(48_000)
            with_meta.update(1)
            for k, shard in enumerate(shards):
                shard.update(1 + k)
            running.set_postfix(loss="%.3f" % (2.0 / (1 + running.n / 300)))
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    for bar in [running, unknown, with_meta, stalled] + shards:
        bar.close()
    return 0


def _env_list(*names):
    values = []
    for name in names:
        values.extend(v.strip() for v in os.environ.get(name, "").split(",") if v.strip())
    return values


def _read_tokens(parser, given):
    """``--read-token`` values, else ``$PROGRESSISTA_READ_TOKENS``; an empty one
    (an unset variable) is a usage error, as for ``--token``."""
    if given is None:
        text = os.environ.get("PROGRESSISTA_READ_TOKENS")
        if text is None:
            return []
        given = text.split(",")
        if len(given) > 1 and not given[-1].strip(" \t"):
            given.pop()  # a trailing comma
    if not all(t.strip(" \t") for t in given):
        parser.error("an empty read-only token (--read-token or $PROGRESSISTA_READ_TOKENS; "
                     "an unset variable?): give a real token, or none")
    return [t.strip(" \t") for t in given]


def _build_parser():
    import argparse
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="progressista", description="tqdm progress bars from anywhere, live in a browser.")
    parser.add_argument("--version", action="version", version="progressista " + __version__)
    parser.add_argument("--log-level", default=None, help=LOG_LEVEL_HELP)
    commands = parser.add_subparsers(dest="command", metavar="{serve,run,demo,watch,wait,notify}")
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
    p.add_argument("--allow-host", action="append", default=None,
                   help="a name this server may be reached by besides loopback ones, "
                        "repeatable ($PROGRESSISTA_ALLOW_HOSTS)")
    p.add_argument("--read-token", action="append", default=None,
                   help="a token that may read everything and change nothing, for sharing "
                        "a view; repeatable ($PROGRESSISTA_READ_TOKENS, a comma list)")
    p.add_argument("--certfile", default=env("PROGRESSISTA_CERTFILE"),
                   help="PEM certificate (chain): serve HTTPS and WSS ($PROGRESSISTA_CERTFILE)")
    p.add_argument("--keyfile", default=env("PROGRESSISTA_KEYFILE"),
                   help="PEM private key of --certfile, unencrypted ($PROGRESSISTA_KEYFILE)")
    p.add_argument("--notify", action="append", default=None, metavar="URL",
                   help="webhook for alerts, repeatable: http(s)://, slack+https://, "
                        "discord+https://, ntfy+https://host/topic ($PROGRESSISTA_NOTIFY, "
                        "space separated)")
    p.add_argument("--notify-on", default=env("PROGRESSISTA_NOTIFY_ON", "fail,stall,done"),
                   metavar="EVENTS", help="alert on these, comma separated: fail, stall, "
                   "finish, done (default fail,stall,done)")
    p.add_argument("--notify-window", default=env("PROGRESSISTA_NOTIFY_WINDOW", "10"),
                   metavar="S", help="one digest per webhook per this many seconds (default 10)")

    p = commands.add_parser("run", help="run a script or module with every tqdm bar remote",
                            usage="progressista run [options] (script.py | -m module) [-- args]")
    p.add_argument("-m", dest="module", help="run a module, as python -m does")
    p.add_argument("target", nargs="?", help="the script to run")
    p.add_argument("--server-url", help="where to POST ($PROGRESSISTA_SERVER_URL)")
    p.add_argument("--push-every", help="least seconds between sends of one bar")
    p.add_argument("--token", help="API token ($PROGRESSISTA_API_TOKEN)")
    p.add_argument("--meta", help="JSON object attached to every bar")
    p.add_argument("--group-size", help="members the job's group will have (default: from "
                   "Slurm, torchrun or $PROGRESSISTA_GROUP_SIZE)")

    p = commands.add_parser("demo", help="push a few bars in every state to a server")
    p.add_argument("--server-url", help="where to POST ($PROGRESSISTA_SERVER_URL)")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds to keep the live bars moving (0: until Ctrl-C)")

    p = commands.add_parser("notify", help="send one test alert to a webhook URL")
    p.add_argument("url", help="as for serve --notify (slack+, discord+, ntfy+ or plain)")
    p.add_argument("text", nargs="?", help="the message (default: a test line)")

    p = commands.add_parser("watch", help="the live view in a terminal (q quits)")
    p.add_argument("words", nargs="*", metavar="WORDS",
                   help="show only tasks whose id, description, host or meta hold every word")
    p.add_argument("--server-url", help="the server ($PROGRESSISTA_SERVER_URL; path ignored)")
    p.add_argument("--token", help="API token ($PROGRESSISTA_API_TOKEN)")
    p.add_argument("--once", action="store_true", help="print the current state and exit")
    p.add_argument("--json", action="store_true",
                   help="JSON lines: a task per line, then each change")

    p = commands.add_parser("wait", help="wait for groups or tasks to end (exit 0 done, "
                            "1 failed, 2 timeout, 3 unreachable)")
    p.add_argument("names", nargs="+", metavar="NAME", help="a group (run-7) or a task id")
    p.add_argument("--timeout", help="give up after this many seconds (exit 2)")
    p.add_argument("--server-url", help="the server ($PROGRESSISTA_SERVER_URL; path ignored)")
    p.add_argument("--token", help="API token ($PROGRESSISTA_API_TOKEN)")

    # --log-level goes before the command or after it, as the README shows it
    # (``serve --log-level DEBUG``); given after, it wins.  Keep this last.
    for p in commands.choices.values():
        p.add_argument("--log-level", default=argparse.SUPPRESS, help=LOG_LEVEL_HELP)
    return parser


LOG_LEVEL_HELP = ("DEBUG, INFO, WARNING or ERROR ($PROGRESSISTA_LOG_LEVEL; default INFO). "
                  "For serve, DEBUG logs every request; for run, it sets the level of "
                  "progressista's own log only, on stderr, never the target's logging")


def _number(parser, name, text, kind=float, minimum=0):
    try:
        value = kind(text)
        if value < minimum or (kind is float and not math.isfinite(value)):
            raise ValueError
        return value
    except (TypeError, ValueError):
        parser.error("%s must be a number >= %s, got %r" % (name, minimum, text))


def _notify_options(parser, args):
    """``serve``'s alert options, checked: a bad URL or event is a usage error."""
    urls = args.notify or os.environ.get("PROGRESSISTA_NOTIFY", "").split()
    for url in urls:
        try:
            Webhook(url)
        except ValueError as exc:
            parser.error("--notify: %s" % exc)
    try:
        events = parse_notify_events(args.notify_on)
    except ValueError as exc:
        parser.error("--notify-on: %s" % exc)
    window = _number(parser, "--notify-window", args.notify_window)
    return dict(notify=urls, notify_on=events, notify_window=window)


def _notify_command(parser, args):
    """``notify URL [TEXT]``: print what the receiver answered; 0 on 2xx."""
    try:
        hook = Webhook(args.url)
    except ValueError as exc:
        parser.error("notify: %s" % exc)
    status, reason = notify_test(hook, args.text)
    if status is None:
        print("%s: no answer (%s)" % (hook, reason), file=sys.stderr)
        return 1
    print("%s answered HTTP %d" % (hook, status))
    return 0 if 200 <= status < 300 else 1


_RUN_VALUED = ("-m", "--server-url", "--push-every", "--token", "--meta", "--log-level",
               "--group-size")


def _command_at(argv):
    """Where the command is in ``argv``: after the top-level options, if any."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--log-level" else 1
    return i


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
        while k < len(between):
            if between[k] in _RUN_VALUED[1:]:
                k += 2
            elif between[k].partition("=")[0] in _RUN_VALUED[1:] and "=" in between[k]:
                k += 1  # --server-url=URL
            else:
                break
        if k == len(between):
            return ours + between, rest[cut + 1:]
    return ours, rest


def main(argv=None):
    """The command line: ``serve``, ``run``, ``demo``, ``watch``, ``wait`` and ``notify``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    script_args = []
    at = _command_at(argv)
    if argv[at:at + 1] == ["run"]:
        ours, script_args = _split_run_args(argv[at:])
        argv = argv[:at] + ours
    args = parser.parse_args(argv)
    level_name = args.log_level or os.environ.get("PROGRESSISTA_LOG_LEVEL") or "INFO"
    level = getattr(logging, level_name.upper(), None)
    if not isinstance(level, int):
        parser.error("--log-level must be DEBUG, INFO, WARNING or ERROR, got %r" % level_name)
    log_format = "%(asctime)s %(name)s %(levelname)s %(message)s"
    if args.command != "run":
        logging.basicConfig(level=level, format=log_format)
    elif args.log_level or os.environ.get("PROGRESSISTA_LOG_LEVEL"):
        # A run target configures logging itself, as under python: only our
        # own logger gets a handler, and only when a level was asked for.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(log_format))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False

    if args.command == "serve":
        tokens = args.token or _env_list("PROGRESSISTA_API_TOKEN", "PROGRESSISTA_API_TOKENS")
        if args.token is not None and not all(t.strip(" \t") for t in args.token):
            parser.error("--token is empty (an unset variable?): give a real token, "
                         "or leave --token out for no authentication")
        hosts = args.allow_host or _env_list("PROGRESSISTA_ALLOW_HOSTS")
        read_tokens = _read_tokens(parser, args.read_token)
        if args.certfile == "" or args.keyfile == "":
            parser.error("--certfile or --keyfile is empty (an unset variable?): give both "
                         "PEM files, or neither for plain HTTP")
        if bool(args.certfile) != bool(args.keyfile):
            parser.error("TLS needs both --certfile and --keyfile ($PROGRESSISTA_CERTFILE, "
                         "$PROGRESSISTA_KEYFILE)")
        origins = args.allow_origin or _env_list("PROGRESSISTA_ALLOW_ORIGINS")
        options = dict(
            tokens=tokens, db=args.db, allow_origins=origins, allow_hosts=hosts,
            read_tokens=read_tokens, certfile=args.certfile, keyfile=args.keyfile,
            stale_seconds=_number(parser, "--stale-seconds", args.stale_seconds),
            retention_seconds=_number(parser, "--retention-seconds", args.retention_seconds),
            max_tasks=_number(parser, "--max-tasks", args.max_tasks, int, 1),
            **_notify_options(parser, args))
        port = _number(parser, "--port", args.port, int)
        if port > 65535:
            parser.error("--port must be 0..65535")
        try:
            serve(args.host, port, **options)
        except DatabaseError as exc:
            print("progressista: error: %s" % exc, file=sys.stderr)
            return 1
        except CertificateError as exc:
            print("progressista: error: %s" % exc, file=sys.stderr)
            return 2
        except OSError as exc:
            print("progressista: error: cannot listen on %s:%s: %s"
                  % (args.host, port, exc.strerror or exc), file=sys.stderr)
            return 1
        return 0

    if args.command == "notify":
        return _notify_command(parser, args)

    if args.command == "demo":
        url = args.server_url or os.environ.get("PROGRESSISTA_SERVER_URL") or DEFAULT_SERVER_URL
        print("Pushing demo bars to %s%s. The stalled one moves to Needs Attention when "
              "the server runs with --stale-seconds (e.g. 10)." % (
                  url, " for %g s" % args.duration if args.duration else " until Ctrl-C"),
              flush=True)
        return demo(args.server_url, args.duration)

    if args.command == "watch":
        try:
            return watch(args.words, args.server_url, args.token, once=args.once,
                         json_lines=args.json)
        except BrokenPipeError:  # watch ... | head: the reader is gone, and that is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    if args.command == "wait":
        timeout = None if args.timeout is None else _number(parser, "--timeout", args.timeout)
        return wait(args.names, args.server_url, args.token, timeout=timeout)

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
    if args.group_size is not None:
        options["group_size"] = _number(parser, "--group-size", args.group_size, int, 1)
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
