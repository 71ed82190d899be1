"""Reading what people send: ``m.room.message`` events and ``m.reaction`` annotations.

Anything can arrive: content that is not an object, bodies that are not strings, megabytes of
text, lone surrogates, control characters. ``Message.read`` and ``Reaction.read`` return None for
what is not a message or reaction at all, and otherwise a clean view of it: the body with a rich
reply's fallback (the quoted ``> <@user> ...`` lines clients before Matrix 1.13 prepend)
stripped, the event it replies to, its thread, whether it edits another event (``m.replace``),
and the file it carries.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import attrs

#: A body longer than this is cut before it is read (a command is a line; an answer a few).
MAX_BODY_CHARS = 16_000
#: Reaction keys that approve: ✅ and 👍 (with any skin tone or emoji presentation selector).
APPROVING_KEYS = frozenset({"\u2705", "\U0001f44d", "\u2714", "\u2611"})

# Controls other than tab and newline, and lone surrogates: nothing a person means to type.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_SKIN_TONES_AND_SELECTORS = re.compile(r"[\U0001f3fb-\U0001f3ff\ufe0e\ufe0f]")


def clean(text: str) -> str:
    """``text`` with what no person types removed (controls, lone surrogates), \\r\\n as \\n,
    in Unicode NFC (so a name typed with combining marks equals the precomposed one)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", _UNPRINTABLE.sub("", text))


def strip_reply_fallback(body: str) -> str:
    """The body without a rich reply's quoted fallback: leading ``> `` lines and the blank line
    after them (only when the quote starts with ``> <`` , the fallback's sender mark)."""
    if not body.startswith("> <"):
        return body
    lines = body.split("\n")
    index = 0
    while index < len(lines) and lines[index].startswith(">"):
        index += 1
    if index < len(lines) and lines[index] == "":
        index += 1
    return "\n".join(lines[index:])


@attrs.frozen
class FileRef:
    url: str
    filename: str
    mimetype: str | None
    size: int | None


@attrs.frozen
class Message:
    event_id: str
    room_id: str
    sender: str
    msgtype: str
    #: The text, cleaned and without a reply fallback (an edit: the new text).
    body: str
    #: The event this one replies to (``m.in_reply_to``; in a thread, not a fallback).
    reply_to: str | None = None
    #: The thread's root, when the event is in one.
    thread_root: str | None = None
    #: The event this one edits (``m.replace``).
    edits: str | None = None
    file: FileRef | None = None
    #: When the body was longer than MAX_BODY_CHARS (it has been cut).
    cut: bool = False

    @classmethod
    def read(cls, raw: Mapping[str, Any]) -> Message | None:
        if raw.get("type") != "m.room.message" or "state_key" in raw:
            return None
        event_id, room_id, sender = raw.get("event_id"), raw.get("room_id"), raw.get("sender")
        content = raw.get("content")
        if not (
            isinstance(event_id, str)
            and isinstance(room_id, str)
            and isinstance(sender, str)
            and isinstance(content, Mapping)
        ):
            return None
        relates = content.get("m.relates_to")
        relates = relates if isinstance(relates, Mapping) else {}
        edits = _string(relates.get("event_id")) if relates.get("rel_type") == "m.replace" else None
        shown = content
        if edits is not None and isinstance(content.get("m.new_content"), Mapping):
            shown = content["m.new_content"]
        msgtype = _string(shown.get("msgtype")) or ""
        body = _string(shown.get("body")) or ""
        cut = len(body) > MAX_BODY_CHARS
        body = clean(body[:MAX_BODY_CHARS])
        thread_root = None
        reply_to = _in_reply_to(relates)
        if relates.get("rel_type") == "m.thread":
            thread_root = _string(relates.get("event_id"))
            if relates.get("is_falling_back") is True:
                reply_to = None  # only there for clients that do not show threads
        if reply_to is not None:
            body = strip_reply_fallback(body)
        return cls(
            event_id=event_id,
            room_id=room_id,
            sender=sender,
            msgtype=msgtype,
            body=body,
            reply_to=reply_to,
            thread_root=thread_root,
            edits=edits,
            file=_file(shown) if msgtype == "m.file" else None,
            cut=cut,
        )

    def command_text(self, prefix: str, *, prefix_optional: bool) -> str | None:
        """What follows the prefix when the message is a command (``prefix_optional``: a direct
        chat, where any text is one); None otherwise."""
        if self.msgtype not in ("m.text", "m.file"):
            return None
        text = self.body.strip()
        # A file's body is its caption only when a filename is given apart (Matrix 1.10).
        if self.msgtype == "m.file" and (self.file is None or self.file.filename == self.body):
            return None
        head = text[: len(prefix)]
        if head.lower() == prefix.lower() and (
            len(text) == len(prefix) or text[len(prefix)] in " \n\t"
        ):
            return text[len(prefix) :].strip()
        if prefix_optional and text:
            return text
        return None


@attrs.frozen
class Reaction:
    event_id: str
    room_id: str
    sender: str
    #: The event reacted to.
    target: str
    #: The key with skin tones and presentation selectors removed.
    key: str

    @property
    def approves(self) -> bool:
        return self.key in APPROVING_KEYS

    @classmethod
    def read(cls, raw: Mapping[str, Any]) -> Reaction | None:
        if raw.get("type") != "m.reaction":
            return None
        event_id, room_id, sender = raw.get("event_id"), raw.get("room_id"), raw.get("sender")
        content = raw.get("content")
        relates = content.get("m.relates_to") if isinstance(content, Mapping) else None
        if not (
            isinstance(event_id, str)
            and isinstance(room_id, str)
            and isinstance(sender, str)
            and isinstance(relates, Mapping)
            and relates.get("rel_type") == "m.annotation"
        ):
            return None
        target, key = _string(relates.get("event_id")), _string(relates.get("key"))
        if target is None or key is None or len(key) > 64:
            return None
        return cls(event_id, room_id, sender, target, _SKIN_TONES_AND_SELECTORS.sub("", key))


def _string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _in_reply_to(relates: Mapping[str, Any]) -> str | None:
    reply = relates.get("m.in_reply_to")
    return _string(reply.get("event_id")) if isinstance(reply, Mapping) else None


def _file(content: Mapping[str, Any]) -> FileRef | None:
    url = _string(content.get("url"))
    if url is None or not url.startswith("mxc://"):
        return None  # an encrypted file (``file``) cannot be read by a bot without keys
    info = content.get("info")
    info = info if isinstance(info, Mapping) else {}
    size = info.get("size")
    filename = _string(content.get("filename")) or _string(content.get("body")) or "file"
    return FileRef(
        url=url,
        filename=clean(filename)[:255],
        mimetype=_string(info.get("mimetype")),
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
    )
