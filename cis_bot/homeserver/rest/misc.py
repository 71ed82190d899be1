"""The smaller endpoints mainstream clients call on start-up or in their settings screens, answered
as Synapse answers them with nothing configured (no push gateways, third-party networks, TURN
or 3PIDs), plus presence, the user directory and /context."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.errors import MatrixError, bad_request, forbidden, not_found

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest, Router

Result = tuple[int, Any]


async def get_presence(request: RestRequest, user_id: str) -> Result:
    requester = request.auth()
    return 200, request.hs.presence.get_status(requester.user_id, user_id)


async def put_presence(request: RestRequest, user_id: str) -> Result:
    requester = request.auth()
    if requester.user_id != user_id:
        raise forbidden("Can only set your own presence state")
    body = await request.json()
    state = dict(body)
    if "presence" not in state:
        raise bad_request("Unable to parse state")
    presence = state.pop("presence")
    status_msg = state.pop("status_msg", None)
    if "status_msg" in body and not isinstance(status_msg, str):
        raise bad_request("status_msg must be a string.")
    if state:
        raise bad_request("Unable to parse state")
    request.hs.presence.set_status(requester.user_id, presence, status_msg)
    return 200, {}


async def pushers(request: RestRequest) -> Result:
    request.auth()
    return 200, {"pushers": []}


async def threepids(request: RestRequest) -> Result:
    request.auth()
    return 200, {"threepids": []}


async def protocols(request: RestRequest) -> Result:
    request.auth()
    return 200, {}


async def turn_server(request: RestRequest) -> Result:
    request.auth()
    return 200, {}


async def user_directory_search(request: RestRequest) -> Result:
    """Users who share a room with the requester or sit in a public room (Synapse's default,
    ``search_all_users: false``), matched on user id and display name."""
    requester = request.auth()
    hs = request.hs
    body = await request.json()
    term = body.get("search_term")
    if not isinstance(term, str):
        raise MatrixError(400, "M_UNKNOWN", "`search_term` is required field")
    limit = body.get("limit", 10)
    if not isinstance(limit, int) or isinstance(limit, bool):
        limit = 10
    visible: dict[str, Any] = {}
    room_ids = set(hs.rooms.joined_rooms(requester.user_id)) | set(hs.store.public_room_ids())
    for room_id in sorted(room_ids):
        room = hs.rooms.get(room_id)
        if room is None:
            continue
        for user_id in room.joined:
            visible.setdefault(user_id, room.state[(ev.MEMBER, user_id)].content)
    needle = term.lower()
    results = []
    for user_id in sorted(visible):
        row = hs.store.get_user(user_id)
        display = row.displayname if row is not None else visible[user_id].get("displayname")
        avatar = row.avatar_url if row is not None else visible[user_id].get("avatar_url")
        if needle in user_id.lower() or (isinstance(display, str) and needle in display.lower()):
            results.append({"user_id": user_id, "display_name": display, "avatar_url": avatar})
    return 200, {"results": results[: max(limit, 0)], "limited": len(results) > limit}


async def event_context(request: RestRequest, room_id: str, event_id: str) -> Result:
    """``/rooms/{roomId}/context/{eventId}``: the event, ``limit`` events around it (half
    before, half after), the state at the last one, and pagination tokens."""
    requester = request.auth()
    hs = request.hs
    limit = request.integer("limit", 10)
    assert limit is not None
    room, visible_upto = hs.rooms.check_can_read(room_id, requester.user_id)
    event = hs.store.get_event(event_id)
    if event is None or event.room_id != room_id:
        raise not_found("Event not found.")
    if (visible_upto is not None and event.stream > visible_upto) or not hs.visibility.filter(
        requester.user_id, room, [event]
    ):
        raise forbidden("You don't have permission to access that event.")
    before_limit = limit // 2
    after_limit = limit - before_limit
    before = (
        hs.store.room_events(room_id, upto=event.stream - 1, limit=before_limit, backwards=True)
        if before_limit
        else []
    )
    after = (
        hs.store.room_events(
            room_id, after=event.stream, upto=visible_upto, limit=after_limit, backwards=False
        )
        if after_limit
        else []
    )
    before = hs.visibility.filter(requester.user_id, room, before)
    after = hs.visibility.filter(requester.user_id, room, after)
    last = after[-1] if after else event
    state_ids = hs.store.state_ids_at(room_id, last.stream)
    state = hs.store.get_events(state_ids.values())
    scope = requester.txn_scope
    timeline = [event, *before, *after]
    memberships = dict(
        zip(
            (e.event_id for e in timeline),
            hs.serializer.memberships_at(requester.user_id, room_id, timeline),
            strict=True,
        )
    )

    def serialize(e: Any) -> dict[str, Any]:
        return hs.serializer.client_event(e, txn_scope=scope, membership=memberships[e.event_id])

    start = before[-1].stream - 1 if before else event.stream - 1
    return 200, {
        "event": serialize(event),
        "events_before": [serialize(e) for e in before],
        "events_after": [serialize(e) for e in after],
        "state": [hs.serializer.client_event(state[i]) for i in state_ids.values() if i in state],
        "start": f"s{start}",
        "end": f"s{last.stream}",
    }


def register_routes(router: Router) -> None:
    router.client("GET", "/presence/(?P<user_id>[^/]*)/status", get_presence)
    router.client("PUT", "/presence/(?P<user_id>[^/]*)/status", put_presence)
    router.client("GET", "/pushers", pushers)
    router.client("GET", "/account/3pid", threepids)
    router.client("GET", "/thirdparty/protocols", protocols)
    router.client("GET", "/voip/turnServer", turn_server)
    router.client("POST", "/user_directory/search", user_directory_search)
    router.client("GET", "/rooms/(?P<room_id>[^/]*)/context/(?P<event_id>[^/]*)", event_context)
