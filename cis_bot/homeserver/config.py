"""The homeserver's own settings: ``homeserver.toml`` beside its database, every key optional,
named as in Synapse's homeserver.yaml: the login rate limits, and presence::

    [rc_login.address]          # every login attempt, per client address
    per_second = 0.003
    burst_count = 5

    [rc_login.account]          # successful logins, per account
    per_second = 0.003
    burst_count = 5

    [rc_login.failed_attempts]  # failed logins, per account
    per_second = 0.17
    burst_count = 3

    [presence]
    enabled = true              # false: everyone shows offline, nothing in /sync

Unknown keys and wrong types are errors naming the file and the key.
"""

from __future__ import annotations

import math
import tomllib
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.errors import InputError
from cis_bot.homeserver.ratelimiting import LoginRatelimits, RatelimitSettings

if TYPE_CHECKING:
    from pathlib import Path

CONFIG_NAME = "homeserver.toml"


@attrs.frozen
class HomeserverConfig:
    rc_login: LoginRatelimits = attrs.field(factory=LoginRatelimits)
    presence_enabled: bool = True

    @classmethod
    def load(cls, path: Path) -> HomeserverConfig:
        """The settings in ``path``; the defaults when there is no such file."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read it: {err}", file=str(path)) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise InputError(f"not TOML: {err}", file=str(path)) from None
        _only(data, ("rc_login", "presence"), "", path)
        presence = _table(data, "presence", "", path)
        _only(presence, ("enabled",), "presence.", path)
        presence_enabled = presence.get("enabled", True)
        if not isinstance(presence_enabled, bool):
            raise InputError("must be true or false", file=str(path), key="presence.enabled")
        rc_login = _table(data, "rc_login", "", path)
        _only(rc_login, ("address", "account", "failed_attempts"), "rc_login.", path)
        defaults = LoginRatelimits()
        return cls(
            rc_login=LoginRatelimits(
                **{
                    name: _settings(rc_login, name, getattr(defaults, name), path)
                    for name in ("address", "account", "failed_attempts")
                }
            ),
            presence_enabled=presence_enabled,
        )


def _only(table: dict[str, Any], known: tuple[str, ...], prefix: str, path: Path) -> None:
    for key in table:
        if key not in known:
            raise InputError(
                f"unknown key (known: {', '.join(known)})", file=str(path), key=prefix + key
            )


def _table(parent: dict[str, Any], name: str, prefix: str, path: Path) -> dict[str, Any]:
    value = parent.get(name, {})
    if not isinstance(value, dict):
        raise InputError("must be a table", file=str(path), key=prefix + name)
    return value


def _settings(
    rc_login: dict[str, Any], name: str, default: RatelimitSettings, path: Path
) -> RatelimitSettings:
    prefix = f"rc_login.{name}."
    table = _table(rc_login, name, "rc_login.", path)
    _only(table, ("per_second", "burst_count"), prefix, path)
    per_second = table.get("per_second", default.per_second)
    if (
        isinstance(per_second, bool)
        or not isinstance(per_second, int | float)
        or not 0 <= per_second < math.inf
    ):
        raise InputError("must be a finite number >= 0", file=str(path), key=prefix + "per_second")
    burst_count = table.get("burst_count", default.burst_count)
    if isinstance(burst_count, bool) or not isinstance(burst_count, int) or burst_count < 0:
        raise InputError("must be an integer >= 0", file=str(path), key=prefix + "burst_count")
    return RatelimitSettings(per_second=float(per_second), burst_count=burst_count)
