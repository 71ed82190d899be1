"""Bad input gets a 4xx Matrix error, never a 500: random JSON bodies (with lone surrogates,
integers beyond SQLite's range, deep nesting), query strings and path segments thrown at the
endpoints clients use, and requests that fail half-way leave nothing behind; against one
in-process server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis_bot.homeserver.config import HomeserverConfig
from cis_bot.homeserver.ratelimiting import LoginRatelimits, RatelimitSettings
from cis_bot.homeserver.server import EmbeddedHomeserver
from tests.support.appservice import prefixed_registration

# Lone surrogates survive json.dumps as "\\ud800" escapes; UTF-8 cannot encode them.
texts = st.text(
    alphabet=st.sampled_from(["a", "\ud800", "\udfff", "\n", "\x00", "é", "😀"]) | st.characters(),
    max_size=20,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**53, 2**63 - 1, 2**63, -(2**63) - 1, 10**30])
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "name",
        "topic",
        "preset",
        "invite",
        "initial_state",
        "room_alias_name",
        "power_level_content_override",
        "room_version",
        "creation_content",
        "visibility",
        "msgtype",
        "body",
        "membership",
        "user_id",
        "reason",
        "users",
        "events",
        "ban",
        "identifier",
        "type",
        "password",
        "username",
        "room",
        "timeline",
        "limit",
        "types",
        "not_types",
        "rooms",
        "senders",
        "state",
        "event_fields",
        "alias",
        "displayname",
        "typing",
        "timeout",
        "m.fully_read",
        "m.read",
        "is_direct",
        "redacts",
    ]
)
bodies = st.one_of(
    json_values,
    st.dictionaries(keys, json_values, max_size=6),
)
segments = st.text(min_size=0, max_size=12).map(lambda s: quote(s, safe=""))


class Rig:
    def __init__(
        self,
        hs: EmbeddedHomeserver,
        http: aiohttp.ClientSession,
        token: str,
        room_id: str,
        event_id: str,
    ) -> None:
        self.hs = hs
        self.http = http
        self.token = token
        self.room_id = room_id
        self.event_id = event_id

    async def status(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> int:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with self.http.request(
            method,
            self.hs.base_url + path,
            data=data,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as response:
            payload = await response.read()
            if response.status >= 500:
                raise AssertionError(f"{method} {path} -> {response.status} {payload[:300]!r}")
            if response.status >= 400:
                decoded = json.loads(payload)
                assert isinstance(decoded.get("errcode"), str), payload
                assert isinstance(decoded.get("error"), str), payload
            return response.status

    async def json(self, method: str, path: str) -> Any:
        async with self.http.request(
            method, self.hs.base_url + path, headers={"Authorization": f"Bearer {self.token}"}
        ) as response:
            assert response.status == 200, await response.read()
            return await response.json()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One server for the whole module, run on its own loop in this thread's event loop
    through the helper below (hypothesis drives synchronous test functions)."""
    loop = asyncio.new_event_loop()

    async def setup() -> Rig:
        # Logins opened wide: the fuzz posts to /login far faster than rc_login allows.
        wide = RatelimitSettings(per_second=1e6, burst_count=10**6)
        hs = EmbeddedHomeserver(
            state_dir=tmp_path_factory.mktemp("fuzz") / "state",
            config=HomeserverConfig(rc_login=LoginRatelimits(wide, wide, wide)),
        )
        await hs.start()
        http = aiohttp.ClientSession()
        _, password = await hs.add_user("fuzzer")
        login = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "fuzzer"},
            "password": password,
        }
        async with http.post(f"{hs.base_url}/_matrix/client/v3/login", json=login) as r:
            token = (await r.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(
            f"{hs.base_url}/_matrix/client/v3/createRoom", json={"name": "fuzz"}, headers=headers
        ) as r:
            room_id = (await r.json())["room_id"]
        async with http.put(
            f"{hs.base_url}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/t0",
            json={"msgtype": "m.text", "body": "x"},
            headers=headers,
        ) as r:
            event_id = (await r.json())["event_id"]
        return Rig(hs, http, token, room_id, event_id)

    built = loop.run_until_complete(setup())
    yield loop, built

    async def teardown() -> None:
        await built.http.close()
        await built.hs.stop()

    loop.run_until_complete(teardown())
    loop.close()


def _paths(rig: Rig) -> list[tuple[str, str]]:
    r = quote(rig.room_id, safe="")
    e = quote(rig.event_id, safe="")
    return [
        ("POST", "/_matrix/client/v3/createRoom"),
        ("PUT", f"/_matrix/client/v3/rooms/{r}/send/m.room.message/fz"),
        ("PUT", f"/_matrix/client/v3/rooms/{r}/send/org.example.custom/fz2"),
        ("PUT", f"/_matrix/client/v3/rooms/{r}/state/m.room.power_levels/"),
        ("PUT", f"/_matrix/client/v3/rooms/{r}/state/m.room.name"),
        ("PUT", f"/_matrix/client/v3/rooms/{r}/state/m.room.member/%40fuzzer%3Acis.local"),
        ("PUT", f"/_matrix/client/v3/rooms/{r}/state/m.room.canonical_alias"),
        ("POST", f"/_matrix/client/v3/rooms/{r}/invite"),
        ("POST", f"/_matrix/client/v3/rooms/{r}/kick"),
        ("POST", f"/_matrix/client/v3/rooms/{r}/ban"),
        ("POST", f"/_matrix/client/v3/rooms/{r}/join"),
        ("PUT", f"/_matrix/client/v3/rooms/{r}/redact/{e}/fz3"),
        ("PUT", f"/_matrix/client/v3/rooms/{r}/typing/%40fuzzer%3Acis.local"),
        ("POST", f"/_matrix/client/v3/rooms/{r}/receipt/m.read/{e}"),
        ("POST", f"/_matrix/client/v3/rooms/{r}/read_markers"),
        ("POST", "/_matrix/client/v3/user/%40fuzzer%3Acis.local/filter"),
        ("PUT", "/_matrix/client/v3/user/%40fuzzer%3Acis.local/account_data/org.x"),
        ("PUT", "/_matrix/client/v3/profile/%40fuzzer%3Acis.local/displayname"),
        ("PUT", "/_matrix/client/v3/directory/room/%23fz%3Acis.local"),
        ("POST", "/_matrix/client/v3/login"),
        ("POST", "/_matrix/client/v3/register"),
        ("PUT", "/_matrix/client/v3/pushrules/global/override/fz"),
        ("POST", "/_matrix/client/v3/publicRooms"),
    ]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(choice=st.integers(min_value=0, max_value=10_000), body=bodies)
def test_random_bodies(rig: Any, choice: int, body: Any) -> None:
    loop, built = rig
    paths = _paths(built)
    method, path = paths[choice % len(paths)]
    loop.run_until_complete(built.status(method, path, body))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(a=segments, b=segments, query=st.text(max_size=30))
def test_random_paths_and_queries(rig: Any, a: str, b: str, query: str) -> None:
    loop, built = rig
    q = quote(query, safe="=&")
    targets = [
        ("GET", f"/_matrix/client/v3/rooms/{a}/state/{b}?{q}"),
        ("GET", f"/_matrix/client/v3/rooms/{a}/messages?{q}"),
        ("GET", f"/_matrix/client/v3/sync?{q}&timeout=0"),
        ("GET", f"/_matrix/client/v3/rooms/{a}/event/{b}"),
        ("GET", f"/_matrix/client/v3/directory/room/{a}"),
        ("GET", f"/_matrix/client/v3/profile/{a}/{b}"),
        ("POST", f"/_matrix/client/v3/join/{a}?{q}"),
        ("GET", f"/_matrix/media/v3/download/{a}/{b}"),
        ("GET", f"/_matrix/client/v3/user/{a}/filter/{b}"),
        ("PUT", f"/_matrix/client/v3/rooms/{a}/send/{b}/x"),
    ]
    for method, path in targets:
        body = {"msgtype": "m.text", "body": "x"} if method != "GET" else None
        loop.run_until_complete(built.status(method, path, body))


def test_non_json_bodies(rig: Any) -> None:
    loop, built = rig
    for raw in (b"", b"{", b"[1,2]", b'"s"', b"\xff\xfe", b"NaN", b'{"a": NaN}', b"{}" * 3):
        for method, path in _paths(built):
            loop.run_until_complete(built.status(method, path, raw=raw))


HUGE_NUMBERS = [
    "99999999999999999999999",
    "-99999999999999999999999",
    "9223372036854775808",
    "18446744073709551616",
    "1e400",
    "0x10",
    "%F0%9F%98%80",
]


def test_numbers_out_of_range_in_queries_and_tokens(rig: Any) -> None:
    """Every integer a query carries (limits, timeouts, stream tokens, filter ids) may be far
    outside SQLite's 64-bit INTEGER: 4xx, never an overflow."""
    loop, built = rig
    r = quote(built.room_id, safe="")
    e = quote(built.event_id, safe="")
    for n in HUGE_NUMBERS:
        for method, path in (
            ("GET", f"/_matrix/client/v3/sync?timeout=0&since=s{n}"),
            ("GET", f"/_matrix/client/v3/sync?timeout=0&since=s1_{n}"),
            ("GET", f"/_matrix/client/v3/sync?timeout={n}&since=s1_0"),
            ("GET", f"/_matrix/client/v3/sync?timeout=0&filter={n}"),
            ("GET", f"/_matrix/client/v3/rooms/{r}/messages?dir=b&from=s{n}"),
            ("GET", f"/_matrix/client/v3/rooms/{r}/messages?dir=b&from=t1-{n}"),
            ("GET", f"/_matrix/client/v3/rooms/{r}/messages?dir=f&to=s{n}"),
            ("GET", f"/_matrix/client/v3/rooms/{r}/messages?dir=b&limit={n}"),
            ("GET", f"/_matrix/client/v3/rooms/{r}/context/{e}?limit={n}"),
            ("GET", f"/_matrix/client/v3/publicRooms?limit={n}"),
            ("GET", f"/_matrix/client/v3/user/%40fuzzer%3Acis.local/filter/{n}"),
            ("PUT", f"/_matrix/client/v3/rooms/{r}/send/m.room.message/big{n}?ts={n}"),
        ):
            body = {"msgtype": "m.text", "body": "x"} if method == "PUT" else None
            loop.run_until_complete(built.status(method, path, body))
    for limit in (2**63, 10**30, -(2**63) - 1):
        for key in ("timeline", "state", "ephemeral", "account_data"):
            query = quote(json.dumps({"room": {key: {"limit": limit}}}), safe="")
            loop.run_until_complete(
                built.status("GET", f"/_matrix/client/v3/sync?timeout=0&filter={query}")
            )


def test_json_that_cannot_be_stored_or_sent_back(rig: Any) -> None:
    """Lone surrogates, numbers beyond a double and deep nesting: 400 M_NOT_JSON everywhere,
    /login included, with nothing stored (a surrogate in account data once broke /sync)."""
    loop, built = rig
    deep = b"[" * 100_000 + b"]" * 100_000
    raws = (
        b'{"password": "\\ud800", "type": "m.login.password"}',
        b'{"body": "\\udfff", "msgtype": "m.text"}',
        b'{"\\ud800": 1}',
        b'{"name": "\\ud83d"}',
        b'{"a": 1e400}',
        b'{"a": -1e400}',
        deep,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}",
    )
    for raw in raws:
        for method, path in _paths(built):
            status = loop.run_until_complete(built.status(method, path, raw=raw))
            assert status == 400, (method, path, raw[:40])
    status = loop.run_until_complete(
        built.status("GET", "/_matrix/client/v3/sync?timeout=0&filter=" + quote('{"\\ud800":1}'))
    )
    assert status == 400
    assert loop.run_until_complete(built.status("GET", "/_matrix/client/v3/sync?timeout=0")) == 200


