"""Reading what people send (cis_bot/chat/incoming.py) and composing answers
(cis_bot/chat/compose.py); the rate limiter (cis_bot/chat/ratelimit.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cis_bot.chat.compose import (
    Text,
    code,
    code_block,
    para,
    reply_content,
    supports_no_fallback,
    table,
)
from cis_bot.chat.incoming import MAX_BODY_CHARS, Message, Reaction, clean, strip_reply_fallback
from cis_bot.chat.ratelimit import RateLimiter


def message(content: Any, **fields: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": "$cmd",
        "room_id": "!room:x",
        "sender": "@alice:x",
        "content": content,
        **fields,
    }


def test_a_command_and_its_prefix() -> None:
    read = Message.read(message({"msgtype": "m.text", "body": "  !CIS  status 2026 "}))
    assert read is not None
    assert read.command_text("!cis", prefix_optional=False) == "status 2026"
    plain = Message.read(message({"msgtype": "m.text", "body": "!cisco status"}))
    assert plain is not None and plain.command_text("!cis", prefix_optional=False) is None
    # In a direct chat any text is a command; with the prefix, the prefix goes.
    assert plain.command_text("!cis", prefix_optional=True) == "!cisco status"
    assert read.command_text("!cis", prefix_optional=True) == "status 2026"
    notice = Message.read(message({"msgtype": "m.notice", "body": "!cis help"}))
    assert notice is not None and notice.command_text("!cis", prefix_optional=True) is None


def test_a_rich_reply_loses_its_fallback_and_names_what_it_answers() -> None:
    content = {
        "msgtype": "m.text",
        "body": "> <@cis_a:x> ⛔ `r:ask:1` waits for an answer\n> second line\n\nyes please",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$notice"}},
    }
    read = Message.read(message(content))
    assert read is not None
    assert (read.reply_to, read.body, read.thread_root) == ("$notice", "yes please", None)
    # Without a reply relation, a body that starts with a quote is left alone.
    quoted = Message.read(message({"msgtype": "m.text", "body": "> <@a:x> hi\n\nho"}))
    assert quoted is not None and quoted.body.startswith("> <@a:x>")
    assert strip_reply_fallback("> not a fallback\n\nx") == "> not a fallback\n\nx"


def test_threads_fallback_relations_are_not_replies() -> None:
    in_thread = {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$latest"},
    }
    read = Message.read(
        message({"msgtype": "m.text", "body": "!cis status", "m.relates_to": in_thread})
    )
    assert read is not None and (read.thread_root, read.reply_to) == ("$root", None)
    real = {**in_thread, "is_falling_back": False}
    read = Message.read(message({"msgtype": "m.text", "body": "y", "m.relates_to": real}))
    assert read is not None and (read.thread_root, read.reply_to) == ("$root", "$latest")


def test_an_edit_is_read_with_its_new_text() -> None:
    content = {
        "msgtype": "m.text",
        "body": "* !cis status",
        "m.new_content": {"msgtype": "m.text", "body": "!cis status"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$old"},
    }
    read = Message.read(message(content))
    assert read is not None and (read.edits, read.body) == ("$old", "!cis status")


def test_a_file_with_a_caption_and_without() -> None:
    file = {
        "msgtype": "m.file",
        "body": "!cis run",
        "filename": "build.toml",
        "url": "mxc://x/abc",
        "info": {"mimetype": "application/toml", "size": 120},
    }
    read = Message.read(message(file))
    assert read is not None and read.file is not None
    assert (read.file.filename, read.file.size, read.file.url) == ("build.toml", 120, "mxc://x/abc")
    assert read.command_text("!cis", prefix_optional=False) == "run"
    bare = Message.read(message({**file, "body": "!cis run", "filename": "!cis run"}))
    assert bare is not None and bare.command_text("!cis", prefix_optional=False) is None
    encrypted = Message.read(message({**file, "url": None, "file": {"url": "mxc://x/e"}}))
    assert encrypted is not None and encrypted.file is None


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "m.room.message"},
        message(None),
        message([1, 2]),
        message({"msgtype": "m.text", "body": 12}),
        message({"msgtype": 5, "body": "!cis help"}),
        message({"msgtype": "m.text", "body": "!cis help", "m.relates_to": "x"}),
        message({"msgtype": "m.text", "body": "!cis help", "m.relates_to": {"m.in_reply_to": 3}}),
        message({"msgtype": "m.text"}, sender=None),
        message({"msgtype": "m.text", "body": "x"}, state_key=""),
    ],
)
def test_malformed_messages_are_read_as_nothing_or_as_no_command(raw: dict[str, Any]) -> None:
    read = Message.read(raw)
    assert read is None or read.command_text("!cis", prefix_optional=False) in (None, "help")


def test_odd_unicode_and_floods_are_cleaned_and_cut() -> None:
    read = Message.read(
        message({"msgtype": "m.text", "body": "!cis \ud800input\x00 a:b e\u0301\u202e"})
    )
    assert read is not None
    assert read.body == "!cis input a:b \u00e9\u202e"
    huge = Message.read(message({"msgtype": "m.text", "body": "!cis " + "x" * 100_000}))
    assert huge is not None and huge.cut and len(huge.body) == MAX_BODY_CHARS
    assert clean("a\r\nb\rc") == "a\nb\nc"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    )
)
def test_no_content_makes_reading_raise(content: Any) -> None:
    Message.read(message(content))
    Reaction.read(
        {
            "type": "m.reaction",
            "event_id": "$r",
            "room_id": "!r",
            "sender": "@a:x",
            "content": content,
        }
    )


@pytest.mark.parametrize(
    ("key", "approves"),
    [
        ("✅", True),
        ("👍", True),
        ("👍🏽", True),
        ("👍\ufe0f", True),
        ("✔️", True),
        ("👎", False),
        ("ok", False),
    ],
)
def test_approving_reactions(key: str, approves: bool) -> None:
    raw = {
        "type": "m.reaction",
        "event_id": "$r",
        "room_id": "!r:x",
        "sender": "@a:x",
        "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$n", "key": key}},
    }
    reaction = Reaction.read(raw)
    assert reaction is not None and reaction.target == "$n"
    assert reaction.approves is approves


def test_an_answer_is_a_rich_reply_notice_with_html_and_a_mention() -> None:
    command = Message.read(message({"msgtype": "m.text", "body": "!cis status <b>"}))
    assert command is not None
    text = Text.join([para("Run ", code("r<1>"), " & co"), table(["a", "b"], [["1", code("<2>")]])])
    content = reply_content(text, command)
    assert content["msgtype"] == "m.notice"
    assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}
    assert content["m.mentions"] == {"user_ids": ["@alice:x"]}
    assert content["format"] == "org.matrix.custom.html"
    assert "<code>r&lt;1&gt;</code> &amp; co" in content["formatted_body"]
    assert "<td><code>&lt;2&gt;</code></td>" in content["formatted_body"]
    assert content["body"] == "Run `r<1>` & co\na  b\n1  `<2>`"
    assert "<mx-reply>" not in content["formatted_body"]


def test_an_answer_in_a_thread_stays_in_it() -> None:
    relates = {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$x"},
    }
    command = Message.read(
        message({"msgtype": "m.text", "body": "!cis help", "m.relates_to": relates})
    )
    assert command is not None
    content = reply_content(Text.of("hi"), command)
    assert content["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": False,
        "m.in_reply_to": {"event_id": "$cmd"},
    }


def test_the_reply_fallback_only_for_homeservers_before_matrix_1_13() -> None:
    assert supports_no_fallback(["r0.6.1", "v1.1", "v1.13"])
    assert supports_no_fallback(["v1.15"])
    assert not supports_no_fallback(["r0.6.1", "v1.11", "v1.12"])
    assert not supports_no_fallback(["v1.x", "v2"])
    command = Message.read(message({"msgtype": "m.text", "body": "!cis status\n<i>two</i>"}))
    assert command is not None
    content = reply_content(Text.of("done"), command, fallback_body=command.body)
    assert content["body"] == "> <@alice:x> !cis status\n> <i>two</i>\n\ndone"
    assert content["formatted_body"].startswith("<mx-reply><blockquote>")
    assert "&lt;i&gt;two&lt;/i&gt;" in content["formatted_body"]
    assert content["formatted_body"].endswith("</mx-reply>done")


def test_a_log_in_a_code_block_is_escaped() -> None:
    block = code_block("<script>&</script>")
    assert block.html == "<pre><code>&lt;script&gt;&amp;&lt;/script&gt;</code></pre>"
    assert block.plain == "```\n<script>&</script>\n```"


def test_the_rate_limit_allows_a_burst_then_a_steady_pace_and_says_so_once() -> None:
    limiter = RateLimiter(burst=3, per_minute=60)
    assert [limiter.check("@a:x", 0.0).allowed for _ in range(3)] == [True] * 3
    first = limiter.check("@a:x", 0.0)
    assert (first.allowed, first.first) == (False, True)
    assert first.retry_after == pytest.approx(1.0)
    second = limiter.check("@a:x", 0.5)
    assert (second.allowed, second.first) == (False, False)
    assert limiter.check("@b:x", 0.5).allowed  # one sender's flood does not limit another
    assert limiter.check("@a:x", 1.6).allowed
    again = limiter.check("@a:x", 1.6)
    assert (again.allowed, again.first) == (False, True)
    with pytest.raises(ValueError):
        RateLimiter(burst=0, per_minute=1)
