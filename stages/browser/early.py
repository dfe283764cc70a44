"""Chromium started while the browser stage's own modules are still importing.

A browser stage that supervisord restarts (after a crash or a kill) leaves the room empty of the SIP side until its
bot has joined again, and the steps before the join used to run one after the other: Python's imports (0.4-1.3 s
on two cores), Playwright's driver (0.4-0.8 s), Chromium's launch and its first page (0.5-1.0 s). The imports run
in this process, the driver and Chromium in theirs, so they need not wait for each other: the stage's command
starts the driver, Chromium and an empty page on its event loop, imports the stage in a worker thread meanwhile,
and hands what was started to the stage (``Started``), which uses it for its first session.

Node keeps the driver's compiled code in the run folder (``NODE_COMPILE_CACHE``, Node >= 22), so a restarted stage's
driver starts from compiled code instead of parsing Playwright's bundle again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from playwright.async_api import Browser, BrowserContext, Page, Playwright, async_playwright

from stages.browser.chromium import launch_chromium

NODE_COMPILE_CACHE_DIR = "node-compile-cache"
CLOSE_TIMEOUT_S = 5.0


@dataclass
class Started:
    """What was started ahead of the stage; each piece is taken at most once."""

    playwright: Playwright
    browser: Browser | None = None
    context: BrowserContext | None = None
    page: Page | None = None
    # Why there is no browser. A missing Chromium user is the stage's to report (no rejoin fixes it); any other
    # error only means the stage launches again itself, the way it does when no browser was started ahead.
    error: BaseException | None = None

    def take_page(self) -> tuple[BrowserContext, Page] | None:
        """The empty page started ahead, once, while its browser is still connected."""
        context, page, self.context, self.page = self.context, self.page, None, None
        if context is None or page is None or self.browser is None or not self.browser.is_connected():
            return None
        return context, page

    async def close(self) -> None:
        """Stop everything started here (when the stage never ran to take it)."""
        with contextlib.suppress(Exception):
            if self.browser is not None:
                await asyncio.wait_for(self.browser.close(), CLOSE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.playwright.stop(), CLOSE_TIMEOUT_S)


def use_compile_cache(run_folder: str) -> None:
    """Point Node's compile cache at the run folder (kept if the caller set one)."""
    os.environ.setdefault("NODE_COMPILE_CACHE", str(Path(run_folder) / NODE_COMPILE_CACHE_DIR))


async def start(*, bypass_csp: bool, launch: bool = True) -> Started:
    """Playwright's driver, Chromium and one empty page in a fresh context (the recipe's CSP setting); with
    ``launch`` false only the driver (the stage connects to a kept Chromium)."""
    started = Started(await async_playwright().start())
    if not launch:
        return started
    try:
        started.browser = await launch_chromium(started.playwright)
        started.context = await started.browser.new_context(bypass_csp=bypass_csp)
        started.page = await started.context.new_page()
    except Exception as exc:  # kept for the stage: see Started.error
        started.error = exc
    return started
