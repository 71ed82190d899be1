"""CIS's task ``condition``: a small expression language over the task's dependencies.

``condition = "if cuda-compile.status == 'failed'"`` runs a task only when the expression is
true once its trigger rule lets it start; otherwise the task is skipped, with the expression and
the values it read as the reason. The language is parsed here by hand (a tokenizer and a
recursive-descent parser), never evaluated as code::

    condition  := ["if"] or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | comparison
    comparison := operand [("==" | "!=" | "<" | "<=" | ">" | ">=") operand]
    operand    := TASK "." FIELD | 'string' | "string" | number | true | false | "(" or ")"

A reference names one of the task's own dependencies (the tasks that ran before it) and one of
:data:`FIELDS`. Everything is checked when the DAG is read: unknown tasks and fields, a status
that does not exist, a string compared with a number, an order comparison of strings, a
comparison of two constants. Evaluation cannot fail: a value a task does not have (the exit code
of a task that never ran) is unequal to everything and not ordered.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Collection, Mapping
from enum import StrEnum

import attrs

from cis_bot.validation import suggestion


class ConditionError(ValueError):
    """A condition that cannot be read; the message says where and why."""


class Field(StrEnum):
    #: ``pending``, ``running``, ``completed``, ``failed`` (a timeout reads as failed, as in CIS,
    #: which has no timeout status), ``skipped``, ``cancelled``.
    STATUS = "status"
    #: The last attempt's exit code (none when the task never ran or was killed before exiting).
    EXIT_CODE = "exit_code"
    #: Attempts started so far.
    ATTEMPTS = "attempts"
    #: Attempts that failed or timed out (CIS's adaptive rules call it ``fail_count``).
    FAIL_COUNT = "fail_count"
    #: The task's output, without leading and trailing whitespace.
    OUTPUT = "output"


#: The values ``status`` can have in a condition.
STATUSES = ("pending", "running", "completed", "failed", "skipped", "cancelled")
_NUMERIC = frozenset({Field.EXIT_CODE, Field.ATTEMPTS, Field.FAIL_COUNT})
_ORDER_OPS = frozenset({"<", "<=", ">", ">="})
_FIELD_NAMES = frozenset(f.value for f in Field)
_KEYWORDS = frozenset({"and", "or", "not", "if", "true", "false"})
_SPELLED = {"&&": "and", "||": "or", "&": "and", "|": "or", "AND": "and", "OR": "or", "NOT": "not"}

Value = str | float | bool | None


@attrs.frozen
class Ref:
    task: str
    field: Field

    def __str__(self) -> str:
        return f"{self.task}.{self.field}"


@attrs.frozen
class Const:
    value: str | float | bool


@attrs.frozen
class Compare:
    op: str
    left: Ref | Const
    right: Ref | Const


@attrs.frozen
class Not:
    operand: Node


@attrs.frozen
class BoolOp:
    op: str  # "and" | "or"
    operands: tuple[Node, ...]


Node = Ref | Const | Compare | Not | BoolOp


@attrs.frozen
class Condition:
    """A parsed condition; ``source`` is the text as written (what the room and the report
    show, and what a DAG document keeps)."""

    source: str
    root: Node = attrs.field(eq=False, repr=False)

    @property
    def references(self) -> tuple[Ref, ...]:
        found: dict[Ref, None] = {}
        _collect(self.root, found)
        return tuple(found)

    def evaluate(self, read: Callable[[Ref], Value]) -> tuple[bool, str]:
        """(the result, the values it read as ``task.field = value``, for people)."""
        result = bool(_evaluate(self.root, read))
        shown = "; ".join(f"{ref} = {_show(read(ref))}" for ref in self.references)
        return result, shown


def _collect(node: Node, found: dict[Ref, None]) -> None:
    match node:
        case Ref():
            found[node] = None
        case Compare(left=left, right=right):
            _collect(left, found)
            _collect(right, found)
        case Not(operand=operand):
            _collect(operand, found)
        case BoolOp(operands=operands):
            for operand in operands:
                _collect(operand, found)


def _show(value: Value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _evaluate(node: Node, read: Callable[[Ref], Value]) -> Value:
    match node:
        case Const(value=value):
            return value
        case Ref():
            return read(node)
        case Not(operand=operand):
            return not _evaluate(operand, read)
        case BoolOp(op="and", operands=operands):
            return all(_evaluate(o, read) for o in operands)
        case BoolOp(operands=operands):
            return any(_evaluate(o, read) for o in operands)
        case Compare(op=op, left=left, right=right):
            return _compare(op, _evaluate(left, read), _evaluate(right, read))
    raise AssertionError(node)


def _compare(op: str, left: Value, right: Value) -> bool:
    if op == "==":
        return left is not None and right is not None and left == right
    if op == "!=":
        return left is None or right is None or left != right
    if not isinstance(left, float) or not isinstance(right, float):
        return False  # a missing value is not ordered
    match op:
        case "<":
            return left < right
        case "<=":
            return left <= right
        case ">":
            return left > right
        case _:
            return left >= right


# --- reading ---------------------------------------------------------------------------------

# A word is anything up to whitespace, a quote, a parenthesis or an operator character: task ids
# hold '-', '.', digits and letters of any script.
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>==|!=|<=|>=|<|>)
      | (?P<paren>[()])
      | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<word>[^\s()'"=!<>]+)
      | (?P<bad>\S)
    )""",
    re.VERBOSE,
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@attrs.frozen
class _Token:
    kind: str  # op | paren | string | word | end
    text: str
    at: int


