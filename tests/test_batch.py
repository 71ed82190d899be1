"""``cis.dag.batch``: what a batch may carry, how readers unpack it (live, from the homeserver's
push, and from history), and that a batch never lets its sender say more than it could alone.
On the embedded homeserver and on Synapse."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cis_bot.matrix import events as ev
from cis_bot.matrix.batch import BATCH_TYPE, BATCHING, make_batch, unpack
from cis_bot.matrix.node import Node, outgoing
from cis_bot.matrix.outbox import Outgoing
from tests.support.client import CS, MatrixClient, q
from tests.support.nodes import (
    NodePlan,
    joined_members,
    plan_nodes,
    registration_files,
    room_events,
    wait_for,
)

#: The events' own time, fixed: built twice, an event compares equal to itself.
AT = 1_700_000_000_000


def claimed(task: str, run: str = "r1") -> ev.TaskClaimedContent:
    return ev.TaskClaimedContent(
        run_id=run, task_id=task, attempt=1, claimed_by="wa", session_id=f"{run}:{task}:1",
        timestamp=AT,
    )  # fmt: skip


def assigned(task: str, user: str, run: str = "r1") -> ev.TaskAssignedContent:
    return ev.TaskAssignedContent(
        run_id=run, task_id=task, attempt=1, assigned_to="wa", assigned_user=user,
        assigned_by="someone", agent="shell", lease_ms=1000,
        task=json.dumps({"id": task, "agent": "shell", "prompt": "true"}), timestamp=AT,
    )  # fmt: skip


def batch_content(*payloads: ev.EventContent) -> dict[str, Any]:
    return make_batch([outgoing(p) for p in payloads]).content


def raw_batch(content: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "type": BATCH_TYPE,
        "content": content,
        "sender": "@cis_coord:cis.local",
        "event_id": "$b",
        "room_id": "!r:cis.local",
        "origin_server_ts": 1234,
        **fields,
    }


def anything(event_type: str) -> bool:
    return True


# --- the catalogue and unpacking, no homeserver --------------------------------------------------


def test_only_the_run_logs_message_events_batch() -> None:
    for event_type, cls in ev.CATALOGUE.items():
        item = outgoing(_sample(cls), state_key="@w:cis.local" if cls.IS_STATE else None)
        control = cls in (ev.ControlRequestContent, ev.ControlReplyContent)
        expected = not (cls.IS_STATE or control or cls is ev.BatchContent)
        assert item.batchable is expected, event_type
    assert Outgoing("m.room.message", {"body": "x", "msgtype": "m.notice"}).batchable is False


def _sample(cls: type[ev.EventContent]) -> ev.EventContent:
    samples: dict[type[ev.EventContent], ev.EventContent] = {
        ev.TaskAssignedContent: assigned("t", "@w:cis.local"),
        ev.TaskClaimedContent: claimed("t"),
        ev.NodeHeartbeatContent: ev.NodeHeartbeatContent(
            node_id="w", agents=("shell",), max_workers=1, load=0, ttl_ms=1000
        ),
        ev.ControlRequestContent: ev.ControlRequestContent(
            request_id="x", action="cancel", node="n", run_id="r1", expires=1
        ),
        ev.ControlReplyContent: ev.ControlReplyContent(request_id="x", node="n", ok=True),
        ev.BatchContent: ev.BatchContent(
            events=(("cis.dag.task.claimed", claimed("t").content()),)
        ),
        ev.RunCreatedContent: ev.RunCreatedContent(
            run_id="r1", dag_name="d", spec="{}", mode="local", max_workers=1, coordinator="c"
        ),
        ev.SessionCreatedContent: ev.SessionCreatedContent(
            run_id="r1", session_id="r1:t:1", task_id="t", attempt=1, node="n"
        ),
        ev.SessionStateContent: ev.SessionStateContent(
            run_id="r1", session_id="r1:t:1", old_state="starting", new_state="running"
        ),
        ev.SessionOutputContent: ev.SessionOutputContent(
            run_id="r1", session_id="r1:t:1", tail="x", seq=1
        ),
        ev.SessionBlockedContent: ev.SessionBlockedContent(
            run_id="r1", session_id="r1:t:1", reason="why"
        ),
        ev.SessionCompletedContent: ev.SessionCompletedContent(
            run_id="r1", session_id="r1:t:1", task_id="t", attempt=1, status="completed"
        ),
        ev.RunCompletedContent: ev.RunCompletedContent(run_id="r1", status="completed"),
        ev.TaskCarriedContent: ev.TaskCarriedContent(run_id="r1", task_id="t", from_run="r0"),
        ev.TaskRollbackContent: ev.TaskRollbackContent(
            run_id="r1", task_id="t", attempt=2, commands=("undo",)
        ),
        ev.TaskApprovalRequestedContent: ev.TaskApprovalRequestedContent(run_id="r1", task_id="t"),
        ev.TaskApprovedContent: ev.TaskApprovedContent(run_id="r1", task_id="t"),
        ev.RunCancelledContent: ev.RunCancelledContent(run_id="r1"),
        ev.RunTakeoverContent: ev.RunTakeoverContent(
            run_id="r1", epoch=2, coordinator="c2", previous="@c:cis.local"
        ),
        ev.RunLeaseContent: ev.RunLeaseContent(node_id="c", runs={"r1": 1}, ttl_ms=5000),
        ev.WorkerCooldownContent: ev.WorkerCooldownContent(
            run_id="r1", worker="w", worker_user="@w:cis.local", failures=3, cooldown_ms=60_000
        ),
    }
    if cls in samples:
        return samples[cls]
    assert issubclass(cls, ev.TaskDecisionContent), cls
    return cls(run_id="r1", task_id="t", attempt=1)


def test_a_batch_unpacks_into_its_events_with_the_batchs_sender_and_ids_of_their_own() -> None:
    content = batch_content(claimed("a"), claimed("b"), assigned("c", "@w:cis.local"))
    events = unpack(raw_batch(content), anything)
    assert [e["type"] for e in events] == [
        "cis.dag.task.claimed",
        "cis.dag.task.claimed",
        "cis.dag.task.assigned",
    ]
    assert [e["event_id"] for e in events] == ["$b#0", "$b#1", "$b#2"]
    for event in events:
        assert event["sender"] == "@cis_coord:cis.local"
        assert (event["room_id"], event["origin_server_ts"]) == ("!r:cis.local", 1234)
    assert ev.decode(events[1]["type"], events[1]["content"]) == claimed("b")


@pytest.mark.parametrize(
    "entry",
    [
        {"type": "m.room.message", "content": {"msgtype": "m.text", "body": "hi"}},
        {"type": "m.room.power_levels", "content": {"users": {}}},
        {"type": ev.NodeHeartbeatContent.TYPE, "content": {"v": 1}},
        {"type": ev.ControlRequestContent.TYPE, "content": {"v": 1}},
        {"type": BATCH_TYPE, "content": {"v": 1, "events": []}},
        {"type": "cis.dag.task.unheard_of", "content": {"v": 1}},
        {"type": 7, "content": {}},
        {"type": "cis.dag.task.claimed", "content": "not an object"},
        "not an object",
    ],
)
def test_a_batch_carrying_anything_but_run_log_events_is_dropped_whole(entry: Any) -> None:
    content = batch_content(claimed("a"))
    content["events"].append(entry)
    assert unpack(raw_batch(content), anything) == []
    with pytest.raises(ev.InvalidEvent, match=r"events\["):
        ev.decode(BATCH_TYPE, content)


@pytest.mark.parametrize(
    "content",
    [
        {"v": 1, "events": []},
        {"v": 1},
        {"v": 2, "events": [{"type": "cis.dag.task.claimed", "content": {}}]},
        "a string",
    ],
)
def test_malformed_batches_are_dropped(content: Any) -> None:
    assert unpack(raw_batch(content), anything) == []


def test_an_event_its_sender_may_not_post_is_dropped_alone() -> None:
    content = batch_content(claimed("a"), assigned("b", "@w:cis.local"), claimed("c"))
    events = unpack(raw_batch(content), lambda t: t != ev.TaskAssignedContent.TYPE)
    assert [e["event_id"] for e in events] == ["$b#0", "$b#2"]


def test_a_full_batch_stays_within_the_event_size_bound() -> None:
    items = [outgoing(assigned(f"task-{i}", "@w:cis.local")) for i in range(500)]
    taken, size = [], 0
    for item in items:
        if size + BATCHING.size(item) > BATCHING.limit:
            break
        size += BATCHING.size(item)
        taken.append(item)
    assert 20 < len(taken) < len(items)
    carrier = make_batch(taken)
    assert ev.decode(BATCH_TYPE, carrier.content)  # within MAX_CONTENT_BYTES, as read back
    assert len(json.dumps(carrier.content, ensure_ascii=False).encode()) <= ev.MAX_CONTENT_BYTES


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(
    event_type=st.sampled_from(sorted(ev.RUN_LOG_TYPES)) | st.text(min_size=1),
    content=st.dictionaries(st.text(), JSON, max_size=6),
)
def test_an_events_batch_size_is_what_it_encodes_to_measured_or_not(
    event_type: str, content: dict[str, Any]
) -> None:
    """The size batching counts is the entry's encoded bytes, whether ``outgoing`` measured the
    content already or batching measures it."""
    entry = {"type": event_type, "content": content}
    exact = len(json.dumps(entry, ensure_ascii=False).encode()) + 2
    assert BATCHING.size(Outgoing(event_type, content)) == exact
    measured = len(json.dumps(content, ensure_ascii=False).encode())
    assert BATCHING.size(Outgoing(event_type, content, content_bytes=measured)) == exact


def test_outgoing_measures_the_content_once_and_batching_believes_it() -> None:
    item = outgoing(assigned("a", "@w:cis.local"))
    assert item.content_bytes == len(json.dumps(item.content, ensure_ascii=False).encode())


# --- on a homeserver -----------------------------------------------------------------------------


@attrs.define
class Heard:
    """What a node's listeners are given."""

    events: list[dict[str, Any]] = attrs.Factory(list)

    async def __call__(self, room_id: str, raw: Mapping[str, Any]) -> None:
        if str(raw.get("type", "")).startswith("cis."):
            self.events.append(dict(raw))

    def ids(self, type_: str = ev.TaskClaimedContent.TYPE) -> list[str]:
        return [e["content"]["task_id"] for e in self.events if e["type"] == type_]


