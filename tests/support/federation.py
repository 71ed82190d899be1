"""Real Synapses that federate with each other on this machine, without DNS.

Each server's name is ``HOST:FEDERATION_PORT`` with HOST an IP literal (``127.0.0.1`` by
default), so Synapse's server discovery connects to that address and port directly: no
``.well-known``, no SRV, no resolver. The federation listener speaks TLS with a self-signed
certificate the fixture makes (with Synapse's own ``cryptography``); the peers skip verifying it
(``federation_verify_certificates: false``), may send to loopback and private addresses
(``federation_ip_range_blacklist: []``; Synapse refuses them by default), and fetch each other's
signing keys directly (``trusted_key_servers: []``). The client API stays plain HTTP on its own
port, as in ``SynapseServer``.

Federation is made quick for tests: its rate limiter opened wide, an unreachable peer retried
after ``retry_interval`` (2 s) rather than Synapse's 10 minutes, and one attempt of a request
bounded by ``client_timeout`` (10 s, not 60 s), so a peer that comes back (restart, healed
partition) gets its backlog within about ``client_timeout + retry_interval``, usually sooner
(measured: 0.6-2 s after cuts of 12-25 s, with no other traffic to wake the sender).

Server names hold a port, so user ids look like ``@alice:127.0.0.1:41234``; a test learns them
from ``server.server_name`` / ``server.user_id(localpart)`` after ``SynapseFederation(...)`` and
before ``start()`` (appservice registrations must name the server, and Synapse reads them only at
start-up).
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.netns import NetworkNamespace
from tests.support.process import START_TIMEOUT, HomeserverStartError, free_port
from tests.support.synapse import SynapseServer

# Synapse's default federation limiter sleeps after 10 requests a second from one peer and
# rejects after 50, with 3 in flight: far below what a test's burst of events makes.
FEDERATION_RATE_LIMIT: dict[str, int] = {
    "window_size": 1000,
    "sleep_limit": 100000,
    "sleep_delay": 1,
    "reject_limit": 100000,
    "concurrent": 100000,
}

# Run by Synapse's interpreter, which has ``cryptography`` (ours need not).
_MAKE_CERTIFICATE = """
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

cert_path, key_path, host = sys.argv[1:4]
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
try:
    alt = x509.IPAddress(ipaddress.ip_address(host))
except ValueError:
    alt = x509.DNSName(host)
now = datetime.datetime.now(datetime.timezone.utc)
cert = (
    x509.CertificateBuilder()
    .subject_name(name)
    .issuer_name(name)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(hours=1))
    .not_valid_after(now + datetime.timedelta(days=30))
    .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
    .sign(key, hashes.SHA256())
)
with open(key_path, "wb") as out:
    out.write(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))
with open(cert_path, "wb") as out:
    out.write(cert.public_bytes(serialization.Encoding.PEM))
