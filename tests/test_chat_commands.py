"""The chat's command table and parser (cis_bot/chat/commands.py): what a person types, what it
becomes, and the answers to mistakes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cis_bot.chat.commands import BY_NAME, COMMANDS, Access, CommandError, parse
from cis_bot.chat.compose import help_text


def test_every_command_of_the_issue_is_in_the_table_with_its_access() -> None:
    acting = {"run", "input", "approve", "cancel", "kill", "resume"}
    reading = {"help", "list", "status", "nodes", "sessions", "logs"}
    assert set(BY_NAME) == acting | reading
    assert {c.name for c in COMMANDS if c.access is Access.ACT} == acting
    for spec in COMMANDS:
        assert spec.summary and spec.details and spec.examples
        for example in spec.examples:
            assert parse(example).spec is spec, example


@pytest.mark.parametrize(
    ("text", "name", "args", "options"),
    [
        ("", "help", {}, {}),
        ("help", "help", {}, {}),
        ("HELP Input", "help", {"COMMAND": "input"}, {}),
        ("run hello --max-workers 2", "run", {"NAME": "hello"}, {"--max-workers": 2}),
        ("run --max-workers=3", "run", {}, {"--max-workers": 3}),
        ("status", "status", {}, {}),
        ("status 2026", "status", {"RUN": "2026"}, {}),
        ("logs 2026:build 200", "logs", {"RUN:TASK": "2026:build", "LINES": "200"}, {}),
        ("logs build", "logs", {"RUN:TASK": "build"}, {}),
        ("kill 2026:build:2", "kill", {"RUN:TASK": "2026:build:2"}, {}),
        ("approve 2026 deploy", "approve", {"RUN": "2026", "TASK": "deploy"}, {}),
        # The text is the rest of the message as typed: spaces, quotes, dashes and all.
        (
            "input 2026:ask  yes, 'really'  --force",
            "input",
            {"RUN:TASK": "2026:ask", "TEXT": "yes, 'really'  --force"},
            {},
        ),
        ("input\u00a02026:ask\u00a0ja", "input", {"RUN:TASK": "2026:ask", "TEXT": "ja"}, {}),
        (
            "input 2026:ask line one\nline two",
            "input",
            {"RUN:TASK": "2026:ask", "TEXT": "line one\nline two"},
            {},
        ),
    ],
)
def test_parse(text: str, name: str, args: dict[str, str], options: dict[str, int]) -> None:
    command = parse(text)
    assert (command.name, dict(command.args), dict(command.options)) == (name, args, options)


@pytest.mark.parametrize(
    ("text", "message", "usage"),
    [
        (
            "stauts",
            "unknown command 'stauts'; did you mean `status`? (`!cis help` lists them)",
            None,
        ),
        ("frobnicate", "unknown command 'frobnicate' (`!cis help` lists them)", None),
        ("help stauts", "unknown command 'stauts'; did you mean `status`?", None),
        ("input 2026:ask", "input: missing TEXT", "!cis input RUN:TASK TEXT"),
        ("approve 2026", "approve: missing TASK", "!cis approve RUN TASK"),
        ("approve 2026 a b", "approve: unexpected 'b'", "!cis approve RUN TASK"),
        ("logs a:b 0", "logs: LINES must be a whole number from 1 to 10000, not '0'", "!cis logs"),
        ("logs a:b ٣", "LINES must be a whole number", "!cis logs"),
        ("kill a:b:c", "the attempt ('c') must be a number", "!cis kill RUN:TASK"),
        ("kill a::b", "is not a session id", "!cis kill RUN:TASK"),
        ("run ../../etc/passwd", "is not a DAG name", "!cis run [NAME]"),
        ("run .hidden", "is not a DAG name", "!cis run [NAME]"),
        ("run x --max-workers", "--max-workers needs a value (N)", "!cis run"),
        (
            "run x --max-workers 0",
            "--max-workers must be a whole number from 1 to 1000",
            "!cis run",
        ),
        ("run x --fast", "run: unknown option '--fast'", "!cis run"),
        ("status a:b", "'a:b' is not a run id", "!cis status [RUN]"),
    ],
)
def test_mistakes_say_what_is_wrong_and_how_to_use_the_command(
    text: str, message: str, usage: str | None
) -> None:
    with pytest.raises(CommandError) as caught:
        parse(text)
    assert message in str(caught.value)
    if usage is None:
        assert caught.value.spec is None
    else:
        assert caught.value.spec is not None
        assert caught.value.spec.usage("!cis").startswith(usage)


def test_a_flood_is_not_echoed_back_whole() -> None:
    with pytest.raises(CommandError) as caught:
        parse("x" * 10_000)
    assert len(str(caught.value)) < 120


def test_the_prefix_in_messages_is_the_configured_one() -> None:
    with pytest.raises(CommandError) as caught:
        parse("stauts", prefix="!bot")
    assert "`!bot help`" in str(caught.value)


@given(st.text(max_size=300))
def test_no_text_makes_the_parser_raise_anything_but_a_command_error(text: str) -> None:
    try:
        command = parse(text)
    except CommandError as exc:
        assert str(exc)
    else:
        assert command.name in BY_NAME


def test_help_lists_every_command_and_tells_who_may_act() -> None:
    everything = help_text("!cis", level=50)
    for spec in COMMANDS:
        assert spec.usage("!cis") in everything.plain
        assert f"<code>{spec.usage('!cis')}</code>" in everything.html
    assert "power level 50" in everything.plain
    one = help_text("!cis", BY_NAME["input"], level=75)
    assert one.plain.startswith("`!cis input RUN:TASK TEXT`")
    assert "power level 75" in one.plain
    assert "`!cis input 2115:deploy yes`" in one.plain
    reading = help_text("!cis", BY_NAME["status"], level=50)
    assert "Who: anyone in the room." in reading.plain
