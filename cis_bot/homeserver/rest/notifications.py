"""``GET /notifications`` (synapse/rest/client/notifications.py): the events that notified the
user, newest first, with the actions of the push rule that matched and whether they are read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import bad_request

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest, Router

Result = tuple[int, Any]
MAX_LIMIT = 500


async def notifications(request: RestRequest) -> Result:
    requester = request.auth()
    hs = request.hs
    raw_from = request.string("from")
    before: int | None = None
    if raw_from is not None:
        try:
            before = int(raw_from)
        except ValueError:
            raise bad_request('Query parameter "from" contains unrecognised token') from None
    limit = request.integer("limit", 50)
    assert limit is not None
    only = request.string("only")
    listed = hs.counts.notifications(
        requester.user_id, before, min(limit, MAX_LIMIT), only_highlight=only == "highlight"
    )
    result = []
    next_token = None
    for room, event, actions, read in listed:
        result.append(
            {
                "room_id": room.room_id,
                "profile_tag": None,
                "actions": actions,
                "ts": event.origin_server_ts,
                "event": hs.serializer.client_event(event, "sync", txn_scope=requester.txn_scope),
                "read": read,
            }
        )
        next_token = str(event.stream)
    return 200, {"notifications": result, "next_token": next_token}


def register_routes(router: Router) -> None:
    router.client("GET", "/notifications", notifications, v1=False)
