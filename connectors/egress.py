"""A trader's egress: the proxy their order calls leave through, from the static IP registered with Kite.

Since 1 April 2026 Kite refuses order calls (place, modify, cancel) from any address but the one on the
trader's developer account, and an address may be shared only within a family: a server serving unrelated
traders must send each one's orders through that trader's own address. An egress is the URL of an HTTP
CONNECT (`http://`) or SOCKS5 (`socks5://`, `socks5h://`) proxy that leaves from it, optionally with
credentials in the URL. Reads and market data need no egress (Kite answers them from anywhere).

Connections are pooled per egress: one session (`PooledSession`) per egress URL per process, shared by every client
built for that trader (a new access token makes a new client, not new connections), so an order burst reuses
the proxy's open connections instead of opening one per order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from connectors.http_session import PooledSession

SCHEMES = ("http", "socks5", "socks5h")
# A trader sends at most 10 orders a second (Kite's limit): this many connections through one egress is
# plenty, and bounds what a burst opens on the proxy.
CONNECTIONS_PER_EGRESS = 16


class EgressUrlError(ValueError):
    """The egress URL is unusable; `str()` says why (and never repeats the credentials)."""


@dataclass(frozen=True, slots=True, repr=False)
class Egress:
    """A parsed egress URL. `url` may hold credentials: repr disabled, use `display` anywhere shown."""

    url: str
    scheme: str
    host: str
    port: int
    has_credentials: bool

    @classmethod
    def parse(cls, raw: str) -> Egress:
        text = raw.strip()
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise EgressUrlError("not a URL with a valid port (expected scheme://[user:password@]host:port)") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise EgressUrlError(f"scheme must be one of {', '.join(SCHEMES)} (HTTP CONNECT or SOCKS5 proxy)")
        if not parts.hostname:
            raise EgressUrlError("the proxy's host is missing")
        if port is None:
            raise EgressUrlError("the proxy's port is missing")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise EgressUrlError("a proxy URL has no path, query or fragment")
        credentials = ""
        if parts.username is not None:
            # Re-quoted, so a password with reserved characters reaches the proxy intact.
            user = quote(unquote(parts.username), safe="")
            password = quote(unquote(parts.password or ""), safe="")
            credentials = f"{user}:{password}@"
        host = parts.hostname
        netloc_host = f"[{host}]" if ":" in host else host
        return cls(
            url=f"{scheme}://{credentials}{netloc_host}:{port}",
            scheme=scheme,
            host=host,
            port=port,
            has_credentials=bool(credentials),
        )

    @property
    def display(self) -> str:
        """The egress without its credentials: what status responses and logs may show."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(user, password) as the proxy reads them, or None."""
        if not self.has_credentials:
            return None
        parts = urlsplit(self.url)
        return unquote(parts.username or ""), unquote(parts.password or "")

    @property
    def proxies(self) -> dict[str, str]:
        return {"http": self.url, "https": self.url}

    def __repr__(self) -> str:
        return f"Egress({self.display})"


class _EgressSessions:
    """One pooled session per egress URL in this process."""

    def __init__(self) -> None:
        self._sessions: dict[str, PooledSession] = {}
        self._lock = threading.Lock()

    def session(self, egress: Egress) -> PooledSession:
        with self._lock:
            found = self._sessions.get(egress.url)
            if found is None:
                found = self._sessions[egress.url] = PooledSession(egress, pool_size=CONNECTIONS_PER_EGRESS)
            return found

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()

    def __len__(self) -> int:
        return len(self._sessions)


EGRESS_SESSIONS = _EgressSessions()
