"""The chat commands: one table, from which parsing, usage lines and ``help`` are all made.

A command is the text after the prefix (``!cis``): a name, then its arguments separated by
whitespace; an argument marked ``rest`` (``input``'s TEXT) takes the rest of the message as it
was typed. Names are matched without regard to case. ``parse`` returns a :class:`Command` or
raises :class:`CommandError`, whose message is the reply (a did-you-mean for an unknown name,
the usage for bad arguments).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from enum import StrEnum

import attrs

from cis_bot.errors import UserError
from cis_bot.ids import SessionRef

#: ``logs``: the most lines one command may ask for.
MAX_LOG_LINES = 10_000
#: ``run --max-workers``: the largest value accepted.
MAX_WORKERS = 1_000


class Access(StrEnum):
    #: Any member of the room.
    READ = "read"
    #: ``[node] allowed_users``, or members at ``[chat] command_power_level`` in the room.
    ACT = "act"


class Kind(StrEnum):
    """What an argument holds (it says how it is checked, and how a run is found from it)."""

    RUN = "run"
    SESSION = "session"
    TASK = "task"
    TEXT = "text"
    LINES = "lines"
    NAME = "name"
    COMMAND = "command"


@attrs.frozen
class Param:
    name: str
    kind: Kind
    optional: bool = False
    #: Takes the rest of the message, spaces and all.
    rest: bool = False

    def usage(self) -> str:
        return f"[{self.name}]" if self.optional else self.name


@attrs.frozen
class Option:
    flag: str
    metavar: str
    minimum: int
    maximum: int

    def usage(self) -> str:
        return f"[{self.flag} {self.metavar}]"


@attrs.frozen
class CommandSpec:
    name: str
    params: tuple[Param, ...]
    access: Access
    summary: str
    details: str
    examples: tuple[str, ...]
    options: tuple[Option, ...] = ()

    def usage(self, prefix: str) -> str:
        words = [prefix, self.name, *(p.usage() for p in self.params)]
        return " ".join([*words, *(o.usage() for o in self.options)])


_RUN = Param("RUN", Kind.RUN)
_SESSION = Param("RUN:TASK", Kind.SESSION)

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(
        "help",
        (Param("COMMAND", Kind.COMMAND, optional=True),),
        Access.READ,
        "the commands, or one command's usage",
        "Without a command: every command and what it does. With one: its usage, what it does, "
        "who may use it, and examples.",
        ("help", "help input"),
    ),
    CommandSpec(
        "run",
        (Param("NAME", Kind.NAME, optional=True),),
        Access.ACT,
        "start a run of a DAG in this room",
        "Runs NAME.toml (or NAME.json) from the node's DAG directory ([chat] dags_dir), in this "
        "room, in the mode of the node's config. To run a DAG file of your own, attach the "
        ".toml or .json file with `run` as its caption, or answer the file with a reply "
        "saying `run`; its raw `command` tasks run only where the node's owner allows shell "
        "for you. The answer names the run id.",
        ("run hello", "run build --max-workers 2"),
        (Option("--max-workers", "N", 1, MAX_WORKERS),),
    ),
    CommandSpec(
        "list",
        (),
        Access.READ,
        "the runs in this room",
        "Every run in this room, oldest first: its id, DAG, status and tasks done.",
        ("list",),
    ),
    CommandSpec(
        "status",
        (Param("RUN", Kind.RUN, optional=True),),
        Access.READ,
        "a run's tasks",
        "A run's tasks with their status, attempts and why they stopped (default: the latest "
        "run in this room). A run id or any prefix only it has names a run.",
        ("status", "status 20261127-2115"),
    ),
    CommandSpec(
        "nodes",
        (),
        Access.READ,
        "the worker nodes in this room",
        "The nodes that heartbeat in this room: the agents they run, their load and capacity, "
        "and how long ago they last beat; nodes whose heartbeat lapsed are shown as down.",
        ("nodes",),
    ),
    CommandSpec(
        "sessions",
        (Param("RUN", Kind.RUN, optional=True),),
        Access.READ,
        "agent sessions",
        "The sessions running in this room's runs (with a run: all of that run's sessions, "
        "ended ones too): state, node, time, and the last line or why it is blocked.",
        ("sessions", "sessions 20261127-2115"),
    ),
    CommandSpec(
        "logs",
        (_SESSION, Param("LINES", Kind.LINES, optional=True)),
        Access.READ,
        "the end of a session's output",
        "The last LINES lines (default: the node's [chat] log_lines) of a session's transcript, "
        "readable: Claude Code's stream-json as the conversation (prompt, replies, tool calls, "
        "result and cost), other agents' output as text. A longer log comes as a file too.",
        ("logs 20261127-2115:build", "logs 2115:build:2 200"),
    ),
    CommandSpec(
        "input",
        (_SESSION, Param("TEXT", Kind.TEXT, rest=True)),
        Access.ACT,
        "type into a session, then Enter",
        "Types TEXT (the rest of the message, as written) into the session's terminal and "
        "presses Enter: this answers a blocked agent. Replying to the notice that says a "
        "session is blocked does the same without naming it.",
        ("input 2115:deploy yes", "input 20261127-2115:review Use the second option"),
    ),
    CommandSpec(
        "approve",
        (_RUN, Param("TASK", Kind.TASK)),
        Access.ACT,
        "let a task that waits for approval start",
        "Approves a confirmed, recommended or arbitrated task (arbitrated: each stakeholder "
        "approves as themselves). A ✅ or 👍 reaction to the task's approval notice does the "
        "same.",
        ("approve 2115 deploy",),
    ),
    CommandSpec(
        "cancel",
        (_RUN,),
        Access.ACT,
        "cancel a run",
        "Cancels the run: its running sessions are stopped and its unfinished tasks are "
        "recorded as cancelled.",
        ("cancel 2115",),
    ),
    CommandSpec(
        "kill",
        (_SESSION,),
        Access.ACT,
        "end one session",
        "Kills the session: its task fails and is not retried.",
        ("kill 2115:build",),
    ),
    CommandSpec(
        "resume",
        (_RUN,),
        Access.ACT,
        "re-run a failed run's unfinished tasks",
        "A failed or cancelled run runs again as a new run that keeps its completed tasks; a "
        "run whose coordinator stopped is driven on from where its log ends.",
        ("resume 2115",),
    ),
)

BY_NAME: Mapping[str, CommandSpec] = {spec.name: spec for spec in COMMANDS}


class CommandError(UserError):
    """A command that cannot be parsed: the message says why and what to type instead."""

    def __init__(self, message: str, spec: CommandSpec | None = None) -> None:
        super().__init__(message)
        self.spec = spec


@attrs.frozen
class Command:
    spec: CommandSpec
    #: Parameter name -> the text given (absent optional parameters are left out).
    args: Mapping[str, str]
    options: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def acting(self) -> bool:
        return self.spec.access is Access.ACT

    def arg(self, name: str) -> str | None:
        return self.args.get(name)

    @property
    def run_ref(self) -> str | None:
        """The run this command names, as typed (a run id prefix), if it names one by run."""
        for param in self.spec.params:
            value = self.args.get(param.name)
            if value is None:
                continue
            if param.kind is Kind.RUN:
                return value
            if param.kind is Kind.SESSION:
                return SessionRef.parse(value).run
        return None

    @property
    def session_ref(self) -> SessionRef | None:
        for param in self.spec.params:
            value = self.args.get(param.name)
            if value is not None and param.kind is Kind.SESSION:
                return SessionRef.parse(value)
        return None


_WORD = re.compile(r"\S+")


def parse(text: str, *, prefix: str = "!cis") -> Command:
    """The command in ``text`` (what follows the prefix); empty text asks for help."""
    words = list(_WORD.finditer(text))
    if not words:
        return Command(BY_NAME["help"], {})
    name = words[0].group().lower()
    spec = BY_NAME.get(name)
    if spec is None:
        raise CommandError(unknown_command(words[0].group(), prefix))
    given = words[1:]
    positional: list[str] = []
    options: dict[str, int] = {}
    index = 0
    while index < len(given):
        word = given[index].group()
        if _takes_rest(spec, len(positional)):
            positional.append(text[given[index].start() :].rstrip())
            break
        option = next((o for o in spec.options if o.flag == word.split("=", 1)[0]), None)
        if option is None:
            if word.startswith("--"):
                raise CommandError(f"{name}: unknown option {word!r}", spec)
            positional.append(word)
            index += 1
            continue
        if "=" in word:
            value = word.split("=", 1)[1]
        else:
            index += 1
            if index >= len(given):
                raise CommandError(f"{name}: {option.flag} needs a value ({option.metavar})", spec)
            value = given[index].group()
        options[option.flag] = _whole(value, option.flag, option.minimum, option.maximum, spec)
        index += 1
    params = spec.params
    required = [p for p in params if not p.optional]
    if len(positional) < len(required):
        missing = " ".join(p.name for p in required[len(positional) :])
        raise CommandError(f"{name}: missing {missing}", spec)
    if len(positional) > len(params):
        extra = " ".join(positional[len(params) :])
        raise CommandError(f"{name}: unexpected {_shown(extra)!r}", spec)
    args = {
        param.name: value if param.rest else _checked(param, value, spec, prefix)
        for param, value in zip(params, positional, strict=False)
    }
    return Command(spec, args, options)


def _takes_rest(spec: CommandSpec, position: int) -> bool:
    return position < len(spec.params) and spec.params[position].rest


def _checked(param: Param, value: str, spec: CommandSpec, prefix: str) -> str:
    name = spec.name
    match param.kind:
        case Kind.SESSION:
            try:
                SessionRef.parse(value)
            except UserError as exc:
                raise CommandError(f"{name}: {_shown(str(exc), 200)}", spec) from None
        case Kind.RUN | Kind.TASK | Kind.NAME:
            if ":" in value or "/" in value or "\\" in value or value.startswith("."):
                what = {Kind.RUN: "a run id", Kind.TASK: "a task id", Kind.NAME: "a DAG name"}
                raise CommandError(f"{name}: {_shown(value)!r} is not {what[param.kind]}", spec)
        case Kind.LINES:
            _whole(value, param.name, 1, MAX_LOG_LINES, spec)
        case Kind.COMMAND:
            if value.lower() not in BY_NAME:
                raise CommandError(unknown_command(value, prefix))
            value = value.lower()
    return value


def _whole(value: str, what: str, minimum: int, maximum: int, spec: CommandSpec) -> int:
    if not (value.isascii() and value.isdigit()) or not minimum <= int(value) <= maximum:
        raise CommandError(
            f"{spec.name}: {what} must be a whole number from {minimum} to {maximum}, "
            f"not {value!r}",
            spec,
        )
    return int(value)


def unknown_command(word: str, prefix: str) -> str:
    close = difflib.get_close_matches(word.lower(), list(BY_NAME), n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"unknown command {_shown(word)!r}{hint} (`{prefix} help` lists them)"


def _shown(text: str, limit: int = 40) -> str:
    """``text`` cut for quoting in an answer (a flood typed in is not echoed back whole)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
