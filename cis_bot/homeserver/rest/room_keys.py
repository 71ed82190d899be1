"""Server-side key backup servlets (synapse/rest/client/room_keys.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import MISSING_PARAM, bad_request

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest, Router

Result = tuple[int, Any]


def _version_param(request: RestRequest) -> str:
    version = request.string("version")
    if version is None:
        raise bad_request("Missing string query parameter 'version'", MISSING_PARAM)
    return version


async def room_keys(
    request: RestRequest, room_id: str | None = None, session_id: str | None = None
) -> Result:
    requester = request.auth()
    handler = request.hs.room_key_backups
    version = _version_param(request)
    if request.method == "GET":
        return 200, handler.get_keys(requester.user_id, version, room_id, session_id)
    if request.method == "DELETE":
        return 200, handler.delete_keys(requester.user_id, version, room_id, session_id)
    body: Any = await request.json()
    if session_id is not None:
        body = {"sessions": {session_id: body}}
    if room_id is not None:
        body = {"rooms": {room_id: body}}
    return 200, handler.upload_keys(requester.user_id, version, body.get("rooms"))


async def new_version(request: RestRequest) -> Result:
    requester = request.auth()
    handler = request.hs.room_key_backups
    if request.method == "GET":
        return 200, handler.version_info(requester.user_id, None)
    body = await request.json()
    return 200, {"version": handler.create_version(requester.user_id, body)}


async def version(request: RestRequest, version: str) -> Result:
    requester = request.auth()
    handler = request.hs.room_key_backups
    if request.method == "GET":
        return 200, handler.version_info(requester.user_id, version)
    if request.method == "DELETE":
        handler.delete_version(requester.user_id, version)
        return 200, {}
    body = await request.json()
    handler.update_version(requester.user_id, version, body)
    return 200, {}


def register_routes(router: Router) -> None:
    keys = "/room_keys/keys"
    for method in ("GET", "PUT", "DELETE"):
        router.client(method, keys, room_keys, v1=False)
        router.client(method, keys + "/(?P<room_id>[^/]+)", room_keys, v1=False)
        router.client(
            method, keys + "/(?P<room_id>[^/]+)/(?P<session_id>[^/]+)", room_keys, v1=False
        )
        router.client(method, "/room_keys/version/(?P<version>[^/]+)", version, v1=False)
    for method in ("GET", "POST"):
        router.client(method, "/room_keys/version", new_version, v1=False)
