"""The review's smaller items: task ids that look like other ids or reorder the text around
them, and text no encoding takes sent to a session through the control API."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from cis_bot.control.registry import discover
from tests.security.support import cis
from tests.support.control import LocalRun
from tests.support.control import cis as cis_in_loop
from tests.test_session_control import ask_dag

TRICKY_IDS = {
    "bidi override": ("ab\u202ecd", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    "bidi isolate": ("ab\u2067cd", "U+2067 (RIGHT-TO-LEFT ISOLATE)"),
    "zero width space": ("ab\u200bcd", "U+200B (ZERO WIDTH SPACE)"),
    "zero width joiner": ("ab\u200dcd", "U+200D (ZERO WIDTH JOINER)"),
    "byte order mark": ("\ufeffab", "U+FEFF"),
    "grapheme joiner": ("a\u034fb", "U+034F (COMBINING GRAPHEME JOINER)"),
    "variation selector": ("a\ufe0fb", "U+FE0F (VARIATION SELECTOR-16)"),
    "hangul filler": ("a\u3164b", "U+3164 (HANGUL FILLER)"),
    "private use": ("a\ue000b", "U+E000"),
    "symbol": ("a*b", "U+002A (ASTERISK)"),
    "leading mark": ("\u0301e", "U+0301 (COMBINING ACUTE ACCENT)"),
}


def validate(tmp_path: Path, text: str) -> tuple[int, str, str]:
    dag = tmp_path / "dag.toml"
    dag.write_text(text, encoding="utf-8")
    result = cis("dag", "validate", str(dag), cwd=tmp_path)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("case", sorted(TRICKY_IDS))
def test_a_task_id_that_hides_or_reorders_text_is_refused(tmp_path: Path, case: str) -> None:
    task_id, named = TRICKY_IDS[case]
    code, _, stderr = validate(tmp_path, f'[[tasks]]\nid = "{task_id}"\ncommand = "true"\n')
    assert code == 2
    assert "dag.toml: key 'tasks[0].id': invalid task id" in stderr and named in stderr, stderr


def test_ids_are_compared_in_nfc_so_twins_are_one_id(tmp_path: Path) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # the same on screen
    code, _, stderr = validate(
        tmp_path,
        f'[[tasks]]\nid = "{composed}"\ncommand = "true"\n'
        f'[[tasks]]\nid = "{decomposed}"\ncommand = "true"\n',
    )
    assert code == 2
    assert "task 'café': key 'id': duplicate task id 'café'" in stderr
    assert "spelled differently" in stderr
    # A dependency spelled the other way names the same task.
    code, _, stderr = validate(
        tmp_path,
        f'[[tasks]]\nid = "{decomposed}"\ncommand = "true"\n'
        f'[[tasks]]\nid = "next"\ndeps = ["{composed}"]\ncommand = "true"\n',
    )
    assert code == 0, stderr


def test_ids_in_any_script_and_the_documented_punctuation_are_fine(tmp_path: Path) -> None:
    ids = ["数据清洗", "étape-1", "build_v2.0", "deploy(eu)", "a+b=c", "#1", "x@y~z", "[a,b]"]
    code, _, stderr = validate(
        tmp_path, "".join(f'[[tasks]]\nid = "{i}"\ncommand = "true"\n' for i in ids)
    )
    assert code == 0, stderr


@pytest.mark.slow
async def test_text_no_encoding_takes_is_a_400_from_the_control_api(tmp_path: Path) -> None:
    run = LocalRun(tmp_path, ask_dag("ask Continue?", "print after-yes"))
    try:
        run_id = await run.wait_for_run_id()
        await run.session("ask", "blocked")
        (entry,) = [e for e in discover(run.state, clean=False).live if e.pid == run.pid]
        sid = f"{run_id}:ask:1"
        connector = aiohttp.UnixConnector(path=str(entry.socket))
        async with aiohttp.ClientSession(connector=connector) as http:

            async def post(path: str, raw: bytes) -> tuple[int, object]:
                headers = {"Content-Type": "application/json"}
                async with http.post(f"http://cis{path}", data=raw, headers=headers) as answer:
                    return answer.status, await answer.json()

            for path, raw in (
                (f"/v1/sessions/{sid}/input", b'{"text": "\\ud800", "newline": true}'),
                (f"/v1/sessions/{sid}/input", b'{"text": "ok", "\\udfff": 1}'),
                (f"/v1/sessions/{sid}/kill", b'{"by": "\\udc80"}'),
                (f"/v1/runs/{run_id}/cancel", b'{"by": ["\\ud83d"]}'),
            ):
                status, body = await post(path, raw)
                assert status == 400, (path, raw, body)
                assert "not valid Unicode" in json.dumps(body), body
        # The session took none of it, and takes a proper answer.
        typed = await cis_in_loop(
            "dag", "input", f"{run_id}:ask", "y", "--state-dir", str(run.state)
        )
        assert typed.returncode == 0, typed.stderr
        code, report = await run.report()
        assert code == 0 and report["tasks"]["ask"]["status"] == "completed"
    finally:
        run.stop()
