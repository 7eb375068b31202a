"""Downloader: the bytes behind one URL or local path, within hard limits of time and size.

requests' timeouts bound each socket operation, not a whole download: a server that sends one
byte every few seconds, or trickles its headers, resets the read timeout forever. So every
fetch also has a total deadline (``imgpipe.deadline``, shared with the prediction service):
urllib3's connections attach their sockets to it, and its watchdog shuts them down when the
deadline passes; the blocked read then returns at once.
"""

from __future__ import annotations

import http.client
import itertools
import os
import random
import socket
import ssl
import stat
import time
import urllib.request
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter

from imgpipe.deadline import current, deadline
from imgpipe.ingest.drops import Drop

CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchLimits:
    connect_timeout: float
    read_timeout: float
    deadline: float
    retries: int
    backoff: float
    retry_after_cap: float
    max_redirects: int
    max_bytes: int


def read_local(path: Path, max_bytes: int) -> bytes:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise Drop("not_found", f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise Drop("too_large", f"{info.st_size} bytes > download.max_bytes {max_bytes}")
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise Drop("not_found", f"no such file {path}") from None
    except OSError as exc:
        raise Drop("not_found", f"{path} cannot be read: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise Drop("too_large", f"more than download.max_bytes {max_bytes} bytes")
    return data


# --- deadline enforcement: urllib3 connections hand their sockets to the running deadline ------


class _GuardedConnection:
    """Mixed into urllib3's connections: hand the socket to the running fetch's guard."""

    def getresponse(self):  # type: ignore[no-untyped-def]
        guard = current()
        if guard is not None and self.sock is not None:  # type: ignore[attr-defined]
            guard.attach(self.sock)  # type: ignore[attr-defined]
        return super().getresponse()  # type: ignore[misc]


class _HTTPConnection(_GuardedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_GuardedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    _pools = {"http": _HTTPPool, "https": _HTTPSPool}

    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        manager = super().proxy_manager_for(*args, **kwargs)
        manager.pool_classes_by_scheme = self._pools
        return manager


# --- HTTP ---------------------------------------------------------------------------------


class _Retry(Exception):
    def __init__(self, reason: str, detail: str, wait: float | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.wait = reason, detail, wait


def describe_network_error(exc: BaseException) -> str:
    """A short, stable description (no object addresses, no timings) of a network failure."""
    stack, seen = [exc], set()
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, http.client.IncompleteRead):
            read = err.partial if isinstance(err.partial, int) else len(err.partial)
            return f"incomplete body: {read} bytes read, {err.expected} more announced"
        if isinstance(err, ConnectionResetError):
            return "connection reset by peer"
        if isinstance(err, ConnectionRefusedError):
            return "connection refused"
        if isinstance(err, socket.gaierror):
            return "host name could not be resolved"
        if isinstance(err, ssl.SSLError):
            return f"TLS error ({err.reason or 'handshake failed'})"
        if isinstance(err, (urllib3.exceptions.ConnectTimeoutError, TimeoutError)):
            return "connect timed out"
        nested = [err.__cause__, err.__context__, getattr(err, "reason", None), *err.args]
        stack += [e for e in nested if isinstance(e, BaseException)]
    return f"connection failed ({type(exc).__name__})"


def retry_after(response: requests.Response, cap: float) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), cap)


def proxies_or_netrc() -> bool:
    """True when a proxy or a netrc file would change what requests does with a URL."""
    netrc = [os.environ.get("NETRC", ""), "~/.netrc", "~/_netrc"]
    return bool(urllib.request.getproxies()) or any(Path(path).expanduser().exists() for path in netrc if path)


class Fetcher:
    """Fetch URLs concurrently from many threads over one pooled ``requests.Session``."""

    def __init__(self, limits: FetchLimits, workers: int, user_agent: str) -> None:
        self.limits = limits
        self.session = requests.Session()
        # requests reads proxies, CA bundles and ~/.netrc from the environment on every request,
        # which costs more CPU than the rest of a small download: read the CA bundle once here,
        # and leave the rest to requests only when a proxy or a netrc file is configured.
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            self.session.verify = bundle
        self.session.trust_env = proxies_or_netrc()
        self.session.max_redirects = limits.max_redirects
        self.session.headers.update({"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.5"})
        adapter = _GuardedAdapter(pool_connections=max(workers, 10), pool_maxsize=workers)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def fetch(self, url: str) -> bytes:
        limits = self.limits
        deadline_at = time.monotonic() + limits.deadline
        for attempt in itertools.count(1):
            try:
                return self._attempt(url, deadline_at)
            except _Retry as retry:
                if attempt > limits.retries:
                    tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                    raise Drop(retry.reason, retry.detail + tries) from None
                wait = retry.wait
                if wait is None:  # exponential backoff with jitter, so retries do not arrive in lockstep
                    wait = limits.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
                if time.monotonic() + wait >= deadline_at:
                    raise Drop("timeout", f"{retry.detail}; no time left for a retry within "
                               f"the {limits.deadline:g} s deadline") from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _attempt(self, url: str, deadline_at: float) -> bytes:
        limits = self.limits
        # Every attempt is watched against the one deadline of the whole fetch, retries included.
        with deadline(limits.deadline, started=deadline_at - limits.deadline) as guard:
            try:
                with self.session.get(url, stream=True, timeout=(limits.connect_timeout, limits.read_timeout)) as resp:
                    status = resp.status_code
                    if status == 429 or status >= 500:
                        raise _Retry("http_error", f"HTTP {status}", retry_after(resp, limits.retry_after_cap))
                    if status in (404, 410):
                        raise Drop("not_found", f"HTTP {status}")
                    if not 200 <= status < 300:
                        raise Drop("http_error", f"HTTP {status}")
                    body = self._read_body(resp)
            except requests.TooManyRedirects:
                raise Drop("too_many_redirects", f"more than {limits.max_redirects} redirects") from None
            except requests.exceptions.InvalidSchema:
                raise Drop("unsupported_scheme", "redirected to a URL that is not http(s)") from None
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, UnicodeError,
                    urllib3.exceptions.LocationParseError):
                raise Drop("invalid_url", "the URL (or a redirect target) cannot be parsed") from None
            except requests.exceptions.ContentDecodingError:
                raise Drop("http_error", "Content-Encoding could not be decoded") from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as exc:
                if guard.expired:
                    raise Drop("timeout", f"not finished within the {limits.deadline:g} s deadline") from None
                if isinstance(exc, requests.ReadTimeout) or (
                    isinstance(exc, requests.ConnectionError) and "Read timed out" in str(exc)
                ):
                    raise Drop("timeout", f"no data for {limits.read_timeout:g} s (download.read_timeout)") from None
                raise _Retry("connection_error", describe_network_error(exc)) from None
            except requests.RequestException as exc:  # anything else requests can say about one URL
                raise Drop("connection_error", f"request failed ({type(exc).__name__})") from None
        if guard.expired:
            raise Drop("timeout", f"not finished within the {limits.deadline:g} s deadline")
        return body

    def _read_body(self, resp: requests.Response) -> bytes:
        cap = self.limits.max_bytes
        declared = resp.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > cap:
            raise Drop("too_large", f"Content-Length {declared} > download.max_bytes {cap}")
        body = bytearray()
        for chunk in resp.iter_content(CHUNK):
            body += chunk
            if len(body) > cap:
                raise Drop("too_large", f"body passed download.max_bytes {cap}")
        return bytes(body)
