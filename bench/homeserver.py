"""Benchmark: the embedded homeserver against Synapse on the same workload, in one run.

Workload (issue 3): C clients (default 4) send N events (default 400) into one room, each client
its share in sequence, all clients at once. Every event must be pushed to a registered
appservice (a loopback receiver, interested through a ghost user in the room) and be visible in
a watcher's /sync. Reported per server, and as the ratio embedded/Synapse:

- events/s: N over the time from the first send until the last event is both acknowledged by
  the appservice receiver and seen in /sync;
- p50/p95 latency from the start of a send to the event's arrival at the appservice;
- time from spawning the process to the first 200 on /versions (Synapse's config generation,
  a one-time step, is not counted);
- peak RSS of the server process (VmHWM) at the end of the run.

Both servers run as child processes with SQLite; Synapse logs at WARNING so logging does not
count against it. Goals: >= 5x Synapse's throughput, <= 1/3 of its memory, start <= 0.5 s.
Usage: python bench/homeserver.py [--events 400] [--clients 4] [--only KIND] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.appservice import (  # noqa: E402
    TransactionReceiver,
    event_ids,
    prefixed_registration,
)
from tests.support.client import CS, MatrixClient, q, unique  # noqa: E402
from tests.support.fixtures import make_homeserver  # noqa: E402
from tests.support.process import HomeserverUnderTest, read_rss_kib  # noqa: E402

SERVER_NAME = "cis.local"
DEADLINE = 300.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def workload(
    server: HomeserverUnderTest,
    receiver: TransactionReceiver,
    as_token: str,
    events: int,
    clients: int,
) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as http:
        accounts = await asyncio.gather(
            *(server.create_user(unique("bench")) for _ in range(clients + 1))
        )
        senders = [
            MatrixClient(http, server.base_url, user_id=user_id, token=token)
            for user_id, token in accounts[:clients]
        ]
        watcher = MatrixClient(
            http, server.base_url, user_id=accounts[-1][0], token=accounts[-1][1]
        )
        room_id = await senders[0].create_room(preset="public_chat")
        await asyncio.gather(*(client.join(room_id) for client in [*senders[1:], watcher]))
        appservice = MatrixClient(http, server.base_url, token=as_token)
        ghost = (
            await appservice.ok(
                "POST",
                f"{CS}/register",
                {"type": "m.login.application_service", "username": unique("bench_")},
            )
        )["user_id"]
        await appservice.ok("POST", f"{CS}/join/{q(room_id)}", {}, params={"user_id": ghost})

        timeline_filter = json.dumps({"room": {"timeline": {"limit": 2000}}})
        position = (await watcher.sync(filter=timeline_filter))["next_batch"]
        receiver.clear()

        sent_at: dict[str, float] = {}
        seen_in_sync: set[str] = set()
        all_seen = asyncio.Event()

        async def send_share(client: MatrixClient, share: int) -> None:
            for index in range(share):
                started = time.monotonic()
                event_id = await client.send(
                    room_id, {"msgtype": "m.text", "body": f"{client.localpart} {index}"}
                )
                sent_at[event_id] = started

        async def watch_sync() -> None:
            # Runs until cancelled: the events it must see are known only once the sends are
            # done, and by then their sync may have come back already (waiting for another
            # would wait out the long poll's timeout).
            since = position
            while True:
                body = await watcher.sync(since=since, timeout="5000", filter=timeline_filter)
                since = body["next_batch"]
                room = body.get("rooms", {}).get("join", {}).get(room_id, {})
                seen_in_sync.update(
                    e["event_id"] for e in room.get("timeline", {}).get("events", [])
                )
                if wanted is not None and wanted <= seen_in_sync:
                    all_seen.set()

        shares = [events // clients + (1 if i < events % clients else 0) for i in range(clients)]
        wanted: set[str] | None = None
        watcher_task = asyncio.create_task(watch_sync())
        started = time.monotonic()
        await asyncio.gather(*(send_share(c, s) for c, s in zip(senders, shares, strict=True)))
        sent_by = time.monotonic()
        wanted = set(sent_at)
        if wanted <= seen_in_sync:
            all_seen.set()
        deliveries = await receiver.until(lambda ds: wanted <= set(event_ids(ds)), DEADLINE)
        await asyncio.wait_for(all_seen.wait(), DEADLINE)
        watcher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher_task
        finished = time.monotonic()

        arrived: dict[str, float] = {}
        for delivery in deliveries:
            if delivery.status == 200:
                for event_id in event_ids([delivery]):
                    arrived.setdefault(event_id, delivery.received_at)
        latencies = [(arrived[e] - sent_at[e]) * 1000 for e in wanted]
        return {
            "events": float(len(wanted)),
            "seconds": finished - started,
            "events_per_s": len(wanted) / (finished - started),
            "sends_per_s": len(wanted) / (sent_by - started),
            "p50_ms": percentile(latencies, 0.50),
            "p95_ms": percentile(latencies, 0.95),
        }


def measure(kind: str, root: Path, events: int, clients: int) -> dict[str, float]:
    receiver = TransactionReceiver().start()
    try:
        registration = prefixed_registration("bench", receiver.url, SERVER_NAME, "bench_")
        receiver.hs_token = registration.hs_token
        # Synapse logs at WARNING; embedded accounts come from the add-user subprocess, whose
        # output stays out of ours (and the setup is not timed).
        options: dict[str, Any] = (
            {"log_level": "WARNING"} if kind == "synapse" else {"add_user_in_process": False}
        )
        server = make_homeserver(
            kind,
            root / kind,
            appservice_files=(registration.write(root / f"{kind}-as"),),
            server_name=SERVER_NAME,
            **options,
        )
        server.start()
        try:
            assert server.startup_seconds is not None
            result = asyncio.run(workload(server, receiver, registration.as_token, events, clients))
            result["startup_s"] = server.startup_seconds
            result["peak_rss_mib"] = read_rss_kib(server.pid)[1] / 1024
        finally:
            server.stop()
        return result
    finally:
        receiver.stop()


ROWS = [
    ("events/s", "events_per_s", "{:.1f}", ">= 5x"),
    ("  of which sends/s alone", "sends_per_s", "{:.1f}", ""),
    ("p50 send->appservice (ms)", "p50_ms", "{:.1f}", ""),
    ("p95 send->appservice (ms)", "p95_ms", "{:.1f}", ""),
    ("start to first /versions (s)", "startup_s", "{:.2f}", "<= 0.5 s"),
    ("peak RSS (MiB)", "peak_rss_mib", "{:.1f}", "<= 1/3"),
]


def table(results: dict[str, dict[str, float]]) -> str:
    kinds = list(results)
    header = f"{'metric':<30}" + "".join(f"{k:>12}" for k in kinds)
    if len(kinds) == 2:
        header += f"{'embedded/synapse':>18}  goal"
    lines = [header, "-" * len(header)]
    for label, key, fmt, goal in ROWS:
        line = f"{label:<30}" + "".join(f"{fmt.format(results[k][key]):>12}" for k in kinds)
        if len(kinds) == 2:
            ratio = results["embedded"][key] / results["synapse"][key]
            line += f"{ratio:>17.2f}x  {goal}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=400, help="events in total (default 400)")
    parser.add_argument("--clients", type=int, default=4, help="sending clients (default 4)")
    parser.add_argument("--only", choices=["embedded", "synapse"], help="measure one server")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    if args.events < args.clients or args.clients < 1:
        parser.error("--events must be at least --clients, and --clients at least 1")

    kinds = [args.only] if args.only else ["embedded", "synapse"]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-homeserver-") as tmp:
        for kind in kinds:
            results[kind] = measure(kind, Path(tmp), args.events, args.clients)

    if args.json:
        output: dict[str, Any] = {"events": args.events, "clients": args.clients, **results}
        if len(kinds) == 2:
            output["ratio_embedded_over_synapse"] = {
                key: results["embedded"][key] / results["synapse"][key] for _, key, _, _ in ROWS
            }
        print(json.dumps(output, indent=2))
    else:
        print(f"{args.events} events from {args.clients} clients into one room")
        print(table(results))


if __name__ == "__main__":
    main()
