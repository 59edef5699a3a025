"""The JupyterHub authenticator against a scripted hub on loopback (pure parts, then I/O).

The real hub is in ``test_jupyterhub_hub.py``; here a fake hub lets us produce what a real
one rarely does on demand: 5xx, garbage, slowness, legacy-mode permission failures.
"""

from __future__ import annotations

import json
import logging
import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_api.auth import CookieCache, User, UserAuth
from dask_gateway_api.auth_jupyterhub import (
    FAILURE,
    MAX_TOKEN_LENGTH,
    PERMISSION_FAILURE,
    UPSTREAM_FAILURE,
    HubAnswerError,
    HubAuthConfig,
    JupyterHubAuthenticator,
    TTLCache,
    classify_hub_status,
    hub_token_from_header,
    token_fingerprint,
    user_from_hub_model,
)
from dask_gateway_common.errors import GatewayError
from tests.auth.fakes import FakeHub, hub_auth, make_request, running_fake_hub

TOKEN = "0123456789abcdef0123456789abcdef"
ALICE = {
    "kind": "user",
    "name": "alice",
    "admin": False,
    "groups": ["analysts", "staff"],
    "scopes": ["access:services!service=dask-gateway", "read:users:name!user=alice"],
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- pure parts -------------------------------------------------------------------------


def test_token_from_header() -> None:
    assert hub_token_from_header(f"jupyterhub {TOKEN}") == TOKEN
    assert hub_token_from_header(f"JupyterHub   {TOKEN}  ") == TOKEN
    for bad in (
        None,
        "",
        "jupyterhub",
        "jupyterhub ",
        f"token {TOKEN}",
        f"Basic {TOKEN}",
        "jupyterhub two words",
        "jupyterhub tab\there",
        "jupyterhub caf\xe9",
        "jupyterhub ctrl\x01",
        "jupyterhub " + "a" * (MAX_TOKEN_LENGTH + 1),
    ):
        assert hub_token_from_header(bad) is None, bad
    assert hub_token_from_header("jupyterhub " + "a" * MAX_TOKEN_LENGTH) is not None


@given(st.text(max_size=200))
def test_token_from_header_is_total(value: str) -> None:
    token = hub_token_from_header(value)
    assert token is None or (token.isascii() and token.isprintable() and " " not in token)


def test_fingerprint_is_a_hash() -> None:
    fingerprint = token_fingerprint(TOKEN)
    assert len(fingerprint) == 64 and TOKEN not in fingerprint
    assert fingerprint == token_fingerprint(TOKEN) != token_fingerprint(TOKEN + "x")


def test_user_model_names() -> None:
    assert user_from_hub_model(ALICE) == User("alice", frozenset({"analysts", "staff"}), False)
    service = {"kind": "service", "name": "friend", "admin": False}
    assert user_from_hub_model(service) == User("service:friend")
    # A user whose name contains ':' is disambiguated too (it could pose as a service).
    assert user_from_hub_model({"kind": "user", "name": "service:x"}) == User("user:service:x")
    assert user_from_hub_model({"name": "root", "admin": True}).admin is True
    assert user_from_hub_model({"name": "carol", "groups": None}).groups == frozenset()


def test_user_model_scope_check() -> None:
    def check(scopes: object) -> User | None:
        model = dict(ALICE, scopes=scopes)
        return user_from_hub_model(model, service_name="dask-gateway", check_scopes=True)

    assert check(["access:services!service=dask-gateway"]) is not None
    assert check(["access:services"]) is not None
    assert check(["access:services!service=other", "self"]) is None
    assert check(["access:services!service=dask-gateway-evil"]) is None
    assert check([]) is None
    assert check(None) is None
    assert check([1, {"x": 1}, "access:services"]) is not None
    # Without the check any valid token is a user.
    assert user_from_hub_model(dict(ALICE, scopes=[]), check_scopes=False) is not None


@pytest.mark.parametrize(
    "model",
    [
        None,
        [],
        "alice",
        {},
        {"name": ""},
        {"name": 3},
        {"name": "a", "kind": 5},
        {"name": "a", "groups": "g"},
        {"name": "a", "groups": [1]},
        {"name": "a", "admin": "yes"},
    ],
)
def test_user_model_malformed(model: object) -> None:
    with pytest.raises(HubAnswerError):
        user_from_hub_model(model)
    bad_scopes = {"name": "a", "scopes": "access:services"}
    with pytest.raises(HubAnswerError):
        user_from_hub_model(bad_scopes, service_name="s", check_scopes=True)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(["name", "kind", "groups", "admin", "scopes", "x"]), json_values
    )
    | json_values
)
def test_user_model_only_raises_hub_answer_error(model: object) -> None:
    try:
        user = user_from_hub_model(model, service_name="gw", check_scopes=True)
    except HubAnswerError:
        return
    assert user is None or (isinstance(user, User) and user.name)


