"""DagSpec <-> dag.json document: what the coordinator puts in the room reads back the same."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from cis_bot.config import load_config
from cis_bot.dag.document import parse_task_document, spec_to_document, task_to_document
from cis_bot.dag.load import load_dag, parse_dag
from cis_bot.dag.spec import (
    DagSpec,
    DefaultAction,
    Level,
    LevelKind,
    Policy,
    TaskSpec,
    Trigger,
)
from cis_bot.errors import InputError

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.[tj]*"))


def read_back(spec: DagSpec) -> DagSpec:
    text = json.dumps(spec_to_document(spec))
    return parse_dag(text, file="room", fmt="json", agents=None, default_agent="unused")


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.name != "config.toml"], ids=str)
def test_examples_round_trip(path: Path) -> None:
    config = load_config(Path("/dev/null"))
    spec = load_dag(path, agents=config.agents.keys(), default_agent=config.default_agent)
    assert read_back(spec) == attrs.evolve(spec, source=None)


def test_every_field_round_trips_and_tasks_read_alone() -> None:
    tasks = (
        TaskSpec(id="a", agent="shell", prompt="echo a", command="echo a", env={"X": "1"}),
        TaskSpec(
            id="b",
            agent="claude",
            prompt="review {a}",
            name="Review",
            deps=("a",),
            work_dir="sub",
            retry=2,
            timeout_secs=1.5,
            trigger=Trigger.ONE_FAILED,
            level=Level(LevelKind.RECOMMENDED, timeout_secs=9.0, default_action=DefaultAction.SKIP),
        ),
        TaskSpec(
            id="c",
            agent="my-agent",
            prompt="ship",
            deps=("a", "b"),
            level=Level(LevelKind.ARBITRATED, stakeholders=("@a:x.org", "@b:x.org")),
        ),
        TaskSpec(id="d", agent="shell", prompt="true", retry=4, level=Level(retry=4)),
        TaskSpec(id="e", agent="shell", prompt="true", level=Level(LevelKind.CONFIRMED)),
    )
    spec = DagSpec(
        name="all", tasks=tasks, policy=Policy.ALLOW_DEBT, max_workers=3, retry_backoff_secs=0.2
    )
    assert read_back(spec) == spec
    for task in tasks:
        assert parse_task_document(task_to_document(task), file="ev", agents=None) == task


def test_a_reader_with_its_own_agents_rejects_unknown_ones() -> None:
    doc = task_to_document(TaskSpec(id="a", agent="codex", prompt="x"))
    with pytest.raises(InputError, match="unknown agent profile 'codex'"):
        parse_task_document(doc, file="ev", agents={"shell", "claude"})
