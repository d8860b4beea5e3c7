"""Sequence 1: registration, login, tokens, throttling."""

from __future__ import annotations

import base64
import time

import httpx
import orjson
from jose import jwt
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.settings import Settings
from storage.models import User
from tests.fixtures.api import MakeUser
from tests.fixtures.factories import DEFAULT_PASSWORD, unique_email


async def test_register_returns_token_and_stores_argon2_hash(
    client: httpx.AsyncClient, api_settings: Settings, db_engine: AsyncEngine
) -> None:
    email = unique_email()
    response = await client.post("/auth/register", json={"email": email.upper(), "password": DEFAULT_PASSWORD})
    assert response.status_code == 201, response.text
    body = response.json()
    claims = jwt.decode(
        body["access_token"], api_settings.jwt_secret.get_secret_value(), algorithms=["HS256"],
        options={"verify_exp": False},
    )  # fmt: skip
    assert claims["sub"] == str(body["user_id"])
    assert {"exp", "iat"} <= claims.keys()
    async with db_engine.connect() as conn:
        row = (await conn.execute(select(User.email, User.password_hash))).one()
    assert row.email == email.lower()
    assert row.password_hash.startswith("$argon2id$")
    assert DEFAULT_PASSWORD not in row.password_hash


async def test_duplicate_email_is_409_case_insensitive(client: httpx.AsyncClient) -> None:
    email = unique_email()
    first = await client.post("/auth/register", json={"email": email, "password": DEFAULT_PASSWORD})
    assert first.status_code == 201
    again = await client.post("/auth/register", json={"email": email.upper(), "password": DEFAULT_PASSWORD})
    assert again.status_code == 409
    assert "already exists" in again.json()["detail"]


async def test_password_policy_is_stated(client: httpx.AsyncClient) -> None:
    email = unique_email()
    # Finding 7: common, keyboard-walk and email-derived passwords were accepted.
    for weak in ("short1", "password12", "qwerty1234", email, "1234567890123", "x1" * 65):
        response = await client.post("/auth/register", json={"email": email, "password": weak})
        assert response.status_code == 422, weak
        problems = response.json()["detail"]
        assert problems[0]["field"] == "password"
        assert "10 to 128" in problems[0]["message"], problems


async def test_password_is_taken_as_typed(client: httpx.AsyncClient) -> None:
    """Finding 7: spaces around a password were stripped silently."""
    email, password = unique_email(), f"  {DEFAULT_PASSWORD}  "
    assert (await client.post("/auth/register", json={"email": email, "password": password})).status_code == 201
    stripped = await client.post("/auth/login", json={"email": email, "password": DEFAULT_PASSWORD})
    assert stripped.status_code == 401
    assert (await client.post("/auth/login", json={"email": email, "password": password})).status_code == 200


async def test_openapi_states_what_registration_accepts(client: httpx.AsyncClient) -> None:
    """Finding 7: the schema said a password of 1 character would do."""
    spec = (await client.get("/openapi.json")).json()
    schema = spec["components"]["schemas"]["RegisterRequest"]["properties"]["password"]
    assert (schema["minLength"], schema["maxLength"]) == (10, 128)
    assert "hard to guess" in schema["description"]


async def test_invalid_email_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/register", json={"email": "not-an-email", "password": DEFAULT_PASSWORD})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "email"


async def test_login_right_and_wrong(client: httpx.AsyncClient, make_user: MakeUser) -> None:
    user = await make_user()
    ok = await client.post("/auth/login", json={"email": user.email.upper(), "password": user.password})
    assert ok.status_code == 200
    assert ok.json()["user_id"] == user.id
    wrong = await client.post("/auth/login", json={"email": user.email, "password": "Wrong-passw0rd"})
    assert wrong.status_code == 401
    nobody = await client.post("/auth/login", json={"email": unique_email(), "password": "Wrong-passw0rd"})
    assert nobody.status_code == 401
    assert wrong.json()["detail"] == nobody.json()["detail"]  # no account enumeration


async def test_failed_logins_are_throttled(client: httpx.AsyncClient, make_user: MakeUser) -> None:
    user = await make_user()
    for _ in range(5):
        response = await client.post("/auth/login", json={"email": user.email, "password": "Wrong-passw0rd"})
        assert response.status_code == 401
    locked = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert locked.status_code == 429
    assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    assert "too many failed logins" in locked.json()["detail"]
    # Other accounts are unaffected.
    other = await make_user()
    assert (
        await client.post("/auth/login", json={"email": other.email, "password": other.password})
    ).status_code == 200


async def test_successful_login_resets_failure_count(client: httpx.AsyncClient, make_user: MakeUser) -> None:
    user = await make_user()
    for _ in range(4):
        await client.post("/auth/login", json={"email": user.email, "password": "Wrong-passw0rd"})
    assert (await client.post("/auth/login", json={"email": user.email, "password": user.password})).status_code == 200
    for _ in range(4):
        await client.post("/auth/login", json={"email": user.email, "password": "Wrong-passw0rd"})
    assert (await client.post("/auth/login", json={"email": user.email, "password": user.password})).status_code == 200


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


async def test_bad_tokens_are_401_with_challenge(
    client: httpx.AsyncClient, make_user: MakeUser, api_settings: Settings
) -> None:
    user = await make_user()
    secret = api_settings.jwt_secret.get_secret_value()
    header, payload, signature = user.token.split(".")
    now = int(time.time())
    tampered_payload = _b64({"sub": str(user.id + 1), "iat": now, "exp": now + 3600})
    from core.clock import get_clock

    clock_now = int(get_clock().now().timestamp())
    candidates = {
        "missing": None,
        "not bearer": f"Basic {user.token}",
        "malformed": "Bearer not.a.jwt",
        "garbage": "Bearer " + "x" * 500,
        "tampered": f"Bearer {header}.{tampered_payload}.{signature}",
        "wrong key": "Bearer " + jwt.encode({"sub": str(user.id), "iat": clock_now, "exp": clock_now + 60},
                                            "another-secret-of-at-least-32-characters!!", algorithm="HS256"),
        "alg none": f"Bearer {_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': str(user.id), 'iat': now, 'exp': now + 3600})}.",  # noqa: E501
        "expired": "Bearer " + jwt.encode({"sub": str(user.id), "iat": clock_now - 7200, "exp": clock_now - 3600},
                                          secret, algorithm="HS256"),
        "no exp": "Bearer " + jwt.encode({"sub": str(user.id), "iat": clock_now}, secret, algorithm="HS256"),
        "bad sub": "Bearer " + jwt.encode({"sub": "abc", "iat": clock_now, "exp": clock_now + 60}, secret,
                                          algorithm="HS256"),
    }  # fmt: skip
    for name, authorization in candidates.items():
        headers = {} if authorization is None else {"Authorization": authorization}
        for method, path in (("GET", "/strategies"), ("GET", "/strategy/status/1"), ("GET", "/broker/status")):
            response = await client.request(method, path, headers=headers)
            assert response.status_code == 401, (name, path, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), name
    final = await client.get("/strategies", headers=user.headers)
    assert final.status_code == 200, final.text
