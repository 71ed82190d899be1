"""config.toml -> :class:`Config`: execution settings and agent profiles, with defaults.

Sections (every key optional; unknown keys are errors)::

    [dag]         execution_mode = "hybrid"        # local | matrix | hybrid | federation
                  skills_dir = "skills"            # CIS skills, after those beside the DAG
    [dag.local]   max_workers = 4, default_agent = "claude"
    [dag.matrix]  room_prefix = "!dag-", home_server = "cis.local", broadcast_interval_ms = 500
    [dag.hybrid]  broadcast_status = true, broadcast_output = false, accept_remote_tasks = true
    [chat]        enabled, prefix = "!cis", dags_dir = "dags", command_power_level = 50, ...
    [agents.NAME] argv, prompt_via, prompt_escapes, env, blocked_patterns, idle_patterns,
                  exit_input, pattern_lines, ready_pattern, quiet_secs, detect_tty_read, screen,
                  upstream_in_prompt, output, provider, continue_via, keep_args, resume_args,
                  config_args, config_env

A section is an attrs class whose fields are its keys: the reader below derives the keys, their
types and their defaults from the class, so adding a section (``[node]``, say) is a new class
plus one field on its parent. Field metadata adds bounds (``{"min": 1}``, ``{"gt": 0}``) or a
custom reader (``{"read": fn}``, as ``agents`` has); ``{"internal": True}`` marks a field that is
not a key in the file.

``[agents.NAME]`` for a built-in profile (shell, claude, claude-interactive, aider, codex,
opencode) overrides only the keys it gives; a new NAME must give ``argv``. ``Config.agents``
holds the built-ins merged with the file's profiles.
"""

from __future__ import annotations

import os
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import attrs

from cis_bot import private
from cis_bot.agent_checks import PROFILE_CHECKS
from cis_bot.errors import InputError, UserError
from cis_bot.ids import localpart_problem, server_name_problem, user_id_problem
from cis_bot.session.profile import AgentProfile, PromptVia
from cis_bot.session.profiles import BUILTIN_PROFILES, PROMPT_TOKEN
from cis_bot.validation import Table, format_for, parse_document, read_text, suggestion

#: Environment variable naming the config file; overrides the default location.
CONFIG_ENV = "CIS_CONFIG"


class Assignment(StrEnum):
    #: The worker with the lowest load / capacity (its heartbeat, plus what we gave it since).
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"


class ExecutionMode(StrEnum):
    LOCAL = "local"
    MATRIX = "matrix"
    HYBRID = "hybrid"
    FEDERATION = "federation"


# -- checks of single values (a field's metadata "check"): why a value is wrong, or None ---------


def _each(problem_of: Callable[[str], str | None]) -> Callable[[object], str | None]:
    """A check of every item of a list of strings."""

    def check(values: object) -> str | None:
        assert isinstance(values, tuple)
        for i, value in enumerate(values):
            problem = problem_of(value)
            if problem:
                return f"item {i} ({value!r}): {problem}"
        return None

    return check


def _text(problem_of: Callable[[str], str | None]) -> Callable[[object], str | None]:
    """A check of a string that may be left empty (meaning: the default)."""

    def check(value: object) -> str | None:
        assert isinstance(value, str)
        problem = problem_of(value) if value else None
        return f"{value!r}: {problem}" if problem else None

    return check


def _node_id_problem(node_id: str) -> str | None:
    # It names the bot (cis_<id>), the registration (cis-<id>) and files: Matrix's safe letters.
    if not re.fullmatch(r"[a-z0-9._=-]+", node_id):
        return "a node id holds only a-z, 0-9 and . _ = -"
    return None


def _homeserver_url_problem(url: str) -> str | None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "expected the homeserver's client-server URL, like 'http://127.0.0.1:8008'"
    try:
        parsed.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as exc:
        return str(exc)
    if parsed.query or parsed.fragment:
        return "a homeserver URL has no query or fragment"
    return None


def _room_prefix_problem(prefix: str) -> str | None:
    # Local run rooms are #<prefix><run_id>:<server>: an alias the appservice's namespace holds.
    if not re.fullmatch(r"[A-Za-z0-9._=/+-]{0,64}", prefix.lstrip("!#")):
        return (
            "after a leading '!' or '#', at most 64 of A-Z a-z 0-9 . _ = / + - "
            "(it begins room aliases: #<prefix><run_id>:<server>)"
        )
    return None


