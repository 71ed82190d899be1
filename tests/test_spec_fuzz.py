"""Property tests: no input makes the DAG loader fail with anything but an InputError.

Random text exercises the parsers' error paths; random documents shaped like a DAG (serialised
with tomli-w and json) reach the per-key validation, the agent resolution and the graph checks.
Whatever loads must satisfy the spec's invariants.
"""

from __future__ import annotations

import datetime
import graphlib
import json
import math
from typing import Any

import tomli_w
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from cis_bot.dag.load import parse_dag
from cis_bot.dag.spec import DagSpec, LevelKind, Trigger
from cis_bot.errors import InputError
from cis_bot.session.profiles import BUILTIN_PROFILES

AGENTS = frozenset(BUILTIN_PROFILES)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(text: str, fmt: Any) -> DagSpec | None:
    """The spec, or None for an InputError; any other exception fails the test."""
    try:
        spec = parse_dag(text, file="fuzz.toml", fmt=fmt, agents=AGENTS, default_agent="claude")
    except InputError as exc:
        assert str(exc)
        event("rejected")
        return None
    check_invariants(spec)
    event("loaded")
    return spec


def check_invariants(spec: DagSpec) -> None:
    ids = [t.id for t in spec.tasks]
    assert ids
    assert len(set(ids)) == len(ids)
    order = list(graphlib.TopologicalSorter({t.id: t.deps for t in spec.tasks}).static_order())
    assert sorted(order) == sorted(ids)
    for task in spec.tasks:
        assert task.id and ":" not in task.id and not any(c.isspace() for c in task.id)
        assert all(dep in ids and dep != task.id for dep in task.deps)
        assert task.agent in AGENTS
        assert task.prompt.strip()
        assert task.retry >= 0
        assert task.timeout_secs is None or (
            math.isfinite(task.timeout_secs) and task.timeout_secs > 0
        )
        assert len(set(task.level.stakeholders)) == len(task.level.stakeholders)
        assert task.level.kind is LevelKind.ARBITRATED or not task.level.stakeholders
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in task.env.items())
    if spec.max_workers is not None:
        assert spec.max_workers >= 1
    assert spec.retry_backoff_secs > 0


# -- random text ------------------------------------------------------------------------------

_toml_like = st.text(
    alphabet=st.sampled_from(list("[]{}=\"'.,#\n abcdeiklmnoprstuw0123456789-_:\\")),
    max_size=120,
)


@FUZZ
@given(st.one_of(st.text(max_size=200), _toml_like))
def test_random_text_as_toml(text: str) -> None:
    load(text, "toml")


@FUZZ
@given(st.one_of(st.text(max_size=200), _toml_like.map(lambda s: "{" + s)))
def test_random_text_as_json(text: str) -> None:
    load(text, "json")


# -- random documents shaped like a DAG -------------------------------------------------------
#
# A document is a plausible DAG (values of the right types, though often wrong: unknown agents,
# cycles, negative retries) in one of the layouts, and then, half the time, one mutation: a value
# replaced by anything at all, a key deleted, or a stray key added. That way many documents get
# deep into the checks, and every check also meets values of every type.

_GOOD_IDS = ["a", "b", "c", "build", "test", "deploy"]
_BAD_IDS = ["a b", "x:y", "", "bild", "../up", "\t"]
_scalars = st.one_of(
    st.integers(-3, 400),
    st.integers(),
    st.booleans(),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(_GOOD_IDS + _BAD_IDS),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_anything = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _usually(good: list[Any], bad: list[Any], odds: int = 5) -> st.SearchStrategy[Any]:
    """A bad value one time in ``odds``, else a good one."""
    return st.integers(1, odds).flatmap(
        lambda n: st.sampled_from(bad) if n == odds and bad else st.sampled_from(good)
    )


_users = _usually(["@alice:example.org", "@bob:hs.test:8448"], ["tech-lead", "", "@nohost"])
_level = st.one_of(
    _usually(["mechanical", "confirmed", "recommended"], ["arbitrated", "manual", "Mechanical"]),
    st.fixed_dictionaries(
        {"type": _usually([k.value for k in LevelKind], ["mechanic"])},
        optional={
            "retry": _usually([0, 2], [-1]),
            "timeout": _usually([1, 2.5], [0]),
            "timeout_secs": _usually([30], [-5]),
            "default_action": _usually(["execute", "skip", "abort"], ["run"]),
            "stakeholders": st.lists(_users, max_size=3),
        },
    ),
)
_task_keys = {
    "name": st.text(min_size=1, max_size=10),
    "prompt": _usually(["fix the bug", "summarise"], ["", " "]),
    "skill": _usually(["git-diff"], [""]),
    "agent": _usually(["shell", "claude", "aider", "default"], ["claud", "kimi", ""]),
    "agent_runtime": _usually(["codex", "opencode"], ["Claude"]),
    "work_dir": _usually(["src", "/tmp"], [""]),
    "env": st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=4), max_size=3),
    "retry": _usually([0, 1, 3], [-1, True]),
    "timeout_secs": _usually([0.5, 10, 300], [0, -1.0, math.inf]),
    "level": _level,
    "trigger": _usually([t.value for t in Trigger], ["always"]),
}


