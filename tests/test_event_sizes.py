"""No event over the size bound, whatever the run: long texts are cut by their encoded size,
documents move to media, and what still does not fit is refused with a clear error."""

from __future__ import annotations

import json

import pytest

from cis_bot.matrix import events as ev
from cis_bot.matrix.node import outgoing

RUN = "20260101-000000-abcd"


def size(content: dict[str, object]) -> int:
    return len(json.dumps(content, ensure_ascii=False).encode())


@pytest.mark.parametrize(
    "text",
    ["x" * 50_000, "\x01" * 50_000, "é" * 50_000, "😀" * 50_000, '"\\' * 50_000],
    ids=["ascii", "control", "latin", "emoji", "escapes"],
)
def test_an_output_is_cut_by_its_encoded_size_keeping_its_end(text: str) -> None:
    output = ev.clip(text + "END", ev.OUTPUT_SUMMARY_CHARS, max_bytes=ev.OUTPUT_SUMMARY_BYTES)
    assert output is not None and output.endswith("END") and output.startswith("…")
    completed = ev.SessionCompletedContent(
        run_id=RUN, session_id=f"{RUN}:t:1", task_id="t", attempt=1, status="completed",
        output=output, error=ev.clip(text, ev.REASON_CHARS),
    )  # fmt: skip
    event_type, content = ev.encode(completed)
    assert size(content) <= ev.MAX_CONTENT_BYTES
    assert ev.decode(event_type, content) == completed


def test_a_short_text_is_kept_whole() -> None:
    assert ev.clip("fine", 10, max_bytes=100) == "fine"
    assert ev.clip(None, 10) is None


def test_a_large_runs_end_is_summarised_and_its_table_goes_to_media() -> None:
    # 400 tasks with the longest ids allowed: far over the bound listed in full.
    tasks = {f"{i:04d}-{'x' * 123}": "completed" for i in range(400)}
    tasks["0007-" + "x" * 123] = "failed"
    tasks["0301-" + "x" * 123] = "cancelled"
    end = ev.RunCompletedContent(run_id=RUN, status="failed", tasks=tasks)
    with pytest.raises(ev.ContentTooLarge, match="largest field is 'tasks'"):
        ev.encode(end)

    fitted, media = end.fit()
    assert isinstance(fitted, ev.RunCompletedContent)
    assert fitted.counts == {"completed": 398, "failed": 1, "cancelled": 1}
    assert len(fitted.tasks) <= ev.SUMMARY_TASKS
    assert list(fitted.tasks.values())[:2] == ["failed", "cancelled"]  # those first
    assert json.loads(media["tasks_mxc"][0]) == tasks
    event_type, content = ev.encode(fitted)
    assert size(content) <= ev.MAX_CONTENT_BYTES
    decoded = ev.decode(event_type, {**content, "tasks_mxc": "mxc://cis.local/table"})
    assert isinstance(decoded, ev.RunCompletedContent) and decoded.counts == fitted.counts


def test_a_long_task_goes_to_media_with_its_upstream_first() -> None:
    def assignment(prompt: str, upstream: dict[str, str]) -> ev.TaskAssignedContent:
        task = json.dumps({"id": "t", "agent": "shell", "prompt": prompt})
        return ev.TaskAssignedContent(
            run_id=RUN, task_id="t", attempt=1, assigned_to="wa", assigned_user="@w:x",
            assigned_by="@c:x", agent="shell", lease_ms=1, upstream_tasks=("a",), task=task,
            upstream=upstream,
        )  # fmt: skip

    # Large upstream outputs alone: they move, the task stays.
    fitted, media = assignment("true", {"a": "o" * 60_000}).fit()
    assert set(media) == {"upstream_mxc"}
    assert isinstance(fitted, ev.TaskAssignedContent) and fitted.task and not fitted.upstream
    # A long prompt: the document moves too, and the event still decodes.
    fitted, media = assignment("echo " + "y" * 100_000, {}).fit()
    assert set(media) == {"task_mxc"}
    assert isinstance(fitted, ev.TaskAssignedContent) and fitted.task is None
    event_type, content = ev.encode(fitted)
    decoded = ev.decode(event_type, {**content, "task_mxc": "mxc://cis.local/task"})
    assert isinstance(decoded, ev.TaskAssignedContent) and decoded.task_mxc


def test_without_a_place_for_documents_too_large_is_a_clear_error() -> None:
    end = ev.RunCompletedContent(
        run_id=RUN, status="completed", tasks={f"t{i}": "completed" for i in range(5000)}
    )
    with pytest.raises(ev.ContentTooLarge, match=r"cis.dag.run.completed content is \d+ bytes"):
        outgoing(end)
    # A type with no documents to move cannot be saved by an upload either.
    request = ev.ControlRequestContent(
        request_id="r", action="input", node="n", session_id=f"{RUN}:t:1",
        text="\x01" * ev.CONTROL_TEXT_CHARS, expires=1,
    )  # fmt: skip

    async def upload(data: bytes, mime_type: str, filename: str) -> str:
        raise AssertionError("nothing to upload")

    with pytest.raises(ev.ContentTooLarge, match="largest field is 'text'"):
        outgoing(request, upload=upload)
