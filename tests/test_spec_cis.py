"""CIS's task keys beyond the basics, as dag/load.py and dag/wiring.py read them: fix-ups and
conditions, persistent agents, rollback, idempotent, agent_config, [dag.env], todo/adaptive,
stakeholders by name, and skills from skill folders."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest

from cis_bot.dag.document import parse_task_document, spec_to_document, task_to_document
from cis_bot.dag.load import load_dag, parse_dag
from cis_bot.dag.spec import AgentConfig, DagSpec, LevelKind, Trigger, resolve_stakeholders
from cis_bot.errors import InputError
from cis_bot.session.profiles import BUILTIN_PROFILES

AGENTS = frozenset(BUILTIN_PROFILES)


def parse(text: str, **kw: Any) -> DagSpec:
    kw.setdefault("agents", AGENTS)
    kw.setdefault("default_agent", "claude")
    return parse_dag(textwrap.dedent(text), file="dag.toml", fmt="toml", **kw)


def error(text: str, **kw: Any) -> InputError:
    with pytest.raises(InputError) as info:
        parse(text, **kw)
    return info.value


def read_back(spec: DagSpec) -> DagSpec:
    text = json.dumps(spec_to_document(spec))
    return parse_dag(text, file="room", fmt="json", agents=None, default_agent="unused")


# -- on_failure and condition -----------------------------------------------------------------

FIXUP = """
[[tasks]]
id = "compile"
command = "make"
on_failure = "fix"

[[tasks]]
id = "fix"
prompt = "fix the build"
condition = "if compile.status == 'failed'"

[[tasks]]
id = "test"
command = "make test"
deps = ["compile"]
"""


def test_a_fixup_depends_on_its_task_and_runs_once_it_is_done() -> None:
    spec = parse(FIXUP)
    fix = spec.task("fix")
    assert fix.deps == ("compile",)
    assert fix.trigger is Trigger.ALL_DONE
    assert fix.condition is not None and fix.condition.source == "if compile.status == 'failed'"
    assert spec.fixes("fix") == "compile" and spec.fixes("test") is None
    assert spec.waits_for("test") == ("compile", "fix")
    assert read_back(spec) == spec


@pytest.mark.parametrize(
    ("change", "task", "key", "message"),
    [
        (
            ('on_failure = "fix"', 'on_failure = "fixx"'),
            "compile",
            "on_failure",
            "did you mean 'fix'",
        ),
        (
            ('on_failure = "fix"', 'on_failure = "compile"'),
            "compile",
            "on_failure",
            "its own fix-up",
        ),
        (
            ('prompt = "fix the build"', 'prompt = "fix"\ntrigger = "all_success"'),
            "fix",
            "trigger",
            "never lets a fix-up see the failure",
        ),
        (
            (
                "condition = \"if compile.status == 'failed'\"",
                "condition = \"test.status == 'failed'\"",
            ),
            "fix",
            "condition",
            "reads task 'test', which is not one of this task's deps",
        ),
        (
            ('deps = ["compile"]', 'deps = ["compile"]\non_failure = "fix"'),
            "test",
            "on_failure",
            "already the fix-up of 'compile'",
        ),
        (
            ('prompt = "fix the build"', 'prompt = "fix"\ndeps = ["test"]'),
            "fix",
            "deps",
            "tasks wait for each other",
        ),
    ],
)
def test_fixup_mistakes(change: tuple[str, str], task: str, key: str, message: str) -> None:
    err = error(FIXUP.replace(*change))
    assert (err.task, err.key) == (task, key)
    assert message in str(err)


def test_a_condition_names_the_task_and_key_in_its_error() -> None:
    err = error(FIXUP.replace("'failed'", "'faild'"))
    assert (err.task, err.key) == ("fix", "condition")
    assert str(err).startswith(
        "dag.toml: task 'fix': key 'condition': \"if compile.status == 'faild'\": 'faild' is "
        "not a status (did you mean 'failed'?)"
    )


# -- keep_agent / reuse_agent -----------------------------------------------------------------

AGENT_CHAIN = """
[[tasks]]
id = "1"
agent_runtime = "claude"
prompt = "analyse"
keep_agent = true
work_dir = "src"
[tasks.agent_config]
provider_type = "claude"
model = "claude-3-5-sonnet-20241022"
max_tokens = 4096
temperature = 0.7
timeout_secs = 300

