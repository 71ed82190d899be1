"""What a person does in Hydrogen, as Playwright steps on its real UI (login screen, room list,
"Join Room", timeline, composer). Waits are on what the page shows, each with a deadline."""

from __future__ import annotations

import re

import attrs
from playwright.async_api import Locator, Page, expect

# Hydrogen's first sync of a fresh session and the joins go through the homeserver: generous,
# but each wait ends as soon as the page shows what it waits for.
UI_TIMEOUT_MS = 30_000


@attrs.define
class Hydrogen:
    page: Page
    site_url: str

    async def login(self, homeserver_url: str, username: str, password: str) -> None:
        page = self.page
        await page.goto(self.site_url)
        homeserver = page.locator("#homeserver")
        await homeserver.fill(homeserver_url, timeout=UI_TIMEOUT_MS)
        await homeserver.press("Tab")  # Hydrogen asks the server for its login flows on change
        await page.locator("#username").fill(username, timeout=UI_TIMEOUT_MS)
        await page.locator("#password").fill(password)
        await page.get_by_role("button", name="Log In").click()
        await expect(page.locator(".SessionView .LeftPanel")).to_be_visible(timeout=UI_TIMEOUT_MS)

    async def join_room(self, alias: str) -> None:
        """Join through the room directory (an alias), from the room list's "+" menu."""
        page = self.page
        await page.locator(".LeftPanel button.create").click()
        await page.get_by_role("button", name="Join Room").click()
        await page.locator(".JoinRoomView #id").fill(alias)
        await page.locator(".JoinRoomView").get_by_role("button", name="Join").click()
        await expect(page.locator(".RoomView")).to_be_visible(timeout=UI_TIMEOUT_MS)

    def room_tile(self, name: str | re.Pattern[str]) -> Locator:
        return self.page.locator(".RoomList li .name").filter(has_text=name)

    async def open_room(self, name: str | re.Pattern[str]) -> None:
        await self.room_tile(name).click(timeout=UI_TIMEOUT_MS)
        await expect(self.page.locator(".RoomView")).to_be_visible(timeout=UI_TIMEOUT_MS)

    def timeline(self) -> Locator:
        return self.page.locator(".RoomView .Timeline")

    async def expect_in_timeline(self, text: str | re.Pattern[str]) -> None:
        await expect(self.timeline().get_by_text(text).last).to_be_visible(timeout=UI_TIMEOUT_MS)

    async def send(self, text: str) -> None:
        composer = self.page.locator(".MessageComposer textarea")
        await composer.fill(text)
        await composer.press("Enter")
        await expect(self.timeline().get_by_text(text).last).to_be_visible(timeout=UI_TIMEOUT_MS)
