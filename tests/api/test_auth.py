"""User and cluster-token authentication (spec §2.2), without sockets."""

from __future__ import annotations

import base64

import pytest

from dask_gateway_api.auth import (
    CookieCache,
    SimpleAuthenticator,
    User,
    UserAuth,
    cluster_token_matches,
    parse_cookies,
    token_required,
)
from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import Request, Response
from tests.auth.fakes import make_request


def basic(user: str, password: str) -> tuple[str, str]:
    raw = f"{user}:{password}".encode("latin-1")
    return ("Authorization", "Basic " + base64.b64encode(raw).decode())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_basic_user_is_part_before_first_colon() -> None:
    auth = SimpleAuthenticator()
    user = await auth.authenticate(make_request(basic("alice", "pw:with:colons")))
    assert user == User("alice")
    assert user.groups == frozenset() and user.admin is False
    # Any password is accepted without a shared password; scheme is case-insensitive.
    raw = base64.b64encode(b"bob:").decode()
    assert await auth.authenticate(make_request(("Authorization", f"bAsIc {raw}"))) == User("bob")
    # Latin-1 user names survive (the client encodes with latin-1).
    assert await auth.authenticate(make_request(basic("jos\xe9", "x"))) == User("jos\xe9")


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "Basic",  # no space, no credentials
        "Basicxyz",
        "Bearer abc",  # unknown scheme
        "token abc",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b":password-but-no-user").decode(),
        "Basic \u00ff\u00fe",
    ],
)
async def test_malformed_headers_are_not_authenticated(value: str | None) -> None:
    headers = [] if value is None else [("Authorization", value)]
    assert await SimpleAuthenticator().authenticate(make_request(*headers)) is None
    flow = UserAuth(SimpleAuthenticator(), CookieCache())
    with pytest.raises(GatewayError) as info:
        await flow.authenticate(make_request(*headers))
    assert info.value.status == 401
    assert info.value.message == "Authentication required"
    assert info.value.headers == [("WWW-Authenticate", "Basic")]


async def test_shared_password() -> None:
    auth = SimpleAuthenticator(password="pw")
    assert await auth.authenticate(make_request(basic("alice", "pw"))) == User("alice")
    assert await auth.authenticate(make_request(basic("alice", "bad"))) is None
    assert await auth.authenticate(make_request(basic("alice", "pw "))) is None
    assert await auth.authenticate(make_request(basic("alice", ""))) is None


def test_parse_cookies() -> None:
    assert parse_cookies(["a=1; b=2", "a=3;c"]) == {"a": "1", "b": "2"}
    assert parse_cookies(['x="quoted"; =nameless; ;;']) == {"x": "quoted"}
    assert parse_cookies([]) == {}


async def test_cookie_flow_and_expiry_with_fake_clock() -> None:
    clock = FakeClock()
    cache = CookieCache(300, clock=clock)
    assert cache.cookie_name.startswith("dask-gateway-") and len(cache.cookie_name) == 13 + 32
    assert CookieCache().cookie_name != cache.cookie_name  # random per process start
    flow = UserAuth(SimpleAuthenticator(), cache)

    first = await flow.authenticate(make_request(basic("alice", "x")))
    assert first.fresh and first.user == User("alice")
    response = flow.finish(make_request(), first, Response.json({}))
    (set_cookie,) = [v for k, v in response.headers if k == "Set-Cookie"]
    name_value, max_age, path = set_cookie.split("; ")
    name, value = name_value.split("=")
    assert name == cache.cookie_name and len(value) == 32
    assert max_age == "Max-Age=600" and path == "Path=/"

    # The cookie alone authenticates; nothing is added to the response on this path.
    cookie = ("Cookie", f"other=1; {name}={value}")
    again = await flow.authenticate(make_request(cookie))
    assert again.user == User("alice") and not again.fresh
    plain = flow.finish(make_request(cookie), again, Response.json({}))
    assert not [k for k, _ in plain.headers if k == "Set-Cookie"]

    # The same value is reused for the same user while valid (not refreshed on use).
    clock.now += 299
    second = await flow.authenticate(make_request(basic("alice", "y")))
    assert cache.issue(second.user) == value
    assert (await flow.authenticate(make_request(cookie))).user.name == "alice"

    # Expired: measured from the first issue.
    clock.now += 1
    with pytest.raises(GatewayError) as info:
        await flow.authenticate(make_request(cookie))
    assert info.value.status == 401
    fresh = await flow.authenticate(make_request(basic("alice", "x")))
    assert cache.issue(fresh.user) != value

    # Unknown or garbage cookie values fall through to the authenticator.
    for junk in (f"{name}=nope", f"{name}=", "garbage"):
        with pytest.raises(GatewayError):
            await flow.authenticate(make_request(("Cookie", junk)))


def test_cookie_cache_purges_expired_users() -> None:
    clock = FakeClock()
    cache = CookieCache(10, clock=clock)
    for i in range(50):
        cache.issue(User(f"u{i}"))
    assert len(cache) == 50
    clock.now += 10
    cache.issue(User("late"))
    assert len(cache) == 1
    with pytest.raises(ValueError):
        CookieCache(0)


async def test_pre_response_hook_runs_only_for_fresh_success() -> None:
    calls: list[str] = []

    class Negotiating(SimpleAuthenticator):
        scheme = "Negotiate"

        def pre_response(self, request: Request, user: User, response: Response) -> None:
            calls.append(user.name)
            response.headers.append(("WWW-Authenticate", "Negotiate abc"))

    flow = UserAuth(Negotiating(), CookieCache())
    result = await flow.authenticate(make_request(basic("carol", "x")))
    response = flow.finish(make_request(), result, Response.empty())
    assert calls == ["carol"]
    assert ("WWW-Authenticate", "Negotiate abc") in response.headers
    with pytest.raises(GatewayError) as info:
        await flow.authenticate(make_request())
    assert info.value.headers == [("WWW-Authenticate", "Negotiate")]


def test_cluster_token() -> None:
    token = "a" * 64
    assert cluster_token_matches(make_request(("Authorization", f"token {token}")), token)
    assert cluster_token_matches(make_request(("Authorization", f"Token  {token} ")), token)
    assert not cluster_token_matches(make_request(("Authorization", "token " + "b" * 64)), token)
    assert not cluster_token_matches(make_request(("Authorization", f"Basic {token}")), token)
    assert not cluster_token_matches(make_request(("Authorization", "token")), token)
    assert not cluster_token_matches(make_request(), token)
    assert not cluster_token_matches(make_request(("Authorization", "token ")), "")
    assert not cluster_token_matches(make_request(("Authorization", f"token {token}")), None)
    err = token_required()
    assert err.status == 401 and err.headers == [("WWW-Authenticate", "token")]
