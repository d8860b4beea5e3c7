"""GET /metrics: the API's Prometheus series, for the operator's token only, with the book read from the database."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.api import OPERATOR_TOKEN, MakeStrategy, MakeUser

OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def _values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_are_for_operators_only(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer not-the-operator-token"}):
        refused = await client.get("/metrics", headers=headers)
        assert refused.status_code == 401
        assert "algo_" not in refused.text


async def test_the_book_is_counted_from_the_database(
    client: httpx.AsyncClient, make_user: MakeUser, make_strategy: MakeStrategy
) -> None:
    user = await make_user()
    created = await make_strategy(user)
    response = await client.get("/metrics", headers=OPERATOR)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    values = _values(response.text)
    assert values[("algo_strategies", frozenset({("status", "created")}))] >= 1
    assert ("algo_open_positions", frozenset({("status", "running")})) in values
    assert ("algo_positions_without_live_stop", frozenset()) in values
    label_names = {name for (_, labels) in values for name, _ in labels}
    assert not label_names & {"user", "user_id", "email", "strategy_id", "order_id", "api_key"}
    assert user.email not in response.text and created["strategy_id"]
