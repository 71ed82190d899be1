"""Fixtures for the homeserver unit tests: an in-process server and an HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from cis_bot.homeserver.server import EmbeddedHomeserver


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedHomeserver]:
    hs = EmbeddedHomeserver(state_dir=tmp_path / "state")
    await hs.start()
    try:
        yield hs
    finally:
        await hs.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
