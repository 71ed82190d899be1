"""The network namespace fixture's promises (tests/support/netns.py), which partition tests lean
on: a namespace reaches the host and the host reaches it; a cut stops both directions promptly
and restore() heals it; other namespaces and the host's own traffic are untouched by a cut; and
nothing is left behind, not even by an owner that was killed."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.client import MatrixClient, unique
from tests.support.fixtures import Factory
from tests.support.netns import LOCK_DIR, CutMode, NetworkNamespace, reap_stale
from tests.support.nodes import (
    NodeProcess,
    plan_nodes,
    room_events,
    run_room,
    wait_for,
    write_configs,
)
from tests.support.probe import Probe
from tests.support.process import http_json

MakeNetns = Callable[[], NetworkNamespace]
REPO = Path(__file__).resolve().parents[1]
# Requests during a cut must fail within the client's timeout plus this much (scheduling on a
# loaded 2-core machine); what they took is printed.
SLACK = 2.0


def get(url: str, timeout: float = 1.0) -> int | str:
    """Status of GET url, or why it failed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError) as err:
        return f"{type(err).__name__}: {err}"


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # polling a socket or a process table: nothing to wait on


@contextlib.contextmanager
def host_http_server(address: str) -> Iterator[str]:
    """A plain HTTP server on the host at ``address``; yields its URL."""
    server = http.server.ThreadingHTTPServer((address, 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


def namespace_http_server(ns: NetworkNamespace, tmp_path: Path) -> str:
    """``python -m http.server`` inside ``ns``; its URL once it answers from the host."""
    (port,) = ns.free_ports()
    ns.popen(
        [sys.executable, "-m", "http.server", "--bind", ns.address, "-d", str(tmp_path), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{ns.address}:{port}/"
    wait_until(lambda: get(url) == 200, 30, f"the server in {ns.name}")
    return url


def present(ns: NetworkNamespace) -> set[str]:
    """Which of the namespace's parts exist on the host."""
    parts = {
        "namespace": ns.exists,
        "host device": Path(f"/sys/class/net/{ns.host_device}").exists(),
    }
    return {part for part, exists in parts.items() if exists}


def test_namespace_is_built_and_removed(netns: MakeNetns) -> None:
    ns = netns()
    assert present(ns) == {"namespace", "host device"}
    host_side = subprocess.run(
        ["ip", "-o", "addr", "show", "dev", ns.host_device], capture_output=True, text=True
    ).stdout
    assert f"{ns.host_address}/30" in host_side
    inside = ns.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert f"{ns.address}/30" in inside and "127.0.0.1/8" in inside
    routes = ns.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    assert f"default via {ns.host_address}" in routes
    # The host's interfaces are not visible inside.
    assert ns.host_device not in inside and "eth0" not in inside

    sleeper = ns.popen(["sleep", "600"])
    # ``ip netns exec`` enters the namespace a moment after the fork.
    wait_until(lambda: sleeper.pid in ns.pids(), 10, "the process to be inside")
    ns.delete()
    assert sleeper.poll() is not None
    assert present(ns) == set()
    # The slot is free again.
    fd = os.open(LOCK_DIR / f"{ns.slot}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    ns.delete()  # idempotent


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["drop", "down"])
def test_cut_stops_both_directions_and_restore_heals(
    netns: MakeNetns, tmp_path: Path, mode: CutMode
) -> None:
    ns = netns()
    inside_url = namespace_http_server(ns, tmp_path)
    with host_http_server(ns.host_address) as host_url:
        probe = Probe(host_url, timeout=1.0, namespace=ns)
        try:
            probe.first_after(0, ok=True, timeout=30)
            assert get(inside_url) == 200

            cut_at = time.monotonic()
            ns.cut(mode)
            failed = probe.first_after(cut_at, ok=False, timeout=1.0 + SLACK)
            assert get(inside_url, timeout=1.0) != 200
            # Nothing got through while cut.
            restore_at = time.monotonic()
            assert not [a for a in probe.attempts if cut_at <= a.start < restore_at and a.ok]
            # The host still reaches its own side's address.
            assert get(host_url) == 200

            ns.restore()
            back = probe.first_after(restore_at, ok=True, timeout=1.0 + SLACK)
            wait_until(lambda: get(inside_url) == 200, 1.0 + SLACK, "the server inside")
            print(
                f"\n{mode}: first failure {failed.end - cut_at:.3f}s after the cut "
                f"({failed.error}); first success {back.end - restore_at:.3f}s after restore"
            )
        finally:
            probe.stop()


@pytest.mark.slow
def test_namespaces_are_independent(netns: MakeNetns) -> None:
    """Two namespaces at once: distinct slots; both reach a server on the first one's host
    address; cutting the first leaves the second (and the host) connected."""
    first, second = netns(), netns()
    assert first.slot != second.slot and first.address != second.address
    with host_http_server(first.host_address) as url:
        probes = [Probe(url, timeout=1.0, namespace=ns) for ns in (first, second)]
        try:
            for probe in probes:
                probe.first_after(0, ok=True, timeout=30)
            with first.partitioned():
                cut_at = time.monotonic()
                probes[0].first_after(cut_at, ok=False, timeout=1.0 + SLACK)
                # The second keeps succeeding through the first one's cut: three in a row.
                probes[1].wait_for(
                    lambda attempts: sum(a.ok for a in attempts if a.start >= cut_at) >= 3,
                    timeout=1.0 + SLACK,
                    what="three successes of the other namespace during the cut",
                )
                assert not [a for a in probes[1].attempts if a.start >= cut_at and not a.ok]
                assert get(url) == 200
            assert first.cut_mode is None
            probes[0].first_after(time.monotonic(), ok=True, timeout=1.0 + SLACK)
        finally:
            for probe in probes:
                probe.stop()


_CRASHING_OWNER = """
import sys, time
from tests.support.netns import NetworkNamespace
ns = NetworkNamespace.create()
ns.cut()
sleeper = ns.popen(["sleep", "600"])
while sleeper.pid not in ns.pids():  # ip netns exec enters a moment after the fork
    time.sleep(0.01)
print(ns.slot, sleeper.pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
@pytest.mark.usefixtures("_netns_available")
def test_a_killed_owner_leaves_nothing_behind() -> None:
    """A test process killed with SIGKILL cannot clean up; its slot's lock dies with it, and
    reap_stale() (run once per session by the fixture) or the next claimant removes its
    namespace, its veth pair and the processes it left inside."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_OWNER],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    slot, sleeper_pid = (int(word) for word in owner.stdout.readline().split())
    name = f"cis-test-{slot}"
    assert Path("/run/netns", name).exists()
    owner.kill()
    owner.wait(10)
    assert Path("/run/netns", name).exists(), "the owner died without cleaning up"
    assert name in reap_stale()
    assert not Path("/run/netns", name).exists()
    assert not Path(f"/sys/class/net/cist{slot}h").exists()
    wait_until(lambda: not _alive(sleeper_pid), 10, "the process left inside to be killed")
    # And the slot is usable again (cut state and all are gone with the old pair).
    assert name not in reap_stale()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # Killed but not yet reaped by its parent (init, after the owner died) counts as gone.
    status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    return status != "Z"


def test_double_cut_and_unknown_mode_are_refused(netns: MakeNetns) -> None:
    ns = netns()
    with pytest.raises(ValueError, match="unknown cut mode"):
        ns.cut("sideways")  # type: ignore[arg-type]
    ns.cut("down")
    with pytest.raises(Exception, match="already cut"):
        ns.cut("drop")
    ns.restore()
    assert ns.cut_mode is None
    routes = ns.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    assert f"default via {ns.host_address}" in routes


@pytest.mark.slow
def test_a_client_in_a_namespace_loses_and_regains_its_homeserver(
    netns: MakeNetns, homeserver_factory: Factory
) -> None:
    """The shape of a partition test: the homeserver binds the namespace's host-side address; a
    Matrix client inside (the probe, polling whoami) reaches it, loses it when cut, while
    clients on the host carry on, and gets it back on restore."""
    ns = netns()
    server = homeserver_factory(host=ns.host_address)
    user_id, token = server.create_user_sync(unique("ns"))
    whoami = f"{server.base_url}/_matrix/client/v3/account/whoami"
    probe = Probe(whoami, token=token, timeout=1.0, namespace=ns)
    try:
        probe.first_after(0, ok=True, timeout=30)
        with ns.partitioned():
            cut_at = time.monotonic()
            failed = probe.first_after(cut_at, ok=False, timeout=1.0 + SLACK)
            status, answer = http_json("GET", whoami, token=token, timeout=5)
            assert (status, answer["user_id"]) == (200, user_id)
            restore_at = time.monotonic()
        assert not [a for a in probe.attempts if cut_at <= a.start < restore_at and a.ok]
        back = probe.first_after(restore_at, ok=True, timeout=1.0 + SLACK)
        print(
            f"\n{server.kind} on {server.base_url}: first failure {failed.end - cut_at:.3f}s "
            f"after the cut ({failed.error}); first success {back.end - restore_at:.3f}s "
            "after restore"
        )
    finally:
        probe.stop()


async def heartbeat_times(admin: MatrixClient, room_id: str, user_id: str) -> list[int]:
    """origin_server_ts of every heartbeat ``user_id`` posted in the room, oldest first."""
    return [
        int(event["origin_server_ts"])
        for event in await room_events(admin, room_id)
        if event.get("type") == "cis.node.heartbeat" and event.get("sender") == user_id
    ]


@pytest.mark.slow
async def test_a_cis_node_in_a_namespace_is_cut_off_and_comes_back(
    netns: MakeNetns, homeserver_factory: Factory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """What issue 14's partition tests start from: a real ``cis node`` inside a namespace,
    registered on a homeserver on the host side (whose pushes reach its appservice through the
    pair), joins a run room and heartbeats; cut off, no heartbeat of it lands; restored, its
    heartbeats resume."""
    ns = netns()
    (plan,) = plan_nodes(tmp_path, "cis.local", "wn", namespace=ns)
    assert plan.identity.listen_host == ns.address
    server = homeserver_factory(host=ns.host_address, appservice_files=(plan.registration,))
    admin_id, token = await server.create_user(unique("admin"), admin=True)
    admin = MatrixClient(http, server.base_url, user_id=admin_id, token=token)
    heartbeat = 0.25
    write_configs([plan], server.base_url, allowed_users=[admin_id], heartbeat_secs=heartbeat)
    node = NodeProcess(plan, namespace=ns).start()
    try:
        room_id = await run_room(admin, [plan.user_id])  # the invite is pushed into the namespace

        async def beating() -> bool:
            return len(await heartbeat_times(admin, room_id, plan.user_id)) >= 3

        await wait_for(beating, what="the node inside to join and heartbeat three times")
        with ns.partitioned():
            cut_ms = time.time() * 1000
            # The partition's length is the scenario (ten heartbeat periods), not a wait for
            # something to happen.
            await asyncio.sleep(10 * heartbeat)
            restored_ms = time.time() * 1000
        assert node.alive

        async def beat_since_restore() -> bool:
            times = await heartbeat_times(admin, room_id, plan.user_id)
            return bool(times) and times[-1] >= restored_ms

        await wait_for(beat_since_restore, what="a heartbeat after restore")
        back = time.time() * 1000 - restored_ms
        times = await heartbeat_times(admin, room_id, plan.user_id)
        # A request already at the server when the cut came may still land just after it.
        during = [t for t in times if cut_ms + 1000 <= t < restored_ms]
        assert not during, f"heartbeats landed during the cut: {during}"
        before = [t for t in times if t < cut_ms]
        assert len(before) >= 3
        print(
            f"\n{server.kind}: {len(before)} heartbeats before the cut, none during its "
            f"{(restored_ms - cut_ms) / 1000:.2f}s; the first after restore landed "
            f"{back / 1000:.3f}s after it (observed by polling the room)"
        )
    finally:
        node.stop()
