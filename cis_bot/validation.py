"""Typed access to parsed TOML/JSON documents, with errors that say where the mistake is.

Both loaders (``dag/spec.py`` and ``config.py``) read their files through this module, so every
mistake in an input file ends as one :class:`~cis_bot.errors.InputError` that names the file, the
task (when there is one) and the key path (``level.timeout``, ``dag.local.max_workers``), says what
was expected and what was found ("expected an integer, got a string: '3'"), and, for an unknown
key or value, suggests the closest known one.

Nothing here raises anything but ``InputError`` on bad input: not ``KeyError``, ``TypeError``,
``UnicodeDecodeError`` or ``RecursionError``.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import tomllib
from collections.abc import Collection, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Literal, NoReturn, TypeVar

from cis_bot.errors import InputError

Format = Literal["toml", "json"]

E = TypeVar("E", bound=StrEnum)

_MAX_SHOWN_VALUE = 40
#: Matrix's JSON carries integers up to this (canonical JSON): larger ones would be refused at
#: run time, in an event.
MAX_INTEGER = 2**53 - 1
#: Numbers are durations in seconds, sent as milliseconds: they must fit MAX_INTEGER then.
MAX_NUMBER = MAX_INTEGER // 1000


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word``, or None when nothing is close enough."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggestion(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or ``''``: ready to append to a message."""
    close = did_you_mean(word, choices)
    return f" (did you mean {close!r}?)" if close else ""


def type_name(value: object, fmt: Format = "toml") -> str:
    """How a parsed value's type is called in the user's format: 'an integer', 'a table'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object" if fmt == "json" else "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return f"a {type(value).__name__}"


def _shown(value: object) -> str:
    """A short rendering of a scalar for error messages (containers are not shown)."""
    if isinstance(value, Mapping | list):
        return ""
    text = repr(value)
    if len(text) > _MAX_SHOWN_VALUE:
        text = text[: _MAX_SHOWN_VALUE - 3] + "..."
    return f": {text}"


def check_text(value: str) -> str | None:
    """Why a string cannot be used as process input (argv, env, a prompt), or None if it can."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it contains a lone surrogate)"
    return None


