"""Room servlets (synapse/rest/client/room.py, directory.py, receipts.py, read_marker.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.errors import (
    INVALID_PARAM,
    MISSING_PARAM,
    NOT_FOUND,
    MatrixError,
    bad_request,
    forbidden,
    not_found,
)
from cis_bot.homeserver.filtering import EventFilter, validate_filter
from cis_bot.homeserver.handlers.tokens import is_pagination_token, parse_pagination_token
from cis_bot.homeserver.ids import CANONICALJSON_MAX_INT, parse_user_id
from cis_bot.homeserver.rest.base import parse_json
from cis_bot.homeserver.rest.transactions import idempotent as _txn

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.rest.base import RestRequest, Router

Result = tuple[int, Any]
MAX_TYPING_TIMEOUT = 120_000  # Synapse: "stop people from setting silly typing timeouts"


def _appservice_ts(request: RestRequest, requester: Requester) -> int | None:
    """``?ts=``: an appservice may set origin_server_ts (a canonical JSON integer)."""
    if requester.appservice is None:
        return None
    ts = request.integer("ts")
    if ts is not None and ts > CANONICALJSON_MAX_INT:
        raise bad_request("Query parameter 'ts' is out of range.", INVALID_PARAM)
    return ts


async def create_room(request: RestRequest, txn_id: str | None = None) -> Result:
    requester = request.auth()
    body = await request.json()

    async def compute() -> Result:
        room_id = request.hs.room_creation.create_room(requester, body)
        return 200, {"room_id": room_id}

    return await _txn(request, txn_id, compute)


async def send_event(
    request: RestRequest, room_id: str, event_type: str, txn_id: str | None = None
) -> Result:
    requester = request.auth()
    content = await request.json()
    ts = _appservice_ts(request, requester)
    event = request.hs.events.send(requester, room_id, event_type, content, txn_id=txn_id, ts=ts)
    return 200, {"event_id": event.event_id}


async def redact(
    request: RestRequest, room_id: str, event_id: str, txn_id: str | None = None
) -> Result:
    requester = request.auth()
    content = await request.json()
    event = request.hs.events.send(
        requester, room_id, ev.REDACTION, content, txn_id=txn_id, redacts=event_id
    )
    return 200, {"event_id": event.event_id}


async def get_state_event(
    request: RestRequest, room_id: str, event_type: str, state_key: str = ""
) -> Result:
    requester = request.auth()
    fmt = request.string("format", "content", allowed=("content", "event"))
    hs = request.hs
    room, visible_upto = hs.rooms.check_can_read(room_id, requester.user_id)
    if visible_upto is None:
        event = room.state.get((event_type, state_key))
    else:
        ids = hs.store.state_ids_at(room_id, visible_upto)
        event_id = ids.get((event_type, state_key))
        event = hs.store.get_event(event_id) if event_id else None
    if event is None:
        raise not_found("Event not found.")
    if fmt == "event":
        return 200, hs.serializer.client_event(event, "v2")
    return 200, event.visible_content(room.version)


async def put_state_event(
    request: RestRequest, room_id: str, event_type: str, state_key: str = ""
) -> Result:
    requester = request.auth()
    content = await request.json()
    hs = request.hs
    if event_type == ev.MEMBER:
        membership = content.get("membership")
        if not isinstance(membership, str):
            raise bad_request("Invalid membership (must be a string)")
        event = hs.members.update_membership(
            requester, room_id, state_key, membership, content=content
        )
    else:
        ts = _appservice_ts(request, requester)
        event = hs.events.send(requester, room_id, event_type, content, state_key=state_key, ts=ts)
    return 200, {"event_id": event.event_id}


async def get_state(request: RestRequest, room_id: str) -> Result:
    requester = request.auth()
    hs = request.hs
    room, visible_upto = hs.rooms.check_can_read(room_id, requester.user_id)
    events = _state_events(request, room_id, room, visible_upto)
    return 200, [hs.serializer.client_event(e) for e in events]


def _state_events(
    request: RestRequest, room_id: str, room: Any, visible_upto: int | None
) -> list[ev.Event]:
    hs = request.hs
    if visible_upto is None:
        state = dict(room.state)
    else:
        ids = hs.store.state_ids_at(room_id, visible_upto)
        found = hs.store.get_events(ids.values())
        state = {k: found[v] for k, v in ids.items() if v in found}
    return [state[key] for key in sorted(state)]


async def get_members(request: RestRequest, room_id: str) -> Result:
    requester = request.auth()
    hs = request.hs
    room, visible_upto = hs.rooms.check_can_read(room_id, requester.user_id)
    at = request.string("at")
    if at is not None:
        position = parse_pagination_token(at)
        visible_upto = position if visible_upto is None else min(position, visible_upto)
    membership = request.string("membership")
    not_membership = request.string("not_membership")
    chunk = []
    for event in _state_events(request, room_id, room, visible_upto):
        if event.type != ev.MEMBER:
            continue
        value = event.content.get("membership")
        if (membership and value != membership) or (not_membership and value == not_membership):
            continue
        chunk.append(hs.serializer.client_event(event))
    return 200, {"chunk": chunk}


async def joined_members(request: RestRequest, room_id: str) -> Result:
    requester = request.auth()
    hs = request.hs
    room = hs.rooms.get(room_id)
    if room is None or (
        room.membership(requester.user_id) != "join" and requester.appservice is None
    ):
        raise forbidden(f"User {requester.user_id} not in room {room_id}")
    joined: dict[str, Any] = {}
    for user_id in sorted(room.member_ids("join")):
        content = room.state[(ev.MEMBER, user_id)].content
        joined[user_id] = {
            "display_name": content.get("displayname"),
            "avatar_url": content.get("avatar_url"),
        }
    return 200, {"joined": joined}


async def joined_rooms(request: RestRequest) -> Result:
    requester = request.auth()
    return 200, {"joined_rooms": request.hs.rooms.joined_rooms(requester.user_id)}


async def messages(request: RestRequest, room_id: str) -> Result:
    requester = request.auth()
    hs = request.hs
    direction = request.string("dir", "b", allowed=("b", "f"))
    limit = request.integer("limit", 10)
    assert limit is not None
    raw_filter = request.string("filter")
    event_filter = EventFilter()
    if raw_filter:
        parsed = parse_json(raw_filter)
        if not isinstance(parsed, dict):
            raise bad_request("Invalid filter JSON", "M_NOT_JSON")
        validate_filter({"room": {"timeline": parsed}})
        event_filter = EventFilter.from_json(parsed)
    start_token = request.string("from")
    end_token = request.string("to")
    for name, token in (("from", start_token), ("to", end_token)):
        if token is not None and not is_pagination_token(token):
            raise bad_request(f"'{name}' parameter is invalid")
    result = hs.pagination.messages(
        requester,
        room_id,
        from_token=start_token,
        to_token=end_token,
        direction=direction or "b",
        limit=limit,
        event_filter=event_filter,
    )
    return 200, result


async def get_event(request: RestRequest, room_id: str, event_id: str) -> Result:
    requester = request.auth()
    hs = request.hs
    try:
        room, visible_upto = hs.rooms.check_can_read(room_id, requester.user_id)
    except MatrixError:
        raise MatrixError(404, NOT_FOUND, "Event not found.") from None
    event = hs.store.get_event(event_id)
    if (
        event is None
        or event.room_id != room_id
        or (visible_upto is not None and event.stream > visible_upto)
        or not hs.visibility.filter(requester.user_id, room, [event])
    ):
        raise MatrixError(404, NOT_FOUND, "Event not found.")
    [membership] = hs.serializer.memberships_at(requester.user_id, room_id, [event])
    return 200, hs.serializer.client_event(
        event, txn_scope=requester.txn_scope, membership=membership
    )


async def membership_action(
    request: RestRequest, room_id: str, action: str, txn_id: str | None = None
) -> Result:
    requester = request.auth()
    body = await request.json(allow_empty=True)
    target = requester.user_id
    if action in ("invite", "ban", "unban", "kick"):
        if "user_id" not in body:
            raise bad_request("Missing params: ['user_id']", MISSING_PARAM)
        target = body["user_id"]
        parse_user_id(target)
    content: dict[str, Any] | None = None
    if "reason" in body:
        content = {"reason": body["reason"]}

    async def compute() -> Result:
        request.hs.members.update_membership(
            requester, room_id, target, action, content=content, txn_id=txn_id
        )
        return 200, ({"room_id": room_id} if action == "join" else {})

    return await _txn(request, txn_id, compute)


async def join_by_alias(
    request: RestRequest, room_identifier: str, txn_id: str | None = None
) -> Result:
    requester = request.auth()
    body = await request.json(allow_empty=True)
    hs = request.hs
    room_id = hs.directory.resolve_room(room_identifier)
    content = {k: v for k, v in body.items() if k not in ("third_party_signed",)}

    async def compute() -> Result:
        hs.members.update_membership(requester, room_id, requester.user_id, "join", content=content)
        return 200, {"room_id": room_id}

    return await _txn(request, txn_id, compute)


async def forget(request: RestRequest, room_id: str, txn_id: str | None = None) -> Result:
    requester = request.auth()
    room = request.hs.rooms.get(room_id)
    if room is not None and room.membership(requester.user_id) in ("join", "invite"):
        raise bad_request("User is in room, cannot forget")  # Synapse: 400
    return 200, {}


async def typing(request: RestRequest, room_id: str, user_id: str) -> Result:
    requester = request.auth()
    if requester.user_id != user_id:
        raise MatrixError(400, "M_FORBIDDEN", "Cannot set another user's typing state")
    body = await request.json()
    if "typing" not in body:
        raise bad_request("Missing params: ['typing']", MISSING_PARAM)
    timeout = body.get("timeout", 30000)
    if not isinstance(timeout, int) or isinstance(timeout, bool):
        timeout = 30000
    timeout = min(timeout, MAX_TYPING_TIMEOUT)
    request.hs.typing.set_typing(room_id, user_id, bool(body["typing"]), timeout)
    return 200, {}


async def receipt(request: RestRequest, room_id: str, receipt_type: str, event_id: str) -> Result:
    requester = request.auth()
    body = await request.json(allow_empty=True)
    hs = request.hs
    if receipt_type == "m.fully_read":
        hs.rooms.check_user_in_room(room_id, requester.user_id)
        hs.store.set_account_data(
            requester.user_id, room_id, "m.fully_read", {"event_id": event_id}
        )
        hs.notifier.notify_users([requester.user_id])
        return 200, {}
    if receipt_type not in ("m.read", "m.read.private"):
        raise bad_request(
            "Receipt type must be 'm.read', 'm.read.private' or 'm.fully_read'", INVALID_PARAM
        )
    hs.receipts.set_receipt(
        room_id, requester.user_id, receipt_type, event_id, body.get("thread_id")
    )
    return 200, {}


async def read_markers(request: RestRequest, room_id: str) -> Result:
    requester = request.auth()
    body = await request.json()
    hs = request.hs
    hs.rooms.check_user_in_room(room_id, requester.user_id)
    fully_read = body.get("m.fully_read")
    if fully_read is not None:
        if not isinstance(fully_read, str):
            raise bad_request("m.fully_read must be an event id", INVALID_PARAM)
        hs.store.set_account_data(
            requester.user_id, room_id, "m.fully_read", {"event_id": fully_read}
        )
        hs.notifier.notify_users([requester.user_id])
    for receipt_type in ("m.read", "m.read.private"):
        event_id = body.get(receipt_type)
        if event_id is not None:
            if not isinstance(event_id, str):
                raise bad_request(f"{receipt_type} must be an event id", INVALID_PARAM)
            hs.receipts.set_receipt(room_id, requester.user_id, receipt_type, event_id, None)
    return 200, {}


async def room_aliases(request: RestRequest, room_id: str) -> Result:
    requester = request.auth()
    hs = request.hs
    hs.rooms.check_can_read(room_id, requester.user_id)
    return 200, {"aliases": hs.store.aliases_for_room(room_id)}


# --- directory ------------------------------------------------------------------------------


async def get_alias(request: RestRequest, alias: str) -> Result:
    hs = request.hs
    hs.directory.check_alias_syntax(alias)
    mapping = hs.store.get_alias(alias)
    if mapping is None:
        raise MatrixError(404, NOT_FOUND, f"Room alias {alias} not found")
    return 200, {"room_id": mapping[0], "servers": [hs.server_name]}


async def put_alias(request: RestRequest, alias: str) -> Result:
    hs = request.hs
    hs.directory.check_alias_syntax(alias)
    body = await request.json()
    room_id = body.get("room_id")
    if not isinstance(room_id, str):
        raise bad_request("room_id: Input should be a valid string", "M_BAD_JSON")
    if hs.store.get_room(room_id) is None:
        raise bad_request("Room does not exist")
    requester = request.auth()
    hs.directory.create_alias(
        requester, alias, room_id, is_admin=hs.auth.is_admin(requester.user_id)
    )
    return 200, {}


async def delete_alias(request: RestRequest, alias: str) -> Result:
    requester = request.auth()
    hs = request.hs
    hs.directory.delete_alias(requester, alias, hs.auth.is_admin(requester.user_id))
    return 200, {}


async def get_visibility(request: RestRequest, room_id: str) -> Result:
    row = request.hs.store.get_room(room_id)
    if row is None:
        raise not_found("Unknown room")
    return 200, {"visibility": "public" if row.is_public else "private"}


async def put_visibility(request: RestRequest, room_id: str) -> Result:
    requester = request.auth()
    body = await request.json(allow_empty=True)
    hs = request.hs
    visibility = body.get("visibility", "public")
    if visibility not in ("public", "private"):
        raise bad_request(f"Invalid visibility {visibility!r}", INVALID_PARAM)
    room = hs.rooms.check_user_in_room(room_id, requester.user_id)
    from cis_bot.homeserver.handlers import event_auth

    level = event_auth.user_power_level(requester.user_id, room.state, room.version)
    if level < event_auth.send_level(ev.CANONICAL_ALIAS, "", room.state) and not hs.auth.is_admin(
        requester.user_id
    ):
        raise forbidden(
            "This server requires you to be a moderator in the room to edit its room list entry"
        )
    hs.store.set_room_public(room_id, visibility == "public")
    return 200, {}


async def public_rooms(request: RestRequest) -> Result:
    hs = request.hs
    if request.method == "POST":
        request.auth()
        body = await request.json()
        limit = body.get("limit")
    else:
        if request.has_token():
            request.auth()
        limit = request.integer("limit", 0) or None
    chunk = []
    for room_id in hs.store.public_room_ids():
        room = hs.rooms.get(room_id)
        if room is None:
            continue
        entry: dict[str, Any] = {
            "room_id": room_id,
            "num_joined_members": len(room.joined),
            "world_readable": False,
            "guest_can_join": False,
        }
        for key, etype, field in (
            ("name", ev.NAME, "name"),
            ("topic", ev.TOPIC, "topic"),
            ("canonical_alias", ev.CANONICAL_ALIAS, "alias"),
            ("avatar_url", ev.AVATAR, "url"),
        ):
            state = room.state.get((etype, ""))
            if state is not None and isinstance(state.content.get(field), str):
                entry[key] = state.content[field]
        join_rules = room.state.get((ev.JOIN_RULES, ""))
        entry["join_rule"] = join_rules.content.get("join_rule") if join_rules else "invite"
        history = room.state.get((ev.HISTORY_VISIBILITY, ""))
        entry["world_readable"] = bool(
            history and history.content.get("history_visibility") == "world_readable"
        )
        guest = room.state.get((ev.GUEST_ACCESS, ""))
        entry["guest_can_join"] = bool(guest and guest.content.get("guest_access") == "can_join")
        chunk.append(entry)
    chunk.sort(key=lambda e: (-e["num_joined_members"], e["room_id"]))
    total = len(chunk)
    if isinstance(limit, int) and limit > 0:
        chunk = chunk[:limit]
    return 200, {"chunk": chunk, "total_room_count_estimate": total}


def register_routes(router: Router) -> None:
    r = "/rooms/(?P<room_id>[^/]*)"
    router.client("POST", "/createRoom", create_room)
    router.client("PUT", "/createRoom/(?P<txn_id>[^/]*)", create_room)
    router.client("POST", r + "/send/(?P<event_type>[^/]*)", send_event)
    router.client("PUT", r + "/send/(?P<event_type>[^/]*)/(?P<txn_id>[^/]*)", send_event)
    router.client("POST", r + "/redact/(?P<event_id>[^/]*)", redact)
    router.client("PUT", r + "/redact/(?P<event_id>[^/]*)/(?P<txn_id>[^/]*)", redact)
    state = r + "/state/(?P<event_type>[^/]*)"
    router.client("GET", state, get_state_event)
    router.client("PUT", state, put_state_event)
    router.client("GET", state + "/(?P<state_key>[^/]*)", get_state_event)
    router.client("PUT", state + "/(?P<state_key>[^/]*)", put_state_event)
    router.client("GET", r + "/state", get_state)
    router.client("GET", r + "/members", get_members)
    router.client("GET", r + "/joined_members", joined_members)
    router.client("GET", "/joined_rooms", joined_rooms)
    router.client("GET", r + "/messages", messages)
    router.client("GET", r + "/event/(?P<event_id>[^/]*)", get_event)
    action = r + "/(?P<action>join|invite|leave|ban|unban|kick)"
    router.client("POST", action, membership_action)
    router.client("PUT", action + "/(?P<txn_id>[^/]*)", membership_action)
    router.client("POST", r + "/forget", forget)
    router.client("PUT", r + "/forget/(?P<txn_id>[^/]*)", forget)
    router.client("POST", "/join/(?P<room_identifier>[^/]*)", join_by_alias)
    router.client("PUT", "/join/(?P<room_identifier>[^/]*)/(?P<txn_id>[^/]*)", join_by_alias)
    router.client("PUT", r + "/typing/(?P<user_id>[^/]*)", typing)
    router.client(
        "POST", r + "/receipt/(?P<receipt_type>[^/]*)/(?P<event_id>[^/]*)", receipt, v1=False
    )
    router.client("POST", r + "/read_markers", read_markers, v1=False)
    router.client("GET", r + "/aliases", room_aliases, v1=False)
    router.client("GET", "/directory/room/(?P<alias>[^/]*)", get_alias)
    router.client("PUT", "/directory/room/(?P<alias>[^/]*)", put_alias)
    router.client("DELETE", "/directory/room/(?P<alias>[^/]*)", delete_alias)
    router.client("GET", "/directory/list/room/(?P<room_id>[^/]*)", get_visibility)
    router.client("PUT", "/directory/list/room/(?P<room_id>[^/]*)", put_visibility)
    router.client("GET", "/publicRooms", public_rooms)
    router.client("POST", "/publicRooms", public_rooms)
