"""A person in a chat client, for the chat tests: sends messages (commands, replies, files,
reactions) and sees the room's events as a client does, through a ``/sync`` loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from tests.support.client import CS, MatrixClient, q

Event = dict[str, Any]


def _field(value: Any, key: str) -> Any:
    """``value[key]`` when ``value`` is an object (the tests send malformed events too)."""
    return value.get(key) if isinstance(value, dict) else None


def replies_to(event_id: str) -> Callable[[Event], bool]:
    """A notice answering ``event_id`` (a rich reply, in a thread or not)."""

    def test(event: Event) -> bool:
        content = event.get("content") or {}
        reply = _field(_field(content, "m.relates_to"), "m.in_reply_to")
        return (
            event.get("type") == "m.room.message"
            and content.get("msgtype") in ("m.notice", "m.file")
            and _field(reply, "event_id") == event_id
        )

    return test


def notice_of(kind: str, **fields: str) -> Callable[[Event], bool]:
    """A cis notice (``cis.notice``) of ``kind`` whose fields include ``fields``."""

    def test(event: Event) -> bool:
        notice = _field(event.get("content"), "cis.notice")
        return _field(notice, "kind") == kind and all(
            _field(notice, k) == v for k, v in fields.items()
        )

    return test


class Person:
    """One user, syncing; ``events`` holds every timeline event seen, in order."""

    def __init__(self, client: MatrixClient) -> None:
        self.client = client
        self.events: list[Event] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._since: str | None = None

    @property
    def user_id(self) -> str:
        assert self.client.user_id is not None
        return self.client.user_id

    async def start(self) -> Person:
        first = await self.client.sync(timeout="0")
        self._since = first["next_batch"]
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _loop(self) -> None:
        while True:
            params = {"timeout": "5000"}
            if self._since:
                params["since"] = self._since
            try:
                body = await self.client.sync(**params)
            except AssertionError:  # a transient 5xx while a server is restarted
                await asyncio.sleep(0.2)
                continue
            self._since = body["next_batch"]
            fresh = []
            for room_id, room in (body.get("rooms", {}).get("join") or {}).items():
                for event in room.get("timeline", {}).get("events", []):
                    fresh.append({**event, "room_id": room_id})
            if fresh:
                async with self._changed:
                    self.events.extend(fresh)
                    self._changed.notify_all()

    async def wait(
        self, test: Callable[[Event], bool], *, timeout: float = 30.0, what: str = "an event"
    ) -> Event:
        """The first event seen (before or after now) that passes ``test``."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                found = next((e for e in self.events if test(e)), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    shown = [
                        (e.get("type"), (e.get("content") or {}).get("body"))
                        for e in self.events
                        if e.get("type") != "cis.node.heartbeat"
                    ][-15:]
                    raise AssertionError(f"timed out waiting for {what}; last events: {shown}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def none_within(self, test: Callable[[Event], bool], seconds: float) -> None:
        """No event passing ``test`` arrives within ``seconds`` (for "nobody answers")."""
        with contextlib.suppress(AssertionError):
            found = await self.wait(test, timeout=seconds)
            raise AssertionError(f"unexpected event: {found}")

    async def say(self, room_id: str, text: str, **extra: Any) -> str:
        return await self.client.send(room_id, {"msgtype": "m.text", "body": text, **extra})

    async def ask(self, room_id: str, text: str, *, timeout: float = 30.0, **extra: Any) -> Event:
        """Send ``text``; the answer to it."""
        event_id = await self.say(room_id, text, **extra)
        return await self.wait(replies_to(event_id), timeout=timeout, what=f"an answer to {text!r}")

    async def reply(self, room_id: str, event: Event, text: str) -> str:
        """A rich reply to ``event`` (no fallback, as clients after Matrix 1.13 send it)."""
        return await self.say(
            room_id, text, **{"m.relates_to": {"m.in_reply_to": {"event_id": event["event_id"]}}}
        )

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}
        return await self.client.send(room_id, content, event_type="m.reaction")

    async def send_file(
        self, room_id: str, name: str, data: bytes, *, caption: str | None = None
    ) -> str:
        response = await self.client.request(
            "POST",
            "/_matrix/media/v3/upload",
            data=data,
            params={"filename": name},
            headers={"Content-Type": "application/toml"},
        )
        assert response.status == 200, response.body
        content: dict[str, Any] = {
            "msgtype": "m.file",
            "body": caption if caption is not None else name,
            "filename": name,
            "url": response.body["content_uri"],
            "info": {"mimetype": "application/toml", "size": len(data)},
        }
        return await self.client.send(room_id, content)

    async def join(self, room_id: str) -> None:
        await self.client.join(room_id)

    async def set_power(self, room_id: str, user_id: str, level: int) -> None:
        levels = await self.client.get_state(room_id, "m.room.power_levels")
        levels.setdefault("users", {})[user_id] = level
        await self.client.put_state(room_id, "m.room.power_levels", levels)


def body(event: Event) -> str:
    return str(_field(event.get("content"), "body") or "")


def html(event: Event) -> str:
    return str(_field(event.get("content"), "formatted_body") or "")


def path(room_id: str) -> str:
    return f"{CS}/rooms/{q(room_id)}"
