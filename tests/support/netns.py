"""A network namespace joined to the host by a veth pair, whose link a test can cut and restore.

Slot N (1..254) owns ``10.200.N.0/30`` (a slot whose range the host already routes is
skipped): the host side of the pair (``host_device``) holds
``10.200.N.1`` (``host_address``), the namespace side ``10.200.N.2`` (``address``). Inside, the
loopback is up and the default route goes through the host side, so a process in the namespace
reaches every address of the host: a homeserver bound to ``host_address`` (of this namespace or
of any other) is reachable from inside, and from the host itself. The host reaches a server in
the namespace at ``address``.

``cut()`` partitions the namespace from everything else; ``restore()`` heals it:

- ``"drop"`` (default): both ends' queues drop every packet (a ``pfifo`` qdisc of length 0:
  this needs no netem, iptables or nftables). Nothing is told: new connections and requests on
  open ones time out, in both directions, as behind a pulled cable further down the line.
- ``"down"``: the namespace's end goes down. Inside, every send fails at once with "network is
  unreachable"; the host's packets towards the namespace are dropped (no carrier).

Name lookups inside fail at once instead of timing out: the host's name servers are out of
reach (the host does not forward), so ``ip netns exec`` is given a ``resolv.conf`` naming only the
namespace's own loopback, where nothing listens (``/etc/netns/NAME/``, removed with the
namespace). ``/etc/hosts`` is the host's. Use IP addresses.

Addresses and routes of the host side never change, so the host's own use of ``host_address``
(a homeserver bound there, its local clients) carries on through a cut.

Slots are claimed machine-wide with an ``flock`` on ``/run/cis-test-netns/N.lock``, held while
the namespace lives, so parallel test processes (pytest-xdist, other checkouts) never share one.
A process that died without cleaning up (SIGKILL, power cut) released its lock with it; the next
claimant of the slot deletes what it left (its namespace, veth pair and the processes still in
it) before building its own, and ``reap_stale()`` sweeps every unlocked slot.

Needs root and iproute2 (``ip``, ``tc``); ``unavailable_reason()`` says what is missing. The
module itself imports without either.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

LOCK_DIR = Path("/run/cis-test-netns")
ETC_NETNS = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
SLOTS = range(1, 255)
NAME_PREFIX = "cis-test-"
CutMode = Literal["drop", "down"]
STOP_TIMEOUT = 5.0


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message has the command and its stderr."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2 (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, veth pairs, tc)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


class NetworkNamespace:
    """One claimed slot: namespace ``cis-test-N``, veth pair ``cistNh`` (host) / ``cistNn``.

    Make one with ``NetworkNamespace.create()`` (or the ``netns`` pytest fixture); ``delete()``
    (idempotent) stops what runs inside and removes everything.
    """

    def __init__(self, slot: int, lock_fd: int) -> None:
        self.slot = slot
        self.name = f"{NAME_PREFIX}{slot}"
        self.host_device = f"cist{slot}h"
        self.device = f"cist{slot}n"
        self.host_address = f"10.200.{slot}.1"
        self.address = f"10.200.{slot}.2"
        self.cut_mode: CutMode | None = None
        self._lock_fd: int | None = lock_fd
        self._processes: list[subprocess.Popen[Any]] = []

    # --- making and removing ----------------------------------------------------------------

    @classmethod
    def create(cls) -> NetworkNamespace:
        """Claim a free slot and build its namespace; NetnsError if none is free or ``ip``
        fails (nothing is left behind then)."""
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        # A random start spreads parallel claimants over the slots instead of racing for slot 1.
        start = random.randrange(len(SLOTS))
        busy = shadowing = 0
        for offset in range(len(SLOTS)):
            slot = SLOTS[(start + offset) % len(SLOTS)]
            lock_fd = _try_lock(slot)
            if lock_fd is None:
                busy += 1
                continue
            namespace = cls(slot, lock_fd)
            try:
                _remove_slot(slot)  # what a dead owner of this slot left, if anything
                if _routed_elsewhere(namespace.address):
                    shadowing += 1  # the host has a network there already
                    namespace.delete()
                    continue
                namespace._build()
            except BaseException:
                namespace.delete()
                raise
            return namespace
        raise NetnsError(
            f"no free namespace slot in 10.200.0.0/16: {busy} in use by live test processes "
            f"(locks in {LOCK_DIR}), {shadowing} overlap networks this host routes"
        )

    def _build(self) -> None:
        _ip("netns", "add", self.name)
        etc = ETC_NETNS / self.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        _ip(
            "link", "add", self.host_device, "type", "veth",
            "peer", "name", self.device, "netns", self.name,
        )  # fmt: skip
        _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_device)
        _ip("link", "set", self.host_device, "up")
        _ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.device)
        _ip("-n", self.name, "link", "set", "lo", "up")
        self._bring_up()

    def _bring_up(self) -> None:
        _ip("-n", self.name, "link", "set", self.device, "up")
        _ip("-n", self.name, "route", "replace", "default", "via", self.host_address)

    def delete(self) -> None:
        """Stop the processes started inside (SIGTERM, then SIGKILL after a grace), kill any
        other process still in the namespace, remove the pair and the namespace, release the
        slot. Idempotent; never raises for something already gone."""
        for process in self._processes:
            _stop(process)
        self._processes.clear()
        _remove_slot(self.slot)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @property
    def exists(self) -> bool:
        return (NETNS_RUN / self.name).exists()

    def __enter__(self) -> NetworkNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    # --- running things inside ----------------------------------------------------------------

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """Put before an argv to run it inside (a homeserver's ``command_prefix``)."""
        return ("ip", "netns", "exec", self.name)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside, in its own session (``subprocess.Popen`` keywords pass
        through); ``delete()`` stops it if it still runs."""
        kwargs.setdefault("start_new_session", True)
        process: subprocess.Popen[Any] = subprocess.Popen([*self.exec_prefix, *argv], **kwargs)
        self._processes.append(process)
        return process

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside to completion (``subprocess.run`` keywords pass through)."""
        kwargs.setdefault("timeout", 60)
        return subprocess.run([*self.exec_prefix, *argv], **kwargs)

    def pids(self) -> list[int]:
        """Every process now inside the namespace."""
        result = _ip("netns", "pids", self.name, check=False)
        return [int(pid) for pid in result.stdout.split()]

    def free_ports(self, count: int = 1) -> list[int]:
        """``count`` distinct TCP ports free on ``address`` inside (the host's ``free_port``
        cannot look there), e.g. a homeserver's client and federation ports."""
        result = self.run(
            [sys.executable, "-c", _FREE_PORTS, self.address, str(count)],
            capture_output=True,
            text=True,
            check=True,
        )
        return [int(port) for port in result.stdout.split()]

    # --- partitions --------------------------------------------------------------------------

    def cut(self, mode: CutMode = "drop") -> None:
        """Partition the namespace (see the module's docstring for what each mode does)."""
        if self.cut_mode is not None:
            raise NetnsError(f"{self.name} is already cut ({self.cut_mode})")
        if mode == "drop":
            for netns, device in ((None, self.host_device), (self.name, self.device)):
                _run(
                    [*_tc(netns), "qdisc", "replace", "dev", device, "root", "pfifo", "limit", "0"]
                )
        elif mode == "down":
            _ip("-n", self.name, "link", "set", self.device, "down")
        else:
            raise ValueError(f"unknown cut mode {mode!r} (drop or down)")
        self.cut_mode = mode

    def restore(self) -> None:
        """Heal the cut: new connections work at once; an open TCP connection whose ends have
        not given up carries on with its next retransmission (after a "drop" cut)."""
        if self.cut_mode == "drop":
            for netns, device in ((None, self.host_device), (self.name, self.device)):
                _run([*_tc(netns), "qdisc", "del", "dev", device, "root"])
        elif self.cut_mode == "down":
            self._bring_up()
        self.cut_mode = None

    @contextlib.contextmanager
    def partitioned(self, mode: CutMode = "drop") -> Iterator[None]:
        """``with ns.partitioned(): ...``: cut for the block, restored even if it raises."""
        self.cut(mode)
        try:
            yield
        finally:
            self.restore()

    def __repr__(self) -> str:
        state = f"cut={self.cut_mode}" if self.cut_mode else "linked"
        return f"<NetworkNamespace {self.name} {self.address}<->{self.host_address} {state}>"


_FREE_PORTS = """
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[2]))]
for sock in sockets:
    sock.bind((sys.argv[1], 0))
print(*(sock.getsockname()[1] for sock in sockets))
"""


def _tc(netns: str | None) -> list[str]:
    return ["tc"] if netns is None else ["tc", "-n", netns]


def _try_lock(slot: int) -> int | None:
    fd = os.open(LOCK_DIR / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _routed_elsewhere(address: str) -> bool:
    """Whether the host routes ``address`` other than by its default route (a network of its
    own there, which the slot's pair would shadow)."""
    routes = _ip("-o", "route", "show", "to", "match", address).stdout.splitlines()
    return any(not route.startswith("default") for route in routes)


def _slot_paths(slot: int) -> tuple[Path, Path, Path]:
    """Where slot ``slot``'s namespace, host device and resolver config show up."""
    name = f"{NAME_PREFIX}{slot}"
    return NETNS_RUN / name, Path(f"/sys/class/net/cist{slot}h"), ETC_NETNS / name


def _remove_slot(slot: int) -> None:
    """Delete slot ``slot``'s namespace and pair, killing what still runs inside. The caller
    holds the slot's lock, so all of it belongs to this process or to a dead one."""
    name = f"{NAME_PREFIX}{slot}"
    namespace, host_device, etc = _slot_paths(slot)
    if namespace.exists():
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    # Deleting either end of a veth pair deletes both. The namespace's end goes when the
    # namespace does, but only once nothing holds it, so the host's end is deleted explicitly.
    if host_device.exists():
        _ip("link", "del", host_device.name, check=False)
    if namespace.exists():
        _ip("netns", "del", name)
    shutil.rmtree(etc, ignore_errors=True)


def reap_stale() -> list[str]:
    """Remove what every unlocked slot left (its owner died); the namespace names removed."""
    if unavailable_reason() is not None or not LOCK_DIR.exists():
        return []
    removed = []
    for slot in SLOTS:
        if not any(path.exists() for path in _slot_paths(slot)):
            continue
        lock_fd = _try_lock(slot)
        if lock_fd is None:
            continue
        try:
            _remove_slot(slot)
            removed.append(f"{NAME_PREFIX}{slot}")
        finally:
            os.close(lock_fd)
    return removed


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