class Table:
    """A parsed table (TOML table or JSON object) plus where it sits in its file.

    ``path`` is the key path of this table for error messages (``""`` for the document root or
    for a task's own table, whose keys are reported relative to the task); ``task`` is the task
    id errors should name.
    """

    def __init__(
        self,
        data: Mapping[str, object],
        *,
        file: str | None,
        fmt: Format = "toml",
        path: str = "",
        task: str | None = None,
    ) -> None:
        self.data = data
        self.file = file
        self.fmt: Format = fmt
        self.path = path
        self.task = task

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str, key: str | None = None) -> InputError:
        """An InputError at ``key`` of this table (at the table itself when key is None)."""
        where = self.key_path(key) if key is not None else (self.path or None)
        return InputError(message, file=self.file, task=self.task, key=where)

    def fail(self, message: str, key: str | None = None) -> NoReturn:
        raise self.error(message, key)

    def with_task(self, task: str | None, *, path: str = "") -> Table:
        """The same table, with errors naming ``task`` and keys relative to ``path``."""
        return Table(self.data, file=self.file, fmt=self.fmt, path=path, task=task)

    def reject_unknown(
        self,
        allowed: Collection[str],
        *,
        aliases: Mapping[str, str] | None = None,
        unsupported: Mapping[str, str] | None = None,
    ) -> None:
        """Fail on the first key not in ``allowed``.

        ``aliases`` maps common wrong names to the right key ("dependencies" -> "deps") for keys
        difflib would not find; ``unsupported`` maps known-but-unsupported keys to an explanation.
        """
        for key in self.data:
            if key in allowed:
                continue
            if unsupported and key in unsupported:
                self.fail(unsupported[key], key)
            close = (aliases or {}).get(key) or did_you_mean(key, allowed)
            if close:
                self.fail(f"unknown key {key!r} (did you mean {close!r}?)", key)
            self.fail(f"unknown key {key!r}; expected one of: {', '.join(sorted(allowed))}", key)

    # -- raw access ---------------------------------------------------------------------------

    def _type_error(self, key: str, expected: str, value: object) -> NoReturn:
        self.fail(f"expected {expected}, got {type_name(value, self.fmt)}{_shown(value)}", key)

    # -- strings ------------------------------------------------------------------------------

    def _checked_string(self, key: str, value: object, *, nonempty: bool) -> str:
        if not isinstance(value, str):
            self._type_error(key, "a string", value)
        problem = check_text(value)
        if problem:
            self.fail(f"the string {problem}", key)
        if nonempty and not value.strip():
            self.fail("must not be empty", key)
        return value

    def opt_string(self, key: str, *, nonempty: bool = False) -> str | None:
        if key not in self.data:
            return None
        return self._checked_string(key, self.data[key], nonempty=nonempty)

    def string(self, key: str, default: str | None = None, *, nonempty: bool = False) -> str:
        """A string; ``default`` when absent, or an error when absent and no default."""
        value = self.opt_string(key, nonempty=nonempty)
        if value is not None:
            return value
        if default is not None:
            return default
        self.fail(f"missing required key {key!r}", key)

    def string_list(self, key: str, *, nonempty_items: bool = True) -> tuple[str, ...] | None:
        """An array of strings, or None when absent."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, list):
            self._type_error(key, "an array of strings", value)
        items: list[str] = []
        for i, item in enumerate(value):
            items.append(self._checked_string(f"{key}[{i}]", item, nonempty=nonempty_items))
        return tuple(items)

    def string_map(self, key: str) -> dict[str, str] | None:
        """A table whose values are all strings, or None when absent."""
        sub = self.table(key)
        if sub is None:
            return None
        result: dict[str, str] = {}
        for name, value in sub.data.items():
            problem = check_text(name)
            if problem or not name:
                sub.fail(f"the key {problem or 'is empty'}", name)
            result[name] = sub._checked_string(name, value, nonempty=False)
        return result

    def choice(self, key: str, enum: type[E], default: E) -> E:
        """One of ``enum``'s values, given as a string; ``default`` when absent."""
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, str):
            self._type_error(key, "a string", value)
        return self.enum_value(key, value, enum)

    def enum_value(self, key: str, value: str, enum: type[E]) -> E:
        names = [member.value for member in enum]
        if value not in names:
            self.fail(
                f"unknown value {value!r}{suggestion(value, names)}; "
                f"expected one of: {', '.join(names)}",
                key,
            )
        return enum(value)

    # -- numbers and booleans -----------------------------------------------------------------

    def opt_integer(self, key: str, *, minimum: int | None = None) -> int | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self._type_error(key, "an integer", value)
        if minimum is not None and value < minimum:
            self.fail(f"must be at least {minimum}, got {value}", key)
        if abs(value) > MAX_INTEGER:
            self.fail(f"must be at most {MAX_INTEGER} (2^53 - 1), got {value}", key)
        return value

    def integer(self, key: str, default: int, *, minimum: int | None = None) -> int:
        value = self.opt_integer(key, minimum=minimum)
        return default if value is None else value

    def opt_number(
        self, key: str, *, positive: bool = False, minimum: float | None = None
    ) -> float | None:
        """An integer or float (finite); ``positive`` means > 0. None when absent."""
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._type_error(key, "a number", value)
        number = float(value)
        if not math.isfinite(number):
            self.fail(f"must be a finite number, got {value}", key)
        if positive and number <= 0:
            self.fail(f"must be greater than 0, got {value}", key)
        if minimum is not None and number < minimum:
            self.fail(f"must be at least {minimum:g}, got {value}", key)
        if abs(number) > MAX_NUMBER:
            self.fail(f"must be at most {MAX_NUMBER} (seconds), got {value}", key)
        return number

    def number(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.opt_number(key, positive=positive)
        return default if value is None else value

    def opt_boolean(self, key: str) -> bool | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, bool):
            self._type_error(key, "a boolean (true or false)", value)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.opt_boolean(key)
        return default if value is None else value

    # -- nested tables ------------------------------------------------------------------------

    def table(self, key: str) -> Table | None:
        """The sub-table at ``key``, or None when absent."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, Mapping):
            self._type_error(key, type_name({}, self.fmt), value)
        return Table(value, file=self.file, fmt=self.fmt, path=self.key_path(key), task=self.task)

    def table_list(self, key: str, *, hint: str = "") -> list[Table] | None:
        """An array of tables (``[[key]]``), or None when absent."""
        if key not in self.data:
            return None
        value = self.data[key]
        expected = "an array of objects" if self.fmt == "json" else "an array of tables"
        if not isinstance(value, list):
            self.fail(f"expected {expected}, got {type_name(value, self.fmt)}{hint}", key)
        tables: list[Table] = []
        for i, item in enumerate(value):
            item_path = f"{self.key_path(key)}[{i}]"
            if not isinstance(item, Mapping):
                self.fail(
                    f"expected {type_name({}, self.fmt)}, got {type_name(item, self.fmt)}"
                    f"{_shown(item)}",
                    f"{key}[{i}]",
                )
            tables.append(Table(item, file=self.file, fmt=self.fmt, path=item_path, task=self.task))
        return tables


# -- reading and parsing files ----------------------------------------------------------------


#: Largest DAG or config file read (a 10,000-task DAG is about 500 KB); a device such as
#: /dev/zero would otherwise be read forever.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


def read_text(path: str | Path) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is allowed), at most
    ``MAX_DOCUMENT_BYTES``."""
    name = str(path)
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise InputError("file not found", file=name) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a file", file=name) from None
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror or exc}", file=name) from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InputError(
            f"larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB: not a DAG or config file",
            file=name,
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"not valid UTF-8 (byte {exc.start}, line {line}): save the file as UTF-8", file=name
        ) from None


class _JsonShapeError(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _JsonShapeError(f"duplicate key {key!r} in an object")
        result[key] = value
    return result


def _reject_constant(name: str) -> NoReturn:
    raise _JsonShapeError(f"{name} is not valid JSON")


def parse_document(text: str, *, file: str | None, fmt: Format) -> Table:
    """Parse TOML or JSON text into the root :class:`Table` (which must be a table/object)."""
    data: object
    try:
        if fmt == "toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(
                text,
                object_pairs_hook=_object_without_duplicates,
                parse_constant=_reject_constant,
            )
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"invalid TOML: {exc}", file=file) from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"invalid JSON: {exc.msg} (at line {exc.lineno}, column {exc.colno})", file=file
        ) from None
    except _JsonShapeError as exc:
        raise InputError(f"invalid JSON: {exc}", file=file) from None
    except RecursionError:
        raise InputError(f"invalid {fmt.upper()}: nested too deeply", file=file) from None
    except ValueError as exc:  # anything else the parser rejects, e.g. an out-of-range number
        raise InputError(f"invalid {fmt.upper()}: {exc}", file=file) from None
    if not isinstance(data, Mapping):
        raise InputError(
            f"expected a JSON object at the top level, got {type_name(data, fmt)}", file=file
        )
    return Table(data, file=file, fmt=fmt)


def format_for(path: str | Path) -> Format:
    """``json`` for a ``.json`` file, ``toml`` for anything else."""
    return "json" if Path(path).suffix.lower() == ".json" else "toml"
