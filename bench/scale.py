"""Benchmark: how `cis dag execute --local` scales from 200 to 10,000 tasks (issue 16).

Workloads, at each size N:
  fan    N independent `true` tasks, max_workers 8   vs  xargs -P 8 script -qec true /dev/null
  chain  N `true` tasks, each depending on the last   vs  a shell loop of script -qec true /dev/null

Both sides spawn every command in a fresh PTY, so the difference is what cis_bot adds: parsing,
the engine, sessions, transcripts, the run's room on the embedded homeserver, the report. Each
cis_bot run is a whole process (`--json`, Python start-up included), cis_bot compiled to bytecode
first as an installed package is (see compiled.py); baselines are measured in the same run,
interleaved. Reported, as medians: the whole process (until it exits: the run's
room has every event, the report is written) and, for every size, the time until the last task
ran (from process start to the newest transcript); the ratio and the overhead per task
((cis - baseline) / N) of each; cis_bot's peak RSS and the memory each task adds to it, and the
peak RSS of the run's homeserver, which runs in a child of its own (app/hsprocess.py; read from
its /proc/PID/status while it lives).

A run counts only if all N tasks ran (one transcript each). A run that ends with an error after
they did (exit status other than 0, no JSON report: before item 6 of the security review, runs
of 2,500 tasks and more, whose `cis.dag.run.completed` was too large for a Matrix event) is
still timed, and marked: its whole process time then leaves out the room events still queued
when it failed.
Usage: python bench/scale.py [--sizes 200,1000,5000,10000] [--workloads fan,chain] [--repeat 1]
[--json]. One repeat takes about 13 minutes on the 2-core machine (the chain baseline alone, 6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from compiled import compile_cis_bot

WORKERS = 8


def fan_dag(n: int) -> str:
    tasks = "".join(f'[[dag.tasks]]\nid = "t{i}"\ncommand = "true"\n\n' for i in range(n))
    return f'[dag]\nname = "fan"\nmax_workers = {WORKERS}\n\n{tasks}'


def chain_dag(n: int) -> str:
    parts = ['[dag]\nname = "chain"\n']
    for i in range(n):
        deps = f'deps = ["t{i - 1}"]\n' if i else ""
        parts.append(f'[[dag.tasks]]\nid = "t{i}"\ncommand = "true"\n{deps}')
    return "\n".join(parts)


def baseline(workload: str, n: int) -> str:
    if workload == "fan":
        return f"seq {n} | xargs -P {WORKERS} -I{{}} script -qec true /dev/null"
    return f"for i in $(seq {n}); do script -qec true /dev/null; done"


@dataclasses.dataclass
class Run:
    wall_s: float
    status: int
    peak_rss_kib: int
    #: Tasks that ran (one transcript each), and whether the JSON report was written.
    ran: int = 0
    report: bool = False
    #: Wall-clock time it started (transcripts carry wall-clock times).
    started_at: float = 0.0
    #: From the process's start until the last task ran (its transcript's last write).
    tasks_s: float = 0.0
    #: The run's homeserver child's peak RSS (0: not seen).
    homeserver_rss_kib: int = 0


@dataclasses.dataclass
class Result:
    workload: str
    tasks: int
    #: The whole process, and until its last task ran.
    cis_s: float
    tasks_s: float
    baseline_s: float
    peak_rss_mib: float
    homeserver_rss_mib: float
    #: Every run exited 0 with its report (else: it ended in an error after all tasks ran).
    completed: bool
    ratio: float = 0.0
    tasks_ratio: float = 0.0
    overhead_ms_per_task: float = 0.0
    tasks_overhead_ms_per_task: float = 0.0
    #: The overheads per task over the smallest size's.
    overhead_vs_smallest: float = 0.0
    tasks_overhead_vs_smallest: float = 0.0
    #: Peak RSS over the smallest size's, per extra task.
    kib_per_extra_task: float | None = None

    def __post_init__(self) -> None:
        self.ratio = round(self.cis_s / self.baseline_s, 2)
        self.tasks_ratio = round(self.tasks_s / self.baseline_s, 2)
        self.overhead_ms_per_task = round((self.cis_s - self.baseline_s) / self.tasks * 1000, 3)
        self.tasks_overhead_ms_per_task = round(
            (self.tasks_s - self.baseline_s) / self.tasks * 1000, 3
        )


def timed(cmd: list[str], env: dict[str, str] | None = None, *, watch: bool = False) -> Run:
    """Wall time, exit status and peak RSS (of the process, or what it waited for); ``watch``:
    also the peak RSS of its ``--for-run`` homeserver child."""
    started_at = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = [0]
    watcher = threading.Thread(target=_watch_homeserver, args=(proc, peak), daemon=True)
    if watch:
        watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if watch:
        watcher.join(10)
    return Run(
        wall, proc.returncode, usage.ru_maxrss, started_at=started_at, homeserver_rss_kib=peak[0]
    )


def _watch_homeserver(proc: subprocess.Popen[bytes], peak: list[int]) -> None:
    """Find ``proc``'s homeserver child and keep its VmHWM (the kernel's peak RSS) until it
    is gone. Polls every 20 ms: the peak is a high-water mark, so the last read is it."""
    child = None
    while child is None and proc.poll() is None:
        child = _homeserver_child(proc.pid)
        time.sleep(0.02)
    while child is not None:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.02)


def _homeserver_child(parent: int) -> int | None:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            if b"--for-run" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return int(pid)
        except OSError:
            continue
    return None


def run_cis(dag: Path, state: Path) -> Run:
    env = {**os.environ, "CIS_CONFIG": os.devnull}
    cmd = [sys.executable, "-m", "cis_bot", "dag", "execute", "--local", str(dag), "--json"]
    run = timed([*cmd, "--state-dir", str(state)], env=env, watch=True)
    (run_dir,) = (state / "runs").iterdir()
    transcripts = list((run_dir / "sessions").iterdir())
    run.ran = len(transcripts)
    run.report = (run_dir / "report.json").exists()
    run.tasks_s = max(t.stat().st_mtime for t in transcripts) - run.started_at
    return run


def measure(workload: str, n: int, repeat: int, root: Path) -> Result:
    dag = root / f"{workload}-{n}.toml"
    dag.write_text(fan_dag(n) if workload == "fan" else chain_dag(n))
    ours: list[Run] = []
    theirs: list[float] = []
    for i in range(repeat):
        theirs.append(timed(["/bin/bash", "-c", baseline(workload, n)]).wall_s)
        state = root / f"state-{workload}-{n}-{i}"
        ours.append(run_cis(dag, state))
        shutil.rmtree(state)
    if any(r.ran != n for r in ours):
        raise SystemExit(f"{workload} {n}: only {min(r.ran for r in ours)} of {n} tasks ran")
    return Result(
        workload,
        n,
        cis_s=statistics.median(r.wall_s for r in ours),
        tasks_s=statistics.median(r.tasks_s for r in ours),
        baseline_s=statistics.median(theirs),
        peak_rss_mib=max(r.peak_rss_kib for r in ours) / 1024,
        homeserver_rss_mib=max(r.homeserver_rss_kib for r in ours) / 1024,
        completed=all(r.status == 0 and r.report for r in ours),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000,5000,10000")
    parser.add_argument("--workloads", default="fan,chain")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    compile_cis_bot(sys.executable)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads.split(","):
            rows = []
            for n in sizes:
                rows.append(measure(workload, n, args.repeat, Path(tmp)))
                print(f"measured {workload} {n}", file=sys.stderr, flush=True)
            first = rows[0]
            for r in rows:
                r.overhead_vs_smallest = round(
                    r.overhead_ms_per_task / first.overhead_ms_per_task, 2
                )
                r.tasks_overhead_vs_smallest = round(
                    r.tasks_overhead_ms_per_task / first.tasks_overhead_ms_per_task, 2
                )
                if r.tasks > first.tasks:
                    grown = (r.peak_rss_mib - first.peak_rss_mib) * 1024
                    r.kib_per_extra_task = round(grown / (r.tasks - first.tasks), 2)
            results += rows
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
        return
    print(
        f"{'workload':8} {'tasks':>6} {'baseline':>9} | {'cis':>8} {'ratio':>6} {'ms/task':>8}"
        f" {'vs first':>8} | {'last ran':>8} {'ratio':>6} {'ms/task':>8} {'vs first':>8} |"
        f" {'peak RSS':>9} {'KiB/task':>9} {'hs RSS':>8}"
    )
    for r in results:
        per_task = "" if r.kib_per_extra_task is None else f"{r.kib_per_extra_task:.1f}"
        note = "" if r.completed else "  * ended in an error after all tasks ran"
        print(
            f"{r.workload:8} {r.tasks:>6} {r.baseline_s:>8.2f}s | {r.cis_s:>7.2f}s {r.ratio:>6.2f}"
            f" {r.overhead_ms_per_task:>8.2f} {r.overhead_vs_smallest:>8.2f} |"
            f" {r.tasks_s:>7.2f}s {r.tasks_ratio:>6.2f} {r.tasks_overhead_ms_per_task:>8.2f}"
            f" {r.tasks_overhead_vs_smallest:>8.2f} | {r.peak_rss_mib:>7.1f}Mi {per_task:>9}"
            f" {r.homeserver_rss_mib:>6.1f}Mi{note}"
        )
    print(
        "cis: the whole process; last ran: until the last task ran. ms/task: overhead per task, "
        "(cis - baseline) / tasks; vs first: over the smallest size's. KiB/task: peak RSS over "
        "the smallest size's, per extra task. hs RSS: the run's homeserver process's peak RSS."
    )


if __name__ == "__main__":
    main()
