"""docker-compose.yml, synapse-dev/ and the Dockerfile, checked without a Docker engine: the real
Compose v2 parser validates and normalises the file (``config``), and this test holds the parts
to each other: every registration Synapse loads exists (made by the set-up's token step, run
here) and matches its node's config (tokens, url, port, server name, user namespace), every
mounted path exists, the node configs are what ``cis dev-cluster`` renders for the compose
network, and Synapse's dev settings are the ones ``cis dev-cluster`` gives its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from cis_bot.app.devcluster.synapse import DEV_SETTINGS
from cis_bot.app.devcluster.topology import (
    COMPOSE_APPSERVICE_PORT,
    SERVER_NAME,
    compose_node_configs,
    first_dag,
)
from tests.support.devcluster import REPO, compose, compose_model

SYNAPSE_DEV = REPO / "synapse-dev"
SETUP = SYNAPSE_DEV / "setup.py"
#: What synapse-dev/homeserver.yaml gives the compose Synapse beyond the dev settings.
COMPOSE_ONLY = {"public_baseurl", "listeners", "database", "app_service_config_files"}


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    return compose_model()


@pytest.fixture(scope="module")
def homeserver_yaml() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((SYNAPSE_DEV / "homeserver.yaml").read_text())
    return data


def node_templates() -> dict[str, Path]:
    return {path.stem: path for path in sorted((SYNAPSE_DEV / "nodes").glob("*.toml"))}


def mount(service: dict[str, Any], target: str) -> dict[str, Any]:
    found = [v for v in service.get("volumes", []) if v["target"] == target]
    assert found, f"nothing mounted at {target}: {service.get('volumes')}"
    return found[0]


def run_setup(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SETUP), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_the_compose_file_is_valid_for_docker_compose() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_every_mounted_path_exists(model: dict[str, Any]) -> None:
    binds = [
        (name, volume)
        for name, service in model["services"].items()
        for volume in service.get("volumes", [])
        if volume["type"] == "bind"
    ]
    assert binds
    for name, volume in binds:
        source = Path(volume["source"])
        # A missing source would be made an empty directory by Docker: a silent failure.
        assert source.exists(), f"{name} mounts {source}, which does not exist"
        assert REPO in source.parents, f"{name} mounts {source}, outside the repository"
    # Named volumes are declared.
    for name, service in model["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "volume":
                assert volume["source"] in model["volumes"], (name, volume)


def test_the_node_configs_are_the_dev_cluster_topology_on_the_compose_network() -> None:
    templates = node_templates()
    rendered = compose_node_configs(workers=len(templates) - 1)
    assert sorted(rendered) == sorted(templates)
    for node_id, text in rendered.items():
        assert templates[node_id].read_text() == text, (
            f"synapse-dev/nodes/{node_id}.toml differs from what "
            "cis_bot/app/devcluster/topology.py renders (compose_node_configs)"
        )
        node = tomllib.loads(text)["node"]
        assert "as_token" not in node and "hs_token" not in node  # never committed
    assert (SYNAPSE_DEV / "dags" / "hello.toml").read_text() == first_dag()


def test_registrations_synapse_loads_match_their_nodes(
    model: dict[str, Any], homeserver_yaml: dict[str, Any], tmp_path: Path
) -> None:
    services = model["services"]
    synapse, tokens = services["synapse"], services["tokens"]
    server_name = services["synapse-init"]["environment"]["SYNAPSE_SERVER_NAME"]
    assert server_name == SERVER_NAME
    # The token step, run here as the `tokens` service runs it, into a stand-in for the volume.
    assert mount(tokens, "/cluster")["source"] == mount(synapse, "/cluster")["source"]
    assert tokens["command"][:3] == ["python", "/synapse-dev/setup.py", "tokens"]
    cluster = tmp_path / "cluster"
    done = run_setup("tokens", "--templates", str(SYNAPSE_DEV / "nodes"), "--cluster", str(cluster))
    assert done.returncode == 0, done.stderr

    listed = homeserver_yaml["app_service_config_files"]
    assert len(listed) == len(set(listed)) == len(node_templates())
    for path in listed:
        assert path.startswith("/cluster/"), path
        registration = yaml.safe_load((cluster / path.removeprefix("/cluster/")).read_text())
        node_id = registration["id"].removeprefix("cis-")
        assert node_id in node_templates(), f"{path} is no node's registration"
        config = tomllib.loads((cluster / "nodes" / f"{node_id}.toml").read_text())
        node = config["node"]
        # The tokens the node uses are the registration's.
        assert registration["as_token"] == node["as_token"]
        assert registration["hs_token"] == node["hs_token"]
        assert len(node["as_token"]) >= 40 and node["as_token"] != node["hs_token"]
        # Synapse pushes to the node's container, on the port it listens on.
        service = services[node_id]
        assert service["hostname"] == node_id
        assert registration["url"] == f"http://{node_id}:{node['listen_port']}"
        assert node["listen_port"] == COMPOSE_APPSERVICE_PORT and node["listen_host"] == "0.0.0.0"
        assert f"/cluster/nodes/{node_id}.toml" in service["command"]
        assert ("--coordinator" in service["command"]) == (node_id == "coordinator")
        assert mount(service, "/cluster")["source"] == "cluster"
        assert mount(service, "/state")["type"] == "volume"
        # The node's server and user: the registration's exclusive namespace holds its bot.
        assert config["dag"]["matrix"]["home_server"] == server_name
        user_id = f"@cis_{node_id}:{server_name}"
        assert registration["sender_localpart"] == f"cis_{node_id}"
        (users,) = registration["namespaces"]["users"]
        assert users["exclusive"] is True and re.fullmatch(users["regex"], user_id)
        assert not re.fullmatch(users["regex"], f"@dev:{server_name}")
        assert node["homeserver"] == "http://synapse:8008"
        assert node["allowed_users"] == [f"@dev:{server_name}"]
    # Every node's registration is listed.
    assert {Path(p).stem for p in listed} == set(node_templates())

    # A second run (every `docker compose up`) keeps the tokens.
    before = (cluster / "registrations" / "worker-a.yaml").read_text()
    again = run_setup(
        "tokens", "--templates", str(SYNAPSE_DEV / "nodes"), "--cluster", str(cluster)
    )
    assert again.returncode == 0, again.stderr
    assert (cluster / "registrations" / "worker-a.yaml").read_text() == before


def test_synapse_gets_the_dev_settings_of_cis_dev_cluster(
    model: dict[str, Any], homeserver_yaml: dict[str, Any]
) -> None:
    for key, value in DEV_SETTINGS.items():
        assert homeserver_yaml.get(key) == value, f"synapse-dev/homeserver.yaml: {key}"
    assert set(homeserver_yaml) == set(DEV_SETTINGS) | COMPOSE_ONLY
    services = model["services"]
    synapse = services["synapse"]
    assert mount(synapse, "/synapse-dev/homeserver.yaml")["source"] == str(
        SYNAPSE_DEV / "homeserver.yaml"
    )
    # Generated first, then ours over it.
    assert synapse["command"] == [
        "run",
        "--config-path=/data/homeserver.yaml",
        "--config-path=/synapse-dev/homeserver.yaml",
    ]
    assert services["synapse-init"]["command"] == ["generate"]
    assert mount(services["synapse-init"], "/data")["source"] == mount(synapse, "/data")["source"]


def test_postgres_has_what_synapse_requires(
    model: dict[str, Any], homeserver_yaml: dict[str, Any]
) -> None:
    postgres = model["services"]["postgres"]
    env = postgres["environment"]
    for flag in ("--encoding=UTF8", "--lc-collate=C", "--lc-ctype=C"):
        assert flag in env["POSTGRES_INITDB_ARGS"].split()
    database = homeserver_yaml["database"]
    assert database["name"] == "psycopg2"
    args = database["args"]
    assert args["host"] == "postgres"
    assert (args["user"], args["password"], args["database"]) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    assert "ports" not in postgres  # its password is a dev one: never published
    assert model["services"]["synapse"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_ports_element_and_healthchecks_agree(
    model: dict[str, Any], homeserver_yaml: dict[str, Any]
) -> None:
    services = model["services"]
    (listener,) = homeserver_yaml["listeners"]
    (published,) = services["synapse"]["ports"]
    assert published["target"] == listener["port"]
    assert published["host_ip"] == "127.0.0.1"
    public = f"http://localhost:{published['published']}"
    assert homeserver_yaml["public_baseurl"] == f"{public}/"
    assert (
        f"http://localhost:{listener['port']}/health" in services["synapse"]["healthcheck"]["test"]
    )
    element = json.loads((SYNAPSE_DEV / "element-config.json").read_text())
    server = element["default_server_config"]["m.homeserver"]
    assert server == {"base_url": public, "server_name": SERVER_NAME}
    (element_port,) = services["element"]["ports"]
    assert element_port["host_ip"] == "127.0.0.1" and element_port["target"] == 80
    assert mount(services["element"], "/app/config.json")["read_only"] is True
    setup = services["setup"]
    assert f"--public-homeserver={public}" in setup["command"]
    assert f"--element=http://localhost:{element_port['published']}" in setup["command"]
    # Every node is healthy (connected) before the set-up invites it; the nodes after Synapse.
    for node_id in node_templates():
        assert setup["depends_on"][node_id]["condition"] == "service_healthy"
        assert services[node_id]["depends_on"]["synapse"]["condition"] == "service_healthy"
    # The set-up reads the registration shared secret from Synapse's generated config.
    secret_from = next(a for a in setup["command"] if a.startswith("--synapse-config="))
    data = mount(setup, "/synapse-data")
    assert data["source"] == "synapse-data" and data["read_only"] is True
    assert secret_from == "--synapse-config=/synapse-data/homeserver.yaml"
    # The coordinator reads the DAGs mounted from synapse-dev/dags.
    coordinator = tomllib.loads((SYNAPSE_DEV / "nodes" / "coordinator.toml").read_text())
    dags = mount(services["coordinator"], coordinator["chat"]["dags_dir"])
    assert dags["source"] == str(SYNAPSE_DEV / "dags")


def test_cis_dev_bind_moves_the_published_ports() -> None:
    model = compose_model({"CIS_DEV_BIND": "192.0.2.7", "CIS_DEV_PASSWORD": "chosen"})
    services = model["services"]
    for name in ("synapse", "element"):
        assert [p["host_ip"] for p in services[name]["ports"]] == ["192.0.2.7"]
    assert services["setup"]["environment"] == {
        "CIS_DEV_BIND": "192.0.2.7",
        "CIS_DEV_PASSWORD": "chosen",
    }


def test_the_setup_keeps_the_dev_password_on_loopback(tmp_path: Path) -> None:
    synapse_config = tmp_path / "homeserver.yaml"
    synapse_config.write_text("registration_shared_secret: s3cret\n")
    args = [
        "room",
        "--templates",
        str(SYNAPSE_DEV / "nodes"),
        "--homeserver",
        "http://127.0.0.1:9",  # nothing listens: the set-up gets as far as asking it
        "--synapse-config",
        str(synapse_config),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIS_DEV_")}
    refused = run_setup(*args, env={**env, "CIS_DEV_BIND": "0.0.0.0"})
    assert refused.returncode == 2, refused.stderr
    assert "CIS_DEV_BIND=0.0.0.0" in refused.stderr and "set CIS_DEV_PASSWORD" in refused.stderr
    assert "Traceback" not in refused.stderr
    # With a password of one's own it goes on (and finds no homeserver here).
    chosen = run_setup(*args, env={**env, "CIS_DEV_BIND": "0.0.0.0", "CIS_DEV_PASSWORD": "x"})
    assert chosen.returncode == 1, chosen.stderr
    assert "the homeserver at http://127.0.0.1:9" in chosen.stderr
    assert "Traceback" not in chosen.stderr
    on_loopback = run_setup(*args, env={**env, "CIS_DEV_BIND": "127.0.0.1"})
    assert on_loopback.returncode == 1 and "the homeserver at" in on_loopback.stderr


def test_the_dockerfile_installs_the_package_and_runs_unprivileged(
    model: dict[str, Any],
) -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]-slim$", text, re.MULTILINE)
    copied = re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE)
    sources = [source for line in copied for source in line.split()]
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for source in sources:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignored}, (
            f".dockerignore leaves {source} out of the build context"
        )
    assert "pip install ." in text
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    uid = re.search(r"useradd --uid (\d+)", text)
    assert uid
    synapse = model["services"]["synapse"]["environment"]
    assert synapse["UID"] == uid.group(1)  # it reads the registrations, 0600, ours
    for name, service in model["services"].items():
        if "build" in service:
            assert service["build"]["context"] == str(REPO), name
            assert service["image"] == "cis-bot:dev", name
