"""dag.toml / .json loading: layouts, task resolution, defaults, and every validation error."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cis_bot.dag.load import load_dag, parse_dag
from cis_bot.dag.spec import (
    DEFAULT_RECOMMENDED_TIMEOUT_SECS,
    DagSpec,
    DefaultAction,
    Level,
    LevelKind,
    Policy,
    Trigger,
)
from cis_bot.errors import InputError
from cis_bot.session.profiles import BUILTIN_PROFILES

AGENTS = frozenset(BUILTIN_PROFILES)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def parse(text: str, *, fmt: Any = "toml", file: str = "dag.toml", **kw: Any) -> DagSpec:
    kw.setdefault("agents", AGENTS)
    kw.setdefault("default_agent", "claude")
    return parse_dag(textwrap.dedent(text), file=file, fmt=fmt, **kw)


def error(text: str, **kw: Any) -> InputError:
    with pytest.raises(InputError) as info:
        parse(text, **kw)
    return info.value


def one_task(body: str) -> str:
    return "[[tasks]]\n" + textwrap.dedent(body).strip() + "\n"


# -- layouts ----------------------------------------------------------------------------------


def test_cis_skill_layout() -> None:
    spec = parse(
        """
        [skill]
        name = "code-review"
        version = "1.0.0"
        type = "dag"
        description = "review"
        author = "CIS Team"

        [dag]
        policy = "allow_debt"
        max_workers = 3
        retry_backoff_secs = 0.25

        [[dag.tasks]]
        id = "fetch"
        command = "git diff"

        [[dag.tasks]]
        id = "analyze"
        deps = ["fetch"]
        prompt = "review the diff"
        """
    )
    assert spec.name == "code-review"
    assert spec.policy is Policy.ALLOW_DEBT
    assert spec.max_workers == 3
    assert spec.retry_backoff_secs == 0.25
    assert [t.id for t in spec.tasks] == ["fetch", "analyze"]
    assert spec.task("analyze").deps == ("fetch",)
    assert spec.source is None


def test_dag_layout_without_skill_and_dag_name_wins_over_skill_name() -> None:
    spec = parse(
        """
        [skill]
        name = "from-skill"
        [dag]
        name = "from-dag"
        [[dag.tasks]]
        id = "a"
        command = "true"
        """
    )
    assert spec.name == "from-dag"
    assert parse('[dag]\n[[dag.tasks]]\nid = "a"\ncommand = "true"\n').name == "dag"


def test_bare_tasks_layout_with_top_level_settings() -> None:
    spec = parse(
        """
        name = "bare"
        policy = "first_success"
        max_workers = 1
        [[tasks]]
        id = "a"
        command = "true"
        """
    )
    assert (spec.name, spec.policy, spec.max_workers) == ("bare", Policy.FIRST_SUCCESS, 1)
    assert spec.retry_backoff_secs == 1.0


def test_name_defaults_to_file_stem() -> None:
    assert parse(one_task('id = "a"\ncommand = "true"'), file="dir/nightly.toml").name == "nightly"


def test_json_has_the_same_shapes_as_toml() -> None:
    toml_spec = parse(
        """
        [dag]
        name = "j"
        [[dag.tasks]]
        id = "a"
        command = "echo a"
        level = { type = "mechanical", retry = 2 }
        [[dag.tasks]]
        id = "b"
        deps = ["a"]
        prompt = "p"
        env = { K = "v" }
        """
    )
    tasks = [
        {"id": "a", "command": "echo a", "level": {"type": "mechanical", "retry": 2}},
        {"id": "b", "deps": ["a"], "prompt": "p", "env": {"K": "v"}},
    ]
    wrapped = json.dumps({"dag": {"name": "j", "tasks": tasks}})
    bare = json.dumps({"name": "j", "tasks": tasks})
    assert parse(wrapped, fmt="json", file="x.json") == toml_spec
    assert parse(bare, fmt="json", file="x.json") == toml_spec


def test_skill_type_other_than_dag_is_an_error() -> None:
    err = error('[skill]\ntype = "native"\n' + one_task('id = "a"\ncommand = "true"'))
    assert err.key == "skill.type"
    assert 'type = "dag"' in str(err)


def test_unknown_skill_key_is_an_error() -> None:
    err = error('[skill]\ntype = "dag"\nauthr = "me"\n' + one_task('id = "a"\ncommand = "x"'))
    assert err.key == "skill.authr"
    assert "did you mean 'author'?" in str(err)


def test_tasks_in_both_layouts_is_an_error() -> None:
    err = error(
        '[[tasks]]\nid = "a"\ncommand = "x"\n[dag]\n[[dag.tasks]]\nid = "b"\ncommand = "y"\n'
    )
    assert err.key == "tasks"
    assert "both" in str(err)


def test_single_bracket_tasks_table_gets_a_hint() -> None:
    err = error('[dag]\n[dag.tasks]\nid = "a"\ncommand = "x"\n')
    assert err.key == "dag.tasks"
    assert "expected an array of tables, got a table" in str(err)
    assert "[[dag.tasks]]" in str(err)


# -- who runs a task --------------------------------------------------------------------------


def test_command_without_agent_runs_in_shell() -> None:
    task = parse(one_task('id = "a"\ncommand = "make test"')).task("a")
    assert (task.agent, task.prompt, task.command) == ("shell", "make test", "make test")


def test_prompt_without_agent_goes_to_default_agent() -> None:
    task = parse(one_task('id = "a"\nprompt = "fix it"'), default_agent="aider").task("a")
    assert (task.agent, task.prompt, task.command) == ("aider", "fix it", None)


def test_agent_with_only_command_uses_command_as_prompt() -> None:
    task = parse(one_task('id = "a"\nagent = "codex"\ncommand = "refactor x"')).task("a")
    assert (task.agent, task.prompt, task.command) == ("codex", "refactor x", "refactor x")


def test_agent_with_prompt_and_command_uses_prompt() -> None:
    spec = parse(one_task('id = "a"\nagent = "claude"\ncommand = "c"\nprompt = "p"'))
    task = spec.task("a")
    assert (task.agent, task.prompt, task.command) == ("claude", "p", "c")


def test_agent_runtime_is_cis_spelling_of_agent() -> None:
    task = parse(one_task('id = "a"\nagent_runtime = "opencode"\nprompt = "p"')).task("a")
    assert task.agent == "opencode"


def test_cis_default_runtime_means_the_configured_default_agent() -> None:
    text = one_task('id = "a"\nagent_runtime = "default"\nprompt = "p"')
    assert parse(text, default_agent="aider").task("a").agent == "aider"


def test_agent_and_agent_runtime_together_is_an_error() -> None:
    err = error(one_task('id = "a"\nagent = "claude"\nagent_runtime = "claude"\nprompt = "p"'))
    assert (err.task, err.key) == ("a", "agent_runtime")
    assert "not both" in str(err)


def test_command_and_prompt_without_agent_is_an_error() -> None:
    err = error(one_task('id = "a"\ncommand = "c"\nprompt = "p"'))
    assert err.task == "a"
    assert "no 'agent'" in str(err)


def test_nothing_to_run_is_an_error() -> None:
    err = error(one_task('id = "a"\nname = "A"'))
    assert err.task == "a"
    assert "give a 'command'" in str(err)


def test_an_unknown_skill_names_the_folders_searched(tmp_path: Path) -> None:
    err = error(one_task('id = "a"\nskill = "git-diff"'), skill_folders=[tmp_path / "skills"])
    assert (err.task, err.key) == ("a", "skill")
    assert f"unknown skill 'git-diff' (task a); searched: {tmp_path / 'skills'}" in str(err)


def test_skill_with_command_is_kept() -> None:
    task = parse(one_task('id = "a"\nskill = "git-diff"\ncommand = "git diff"')).task("a")
    assert (task.skill, task.agent) == ("git-diff", "shell")


def test_unknown_agent_profile_suggests_a_close_one() -> None:
    err = error(one_task('id = "a"\nagent = "claud"\nprompt = "p"'))
    assert (err.file, err.task, err.key) == ("dag.toml", "a", "agent")
    assert "unknown agent profile 'claud' (did you mean 'claude'?)" in str(err)
    err = error(one_task('id = "a"\nagent_runtime = "gemini"\nprompt = "p"'))
    assert err.key == "agent_runtime"
    assert "known profiles: aider, claude, claude-interactive, codex, kimi, opencode, shell" in str(
        err
    )


def test_unknown_default_agent_is_reported_on_the_prompt() -> None:
    err = error(one_task('id = "a"\nprompt = "p"'), default_agent="claudee")
    assert (err.task, err.key) == ("a", "prompt")
    assert "default agent 'claudee'" in str(err)
    assert "did you mean 'claude'?" in str(err)


def test_command_needs_a_shell_profile() -> None:
    err = error(one_task('id = "a"\ncommand = "true"'), agents={"claude"})
    assert "'shell' agent profile" in str(err)


# -- task keys and defaults -------------------------------------------------------------------


def test_task_defaults() -> None:
    task = parse(one_task('id = "a"\ncommand = "true"')).task("a")
    assert task.name == ""
    assert task.deps == ()
    assert (task.retry, task.max_attempts, task.timeout_secs) == (0, 1, None)
    assert task.level == Level()
    assert task.trigger is Trigger.ALL_SUCCESS
    assert (task.work_dir, task.skill, dict(task.env)) == (None, None, {})


def test_all_task_keys() -> None:
    task = parse(
        one_task(
            """
            id = "build"
            name = "Build it"
            command = "make"
            work_dir = "src"
            env = { CC = "clang", EMPTY = "" }
            retry = 2
            timeout_secs = 90.5
            trigger = "none_failed"
            """
        )
    ).task("build")
    assert task.name == "Build it"
    assert task.work_dir == "src"
    assert dict(task.env) == {"CC": "clang", "EMPTY": ""}
    assert (task.retry, task.max_attempts, task.timeout_secs) == (2, 3, 90.5)
    assert task.trigger is Trigger.NONE_FAILED
    assert parse(one_task('id = "a"\ncommand = "x"\ntimeout_secs = 5')).task("a").timeout_secs == 5


@pytest.mark.parametrize("trigger", list(Trigger))
def test_every_trigger(trigger: Trigger) -> None:
    text = one_task(f'id = "a"\ncommand = "x"\ntrigger = "{trigger.value}"')
    assert parse(text).task("a").trigger is trigger


@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy(policy: Policy) -> None:
    assert (
        parse(f'policy = "{policy.value}"\n' + one_task('id = "a"\ncommand = "x"')).policy is policy
    )


def test_unknown_trigger_and_policy_suggest() -> None:
    err = error(one_task('id = "a"\ncommand = "x"\ntrigger = "all_sucess"'))
    assert (err.task, err.key) == ("a", "trigger")
    assert "did you mean 'all_success'?" in str(err)
    assert "one_failed" in str(err)
    err = error('[dag]\npolicy = "allow-debt"\n[[dag.tasks]]\nid = "a"\ncommand = "x"\n')
    assert err.key == "dag.policy"
    assert "did you mean 'allow_debt'?" in str(err)


def test_depends_on_is_an_alias_of_deps() -> None:
    text = one_task('id = "a"\ncommand = "x"') + one_task(
        'id = "b"\ndepends_on = ["a"]\ncommand = "y"'
    )
    assert parse(text).task("b").deps == ("a",)
    err = error(
        one_task('id = "a"\ncommand = "x"')
        + one_task('id = "b"\ndeps = ["a"]\ndepends_on = ["a"]\ncommand = "y"')
    )
    assert (err.task, err.key) == ("b", "depends_on")


# -- levels -----------------------------------------------------------------------------------


def test_mechanical_level_retry_overrides_task_retry() -> None:
    text = one_task(
        'id = "a"\ncommand = "x"\nretry = 5\nlevel = { type = "mechanical", retry = 3 }'
    )
    task = parse(text).task("a")
    assert task.retry == 3
    assert task.level == Level(LevelKind.MECHANICAL, retry=3)
    plain = parse(one_task('id = "a"\ncommand = "x"\nretry = 5\nlevel = { type = "mechanical" }'))
    assert plain.task("a").retry == 5


def test_recommended_level_cis_and_documented_spellings() -> None:
    serde = 'level = { type = "recommended", timeout = 10, default_action = "skip" }'
    documented = 'level = { type = "recommended", timeout_secs = 10, default_action = "skip" }'
    for line in (serde, documented):
        level = parse(one_task(f'id = "a"\ncommand = "x"\n{line}')).task("a").level
        assert level == Level(
            LevelKind.RECOMMENDED, timeout_secs=10, default_action=DefaultAction.SKIP
        )
    level = (
        parse(one_task('id = "a"\ncommand = "x"\nlevel = { type = "recommended" }')).task("a").level
    )
    assert (level.timeout_secs, level.default_action) == (
        DEFAULT_RECOMMENDED_TIMEOUT_SECS,
        DefaultAction.EXECUTE,
    )
    err = error(
        one_task(
            'id = "a"\ncommand = "x"\n'
            'level = { type = "recommended", timeout = 1, timeout_secs = 2 }'
        )
    )
    assert err.key == "level.timeout_secs"


def test_confirmed_and_arbitrated_levels() -> None:
    confirmed = parse(one_task('id = "a"\ncommand = "x"\nlevel = { type = "confirmed" }'))
    assert confirmed.task("a").level == Level(LevelKind.CONFIRMED)
    assert confirmed.task("a").level.needs_approval
    arbitrated = parse(
        one_task(
            'id = "a"\ncommand = "x"\n'
            'level = { type = "arbitrated", stakeholders = ["@alice:example.org", "@bob:hs:8448"] }'
        )
    )
    assert arbitrated.task("a").level.stakeholders == ("@alice:example.org", "@bob:hs:8448")


def test_level_name_shorthand() -> None:
    level = parse(one_task('id = "a"\ncommand = "x"\nlevel = "confirmed"')).task("a").level
    assert level.kind is LevelKind.CONFIRMED
    level = parse(one_task('id = "a"\ncommand = "x"\nlevel = "recommended"')).task("a").level
    assert level.timeout_secs == DEFAULT_RECOMMENDED_TIMEOUT_SECS


@pytest.mark.parametrize(
    ("level", "key", "message"),
    [
        (
            '{ type = "arbitrated", stakeholders = ["Tech Lead"] }',
            "level.stakeholders[0]",
            "neither a Matrix user id",
        ),
        ('{ type = "arbitrated", stakeholders = ["@a:x", "@a:x"] }', "level.stakeholders", "twice"),
        ('{ type = "arbitrated", retry = -5 }', "level.retry", "at least 0"),
        ('{ type = "confirmed", timeout = 1 }', "level.timeout", "unknown key 'timeout'"),
        ('{ type = "mechanical", retry = -1 }', "level.retry", "at least 0"),
        ('{ type = "mechanical", retri = 1 }', "level.retri", "did you mean 'retry'?"),
        (
            '{ type = "recommended", default_action = "run" }',
            "level.default_action",
            "execute, skip, abort",
        ),
        ('{ type = "recommended", timeout = 0 }', "level.timeout", "greater than 0"),
        ('{ type = "mechanic" }', "level.type", "did you mean 'mechanical'?"),
        ("{ retry = 3 }", "level.type", "missing required key 'type'"),
        ('"manual"', "level", "unknown value 'manual'"),
        ("3", "level", "got an integer"),
    ],
)
def test_level_errors(level: str, key: str, message: str) -> None:
    err = error(one_task(f'id = "t1"\ncommand = "x"\nlevel = {level}'))
    assert (err.file, err.task, err.key) == ("dag.toml", "t1", key)
    assert message in str(err)


# -- ids, deps and the graph ------------------------------------------------------------------


def test_missing_id() -> None:
    err = error(one_task('id = "a"\ncommand = "x"') + one_task('command = "y"'))
    assert err.key == "tasks[1].id"
    assert "every task needs a unique id" in str(err)
    assert error('[dag]\n[[dag.tasks]]\ncommand = "y"\n').key == "dag.tasks[0].id"


@pytest.mark.parametrize(
    ("task_id", "why"),
    [
        ("", "empty"),
        ("a b", "whitespace"),
        ("a\\tb", "whitespace"),
        ("run:1", "':'"),
        ("a/b", "slash"),
        ("..", "'.' or '..'"),
        ("a\\u0007", "control character"),
        ("x" * 129, "longer than 128 bytes"),
    ],
)
def test_invalid_ids(task_id: str, why: str) -> None:
    err = error(one_task(f'id = "{task_id}"\ncommand = "x"'))
    assert err.key == "tasks[0].id"
    assert why in str(err)


def test_id_must_be_a_string() -> None:
    err = error(one_task('id = 5\ncommand = "x"'))
    assert err.key == "tasks[0].id"
    assert "expected a string, got an integer: 5" in str(err)


def test_duplicate_ids() -> None:
    err = error(
        one_task('id = "a"\ncommand = "x"')
        + one_task('id = "b"\ncommand = "x"')
        + one_task('id = "a"\ncommand = "y"')
    )
    assert (err.file, err.task, err.key) == ("dag.toml", "a", "id")
    assert "duplicate task id 'a'" in str(err)
    assert "#1 and #3" in str(err)


def test_unknown_dep_suggests_a_close_id() -> None:
    err = error(
        one_task('id = "build"\ncommand = "x"')
        + one_task('id = "t"\ndeps = ["biuld"]\ncommand = "y"')
    )
    assert (err.task, err.key) == ("t", "deps")
    assert "unknown task 'biuld' (did you mean 'build'?)" in str(err)
    err = error(one_task('id = "t"\ndepends_on = ["nope"]\ncommand = "y"'))
    assert err.key == "depends_on"


def test_self_dependency_and_repeated_dep() -> None:
    err = error(one_task('id = "a"\ndeps = ["a"]\ncommand = "x"'))
    assert (err.task, err.key) == ("a", "deps")
    assert "cannot depend on itself" in str(err)
    err = error(
        one_task('id = "a"\ncommand = "x"') + one_task('id = "b"\ndeps = ["a", "a"]\ncommand = "x"')
    )
    assert (err.task, err.key) == ("b", "deps")
    assert "twice" in str(err)


def test_cycle_is_printed() -> None:
    text = (
        one_task('id = "start"\ncommand = "x"')
        + one_task('id = "a"\ndeps = ["start", "c"]\ncommand = "x"')
        + one_task('id = "b"\ndeps = ["a"]\ncommand = "x"')
        + one_task('id = "c"\ndeps = ["b"]\ncommand = "x"')
    )
    err = error(text)
    assert err.key == "deps"
    message = str(err)
    assert "dependency cycle: " in message
    cycle = message.split("dependency cycle: ")[1].split(" (")[0].split(" -> ")
    # a -> c -> b -> a, starting anywhere on the loop; each task depends on the next one.
    assert cycle[0] == cycle[-1] == err.task
    assert sorted(cycle[:-1]) == ["a", "b", "c"]
    deps = {"a": {"start", "c"}, "b": {"a"}, "c": {"b"}}
    for task, dep in itertools.pairwise(cycle):
        assert dep in deps[task]


@pytest.mark.parametrize(
    "text",
    [
        "name = 'x'\n",
        "tasks = []\n",
        "[dag]\nname = 'x'\n",
        "[dag]\ntasks = []\n",
        "[skill]\ntype = 'dag'\n[dag]\npolicy = 'all_success'\n",
        "",
    ],
)
def test_empty_dag(text: str) -> None:
    err = error(text)
    assert "the DAG has no tasks" in str(err)
    assert err.key in {"tasks", "dag.tasks"}


def test_empty_json_dag() -> None:
    err = error('{"tasks": []}', fmt="json", file="d.json")
    assert "no tasks" in str(err)


# -- types and unknown keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ('deps = "a"', "deps", "expected an array of strings, got a string: 'a'"),
        ("deps = [1]", "deps[0]", "expected a string, got an integer: 1"),
        ('retry = "3"', "retry", "expected an integer, got a string: '3'"),
        ("retry = 1.5", "retry", "expected an integer, got a float: 1.5"),
        ("retry = true", "retry", "expected an integer, got a boolean: True"),
        ("retry = -1", "retry", "at least 0"),
        ("timeout_secs = 0", "timeout_secs", "greater than 0"),
        ("timeout_secs = -3", "timeout_secs", "greater than 0"),
        ("timeout_secs = nan", "timeout_secs", "finite"),
        ("timeout_secs = inf", "timeout_secs", "finite"),
        ('timeout_secs = "5m"', "timeout_secs", "expected a number, got a string"),
        ("timeout_secs = 1979-05-27", "timeout_secs", "got a date"),
        ("env = [1]", "env", "expected a table, got an array"),
        ("env = { A = 1 }", "env.A", "expected a string, got an integer"),
        ('env = { "A=B" = "x" }', "env.A=B", "contains '='"),
        ("work_dir = ''", "work_dir", "must not be empty"),
        ("name = 3", "name", "expected a string, got an integer"),
        ('prompt = "   "', "prompt", "must not be empty"),
        ('dependencies = ["x"]', "dependencies", "did you mean 'deps'?"),
        ('comand = "x"', "comand", "did you mean 'command'?"),
        ("timeout = 3", "timeout", "did you mean 'timeout_secs'?"),
        ('xyzzy = "x"', "xyzzy", "expected one of: agent, agent_config, agent_runtime, command"),
        ('rollback = "rm -f x"', "rollback", "expected an array of strings, got a string"),
        ("idempotent = 0", "idempotent", "expected a boolean"),
        ('target_node = ""', "target_node", "must not be empty"),
    ],
)
def test_task_key_errors(line: str, key: str, message: str) -> None:
    err = error(one_task(f'id = "t1"\ncommand = "echo"\n{line}'))
    assert (err.file, err.task, err.key) == ("dag.toml", "t1", key)
    assert message in str(err)
    assert str(err).startswith(f"dag.toml: task 't1': key '{key}': ")


def test_nul_in_a_command_is_an_error() -> None:
    err = error(one_task('id = "a"\ncommand = "echo \\u0000"'))
    assert (err.task, err.key) == ("a", "command")
    assert "NUL" in str(err)


def test_lone_surrogate_from_json_is_an_error() -> None:
    text = json.dumps({"tasks": [{"id": "a", "command": "echo \ud800"}]})
    err = error(text, fmt="json", file="d.json")
    assert "lone surrogate" in str(err)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            "[dag]\nmax_worker = 2\n[[dag.tasks]]\nid='a'\ncommand='x'\n",
            "dag.max_worker",
            "did you mean 'max_workers'?",
        ),
        (
            "[dag]\nmax_workers = 0\n[[dag.tasks]]\nid='a'\ncommand='x'\n",
            "dag.max_workers",
            "at least 1",
        ),
        (
            "max_workers = '2'\n[[tasks]]\nid='a'\ncommand='x'\n",
            "max_workers",
            "expected an integer",
        ),
        (
            "retry_backoff_secs = 0\n[[tasks]]\nid='a'\ncommand='x'\n",
            "retry_backoff_secs",
            "greater than 0",
        ),
        ("name = ''\n[[tasks]]\nid='a'\ncommand='x'\n", "name", "must not be empty"),
        ("[dag]\n[[dag.tasks]]\nid='a'\ncommand='x'\n[other]\n", "other", "unknown key 'other'"),
        ("[[task]]\nid='a'\ncommand='x'\n", "task", "did you mean 'tasks'?"),
        ("dag = 3\n", "dag", "expected a table, got an integer"),
        ("tasks = [1]\n", "tasks[0]", "expected a table, got an integer"),
    ],
)
def test_dag_level_errors(text: str, key: str, message: str) -> None:
    err = error(text)
    assert (err.file, err.task, err.key) == ("dag.toml", None, key)
    assert message in str(err)


def test_json_type_names_are_json_words() -> None:
    err = error('{"tasks": [{"id": "a", "command": "x", "env": []}]}', fmt="json", file="d.json")
    assert "expected an object, got an array" in str(err)


# -- syntax and files -------------------------------------------------------------------------


def test_invalid_toml_says_where() -> None:
    err = error('[[tasks]]\nid = "a"\ncommand = "x\n')
    assert err.file == "dag.toml"
    assert "invalid TOML" in str(err)
    assert "line 3" in str(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"tasks": [\n  {"id": "a",}\n]}', "line 2, column"),
        ('{"tasks": [], "tasks": []}', "duplicate key 'tasks'"),
        ('{"tasks": [{"id": "a", "command": "x", "timeout_secs": NaN}]}', "NaN is not valid JSON"),
        ("[1, 2]", "expected a JSON object at the top level, got an array"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_invalid_json(text: str, message: str) -> None:
    err = error(text, fmt="json", file="d.json")
    assert err.file == "d.json"
    assert message in str(err)


def test_deeply_nested_toml_is_an_input_error() -> None:
    err = error("x = " + "[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in str(err)


def test_load_dag_reads_toml_and_json_files(tmp_path: Path) -> None:
    path = tmp_path / "build.toml"
    path.write_text('[[tasks]]\nid = "a"\ncommand = "x"\n', encoding="utf-8")
    spec = load_dag(path, agents=AGENTS, default_agent="claude")
    assert (spec.name, spec.source) == ("build", path)
    jpath = tmp_path / "build.JSON"
    jpath.write_text('{"tasks": [{"id": "a", "command": "x"}]}', encoding="utf-8")
    assert load_dag(str(jpath), agents=AGENTS, default_agent="claude").tasks == spec.tasks


def test_load_dag_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'[[tasks]]\nid = "a"\ncommand = "x"\n')
    assert load_dag(path, agents=AGENTS, default_agent="claude").task("a").prompt == "x"


def test_load_dag_file_errors(tmp_path: Path) -> None:
    def load(path: Path) -> InputError:
        with pytest.raises(InputError) as info:
            load_dag(path, agents=AGENTS, default_agent="claude")
        assert info.value.file == str(path)
        return info.value

    assert "file not found" in str(load(tmp_path / "missing.toml"))
    assert "directory" in str(load(tmp_path))
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[[tasks]]\nid = "caf\xe9"\ncommand = "x"\n')
    err = load(latin1)
    assert "not valid UTF-8" in str(err)
    assert "line 2" in str(err)
    errors_name_the_file = tmp_path / "bad.toml"
    errors_name_the_file.write_text('[[tasks]]\nid = "a"\ncomand = "x"\n', encoding="utf-8")
    assert str(load(errors_name_the_file)).startswith(
        f"{errors_name_the_file}: task 'a': key 'comand'"
    )


# -- the shipped examples ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hello.toml", "diamond.toml", "cis-layout.toml", "pipeline.json"])
def test_examples_are_valid(name: str) -> None:
    spec = load_dag(EXAMPLES / name, agents=AGENTS, default_agent="claude")
    assert spec.tasks
    assert all(t.agent == "shell" for t in spec.tasks)


def test_cis_layout_example_uses_cis_spellings() -> None:
    spec = load_dag(EXAMPLES / "cis-layout.toml", agents=AGENTS, default_agent="claude")
    assert spec.name == "release-checks"
    assert spec.task("prepare").level == Level(LevelKind.MECHANICAL, retry=2)
    assert spec.task("prepare").retry == 2
    assert spec.task("licenses").deps == ("prepare",)
    assert spec.task("publish-notes").level.kind is LevelKind.RECOMMENDED
    assert spec.task("licenses").timeout_secs == 300