@st.composite
def _tasks(draw: st.DrawFn) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for _ in range(draw(_usually([1, 2, 3, 4, 5], [0]))):
        earlier = [t["id"] for t in tasks]
        fresh = [i for i in _GOOD_IDS if i not in earlier]
        task: dict[str, Any] = {"id": draw(_usually(fresh, _BAD_IDS + earlier, odds=15))}
        # Mostly deps on earlier tasks (acyclic); sometimes any id, which may close a cycle.
        pool = draw(_usually([earlier], [_GOOD_IDS + _BAD_IDS], odds=8)) if earlier else []
        unique = draw(_usually([True], [False], odds=10))
        deps = draw(st.lists(st.sampled_from(pool), max_size=3, unique=unique)) if pool else []
        if deps:
            task[draw(_usually(["deps"], ["depends_on"]))] = deps
        if draw(st.integers(0, 9)) != 9:  # the odd task says nothing to run
            task["command"] = draw(_usually(["true", "echo hi"], ["", " "], odds=15))
        chosen = draw(st.lists(st.sampled_from(sorted(_task_keys)), max_size=4, unique=True))
        for key in chosen:
            task[key] = draw(_task_keys[key])
        tasks.append(task)
    return tasks


_settings = {
    "name": st.text(min_size=1, max_size=8),
    "policy": _usually(["all_success", "first_success", "allow_debt"], ["any"]),
    "max_workers": _usually([1, 2, 8], [0, -1]),
    "retry_backoff_secs": _usually([0.1, 1, 2], [0, -1.0, math.nan]),
}
_skill = st.fixed_dictionaries(
    {}, optional={"type": _usually(["dag"], ["native"]), "name": st.text(min_size=1, max_size=8)}
)
_plausible = st.one_of(
    st.fixed_dictionaries(
        {"dag": st.fixed_dictionaries({"tasks": _tasks()}, optional=_settings)},
        optional={"skill": _skill},
    ),
    st.fixed_dictionaries({"tasks": _tasks()}, optional={**_settings, "skill": _skill}),
)


def _slots(node: object) -> list[tuple[Any, Any]]:
    """Every (container, key-or-index) in a document, depth first."""
    slots: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            slots.append((node, key))
            slots.extend(_slots(value))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            slots.append((node, index))
            slots.extend(_slots(value))
    return slots


@st.composite
def _documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = draw(_plausible)
    slots = _slots(document)
    mutation = draw(st.sampled_from(["none", "none", "none", "replace", "delete", "stray"]))
    if mutation == "none" or not slots:
        return document
    container, key = draw(st.sampled_from(slots))
    if mutation == "replace":
        container[key] = draw(_anything)
    elif mutation == "delete":
        del container[key]
    else:
        tables = [document] + [c[k] for c, k in slots if isinstance(c[k], dict)]
        table = draw(st.sampled_from(tables))
        stray = st.sampled_from(["dependencies", "rollback", "comand", "Tasks", "x"])
        table[draw(stray)] = draw(_anything)
    return document


def _to_toml(document: dict[str, Any]) -> str:
    try:
        return tomli_w.dumps(document)
    except (TypeError, ValueError):
        assume(False)  # a shape TOML cannot hold (e.g. an array mixing tables and values)
        raise AssertionError("unreachable") from None


def _json_default(value: object) -> str:
    assert isinstance(value, datetime.date | datetime.time)
    return value.isoformat()


@FUZZ
@given(_documents())
def test_random_dag_documents_as_toml(document: dict[str, Any]) -> None:
    load(_to_toml(document), "toml")


@FUZZ
@given(_documents())
def test_random_dag_documents_as_json(document: dict[str, Any]) -> None:
    load(json.dumps(document, default=_json_default), "json")


_node = st.tuples(
    st.sampled_from(_GOOD_IDS[:5]), st.lists(st.sampled_from(_GOOD_IDS[:5]), max_size=4)
)


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.lists(_node, min_size=1, max_size=5, unique_by=lambda node: node[0]),
        st.lists(_node, min_size=1, max_size=5),
    )
)
def test_random_graphs_load_exactly_when_valid(graph: list[tuple[str, list[str]]]) -> None:
    """Random ids and deps: a graph loads iff its ids are unique, its deps known, distinct and
    not the task itself, and it has no cycle; and then with the deps as written."""
    tasks = [{"id": tid, "deps": deps, "command": "true"} for tid, deps in graph]
    spec = load(_to_toml({"tasks": tasks}), "toml")
    ids = [tid for tid, _ in graph]
    valid = len(set(ids)) == len(ids) and all(
        d in ids and d != tid and deps.count(d) == 1 for tid, deps in graph for d in deps
    )
    if valid:
        try:
            graphlib.TopologicalSorter(dict(graph)).prepare()
        except graphlib.CycleError:
            valid = False
    if not valid:
        assert spec is None
        return
    assert spec is not None
    assert [(t.id, list(t.deps)) for t in spec.tasks] == graph
