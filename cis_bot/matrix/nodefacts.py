"""What a worker says of itself in its heartbeats, for tasks' ``node_selector``: detected here
(architecture, OS, CPU cores, memory, free disk where its sessions work) plus what its owner
configured (``[node] features``, ``labels``, ``gpu_memory_mb``)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from cis_bot.dag.placement import NodeFacts, normal_arch, normal_os

_MB = 1024 * 1024
_GB = 1024 * _MB


def detect_facts(
    work_dir: Path,
    *,
    features: tuple[str, ...] = (),
    labels: Mapping[str, str] | None = None,
    gpu_memory_mb: int = 0,
) -> NodeFacts:
    return NodeFacts(
        arch=normal_arch(platform.machine() or "unknown"),
        os=normal_os(sys.platform),
        cpu_cores=os.cpu_count() or 1,
        memory_mb=_memory_bytes() // _MB,
        disk_gb=_free_disk_bytes(work_dir) // _GB,
        features=features,
        labels=dict(labels or {}),
        gpu_memory_mb=gpu_memory_mb,
    )


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _free_disk_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