async def started_node(hs: Any, plan: NodePlan, allowed_user: str) -> Node:
    identity = attrs.evolve(plan.identity, homeserver=hs.base_url, allowed_users=(allowed_user,))
    node = Node(identity)
    await node.start()
    return node


@pytest.mark.slow
async def test_a_nodes_batches_unpack_live_and_in_history(
    homeserver_factory: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    (plan,) = plan_nodes(tmp_path, "cis.local", "coord")
    hs = homeserver_factory(appservice_files=registration_files([plan]))
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    node = await started_node(hs, plan, admin_id)
    heard = Heard()
    node.add_listener(heard)
    try:
        room = await node.create_room(name="runs", invite=(admin_id,))
        await admin.join(room)
        outbox = node.outbox(room)
        names = [f"t{i}" for i in range(30)]
        for name in names:  # posted at once: they queue up together
            outbox.post(outgoing(claimed(name)))
        assert await outbox.flush(timeout=30)
        assert outbox.batches >= 1 and outbox.sent == len(names)
        await wait_for(lambda: asyncio.sleep(0, len(heard.ids()) == len(names)), what="the push")
        assert heard.ids() == names
        assert all(e["sender"] == node.user_id for e in heard.events)
        assert all("#" in e["event_id"] for e in heard.events)

        history = [e async for e in node.history(room)]
        assert [
            e["content"]["task_id"] for e in history if e["type"] == "cis.dag.task.claimed"
        ] == names
        raw = await room_events(admin, room, raw=True)
        assert [e["type"] for e in raw if e["type"].startswith("cis.")] == [BATCH_TYPE]
        assert outbox.batches == 1
        await outbox.close()
    finally:
        await node.stop()


@pytest.mark.slow
async def test_a_batch_cannot_say_what_its_sender_could_not_post_alone(
    homeserver_factory: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """An operator opened ``cis.dag.batch`` to members but not the run log: a member at power 0
    can post a batch, and every run-log event in it is dropped, live and in history; in a room a
    node creates, the homeserver refuses the batch itself."""
    (plan,) = plan_nodes(tmp_path, "cis.local", "wa")
    hs = homeserver_factory(appservice_files=registration_files([plan]))
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    mallory_id, token = await hs.create_user("mallory")
    mallory = MatrixClient(http, hs.base_url, user_id=mallory_id, token=token)
    node = await started_node(hs, plan, admin_id)
    heard = Heard()
    node.add_listener(heard)
    try:
        levels = {t: 50 for t in ev.RUN_LOG_TYPES} | {BATCH_TYPE: 0}
        room = await admin.create_room(
            name="runs",
            invite=[node.user_id, mallory_id],
            power_level_content_override={"users": {node.user_id: 50}, "events": levels},
        )
        await mallory.join(room)
        await wait_for(lambda: _joined(admin, room, node.user_id), what="the node to join")
        forged = batch_content(assigned("smuggled", node.user_id), claimed("smuggled"))
        await mallory.send(room, forged, event_type=BATCH_TYPE)
        # The admin (power 100) may post both: the same batch from it is unpacked.
        await admin.send(room, batch_content(claimed("by-admin")), event_type=BATCH_TYPE)
        await wait_for(lambda: asyncio.sleep(0, "by-admin" in heard.ids()), what="the push")
        assert [e["sender"] for e in heard.events] == [admin_id]
        history = [e async for e in node.history(room) if e["type"].startswith("cis.dag.")]
        assert [(e["sender"], e["content"]["task_id"]) for e in history] == [(admin_id, "by-admin")]

        own = await node.create_room(name="node's own", invite=(mallory_id,))
        await mallory.join(own)
        answer = await mallory.request(
            "PUT", f"{CS}/rooms/{q(own)}/send/{q(BATCH_TYPE)}/{mallory.next_txn()}", forged
        )
        assert answer.status == 403, answer.body
    finally:
        await node.stop()


async def _joined(admin: MatrixClient, room: str, user_id: str) -> bool:
    return user_id in await joined_members(admin, room)


async def test_a_batch_met_while_the_homeserver_is_away_is_dropped_and_the_node_hears_on(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A batch pushed to the node, its homeserver gone before the node could read who may post
    what: a few tries, then dropped with a warning; the node's intake goes on (it died there)."""
    from cis_bot.homeserver.server import EmbeddedHomeserver

    (plan,) = plan_nodes(tmp_path, "cis.local", "wa")
    hs = EmbeddedHomeserver(state_dir=tmp_path / "hs", appservice_files=registration_files([plan]))
    await hs.start()
    node = await started_node(hs, plan, "@admin:cis.local")
    heard = Heard()
    node.add_listener(heard)
    try:
        await hs.stop()  # away for good: reading the room's power levels fails
        identity = plan.identity
        url = f"http://127.0.0.1:{identity.listen_port}/_matrix/app/v1/transactions"
        headers = {"Authorization": f"Bearer {identity.hs_token}"}
        room = "!away:cis.local"
        batch = {
            "type": BATCH_TYPE, "room_id": room, "sender": node.user_id, "event_id": "$b",
            "content": batch_content(claimed("lost")),
        }  # fmt: skip
        plain = {
            "type": ev.TaskClaimedContent.TYPE, "room_id": room, "sender": node.user_id,
            "event_id": "$p", "content": claimed("heard").content(),
        }  # fmt: skip
        for txn, event in (("1", batch), ("2", plain)):
            async with http.put(f"{url}/{txn}", json={"events": [event]}, headers=headers) as r:
                assert r.status == 200
        await wait_for(lambda: asyncio.sleep(0, heard.ids() == ["heard"]), what="the intake")
    finally:
        await node.stop()
