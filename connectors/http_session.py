"""The HTTP transport under the official client: a pooled session over the standard library's `http.client`.

kiteconnect makes every call through `reqsession.request(...)`, a `requests` session by default. Measured alone
against the simulator, a `place_order` costs about 1.5 ms of the interpreter's time through requests and urllib3,
and about 0.7 ms through this session (the client's own share is 0.2 ms). A worker's broker threads share one
interpreter with its event loop, so in a burst of exits that difference is paid once per order by every order
behind it (BENCHMARKS.md, the exits burst). Every request is still the client's: only the transport changes.

It does what the client asks of a session and no more:
- pooled keep-alive connections per target; one found closed by the other side while idle is dropped before use;
- a direct connection, or one through the session's proxy: HTTP (absolute-form requests for `http://` targets, a
  CONNECT tunnel for `https://`) or SOCKS5 (`socks5h://`: the proxy resolves the name), credentials from its URL;
- TLS verified against certifi's bundle, as requests does (`verify=False` turns it off);
- failures raised as requests' exception types, so `map_kite_exception` reads them as before.

On purpose, it never retries (an order call that may have reached the broker is asked about by tag, never sent
again blindly: some HTTP clients silently re-send a request whose reused connection died), follows no redirects
(Kite's API answers none), reads no proxy settings from the environment and asks for no compression.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import select
import socket
import ssl
import threading
from base64 import b64encode
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import requests
import socks
from requests.structures import CaseInsensitiveDict

if TYPE_CHECKING:
    from connectors.egress import Egress  # which imports this module

_VERIFIED = ssl.create_default_context(cafile=requests.certs.where())  # certifi's bundle, as requests uses
_UNVERIFIED = ssl._create_unverified_context()  # noqa: S323 - only when the caller passes verify=False
_SOCKS_SCHEMES = ("socks5", "socks5h")


class Response:
    """What the official client and a response hook read of an answer (a subset of `requests.Response`)."""

    __slots__ = ("content", "headers", "reason", "status_code", "url")

    def __init__(self, url: str, status_code: int, reason: str, headers: CaseInsensitiveDict[str]) -> None:
        self.url = url
        self.status_code = status_code
        self.reason = reason
        self.headers = headers
        self.content = b""

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


def _proxy_auth(egress: Egress) -> dict[str, str]:
    """The Proxy-Authorization header for an HTTP proxy with credentials in its URL."""
    if egress.credentials is None:
        return {}
    token = b64encode(":".join(egress.credentials).encode()).decode("ascii")
    return {"Proxy-Authorization": f"Basic {token}"}


class _SocksConnection(http.client.HTTPConnection):
    """HTTP, or HTTPS with `tls`, to `host:port` through a SOCKS5 proxy."""

    def __init__(self, host: str, port: int, proxy: Egress, tls: ssl.SSLContext | None, timeout: float | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self.proxy = proxy
        self.tls = tls
        if tls is not None:
            self.default_port = 443  # a Host header without the port, as for any HTTPS request

    def connect(self) -> None:
        user, password = self.proxy.credentials or (None, None)
        sock = socks.create_connection(
            (self.host, self.port), timeout=self.timeout, proxy_type=socks.SOCKS5, proxy_addr=self.proxy.host,
            proxy_port=self.proxy.port, proxy_rdns=self.proxy.scheme == "socks5h", proxy_username=user,
            proxy_password=password,
        )  # fmt: skip
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls is not None else sock


def _encoded(data: Any) -> str:
    """Form or query parameters as requests encodes them: None values left out, a list as repeated keys."""
    if isinstance(data, str | bytes):
        return data.decode() if isinstance(data, bytes) else data
    items: Iterable[tuple[Any, Any]] = data.items() if isinstance(data, Mapping) else data
    pairs = []
    for key, values in items:
        for value in values if isinstance(values, list | tuple) else [values]:
            if value is not None:
                pairs.append((key, value))
    return urlencode(pairs)


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """An idle connection the other side closed (or wrote to, unasked): readable before a request is sent."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class PooledSession:
    """A `requests`-compatible session for the official client (`KiteConnect.reqsession`), pooled per target.

    Thread-safe: the broker threads share one. `pool_size` idle connections are kept per target; a burst may open
    more, closed after use. `proxy`: the trader's egress every request goes through (the `proxies` a caller passes
    must agree)."""

    trust_env = False  # proxies and credentials come from the caller, never from the environment

    def __init__(self, proxy: Egress | None = None, pool_size: int = 16) -> None:
        self.proxy = proxy
        self.pool_size = pool_size
        self.hooks: dict[str, list[Callable[..., Any]]] = {"response": []}
        self.connections_opened = 0
        self._idle: dict[tuple[str, str, int], deque[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def request(
        self, method: str, url: str, *, params: Any = None, data: Any = None, json: Any = None,
        headers: Mapping[str, str] | None = None, timeout: float | None = None, verify: bool = True,
        allow_redirects: bool = True, proxies: Mapping[str, str] | None = None,
    ) -> Response:  # fmt: skip
        del allow_redirects  # Kite's API answers no redirect; one would come back as it is
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise requests.exceptions.InvalidURL(f"not an http(s) URL: {url}")
        self._check_proxy(parts.scheme, proxies)
        query = "&".join(q for q in (parts.query, _encoded(params) if params else "") if q)
        target = (parts.path or "/") + (f"?{query}" if query else "")
        url = f"{parts.scheme}://{parts.netloc}{target}"
        sent = dict(headers or {})
        body: bytes | None = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            sent.setdefault("Content-Type", "application/json")
        elif data is not None:
            body = _encoded(data).encode()
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif method in ("POST", "PUT", "PATCH"):
            body = b""
        secure = parts.scheme == "https"
        key = (parts.scheme, parts.hostname, parts.port or (443 if secure else 80))
        connection = self._connection(key, timeout, verify)
        if self.proxy is not None and self.proxy.scheme == "http" and not secure:
            # To an HTTP proxy, a plain-HTTP request names its whole URL (absolute-form); a tunnel carries the path.
            target = url
            sent.update(_proxy_auth(self.proxy))
        try:
            connection.request(method, target, body=body, headers=sent)
            answer = connection.getresponse()
            response = Response(url, answer.status, answer.reason, CaseInsensitiveDict(answer.getheaders()))
            for hook in self.hooks.get("response", []):
                hook(response)
            response.content = answer.read()
        except TimeoutError as exc:
            connection.close()
            raise requests.exceptions.ReadTimeout(f"no answer from {parts.hostname} in {timeout}s") from exc
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise requests.exceptions.ConnectionError(f"connection to {parts.hostname} failed: {exc!r}") from exc
        if answer.will_close:
            connection.close()
        else:
            self._put_back(key, connection)
        return response

    def close(self) -> None:
        with self._lock:
            pools, self._idle = list(self._idle.values()), {}
        for pool in pools:
            for connection in pool:
                connection.close()

    def _check_proxy(self, scheme: str, proxies: Mapping[str, str] | None) -> None:
        wanted = (proxies or {}).get(scheme)
        mine = self.proxy.url if self.proxy else None
        if wanted is not None and wanted != mine:
            # A client built for one egress must never leave through another one's session, nor directly.
            raise ValueError("the request names a proxy this session does not go through")

    def _connection(self, key: tuple[str, str, int], timeout: float | None, verify: bool) -> http.client.HTTPConnection:
        pool = self._idle.get(key)
        while pool:
            try:
                connection = pool.pop()
            except IndexError:
                break
            if _dropped(connection):
                connection.close()
                continue
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            connection.timeout = timeout
            return connection
        connection = self._new_connection(key, timeout, verify)
        try:
            connection.connect()
        except (socks.ProxyError, OSError) as exc:
            connection.close()
            raise self._connect_failure(key[1], timeout, exc) from exc
        self.connections_opened += 1
        return connection

    def _new_connection(
        self, key: tuple[str, str, int], timeout: float | None, verify: bool
    ) -> http.client.HTTPConnection:
        scheme, host, port = key
        context = _VERIFIED if verify else _UNVERIFIED
        proxy = self.proxy
        connection: http.client.HTTPConnection
        if proxy is not None and proxy.scheme in _SOCKS_SCHEMES:
            return _SocksConnection(host, port, proxy, context if scheme == "https" else None, timeout)
        if proxy is not None and scheme == "https":
            connection = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=timeout, context=context)
            connection.set_tunnel(host, port, headers=_proxy_auth(proxy))
            return connection
        if proxy is not None:
            return http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _connect_failure(self, host: str, timeout: float | None, exc: BaseException) -> requests.RequestException:
        """As requests reports it: an HTTP proxy that cannot be reached or refuses the tunnel is a ProxyError; a
        SOCKS proxy's failure, like a direct one, a connection error."""
        if self.proxy is not None and self.proxy.scheme == "http":
            return requests.exceptions.ProxyError(f"the proxy could not connect to {host}: {exc!r}")
        if isinstance(exc, TimeoutError):
            return requests.exceptions.ConnectTimeout(f"no connection to {host} in {timeout}s")
        return requests.exceptions.ConnectionError(f"no connection to {host}: {exc!r}")

    def _put_back(self, key: tuple[str, str, int], connection: http.client.HTTPConnection) -> None:
        pool = self._idle.get(key)
        if pool is None:
            with self._lock:
                pool = self._idle.setdefault(key, deque())
        if len(pool) < self.pool_size:
            pool.append(connection)
        else:
            connection.close()
