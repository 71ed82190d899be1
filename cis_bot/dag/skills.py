"""CIS skills: the ``skill = "NAME"`` of a task, read from a skill file, as what the task runs.

A skill is a TOML file in a skills folder (``skills/`` next to the DAG file, then the config's
``[dag] skills_dir``), found by its ``[skill] name`` (or, without one, by its file name):
``<folder>/<file>.toml`` or ``<folder>/<dir>/skill.toml``. CIS's three kinds:

- ``type = "claude-agent"``: ``[agent.prompt] system`` and ``user_template`` become the task's
  prompt (the system text first, as CIS's agents send it), a template whose ``{{VARS}}`` are
  filled in when an attempt starts; ``[agent] model`` / ``max_tokens`` become the task's
  ``agent_config`` defaults, ``[agent.retry] max_attempts`` its retries, ``[agent.context]
  files`` a list of files the prompt points the agent to.
- ``type = "executor"``: ``[executor.steps]`` in file order. With ``[executor] type =
  "claude-agent"`` the steps are instructions for an agent (the prompt lists them, then
  ``[executor.on_error] prompt`` as what to do when a step fails); otherwise (``"shell"``, the
  default) they are shell commands run in order, stopping at the first that fails, after which
  ``[executor.on_error] command`` runs. ``[executor.env]`` joins the task's environment.
- ``type = "shell"``: ``[[commands]]`` (name, description, command) run in order, each
  ``[hooks] pre_NAME`` / ``post_NAME`` around the command of that name.

Reading files is this module's only I/O (like ``load_dag``'s); templates are rendered by
:func:`render_template`, a pure function the attempt calls with the run's values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path

import attrs

from cis_bot.errors import InputError
from cis_bot.validation import Table, parse_document, read_text


class SkillKind(StrEnum):
    CLAUDE_AGENT = "claude-agent"
    EXECUTOR = "executor"
    SHELL = "shell"


@attrs.frozen
class Skill:
    """A skill as a task uses it: a prompt template for an agent, or a shell script."""

    name: str
    kind: SkillKind
    file: Path
    #: Agent skills: the prompt, a template ({{VARS}}).
    prompt: str | None = None
    #: Shell skills and shell executors: the script.
    command: str | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    model: str | None = None
    max_tokens: int | None = None
    #: Retries after the first attempt (``[agent.retry] max_attempts`` - 1).
    retry: int | None = None
    #: What the skill says that cis_bot shows but does not act on.
    notes: tuple[str, ...] = ()


class UnknownSkill(Exception):
    """No skill of that name in the folders searched (the caller collects these)."""

    def __init__(self, name: str, searched: Sequence[Path], unreadable: Sequence[str]) -> None:
        super().__init__(name)
        self.name = name
        self.searched = tuple(searched)
        self.unreadable = tuple(unreadable)


#: The keys of a ``[skill]`` header, in a skill file and in a DAG file that is one.
SKILL_KEYS = frozenset(
    {
        "name",
        "version",
        "type",
        "description",
        "author",
        "entry",
        "icon",
        "homepage",
        "repository",
        "license",
    }
)
_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class SkillLibrary:
    """The skills of some folders, read on first use; one per DAG file being read."""

    def __init__(self, folders: Iterable[Path]) -> None:
        self.folders = tuple(dict.fromkeys(folders))
        self._index: dict[str, Path] | None = None
        self._unreadable: list[str] = []
        self._loaded: dict[str, Skill] = {}

    @property
    def unreadable(self) -> tuple[str, ...]:
        """Skill files that could not be read while looking for skills (file: error)."""
        return tuple(self._unreadable)

    def find(self, name: str) -> Skill:
        """The skill called ``name``; UnknownSkill when no folder has it; InputError (naming the
        skill's file) when its file is malformed."""
        if name in self._loaded:
            return self._loaded[name]
        path = self._paths().get(name)
        if path is None:
            raise UnknownSkill(name, self.folders, self._unreadable)
        skill = read_skill(path)
        self._loaded[name] = skill
        return skill

    def _paths(self) -> dict[str, Path]:
        """Skill name -> file: the first folder wins; within one, a [skill] name wins over a
        file name."""
        if self._index is not None:
            return self._index
        index: dict[str, Path] = {}
        for folder in self.folders:
            found: dict[str, Path] = {}
            by_stem: dict[str, Path] = {}
            for path in _skill_files(folder):
                stem = path.parent.name if path.name == "skill.toml" else path.stem
                by_stem.setdefault(stem, path)
                try:
                    root = parse_document(read_text(path), file=str(path), fmt="toml")
                    header = root.table("skill")
                    name = header.opt_string("name", nonempty=True) if header else None
                except InputError as exc:
                    self._unreadable.append(f"{path}: {exc.detail}")
                    continue
                found.setdefault(name or stem, path)
            for stem, path in by_stem.items():
                found.setdefault(stem, path)
            for name, path in found.items():
                index.setdefault(name, path)
        self._index = index
        return index


def _skill_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    try:
        files = sorted(p for p in folder.glob("*.toml") if p.is_file())
        files += sorted(p for p in folder.glob("*/skill.toml") if p.is_file())
    except OSError:
        return []
    return files


def read_skill(path: Path) -> Skill:
    """One skill file, checked (InputError naming the file and key)."""
    root = parse_document(read_text(path), file=str(path), fmt="toml")
    header = root.table("skill")
    if header is None:
        root.fail("a skill file needs a [skill] table with its name and type", "skill")
    header.reject_unknown(SKILL_KEYS)
    for key in SKILL_KEYS - {"type"}:
        header.opt_string(key)
    name = header.opt_string("name", nonempty=True) or path.stem
    kind_text = header.string("type", nonempty=True)
    if kind_text == "dag":
        header.fail('this skill is a DAG (type = "dag"): a task cannot run a nested DAG', "type")
    kind = header.enum_value("type", kind_text, SkillKind)
    match kind:
        case SkillKind.CLAUDE_AGENT:
            root.reject_unknown({"skill", "agent"})
            return _agent_skill(root, name, path)
        case SkillKind.EXECUTOR:
            root.reject_unknown({"skill", "executor"})
            return _executor_skill(root, name, path)
        case SkillKind.SHELL:
            root.reject_unknown({"skill", "commands", "hooks"})
            return _shell_skill(root, name, path)


def _agent_skill(root: Table, name: str, path: Path) -> Skill:
    agent = root.table("agent")
    if agent is None:
        root.fail("a claude-agent skill needs [agent.prompt] with a user_template", "agent")
    agent.reject_unknown(
        {"model", "max_tokens", "temperature", "context", "prompt", "tools", "retry"}
    )
    prompt_table = agent.table("prompt")
    if prompt_table is None:
        agent.fail("missing [agent.prompt] (system and user_template)", "prompt")
    prompt_table.reject_unknown({"system", "user_template"})
    system = prompt_table.string("system", "").strip()
    user = prompt_table.string("user_template", nonempty=True).strip()
    parts = [system, user] if system else [user]
    notes: list[str] = []
    context = agent.table("context")
    if context is not None:
        context.reject_unknown({"files"})
        files = context.string_list("files") or ()
        if files:
            parts.append("Context files (read them first):\n" + "\n".join(f"- {f}" for f in files))
    tools = agent.table("tools")
    if tools is not None:
        tools.reject_unknown({"allow_edit", "allow_shell", "allow_git"})
        allowed = [
            key for key in ("allow_edit", "allow_shell", "allow_git") if tools.opt_boolean(key)
        ]
        notes.append(
            f"skill {name!r}: [agent.tools] ({', '.join(allowed) or 'nothing allowed'}) is not "
            "enforced: what an agent may do is its profile's permission mode"
        )
    retry = None
    retry_table = agent.table("retry")
    if retry_table is not None:
        retry_table.reject_unknown({"max_attempts", "backoff"})
        attempts = retry_table.opt_integer("max_attempts", minimum=1)
        retry = None if attempts is None else attempts - 1
        backoff = retry_table.opt_string("backoff")
        if backoff is not None and backoff != "exponential":
            retry_table.fail(
                f"backoff {backoff!r}: cis_bot's retries back off exponentially "
                '(retry_backoff_secs, doubling); write "exponential" or leave it out',
                "backoff",
            )
    temperature = agent.opt_number("temperature", minimum=0)
    if temperature is not None:
        notes.append(
            f"skill {name!r}: [agent] temperature is not passed on: no built-in agent CLI "
            "takes one (give it in the task's agent_config for a profile that does)"
        )
    return Skill(
        name=name,
        kind=SkillKind.CLAUDE_AGENT,
        file=path,
        prompt="\n\n".join(parts),
        model=agent.opt_string("model", nonempty=True),
        max_tokens=agent.opt_integer("max_tokens", minimum=1),
        retry=retry,
        notes=tuple(notes),
    )


def _executor_skill(root: Table, name: str, path: Path) -> Skill:
    executor = root.table("executor")
    if executor is None:
        root.fail("an executor skill needs [executor.steps]", "executor")
    executor.reject_unknown({"type", "steps", "on_error", "env"})
    runner = executor.string("type", "shell", nonempty=True)
    if runner not in ("shell", "claude-agent"):
        executor.fail(f"unknown executor type {runner!r}; expected shell or claude-agent", "type")
    steps_table = executor.table("steps")
    if steps_table is None or not steps_table.data:
        executor.fail(
            "an executor skill needs [executor.steps] (step1 = ..., step2 = ...)", "steps"
        )
    steps = [steps_table.string(key, nonempty=True).strip() for key in steps_table.data]
    env = executor.string_map("env") or {}
    on_error = executor.table("on_error")
    handler_prompt = handler_command = None
    if on_error is not None:
        on_error.reject_unknown({"action", "prompt", "command"})
        on_error.opt_string("action", nonempty=True)
        handler_prompt = on_error.opt_string("prompt", nonempty=True)
        handler_command = on_error.opt_string("command", nonempty=True)
    if runner == "claude-agent":
        if handler_command is not None:
            on_error.fail(  # type: ignore[union-attr]
                "an agent executor's on_error is a prompt (what the agent does when a step "
                "fails), not a command",
                "command",
            )
        listed = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1))
        prompt = f"Carry out these steps in order:\n{listed}"
        if handler_prompt:
            prompt += f"\n\nIf a step fails:\n{handler_prompt.strip()}"
        return Skill(name=name, kind=SkillKind.EXECUTOR, file=path, prompt=prompt, env=env)
    if handler_prompt is not None:
        # Even beside a command: a prompt nothing reads would be dropped without a word.
        on_error.fail(  # type: ignore[union-attr]
            "a shell executor cannot hand a prompt to an agent: give on_error a 'command' "
            'alone, make it [executor] type = "claude-agent", or give the task an on_failure '
            "fix-up",
            "prompt",
        )
    return Skill(
        name=name,
        kind=SkillKind.EXECUTOR,
        file=path,
        command=shell_script(steps, on_error=handler_command),
        env=env,
    )


