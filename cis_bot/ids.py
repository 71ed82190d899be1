"""The identifiers people see and type: run ids and session ids, and the Matrix names a config
gives (user ids, server names, localparts). They are made, parsed, matched and checked here and
nowhere else.

- A run id is ``YYYYmmdd-HHMMSS-xxxx``: when the run was created, and four random hex digits.
  People may name a run by its id or by any prefix that only it has (:func:`match_run`).
- A session id is ``run:task:attempt`` (:class:`SessionId`): run ids and task ids hold no ':'.
  People may name one as ``RUN:TASK[:ATTEMPT]`` with a run id prefix, or by a bare task id
  (:class:`SessionRef`).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections.abc import Iterable

import attrs

from cis_bot.errors import UserError

#: How many candidates an "unknown" or "ambiguous" error lists.
SHOWN_CANDIDATES = 12


def new_run_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{stamp}-{secrets.token_hex(2)}"


class UnknownRun(UserError):
    """No run matches (as opposed to several)."""


def match_run(text: str, run_ids: Iterable[str]) -> str:
    """The run ``text`` names: the run with that id, else the one run whose id starts with it.
    UnknownRun when none does; a UserError naming the candidates when several do."""
    ids = sorted(set(run_ids))
    if text in ids:
        return text
    matches = [r for r in ids if r.startswith(text)]
    if len(matches) > 1:
        raise UserError(f"{text!r} is ambiguous: {', '.join(matches[:SHOWN_CANDIDATES])}")
    if not matches:
        known = ", ".join(ids[-SHOWN_CANDIDATES:]) or "none found"
        raise UnknownRun(f"no run {text!r}; runs: {known}")
    return matches[0]


def task_key(run_id: str, task_id: str) -> str:
    """``run:task``: what every attempt of a task shares (its events are ordered by it)."""
    return f"{run_id}:{task_id}"


@attrs.frozen
class SessionId:
    """One attempt of one task of one run, as a session: ``run:task:attempt``."""

    run_id: str
    task_id: str
    attempt: int

    def __str__(self) -> str:
        return f"{self.run_id}:{self.task_id}:{self.attempt}"

    @property
    def task_key(self) -> str:
        return task_key(self.run_id, self.task_id)

    @classmethod
    def parse(cls, text: str) -> SessionId:
        """The parts of ``run:task:attempt``; ValueError when ``text`` is not one."""
        run_id, sep, rest = text.partition(":")
        task_id, sep2, attempt = rest.rpartition(":")
        if not (sep and sep2 and run_id and task_id and attempt.isdigit()) or ":" in task_id:
            raise ValueError(f"{text!r} is not a session id (run:task:attempt)")
        return cls(run_id, task_id, int(attempt))

    @classmethod
    def parse_or_none(cls, text: str) -> SessionId | None:
        try:
            return cls.parse(text)
        except ValueError:
            return None


@attrs.frozen
class SessionRef:
    """A session as a person names it: ``RUN:TASK[:ATTEMPT]`` where RUN is a run id or a prefix
    of one (without an attempt: the latest), or a bare ``TASK``."""

    run: str | None
    task: str
    attempt: int | None

    @classmethod
    def parse(cls, text: str) -> SessionRef:
        parts = text.strip().split(":")
        if not all(parts) or len(parts) > 3:
            raise UserError(
                f"{text!r} is not a session id: expected RUN:TASK[:ATTEMPT] (a run id or a "
                "unique prefix of one) or a task id"
            )
        if len(parts) == 1:
            return cls(None, parts[0], None)
        if len(parts) == 3 and not parts[2].isdigit():
            raise UserError(f"{text!r}: the attempt ({parts[2]!r}) must be a number")
        return cls(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None)

    def matches_run(self, run_id: str) -> bool:
        return self.run is None or run_id.startswith(self.run)


# --- Matrix names (https://spec.matrix.org/latest/appendices/#identifier-grammar) ---------------

#: A user id (``@localpart:server``) is at most this long.
MAX_USER_ID_BYTES = 255
_NEW_LOCALPART = re.compile(r"[a-z0-9._=/+-]+")
#: Historical localparts (users of other servers may have one): printable ASCII but ':'.
_ANY_LOCALPART = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_DNS_NAME = re.compile(r"[A-Za-z0-9.-]{1,255}")


def server_name_problem(name: str) -> str | None:
    """Why ``name`` is not a Matrix server name (``host[:port]``), or None."""
    host, port = name, ""
    if name.startswith("["):
        host, sep, rest = name[1:].partition("]")
        if not sep:
            return "an IPv6 address must be closed with ']'"
        if rest and not rest.startswith(":"):
            return "only ':port' may follow the IPv6 address"
        port = rest[1:] if rest else ""
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
    else:
        host, sep, port = name.partition(":")
        if sep and not port:
            return "a ':' must be followed by a port"
        if not _DNS_NAME.fullmatch(host):
            return "the host may hold only letters, digits, '.' and '-'"
    if port and not (port.isdigit() and len(port) <= 5 and 0 < int(port) <= 65535):
        return f"{port!r} is not a port (1-65535)"
    return None


def localpart_problem(localpart: str) -> str | None:
    """Why ``localpart`` cannot name a new Matrix user (a node's bot), or None."""
    if not _NEW_LOCALPART.fullmatch(localpart):
        return "a Matrix user name holds only a-z, 0-9 and . _ = - / +"
    return None


def user_id_problem(user_id: str) -> str | None:
    """Why ``user_id`` is not a Matrix user id (``@alice:example.org``), or None."""
    localpart, sep, server = user_id[1:].partition(":")
    if not user_id.startswith("@") or not sep or not localpart:
        return "a Matrix user id looks like '@alice:example.org'"
    if len(user_id.encode()) > MAX_USER_ID_BYTES:
        return f"a Matrix user id is at most {MAX_USER_ID_BYTES} bytes"
    if not _ANY_LOCALPART.fullmatch(localpart):
        return "the part before ':' holds only printable ASCII characters"
    problem = server_name_problem(server)
    return f"its server name {server!r} is not valid: {problem}" if problem else None