"""


class FederatingSynapse(SynapseServer):
    """A Synapse named ``HOST:FEDERATION_PORT`` with a TLS federation listener on that port.

    ``host`` is where both listeners bind and what peers connect to; ``federation_port`` (free
    if not given) is the one in the server name. The client API is on ``port`` (``base_url``).
    """

    def __init__(
        self,
        *,
        workdir: Path,
        appservice_files: tuple[Path, ...] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        federation_port: int | None = None,
        retry_interval: str = "2s",
        client_timeout: str = "10s",
        log_level: str = "INFO",
        extra_config: dict[str, Any] | None = None,
        command_prefix: tuple[str, ...] = (),
    ) -> None:
        self.federation_port = federation_port or free_port(host)
        super().__init__(
            workdir=workdir,
            server_name=f"{host}:{self.federation_port}",
            appservice_files=appservice_files,
            host=host,
            port=port,
            log_level=log_level,
            extra_config=extra_config,
            command_prefix=command_prefix,
        )
        self.retry_interval = retry_interval
        self.client_timeout = client_timeout
        self.tls_certificate = workdir / "federation.crt"
        self.tls_key = workdir / "federation.key"

    @property
    def federation_url(self) -> str:
        return f"https://{self.host}:{self.federation_port}"

    def _write_config(self) -> None:
        self._make_certificate()
        super()._write_config()

    def _make_certificate(self) -> None:
        made = subprocess.run(
            [
                self.python,
                "-c",
                _MAKE_CERTIFICATE,
                str(self.tls_certificate),
                str(self.tls_key),
                self.host,
            ],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if made.returncode != 0:
            raise HomeserverStartError(
                f"could not make the federation certificate for {self.server_name}:\n"
                f"{made.stderr[-3000:]}"
            )

    def _listeners(self) -> list[dict[str, Any]]:
        return [
            *super()._listeners(),
            {
                "port": self.federation_port,
                "bind_addresses": [self.host],
                "type": "http",
                "tls": True,
                "x_forwarded": False,
                "resources": [{"names": ["federation"], "compress": False}],
            },
        ]

    def _more_config(self) -> dict[str, Any]:
        return {
            "tls_certificate_path": str(self.tls_certificate),
            "tls_private_key_path": str(self.tls_key),
            "federation_verify_certificates": False,
            # Synapse refuses loopback and private destinations (ip_range_blacklist's default).
            # ip_range_whitelist cannot lift that for a server name that is an IP literal: the
            # federation client checks those against the block-list alone. So federation gets
            # its own, empty, block-list (deprecated but honoured in 1.163; Synapse adds
            # 0.0.0.0 and :: to it); the server's other outgoing requests keep the default.
            "federation_ip_range_blacklist": [],
            "trusted_key_servers": [],
            "rc_federation": FEDERATION_RATE_LIMIT,
            "federation": {
                # One attempt of an outgoing request; transactions are retried (delays capped
                # at retry_interval) until the peer answers, so a healed partition delivers the
                # backlog within about client_timeout + retry_interval.
                "client_timeout": self.client_timeout,
                "destination_min_retry_interval": self.retry_interval,
                "destination_max_retry_interval": self.retry_interval,
                "max_short_retry_delay": "1s",
                "max_long_retry_delay": self.retry_interval,
            },
        }

    def _wait_ready(self, started: float, timeout: float) -> None:
        super()._wait_ready(started, timeout)
        # Both listeners start together, but a peer's first request must not race the TLS one.
        deadline = started + timeout
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = f"{self.federation_url}/_matrix/key/v2/server"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as response:
                    if response.status == 200:
                        self.startup_seconds = time.monotonic() - started
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise HomeserverStartError(
                    f"synapse {self.server_name} served no signing key on its federation "
                    f"listener within {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.02)  # polling a socket that is not listening yet: nothing to wait on


class SynapseFederation:
    """Several ``FederatingSynapse``s that federate with each other, started together.

    Construct it (names and ports are fixed then), write appservice registrations that name the
    servers (``federation[0].server_name``), give them to ``federation[i].appservice_files``,
    then ``start()``. Servers are named hs-a, hs-b, ... in ``root``.

    Placement: by default every server binds ``127.0.0.1``. ``namespaces[i]`` (a
    ``NetworkNamespace``, or None) runs server i inside that namespace, on its ``address``, so
    cutting the namespace partitions that homeserver (and whatever else runs in there) from the
    rest. The servers outside must then be reachable from inside: ``hosts[i]`` binds server i
    to a namespace's ``host_address`` (any namespace's: each routes to the whole host).
    ``options`` go to every ``FederatingSynapse`` (``retry_interval``, ``client_timeout``,
    ``extra_config``, ...).
    """

    def __init__(
        self,
        root: Path,
        count: int = 2,
        *,
        hosts: Sequence[str | None] | None = None,
        namespaces: Sequence[NetworkNamespace | None] | None = None,
        **options: Any,
    ) -> None:
        hosts = list(hosts or [None] * count)
        namespaces = list(namespaces or [None] * count)
        if len(hosts) != count or len(namespaces) != count:
            raise ValueError(f"{count} servers: give {count} hosts and namespaces (None: default)")
        self.servers = []
        for index, (host, namespace) in enumerate(zip(hosts, namespaces, strict=True)):
            workdir = root / f"hs-{chr(ord('a') + index)}"
            if namespace is None:
                host = host or "127.0.0.1"
                if host.startswith("127.") and any(namespaces):
                    raise ValueError(
                        f"server {index} on {host} cannot be reached from a namespace: "
                        "bind it to a namespace's host_address (hosts=[...])"
                    )
                server = FederatingSynapse(workdir=workdir, host=host, **options)
            else:
                if host not in (None, namespace.address):
                    raise ValueError(f"server {index} is in {namespace.name}: it binds there")
                port, federation_port = namespace.free_ports(2)
                server = FederatingSynapse(
                    workdir=workdir,
                    host=namespace.address,
                    port=port,
                    federation_port=federation_port,
                    command_prefix=namespace.exec_prefix,
                    **options,
                )
            self.servers.append(server)
        self.startup_seconds: float | None = None

    def __getitem__(self, index: int) -> FederatingSynapse:
        return self.servers[index]

    def __len__(self) -> int:
        return len(self.servers)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every server at once (each is mostly Python start-up: they overlap well);
        ``startup_seconds`` is the wall time until the last one serves both listeners."""
        started = time.monotonic()
        errors: list[BaseException] = []

        def start_one(server: FederatingSynapse) -> None:
            try:
                server.start(timeout)
            except BaseException as exc:  # reported below, with every server's failure
                errors.append(exc)

        threads = [
            threading.Thread(target=start_one, args=(server,), name=f"start-{server.server_name}")
            for server in self.servers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            self.stop()
            raise HomeserverStartError("\n\n".join(str(error) for error in errors))
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)
