"""cis_bot: run DAGs of AI agent sessions, with a Matrix room as bus, log and control panel."""

from __future__ import annotations

__version__ = "0.1.0"
