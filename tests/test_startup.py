"""What the ``cis`` command loads before it runs anything: not rich's console and traceback
renderer, which structlog would load for pretty exceptions we do not use (see
``cis_bot/cli/__init__.py``); rich comes in only for the live table."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import cis_bot.cli, cis_bot.cli.dag, cis_bot.app.execute, cis_bot.homeserver.server
import structlog
print(sorted(m for m in ("rich", "pygments") if m in sys.modules))
structlog.get_logger("probe").info("probe.logged", ok=True)
import cis_bot.cli.progress
print("rich" in sys.modules)
"""


def test_a_run_imports_rich_only_for_the_live_table() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert probe.stdout.splitlines()[0] == "[]"
    assert probe.stdout.splitlines()[-1] == "True"
