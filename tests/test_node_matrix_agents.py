"""Matrix mode with kept agents and rollback: a coordinator and two worker nodes as separate
processes (embedded homeserver and Synapse). A task that continues another's agent goes to the
node that holds it, and a rollback to the node that ran its task, whatever the load says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.nodes import NodePlan, plan_nodes, registration_files
from tests.test_node_matrix import run_cis, start_cluster

pytestmark = pytest.mark.slow

# An agent that keeps its conversation in a file of the node it runs on: "new" starts one,
# "resume" goes on with it (and fails where there is none), as a CLI with --session-id and
# --resume would. The positional arguments are the profile's keep/resume arguments, then "--"
# and the prompt.
CHAT = r"""
case "$1" in
  new) echo "$4" > "conv-$2"; cat "conv-$2" ;;
  resume) test -f "conv-$2" || { echo "no conversation $2 on this node" >&2; exit 1; }
          echo "$4" >> "conv-$2"; cat "conv-$2" ;;
  *) echo "$2" ;;
esac
"""
PROFILE = {
    "argv": ["/bin/sh", "-c", CHAT, "chat", "--", "{prompt}"],
    "upstream_in_prompt": False,
    "continue_via": "resume",
    "keep_args": ["new", "{conversation}"],
    "resume_args": ["resume", "{conversation}"],
}
CHAIN = 4


def profile_config() -> str:
    return "[agents.chat]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in PROFILE.items())


def dag(path: Path) -> Path:
    lines = ['[dag]\nname = "kept"\nmax_workers = 4\n']
    for i in range(6):  # other work, so that load alone would spread the chain
        lines.append(f'[[dag.tasks]]\nid = "busy{i}"\ncommand = "sleep 0.3; echo $CIS_TASK_ID"\n')
    lines.append(
        '[[dag.tasks]]\nid = "turn0"\nagent = "chat"\nprompt = "turn 0"\nkeep_agent = true\n'
        'rollback = ["echo undone >> undo.txt"]\n'
    )
    for i in range(1, CHAIN):
        lines.append(
            f'[[dag.tasks]]\nid = "turn{i}"\nprompt = "turn {i}"\ndeps = ["turn{i - 1}"]\n'
            'reuse_agent = "turn0"\n'
        )
    lines.append(f'[[dag.tasks]]\nid = "fail"\ncommand = "exit 1"\ndeps = ["turn{CHAIN - 1}"]\n')
    path.write_text("\n".join(lines))
    return path


def undone(plan: NodePlan) -> list[str]:
    path = plan.workdir / "undo.txt"
    return path.read_text().split() if path.exists() else []


async def test_a_continued_agent_and_a_rollback_go_to_the_node_that_holds_them(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa", "wb")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa, wb = plans
    _, room, processes = await start_cluster(
        hs, http, plans, accept_agents=("shell", "chat"), extra=profile_config()
    )
    try:
        proc = await run_cis(
            "dag", "execute", "--matrix", "--room", room, str(dag(tmp_path / "dag.toml")),
            "--json", "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr  # "fail" fails: the run is rolled back
        report = json.loads(proc.stdout)
        tasks = report["tasks"]
        nodes = {tasks[f"turn{i}"]["node"] for i in range(CHAIN)}
        assert len(nodes) == 1 and nodes <= {"wa", "wb"}, tasks
        assert {tasks[f"busy{i}"]["node"] for i in range(6)} == {"wa", "wb"}
        status = await run_cis(
            "dag", "status", report["run_id"], "--json", "--room", room,
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        summary = json.loads(status.stdout)
        assert all(summary["tasks"][f"turn{i}"]["status"] == "completed" for i in range(CHAIN))
        # The last turn's output is the whole conversation, kept on that node.
        holder = wa if nodes == {"wa"} else wb
        (conversation,) = holder.workdir.glob("conv-*")
        assert conversation.read_text().split("\n")[:CHAIN] == [f"turn {i}" for i in range(CHAIN)]
        # turn0's rollback ran where turn0 ran.
        assert [(r["task"], r["status"]) for r in report["rollback"]] == [("turn0", "completed")]
        assert undone(holder) == ["undone"]
        assert undone(wb if holder is wa else wa) == []
    finally:
        for p in processes:
            p.stop()
