"""End-to-end encryption servlets (synapse/rest/client/keys.py, sendtodevice.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import MISSING_PARAM, bad_request
from cis_bot.homeserver.handlers.tokens import SyncToken
from cis_bot.homeserver.rest.transactions import idempotent

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest, Router

Result = tuple[int, Any]


async def upload_keys(request: RestRequest) -> Result:
    requester = request.auth()
    body = await request.json()
    return 200, request.hs.e2e_keys.upload(requester, body)


async def query_keys(request: RestRequest) -> Result:
    requester = request.auth()
    request.integer("timeout", 10_000)
    body = await request.json()
    return 200, request.hs.e2e_keys.query(requester, body)


async def claim_keys(request: RestRequest) -> Result:
    request.auth()
    request.integer("timeout", 10_000)
    body = await request.json()
    return 200, request.hs.e2e_keys.claim(body)


async def key_changes(request: RestRequest) -> Result:
    requester = request.auth()
    raw = request.string("from")
    if raw is None:
        raise bad_request("Missing string query parameter 'from'", MISSING_PARAM)
    since = SyncToken.parse(raw)
    changed, left = request.hs.sync.device_list_updates(requester.user_id, since.stream)
    return 200, {"changed": changed, "left": left}


async def upload_signing_keys(request: RestRequest) -> Result:
    requester = request.auth()
    body = await request.json()
    handler = request.hs.e2e_keys
    if not handler.changes_keys(requester.user_id, body):
        return 200, {}
    if handler.has_cross_signing(requester.user_id):
        await request.hs.ui_auth.validate_user(requester, request.method, request.path, body)
    return 200, handler.upload_signing_keys(requester.user_id, body)


async def upload_signatures(request: RestRequest) -> Result:
    requester = request.auth()
    body = await request.json()
    return 200, request.hs.e2e_keys.upload_signatures(requester.user_id, body)


async def send_to_device(request: RestRequest, message_type: str, txn_id: str) -> Result:
    requester = request.auth()

    async def compute() -> Result:
        body = await request.json()
        if "messages" not in body:
            raise bad_request("Missing params: ['messages']", MISSING_PARAM)
        request.hs.device_messages.send(requester, message_type, body["messages"])
        return 200, {}

    return await idempotent(request, txn_id, compute)


def register_routes(router: Router) -> None:
    router.client("POST", "/keys/upload", upload_keys, v1=False)
    router.client("POST", "/keys/query", query_keys, v1=False)
    router.client("POST", "/keys/claim", claim_keys, v1=False)
    router.client("GET", "/keys/changes", key_changes, v1=False)
    router.add(
        "POST",
        r"^/_matrix/client/(?:v3|unstable)/keys/device_signing/upload",
        upload_signing_keys,
    )
    router.client("POST", "/keys/signatures/upload", upload_signatures, v1=False)
    router.client(
        "PUT",
        "/sendToDevice/(?P<message_type>[^/]*)/(?P<txn_id>[^/]*)",
        send_to_device,
        v1=False,
    )