[[tasks]]
id = "2"
prompt = "get the diff"
deps = ["1"]
reuse_agent = "1"

[[tasks]]
id = "3"
prompt = "analyse it"
deps = ["2"]
reuse_agent = "1"
keep_agent = true

[[tasks]]
id = "4"
agent_runtime = "kimi"
prompt = "scan"
deps = ["2"]
keep_agent = true

[[tasks]]
id = "5"
prompt = "report"
deps = ["3", "4"]
reuse_agent = "1"
keep_agent = false
"""


def test_tasks_continuing_an_agent_share_it_and_only_the_last_lets_it_go() -> None:
    spec = parse(AGENT_CHAIN)
    keep = {t.id: t.keep_agent for t in spec.tasks}
    assert keep == {"1": True, "2": True, "3": True, "4": False, "5": False}
    for tid in ("2", "3", "5"):
        task = spec.task(tid)
        assert (task.agent, task.work_dir, task.reuse_agent) == ("claude", "src", "1")
        assert task.agent_config == spec.task("1").agent_config
    assert spec.task("1").agent_config == AgentConfig(
        model="claude-3-5-sonnet-20241022",
        max_tokens=4096,
        temperature=0.7,
        timeout_secs=300.0,
        provider_type="claude",
    )
    assert spec.task("1").timeout_secs == 300.0  # agent_config's timeout, as the task gives none
    assert spec.task("4").agent == "kimi"
    assert any("task '4' keeps its agent" in note for note in spec.notes)
    assert read_back(spec) == spec
    for task in spec.tasks:
        assert parse_task_document(task_to_document(task), file="ev", agents=None) == task


@pytest.mark.parametrize(
    ("change", "task", "key", "message"),
    [
        (
            ('reuse_agent = "1"\nkeep_agent = true', 'reuse_agent = "9"'),
            "3",
            "reuse_agent",
            "unknown task '9'",
        ),
        (
            ('id = "1"\nagent_runtime', 'id = "1"\nreuse_agent = "1"\nagent_runtime'),
            "1",
            "reuse_agent",
            "its own agent",
        ),
        (
            ("keep_agent = true\nwork_dir", "work_dir"),
            "2",
            "reuse_agent",
            "give it keep_agent = true",
        ),
        (
            ('deps = ["2"]\nreuse_agent = "1"\nkeep', 'deps = ["1"]\nreuse_agent = "1"\nkeep'),
            "3",
            "reuse_agent",
            "'3' does not depend on '2'",
        ),
        (
            ('id = "2"\nprompt = "get the diff"', 'id = "2"\nprompt = "x"\nkeep_agent = false'),
            "2",
            "keep_agent",
            "'3' reuses it later",
        ),
        (
            ('id = "2"\nprompt = "get the diff"', 'id = "2"\nprompt = "x"\nagent = "aider"'),
            "2",
            "agent",
            "differs from 'claude'",
        ),
        (
            ('id = "2"\nprompt = "get the diff"', 'id = "2"\nprompt = "x"\nwork_dir = "elsewhere"'),
            "2",
            "work_dir",
            "cannot move it",
        ),
        (
            (
                'id = "5"\nprompt = "report"',
                'id = "5"\nprompt = "r"\nagent_config = { model = "m" }',
            ),
            "5",
            "agent_config",
            "give it on task '1'",
        ),
    ],
)
def test_agent_chain_mistakes(change: tuple[str, str], task: str, key: str, message: str) -> None:
    assert change[0] in AGENT_CHAIN
    err = error(AGENT_CHAIN.replace(*change))
    assert (err.task, err.key) == (task, key)
    assert message in str(err)


def test_a_task_continuing_a_task_that_continues_names_the_owner() -> None:
    err = error(
        AGENT_CHAIN.replace(
            'id = "5"\nprompt = "report"\ndeps = ["3", "4"]\nreuse_agent = "1"',
            'id = "5"\nprompt = "report"\ndeps = ["3", "4"]\nreuse_agent = "3"',
        )
    )
    assert (err.task, err.key) == ("5", "reuse_agent")
    assert "itself continues the agent of '1': name that task ('1')" in str(err)


def test_agent_config_keys() -> None:
    err = error(AGENT_CHAIN.replace("temperature = 0.7", 'api_key = "sk-x"'))
    assert (err.task, err.key) == ("1", "agent_config.api_key")
    assert "belong in the agent profile's env" in str(err)
    err = error(AGENT_CHAIN.replace("temperature = 0.7", "tempreature = 0.7"))
    assert "did you mean 'temperature'" in str(err)
    task = parse(
        '[[tasks]]\nid = "a"\nprompt = "p"\nagent_config = { provider_type = "codex" }'
    ).task("a")
    assert task.agent == "codex"


# -- rollback, idempotent, [dag.env], todo, adaptive, stakeholders ------------------------------


def test_rollback_idempotent_and_dag_env() -> None:
    spec = parse(
        """
        [dag]
        [dag.env]
        PROJECT = "ml"
        MODE = "dag"

        [[dag.tasks]]
        id = "deploy"
        command = "./deploy"
        rollback = ["./undeploy", "rm -rf build"]
        idempotent = false
        env = { MODE = "task" }
        """
    )
    task = spec.task("deploy")
    assert task.rollback == ("./undeploy", "rm -rf build")
    assert task.idempotent is False
    assert task.env == {"PROJECT": "ml", "MODE": "task"}
    assert spec.env == {"PROJECT": "ml", "MODE": "dag"}
    assert read_back(spec) == spec


def test_cis_writes_dag_env_inside_dag_and_it_is_read_as_dag_env() -> None:
    spec = parse(
        """
        [dag]
        policy = "all_success"
        dag.env = { REPO_URL = "https://example.org/x.git", BASE_BRANCH = "main" }

        [[dag.tasks]]
        id = "a"
        command = "echo $BASE_BRANCH"
        """
    )
    assert spec.env == {"REPO_URL": "https://example.org/x.git", "BASE_BRANCH": "main"}
    assert spec.task("a").env["BASE_BRANCH"] == "main"
    assert any("dag.dag.env" in note for note in spec.notes)


def test_todo_and_adaptive_are_kept_and_shown() -> None:
    spec = parse(
        """
        [dag]
        [[dag.tasks]]
        id = "a"
        command = "true"

        [[dag.todo]]
        id = "init"
        description = "prepare"
        priority = 100
        status = "pending"
        assignee = "computer-b"

        [dag.adaptive]
        rules = ["if a.fail_count > 2 then set b.priority = 100"]
        """
    )
    assert [(t.id, t.priority, t.assignee) for t in spec.todo] == [("init", 100, "computer-b")]
    assert spec.adaptive == ("if a.fail_count > 2 then set b.priority = 100",)
    assert any("[[dag.todo]]: 1 items" in note for note in spec.notes)
    assert any("[dag.adaptive]: 1 rules" in note and "not applied" in note for note in spec.notes)
    assert read_back(spec) == spec
    err = error("[dag]\n[[dag.tasks]]\nid='a'\ncommand='x'\n[[dag.todo]]\nid='x'\nowner='me'\n")
    assert err.key == "dag.todo[0].owner"


def test_arbitrated_by_names_and_by_anyone() -> None:
    spec = parse(
        """
        [[tasks]]
        id = "publish"
        command = "true"
        level = { type = "arbitrated", stakeholders = ["tech-lead", "@sec:example.org"], retry = 5 }

        [[tasks]]
        id = "merge"
        command = "true"
        level = { type = "arbitrated" }
        """
    )
    publish = spec.task("publish")
    assert publish.level.stakeholders == ("tech-lead", "@sec:example.org")
    assert publish.retry == 5
    assert spec.task("merge").level.kind is LevelKind.ARBITRATED
    assert spec.task("merge").level.stakeholders == ()
    resolved = resolve_stakeholders(spec, "cis.local")
    assert resolved.task("publish").level.stakeholders == (
        "@tech-lead:cis.local",
        "@sec:example.org",
    )
    assert read_back(resolved) == resolved


# -- skills -----------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def skill_dag(tmp_path: Path, tasks: str) -> Path:
    return write(
        tmp_path / "dag.toml", '[dag]\n[dag.env]\nPROJECT_NAME = "accel"\n' + textwrap.dedent(tasks)
    )


def load(path: Path, **kw: Any) -> DagSpec:
    return load_dag(path, agents=AGENTS, default_agent="claude", **kw)


def test_an_agent_skill_is_a_prompt_template(tmp_path: Path) -> None:
    write(
        tmp_path / "skills" / "claude-code-fix.toml",
        '''
        [skill]
        name = "claude-code-fix"
        version = "1.0.0"
        type = "claude-agent"

        [agent]
        model = "claude-3-5-sonnet-20241022"
        max_tokens = 4000

        [agent.context]
        files = ["CMakeLists.txt"]

        [agent.prompt]
        system = "You fix builds."
        user_template = """
        Project: {{PROJECT_NAME}}
        Log: {{ERROR_LOG}}
        Branch: {{GIT_BRANCH}}
        """

        [agent.tools]
        allow_edit = true

        [agent.retry]
        max_attempts = 5
        backoff = "exponential"
        ''',
    )
    spec = load(skill_dag(tmp_path, '[[dag.tasks]]\nid = "fix"\nskill = "claude-code-fix"\n'))
    task = spec.task("fix")
    assert task.agent == "claude" and task.prompt_template
    assert task.prompt.startswith("You fix builds.\n\nProject: {{PROJECT_NAME}}")
    assert "Context files (read them first):\n- CMakeLists.txt" in task.prompt
    assert task.retry == 4
    assert task.agent_config == AgentConfig(model="claude-3-5-sonnet-20241022", max_tokens=4000)
    assert task.env == {"PROJECT_NAME": "accel"}
    notes = "\n".join(spec.notes)
    assert "{{GIT_BRANCH}} in its prompt has no value" in notes
    assert "{{PROJECT_NAME}}" not in notes and "{{ERROR_LOG}}" not in notes
    assert "[agent.tools] (allow_edit) is not enforced" in notes
    assert read_back(spec) == attrs.evolve(spec, source=None)


def test_executor_skills_are_an_agent_s_steps_or_shell_commands(tmp_path: Path) -> None:
    write(
        tmp_path / "skills" / "cuda-compile.toml",
        """
        [skill]
        name = "cuda-compile"
        type = "executor"

        [executor]
        type = "claude-agent"

        [executor.steps]
        step1 = "check nvcc"
        step2 = "build: cmake --build build"

        [executor.on_error]
        action = "claude_fix"
        prompt = "read the log and fix it"

        [executor.env]
        CUDA_HOME = "/usr/local/cuda"
        PATH = "${CUDA_HOME}/bin:${PATH}"
        """,
    )
    write(
        tmp_path / "skills" / "make" / "skill.toml",
        """
        [skill]
        name = "make"
        type = "executor"

        [executor.steps]
        step1 = "make"
        step2 = "make check"

        [executor.on_error]
        command = "echo build failed >&2"
        """,
    )
    spec = load(
        skill_dag(
            tmp_path,
            """
            [[dag.tasks]]
            id = "cuda"
            skill = "cuda-compile"

            [[dag.tasks]]
            id = "make"
            skill = "make"
            """,
        )
    )
    cuda = spec.task("cuda")
    assert cuda.agent == "claude"
    assert cuda.prompt == (
        "Carry out these steps in order:\n1. check nvcc\n2. build: cmake --build build\n\n"
        "If a step fails:\nread the log and fix it"
    )
    assert cuda.env["PATH"] == "${CUDA_HOME}/bin:${PATH}"
    make = spec.task("make")
    assert make.agent == "shell" and not make.prompt_template
    assert make.command == make.prompt
    assert make.prompt == (
        "(\nset -e\nmake\nmake check\n) || {\nstatus=$?\necho build failed >&2\nexit $status\n}"
    )


def test_a_shell_skill_is_found_by_its_name_and_runs_its_commands_with_hooks(
    tmp_path: Path,
) -> None:
    write(
        tmp_path / "skills" / "git-auto-sync.toml",
        '''
        [skill]
        name = "git-sync"
        type = "shell"

        [[commands]]
        name = "fetch"
        command = "git fetch origin"

        [[commands]]
        name = "check"
        description = "anything new?"
        command = """
        git status --short
        """

        [hooks]
        post_fetch = "git status"
        ''',
    )
    spec = load(skill_dag(tmp_path, '[[dag.tasks]]\nid = "sync"\nskill = "git-sync"\n'))
    assert spec.task("sync").prompt == "set -e\ngit fetch origin\ngit status\ngit status --short"


def test_command_wins_over_the_skill_which_is_then_not_looked_up(tmp_path: Path) -> None:
    spec = load(
        skill_dag(tmp_path, '[[dag.tasks]]\nid = "a"\nskill = "shell-exec"\ncommand = "echo hi"\n')
    )
    assert (spec.task("a").agent, spec.task("a").prompt) == ("shell", "echo hi")


def test_skills_dir_comes_after_the_dag_s_own_folder(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    write(shared / "hello.toml", '[skill]\ntype = "shell"\n[[commands]]\ncommand = "echo shared"\n')
    write(shared / "only.toml", '[skill]\ntype = "shell"\n[[commands]]\ncommand = "echo only"\n')
    write(
        tmp_path / "skills" / "hello.toml",
        '[skill]\ntype = "shell"\n[[commands]]\ncommand = "echo here"\n',
    )
    dag = skill_dag(
        tmp_path,
        '[[dag.tasks]]\nid = "a"\nskill = "hello"\n[[dag.tasks]]\nid = "b"\nskill = "only"\n',
    )
    spec = load(dag, skills_dirs=[shared])
    assert spec.task("a").prompt == "set -e\necho here"
    assert spec.task("b").prompt == "set -e\necho only"


def test_every_missing_skill_is_named_with_the_folders_searched(tmp_path: Path) -> None:
    write(tmp_path / "skills" / "broken.toml", "[skill\n")
    dag = skill_dag(
        tmp_path,
        """
        [[dag.tasks]]
        id = "a"
        skill = "git-branch-check"
        [[dag.tasks]]
        id = "b"
        skill = "cuda-test"
        deps = ["a"]
        [[dag.tasks]]
        id = "c"
        skill = "cuda-test"
        deps = ["a"]
        """,
    )
    with pytest.raises(InputError) as info:
        load(dag, skills_dirs=[tmp_path / "none"])
    message = str(info.value)
    assert (info.value.task, info.value.key) == ("a", "skill")
    assert "unknown skills 'git-branch-check' (task a), 'cuda-test' (tasks b, c)" in message
    assert f"searched: {tmp_path / 'skills'}, {tmp_path / 'none'}" in message
    assert f"unreadable skill files: {tmp_path / 'skills' / 'broken.toml'}" in message


@pytest.mark.parametrize(
    ("skill", "key", "message"),
    [
        ('[skill]\nname = "s"\ntype = "wasm"\n', "skill.type", "unknown value 'wasm'"),
        ('[skill]\nname = "s"\ntype = "dag"\n', "skill.type", "a task cannot run a nested DAG"),
        ('[skill]\nname = "s"\ntype = "shell"\n', "commands", "needs [[commands]]"),
        (
            '[skill]\nname = "s"\ntype = "claude-agent"\n[agent]\nmodel = "m"\n',
            "agent.prompt",
            "missing [agent.prompt]",
        ),
        (
            '[skill]\nname = "s"\ntype = "executor"\n[executor.steps]\ns1 = "make"\n'
            '[executor.on_error]\nprompt = "fix it"\n',
            "executor.on_error.prompt",
            "a shell executor cannot hand a prompt to an agent",
        ),
        (
            '[skill]\nname = "s"\ntype = "executor"\n[executor.steps]\ns1 = "make"\n'
            '[executor.on_error]\nprompt = "fix it"\ncommand = "make clean"\n',
            "executor.on_error.prompt",
            "a shell executor cannot hand a prompt to an agent",
        ),
        (
            '[skill]\nname = "s"\ntype = "shell"\n[[commands]]\nname = "a"\ncommand = "x"\n'
            '[hooks]\npost_b = "y"\n',
            "hooks.post_b",
            "names no command",
        ),
        (
            '[skill]\nname = "s"\ntype = "claude-agent"\n[agent.prompt]\nuser_template = "x"\n'
            '[agent.retry]\nbackoff = "linear"\n',
            "agent.retry.backoff",
            "back off exponentially",
        ),
    ],
)
def test_skill_file_mistakes_name_the_skill_file(
    tmp_path: Path, skill: str, key: str, message: str
) -> None:
    path = write(tmp_path / "skills" / "s.toml", skill)
    dag = skill_dag(tmp_path, '[[dag.tasks]]\nid = "a"\nskill = "s"\n')
    with pytest.raises(InputError) as info:
        load(dag)
    assert (info.value.file, info.value.key) == (str(path), key)
    assert message in str(info.value)
