"""Benchmark: a conversation continued over several tasks (keep_agent / reuse_agent), both ways
cis_bot can do it with the real Claude Code CLI, against the fake Anthropic API on loopback.

  resume  the `claude` profile (print mode): every turn is a new `claude -p --resume <uuid>`
  pty     the `claude-interactive` profile (its TUI): the kept process gets each prompt typed in

Each conversation is TURNS turns, run through a SessionManager exactly as tasks run them (the
default session settings, so the TUI's settle checks are included). Reported per continued turn
(turns 2..N): median seconds, and the ratio to the baseline measured in the same run, a single
fresh `claude -p` turn (what a task costs without a kept agent). The fake answers instantly, so
the numbers are the agent CLI's own cost; it also records every request, and the script checks
that the last request of each conversation carries all the earlier turns.

``--prompt-bytes N`` pads each prompt to N bytes (lines of 60 characters, each naming its turn),
as upstream outputs make prompts long: the TUI's prompt is typed 16 bytes at a time, print mode's
is an argument.

Usage: python bench/agent_turns.py [--turns 5] [--repeat 3] [--prompt-bytes 0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import attrs

from cis_bot.session.events import SessionState
from cis_bot.session.manager import SessionManager, SessionSpec
from cis_bot.session.profile import AgentProfile
from cis_bot.session.profiles import BUILTIN_PROFILES
from cis_bot.testing.claude_home import ClaudeHome, find_claude, prepare_claude_home
from cis_bot.testing.fake_anthropic import EchoReply, FakeAnthropic


def profile(name: str, claude: str, home: ClaudeHome) -> AgentProfile:
    builtin = BUILTIN_PROFILES[name]
    return attrs.evolve(builtin, argv=(claude, *builtin.argv[1:]), env={**builtin.env, **home.env})


def padded(text: str, size: int) -> str:
    """``text`` and lines of filler up to ``size`` bytes, each line naming the turn: a kept TUI's
    turn is told from the one before by what its screen shows above the turn-over line, and two
    turns of identical filler would look the same there (real prompts differ)."""
    lines = [text]
    while sum(len(line) + 1 for line in lines) < size:
        lines.append(f"{text}: filler {len(lines)} ".ljust(59, "x"))
    return "\n".join(lines)


async def conversation(
    manager: SessionManager,
    agent: AgentProfile,
    turns: int,
    work: Path,
    tag: str,
    prompt_bytes: int = 0,
) -> list[float]:
    """Seconds per turn of one conversation kept over ``turns`` sessions."""
    times: list[float] = []
    previous = None
    first = f"{tag}:t0:1"
    for turn in range(turns):
        sid = f"{tag}:t{turn}:1"
        keep = turn < turns - 1
        options: tuple[str, ...] = ()
        continues = None
        if agent.keep_args and turn == 0:
            options = agent.keep_args
        elif agent.resume_args and turn:
            options = agent.resume_args
        if previous is not None and agent.continue_via == "pty":
            continues = previous
        start = time.perf_counter()
        session = await manager.start(
            SessionSpec(
                session_id=sid,
                profile=agent,
                prompt=padded(f"turn {turn} of {tag}", prompt_bytes),
                work_dir=work,
                transcript_path=work.parent / "transcripts" / f"{sid.replace(':', '_')}.log",
                options=options,
                conversation=first,
                keep=keep,
                continues=continues,
            )
        )
        done = await session.wait()
        times.append(time.perf_counter() - start)
        if done.state is not SessionState.COMPLETED:
            raise SystemExit(f"{tag} turn {turn}: {done.state} ({done.error})")
        previous = session
    return times


async def measure(turns: int, repeat: int, prompt_bytes: int = 0) -> dict[str, object]:
    claude = find_claude()
    if claude is None:
        raise SystemExit("the claude CLI is not installed: run `npm ci`")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        work = base / "work"
        work.mkdir()
        async with FakeAnthropic(default=EchoReply("ok: ")) as fake:
            home = prepare_claude_home(base / "home", base_url=fake.url, work_dirs=[work])
            manager = SessionManager()
            agents = {
                "resume": profile("claude", claude, home),
                "pty": profile("claude-interactive", claude, home),
            }
            single: list[float] = []
            continued: dict[str, list[float]] = {name: [] for name in agents}
            first: dict[str, list[float]] = {name: [] for name in agents}
            for r in range(repeat):  # interleaved, so drift on a shared machine hits all alike
                single += await conversation(
                    manager, agents["resume"], 1, work, f"single{r}", prompt_bytes
                )
                for name, agent in agents.items():
                    before = len(fake.message_requests)
                    times = await conversation(
                        manager, agent, turns, work, f"{name}{r}", prompt_bytes
                    )
                    first[name].append(times[0])
                    continued[name] += times[1:]
                    last = fake.message_requests[-1].all_text
                    seen = all(f"turn {t} of {name}{r}" in last for t in range(turns))
                    if not seen or len(fake.message_requests) - before < turns:
                        raise SystemExit(f"{name}: the last request lacks earlier turns")
            await manager.close(grace_secs=1)
    baseline = statistics.median(single)
    result: dict[str, object] = {
        "turns": turns,
        "repeat": repeat,
        "prompt_bytes": prompt_bytes,
        "single_turn_s": baseline,
    }
    for name in agents:
        median = statistics.median(continued[name])
        result[name] = {
            "first_turn_s": round(statistics.median(first[name]), 3),
            "continued_turn_s": round(median, 3),
            "ratio_to_single_turn": round(median / baseline, 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt-bytes", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(measure(args.turns, args.repeat, args.prompt_bytes))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"single fresh `claude -p` turn (baseline): {result['single_turn_s']:.2f}s")
    for name in ("resume", "pty"):
        r = result[name]
        assert isinstance(r, dict)
        print(
            f"{name:>6}: first turn {r['first_turn_s']:.2f}s, each continued turn "
            f"{r['continued_turn_s']:.2f}s (x{r['ratio_to_single_turn']} the baseline)"
        )


if __name__ == "__main__":
    main()
