"""Login rate limiting (Synapse's rc_login): the leaky bucket on a clock the test drives, the
three login limiters through a real server, and homeserver.toml, which configures them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.errors import InputError
from cis_bot.homeserver.config import HomeserverConfig
from cis_bot.homeserver.errors import MatrixError
from cis_bot.homeserver.ratelimiting import (
    SWEEP_AT,
    LoginRatelimits,
    Ratelimiter,
    RatelimitSettings,
)
from cis_bot.homeserver.server import EmbeddedHomeserver


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_fills_drains_and_says_when() -> None:
    clock = Clock()
    limiter = Ratelimiter(RatelimitSettings(per_second=0.5, burst_count=3), clock)
    for _ in range(3):
        limiter.ratelimit("k")
    with pytest.raises(MatrixError) as refused:
        limiter.ratelimit("k")
    assert refused.value.status == 429 and refused.value.errcode == "M_LIMIT_EXCEEDED"
    assert refused.value.extra["retry_after_ms"] == 2000  # one action leaks out every 2 s
    limiter.ratelimit("other")  # keys are independent
    clock.now += 1.9
    assert limiter.can_do_action("k") == (False, pytest.approx(1002.0))
    clock.now += 0.1
    limiter.ratelimit("k")
    with pytest.raises(MatrixError):
        limiter.ratelimit("k")
    clock.now += 60  # drained completely: a full burst again
    for _ in range(3):
        limiter.ratelimit("k")


def test_checking_without_counting() -> None:
    clock = Clock()
    limiter = Ratelimiter(RatelimitSettings(per_second=1, burst_count=1), clock)
    for _ in range(5):
        limiter.ratelimit("k", update=False)
    limiter.ratelimit("k")
    with pytest.raises(MatrixError):
        limiter.ratelimit("k", update=False)


def test_rotating_keys_do_not_grow_memory() -> None:
    clock = Clock()
    limiter = Ratelimiter(RatelimitSettings(per_second=1, burst_count=5), clock)
    for n in range(3 * SWEEP_AT):
        limiter.ratelimit(n)
        clock.now += 0.01
    assert len(limiter._actions) <= SWEEP_AT


# --- through a real server ----------------------------------------------------------------


async def login(
    http: aiohttp.ClientSession, hs: EmbeddedHomeserver, user: str, password: str
) -> tuple[int, Any]:
    body = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
    }
    async with http.post(f"{hs.base_url}/_matrix/client/v3/login", json=body) as response:
        return response.status, await response.json()


def limits(**changed: RatelimitSettings) -> HomeserverConfig:
    wide = RatelimitSettings(per_second=1000, burst_count=1000)
    settings = {"address": wide, "account": wide, "failed_attempts": wide, **changed}
    return HomeserverConfig(rc_login=LoginRatelimits(**settings))


async def started(tmp_path: Path, config: HomeserverConfig) -> EmbeddedHomeserver:
    hs = EmbeddedHomeserver(state_dir=tmp_path / "state", config=config)
    await hs.start()
    return hs


async def test_every_attempt_counts_per_address(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    hs = await started(tmp_path, limits(address=RatelimitSettings(0.001, 3)))
    try:
        _, password = await hs.add_user("alice")
        assert (await login(http, hs, "alice", password))[0] == 200
        assert (await login(http, hs, "nobody", "x"))[0] == 403
        assert (await login(http, hs, "alice", "wrong"))[0] == 403
        status, body = await login(http, hs, "alice", password)
        assert status == 429 and body["errcode"] == "M_LIMIT_EXCEEDED", body
    finally:
        await hs.stop()


async def test_successful_logins_count_per_account(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    hs = await started(tmp_path, limits(account=RatelimitSettings(0.001, 2)))
    try:
        _, alice = await hs.add_user("alice")
        _, bob = await hs.add_user("bob")
        assert (await login(http, hs, "alice", alice))[0] == 200
        assert (await login(http, hs, "@alice:cis.local", alice))[0] == 200
        status, body = await login(http, hs, "ALICE", alice)
        assert status == 429 and body["retry_after_ms"] > 0, body
        assert (await login(http, hs, "bob", bob))[0] == 200
    finally:
        await hs.stop()


async def test_while_failures_are_limited_even_the_right_password_waits(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """As in Synapse: the failed-attempts limit is checked before the password."""
    hs = await started(tmp_path, limits(failed_attempts=RatelimitSettings(0.001, 2)))
    try:
        _, password = await hs.add_user("alice")
        _, other = await hs.add_user("bob")
        assert [(await login(http, hs, "alice", "wrong"))[0] for _ in range(3)] == [403, 403, 429]
        status, body = await login(http, hs, "alice", password)
        assert status == 429 and body["retry_after_ms"] > 900_000, body
        assert (await login(http, hs, "bob", other))[0] == 200  # another account is not held up
    finally:
        await hs.stop()


# --- homeserver.toml ----------------------------------------------------------------------


def test_config_file_is_optional_and_read(tmp_path: Path) -> None:
    assert HomeserverConfig.load(tmp_path / "absent.toml") == HomeserverConfig()
    path = tmp_path / "homeserver.toml"
    path.write_text("[rc_login.failed_attempts]\nper_second = 2\nburst_count = 9\n")
    loaded = HomeserverConfig.load(path)
    assert loaded.rc_login.failed_attempts == RatelimitSettings(per_second=2.0, burst_count=9)
    assert loaded.rc_login.address == LoginRatelimits().address


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[rc_logins]\n", "rc_logins"),
        ("[rc_login.adress]\nper_second = 1\n", "rc_login.adress"),
        ("[rc_login.address]\nper_second = -1\n", "rc_login.address.per_second"),
        ("[rc_login.address]\nper_second = inf\n", "rc_login.address.per_second"),
        ('[rc_login.account]\nburst_count = "5"\n', "rc_login.account.burst_count"),
        ("rc_login = 5\n", "rc_login"),
    ],
)
async def test_bad_config_is_an_input_error_naming_the_key(
    tmp_path: Path, text: str, key: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "homeserver.toml").write_text(text)
    with pytest.raises(InputError) as error:
        await EmbeddedHomeserver(state_dir=state).start()
    assert error.value.key == key
    assert str(state / "homeserver.toml") in str(error.value)
    assert "\n" not in str(error.value)  # one line for the CLI