def _row_counts(hs: EmbeddedHomeserver) -> dict[str, int]:
    assert hs.hs is not None
    conn = hs.hs.store.conn
    return {
        table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        for table in ("rooms", "events", "room_aliases", "current_state", "current_membership")
    }


def test_failed_create_room_leaves_nothing_behind(rig: Any) -> None:
    """Each of these fails after the room id is chosen (an event too large, an invite the
    rules refuse): no room, no event, no alias may remain, in the database or in memory."""
    loop, built = rig
    before = _row_counts(built.hs)
    joined = loop.run_until_complete(built.json("GET", "/_matrix/client/v3/joined_rooms"))
    failures = [
        {"name": "n" * 70_000, "room_alias_name": "half_built"},
        {"topic": "t" * 70_000},
        {"room_alias_name": "half_built2", "creation_content": {"x": "c" * 70_000}},
        {
            "room_alias_name": "half_built3",
            "initial_state": [{"type": "org.example.big", "content": {"b": "x" * 70_000}}],
        },
        {
            "room_alias_name": "half_built4",
            "room_version": "10",  # v12 creators outrank any level
            "invite": ["@someone:cis.local"],
            "power_level_content_override": {"invite": 101},
        },
        {
            "preset": "trusted_private_chat",
            "invite": ["@x:cis.local"],
            "creation_content": {"additional_creators": 5},
        },
    ]
    for config in failures:
        status = loop.run_until_complete(
            built.status("POST", "/_matrix/client/v3/createRoom", config)
        )
        assert 400 <= status < 500, config
    assert _row_counts(built.hs) == before
    after = loop.run_until_complete(built.json("GET", "/_matrix/client/v3/joined_rooms"))
    assert after == joined
    # The aliases are free: a room that succeeds may take them.
    for alias in ("half_built", "half_built2", "half_built3", "half_built4"):
        status = loop.run_until_complete(
            built.status("POST", "/_matrix/client/v3/createRoom", {"room_alias_name": alias})
        )
        assert status == 200


async def test_appservice_timestamps_stay_canonical(tmp_path: Path) -> None:
    """An appservice may set origin_server_ts with ?ts=, but only to a canonical JSON integer
    (it goes into the PDU); larger values fit SQLite and must still be refused."""
    registration = prefixed_registration("ts", None, "cis.local", "ts_")
    hs = EmbeddedHomeserver(
        state_dir=tmp_path / "state",
        appservice_files=[registration.write(tmp_path / "appservices")],
    )
    await hs.start()
    headers = {"Authorization": f"Bearer {registration.as_token}"}
    try:
        async with aiohttp.ClientSession(base_url=hs.base_url, headers=headers) as http:
            async with http.post("/_matrix/client/v3/createRoom", json={}) as response:
                room_id = (await response.json())["room_id"]
            send = f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/m.room.message"
            body = {"msgtype": "m.text", "body": "x"}
            for n, (ts, status) in enumerate(((2**53 - 1, 200), (2**53, 400), (2**63, 400))):
                async with http.put(f"{send}/t{n}", params={"ts": str(ts)}, json=body) as response:
                    answer = await response.json()
                    assert response.status == status, answer
                    if status == 400:
                        assert answer["errcode"] == "M_INVALID_PARAM"
    finally:
        await hs.stop()
