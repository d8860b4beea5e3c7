"""The KiteTicker side: websocket connections, their subscriptions, and the engine loop that moves prices.

One engine task per app steps the price book every `config.tick_interval` seconds (0 = as fast as the
loop allows), matches open orders against what moved, and wakes every connection. Each connection's
writer then sends, for each subscribed token whose price version changed since it last sent it, the
cached packet for its mode: packets are encoded once per price change however many clients listen,
a slow client gets the latest price rather than a backlog (conflation), and many packets share a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from connectors.kite_sim import ticker_codec as codec
from connectors.kite_sim.state import SimulatorState

log = logging.getLogger(__name__)

CLOSE_DROPPED = 1011  # "internal error": what a dropped upstream looks like to the client


class FeedConnection:
    def __init__(self, websocket: WebSocket, api_key: str, state: SimulatorState) -> None:
        self.websocket = websocket
        self.api_key = api_key
        self.state = state
        self.modes: dict[int, str] = {}
        self._sent_versions: dict[int, int] = {}
        self._texts: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.closed = False
        self.close_code = 1000
        self.close_reason = ""
        self._last_send = time.monotonic()

    def push_text(self, payload: bytes) -> None:
        self._texts.append(payload)
        self.wake.set()

    def drop(self, reason: str = "dropped by simulator fault") -> None:
        self.closed = True
        self.close_code = CLOSE_DROPPED
        self.close_reason = reason
        self.wake.set()

    # --- client -> server --------------------------------------------------------------------------

    async def read_loop(self) -> None:
        while not self.closed:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                self.closed = True
                break
            raw = message.get("text") or message.get("bytes")
            if raw:
                self.handle_message(raw)
        self.wake.set()

    def handle_message(self, raw: str | bytes) -> None:
        try:
            message = orjson.loads(raw)
            action = message["a"]
            value = message["v"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._error('Invalid message: expected {"a": action, "v": value}.')
            return
        if action == "subscribe":
            self._subscribe(value)
        elif action == "unsubscribe":
            for token in self._tokens(value):
                self.modes.pop(token, None)
                self._sent_versions.pop(token, None)
        elif action == "mode":
            if not (isinstance(value, list) and len(value) == 2 and value[0] in codec.MODES):
                self._error("Invalid mode message.")
                return
            mode = value[0]
            for token in self._tokens(value[1]):
                if token in self.modes:
                    self.modes[token] = mode
                    self._sent_versions.pop(token, None)  # send the richer packet at once
        else:
            self._error(f"Unknown action {action!r}.")
            return
        self.wake.set()

    def _tokens(self, value: Any) -> list[int]:
        if not isinstance(value, list):
            return []
        quotes = self.state.book.quotes
        # Kite silently ignores tokens it does not know.
        return [t for t in value if isinstance(t, int) and t in quotes]

    def _subscribe(self, value: Any) -> None:
        limit = self.state.config.max_subscriptions
        refused = 0
        for token in self._tokens(value):
            if token not in self.modes and len(self.modes) >= limit:
                refused += 1
                continue
            self.modes[token] = codec.MODE_QUOTE  # subscribe defaults to quote mode
            self._sent_versions.pop(token, None)
        if refused:
            self._error(f"Maximum of {limit} instruments per connection exceeded; {refused} not subscribed.")

    def _error(self, text: str) -> None:
        self.push_text(orjson.dumps({"type": "error", "data": text}))

    # --- server -> client --------------------------------------------------------------------------

    def _changed_packets(self) -> list[bytes]:
        quotes = self.state.book.quotes
        sent = self._sent_versions
        packets: list[bytes] = []
        for token, mode in self.modes.items():
            quote = quotes.get(token)
            if quote is None:
                continue
            version = quote.version
            if sent.get(token) != version:
                sent[token] = version
                packets.append(quote.packet(mode))
        return packets

    async def write_loop(self) -> None:
        websocket = self.websocket
        config = self.state.config
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.heartbeat_interval):
                    await self.wake.wait()
            self.wake.clear()
            if self.closed:
                break
            sent = False
            while self._texts:
                await websocket.send_text(self._texts.popleft().decode())
                sent = True
            if self.modes and not self.state.feed_paused:
                packets = self._changed_packets()
                if packets:
                    for frame in codec.frames(packets, config.max_packets_per_frame):
                        await websocket.send_bytes(frame)
                    sent = True
            now = time.monotonic()
            if sent:
                self._last_send = now
            elif now - self._last_send >= config.heartbeat_interval:
                await websocket.send_bytes(codec.HEARTBEAT)  # Kite's 1-byte idle heartbeat
                self._last_send = now


class FeedHub:
    """All live ticker connections and the engine loop. Lives on the server's event loop."""

    def __init__(self, state: SimulatorState) -> None:
        self.state = state
        self.connections: set[FeedConnection] = set()
        self._by_key: dict[str, set[FeedConnection]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        state.order_update_sink = self.publish_order
        state.drop_connections_hook = self.drop

    def bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def count(self, api_key: str) -> int:
        return len(self._by_key.get(api_key, ()))

    def add(self, connection: FeedConnection) -> None:
        self.connections.add(connection)
        self._by_key.setdefault(connection.api_key, set()).add(connection)

    def remove(self, connection: FeedConnection) -> None:
        self.connections.discard(connection)
        peers = self._by_key.get(connection.api_key)
        if peers is not None:
            peers.discard(connection)
            if not peers:
                del self._by_key[connection.api_key]

    def _call_in_loop(self, fn: Any, *args: Any) -> None:
        if self._loop is None or threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def publish_order(self, api_key: str, payload: bytes) -> None:
        if api_key in self._by_key:
            self._call_in_loop(self._deliver, api_key, payload)

    def _deliver(self, api_key: str, payload: bytes) -> None:
        for connection in list(self._by_key.get(api_key, ())):
            connection.push_text(payload)

    def drop(self, api_key: str | None = None) -> int:
        victims = [c for c in list(self.connections) if api_key is None or c.api_key == api_key]
        for connection in victims:
            self._call_in_loop(connection.drop)
        return len(victims)

    def wake_all(self) -> None:
        for connection in self.connections:
            connection.wake.set()

    async def run_engine(self) -> None:
        state = self.state
        while True:
            started = time.monotonic()
            try:
                state.step()
            except Exception:  # keep the market moving whatever one step tripped on
                log.exception("simulator engine step failed")
            self.wake_all()
            interval = state.config.tick_interval
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)) if interval > 0 else 0)

    async def serve_connection(self, websocket: WebSocket) -> None:
        api_key = websocket.query_params.get("api_key", "")
        access_token = websocket.query_params.get("access_token", "")
        account = self.state.authenticate_ws(api_key, access_token)
        if account is None or self.count(api_key) >= self.state.config.max_connections_per_key:
            # Closing before accept makes the server answer the handshake with HTTP 403, as Kite does.
            await websocket.close(code=1008, reason="Invalid api_key or access_token")
            return
        await websocket.accept()
        connection = FeedConnection(websocket, api_key, self.state)
        self.add(connection)
        reader = asyncio.create_task(connection.read_loop())
        writer = asyncio.create_task(connection.write_loop())
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            connection.closed = True
            self.remove(connection)
            for task in (reader, writer):
                task.cancel()
            for task in (reader, writer):
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, Exception):
                    await task
            with contextlib.suppress(Exception):
                await websocket.close(code=connection.close_code, reason=connection.close_reason)
