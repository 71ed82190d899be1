"""CIS's placement keys (``target_node``, ``node_selector``): read from dag.toml with errors that
name the key, carried in the room's copy of the spec, matched against what a worker says of
itself in its heartbeat, and why a worker does not fit."""

from __future__ import annotations

import json
import platform
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cis_bot.dag.document import spec_to_document
from cis_bot.dag.load import parse_dag
from cis_bot.dag.placement import NodeFacts, NodeSelector, Placement, Resources
from cis_bot.dag.spec import DagSpec
from cis_bot.errors import InputError
from cis_bot.matrix import events as ev
from cis_bot.matrix.nodefacts import detect_facts

CROSS_COMPILE = """
[dag]
name = "cross-compile"

[[dag.tasks]]
id = "cuda-build"
command = "make cuda"
target_node = "computer-b"

[[dag.tasks]]
id = "metal-build"
command = "make metal"
node_selector = { os = "macos", arch = "arm64", features = ["metal"] }

[[dag.tasks]]
id = "train"
command = "python train.py"
deps = ["cuda-build"]

[dag.tasks.node_selector]
labels = { site = "lab" }

[dag.tasks.node_selector.min_resources]
min_cpu_cores = 8
min_memory_mb = 16384
min_disk_gb = 50
requires_gpu = true
min_gpu_memory_mb = 8000
"""


def parse(text: str) -> DagSpec:
    return parse_dag(
        textwrap.dedent(text), file="dag.toml", fmt="toml", agents=None, default_agent="claude"
    )


def error(task_lines: str) -> InputError:
    with pytest.raises(InputError) as info:
        parse(f'[[tasks]]\nid = "t1"\ncommand = "echo"\n{task_lines}\n')
    return info.value


def test_the_keys_are_read_as_cis_writes_them() -> None:
    spec = parse(CROSS_COMPILE)
    assert spec.task("cuda-build").placement == Placement(target_node="computer-b")
    assert spec.task("metal-build").placement.selector == NodeSelector(
        arch="arm64", os="macos", features=("metal",)
    )
    train = spec.task("train").placement.selector
    assert train == NodeSelector(
        labels={"site": "lab"},
        min_resources=Resources(
            min_cpu_cores=8,
            min_memory_mb=16384,
            min_disk_gb=50,
            requires_gpu=True,
            min_gpu_memory_mb=8000,
        ),
    )
    # The room's copy of the spec (what a standby or `cis dag resume` reads) keeps them.
    text = json.dumps(spec_to_document(spec))
    again = parse_dag(text, file="room", fmt="json", agents=None, default_agent="")
    assert [t.placement for t in again.tasks] == [t.placement for t in spec.tasks]


@pytest.mark.parametrize(
    ("lines", "key", "message"),
    [
        ('target_node = ""', "target_node", "must not be empty"),
        ("target_node = 3", "target_node", "expected a string"),
        ('node_selector = "gpu"', "node_selector", "expected a table"),
        ("node_selector = {}", "node_selector", "an empty node_selector selects every node"),
        ('node_selector = { arc = "x86_64" }', "node_selector.arc", "did you mean 'arch'?"),
        ('node_selector = { features = "cuda" }', "node_selector.features", "expected an array"),
        ("node_selector = { labels = { a = 1 } }", "node_selector.labels.a", "expected a string"),
        (
            "node_selector = { min_resources = { min_cpu = 2 } }",
            "node_selector.min_resources.min_cpu",
            "did you mean 'min_cpu_cores'?",
        ),
        (
            "node_selector = { min_resources = { min_memory_mb = -1 } }",
            "node_selector.min_resources.min_memory_mb",
            "at least 0",
        ),
        (
            'node_selector = { min_resources = { requires_gpu = "yes" } }',
            "node_selector.min_resources.requires_gpu",
            "expected a boolean",
        ),
    ],
)
def test_mistakes_name_the_key(lines: str, key: str, message: str) -> None:
    err = error(lines)
    assert (err.file, err.task, err.key) == ("dag.toml", "t1", key)
    assert message in str(err)


FACTS = NodeFacts(
    arch="x86_64",
    os="linux",
    cpu_cores=8,
    memory_mb=32000,
    disk_gb=100,
    features=("cuda",),
    labels={"site": "lab"},
    gpu_memory_mb=12000,
)


