"""Errors that reach the user as one clear message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: bad file, bad flag, unknown name. The CLI exits with 2."""

    exit_code = 2


class InputError(UserError):
    """Malformed input file. The message names the file, the task (if any) and the key."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        task: str | None = None,
        key: str | None = None,
    ) -> None:
        self.file = file
        self.task = task
        self.key = key
        self.detail = message
        where = []
        if file:
            where.append(file)
        if task:
            where.append(f"task {task!r}")
        if key:
            where.append(f"key {key!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