def _shell_skill(root: Table, name: str, path: Path) -> Skill:
    commands = root.table_list("commands")
    if not commands:
        root.fail("a shell skill needs [[commands]] (name, description, command)", "commands")
    hooks = root.string_map("hooks") or {}
    names: list[str] = []
    steps: list[str] = []
    for table in commands:
        table.reject_unknown({"name", "description", "command"})
        command_name = table.string("name", "").strip()
        table.opt_string("description")
        if command_name:
            names.append(command_name)
        if pre := hooks.get(f"pre_{command_name}"):
            steps.append(pre.strip())
        steps.append(table.string("command", nonempty=True).strip())
        if post := hooks.get(f"post_{command_name}"):
            steps.append(post.strip())
    for hook in hooks:
        target = hook.partition("_")[2]
        if not hook.startswith(("pre_", "post_")) or target not in names:
            root.fail(
                f"hook {hook!r} names no command; hooks are pre_NAME or post_NAME of a "
                f"[[commands]] name ({', '.join(names) or 'none named'})",
                f"hooks.{hook}",
            )
    return Skill(name=name, kind=SkillKind.SHELL, file=path, command=shell_script(steps))


def shell_script(steps: Sequence[str], *, on_error: str | None = None) -> str:
    """Commands run in order by one shell, stopping at the first that fails (its status is the
    script's); ``on_error`` runs after such a failure."""
    body = "\n".join(steps)
    script = f"set -e\n{body}"
    if on_error is None:
        return script
    return f"(\n{script}\n) || {{\nstatus=$?\n{on_error}\nexit $status\n}}"


def template_vars(text: str) -> list[str]:
    """The ``{{NAME}}`` variables a template uses, each once, in order."""
    return list(dict.fromkeys(_VAR.findall(text)))


def render_template(text: str, values: Mapping[str, str]) -> str:
    """``{{NAME}}`` replaced by ``values[NAME]``; a variable without a value is left as written
    (an agent reads ``{{FIX_SUMMARY}}`` as something for it to fill in)."""
    return _VAR.sub(lambda m: values.get(m.group(1), m.group(0)), text)
