"""The browser stage's end of the link to a kept Chromium (``keeper.py``): a WebSocket for Playwright's driver.

Playwright's ``connect_over_cdp`` speaks the DevTools protocol over a WebSocket; the keeper serves it on a Unix
socket. The stage's page server (already on loopback, already guarded by a token) gets one more route whose token
only the stage and the driver it starts know (never the page), and each message is passed across as it is: text
frames one way, NUL-ended messages the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from aiohttp import WSMsgType, web

from stages.browser.keeper import GREETING, MAX_MESSAGE_BYTES

CONNECT_RETRY_S = 0.05


class KeeperUnavailable(ConnectionError):
    """No keeper answered on the socket in time (not started, or busy with another stage)."""


async def open_keeper(path: Path, timeout_s: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the keeper, retrying while it starts (supervisord starts it just before the stage) or while the
    stage this one replaces is still connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_MESSAGE_BYTES)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            last: Exception = exc
        else:
            # The keeper greets the client it serves and closes on any other at once.
            try:
                greeting = await asyncio.wait_for(reader.readuntil(b"\0"), max(0.1, deadline - time.monotonic()))
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                greeting = b""
            if greeting == GREETING + b"\0":
                return reader, writer
            writer.close()
            last = ConnectionError("the keeper is serving another client")
        if time.monotonic() >= deadline:
            raise KeeperUnavailable(f"no Chromium keeper on {path} after {timeout_s:.0f} s ({last}); is the "
                                    "chromium program running (sipbridge chromium)?")
        await asyncio.sleep(CONNECT_RETRY_S)


async def relay(ws: web.WebSocketResponse, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Pass messages both ways until either side closes."""

    async def from_keeper() -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\0")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                await ws.send_str(raw[:-1].decode())
        finally:
            # The keeper drops its client when Chromium dies: close the driver's end now, so Playwright reports the
            # browser gone at once rather than when it next sends a command.
            with contextlib.suppress(Exception):
                await ws.close()

    down = asyncio.ensure_future(from_keeper())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                writer.write(msg.data.encode() + b"\0")
                await writer.drain()
            elif msg.type == WSMsgType.BINARY:
                writer.write(bytes(msg.data) + b"\0")
                await writer.drain()
            if down.done():
                break
    finally:
        down.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await ws.close()
