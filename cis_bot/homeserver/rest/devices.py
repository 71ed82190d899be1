"""Device servlets (synapse/rest/client/devices.py): list, read, rename and delete devices
(deleting asks for the password again, user-interactive authentication)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import BAD_JSON, INVALID_PARAM, bad_request, not_found

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest, Router

Result = tuple[int, Any]


async def get_devices(request: RestRequest) -> Result:
    requester = request.auth()
    return 200, {"devices": request.hs.devices.devices(requester.user_id)}


async def get_device(request: RestRequest, device_id: str) -> Result:
    requester = request.auth()
    return 200, request.hs.devices.device(requester.user_id, device_id)


async def put_device(request: RestRequest, device_id: str) -> Result:
    requester = request.auth()
    body = await request.json()
    known = {row[0] for row in request.hs.store.get_devices(requester.user_id)}
    if device_id not in known:
        raise not_found("Unknown device")
    name = body.get("display_name")
    if name is not None and not isinstance(name, str):
        raise bad_request("display_name must be a string", INVALID_PARAM)
    request.hs.devices.rename(requester.user_id, device_id, name)
    return 200, {}


async def delete_device(request: RestRequest, device_id: str) -> Result:
    requester = request.auth()
    body = await request.json(allow_empty=True)
    # As in Synapse: the password first, then a device that is gone already is no error.
    await request.hs.ui_auth.validate_user(requester, request.method, request.path, body)
    known = {row[0] for row in request.hs.store.get_devices(requester.user_id)}
    request.hs.devices.delete_devices(requester.user_id, [device_id] if device_id in known else [])
    return 200, {}


async def delete_devices(request: RestRequest) -> Result:
    requester = request.auth()
    body = await request.json()
    device_ids = body.get("devices")
    if not isinstance(device_ids, list) or not all(isinstance(d, str) for d in device_ids):
        raise bad_request("devices: Input should be a valid list of strings", BAD_JSON)
    await request.hs.ui_auth.validate_user(requester, request.method, request.path, body)
    known = {row[0] for row in request.hs.store.get_devices(requester.user_id)}
    request.hs.devices.delete_devices(requester.user_id, [d for d in device_ids if d in known])
    return 200, {}


def register_routes(router: Router) -> None:
    router.client("GET", "/devices", get_devices)
    router.client("POST", "/delete_devices", delete_devices, v1=False)
    router.client("GET", "/devices/(?P<device_id>[^/]*)", get_device)
    router.client("PUT", "/devices/(?P<device_id>[^/]*)", put_device)
    router.client("DELETE", "/devices/(?P<device_id>[^/]*)", delete_device)