@pytest.mark.parametrize(
    ("placement", "unmet"),
    [
        (Placement(), None),
        (Placement(target_node="wa"), None),
        (Placement(target_node="@cis_wa:hs"), None),
        (Placement(target_node="wb"), "is not target_node 'wb'"),
        (Placement(selector=NodeSelector(arch="amd64", os="Linux")), None),
        (Placement(selector=NodeSelector(arch="aarch64")), "arch is x86_64, not aarch64"),
        (Placement(selector=NodeSelector(os="macos")), "os is linux, not macos"),
        (Placement(selector=NodeSelector(features=("cuda", "metal"))), "lacks feature 'metal'"),
        (Placement(selector=NodeSelector(labels={"site": "lab"})), None),
        (Placement(selector=NodeSelector(labels={"site": "home"})), "label site='lab', not"),
        (Placement(selector=NodeSelector(labels={"rack": "1"})), "lacks label rack='1'"),
        (Placement(selector=NodeSelector(min_resources=Resources(min_cpu_cores=8))), None),
        (
            Placement(selector=NodeSelector(min_resources=Resources(min_cpu_cores=16))),
            "has 8 CPU cores, needs 16",
        ),
        (
            Placement(selector=NodeSelector(min_resources=Resources(min_memory_mb=64000))),
            "has 32000 MB of memory, needs 64000",
        ),
        (
            Placement(selector=NodeSelector(min_resources=Resources(min_disk_gb=500))),
            "has 100 GB of free disk, needs 500",
        ),
        (
            Placement(selector=NodeSelector(min_resources=Resources(min_gpu_memory_mb=24000))),
            "has 12000 MB of GPU memory, needs 24000",
        ),
        (Placement(selector=NodeSelector(min_resources=Resources(requires_gpu=True))), None),
    ],
)
def test_why_a_node_does_not_fit(placement: Placement, unmet: str | None) -> None:
    found = placement.unmet("wa", "@cis_wa:hs", FACTS)
    if unmet is None:
        assert found is None
    else:
        assert found is not None and unmet in found


def test_a_node_without_a_gpu_or_without_facts_fits_no_gpu_requirement() -> None:
    gpu = Placement(selector=NodeSelector(min_resources=Resources(requires_gpu=True)))
    no_gpu = NodeFacts(arch="x86_64", os="linux", cpu_cores=2, memory_mb=1, disk_gb=1)
    assert gpu.unmet("wa", "@cis_wa:hs", no_gpu) == "has no GPU"
    assert "reports nothing of itself" in (gpu.unmet("wa", "@cis_wa:hs", None) or "")
    # target_node alone needs no facts: an older node that reports none can be targeted.
    assert Placement(target_node="wa").unmet("wa", "@cis_wa:hs", None) is None


def test_heartbeats_carry_the_facts_and_a_newer_nodes_extra_facts_are_kept_out() -> None:
    beat = ev.NodeHeartbeatContent(
        node_id="wa", agents=("shell",), max_workers=2, load=0, ttl_ms=5000, facts=FACTS
    )
    content: dict[str, Any] = beat.content()
    assert content["facts"]["features"] == ["cuda"]
    decoded = ev.decode(ev.NodeHeartbeatContent.TYPE, json.loads(json.dumps(content)))
    assert isinstance(decoded, ev.NodeHeartbeatContent) and decoded.facts == FACTS
    content["facts"]["tpu_cores"] = 4  # a key a later version may add
    decoded = ev.decode(ev.NodeHeartbeatContent.TYPE, content)
    assert isinstance(decoded, ev.NodeHeartbeatContent) and decoded.facts == FACTS
    content["facts"]["cpu_cores"] = "many"
    with pytest.raises(ev.InvalidEvent, match="cpu_cores"):
        ev.decode(ev.NodeHeartbeatContent.TYPE, content)


def test_a_node_detects_what_it_is(tmp_path: Path) -> None:
    facts = detect_facts(tmp_path, features=("cuda",), labels={"site": "lab"}, gpu_memory_mb=8)
    assert facts.arch == {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    assert facts.os == "linux"
    assert facts.cpu_cores >= 1 and facts.memory_mb > 0 and facts.disk_gb >= 0
    assert (facts.features, dict(facts.labels), facts.gpu_memory_mb) == (
        ("cuda",),
        {"site": "lab"},
        8,
    )