def test_status_mapping() -> None:
    def outcome(status: int, legacy: bool) -> object:
        verdict = classify_hub_status(status, legacy=legacy)
        if verdict.ok:
            return "ok"
        if verdict.refused:
            return 401
        assert verdict.error is not None
        return (verdict.error.status, verdict.error.message)

    for legacy in (False, True):
        assert outcome(200, legacy) == "ok"
        assert outcome(404, legacy) == 401
        assert outcome(500, legacy) == (502, UPSTREAM_FAILURE)
        assert outcome(503, legacy) == (502, UPSTREAM_FAILURE)
        assert outcome(418, legacy) == (500, FAILURE)
        assert outcome(302, legacy) == (500, FAILURE)
    # The user's own token: the hub's 401/403 means "not a valid token".
    assert outcome(401, False) == 401
    assert outcome(403, False) == 401
    # The gateway's own token (legacy): the hub refusing *us* is our fault.
    assert outcome(401, True) == (500, PERMISSION_FAILURE)
    assert outcome(403, True) == (500, PERMISSION_FAILURE)


def test_ttl_cache_expiry_and_lru() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, 2, clock=clock)
    cache.put("a", 1)
    clock.now += 5
    cache.put("b", 2)
    assert cache.get("a") == (True, 1)  # a is now the most recently used
    cache.put("c", 3)  # evicts b
    assert cache.get("b") == (False, None)
    assert len(cache) == 2
    clock.now += 5  # a was stored 10 s ago: expired (not refreshed by use)
    assert cache.get("a") == (False, None)
    assert cache.get("c") == (True, 3)
    off: TTLCache[str, int] = TTLCache(0, 4, clock=clock)
    off.put("a", 1)
    assert off.get("a") == (False, None) and len(off) == 0
    with pytest.raises(ValueError):
        TTLCache(1, 0)


def test_config_problems() -> None:
    assert HubAuthConfig("http://hub/hub/api").problems() == []
    assert HubAuthConfig("http://h/api", service_name="gw").check_scopes is True
    assert HubAuthConfig("http://h/api", service_name="gw", legacy_api=True, api_token="t")
    legacy = HubAuthConfig("http://h/api", service_name="gw", legacy_api=True, api_token="t")
    assert legacy.check_scopes is False and legacy.problems() == []
    assert (
        "needs the gateway's own hub token"
        in HubAuthConfig("http://h", legacy_api=True).problems()[0]
    )
    both = HubAuthConfig(
        "http://h", legacy_api=True, api_token="t", use_service_access_scopes=True
    ).problems()
    assert any("cannot be enforced" in p for p in both)
    no_name = HubAuthConfig("http://h", use_service_access_scopes=True).problems()
    assert any("needs auth.jupyterhub_service_name" in p for p in no_name)
    bad_token = HubAuthConfig("http://h", legacy_api=True, api_token="a b").problems()
    assert bad_token == ["auth.jupyterhub_api_token: must be printable ASCII without whitespace"]
    with pytest.raises(ValueError, match="jupyterhub_timeout"):
        JupyterHubAuthenticator(HubAuthConfig("http://h", timeout=0))


# --- against a scripted hub -------------------------------------------------------------


def authenticator(hub: FakeHub, **kwargs: object) -> JupyterHubAuthenticator:
    clock = kwargs.pop("clock", None)
    config = HubAuthConfig(api_url=hub.url, **kwargs)  # type: ignore[arg-type]
    if clock is None:
        return JupyterHubAuthenticator(config)
    return JupyterHubAuthenticator(config, clock=clock)  # type: ignore[arg-type]


