"""Faust apps are built explicitly from Settings; nothing touches the event loop at import time."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import faust

from core.kafka import process_client_id
from core.logs import configure_logging
from core.settings import Settings
from streams.transport import register as register_transport

log = logging.getLogger(__name__)


def build_faust_app(settings: Settings, name: str) -> faust.App:
    scheme = register_transport(settings.kafka_lifecycle_fetch_max_wait_ms)
    brokers = ";".join(f"{scheme}://{host}" for host in settings.kafka_bootstrap.split(","))
    session_timeout = settings.kafka_session_timeout_seconds
    app_id = settings.topic(name)
    return faust.App(
        app_id,
        broker=brokers,
        broker_client_id=process_client_id(name),
        store="memory://",
        # Faust makes a data directory even for the memory store, which keeps nothing in it: in the system's temp
        # directory, not in whatever directory the process was started from. Directly in it: Faust makes only the
        # last folder of the path, and a parent of ours missing on a fresh machine kept every service from starting.
        datadir=Path(tempfile.gettempdir()) / f"faust-{app_id}-data",
        web_enabled=False,
        topic_partitions=settings.ticks_partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,  # Faust declares its own changelog topics; ours exist already
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=max(session_timeout / 6, 0.5),
        broker_rebalance_timeout=session_timeout,
        broker_commit_interval=0.5,
        stream_wait_empty=False,
    )


def raw_topic(app: faust.App, name: str, partitions: int) -> faust.TopicT:
    """Our topics carry JSON bytes that the agents decode with the pydantic models themselves."""
    return app.topic(name, key_type=bytes, value_type=bytes, partitions=partitions, value_serializer="raw",
                     key_serializer="raw")  # fmt: skip


def freeze_startup_heap() -> int:
    """Put every object alive now out of the cyclic collector's reach; returns how many there are.

    A started worker holds about 190,000 long-lived objects (modules, Faust, SQLAlchemy, pydantic, aiokafka),
    and every full collection walked them all: 90 to 140 ms on this project's 2-core machines, a stall of
    the event loop in which no tick is checked and no order is sent. Frozen objects are not walked again; a
    full collection then walks only what was allocated since, 7 to 16 ms here. The one cost: a reference cycle
    among frozen objects that dies later is never collected. They are the process's long-lived objects, and
    reference counting still frees every frozen object that is not in such a cycle.
    """
    gc.collect()  # what is already garbage goes now, not into the frozen set
    gc.freeze()
    return gc.get_freeze_count()


STOPPED_LATE_EXIT_CODE = 70  # EX_SOFTWARE: it did not stop cleanly


def exit_unless_stopped_within(seconds: float) -> threading.Timer:
    """From now on, the process has `seconds` to end; then it exits at once. A thread, not a task: the stop
    being waited for may be the event loop's own work. A stop waits on Kafka (offsets, the group), and when
    Kafka goes down with it, as with a launcher killed outright, that wait never ended: the worker stayed
    behind, an orphan."""

    def exit_now() -> None:
        log.error("still stopping %.0fs after the stop signal: exiting now", seconds)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(STOPPED_LATE_EXIT_CODE)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.name = "stop-deadline"
    timer.start()
    return timer


class ServiceWorker(faust.Worker):
    """The Faust worker of our services: once the app is up (group joined, tables recovered, agents and
    timers running), the start-up heap is frozen, before the worker says it is ready. It logs as every other
    service does (core/logs.py), not with Faust's own set-up."""

    def __init__(self, *services: Any, settings: Settings, service: str, **kwargs: Any) -> None:
        super().__init__(*services, loglevel=settings.log_level.lower(), redirect_stdouts=False, **kwargs)
        self.settings = settings
        self.service = service
        self._stop_deadline: threading.Timer | None = None

    def _setup_logging(self) -> None:
        configure_logging(self.settings, self.service)
        self.spinner = None  # no terminal spinner: "Ready" is a log line like any other

    async def on_startup_finished(self) -> None:
        frozen = freeze_startup_heap()
        log.debug("%d start-up objects frozen: full garbage collections no longer walk them", frozen)
        await super().on_startup_finished()

    async def stop(self) -> None:
        if self._stop_deadline is None:
            self._stop_deadline = exit_unless_stopped_within(self.settings.stop_grace_seconds)
        await super().stop()
        remove_empty_folders(Path(self.app.conf.datadir))


def remove_empty_folders(root: Path) -> None:
    """`root` and the folders under it, those that hold no file: the data directory Faust made for the memory
    store, left empty, one per app id (each test's own), would otherwise pile up in the temp directory."""
    for folder, _, _ in os.walk(root, topdown=False):  # the deepest first
        with contextlib.suppress(OSError):  # not empty (a file in it, or a folder kept for one): kept
            os.rmdir(folder)
