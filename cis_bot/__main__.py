from __future__ import annotations

from cis_bot.cli import run

run()
