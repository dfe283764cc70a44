"""Launching Debian's Chromium through Playwright with the flags the field notes measured."""

from __future__ import annotations

import os
from typing import Any

from playwright.async_api import Browser, Playwright

CHROMIUM_PATH = os.environ.get("SIPBRIDGE_CHROMIUM", "/usr/bin/chromium")

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    # Loopback-only rooms: without this Chromium gathers no candidate on 127.x.
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # A hidden page must keep its timers and media pipeline at full speed.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    # Synthetic participants start a tone without a user gesture.
    "--autoplay-policy=no-user-gesture-required",
]


async def launch_chromium(playwright: Playwright, extra_args: list[str] | None = None, **kwargs: Any) -> Browser:
    return await playwright.chromium.launch(
        executable_path=CHROMIUM_PATH,
        headless=True,
        args=[*CHROMIUM_FLAGS, *(extra_args or [])],
        # Playwright's own SIGTERM/SIGINT handlers would close the browser before our stage notices.
        handle_sigint=False,
        handle_sigterm=False,
        handle_sighup=False,
        **kwargs,
    )
