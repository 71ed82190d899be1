"""``cis.dag.batch``: several run-log events in one room event, made and unpacked.

An outbox under load sends what has queued up as one batch (``BATCHING``; the grouping rules
are the outbox's). Every reader unpacks at one place, the node (``Node``'s intake and
``Node.history``), with :func:`unpack`: what comes out is each event as if sent alone, with the
batch's sender, its ``origin_server_ts`` and an event id of its own (``<batch id>#<index>``), so
folds, the coordinator, the worker and the control handlers never see a batch.

Trust the sender, as for any event: each event inside counts only as far as the batch's sender
could have posted it on its own. A batch carrying a type no batch may carry (a state event, a
control request, anything outside the run log) is malformed and dropped whole; an event whose
type needs a higher power level than its sender has in the room is dropped alone, as the
homeserver would have refused it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from cis_bot.matrix import events as ev
from cis_bot.matrix.outbox import Batching, Outgoing

log = structlog.get_logger(__name__)

BATCH_TYPE = ev.BatchContent.TYPE
#: What a batch's content takes besides its events (``v``, ``timestamp``, the brackets).
_ENVELOPE_BYTES = 64
#: Room for the fields a not yet prepared event gains (an upload's mxc URI, at most 255
#: characters of server name and a media id, twice for an assignment's task and upstream).
_PREPARE_RESERVE_BYTES = 1024


def batchable(event_type: str, state_key: str | None) -> bool:
    """Whether an event of this type may travel in a batch: the run log's message events."""
    return state_key is None and event_type in ev.RUN_LOG_TYPES


def _size(item: Outgoing) -> int:
    """What the event adds to a batch's content, in encoded bytes (with its separator)."""
    if item.content_bytes is None:
        item.content_bytes = len(json.dumps(item.content, ensure_ascii=False).encode())
    size = item.content_bytes + _entry_bytes(item.event_type) + 2
    if item.prepare is not None and not item.prepared:
        size += _PREPARE_RESERVE_BYTES
    return size


@functools.cache
def _entry_bytes(event_type: str) -> int:
    """What ``{"type": ..., "content": ...}`` adds around its content, encoded."""
    return len(json.dumps({"type": event_type, "content": {}}, ensure_ascii=False).encode()) - 2


def make_batch(items: Sequence[Outgoing]) -> Outgoing:
    """The event that carries ``items``, in order (its own transaction id)."""
    payload = ev.BatchContent(events=tuple((item.event_type, item.content) for item in items))
    return Outgoing(BATCH_TYPE, payload.content())


#: How a node's outboxes batch: within Matrix's event size bound, one batch in flight at a time.
BATCHING = Batching(
    make=make_batch, size=_size, limit=ev.MAX_CONTENT_BYTES - _ENVELOPE_BYTES, in_flight=1
)

#: Whether a sender may post an event type in the room on its own (its power level against the
#: type's): the check a homeserver made for a plain event.
MayPost = Callable[[str], bool]


def unpack(raw: Mapping[str, Any], may_post: MayPost) -> list[dict[str, Any]]:
    """The events a ``cis.dag.batch`` carries, each as a room event of its own (see the module
    docstring); ``[]`` for a malformed batch (logged). Only call it for a batch."""
    event_id = str(raw.get("event_id", ""))
    sender = raw.get("sender")
    try:
        batch = ev.decode(BATCH_TYPE, raw.get("content"))
    except ev.InvalidEvent as exc:
        log.warning("event.dropped", event_id=event_id, sender=sender, error=str(exc))
        return []
    assert isinstance(batch, ev.BatchContent)
    unpacked: list[dict[str, Any]] = []
    for index, (event_type, content) in enumerate(batch.events):
        if not may_post(event_type):
            log.warning(
                "event.unauthorised",
                event_id=event_id,
                type=event_type,
                sender=sender,
                why="in a batch, a type its sender may not post in the room",
            )
            continue
        inner: dict[str, Any] = {
            "type": event_type,
            "content": content,
            "sender": sender,
            "event_id": f"{event_id}#{index}",
        }
        for field in ("room_id", "origin_server_ts"):
            if field in raw:
                inner[field] = raw[field]
        unpacked.append(inner)
    return unpacked