def _server_problem(name: str) -> str | None:
    problem = server_name_problem(name)
    return f"not a Matrix server name (host[:port]): {problem}" if problem else None


def _port_problem(port: object) -> str | None:
    assert isinstance(port, int)
    return f"must be a port number, 0-65535, got {port}" if port > 65535 else None


@attrs.frozen
class LocalConfig:
    """``[dag.local]``: running tasks on this machine."""

    #: Tasks running at once (a DAG's ``max_workers`` and ``--max-workers`` override it).
    max_workers: int = attrs.field(default=4, metadata={"min": 1})
    #: Agent profile for tasks that give a ``prompt`` and no ``agent``.
    default_agent: str = attrs.field(default="claude", metadata={"nonempty": True})
    #: Who is invited into each local run's room to follow it (Matrix user ids); None: every
    #: person's account on the local homeserver (``cis homeserver add-user``'s).
    watchers: tuple[str, ...] | None = attrs.field(
        default=None, metadata={"check": _each(user_id_problem)}
    )


@attrs.frozen
class MatrixConfig:
    """``[dag.matrix]``: where runs' rooms live."""

    room_prefix: str = attrs.field(default="!dag-", metadata={"check": _text(_room_prefix_problem)})
    home_server: str = attrs.field(
        default="cis.local",
        metadata={"nonempty": True, "check": _text(_server_problem)},
    )
    #: Least time between two status broadcasts of one session.
    broadcast_interval_ms: int = attrs.field(default=500, metadata={"min": 0})
    #: After a run, how long to wait for an unreachable homeserver to take the queued events.
    flush_timeout_secs: float = attrs.field(default=60.0, metadata={"gt": 0})
    #: Matrix mode: how long a task waits for a live worker that runs its agent, then fails.
    no_worker_timeout_secs: float = attrs.field(default=60.0, metadata={"gt": 0})
    #: Matrix mode: how the coordinator picks among the live workers that run a task's agent.
    assignment: Assignment = Assignment.LEAST_LOADED
    #: After a worker lost an attempt (its lease lapsed), the task prefers other workers for
    #: this long; with no other, it waits for this to pass.
    lost_exclusion_secs: float = attrs.field(default=30.0, metadata={"min": 0})
    #: The circuit breaker: a worker that lost or failed this many of a run's attempts in a
    #: row gets none of its tasks for ``breaker_cooldown_secs`` (0: never cooled down).
    breaker_failures: int = attrs.field(default=3, metadata={"min": 0})
    breaker_cooldown_secs: float = attrs.field(default=60.0, metadata={"min": 0})


@attrs.frozen
class HybridConfig:
    """``[dag.hybrid]``: local execution with the room as monitor."""

    broadcast_status: bool = True
    #: Output samples are large: off by default; fetch transcripts through the API instead.
    broadcast_output: bool = False
    accept_remote_tasks: bool = True


@attrs.frozen
class DagConfig:
    """``[dag]``."""

    execution_mode: ExecutionMode = ExecutionMode.HYBRID
    #: A folder of CIS skill files, searched after the ``skills/`` folder beside a DAG file
    #: (relative to the config file; ``~`` is the home directory).
    skills_dir: str = ""
    local: LocalConfig = attrs.field(factory=LocalConfig)
    matrix: MatrixConfig = attrs.field(factory=MatrixConfig)
    hybrid: HybridConfig = attrs.field(factory=HybridConfig)


#: A node's lease when ``[node] lease_secs`` is unset (and ``heartbeat_secs`` is short enough).
DEFAULT_LEASE_SECS = 5.0