async def test_user_token_is_checked_with_the_hub() -> None:
    hub = FakeHub()
    hub.user(TOKEN, ALICE)
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(hub, service_name="dask-gateway")
            user = await auth.authenticate(make_request(hub_auth(TOKEN)))
            await auth.aclose()
    assert user == User("alice", frozenset({"analysts", "staff"}))
    assert hub.requests == [("/hub/api/user", f"token {TOKEN}")]


async def test_hub_refusals_are_401_and_failures_are_5xx() -> None:
    hub = FakeHub()
    hub.answers.update(
        {
            "t403": (403, b'{"status": 403}'),
            "t401": (401, b""),
            "t404": (404, b""),
            "t500": (500, b"oops"),
            "t503": (503, b""),
            "t418": (418, b""),
            "garbage": (200, b"<html>not json</html>"),
            "list": (200, b"[1, 2]"),
            "noname": (200, b'{"kind": "user"}'),
            "noscope": (200, json.dumps(dict(ALICE, scopes=["self"])).encode()),
        }
    )
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(hub, service_name="dask-gateway")
            for token in ("t403", "t401", "t404", "noscope"):
                assert await auth.authenticate(make_request(hub_auth(token))) is None, token
            for token, status, message in [
                ("t500", 502, UPSTREAM_FAILURE),
                ("t503", 502, UPSTREAM_FAILURE),
                ("t418", 500, FAILURE),
                ("garbage", 502, UPSTREAM_FAILURE),
                ("list", 502, UPSTREAM_FAILURE),
                ("noname", 502, UPSTREAM_FAILURE),
            ]:
                with pytest.raises(GatewayError) as info:
                    await auth.authenticate(make_request(hub_auth(token)))
                assert (info.value.status, info.value.message) == (status, message), token
            await auth.aclose()


async def test_unreachable_and_slow_hub_are_502() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        auth = JupyterHubAuthenticator(HubAuthConfig(f"http://127.0.0.1:{port}/hub/api"))
        with trio.fail_after(10), pytest.raises(GatewayError) as info:
            await auth.authenticate(make_request(hub_auth(TOKEN)))
    assert (info.value.status, info.value.message) == (502, UPSTREAM_FAILURE)

    hub = FakeHub(delay=5)
    hub.user(TOKEN, ALICE)
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(hub, timeout=0.3)
            started = trio.current_time()
            with pytest.raises(GatewayError) as info:
                await auth.authenticate(make_request(hub_auth(TOKEN)))
            assert trio.current_time() - started < 3
            await auth.aclose()
    assert info.value.status == 502


async def test_bad_headers_never_reach_the_hub() -> None:
    hub = FakeHub()
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(hub)
            for header in ("Basic YWxpY2U6", "jupyterhub", "jupyterhub a b", "jupyterhub \x7f"):
                assert await auth.authenticate(make_request(("Authorization", header))) is None
            assert await auth.authenticate(make_request()) is None
            await auth.aclose()
    assert hub.requests == []


async def test_legacy_mode() -> None:
    service_token = "gateway-service-token"
    odd = "tok/with?odd#chars"
    hub = FakeHub()
    hub.user(TOKEN, {k: v for k, v in ALICE.items() if k != "scopes"})
    hub.answers["unknown"] = (404, b"")
    hub.answers[odd] = (404, b"")
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(
                hub, legacy_api=True, api_token=service_token, service_name="dask-gateway"
            )
            assert await auth.authenticate(make_request(hub_auth(TOKEN))) == User(
                "alice", frozenset({"analysts", "staff"})
            )
            assert await auth.authenticate(make_request(hub_auth("unknown"))) is None
            assert await auth.authenticate(make_request(hub_auth(odd))) is None
            await auth.aclose()
    assert hub.requests[0] == (
        f"/hub/api/authorizations/token/{TOKEN}",
        f"token {service_token}",
    )
    assert hub.requests[2][0] == "/hub/api/authorizations/token/tok%2Fwith%3Fodd%23chars"


async def test_legacy_mode_permission_failure() -> None:
    hub = FakeHub(default=(403, b'{"status": 403}'))
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(hub, legacy_api=True, api_token="bad-service-token")
            with pytest.raises(GatewayError) as info:
                await auth.authenticate(make_request(hub_auth(TOKEN)))
            await auth.aclose()
    assert (info.value.status, info.value.message) == (500, PERMISSION_FAILURE)


