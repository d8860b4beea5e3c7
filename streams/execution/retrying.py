"""The engine's one retry policy for broker calls: transient failures only, exponential backoff with jitter."""

from __future__ import annotations

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from connectors.broker import BrokerUnavailable


def broker_retries(attempts: int, initial: float, most: float, jitter: float) -> AsyncRetrying:
    """Retry on BrokerUnavailable (timeout, 5xx, 429) up to `attempts` tries; re-raise the last failure."""
    return AsyncRetrying(
        retry=retry_if_exception_type(BrokerUnavailable),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(initial=initial, max=most, jitter=jitter),
        reraise=True,
    )
