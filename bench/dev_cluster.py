"""Benchmark: `cis dev-cluster up` from the command to "ready", embedded homeserver and Synapse.

Per homeserver and repeat, whole processes, wall time from starting `cis dev-cluster up --detach`
to its return (it returns once the cluster is ready: the homeserver answers, the nodes are
connected, in the room and have beaten there, the person is signed in):

- first: a new directory (tokens, registrations, the person's account, the room are made);
- again: the same directory after `down` (everything reused: the common case);
- baseline, measured in the same run with the same files: the same processes started by hand
  without the supervisor (the homeserver until /versions answers, then the three nodes until
  each has written its control entry, i.e. is connected). The ratio again/baseline is what
  the supervisor adds (its own start-up, the person's sign-in, the room check, waiting for the
  heartbeats, detaching).

Goals (issue 12): ready <= 3 s embedded, <= 10 s with Synapse.
Usage: python bench/dev_cluster.py [--repeats 3] [--only embedded|synapse] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cis_bot.app.devcluster.layout import free_port  # noqa: E402
from cis_bot.app.devcluster.synapse import synapse_env  # noqa: E402
from cis_bot.control.registry import control_dir  # noqa: E402
from tests.support.devcluster import cis, cluster_env, down, state  # noqa: E402
from tests.support.synapse import synapse_python  # noqa: E402

NODES = ("coordinator", "worker-a", "worker-b")


def up(directory: Path, kind: str, *extra: str) -> float:
    began = time.monotonic()
    done = cis(
        "dev-cluster",
        "up",
        "--detach",
        "--dir",
        directory,
        "--homeserver",
        kind,
        *extra,
        env=cluster_env(kind),
    )
    elapsed = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"up failed:\n{done.stdout}\n{done.stderr}")
    return elapsed


def by_hand(directory: Path, kind: str) -> float:
    """The cluster's processes started without the supervisor, until each is ready."""
    port = free_port()
    registrations = [str(directory / "nodes" / n / "registration.yaml") for n in NODES]
    if kind == "embedded":
        argv = [
            sys.executable,
            "-m",
            "cis_bot",
            "homeserver",
            "--state-dir",
            str(directory / "embedded"),
            "--port",
            str(port),
            "--server-name",
            "cis.local",
        ]
        for path in registrations:
            argv += ["--appservice", path]
        env = cluster_env()
    else:
        config = directory / "synapse" / "homeserver.yaml"
        text = config.read_text().replace(f"port: {state(directory)['port']}", f"port: {port}")
        config.write_text(text)
        argv = [synapse_python(), "-m", "synapse.app.homeserver", "--config-path", str(config)]
        env = synapse_env()
    processes: list[subprocess.Popen[bytes]] = []
    began = time.monotonic()
    try:
        processes.append(
            subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        url = f"http://127.0.0.1:{port}/_matrix/client/versions"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.02)  # not listening yet
        entries = []
        for name in NODES:
            config = directory / "nodes" / name / "config.toml"
            config.write_text(
                config.read_text().replace(
                    f"127.0.0.1:{state(directory)['port']}", f"127.0.0.1:{port}"
                )
            )
            node = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cis_bot",
                    "node",
                    "--config",
                    str(config),
                    "--state-dir",
                    str(directory / "nodes" / name / "state"),
                    *(["--coordinator"] if name == "coordinator" else []),
                ],
                env=cluster_env(),
                cwd=directory / "nodes" / name,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            processes.append(node)
            entries.append(control_dir(directory / "nodes" / name / "state") / f"{node.pid}.json")
        while not all(entry.exists() for entry in entries):
            time.sleep(0.02)  # a file to appear
        return time.monotonic() - began
    finally:
        for process in reversed(processes):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)


def measure(kind: str, repeats: int) -> dict[str, Any]:
    first, again, baseline = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="cis-dev-bench-") as tmp:
            directory = Path(tmp) / "cluster"
            first.append(up(directory, kind, "--port", "0"))
            down(directory)
            again.append(up(directory, kind))
            down(directory)
            baseline.append(by_hand(directory, kind))
    median = statistics.median
    return {
        "homeserver": kind,
        "first_s": round(median(first), 2),
        "again_s": round(median(again), 2),
        "baseline_s": round(median(baseline), 2),
        "ratio": round(median(again) / median(baseline), 2),
        "worst_again_s": round(max(again), 2),
        "goal_s": 3.0 if kind == "embedded" else 10.0,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("embedded", "synapse"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["embedded", "synapse"]
    results = [measure(kind, args.repeats) for kind in kinds]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        met = "met" if r["again_s"] <= r["goal_s"] and r["first_s"] <= r["goal_s"] else "NOT met"
        print(
            f"{r['homeserver']:<9} first up {r['first_s']:.2f}s, again {r['again_s']:.2f}s "
            f"(worst {r['worst_again_s']:.2f}s); the processes by hand {r['baseline_s']:.2f}s: "
            f"x{r['ratio']:.2f}; goal <= {r['goal_s']:.0f}s: {met} (load {r['load']:.1f})"
        )


if __name__ == "__main__":
    main()
