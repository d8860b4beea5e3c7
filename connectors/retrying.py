"""The one retry policy for broker calls: transient failures only, exponential backoff with jitter."""

from __future__ import annotations

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from connectors.broker import BrokerNotSent, BrokerUnavailable


def broker_retries(attempts: int, initial: float, most: float, jitter: float) -> AsyncRetrying:
    """Retry on BrokerUnavailable (timeout, 5xx, 429, the trader's egress down) up to `attempts` tries; re-raise
    the last failure. A refusal (BrokerRejected, among them BrokerSourceRefused: the order's source address is
    not the trader's registered IP) is never retried: every retry would be refused alike.

    A call that placed nothing (a 429, or an order call that could not start in its window) is retried without
    backing off: the rate limiter in front of the call already waits for the trader's budget, and an exit must
    not lose seconds to a failure that placed nothing."""
    backoff = wait_exponential_jitter(initial=initial, max=most, jitter=jitter)

    def wait(state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome is not None else None
        return 0.0 if isinstance(failure, BrokerNotSent) else backoff(state)

    return AsyncRetrying(
        retry=retry_if_exception_type(BrokerUnavailable),
        stop=stop_after_attempt(attempts),
        wait=wait,
        reraise=True,
    )
