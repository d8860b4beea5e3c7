"""The start-up heap of our Faust services is frozen once they are up, so full collections stop walking it."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.kafka import ensure_topics
from streams.faust_app import (
    STOPPED_LATE_EXIT_CODE,
    ServiceWorker,
    build_faust_app,
    freeze_startup_heap,
    remove_empty_folders,
)
from streams.scheduler import scheduler_process
from streams.worker import worker_process
from tests.fixtures.services import build_settings


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    # The rest of the suite runs with the collector as it was.
    yield
    gc.unfreeze()


def _in_a_walk(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_what_was_alive_at_the_freeze_is_not_walked_and_later_cycles_are_still_freed(unfrozen_after: None) -> None:
    before = [_Node()]  # a container alive at the freeze, like the modules and services of a started worker
    frozen = freeze_startup_heap()

    assert frozen > 0 and gc.get_freeze_count() > 0  # (objects freed since by reference counting leave it)
    assert not _in_a_walk(before), "an object alive at the freeze is still walked by every full collection"

    after = [_Node()]
    assert _in_a_walk(after), "objects allocated after the freeze must stay under the collector"
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # cyclic garbage only the collector can free
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None, "a cycle made after the freeze was not collected"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_worker_freezes_its_heap_once_the_app_is_up(
    kafka_bootstrap: str, redis_url: str, database_url: str, topic_prefix: str, unfrozen_after: None
) -> None:
    settings = build_settings(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, database_url=database_url,
                              topic_prefix=topic_prefix)  # fmt: skip
    await ensure_topics(settings)
    worker = worker_process(settings)
    assert isinstance(worker, ServiceWorker)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0

    await worker.on_startup_finished()  # what Faust calls once the app is fully started

    assert gc.get_freeze_count() > 0
    assert not _in_a_walk(worker.app), "the worker's app is still walked by every full collection"


def test_the_scheduler_runs_in_the_same_freezing_worker() -> None:
    assert isinstance(scheduler_process(build_settings()), ServiceWorker)


@pytest.mark.parametrize("name", ["algo-worker", "algo-scheduler"])
def test_a_service_keeps_its_faust_data_directory_out_of_the_working_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started_in, temp = tmp_path / "cwd", tmp_path / "tmp"
    started_in.mkdir()
    temp.mkdir()  # a fresh machine's temp directory: nothing of ours in it yet
    monkeypatch.chdir(started_in)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    app = build_faust_app(build_settings(topic_prefix="datadir-"), name)

    app._create_directories()  # Faust's own, as the app starts: it makes only the last folder of each path
    assert list(started_in.iterdir()) == [], "the app made its data directory where it was started"
    assert app.conf.tabledir.is_dir() and temp in app.conf.datadir.parents


def test_a_stop_that_never_ends_exits_the_process_at_its_deadline() -> None:
    """A stop waiting on a Kafka that went down with it never ended: the worker stayed behind, an orphan."""
    hung_stop = (
        "import asyncio, logging, sys\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "from streams.faust_app import exit_unless_stopped_within\n"
        "exit_unless_stopped_within(0.5)\n"
        "asyncio.run(asyncio.Event().wait())  # a stop waiting for what never comes\n"
    )
    started = time.monotonic()
    ended = subprocess.run([sys.executable, "-c", hung_stop], capture_output=True, text=True, timeout=30, check=False)
    assert ended.returncode == STOPPED_LATE_EXIT_CODE, ended.stderr
    assert 0.5 <= time.monotonic() - started < 20
    assert "exiting now" in ended.stderr


async def test_a_service_worker_starts_its_stop_deadline_when_it_is_asked_to_stop_and_leaves_no_empty_folder(
    topic_prefix: str,
) -> None:
    worker = scheduler_process(build_settings(stop_grace_seconds=60.0, topic_prefix=topic_prefix))
    assert isinstance(worker, ServiceWorker)
    datadir = Path(worker.app.conf.datadir)
    worker.app.conf.tabledir.mkdir(parents=True)  # what the app does as it starts
    try:
        await worker.stop()
        deadline = worker._stop_deadline
        assert deadline is not None and deadline.is_alive() and deadline.interval == 60.0
        assert not await asyncio.to_thread(datadir.exists), "the app's empty data directory was left behind"
    finally:
        if worker._stop_deadline is not None:
            worker._stop_deadline.cancel()  # this test's process is not to exit


def test_only_folders_without_a_file_are_removed(tmp_path: Path) -> None:
    (tmp_path / "data" / "v1" / "tables").mkdir(parents=True)
    (tmp_path / "kept" / "v1").mkdir(parents=True)
    (tmp_path / "kept" / "v1" / "table.db").write_bytes(b"rows")

    remove_empty_folders(tmp_path / "data")
    remove_empty_folders(tmp_path / "kept")
    remove_empty_folders(tmp_path / "never-made")

    assert not (tmp_path / "data").exists()
    assert (tmp_path / "kept" / "v1" / "table.db").read_bytes() == b"rows"
