"""The one retry policy for broker calls: transient failures only, exponential backoff with jitter."""

from __future__ import annotations

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from connectors.broker import BrokerNotSent, BrokerUnavailable

# An order's tries that placed nothing, on top of its attempts: bounded all the same, so that a broker answering
# nothing but 429, or calls that never start in time, still end in a failure the trader hears about.
NOT_SENT_TRIES = 10


def broker_retries(
    attempts: int, initial: float, most: float, jitter: float, *, not_sent_tries: int = 0
) -> AsyncRetrying:
    """Retry on BrokerUnavailable (timeout, 5xx, 429, the trader's egress down) up to `attempts` tries; re-raise
    the last failure. A refusal (BrokerRejected, among them BrokerSourceRefused: the order's source address is
    not the trader's registered IP) is never retried: every retry would be refused alike.

    A call that placed nothing (a 429, or an order call that could not start in its window) is retried without
    backing off: the rate limiter in front of the call already waits for the trader's budget, and an exit must
    not lose seconds to a failure that placed nothing. Up to `not_sent_tries` of them (an order's placement:
    NOT_SENT_TRIES) are not counted among the `attempts` either (crash matrix: an EXIT whose first two calls
    could not start in their window was given up after two timeouts, its position left open)."""
    backoff = wait_exponential_jitter(initial=initial, max=most, jitter=jitter)
    not_sent = 0

    def stop(state: RetryCallState) -> bool:
        nonlocal not_sent
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, BrokerNotSent) and not_sent < not_sent_tries:
            not_sent += 1
            return False
        return state.attempt_number - not_sent >= attempts

    def wait(state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome is not None else None
        return 0.0 if isinstance(failure, BrokerNotSent) else backoff(state)

    return AsyncRetrying(retry=retry_if_exception_type(BrokerUnavailable), stop=stop, wait=wait, reraise=True)
