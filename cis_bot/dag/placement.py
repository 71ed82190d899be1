"""Where a task may run: CIS's ``target_node`` and ``node_selector`` task keys, and what a worker
says of itself (``NodeFacts``, in its heartbeat) to be matched against them.

``target_node = "computer-b"`` names the node (its ``[node] id``, or its Matrix user id) that must
run the task, as in CIS's cross_compile_pipeline example. ``node_selector`` is CIS's NodeSelector
(cis-core/src/scheduler/node_selector.rs): ``arch`` and ``os`` equal to the node's, every one of
``features`` among the node's, every ``labels`` pair among the node's, and ``min_resources``
{``min_cpu_cores``, ``min_memory_mb``, ``min_disk_gb``, ``requires_gpu``, ``min_gpu_memory_mb``}
at most what the node has (unlike CIS, ``min_disk_gb`` is checked too, and a node that reports
no resources matches no resource requirement). Unknown keys are errors, as everywhere in a DAG.

Matching says *why* a node does not fit (``unmet``), so that a task no worker can take fails
with the requirement nobody met.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from cis_bot.validation import Table

#: Names CIS and ``platform.machine()`` give the same architecture; the first is ours.
ARCH_ALIASES: Mapping[str, str] = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
#: ``sys.platform`` and CIS's names for an OS; the value is ours.
OS_ALIASES: Mapping[str, str] = {"darwin": "macos", "win32": "windows", "mac": "macos"}


def normal_arch(arch: str) -> str:
    return ARCH_ALIASES.get(arch.lower(), arch.lower())


def normal_os(name: str) -> str:
    return OS_ALIASES.get(name.lower(), name.lower())


@attrs.frozen
class Resources:
    """``node_selector.min_resources``: each None when not required."""

    min_cpu_cores: int | None = None
    min_memory_mb: int | None = None
    min_disk_gb: int | None = None
    requires_gpu: bool | None = None
    min_gpu_memory_mb: int | None = None


@attrs.frozen
class NodeSelector:
    arch: str | None = None
    os: str | None = None
    features: tuple[str, ...] = ()
    labels: Mapping[str, str] = attrs.field(factory=dict)
    min_resources: Resources = Resources()


@attrs.frozen
class NodeFacts:
    """What a worker reports of itself: detected (arch, os, cores, memory, free disk) and
    configured (``[node] features``, ``labels``, ``gpu_memory_mb``: a GPU when above 0)."""

    arch: str
    os: str
    cpu_cores: int
    memory_mb: int
    disk_gb: int
    features: tuple[str, ...] = ()
    labels: Mapping[str, str] = attrs.field(factory=dict)
    #: 0: no GPU.
    gpu_memory_mb: int = 0

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "arch": self.arch,
            "os": self.os,
            "cpu_cores": self.cpu_cores,
            "memory_mb": self.memory_mb,
            "disk_gb": self.disk_gb,
        }
        if self.features:
            doc["features"] = list(self.features)
        if self.labels:
            doc["labels"] = dict(self.labels)
        if self.gpu_memory_mb:
            doc["gpu_memory_mb"] = self.gpu_memory_mb
        return doc

    @classmethod
    def from_table(cls, t: Table) -> NodeFacts:
        """Read from a heartbeat; keys this version does not know are left alone (a newer
        node's)."""
        return cls(
            arch=normal_arch(t.string("arch", nonempty=True)),
            os=normal_os(t.string("os", nonempty=True)),
            cpu_cores=t.integer("cpu_cores", 0, minimum=0),
            memory_mb=t.integer("memory_mb", 0, minimum=0),
            disk_gb=t.integer("disk_gb", 0, minimum=0),
            features=t.string_list("features") or (),
            labels=t.string_map("labels") or {},
            gpu_memory_mb=t.integer("gpu_memory_mb", 0, minimum=0),
        )


@attrs.frozen
class Placement:
    """A task's placement keys (both None: any worker that runs its agent)."""

    target_node: str | None = None
    selector: NodeSelector | None = None

    @property
    def constrained(self) -> bool:
        return self.target_node is not None or self.selector is not None

    def describe(self) -> str:
        """The requirement in words, for a reason no worker met it."""
        parts = []
        if self.target_node is not None:
            parts.append(f"target_node {self.target_node!r}")
        if self.selector is not None:
            parts.append(f"node_selector {_selector_words(self.selector)}")
        return " and ".join(parts)

    def unmet(self, node_id: str, user_id: str, facts: NodeFacts | None) -> str | None:
        """Why the node does not fit (None: it does)."""
        if self.target_node is not None and self.target_node not in (node_id, user_id):
            return f"is not target_node {self.target_node!r}"
        if self.selector is None:
            return None
        if facts is None:
            return "reports nothing of itself (a node older than node_selector)"
        return _selector_unmet(self.selector, facts)

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.target_node is not None:
            doc["target_node"] = self.target_node
        if self.selector is not None:
            doc["node_selector"] = _selector_document(self.selector)
        return doc


def _selector_unmet(s: NodeSelector, facts: NodeFacts) -> str | None:
    if s.arch is not None and normal_arch(s.arch) != facts.arch:
        return f"arch is {facts.arch}, not {s.arch}"
    if s.os is not None and normal_os(s.os) != facts.os:
        return f"os is {facts.os}, not {s.os}"
    missing = [f for f in s.features if f not in facts.features]
    if missing:
        return f"lacks feature {', '.join(repr(f) for f in missing)}"
    for key, value in s.labels.items():
        if facts.labels.get(key) != value:
            have = facts.labels.get(key)
            return (
                f"label {key}={have!r}, not {value!r}" if have else f"lacks label {key}={value!r}"
            )
    r = s.min_resources
    checks = (
        (r.min_cpu_cores, facts.cpu_cores, "CPU cores"),
        (r.min_memory_mb, facts.memory_mb, "MB of memory"),
        (r.min_disk_gb, facts.disk_gb, "GB of free disk"),
        (r.min_gpu_memory_mb, facts.gpu_memory_mb, "MB of GPU memory"),
    )
    for wanted, has, what in checks:
        if wanted is not None and has < wanted:
            return f"has {has} {what}, needs {wanted}"
    if r.requires_gpu and not facts.gpu_memory_mb:
        return "has no GPU"
    return None


def parse_placement(t: Table) -> Placement:
    """The task's ``target_node`` and ``node_selector`` (the task's table)."""
    target = t.opt_string("target_node", nonempty=True)
    table = t.table("node_selector")
    selector = None
    if table is not None:
        selector = _parse_selector(table)
        if selector == NodeSelector():
            table.fail(
                "an empty node_selector selects every node: give arch, os, features, labels "
                "or min_resources, or remove it"
            )
    return Placement(target, selector)


def _parse_selector(t: Table) -> NodeSelector:
    t.reject_unknown({"arch", "os", "features", "labels", "min_resources"})
    resources = Resources()
    r = t.table("min_resources")
    if r is not None:
        r.reject_unknown(
            {"min_cpu_cores", "min_memory_mb", "min_disk_gb", "requires_gpu", "min_gpu_memory_mb"}
        )
        resources = Resources(
            min_cpu_cores=r.opt_integer("min_cpu_cores", minimum=0),
            min_memory_mb=r.opt_integer("min_memory_mb", minimum=0),
            min_disk_gb=r.opt_integer("min_disk_gb", minimum=0),
            requires_gpu=r.opt_boolean("requires_gpu"),
            min_gpu_memory_mb=r.opt_integer("min_gpu_memory_mb", minimum=0),
        )
    return NodeSelector(
        arch=t.opt_string("arch", nonempty=True),
        os=t.opt_string("os", nonempty=True),
        features=t.string_list("features") or (),
        labels=t.string_map("labels") or {},
        min_resources=resources,
    )


def _selector_document(s: NodeSelector) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if s.arch is not None:
        doc["arch"] = s.arch
    if s.os is not None:
        doc["os"] = s.os
    if s.features:
        doc["features"] = list(s.features)
    if s.labels:
        doc["labels"] = dict(s.labels)
    resources = {k: v for k, v in attrs.asdict(s.min_resources).items() if v is not None}
    if resources:
        doc["min_resources"] = resources
    return doc


def _selector_words(s: NodeSelector) -> str:
    return _inline(_selector_document(s))


def _inline(value: Any) -> str:
    """A value as an inline TOML table would write it, as the user wrote the selector."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)
