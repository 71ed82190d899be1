"""CIS's condition language: what it accepts, what it answers, and the error for each mistake."""

from __future__ import annotations

import pytest

from cis_bot.dag.condition import ConditionError, Field, Ref, Value, parse_condition

DEPS = ("cuda-compile", "1", "build.v2")


def read_from(values: dict[str, dict[str, Value]]):  # type: ignore[no-untyped-def]
    def read(ref: Ref) -> Value:
        return values[ref.task][str(ref.field)]

    return read


FAILED = {
    "cuda-compile": {
        "status": "failed",
        "exit_code": 2.0,
        "attempts": 3.0,
        "fail_count": 3.0,
        "output": "nvcc: not found",
    },
    "1": {
        "status": "completed",
        "exit_code": 0.0,
        "attempts": 1.0,
        "fail_count": 0.0,
        "output": "",
    },
    "build.v2": {
        "status": "skipped",
        "exit_code": None,
        "attempts": 0.0,
        "fail_count": 0.0,
        "output": "",
    },
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("if cuda-compile.status == 'failed'", True),
        ('cuda-compile.status == "failed"', True),
        ("cuda-compile.status != 'failed'", False),
        ("cuda-compile.fail_count > 2", True),
        ("cuda-compile.fail_count > 2 and 1.status == 'completed'", True),
        ("cuda-compile.exit_code == 2 or 1.status == 'failed'", True),
        ("not (cuda-compile.exit_code < 1.5)", True),
        ("1.exit_code >= 0 and 1.attempts <= 1", True),
        ("cuda-compile.output == 'nvcc: not found'", True),
        ("1.output == ''", True),
        # A value the task does not have is unequal to everything and not ordered.
        ("build.v2.exit_code == 0", False),
        ("build.v2.exit_code != 0", True),
        ("build.v2.exit_code < 1", False),
        ("build.v2.status == 'skipped' and true", True),
        ("false or not true", False),
        ("1.status == 'completed' and (cuda-compile.attempts == 3 or false)", True),
        ("cuda-compile.exit_code == -2", False),
    ],
)
def test_conditions_evaluate(text: str, expected: bool) -> None:
    condition = parse_condition(text, deps=DEPS)
    result, _ = condition.evaluate(read_from(FAILED))
    assert result is expected


def test_evaluation_shows_the_values_it_read() -> None:
    condition = parse_condition(
        "if cuda-compile.status == 'failed' and 1.exit_code == 0", deps=DEPS
    )
    assert condition.source == "if cuda-compile.status == 'failed' and 1.exit_code == 0"
    assert condition.references == (
        Ref("cuda-compile", Field.STATUS),
        Ref("1", Field.EXIT_CODE),
    )
    assert condition.evaluate(read_from(FAILED)) == (
        True,
        "cuda-compile.status = 'failed'; 1.exit_code = 0",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the condition is empty"),
        ("if", "the condition is empty"),
        ("cuda-compile.status = 'failed'", "unexpected '=' at column 21 (write '=='"),
        ("cuda-compile.staus == 'failed'", "unknown field 'staus' (did you mean 'status'?)"),
        ("cuda-compile.status == 'faild'", "'faild' is not a status (did you mean 'failed'?)"),
        ("cuda-compile.status == 'timeout'", "a timeout reads as 'failed'"),
        ("cuda-compile.status > 'failed'", "'>' orders numbers only"),
        ("cuda-compile.exit_code == 'x'", "compares a number with a string"),
        ("cuda-compile.status == 3", "compares a string with a number"),
        ("cuda-compile.status == true", "compares a string with a boolean"),
        ("cuda-compile.exit_code == 1.status", "compares a number with a string"),
        ("cuda-compil.status == 'failed'", "not one of this task's deps (did you mean"),
        ("cuda-compile.status", "is a value, not a condition"),
        ("3", "is a value, not a condition"),
        ("1 == 2", "compares two constants"),
        ("cuda-compile.status == 'failed' and", "found 'the end'"),
        ("(1.status == 'completed'", "expected ')'"),
        ("1.status == 'completed')", "unexpected ')'"),
        ("failed", "is not a number, a quoted string or task.field"),
        ("1.status == 'completed' && 1.exit_code == 0", "write 'and' instead of '&&'"),
        ("1.status == 'completed' 1.exit_code == 0", "expected 'and', 'or' or the end"),
        ("1.status == 'unterminated", "unterminated string starting at column 13"),
        ("not", "found 'the end'"),
        ("1.status == (1.exit_code == 0)", "compares two values, not whole conditions"),
    ],
)
def test_mistakes_are_errors_that_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConditionError) as info:
        parse_condition(text, deps=DEPS)
    assert message in str(info.value)


def test_it_is_read_never_run() -> None:
    # Python that eval would run is just words the language does not know.
    with pytest.raises(ConditionError, match=r"'__import__' is not a number"):
        parse_condition("__import__('os').system('touch /tmp/x') == 0", deps=DEPS)