@attrs.frozen
class NodeConfig:
    """``[node]``: this machine as a Matrix appservice (``cis node``, matrix and hybrid modes).

    ``cis registration generate`` fills in the tokens and writes the registration file that the
    homeserver loads; the two must agree, so change them through that command.
    """

    #: This node's name in assignments (``assigned_to``) and heartbeats.
    id: str = attrs.field(default="", metadata={"nonempty": True, "check": _text(_node_id_problem)})
    #: Client-server API base URL of the homeserver, e.g. ``http://127.0.0.1:8008``.
    homeserver: str = attrs.field(default="", metadata={"check": _text(_homeserver_url_problem)})
    #: The server name in user ids, after ":" (default: dag.matrix.home_server).
    server_name: str = attrs.field(default="", metadata={"check": _text(_server_problem)})
    #: The bot's localpart (default ``cis_<id>``); its exclusive namespace is ``<localpart>(_.*)?``.
    bot_localpart: str = attrs.field(default="", metadata={"check": _text(localpart_problem)})
    #: Where this node's appservice HTTP server listens; the registration's ``url`` points here.
    listen_host: str = "127.0.0.1"
    listen_port: int = attrs.field(default=29333, metadata={"min": 0, "check": _port_problem})
    as_token: str = ""
    hs_token: str = ""
    #: Users who may invite the bot and give it orders (besides those at assign_power_level).
    allowed_users: tuple[str, ...] = attrs.field(
        default=(), metadata={"check": _each(user_id_problem)}
    )
    #: Room members at or above this power level are trusted in that room: they may assign this
    #: node tasks and control it, and a coordinator hands them tasks.
    assign_power_level: int = 50
    #: Users, besides this node's own, trusted to coordinate runs: their runs are this node's
    #: to list, show and re-run (``cis dag list / status / resume``). Runs created by anyone
    #: else do not exist for this node.
    coordinators: tuple[str, ...] = attrs.field(
        default=(), metadata={"check": _each(user_id_problem)}
    )
    #: Users this node, coordinating a run, hands tasks to even without the power level above.
    workers: tuple[str, ...] = attrs.field(default=(), metadata={"check": _each(user_id_problem)})
    #: Agent profiles this node runs for others; None: every profile but ``shell`` (a raw
    #: command from the room runs only where the worker's owner allowed it).
    accept_agents: tuple[str, ...] | None = None
    #: How often the node renews its leases: its ``cis.node.heartbeat`` in a room where it holds
    #: attempts, and a coordinator's ``cis.dag.run.lease`` (docs/federation.md).
    heartbeat_secs: float = attrs.field(default=2.0, metadata={"gt": 0})
    #: A lease not renewed for this long lapses: an attempt it held is lost and runs elsewhere
    #: (the worker stops it itself: self-fencing); a run's coordinator may be taken over. At
    #: least twice ``heartbeat_secs``; unset: 5 s, or twice ``heartbeat_secs`` if that is longer.
    lease_secs: float | None = attrs.field(default=None, metadata={"gt": 0})
    #: How often the node heartbeats in a room where it holds nothing (good for three periods).
    idle_heartbeat_secs: float = attrs.field(default=10.0, metadata={"gt": 0})
    #: What this node offers for ``node_selector`` (docs/federation.md#placement), besides
    #: what it detects (arch, os, cores, memory, free disk): CIS's features (``cuda``,
    #: ``metal``...), labels, and its GPU (0 MB: none).
    features: tuple[str, ...] = ()
    labels: Mapping[str, str] = attrs.field(factory=dict)
    gpu_memory_mb: int = attrs.field(default=0, metadata={"min": 0})

    @property
    def lease_period_secs(self) -> float:
        """``lease_secs``, or when unset 5 s, at least twice ``heartbeat_secs``."""
        if self.lease_secs is not None:
            return self.lease_secs
        return max(DEFAULT_LEASE_SECS, 2 * self.heartbeat_secs)

    @property
    def localpart(self) -> str:
        return self.bot_localpart or f"cis_{self.id}"


@attrs.frozen
class ChatConfig:
    """``[chat]``: commands people type in a room (docs/chat.md)."""

    #: Answer commands; None (unset): on for ``cis node --coordinator`` and for a ``cis dag
    #: execute`` run in its own run's room, off for other nodes.
    enabled: bool | None = None
    #: What starts a command; in a direct chat (the bot and one person) it may be left out.
    prefix: str = attrs.field(default="!cis", metadata={"nonempty": True})
    #: ``run NAME`` runs ``<dags_dir>/NAME.toml`` (or ``.json``); relative to the config file.
    dags_dir: str = attrs.field(default="dags", metadata={"nonempty": True})
    #: Acting commands (run, input, approve, cancel, kill, resume): ``[node] allowed_users``,
    #: or members at this power level in the room (its creators count as above any level).
    command_power_level: int = 50
    #: Senders whose attached DAG files may hold raw ``command`` tasks (shell) on this node.
    shell_users: tuple[str, ...] = ()
    #: Per sender: ``rate_burst`` commands at once, then ``rate_per_minute``.
    rate_burst: int = attrs.field(default=10, metadata={"min": 1})
    rate_per_minute: float = attrs.field(default=30.0, metadata={"gt": 0})
    #: Lines of a log shown in the room by default; a longer log comes as a file too.
    log_lines: int = attrs.field(default=40, metadata={"min": 1})


