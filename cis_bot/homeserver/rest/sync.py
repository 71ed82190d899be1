"""``GET /sync`` (synapse/rest/client/sync.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import INVALID_PARAM, bad_request
from cis_bot.homeserver.filtering import (
    DEFAULT_FILTER,
    FilterCollection,
    cap_timeline_limit,
    validate_filter,
)
from cis_bot.homeserver.handlers.tokens import SyncToken
from cis_bot.homeserver.rest.base import INT64_MAX, parse_json

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest, Router


async def sync(request: RestRequest) -> tuple[int, Any]:
    if "from" in request.query:
        raise bad_request("'from' is not a valid query parameter. Did you mean 'since'?")
    requester = request.auth()
    hs = request.hs
    timeout = request.integer("timeout", 0)
    since = request.string("since")
    set_presence = request.string(
        "set_presence", "online", allowed=("online", "offline", "unavailable")
    )
    assert set_presence is not None
    filter_id = request.string("filter")
    full_state = request.boolean("full_state", False)

    filters = DEFAULT_FILTER
    if filter_id is not None:
        if filter_id.startswith("{"):
            filter_json = parse_json(filter_id)
            validate_filter(filter_json)
            cap_timeline_limit(filter_json)
            filters = FilterCollection.from_json(filter_json)
        else:
            stored = (
                hs.store.get_filter(requester.user_id, int(filter_id))
                if filter_id.isdigit() and int(filter_id) <= INT64_MAX
                else None
            )
            if stored is None:
                raise bad_request("No such filter", INVALID_PARAM)
            filters = FilterCollection.from_json(stored)

    since_token = SyncToken.parse(since) if since is not None else None
    hs.presence.sync_started(requester.user_id, set_presence)
    try:
        result: dict[str, Any] = await hs.sync.sync(
            requester,
            since=since_token,
            timeout_ms=timeout or 0,
            filters=filters,
            full_state=full_state,
        )
    finally:
        hs.presence.sync_ended(requester.user_id)
    return 200, result


def register_routes(router: Router) -> None:
    router.client("GET", "/sync", sync, v1=False)