def parse_condition(text: str, *, deps: Collection[str]) -> Condition:
    """Read and check ``text``; references may name only ``deps``. Raises ConditionError."""
    tokens = _tokenize(text)
    parser = _Parser(text, tokens, deps)
    if parser.peek().kind == "word" and parser.peek().text == "if":
        parser.next()
    if parser.peek().kind == "end":
        raise ConditionError("the condition is empty")
    root = parser.or_()
    end = parser.peek()
    if end.kind == "word" and end.text in _SPELLED:
        raise parser.error(end, f"write {_SPELLED[end.text]!r} instead of {end.text!r}")
    if end.kind != "end":
        raise parser.error(end, f"unexpected {end.text!r} (expected 'and', 'or' or the end)")
    _check_boolean(root, parser)
    return Condition(source=text.strip(), root=root)


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    position = 0
    while True:
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            break
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        value = match.group(kind)
        at = match.start(kind)
        if kind == "bad" and value in "'\"":
            raise ConditionError(f"unterminated string starting at column {at + 1}")
        if kind == "bad":
            raise ConditionError(
                f"unexpected {value!r} at column {at + 1}"
                + (" (write '==' to compare, '!=' for 'is not')" if value in "=!" else "")
            )
        tokens.append(_Token(kind, value, at))
    rest = text[position:]
    if rest.strip():
        raise ConditionError(f"cannot read {rest.strip()!r} at column {position + 1}")
    tokens.append(_Token("end", "the end", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str, tokens: list[_Token], deps: Collection[str]) -> None:
        self.text = text
        self.tokens = tokens
        self.position = 0
        self.deps = deps

    def peek(self) -> _Token:
        return self.tokens[self.position]

    def next(self) -> _Token:
        token = self.tokens[self.position]
        if token.kind != "end":
            self.position += 1
        return token

    def error(self, token: _Token, message: str) -> ConditionError:
        return ConditionError(f"{message} at column {token.at + 1}")

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token.kind == "word" and token.text == word:
            self.next()
            return True
        return False

    def or_(self) -> Node:
        operands = [self.and_()]
        while self.keyword("or"):
            operands.append(self.and_())
        return operands[0] if len(operands) == 1 else BoolOp("or", tuple(operands))

    def and_(self) -> Node:
        operands = [self.not_()]
        while self.keyword("and"):
            operands.append(self.not_())
        return operands[0] if len(operands) == 1 else BoolOp("and", tuple(operands))

    def not_(self) -> Node:
        if self.keyword("not"):
            return Not(self.not_())
        return self.comparison()

    def comparison(self) -> Node:
        start = self.peek()
        left = self.operand()
        if self.peek().kind != "op":
            return left
        op = self.next().text
        right_token = self.peek()
        right = self.operand()
        if not isinstance(left, Ref | Const) or not isinstance(right, Ref | Const):
            raise self.error(start, f"{op!r} compares two values, not whole conditions")
        return self._checked(Compare(op, left, right), start, right_token)

    def operand(self) -> Node:
        token = self.next()
        match token.kind:
            case "paren" if token.text == "(":
                inner = self.or_()
                close = self.next()
                if close.text != ")":
                    raise self.error(close, f"expected ')' but found {close.text!r}")
                return inner
            case "string":
                return Const(_unquote(token.text))
            case "word":
                return self._word(token)
        raise self.error(token, f"expected a value or 'task.field' but found {token.text!r}")

    def _word(self, token: _Token) -> Node:
        word = token.text
        if word in ("true", "false"):
            return Const(word == "true")
        if word in _SPELLED:
            raise self.error(token, f"write {_SPELLED[word]!r} instead of {word!r}")
        if word in _KEYWORDS:
            raise self.error(token, f"{word!r} cannot stand here (expected a value)")
        task, dot, name = word.rpartition(".")
        task = unicodedata.normalize("NFC", task)  # as task ids are compared
        if dot and name in _FIELD_NAMES:
            if task not in self.deps:
                raise self.error(
                    token,
                    f"{word!r} reads task {task!r}, which is not one of this task's deps"
                    f"{suggestion(task, self.deps)} (a condition reads the tasks it depends on)",
                )
            return Ref(task, Field(name))
        if _NUMBER.fullmatch(word):
            return Const(float(word))
        if dot and task:
            fields = ", ".join(Field)
            raise self.error(
                token, f"unknown field {name!r}{suggestion(name, _FIELD_NAMES)} (fields: {fields})"
            )
        raise self.error(
            token,
            f"{word!r} is not a number, a quoted string or task.field (quote strings: 'failed')",
        )

    def _checked(self, compare: Compare, start: _Token, right: _Token) -> Compare:
        left, right_node, op = compare.left, compare.right, compare.op
        if isinstance(left, Const) and isinstance(right_node, Const):
            raise self.error(start, "compares two constants: name a task's field")
        kinds = [_kind(side) for side in (left, right_node)]
        if kinds[0] != kinds[1]:
            raise self.error(start, f"compares {kinds[0]} with {kinds[1]}")
        if kinds[0] != "a number" and op in _ORDER_OPS:
            raise self.error(start, f"{op!r} orders numbers only; {kinds[0]} takes == or !=")
        for ref, other, token in ((left, right_node, start), (right_node, left, right)):
            if (
                isinstance(ref, Ref)
                and ref.field is Field.STATUS
                and isinstance(other, Const)
                and other.value not in STATUSES
            ):
                raise self.error(
                    token,
                    f"{other.value!r} is not a status{suggestion(str(other.value), STATUSES)}; "
                    f"statuses: {', '.join(STATUSES)} (a timeout reads as 'failed')",
                )
        return compare


def _kind(node: Ref | Const) -> str:
    if isinstance(node, Ref):
        return "a number" if node.field in _NUMERIC else "a string"
    if isinstance(node.value, bool):
        return "a boolean"
    return "a number" if isinstance(node.value, float) else "a string"


def _check_boolean(node: Node, parser: _Parser) -> None:
    """Every operand of and/or/not, and the whole, must be a comparison or true/false."""
    match node:
        case Ref():
            raise ConditionError(
                f"{node} is a value, not a condition: compare it (e.g. {node} == ...)"
            )
        case Const(value=value) if not isinstance(value, bool):
            raise ConditionError(f"{_show(value)} is a value, not a condition")
        case Not(operand=operand):
            _check_boolean(operand, parser)
        case BoolOp(operands=operands):
            for operand in operands:
                _check_boolean(operand, parser)


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def status_for_condition(status: str) -> str:
    """How a task status reads in a condition (CIS has no separate timeout status)."""
    return _STATUS_NAMES.get(status, status)


_STATUS_NAMES: Mapping[str, str] = {
    "timeout": "failed",
    "awaiting_approval": "pending",
    "ready": "pending",
    "dispatched": "running",
}
