"""The transport under the official client: what the client sends through it, how connections are pooled and
dropped, that nothing is ever sent twice, TLS, and failures as requests reports them."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connectors.broker import KiteClient
from connectors.egress import Egress
from connectors.http_session import PooledSession
from connectors.kite_sim import RunningSimulator
from tests.connectors.kite_sim.test_rest import place
from tests.fixtures.proxies import StartProxies
from tests.fixtures.simulator import SimAccount

BODY = b'{"status":"success","a":1}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


class RawServer:
    """A loopback HTTP server that does, connection by connection, what a test tells it: answer each request and
    keep the connection ("answer"), answer then close it ("answer-close"), read the request and close without an
    answer ("drop"), or read it and never answer ("hang"). It counts the requests it read."""

    def __init__(self, behaviours: list[str], wrap: ssl.SSLContext | None = None) -> None:
        self.behaviours = behaviours
        self.requests: list[bytes] = []
        self.wrap = wrap
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self.closed = threading.Event()  # set each time it closes a connection itself
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.wrap is not None:
                try:
                    conn = self.wrap.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    conn.close()
                    continue
            self._open.append(conn)
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        buffer = b""
        while self.behaviours:
            while b"\r\n\r\n" not in buffer:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    conn.close()
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
            while len(buffer) < length:
                buffer += conn.recv(65536)
            body, buffer = buffer[:length], buffer[length:]
            self.requests.append(head + b"\r\n\r\n" + body)
            behaviour = self.behaviours.pop(0)
            if behaviour == "hang":
                return
            if behaviour in ("answer", "answer-close"):
                conn.sendall(OK)
            if behaviour != "answer":
                conn.close()
                self.closed.set()
                return

    @property
    def url(self) -> str:
        return f"{'https' if self.wrap else 'http'}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()
        for conn in self._open:
            conn.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(behaviours: list[str], wrap: ssl.SSLContext | None = None) -> RawServer:
        servers.append(RawServer(behaviours, wrap))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server context with a self-signed certificate for localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    folder: Path = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


def test_the_official_client_places_and_reads_through_one_kept_connection(
    simulator: RunningSimulator, kite_account: Callable[..., SimAccount]
) -> None:
    account = kite_account()
    session = PooledSession()
    answers: list[int] = []
    session.hooks["response"].append(lambda response, *args, **kwargs: answers.append(response.status_code))
    kite = KiteClient(account.api_key, access_token=account.access_token, root=simulator.rest_root)
    kite.reqsession = session
    order_id = place(kite, tag="viasession")
    (record,) = simulator.state.audit.records(api_key=account.api_key)
    assert (record.order_id, record.tag, record.params["quantity"], record.params["order_type"]) == (
        order_id, "viasession", "10", "MARKET"
    )  # fmt: skip
    quotes = kite.ltp(["NSE:INFY", "NSE:TCS"])  # a list query parameter: the key repeated, as requests sends it
    assert set(quotes) == {"NSE:INFY", "NSE:TCS"}
    assert kite.order_history(order_id)[-1]["status"] == "COMPLETE"
    assert answers == [200, 200, 200]
    assert session.connections_opened == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed(
    raw_server: Callable[..., RawServer],
) -> None:
    server = raw_server(["answer-close", "answer"])
    session = PooledSession()
    assert session.request("GET", f"{server.url}/a", timeout=2).json() == {"status": "success", "a": 1}
    assert server.closed.wait(2)
    assert session.request("GET", f"{server.url}/b", timeout=2).status_code == 200
    assert session.connections_opened == 2
    assert len(server.requests) == 2


def test_a_request_whose_connection_dies_unanswered_fails_and_is_never_sent_again(
    raw_server: Callable[..., RawServer],
) -> None:
    """An order that may have reached the broker must be asked about by its tag, never re-sent by the transport."""
    server = raw_server(["answer", "drop", "answer"])
    session = PooledSession()
    session.request("POST", f"{server.url}/orders/regular", data={"tag": "first"}, timeout=2)
    with pytest.raises(requests.ConnectionError):
        session.request("POST", f"{server.url}/orders/regular", data={"tag": "second"}, timeout=2)
    assert [r.endswith(b"tag=second") for r in server.requests] == [False, True]


def test_no_answer_in_time_is_a_read_timeout_sent_once(raw_server: Callable[..., RawServer]) -> None:
    server = raw_server(["hang"])
    with pytest.raises(requests.ReadTimeout):
        PooledSession().request("POST", f"{server.url}/orders/regular", data={"tag": "x"}, timeout=0.3)
    assert len(server.requests) == 1


def test_nothing_listening_is_a_connection_error() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(requests.ConnectionError) as raised:
        PooledSession().request("GET", f"http://127.0.0.1:{port}/", timeout=1)
    assert not isinstance(raised.value, requests.Timeout)


def test_form_fields_are_encoded_as_requests_encodes_them(raw_server: Callable[..., RawServer]) -> None:
    server = raw_server(["answer"])
    PooledSession().request("POST", f"{server.url}/x?v=1", data={"a": "b c", "skip": None, "i": ["1", "2"]},
                            params={"q": ["y", "z"]}, timeout=2)  # fmt: skip
    (request,) = server.requests
    assert request.startswith(b"POST /x?v=1&q=y&q=z HTTP/1.1")
    assert b"Content-Type: application/x-www-form-urlencoded" in request
    assert request.endswith(b"\r\n\r\na=b+c&i=1&i=2")


def test_a_proxy_other_than_the_sessions_own_is_refused() -> None:
    with pytest.raises(ValueError, match="proxy"):
        PooledSession().request("GET", "http://127.0.0.1:9/", proxies={"http": "http://127.0.0.2:3128"})


def test_tls_is_verified_unless_turned_off(raw_server: Callable[..., RawServer], tls_context: ssl.SSLContext) -> None:
    server = raw_server(["answer"], wrap=tls_context)
    session = PooledSession()
    with pytest.raises(requests.ConnectionError):  # self-signed: not in certifi's bundle
        session.request("GET", f"{server.url}/", timeout=2)
    assert session.request("GET", f"{server.url}/", timeout=2, verify=False).status_code == 200
    assert len(server.requests) == 1


def test_https_through_an_http_proxy_is_tunnelled(
    raw_server: Callable[..., RawServer], tls_context: ssl.SSLContext, egress_proxies: StartProxies
) -> None:
    (proxy,) = egress_proxies(1)
    server = raw_server(["answer", "answer"], wrap=tls_context)
    session = PooledSession(Egress.parse(proxy.url))
    for _ in range(2):
        assert session.request("GET", f"{server.url}/t", timeout=2, verify=False).status_code == 200
    assert [r.split(b"\r\n")[0] for r in server.requests] == [b"GET /t HTTP/1.1"] * 2  # the path, in the tunnel
    assert session.connections_opened == 1
