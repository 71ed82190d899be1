from __future__ import annotations

from cis_bot.cli import main

raise SystemExit(main())
