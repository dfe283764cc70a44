"""Synthetic participants of the local room: Chromium pages that publish a counter pattern and a tone.

Each participant is a page of one shared headless Chromium opening the room page with ``synthetic=1`` (see
static/synthetic.js) and optionally ``probe=1`` (static/probe.js), which reports what the participant receives, and
``sync=1`` (lip-sync marks: a bright bottom band and an audio burst at the same instants, found again by the probe).
Probe and status lines are printed to stdout as JSON, one object per line, with the participant's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from playwright.async_api import ConsoleMessage, Page, async_playwright

from stages.browser.chromium import launch_chromium

PROBE_PREFIX = "SBPROBE "
JOIN_TIMEOUT_S = 20.0


@dataclass
class ParticipantSpec:
    name: str
    tone_hz: float
    publish: bool = True


def emit_line(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def page_url(room_url: str, room: int, spec: ParticipantSpec, *, janus: str | None, codec: str, width: int,
             height: int, fps: int, probe: bool, sync_marks: bool = False) -> str:
    query: dict[str, Any] = {"room": room, "name": spec.name, "autojoin": 1, "synthetic": 1, "tone": spec.tone_hz,
                             "codec": codec, "w": width, "h": height, "fps": fps}
    if janus:
        query["janus"] = janus
    if probe:
        query["probe"] = 1
    if sync_marks:
        query["sync"] = 1
        # Wall clock - CLOCK_MONOTONIC (Chromium's capture clock), so the page stamps its media on the capture clock
        # (see synthetic.js).
        query["ticks"] = round(time.time() * 1000 - time.monotonic() * 1000, 3)
    if not spec.publish:
        query["publish"] = 0
    return room_url.rstrip("/") + "/?" + urlencode(query)


async def run_participants(room_url: str, room: int, specs: list[ParticipantSpec], *, janus: str | None,
                           codec: str, width: int, height: int, fps: int, probe: bool,
                           duration_s: float | None, sync_marks: bool = False) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        pages: dict[str, Page] = {}
        try:
            for spec in specs:
                page = await browser.new_page()

                def on_console(msg: ConsoleMessage, name: str = spec.name) -> None:
                    text = msg.text
                    if text.startswith(PROBE_PREFIX):
                        with contextlib.suppress(json.JSONDecodeError):
                            emit_line({"participant": name, **json.loads(text[len(PROBE_PREFIX):])})
                    elif msg.type == "error":
                        emit_line({"participant": name, "event": "console_error", "text": text})

                def on_crash(_page: Page, name: str = spec.name) -> None:
                    emit_line({"participant": name, "event": "crashed"})

                page.on("console", on_console)
                page.on("crash", on_crash)
                # Not "load": the join status below is what matters, and load can lag behind a busy page.
                await page.goto(page_url(room_url, room, spec, janus=janus, codec=codec, width=width, height=height,
                                         fps=fps, probe=probe, sync_marks=sync_marks),
                                wait_until="domcontentloaded")
                pages[spec.name] = page
            for name, page in pages.items():
                await page.wait_for_selector('#status[data-state="joined"]', timeout=JOIN_TIMEOUT_S * 1000)
                emit_line({"participant": name, "event": "joined", "time_ns": time.time_ns()})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration_s)
            for name, page in pages.items():
                with contextlib.suppress(Exception):
                    await page.evaluate("window.room.leave()")
                emit_line({"participant": name, "event": "left", "time_ns": time.time_ns()})
        finally:
            await browser.close()
    return 0
