"""Password hashing (argon2id) and strength checks (zxcvbn) in a bounded pool of their own threads.

A hash costs tens of milliseconds of CPU by design. Run on the default executor, a flood of logins took every
thread and core it could and the status poll queued behind it; here a fixed number of threads hash, a bounded
number of requests wait for them, and the rest are refused at once with 503 and Retry-After. The flood queues
behind itself; the event loop keeps its core.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY

from api.password_policy import password_problem
from core.settings import Environment, Settings
from storage.accounts import UNUSABLE_PASSWORD_HASH

T = TypeVar("T")


class HashingBusy(Exception):
    """More password checks are waiting than the queue allows; the caller answers 503 and asks for a retry."""


def password_hasher(settings: Settings) -> PasswordHasher:
    """argon2id at RFC 9106's low-memory cost (t=3, 64 MiB) on one lane instead of four: a hash then keeps to
    one core (150 ms of it) rather than spreading over every core, and the event loop keeps the other. Hashes
    made with other parameters still verify: each carries its own. The test environment uses a cheap set: the
    suite registers hundreds of users, and the cost is not what the tests examine."""
    if settings.environment is Environment.TEST:
        return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    return PasswordHasher.from_parameters(replace(RFC_9106_LOW_MEMORY, parallelism=1))


class PasswordService:
    """Work is admitted in two lanes: `urgent` (a login from an address its account knows) is served before
    anything waiting in the other, so a flood of strangers' logins cannot stand between owners and their
    accounts; only the other lane is bounded by the queue."""

    def __init__(self, settings: Settings) -> None:
        self._hasher = password_hasher(settings)
        self._threads = ThreadPoolExecutor(settings.password_hash_threads, thread_name_prefix="password-hash")
        self._free = settings.password_hash_threads
        self._queue_limit = settings.password_hash_queue
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._min_score = settings.password_min_score
        # Verified against when the email is unknown: a login takes as long whether the account exists.
        self._dummy_hash = self._hasher.hash("timing-equaliser-0")

    async def _acquire(self, urgent: bool) -> None:
        if self._free > 0 and not self._urgent and not self._waiting:
            self._free -= 1
            return
        if not urgent and len(self._waiting) >= self._queue_limit:
            raise HashingBusy
        lane = self._urgent if urgent else self._waiting
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a thread just as the caller gave up: pass it on
            else:
                lane.remove(turn)
            raise

    def _release(self) -> None:
        for lane in (self._urgent, self._waiting):
            while lane:
                turn = lane.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._free += 1

    async def _in_pool(self, work: Callable[[], T], urgent: bool = False) -> T:
        await self._acquire(urgent)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, work)
        finally:
            self._release()

    async def hash(self, password: str) -> str:
        return await self._in_pool(lambda: self._hasher.hash(password))

    async def verify(self, password_hash: str | None, password: str, urgent: bool = False) -> bool:
        usable = None if password_hash == UNUSABLE_PASSWORD_HASH else password_hash

        def _verify() -> bool:
            try:
                matched = self._hasher.verify(usable or self._dummy_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False
            return matched and usable is not None

        return await self._in_pool(_verify, urgent)

    async def weakness(self, password: str, email: str) -> str | None:
        """Why a new password is refused, or None. zxcvbn takes up to ~150 ms on a long one: off the loop too."""
        return await self._in_pool(lambda: password_problem(password, email, self._min_score))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def email_fingerprint(email: str) -> str:
    """Redis key material for an email: throttling must work without storing addresses in Redis."""
    return hashlib.sha256(email.lower().encode()).hexdigest()[:32]
