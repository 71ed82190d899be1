"""Benchmark: chat command latency, from the command's send to the answer's arrival, on the
embedded homeserver and on Synapse.

Per server: a `cis node --coordinator` answers in a room where one small run has completed; a
person (a plain client syncing, as a chat client does) sends N commands one after another and
waits for each answer in its /sync. Reported per command, p50 and p95 of send-to-arrival:

- `!cis help` (no room reads: the chat's own cost);
- `!cis status` (reads the room's run log: the cost of a typical question);
- baseline, measured in the same run on the same server: a plain message answered by a second
  plain client that replies the moment its /sync shows the message (the round trip any bot's
  answer costs, whatever it does).

Goals (issue 10): p50 <= 100 ms on the embedded homeserver, <= 300 ms on Synapse.
Usage: python bench/chat.py [--commands 40] [--only embedded|synapse] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.chat import Person, replies_to  # noqa: E402
from tests.support.client import MatrixClient  # noqa: E402
from tests.support.fixtures import make_homeserver  # noqa: E402
from tests.support.nodes import (  # noqa: E402
    NodeProcess,
    joined_members,
    plan_nodes,
    registration_files,
    wait_for,
    write_configs,
)

DAG = '[[tasks]]\nid = "hello"\ncommand = "echo hello"\n'


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p95_ms": round(percentile(values, 0.95) * 1000, 1),
    }


class Echo:
    """The baseline's answerer: a plain client that replies to each message as it syncs it."""

    def __init__(self, client: MatrixClient, room_id: str) -> None:
        self.client = client
        self.room_id = room_id
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        since = (await self.client.sync(timeout="0"))["next_batch"]
        self._task = asyncio.create_task(self._loop(since))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self, since: str) -> None:
        while True:
            body = await self.client.sync(since=since, timeout="5000")
            since = body["next_batch"]
            room = body.get("rooms", {}).get("join", {}).get(self.room_id, {})
            for event in room.get("timeline", {}).get("events", []):
                content = event.get("content") or {}
                if event.get("sender") != self.client.user_id and content.get("body") == "ping":
                    reply = {
                        "msgtype": "m.notice",
                        "body": "pong",
                        "m.relates_to": {"m.in_reply_to": {"event_id": event["event_id"]}},
                    }
                    await self.client.send(self.room_id, reply)


async def round_trips(person: Person, room_id: str, text: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.monotonic()
        event_id = await person.say(room_id, text)
        await person.wait(replies_to(event_id), timeout=30, what=f"an answer to {text!r}")
        times.append(time.monotonic() - started)
    return times


async def measure(kind: str, workdir: Path, count: int) -> dict[str, Any]:
    (coord,) = plan_nodes(workdir, "cis.local", "coord")
    quiet = {"log_level": "WARNING"} if kind == "synapse" else {}  # logging is not the test
    server = make_homeserver(
        kind, workdir / kind, appservice_files=registration_files([coord]), **quiet
    )
    server.start()
    node: NodeProcess | None = None
    try:
        async with aiohttp.ClientSession() as http:
            (alice_id, alice_token), (echo_id, echo_token) = [
                await server.create_user(name) for name in ("alice", "echo")
            ]
            dags = workdir / "dags"
            dags.mkdir(exist_ok=True)
            (dags / "hello.toml").write_text(DAG)
            extra = f'\n[chat]\ndags_dir = "{dags}"\nrate_burst = 1000\nrate_per_minute = 60000\n'
            write_configs([coord], server.base_url, allowed_users=[alice_id], extra=extra)
            node = NodeProcess(coord, "--coordinator", "--log-level", "warning").start()
            alice_client = MatrixClient(http, server.base_url, user_id=alice_id, token=alice_token)
            room_id = await alice_client.create_room(name="bench", invite=[coord.user_id, echo_id])
            echo_client = MatrixClient(http, server.base_url, user_id=echo_id, token=echo_token)
            await echo_client.join(room_id)

            async def joined() -> bool:
                return coord.user_id in await joined_members(alice_client, room_id)

            await wait_for(joined, what="the bot to join")
            alice = await Person(alice_client).start()
            echo = Echo(echo_client, room_id)
            await echo.start()
            try:
                started = await alice.ask(room_id, "!cis run hello")
                command = started["content"]["m.relates_to"]["m.in_reply_to"]["event_id"]
                await alice.wait(
                    lambda e: replies_to(command)(e) and "🏁" in e["content"].get("body", ""),
                    timeout=60,
                    what="the run's end",
                )
                await round_trips(alice, room_id, "!cis help", 3)  # warm both paths up
                await round_trips(alice, room_id, "ping", 3)
                result = {
                    "baseline": summary(await round_trips(alice, room_id, "ping", count)),
                    "help": summary(await round_trips(alice, room_id, "!cis help", count)),
                    "status": summary(await round_trips(alice, room_id, "!cis status", count)),
                }
            finally:
                await echo.stop()
                await alice.stop()
    finally:
        if node is not None:
            node.stop()
        server.stop()
    for name in ("help", "status"):
        result[name]["vs_baseline"] = round(
            result[name]["p50_ms"] / max(result["baseline"]["p50_ms"], 0.1), 2
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=40, help="commands of each kind")
    parser.add_argument("--only", choices=("embedded", "synapse"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["embedded", "synapse"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="cis-bench-chat-") as tmp:
        for kind in kinds:
            results[kind] = asyncio.run(measure(kind, Path(tmp) / kind, args.commands))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    goals = {"embedded": 100, "synapse": 300}
    for kind, result in results.items():
        print(f"{kind}: {args.commands} commands of each kind, send to answer's arrival")
        for name in ("baseline", "help", "status"):
            r = result[name]
            ratio = f"  x{r['vs_baseline']} the baseline" if "vs_baseline" in r else ""
            print(f"  {name:<9} p50 {r['p50_ms']:>6} ms  p95 {r['p95_ms']:>6} ms{ratio}")
        print(f"  goal: p50 <= {goals[kind]} ms")


if __name__ == "__main__":
    main()
