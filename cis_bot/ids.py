"""The identifiers people see and type: run ids and session ids. They are made, parsed and
matched here and nowhere else.

- A run id is ``YYYYmmdd-HHMMSS-xxxx``: when the run was created, and four random hex digits.
  People may name a run by its id or by any prefix that only it has (:func:`match_run`).
- A session id is ``run:task:attempt`` (:class:`SessionId`): run ids and task ids hold no ':'.
  People may name one as ``RUN:TASK[:ATTEMPT]`` with a run id prefix, or by a bare task id
  (:class:`SessionRef`).
"""

from __future__ import annotations

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
