"""The tick connector (`algo ticker`): KiteTicker -> the `ticks` topic, keyed by instrument.

It subscribes to the instruments that running strategies need and follows the lifecycle topic: a START
subscribes its instrument, and an exit/stop/failure unsubscribes it once no running strategy on that
instrument remains (the `symbol:{instrument}:strategies` set in Redis is the count). The official client
runs on Twisted in its own thread (`connect(threaded=True)`); ticks cross into asyncio through
`call_soon_threadsafe`. A dropped socket is reconnected by the client (and resubscribed by it); a silent
one (no tick and no heartbeat for `ticker_silence_seconds`) is closed here so the client reconnects, and
each gap is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kiteconnect import KiteTicker
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select

from core import metrics
from core.clock import Clock, get_clock
from core.crypto import SecretBox
from core.kafka import ensure_topics
from core.settings import Settings
from schemas.events import LifecycleKind, StrategyLifecycle
from storage.db import create_engine, session_factory
from storage.models import BrokerAccount
from storage.runtime import connect_redis, strategy_key, symbol_key

log = logging.getLogger(__name__)


class TickConnector:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or get_clock()
        self.instruments: dict[int, str] = {}  # token -> EXCHANGE:SYMBOL, what we are subscribed to
        self.last_message = time.monotonic()
        self.queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
        self.connected = asyncio.Event()

    async def credentials(self) -> tuple[str, str]:
        if self.settings.ticker_api_key and self.settings.ticker_access_token:
            return self.settings.ticker_api_key, self.settings.ticker_access_token.get_secret_value()
        engine = create_engine(self.settings.database_url)
        try:
            async with session_factory(engine)() as session:
                account = (
                    await session.execute(select(BrokerAccount).order_by(BrokerAccount.updated_at.desc()).limit(1))
                ).scalar_one_or_none()
        finally:
            await engine.dispose()
        if account is None:
            raise RuntimeError("TICKER_API_KEY/TICKER_ACCESS_TOKEN unset and no trader has connected a broker yet")
        box = SecretBox(self.settings)
        return box.decrypt(account.api_key_encrypted), box.decrypt(account.access_token_encrypted)

    async def needed_now(self, redis: Redis) -> dict[int, str]:
        """Instruments of every running strategy, from the runtime layer (recovery rebuilds it first).

        O(instruments) in three pipelined passes, not O(strategies): the symbol sets, one member of each,
        and that member's instrument token.
        """
        symbols = [key async for key in redis.scan_iter(match=symbol_key("*"), count=1000)]
        if not symbols:
            return {}
        async with redis.pipeline(transaction=False) as pipe:
            for key in symbols:
                pipe.srandmember(key)
            members = await pipe.execute()
        running = [(key, member) for key, member in zip(symbols, members, strict=True) if member]
        async with redis.pipeline(transaction=False) as pipe:
            for _, member in running:
                pipe.hmget(strategy_key(int(member)), ["instrument", "instrument_token"])
            found = await pipe.execute()
        return {int(token): instrument for instrument, token in found if instrument and token}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        metrics.serve(self.settings.ticker_metrics_port, self.settings.metrics_host, "ticker")
        await ensure_topics(self.settings)
        api_key, access_token = await self.credentials()
        redis = connect_redis(self.settings.redis_url)
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, linger_ms=1, acks=1)
        lifecycle = AIOKafkaConsumer(
            self.settings.topic("strategy-lifecycle"),
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.topic("algo-ticker"),
            # A new group (first start, or a broker that restarted empty) reads the day's events from the
            # start: recovery may republish them before this consumer has joined.
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.kafka_lifecycle_fetch_max_wait_ms,
            session_timeout_ms=int(self.settings.kafka_session_timeout_seconds * 1000),
            heartbeat_interval_ms=int(self.settings.kafka_session_timeout_seconds * 1000 / 6),
        )
        await producer.start()
        await lifecycle.start()
        self.instruments = await self.needed_now(redis)
        recently_added: dict[int, float] = {}  # token -> when the lifecycle subscribed it (monotonic)

        ticker = KiteTicker(api_key, access_token, root=self.settings.kite_ticker_root, reconnect_max_delay=5)

        def on_connect(ws: Any, response: Any) -> None:
            log.info("ticker connected; subscribing %d instruments", len(self.instruments))
            if self.instruments:
                tokens = list(self.instruments)
                ws.subscribe(tokens)
                ws.set_mode(ws.MODE_QUOTE, tokens)
            loop.call_soon_threadsafe(self.connected.set)
            metrics.TICKER_CONNECTED.set(1)
            metrics.TICKER_CONNECTIONS.inc()

        def on_message(ws: Any, payload: bytes, is_binary: bool) -> None:
            now = time.monotonic()
            if now - self.last_message > self.settings.ticker_silence_seconds:
                log.warning("ticker data resumed after a %.1fs gap", now - self.last_message)
            self.last_message = now

        def on_ticks(ws: Any, ticks: list[dict[str, Any]]) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, ticks)

        def on_close(ws: Any, code: Any, reason: Any) -> None:
            log.warning("ticker socket closed (%s %s); the client reconnects", code, reason)
            loop.call_soon_threadsafe(self.connected.clear)
            metrics.TICKER_CONNECTED.set(0)

        ticker.on_connect = on_connect
        ticker.on_message = on_message
        ticker.on_ticks = on_ticks
        ticker.on_close = on_close
        ticker.on_error = lambda ws, code, reason: log.warning("ticker error %s %s", code, reason)
        ticker.connect(threaded=True)

        from twisted.internet import reactor

        def in_reactor(function: Any, *args: Any) -> None:
            reactor.callFromThread(function, *args)

        async def follow_lifecycle() -> None:
            async for record in lifecycle:
                event = StrategyLifecycle.model_validate_json(record.value)
                token, instrument = event.spec.instrument_token, event.spec.instrument
                if event.kind is LifecycleKind.STARTED and token not in self.instruments:
                    recently_added[token] = time.monotonic()
                    subscribe({token: instrument})
                elif event.kind in (LifecycleKind.EXITED, LifecycleKind.STOPPED, LifecycleKind.FAILED):
                    if token in self.instruments and not await still_needed(instrument):
                        unsubscribe([token])

        async def still_needed(instrument: str) -> bool:
            try:
                return bool(await redis.scard(symbol_key(instrument)))
            except RedisError:
                return True  # keep watching; the reconcile drops it once Redis answers

        def subscribe(instruments: dict[int, str]) -> None:
            self.instruments.update(instruments)
            if instruments and ticker.is_connected():
                in_reactor(ticker.subscribe, list(instruments))
                in_reactor(ticker.set_mode, ticker.MODE_QUOTE, list(instruments))

        def unsubscribe(tokens: list[int]) -> None:
            for token in tokens:
                self.instruments.pop(token, None)
            if tokens and ticker.is_connected():
                in_reactor(ticker.unsubscribe, tokens)

        async def reconcile() -> None:
            # The lifecycle topic is the fast path; this is the safety net. Whatever it missed (a broker
            # that restarted empty, Redis that was empty when this process started and was rebuilt by
            # recovery since) is subscribed within one interval. An instrument is dropped only if no
            # running strategy has needed it for a whole interval, so a START racing the snapshot stays.
            while True:
                await asyncio.sleep(self.settings.ticker_resync_seconds)
                try:
                    needed = await self.needed_now(redis)
                except RedisError as exc:
                    log.warning("ticker: cannot read running strategies (%s); keeping %d subscriptions",
                                exc, len(self.instruments))  # fmt: skip
                    continue
                missing = {token: name for token, name in needed.items() if token not in self.instruments}
                if missing:
                    log.warning("ticker: subscribing %d instruments the lifecycle stream had not: %s",
                                len(missing), sorted(missing.values())[:10])  # fmt: skip
                    subscribe(missing)
                settled = time.monotonic() - self.settings.ticker_resync_seconds
                unused = [t for t in self.instruments if t not in needed and recently_added.get(t, 0.0) < settled]
                unsubscribe(unused)
                metrics.TICKER_SUBSCRIPTIONS.set(len(self.instruments))
                await metrics.record_consumer_lag(lifecycle, self.settings.topic("algo-ticker"))

        async def publish_ticks() -> None:
            topic = self.settings.topic("ticks")
            while True:
                ticks = await self.queue.get()
                received = self.clock.now().isoformat()
                for tick in ticks:
                    instrument = self.instruments.get(tick["instrument_token"])
                    if instrument is None:
                        continue
                    exchange_time = tick.get("exchange_timestamp")
                    value = orjson.dumps({
                        "instrument": instrument, "token": tick["instrument_token"],
                        "last_price": tick["last_price"], "volume": tick.get("volume_traded", 0),
                        "exchange_time": exchange_time.isoformat() if exchange_time else None,
                        "received_at": received,
                    })  # fmt: skip
                    await producer.send(topic, value=value, key=instrument.encode())
                    metrics.TICKS_PUBLISHED.inc()

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(self.settings.ticker_silence_seconds / 2)
                silent = time.monotonic() - self.last_message
                if ticker.is_connected() and silent > self.settings.ticker_silence_seconds:
                    log.warning("ticker silent for %.1fs: dropping the socket to reconnect", silent)
                    in_reactor(ticker.close, 4000, "silent")

        try:
            await asyncio.gather(follow_lifecycle(), publish_ticks(), watchdog(), reconcile())
        finally:
            in_reactor(ticker.stop_retry)
            in_reactor(ticker.close)
            await lifecycle.stop()
            await producer.stop()
            await redis.aclose()


def run_ticker(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(TickConnector(settings).run())
    except KeyboardInterrupt:
        pass
