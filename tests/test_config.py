"""config.toml loading: defaults, file discovery, every section, agent profiles, errors."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from cis_bot.config import (
    ChatConfig,
    Config,
    DagConfig,
    ExecutionMode,
    HybridConfig,
    LocalConfig,
    MatrixConfig,
    load_config,
    parse_config,
    read_values,
)
from cis_bot.errors import InputError
from cis_bot.session.profile import PromptVia
from cis_bot.session.profiles import BUILTIN_PROFILES
from cis_bot.validation import Table

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), file="config.toml")


def error(text: str) -> InputError:
    with pytest.raises(InputError) as info:
        parse(text)
    assert info.value.file == "config.toml"
    return info.value


@pytest.fixture
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $CIS_CONFIG, and an empty $XDG_CONFIG_HOME: load_config(None) finds nothing."""
    monkeypatch.delenv("CIS_CONFIG", raising=False)
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    return xdg


# -- defaults and discovery -------------------------------------------------------------------


def test_defaults_are_the_seed_values(no_user_config: Path) -> None:
    config = load_config(None)
    assert config == Config()
    assert config.source is None
    assert config.dag.execution_mode is ExecutionMode.HYBRID
    assert config.dag.local == LocalConfig(max_workers=4, default_agent="claude")
    assert config.dag.matrix == MatrixConfig(
        room_prefix="!dag-", home_server="cis.local", broadcast_interval_ms=500
    )
    assert config.dag.hybrid == HybridConfig(
        broadcast_status=True, broadcast_output=False, accept_remote_tasks=True
    )
    assert dict(config.agents) == dict(BUILTIN_PROFILES)
    assert config.default_agent == "claude"
    assert parse("") == Config()


def test_user_config_in_xdg_home_is_found(no_user_config: Path) -> None:
    path = no_user_config / "cis" / "config.toml"
    path.parent.mkdir()
    path.write_text("[dag.local]\nmax_workers = 7\n", encoding="utf-8")
    config = load_config(None)
    assert config.dag.local.max_workers == 7
    assert config.source == path


def test_cis_config_env_wins(no_user_config: Path, tmp_path: Path, monkeypatch: Any) -> None:
    (no_user_config / "cis").mkdir()
    (no_user_config / "cis" / "config.toml").write_text("[dag.local]\nmax_workers = 7\n")
    explicit = tmp_path / "other.toml"
    explicit.write_text('[dag]\nexecution_mode = "local"\n', encoding="utf-8")
    monkeypatch.setenv("CIS_CONFIG", str(explicit))
    config = load_config(None)
    assert (config.dag.execution_mode, config.dag.local.max_workers) == (ExecutionMode.LOCAL, 4)
    assert config.source == explicit


