"""Appservice registration files, read and validated the way Synapse reads
``app_service_config_files`` (synapse/config/appservice.py)."""

from __future__ import annotations

import re
import urllib.parse
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path


@attrs.frozen
class Namespace:
    exclusive: bool
    regex: re.Pattern[str]


@attrs.frozen
class Appservice:
    id: str
    url: str | None
    as_token: str
    hs_token: str
    sender: str
    users: tuple[Namespace, ...]
    aliases: tuple[Namespace, ...]
    rooms: tuple[Namespace, ...]
    rate_limited: bool
    receive_ephemeral: bool
    source: str

    def _match(self, spaces: tuple[Namespace, ...], value: str) -> Namespace | None:
        # Synapse uses re.match: anchored at the start, not the end.
        for space in spaces:
            if space.regex.match(value):
                return space
        return None

    def is_user_in_namespace(self, user_id: str) -> bool:
        return self._match(self.users, user_id) is not None

    def is_interested_in_user(self, user_id: str) -> bool:
        return user_id == self.sender or self.is_user_in_namespace(user_id)

    def is_exclusive_user(self, user_id: str) -> bool:
        space = self._match(self.users, user_id)
        return (space is not None and space.exclusive) or user_id == self.sender

    def is_alias_in_namespace(self, alias: str) -> bool:
        return self._match(self.aliases, alias) is not None

    def is_exclusive_alias(self, alias: str) -> bool:
        space = self._match(self.aliases, alias)
        return space is not None and space.exclusive

    def is_room_in_namespace(self, room_id: str) -> bool:
        return self._match(self.rooms, room_id) is not None


def _fail(path: Path, message: str, key: str | None = None) -> InputError:
    return InputError(message, file=str(path), key=key)


def _namespaces(path: Path, raw: Any, kind: str) -> tuple[Namespace, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail(
            path, f"bad namespace value for {kind!r}: expected a list", f"namespaces.{kind}"
        )
    spaces = []
    for index, entry in enumerate(raw):
        key = f"namespaces.{kind}[{index}]"
        if not isinstance(entry, dict):
            raise _fail(path, f"expected a namespace object, got {entry!r}", key)
        regex = entry.get("regex")
        if not isinstance(regex, str):
            raise _fail(path, "missing or non-string 'regex'", key)
        exclusive = entry.get("exclusive")
        if not isinstance(exclusive, bool):
            raise _fail(path, "missing or non-boolean 'exclusive'", key)
        try:
            compiled = re.compile(regex)
        except re.error as exc:
            raise _fail(path, f"invalid regex {regex!r}: {exc}", key) from None
        spaces.append(Namespace(exclusive, compiled))
    return tuple(spaces)


def parse_registration(path: Path, data: Any, server_name: str) -> Appservice:
    if not isinstance(data, dict):
        raise _fail(path, "an appservice registration must be a YAML mapping")
    for field in ("id", "as_token", "hs_token", "sender_localpart"):
        if not isinstance(data.get(field), str):
            raise _fail(path, f"required string field {field!r} is missing or not a string", field)
    # 'url' must be a string or an explicit null (Synapse: so push is never turned off by mistake)
    if "url" not in data or not (data["url"] is None or isinstance(data["url"], str)):
        raise _fail(path, "required field 'url' must be a string or explicitly null", "url")
    localpart = data["sender_localpart"]
    if urllib.parse.quote(localpart) != localpart:
        raise _fail(
            path,
            "sender_localpart needs characters which are not URL encoded",
            "sender_localpart",
        )
    if "|" in data["id"]:
        raise _fail(path, "application service ID cannot contain '|' character", "id")
    namespaces = data.get("namespaces")
    if not isinstance(namespaces, dict):
        raise _fail(path, "requires a 'namespaces' object", "namespaces")
    protocols = data.get("protocols")
    if protocols and (
        not isinstance(protocols, list) or not all(isinstance(p, str) for p in protocols)
    ):
        raise _fail(path, "optional 'protocols' must be a list of strings", "protocols")
    rate_limited = data.get("rate_limited")
    url = data["url"]
    return Appservice(
        id=data["id"],
        url=url.rstrip("/") if isinstance(url, str) else None,
        as_token=data["as_token"],
        hs_token=data["hs_token"],
        sender=f"@{localpart}:{server_name}",
        users=_namespaces(path, namespaces.get("users"), "users"),
        aliases=_namespaces(path, namespaces.get("aliases"), "aliases"),
        rooms=_namespaces(path, namespaces.get("rooms"), "rooms"),
        rate_limited=rate_limited if isinstance(rate_limited, bool) else True,
        receive_ephemeral=bool(data.get("receive_ephemeral", False)),
        source=str(path),
    )


def _yaml_problem(exc: Exception) -> str:
    """One line: what and where (PyYAML's own message spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(problem)


def load_registrations(paths: Sequence[Path], server_name: str) -> list[Appservice]:
    """Read every file; ids and as_tokens must be unique across them (as in Synapse)."""
    if not paths:
        return []
    import yaml  # only needed when there are registrations to read

    seen_ids: dict[str, Path] = {}
    seen_tokens: dict[str, Path] = {}
    result = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise _fail(path, f"cannot read appservice registration: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise _fail(path, f"not valid YAML: {_yaml_problem(exc)}") from None
        service = parse_registration(path, data, server_name)
        if service.id in seen_ids:
            raise _fail(
                path,
                f"cannot reuse ID across application services: {service.id}"
                f" (also in {seen_ids[service.id]})",
                "id",
            )
        if service.as_token in seen_tokens:
            raise _fail(
                path,
                f"cannot reuse as_token across application services"
                f" (also in {seen_tokens[service.as_token]})",
                "as_token",
            )
        seen_ids[service.id] = path
        seen_tokens[service.as_token] = path
        result.append(service)
    return result
