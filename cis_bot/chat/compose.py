"""Answers as Matrix content: an ``m.notice`` with a plain ``body`` and an HTML
``formatted_body``, sent as a rich reply to the command, in the command's thread.

Every answer is a :class:`Text`: the same words as plain text and as HTML (tables for lists of
things, code blocks for logs), built from parts so that what a person typed is always escaped in
the HTML. ``reply_content`` wraps it as a rich reply:

- ``m.relates_to.m.in_reply_to`` names the command; in a thread, the relation is ``m.thread``
  with the thread's root, ``is_falling_back: false`` (a real reply, not a fallback for clients
  without threads);
- ``m.mentions`` names the command's sender (Matrix 1.7 intentional mentions);
- the quoted fallback (``> <@user> text`` in the body, ``<mx-reply>`` in the HTML) is added only
  for homeservers older than Matrix 1.13, which removed it: current clients neither need nor show
  it, and it would copy the command into every answer.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from cis_bot.chat.commands import BY_NAME, COMMANDS, Access, CommandSpec
from cis_bot.chat.incoming import Message

HTML_FORMAT = "org.matrix.custom.html"
#: A fallback quotes at most this much of the command.
FALLBACK_CHARS = 200


def escape(text: str) -> str:
    return html.escape(text, quote=True)


@attrs.frozen
class Text:
    """The same message as plain text and as HTML."""

    plain: str
    html: str

    @classmethod
    def of(cls, text: str) -> Text:
        """Plain text; in HTML escaped, its newlines as line breaks."""
        return cls(text, escape(text).replace("\n", "<br>"))

    def __add__(self, other: Text) -> Text:
        return Text(self.plain + other.plain, self.html + other.html)

    @classmethod
    def join(cls, parts: Iterable[Text], plain_sep: str = "\n", html_sep: str = "") -> Text:
        items = list(parts)
        return cls(plain_sep.join(p.plain for p in items), html_sep.join(p.html for p in items))


def code(text: str) -> Text:
    """Inline code."""
    return Text(f"`{text}`", f"<code>{escape(text)}</code>")


def bold(text: str) -> Text:
    return Text(text, f"<b>{escape(text)}</b>")


def para(*parts: Text | str) -> Text:
    """A paragraph made of text parts (strings are plain text)."""
    items = [p if isinstance(p, Text) else Text.of(p) for p in parts]
    inner = Text.join(items, "", "")
    return Text(inner.plain, f"<p>{inner.html}</p>")


def code_block(text: str, language: str | None = None) -> Text:
    cls = f' class="language-{escape(language)}"' if language else ""
    return Text(f"```\n{text}\n```", f"<pre><code{cls}>{escape(text)}</code></pre>")


def table(headers: Sequence[str], rows: Sequence[Sequence[str | Text]]) -> Text:
    """Rows as an HTML table; in plain text, aligned columns."""
    cells = [[c if isinstance(c, Text) else Text.of(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row[: len(widths)]):
            widths[i] = max(widths[i], len(cell.plain))
    lines = [
        "  ".join(str(v).ljust(widths[i]) for i, v in enumerate(headers)).rstrip(),
        *("  ".join(c.plain.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in cells),
    ]
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c.html}</td>" for c in row) + "</tr>" for row in cells)
    return Text(
        "\n".join(lines), f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def mention(user_id: str) -> Text:
    """A user pill (clients show the user's name; the plain text is the id)."""
    return Text(user_id, f'<a href="https://matrix.to/#/{escape(user_id)}">{escape(user_id)}</a>')


def error(message: str, spec: CommandSpec | None = None, prefix: str = "!cis") -> Text:
    """A command that went wrong: what, and the command's usage when that helps."""
    parts = [para("⚠️ ", message)]
    if spec is not None:
        parts.append(para("usage: ", code(spec.usage(prefix))))
    return Text.join(parts)


def help_text(prefix: str, spec: CommandSpec | None = None, *, level: int) -> Text:
    """``help``: every command, or one command in full (``level``: the power level acting
    commands need in the room, for the who-may line)."""
    if spec is None:
        rows: list[list[str | Text]] = [
            [code(c.usage(prefix)), c.summary + (" ✋" if c.access is Access.ACT else "")]
            for c in COMMANDS
        ]
        return Text.join(
            [
                para("Commands (", code(f"{prefix} help COMMAND"), " for one in full):"),
                table(["command", "what it does"], rows),
                para(
                    "✋ acting commands: the node's allowed users, or power level "
                    f"{level} in this room. Ids take unique prefixes."
                ),
            ]
        )
    who = (
        "anyone in the room"
        if spec.access is Access.READ
        else f"the node's allowed users, or power level {level} in this room"
    )
    examples = [code(f"{prefix} {e}") for e in spec.examples]
    return Text.join(
        [
            para(code(spec.usage(prefix)), " — ", spec.summary),
            para(spec.details),
            para(f"Who: {who}."),
            para("Examples: ", Text.join(examples, ", ", ", ")),
        ]
    )


def spec_named(name: str | None) -> CommandSpec | None:
    return BY_NAME.get(name) if name else None


def reply_content(
    text: Text,
    to: Message,
    *,
    fallback_body: str | None = None,
    mentions: Iterable[str] = (),
    msgtype: str = "m.notice",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``text`` as a rich reply to ``to`` (see the module docstring). ``fallback_body``: the
    command's text, to quote for homeservers older than Matrix 1.13 (None: no fallback)."""
    body, formatted = text.plain, text.html
    if fallback_body is not None:
        quoted = (
            fallback_body
            if len(fallback_body) <= FALLBACK_CHARS
            else (fallback_body[: FALLBACK_CHARS - 1] + "…")
        )
        lines = quoted.split("\n")
        body = "\n".join(
            [f"> <{to.sender}> {lines[0]}", *(f"> {line}" for line in lines[1:]), "", body]
        )
        link = f"https://matrix.to/#/{escape(to.room_id)}/{escape(to.event_id)}"
        formatted = (
            f'<mx-reply><blockquote><a href="{link}">In reply to</a> '
            f'<a href="https://matrix.to/#/{escape(to.sender)}">{escape(to.sender)}</a>'
            f"<br>{escape(quoted).replace(chr(10), '<br>')}</blockquote></mx-reply>{formatted}"
        )
    relates: dict[str, Any] = {"m.in_reply_to": {"event_id": to.event_id}}
    if to.thread_root is not None:
        relates.update(rel_type="m.thread", event_id=to.thread_root, is_falling_back=False)
    content: dict[str, Any] = {
        "msgtype": msgtype,
        "body": body,
        "format": HTML_FORMAT,
        "formatted_body": formatted,
        "m.relates_to": relates,
        "m.mentions": {"user_ids": sorted({to.sender, *mentions})},
    }
    if extra:
        content.update(extra)
    return content


def notice_content(
    text: Text, *, mentions: Iterable[str] = (), extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A notice of our own (not a reply): a blocked session, an approval request."""
    content: dict[str, Any] = {
        "msgtype": "m.notice",
        "body": text.plain,
        "format": HTML_FORMAT,
        "formatted_body": text.html,
        "m.mentions": {"user_ids": sorted(set(mentions))},
    }
    if extra:
        content.update(extra)
    return content


def supports_no_fallback(versions: Iterable[str]) -> bool:
    """Whether a homeserver advertising these spec versions is at Matrix 1.13 or later (reply
    fallbacks removed)."""
    for version in versions:
        if version.startswith("v1."):
            minor = version[3:]
            if minor.isdigit() and int(minor) >= 13:
                return True
    return False
