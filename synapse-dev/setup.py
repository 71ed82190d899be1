"""The compose dev cluster's one-shot set-up; docker-compose.yml runs it twice, in the cis_bot
image, with the same code as `cis dev-cluster up` (cis_bot/app/devcluster/).

  setup.py tokens --templates DIR --cluster DIR
      Before Synapse starts: each node config DIR/<id>.toml (synapse-dev/nodes) is written to
      CLUSTER/nodes/<id>.toml with the tokens it had there, made the first time by `cis
      registration generate`'s code, and its registration to CLUSTER/registrations/<id>.yaml,
      pointing at http://<id>:<listen_port> (the node's container on the compose network).

  setup.py room --templates DIR --homeserver URL --synapse-config FILE
                [--public-homeserver URL] [--element URL]
      Once the nodes are connected: the person's account (`dev`; the password is
      $CIS_DEV_PASSWORD, or the dev default, which is given only while $CIS_DEV_BIND, where
      Synapse and Element are published, is a loopback address), the room #cis-dev:cis.local
      with the nodes in it at power level 50, and what to open and how to log in.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from cis_bot.app.devcluster.errors import ClusterError
from cis_bot.app.devcluster.room import PersonClient, ensure_room, wait_for_nodes
from cis_bot.app.devcluster.synapse import register_with_shared_secret
from cis_bot.app.devcluster.topology import FIRST_DAG, PERSON, Topology
from cis_bot.app.registration import generate_registration, write_config_keeping_tokens
from cis_bot.config import load_config
from cis_bot.errors import UserError
from cis_bot.matrix.levels import run_room_event_levels

#: The person's password when $CIS_DEV_PASSWORD gives none: for a cluster on loopback only.
DEV_PASSWORD = "cis-dev-password"


def tokens(templates: Path, cluster: Path) -> None:
    for directory in (cluster / "nodes", cluster / "registrations"):
        directory.mkdir(parents=True, exist_ok=True)
    for template in sorted(templates.glob("*.toml")):
        config = cluster / "nodes" / template.name
        write_config_keeping_tokens(config, template.read_text(encoding="utf-8"))
        node = load_config(config).node
        url = f"http://{node.id}:{node.listen_port}"
        registration = cluster / "registrations" / f"{node.id}.yaml"
        identity = generate_registration(config, registration, url=url)
        print(f"{registration}: {identity.user_id} at {url}", flush=True)


def topology_of(templates: Path) -> Topology:
    """The cluster the node configs describe (a coordinator, worker-a, worker-b, ...)."""
    names = sorted(template.stem for template in templates.glob("*.toml"))
    topology = Topology(workers=max(1, len(names) - 1))
    expected = sorted(node.node_id for node in topology.nodes)
    if names != expected:
        raise UserError(
            f"{templates}: node configs {', '.join(names)}; a dev cluster's are "
            f"{', '.join(expected)} (synapse-dev/README.md: adding a worker)"
        )
    return topology


def person_password() -> str:
    bind = os.environ.get("CIS_DEV_BIND") or "127.0.0.1"
    chosen = os.environ.get("CIS_DEV_PASSWORD")
    if chosen:
        return chosen
    if not _loopback(bind):
        raise UserError(
            f"CIS_DEV_BIND={bind} publishes Synapse and Element beyond this machine, where the "
            "dev password is anyone's guess: set CIS_DEV_PASSWORD to a password of your own "
            "(then `docker compose up -d`), or leave CIS_DEV_BIND unset"
        )
    return DEV_PASSWORD


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def room(args: argparse.Namespace) -> None:
    topology = topology_of(args.templates)
    password = person_password()
    config = yaml.safe_load(args.synapse_config.read_text(encoding="utf-8"))
    secret = str(config["registration_shared_secret"])
    async with aiohttp.ClientSession() as http:
        client = PersonClient(http, args.homeserver)
        if await client.log_in(PERSON, password) is None:
            await register_with_shared_secret(http, args.homeserver, secret, PERSON, password)
            if await client.log_in(PERSON, password) is None:
                raise ClusterError(
                    f"{topology.person_id} exists with another password than $CIS_DEV_PASSWORD "
                    "gives now: give the first one again, or reset the cluster (docker compose "
                    "down -v)"
                )
        room_id = await ensure_room(
            client, topology, run_room_event_levels(), person_id=topology.person_id
        )
        await wait_for_nodes(
            client, room_id, topology, since_ms=0, timeout=120.0, check_alive=lambda: None
        )
    default = (
        " (the dev default; CIS_DEV_PASSWORD sets another)" if password == DEV_PASSWORD else ""
    )
    print(
        f"cis dev cluster ready at {time.strftime('%H:%M:%S')}: "
        f"{', '.join(node.node_id for node in topology.nodes)}\n"
        f"  open        {args.element}   (Element; or any Matrix client at "
        f"{args.public_homeserver})\n"
        f"  log in as   {PERSON}   password: {password}{default}\n"
        f"  room        {topology.room_alias}   (you are in it, with the nodes)\n"
        f"  try         !cis run {FIRST_DAG}   (then `!cis status`; `!cis help` lists all)",
        flush=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="setup.py", description=__doc__.split("\n\n")[0])
    phases = parser.add_subparsers(dest="phase", required=True)
    first = phases.add_parser("tokens")
    first.add_argument("--templates", type=Path, required=True)
    first.add_argument("--cluster", type=Path, required=True)
    second = phases.add_parser("room")
    second.add_argument("--templates", type=Path, required=True)
    second.add_argument("--homeserver", required=True)
    second.add_argument("--synapse-config", type=Path, required=True)
    second.add_argument("--public-homeserver", default="http://localhost:8008")
    second.add_argument("--element", default="http://localhost:8080")
    args = parser.parse_args(argv)
    try:
        if args.phase == "tokens":
            tokens(args.templates, args.cluster)
        else:
            asyncio.run(room(args))
    except UserError as exc:
        print(f"setup: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except OSError as exc:
        print(f"setup: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