def test_cis_config_pointing_nowhere_is_an_error(
    no_user_config: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("CIS_CONFIG", str(missing))
    with pytest.raises(InputError) as info:
        load_config(None)
    assert info.value.file == str(missing)
    assert "file not found" in str(info.value)


def test_explicit_path_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[dag]\nexecution_mode = '\xff'\n")
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_config(bad)


# -- every section ----------------------------------------------------------------------------


def test_every_section_and_key() -> None:
    config = parse(
        """
        [dag]
        execution_mode = "federation"
        [dag.local]
        max_workers = 8
        default_agent = "aider"
        [dag.matrix]
        room_prefix = "!runs-"
        home_server = "example.org"
        broadcast_interval_ms = 0
        [dag.hybrid]
        broadcast_status = false
        broadcast_output = true
        accept_remote_tasks = false
        """
    )
    assert config.dag == DagConfig(
        execution_mode=ExecutionMode.FEDERATION,
        local=LocalConfig(max_workers=8, default_agent="aider"),
        matrix=MatrixConfig(
            room_prefix="!runs-", home_server="example.org", broadcast_interval_ms=0
        ),
        hybrid=HybridConfig(
            broadcast_status=False, broadcast_output=True, accept_remote_tasks=False
        ),
    )


def test_a_section_keeps_defaults_for_keys_it_omits() -> None:
    config = parse("[dag.matrix]\nhome_server = 'hs.test'\n")
    assert config.dag.matrix == MatrixConfig(home_server="hs.test")
    assert config.dag.local == LocalConfig()


def test_example_config_documents_and_sets_every_section() -> None:
    config = load_config(EXAMPLES / "config.toml")
    assert config.source == EXAMPLES / "config.toml"
    assert config.dag == DagConfig()  # the example spells out the defaults
    assert config.agents["claude"] == attrs.evolve(BUILTIN_PROFILES["claude"], quiet_secs=120.0)
    login = config.agents["login-shell"]
    assert login.argv == ("/bin/bash", "-lc", "{prompt}")
    assert dict(login.env) == {"LC_ALL": "C.UTF-8"}
    assert login.upstream_in_prompt is False
    text = (EXAMPLES / "config.toml").read_text(encoding="utf-8")
    for field in attrs.fields(type(login)):
        if field.name != "name":
            assert f"#   {field.name}" in text, (
                f"examples/config.toml does not document {field.name}"
            )


def test_the_chat_section_its_example_and_its_mistakes() -> None:
    config = load_config(EXAMPLES / "config.toml")
    assert config.chat.command_power_level == 50 and config.chat.enabled is None
    assert config.dags_dir == EXAMPLES / "dags"  # relative to the config file
    assert Config().dags_dir == Path.cwd() / "dags"
    text = (EXAMPLES / "config.toml").read_text(encoding="utf-8")
    for field in attrs.fields(ChatConfig):
        assert field.name in text, f"examples/config.toml does not document chat.{field.name}"
    chat = parse("[chat]\nenabled = false\nshell_users = ['@a:x']\n").chat
    assert (chat.enabled, chat.shell_users) == (False, ("@a:x",))
    for bad, key in (
        ("prefix = '! cis'", "chat.prefix"),
        ("prefix = ''", "chat.prefix"),
        ("rate_burst = 0", "chat.rate_burst"),
        ("rate_per_minute = 0", "chat.rate_per_minute"),
        ("prefx = '!x'", "chat.prefx"),
    ):
        with pytest.raises(InputError) as caught:
            parse(f"[chat]\n{bad}\n")
        assert caught.value.key == key, (bad, caught.value)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[dags]\n", "dags", "did you mean 'dag'?"),
        ("[dag]\nexecution_mod = 'local'\n", "dag.execution_mod", "did you mean 'execution_mode'?"),
        ("[dag]\nexecution_mode = 'hybird'\n", "dag.execution_mode", "did you mean 'hybrid'?"),
        ("[dag]\nexecution_mode = 1\n", "dag.execution_mode", "expected a string, got an integer"),
        ("[dag.local]\nmax_worker = 2\n", "dag.local.max_worker", "did you mean 'max_workers'?"),
        (
            "[dag.local]\nmax_workers = '4'\n",
            "dag.local.max_workers",
            "expected an integer, got a string",
        ),
        ("[dag.local]\nmax_workers = 0\n", "dag.local.max_workers", "at least 1"),
        ("[dag.local]\ndefault_agent = ''\n", "dag.local.default_agent", "must not be empty"),
        (
            "[dag.local]\ndefault_agent = 'claud'\n",
            "dag.local.default_agent",
            "did you mean 'claude'?",
        ),
        (
            "[dag.matrix]\nbroadcast_interval_ms = -1\n",
            "dag.matrix.broadcast_interval_ms",
            "at least 0",
        ),
        (
            "[dag.matrix]\nbroadcast_interval_ms = 1.5\n",
            "dag.matrix.broadcast_interval_ms",
            "got a float",
        ),
        (
            "[dag.hybrid]\nbroadcast_status = 'yes'\n",
            "dag.hybrid.broadcast_status",
            "expected a boolean",
        ),
        ("[dag.hybrid]\nbroadcast = true\n", "dag.hybrid.broadcast", "unknown key 'broadcast'"),
        ("dag = 1\n", "dag", "expected a table, got an integer"),
        ("[dag]\nlocal = 'x'\n", "dag.local", "expected a table, got a string"),
    ],
)
def test_section_errors(text: str, key: str, message: str) -> None:
    err = error(text)
    assert err.key == key
    assert message in str(err)
    assert str(err).startswith(f"config.toml: key '{key}': ")


def test_invalid_toml_says_where() -> None:
    err = error("[dag.local]\nmax_workers = = 3\n")
    assert "invalid TOML" in str(err)
    assert "line 2" in str(err)


# -- agent profiles ---------------------------------------------------------------------------


def test_builtin_override_changes_only_given_keys() -> None:
    config = parse("[agents.claude]\nquiet_secs = 45\nscreen = true\n")
    expected = attrs.evolve(BUILTIN_PROFILES["claude"], quiet_secs=45.0, screen=True)
    assert config.agents["claude"] == expected
    assert config.agents["shell"] == BUILTIN_PROFILES["shell"]


def test_new_profile_needs_argv_and_gets_profile_defaults() -> None:
    config = parse(
        """
        [agents.fake]
        argv = ["python3", "-m", "fake_agent"]
        prompt_via = "pty"
        ready_pattern = '^> $'
        blocked_patterns = ['\\(y/n\\)']
        """
    )
    fake = config.agents["fake"]
    assert (fake.name, fake.argv, fake.prompt_via) == (
        "fake",
        ("python3", "-m", "fake_agent"),
        PromptVia.PTY,
    )
    assert fake.blocked_patterns == (r"\(y/n\)",)
    assert set(config.agents) == set(BUILTIN_PROFILES) | {"fake"}
    err = error("[agents.fake]\nscreen = true\n")
    assert err.key == "agents.fake.argv"
    assert "needs 'argv'" in str(err)


