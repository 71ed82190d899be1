"""Item 8 of the security review: config and DAG values that used to validate and then fail at
run time (an integer Matrix's JSON cannot carry, a room prefix that makes no alias, an unknown
output extractor, a bot name with a space, ...) are refused up front, the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.support import cis

DAG = '[[tasks]]\nid = "t"\ncommand = "true"\n'

CONFIGS = {
    "dag.local.max_workers": ("[dag.local]\nmax_workers = 9007199254740993\n", "at most"),
    "dag.local.watchers": ('[dag.local]\nwatchers = ["bob"]\n', "Matrix user id"),
    "dag.matrix.room_prefix": ('[dag.matrix]\nroom_prefix = "my runs:"\n', "room aliases"),
    "dag.matrix.home_server": ('[dag.matrix]\nhome_server = "cis local"\n', "server name"),
    "dag.matrix.flush_timeout_secs": ("[dag.matrix]\nflush_timeout_secs = 1e300\n", "at most"),
    "agents.mine.output": (
        '[agents.mine]\nargv = ["x"]\noutput = "claude-json"\n',
        "unknown output extractor",
    ),
    "agents.shell.env": ('[agents.shell]\nenv = { "A=B" = "1" }\n', "contains '='"),
    "node.id": ('[node]\nid = "a b"\n', "a node id holds only"),
    "node.homeserver": ('[node]\nhomeserver = "localhost:8008"\n', "client-server URL"),
    "node.server_name": ('[node]\nserver_name = "example.org:0"\n', "is not a port"),
    "node.bot_localpart": ('[node]\nbot_localpart = "Cis Bot"\n', "user name holds only"),
    "node.listen_port": ("[node]\nlisten_port = 70000\n", "port number"),
    "node.allowed_users": ('[node]\nallowed_users = ["@alice:example.org", "bob"]\n', "item 1"),
    "node.coordinators": ('[node]\ncoordinators = ["@c:exa mple.org"]\n', "not valid"),
    "node.workers": ('[node]\nworkers = ["@:example.org"]\n', "Matrix user id"),
    "node.accept_agents[0]": ('[node]\naccept_agents = ["sheel"]\n', "did you mean 'shell'"),
}


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_a_config_value_that_would_fail_later_is_refused_now(tmp_path: Path, key: str) -> None:
    text, said = CONFIGS[key]
    config = tmp_path / "config.toml"
    config.write_text(text)
    (tmp_path / "dag.toml").write_text(DAG)
    result = cis("dag", "validate", "dag.toml", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result
    assert f"key '{key}'" in result.stderr and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "key", "said"),
    [
        ("max_workers = 9007199254740992\n" + DAG, "max_workers", "at most"),
        ('[[tasks]]\nid = "t"\ncommand = "true"\nretry = 9007199254740992\n', "retry", "at most"),
        (
            '[[tasks]]\nid = "t"\ncommand = "true"\ntimeout_secs = 1e300\n',
            "timeout_secs",
            "at most",
        ),
    ],
    ids=["max_workers", "retry", "timeout"],
)
def test_a_dag_number_matrix_cannot_carry_is_refused(
    tmp_path: Path, text: str, key: str, said: str
) -> None:
    (tmp_path / "dag.toml").write_text(text)
    result = cis("dag", "validate", "dag.toml", cwd=tmp_path)
    assert result.returncode == 2, result
    assert f"key '{key}'" in result.stderr and said in result.stderr, result.stderr
