"""Password hashing (argon2id) and strength checks (zxcvbn) in a bounded pool of their own threads.

A hash costs tens of milliseconds of CPU by design. Run on the default executor, a flood of logins took every
thread and core it could and the status poll queued behind it; here a fixed number of threads hash, a bounded
number of requests wait for them, and the rest are refused at once with 503 and Retry-After. The flood queues
behind itself; the event loop keeps its core.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from api.password_policy import password_problem
from core.settings import Environment, Settings
from storage.accounts import UNUSABLE_PASSWORD_HASH

T = TypeVar("T")


class HashingBusy(Exception):
    """More password checks are waiting than the queue allows; the caller answers 503 and asks for a retry."""


class PasswordService:
    """The test environment uses a cheap argon2id parameter set: the suite registers hundreds of users, and
    the cost parameters are not what the tests examine. Every other environment gets the library's
    RFC 9106 defaults."""

    def __init__(self, settings: Settings) -> None:
        if settings.environment is Environment.TEST:
            self._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        else:
            self._hasher = PasswordHasher()
        self._threads = ThreadPoolExecutor(settings.password_hash_threads, thread_name_prefix="password-hash")
        self._capacity = settings.password_hash_threads + settings.password_hash_queue
        self._admitted = 0
        self._min_score = settings.password_min_score
        # Verified against when the email is unknown: a login takes as long whether the account exists.
        self._dummy_hash = self._hasher.hash("timing-equaliser-0")

    async def _in_pool(self, work: Callable[[], T]) -> T:
        if self._admitted >= self._capacity:
            raise HashingBusy
        self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, work)
        finally:
            self._admitted -= 1

    async def hash(self, password: str) -> str:
        return await self._in_pool(lambda: self._hasher.hash(password))

    async def verify(self, password_hash: str | None, password: str) -> bool:
        usable = None if password_hash == UNUSABLE_PASSWORD_HASH else password_hash

        def _verify() -> bool:
            try:
                matched = self._hasher.verify(usable or self._dummy_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False
            return matched and usable is not None

        return await self._in_pool(_verify)

    async def weakness(self, password: str, email: str) -> str | None:
        """Why a new password is refused, or None. zxcvbn takes up to ~150 ms on a long one: off the loop too."""
        return await self._in_pool(lambda: password_problem(password, email, self._min_score))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def email_fingerprint(email: str) -> str:
    """Redis key material for an email: throttling must work without storing addresses in Redis."""
    return hashlib.sha256(email.lower().encode()).hexdigest()[:32]
