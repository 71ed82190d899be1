"""Compare two servers' answers by shape: the keys present and the JSON type of each value, with
exact values left out (ids, tokens and timestamps differ between servers by design)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not JSON: {value!r}")


def shape_differences(
    expected: Any, actual: Any, *, ignore: Iterable[str] = (), path: str = "$"
) -> list[str]:
    """Where ``actual`` differs in shape from ``expected`` (the Synapse answer).

    Paths look like ``$.rooms.join.*.timeline.events[2].unsigned``; an ``ignore`` entry is an
    fnmatch pattern over them (``*.unsigned.age``) and silences that node and everything below.
    Map keys that are ids (room ids, user ids, event ids) are compared by count, not name.
    """
    ignore = tuple(ignore)
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in ignore):
        return []
    kind_e, kind_a = json_type(expected), json_type(actual)
    if kind_e != kind_a:
        return [f"{path}: {kind_e} on synapse, {kind_a} here"]
    found: list[str] = []
    if kind_e == "object":
        if _id_keyed(expected) or _id_keyed(actual):
            if len(expected) != len(actual):
                found.append(f"{path}: {len(expected)} id keys on synapse, {len(actual)} here")
            for (_, value_e), (_, value_a) in zip(
                sorted(expected.items()), sorted(actual.items()), strict=False
            ):
                found += shape_differences(value_e, value_a, ignore=ignore, path=f"{path}.*")
            return found
        for key in sorted(expected.keys() | actual.keys()):
            sub = f"{path}.{key}"
            if any(fnmatch.fnmatchcase(sub, pattern) for pattern in ignore):
                continue
            if key not in actual:
                found.append(f"{sub}: missing here")
            elif key not in expected:
                found.append(f"{sub}: not on synapse")
            else:
                found += shape_differences(expected[key], actual[key], ignore=ignore, path=sub)
    elif kind_e == "array":
        if len(expected) != len(actual):
            found.append(f"{path}: {len(expected)} items on synapse, {len(actual)} here")
        for index, (item_e, item_a) in enumerate(zip(expected, actual, strict=False)):
            found += shape_differences(item_e, item_a, ignore=ignore, path=f"{path}[{index}]")
    return found


def _id_keyed(mapping: dict[str, Any]) -> bool:
    return bool(mapping) and all(key[:1] in "!@$#" and len(key) > 1 for key in mapping)


def assert_same_shape(synapse: Any, embedded: Any, *, ignore: Iterable[str] = ()) -> None:
    differences = shape_differences(synapse, embedded, ignore=ignore)
    assert not differences, "shapes differ from Synapse:\n  " + "\n  ".join(differences)