def _builtin_agents() -> Mapping[str, AgentProfile]:
    return types.MappingProxyType(dict(BUILTIN_PROFILES))


def _read_agents(table: Table) -> Mapping[str, AgentProfile]:
    """``[agents.NAME]`` tables merged over the built-in profiles."""
    merged = dict(BUILTIN_PROFILES)
    for name in table.data:
        if not name.strip() or any(ch.isspace() for ch in name) or "\x00" in name:
            table.fail("an agent profile name must be non-empty and contain no whitespace", name)
        sub = table.table(name)
        assert sub is not None
        given = read_values(AgentProfile, sub, checks=PROFILE_CHECKS)
        base = merged.get(name)
        if base is None:
            if "argv" not in given:
                sub.fail(
                    f"a new agent profile needs 'argv' ({name!r} is not a built-in profile; "
                    f"those are {', '.join(sorted(BUILTIN_PROFILES))})",
                    "argv",
                )
            profile = AgentProfile(name=name, **given)
        else:
            profile = attrs.evolve(base, **given)
        if profile.prompt_via is PromptVia.ARGUMENT and not any(
            PROMPT_TOKEN in arg for arg in profile.argv
        ):
            sub.fail(
                f"prompt_via is 'argument' but no argv element contains {PROMPT_TOKEN!r}, so "
                f"the prompt would be lost; add {PROMPT_TOKEN!r} to argv or change prompt_via",
                "argv",
            )
        merged[name] = profile
    return types.MappingProxyType(merged)


@attrs.frozen
class Config:
    dag: DagConfig = attrs.field(factory=DagConfig)
    node: NodeConfig = attrs.field(factory=NodeConfig)
    chat: ChatConfig = attrs.field(factory=ChatConfig)
    #: Every agent profile by name: the built-ins merged with the file's ``[agents.NAME]``.
    agents: Mapping[str, AgentProfile] = attrs.field(
        factory=_builtin_agents, metadata={"read": _read_agents}
    )
    #: The file this config came from (None: defaults only).
    source: Path | None = attrs.field(default=None, metadata={"internal": True})

    @property
    def default_agent(self) -> str:
        return self.dag.local.default_agent

    @property
    def skills_dirs(self) -> tuple[Path, ...]:
        """Where skills are looked for after the DAG's own ``skills/`` folder."""
        if not self.dag.skills_dir:
            return ()
        folder = Path(self.dag.skills_dir).expanduser()
        if not folder.is_absolute() and self.source is not None:
            folder = self.source.parent / folder
        return (folder,)

    @property
    def dags_dir(self) -> Path:
        """Where ``!cis run NAME`` finds DAGs: ``[chat] dags_dir``, relative to the config file
        (to the working directory without one)."""
        base = self.source.parent if self.source is not None else Path.cwd()
        return base / self.chat.dags_dir


# -- reading sections from their attrs classes ------------------------------------------------

# get_type_hints needs these names even when a module imports them only for type checking.
_TYPE_NAMES: dict[str, Any] = {
    "Mapping": Mapping,
    "Sequence": Sequence,
    "Path": Path,
    "AgentProfile": AgentProfile,
}


def _unwrap_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _read_value(table: Table, key: str, tp: Any, meta: Mapping[str, Any]) -> object:
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is str:
        return table.string(key, nonempty=bool(meta.get("nonempty")))
    if tp is bool:
        return table.opt_boolean(key)
    if tp is int:
        return table.opt_integer(key, minimum=meta.get("min"))
    if tp is float:
        return table.opt_number(key, positive="gt" in meta, minimum=meta.get("min"))
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        return table.choice(key, tp, next(iter(tp)))
    if origin is tuple and typing.get_args(tp)[0] is str:
        return table.string_list(key)
    if origin in (Mapping, dict) and typing.get_args(tp) == (str, str):
        return table.string_map(key)
    raise TypeError(f"config reader: no rule for {key!r} of type {tp!r}")