async def test_cache_ttl_negative_entries_and_errors() -> None:
    clock = FakeClock()
    hub = FakeHub()
    hub.user(TOKEN, ALICE)
    hub.answers["down"] = (502, b"")
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(hub, cache_ttl=60, clock=clock)
            for _ in range(3):
                assert await auth.authenticate(make_request(hub_auth(TOKEN))) is not None
                assert await auth.authenticate(make_request(hub_auth("bad"))) is None
            assert auth.hub_requests == 2  # one per token, refusals cached too
            clock.now += 60
            assert await auth.authenticate(make_request(hub_auth(TOKEN))) is not None
            assert auth.hub_requests == 3
            for _ in range(2):  # failures are never cached
                with pytest.raises(GatewayError):
                    await auth.authenticate(make_request(hub_auth("down")))
            assert auth.hub_requests == 5
            await auth.aclose()

            auth = authenticator(hub, cache_ttl=0)
            for _ in range(3):
                assert await auth.authenticate(make_request(hub_auth(TOKEN))) is not None
            assert auth.hub_requests == 3
            await auth.aclose()

            auth = authenticator(hub, cache_ttl=60, cache_size=2, clock=clock)
            for token in (TOKEN, "a", "b", TOKEN):
                await auth.authenticate(make_request(hub_auth(token)))
            assert auth.hub_requests == 4 and len(auth.cache) == 2  # TOKEN was evicted
            await auth.aclose()


async def test_concurrent_requests_share_one_hub_call() -> None:
    hub = FakeHub(delay=0.2)
    hub.user(TOKEN, ALICE)
    hub.answers["down"] = (500, b"")
    results: list[object] = []

    async def one(token: str) -> None:
        try:
            results.append(await auth.authenticate(make_request(hub_auth(token))))
        except GatewayError as exc:
            results.append(exc.status)

    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(hub, cache_ttl=0)  # sharing does not depend on the cache
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one, TOKEN)
                for _ in range(5):
                    nursery.start_soon(one, "down")
            await auth.aclose()
    assert auth.hub_requests == 2
    assert results.count(User("alice", frozenset({"analysts", "staff"}))) == 10
    assert results.count(502) == 5


async def test_cancelled_check_lets_the_waiters_ask_again() -> None:
    hub = FakeHub(delay=0.3)
    hub.user(TOKEN, ALICE)
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = authenticator(hub)
            users: list[User | None] = []
            async with trio.open_nursery() as nursery:
                first = trio.CancelScope()

                async def cancelled() -> None:
                    with first:
                        await auth.authenticate(make_request(hub_auth(TOKEN)))

                async def waiter() -> None:
                    users.append(await auth.authenticate(make_request(hub_auth(TOKEN))))

                nursery.start_soon(cancelled)
                await trio.sleep(0.05)
                nursery.start_soon(waiter)
                await trio.sleep(0.05)
                first.cancel()
            await auth.aclose()
    assert users == [User("alice", frozenset({"analysts", "staff"}))]
    assert auth.hub_requests == 2


async def test_tokens_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-token-value-42"
    hub = FakeHub()
    with trio.fail_after(10):
        for answer in [(403, b""), (500, b""), (200, b"garbage"), (200, b'{"name": "x"}')]:
            hub.answers[secret] = answer
            async with running_fake_hub(hub):
                auth = authenticator(hub, service_name="gw")
                try:
                    await auth.authenticate(make_request(hub_auth(secret)))
                except GatewayError:
                    pass
                await auth.aclose()
    assert caplog.records, "the failures above must be logged"
    for record in caplog.records:
        assert secret not in record.getMessage()
    assert token_fingerprint(secret)[:8] in caplog.text


async def test_user_auth_flow_advertises_the_scheme() -> None:
    hub = FakeHub()
    hub.user(TOKEN, ALICE)
    with trio.fail_after(10):
        async with running_fake_hub(hub):
            auth = UserAuth(authenticator(hub), CookieCache())
            with pytest.raises(GatewayError) as info:
                await auth.authenticate(make_request())
            assert info.value.status == 401
            assert ("WWW-Authenticate", "jupyterhub") in info.value.headers
            result = await auth.authenticate(make_request(hub_auth(TOKEN)))
            assert result.user.name == "alice" and result.fresh
            await auth.authenticator.aclose()
