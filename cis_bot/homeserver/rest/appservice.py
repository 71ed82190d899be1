"""``POST /_matrix/client/v1/appservice/{appserviceId}/ping`` (synapse appservice_ping.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.appservice.pusher import PingError
from cis_bot.homeserver.errors import AS_PING_URL_NOT_SET, MatrixError, forbidden

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest, Router


async def ping(request: RestRequest, appservice_id: str) -> tuple[int, Any]:
    requester = request.auth()
    service = requester.appservice
    if service is None:
        raise forbidden("Only application services can use the /appservice/ping endpoint")
    if service.id != appservice_id:
        raise forbidden("Mismatching application service ID in path")
    if not service.url:
        raise MatrixError(
            400, AS_PING_URL_NOT_SET, "The application service does not have a URL set"
        )
    body = await request.json()
    pusher = request.hs.pushers[service.id]
    try:
        duration = await pusher.ping(body.get("transaction_id"))
    except PingError as err:
        raise MatrixError(err.http_status, err.errcode, err.message, **err.extra) from None
    return 200, {"duration_ms": duration}


def register_routes(router: Router) -> None:
    router.add(
        "POST",
        r"^/_matrix/client/(?:v1|unstable/fi\.mau\.msc2659)/appservice/(?P<appservice_id>[^/]*)/ping",
        ping,
    )