def read_values(
    cls: type[Any],
    table: Table,
    *,
    skip: Sequence[str] = ("name",),
    checks: Mapping[str, Callable[[object], str | None]] | None = None,
) -> dict[str, Any]:
    """The keys ``table`` gives for the attrs class ``cls``, read and checked by field type.

    Only the keys present are returned, so the result can build a new instance (absent keys
    take the class defaults) or ``attrs.evolve`` an existing one. ``skip`` names fields that are
    not keys (a profile's name is its table's key). Nested attrs classes are sub-tables.
    """
    hints = typing.get_type_hints(cls, localns=_TYPE_NAMES)
    fields = [
        f
        for f in attrs.fields(cls)
        if f.init and f.name not in skip and not f.metadata.get("internal")
    ]
    table.reject_unknown([f.name for f in fields])
    values: dict[str, Any] = {}
    for f in fields:
        if f.name not in table:
            continue
        tp = hints[f.name]
        reader = f.metadata.get("read")
        sub = table.table(f.name) if reader or attrs.has(tp) else None
        if reader:
            assert sub is not None
            values[f.name] = reader(sub)
        elif attrs.has(tp):
            assert sub is not None
            values[f.name] = tp(**read_values(tp, sub, skip=()))
        else:
            values[f.name] = _read_value(table, f.name, tp, f.metadata)
        check = (checks or {}).get(f.name) or f.metadata.get("check")
        problem = check(values[f.name]) if check and values[f.name] is not None else None
        if problem:
            table.fail(problem, f.name)
    return values


# -- loading ----------------------------------------------------------------------------------


def default_config_path() -> Path | None:
    """Where ``load_config(None)`` reads: ``$CIS_CONFIG``, else the user's config if present."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    candidate = Path(base) / "cis" / "config.toml"
    return candidate if candidate.is_file() else None


def default_state_dir() -> Path:
    """Where cis keeps runs, control sockets and the local homeserver: ``$CIS_STATE_DIR``, else
    ``$XDG_STATE_HOME/cis`` (``~/.local/state/cis``)."""
    if env := os.environ.get("CIS_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cis"


#: In a state directory whose modes cis has made owner-only (older versions left some 0644).
STATE_DIR_MARKER = ".private"


def open_state_dir(given: Path | None) -> Path:
    """The state directory (``given``, else the default), made if need be: for its owner only,
    whatever the umask (see ``private.py``). The first time, the modes of what an older cis left
    there are fixed too. UserError when it cannot be used (not a directory, no permission)."""
    path = given or default_state_dir()
    try:
        private.make_dirs(path)
        marker = path / STATE_DIR_MARKER
        if not marker.exists():
            private.fix_tree(path)
            private.write_file(marker, "cis keeps this directory for its owner only (0700/0600)\n")
    except OSError as exc:
        raise UserError(
            f"cannot use {path} as the state directory: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else "")
        ) from None
    return path


def load_config(path: Path | None = None) -> Config:
    """Read a config file; ``None`` means ``$CIS_CONFIG``, else ``$XDG_CONFIG_HOME/cis/config.toml``
    (``~/.config/cis/config.toml``) if it exists, else the defaults. Raises InputError."""
    if path is None:
        path = default_config_path()
        if path is None:
            return Config()
    return attrs.evolve(parse_config(read_text(path), file=str(path)), source=Path(path))


def parse_config(text: str, *, file: str) -> Config:
    """Validate config text (TOML; JSON when ``file`` ends in ``.json``)."""
    root = parse_document(text, file=file, fmt=format_for(file))
    config = Config(**read_values(Config, root, skip=()))
    if any(ch.isspace() for ch in config.chat.prefix):
        raise InputError(
            f"the chat prefix {config.chat.prefix!r} must not contain whitespace",
            file=file,
            key="chat.prefix",
        )
    for i, agent in enumerate(config.node.accept_agents or ()):
        if agent not in config.agents:
            raise InputError(
                f"unknown agent profile {agent!r}{suggestion(agent, config.agents)}; "
                f"known profiles: {', '.join(sorted(config.agents))}",
                file=file,
                key=f"node.accept_agents[{i}]",
            )
    node = config.node
    if node.lease_secs is not None and node.lease_secs < 2 * node.heartbeat_secs:
        raise InputError(
            f"must be at least twice heartbeat_secs ({node.heartbeat_secs:g}), got "
            f"{node.lease_secs:g}: a lease must outlive a late heartbeat",
            file=file,
            key="node.lease_secs",
        )
    default_agent = config.dag.local.default_agent
    if default_agent not in config.agents:
        raise InputError(
            f"unknown agent profile {default_agent!r}{suggestion(default_agent, config.agents)}; "
            f"known profiles: {', '.join(sorted(config.agents))}",
            file=file,
            key="dag.local.default_agent",
        )
    return config