def test_default_agent_may_name_a_new_profile() -> None:
    config = parse("[dag.local]\ndefault_agent = 'mine'\n[agents.mine]\nargv = ['x', '{prompt}']\n")
    assert config.default_agent == "mine"


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        (
            "blocked_patterns = ['(unclosed']",
            "agents.claude.blocked_patterns",
            "not a valid regular expression",
        ),
        (
            "blocked_patterns = 'x'",
            "agents.claude.blocked_patterns",
            "expected an array of strings",
        ),
        ("ready_pattern = '[a-'", "agents.claude.ready_pattern", "not a valid regular expression"),
        ("argv = []", "agents.claude.argv", "must not be empty"),
        ("argv = ['claude', '-p']", "agents.claude.argv", "no argv element contains '{prompt}'"),
        ("argv = 'claude {prompt}'", "agents.claude.argv", "expected an array of strings"),
        ("prompt_via = 'arguments'", "agents.claude.prompt_via", "did you mean 'argument'?"),
        ("env = { A = 1 }", "agents.claude.env.A", "expected a string, got an integer"),
        ("quiet_secs = 0", "agents.claude.quiet_secs", "greater than 0"),
        ("quiet_secs = 'long'", "agents.claude.quiet_secs", "expected a number"),
        ("pattern_lines = 0", "agents.claude.pattern_lines", "at least 1"),
        ("screen = 1", "agents.claude.screen", "expected a boolean"),
        ("name = 'other'", "agents.claude.name", "unknown key 'name'"),
        ("quiet_sec = 3", "agents.claude.quiet_sec", "did you mean 'quiet_secs'?"),
    ],
)
def test_profile_errors(table: str, key: str, message: str) -> None:
    err = error(f"[agents.claude]\n{table}\n")
    assert err.key == key
    assert message in str(err)


def test_prompt_via_stdin_needs_no_prompt_token() -> None:
    config = parse("[agents.reader]\nargv = ['cat']\nprompt_via = 'stdin'\n")
    assert config.agents["reader"].argv == ("cat",)


def test_agent_table_shape_errors() -> None:
    assert error("agents = 3\n").key == "agents"
    assert error("[agents]\nclaude = 3\n").key == "agents.claude"
    assert "no whitespace" in str(error('[agents."my agent"]\nargv = ["x", "{prompt}"]\n'))


# -- the section reader: a new section is a class and one field -------------------------------


@attrs.frozen
class _NodeSection:
    node_id: str = "node-a"
    homeserver_url: str = attrs.field(default="http://127.0.0.1:8008", metadata={"nonempty": True})
    lease_secs: float = attrs.field(default=30.0, metadata={"gt": 0})
    peers: tuple[str, ...] = ()


@attrs.frozen
class _WithNode:
    node: _NodeSection = attrs.field(factory=_NodeSection)


def test_read_values_builds_a_new_section_from_its_class() -> None:
    def load(text: str) -> _WithNode:
        root = Table(tomllib.loads(text), file="c.toml")
        return _WithNode(**read_values(_WithNode, root, skip=()))

    assert load("") == _WithNode()
    loaded = load("[node]\nnode_id = 'b'\nlease_secs = 2\npeers = ['x']\n")
    assert loaded.node == _NodeSection(node_id="b", lease_secs=2.0, peers=("x",))
    with pytest.raises(InputError, match="did you mean 'lease_secs'"):
        load("[node]\nlease_sec = 2\n")
    with pytest.raises(InputError, match="greater than 0"):
        load("[node]\nlease_secs = 0\n")


# -- property: no config text gives anything but a Config or an InputError ---------------------

_scalars = st.one_of(
    st.integers(-5, 10), st.booleans(), st.text(max_size=8), st.floats(allow_nan=True)
)
_keys = st.sampled_from(
    ["dag", "local", "matrix", "hybrid", "agents", "claude", "argv", "max_workers",
     "default_agent", "execution_mode", "quiet_secs", "blocked_patterns", "env", "x"]
)  # fmt: skip
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4)
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=4))
def test_random_config_documents_never_crash(document: dict[str, Any]) -> None:
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):
        return  # tomli-w cannot write this shape (e.g. an array mixing tables and values)
    try:
        config = parse_config(text, file="c.toml")
    except InputError:
        return
    assert config.default_agent in config.agents


def test_an_unset_lease_follows_the_heartbeat_and_a_set_one_must_outlive_two(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[node]\nheartbeat_secs = 1\n")
    assert load_config(path).node.lease_period_secs == 5.0
    path.write_text("[node]\nheartbeat_secs = 5\n")  # a dev cluster's, or an older config's
    assert load_config(path).node.lease_period_secs == 10.0
    path.write_text("[node]\nheartbeat_secs = 1\nlease_secs = 3\n")
    assert load_config(path).node.lease_period_secs == 3.0
    path.write_text("[node]\nheartbeat_secs = 5\nlease_secs = 5\n")
    with pytest.raises(InputError) as info:
        load_config(path)
    assert info.value.key == "node.lease_secs"
    assert "must be at least twice heartbeat_secs (5), got 5" in str(info.value)
