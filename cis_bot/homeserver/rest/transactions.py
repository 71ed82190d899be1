"""Idempotent requests (Synapse's HttpTransactionCache): a PUT with a transaction id answers the
same again when the same device repeats it, without doing the work twice."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest

Result = tuple[int, Any]


async def idempotent(
    request: RestRequest, txn_id: str | None, compute: Callable[[], Awaitable[Result]]
) -> Result:
    """Same path + same session -> same answer (kept in the database: survives restarts)."""
    if txn_id is None:
        return await compute()
    requester = request.auth()
    scope = requester.txn_scope
    stored = request.hs.store.get_request_txn(scope, request.path)
    if stored is not None:
        return stored
    status, body = await compute()
    request.hs.store.put_request_txn(scope, request.path, status, body)
    return status, body
