"""A small asyncio client of the Janus API over its WebSocket transport.

One ``JanusClient`` is one WebSocket (subprotocol ``janus-protocol``) and one Janus
session, kept alive with a ``keepalive`` request well inside Janus's 60 s session
timeout. Plugin handles (``JanusHandle``) receive their asynchronous events in an
``asyncio.Queue``. When the socket closes (Janus stopped or crashed) every pending
request fails with ``JanusDisconnected``, every handle queue gets a ``{"janus":
"disconnected"}`` marker, and ``client.closed`` is set: the caller reconnects with a
new client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
from typing import Any

import aiohttp

log = logging.getLogger("sipbridge.janus.client")

SUBPROTOCOL = "janus-protocol"
KEEPALIVE_INTERVAL_S = 25.0  # Janus drops a silent session after 60 s by default
REQUEST_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# Closing the WebSocket waits for Janus's close frame; a Janus that does not send one (seen once right after a
# Janus restart: the stage's SIGTERM then waited out aiohttp's 10 s and was killed) is not waited for longer.
WS_CLOSE_TIMEOUT_S = 2.0

DISCONNECTED = {"janus": "disconnected"}


class JanusError(RuntimeError):
    """Janus answered a request with an error."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"Janus error {code}: {reason}")
        self.code = code
        self.reason = reason


class JanusDisconnected(ConnectionError):
    """The WebSocket to Janus is gone."""


class JanusHandle:
    """One attached plugin handle; ``events`` carries everything Janus pushes for it."""

    def __init__(self, client: JanusClient, handle_id: int, plugin: str) -> None:
        self.client = client
        self.id = handle_id
        self.plugin = plugin
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.detached = False

    async def message(self, body: dict[str, Any], jsep: dict[str, Any] | None = None,
                      timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """Send a plugin message; returns Janus's reply (``ack`` for asynchronous plugin requests).

        Plugin events that answer the request (with the same transaction) also arrive in ``events``.
        """
        request: dict[str, Any] = {"janus": "message", "handle_id": self.id, "body": body}
        if jsep is not None:
            request["jsep"] = jsep
        return await self.client.request(request, timeout_s=timeout_s, accept_ack=True)

    async def trickle_completed(self) -> None:
        await self.client.request({"janus": "trickle", "handle_id": self.id, "candidate": {"completed": True}},
                                  accept_ack=True)

    async def hangup_webrtc(self) -> None:
        """Tear down the handle's PeerConnection in Janus (so the handle can take a new offer)."""
        with contextlib.suppress(JanusError, asyncio.TimeoutError):
            await self.client.request({"janus": "hangup", "handle_id": self.id}, timeout_s=2.0)

    async def detach(self) -> None:
        if self.detached or self.client.closed.is_set():
            self.detached = True
            return
        self.detached = True
        with contextlib.suppress(JanusError, JanusDisconnected, asyncio.TimeoutError):
            await self.client.request({"janus": "detach", "handle_id": self.id})
        self.client.handles.pop(self.id, None)

    def __repr__(self) -> str:
        return f"JanusHandle({self.plugin}, {self.id})"


class JanusClient:
    def __init__(self, url: str, api_secret: str | None = None) -> None:
        self.url = url
        self.api_secret = api_secret
        self.session_id: int | None = None
        self.handles: dict[int, JanusHandle] = {}
        self.closed = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._accept_ack: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count()
        self._prefix = secrets.token_hex(4)

    # ----- connection -------------------------------------------------------------------------
    async def connect(self) -> JanusClient:
        """Open the WebSocket and create a session."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S))
        try:
            try:
                # No compression: small JSON messages, and compression adds latency (field notes).
                self._ws = await self._http.ws_connect(self.url, protocols=(SUBPROTOCOL,), compress=0,
                                                       max_msg_size=16 * 1024 * 1024)
            except (aiohttp.ClientError, OSError) as exc:
                raise JanusDisconnected(f"cannot connect to {self.url}: {exc}") from exc
            self._tasks.append(asyncio.create_task(self._reader(), name="janus-reader"))
            reply = await self.request({"janus": "create"})
            self.session_id = int(reply["data"]["id"])
        except BaseException:  # failed or cancelled (the stage stopping): no socket, reader or session left open
            await self._shutdown()
            raise
        self._tasks.append(asyncio.create_task(self._keepalive(), name="janus-keepalive"))
        log.info("connected to %s, session %d", self.url, self.session_id)
        return self

    async def close(self) -> None:
        """Destroy the session (when still connected) and close the socket."""
        if self.session_id is not None and not self.closed.is_set():
            with contextlib.suppress(JanusError, JanusDisconnected, asyncio.TimeoutError):
                await self.request({"janus": "destroy"}, timeout_s=2.0)
        await self._shutdown()

    async def _shutdown(self) -> None:
        self.closed.set()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self._ws is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ws.close(), WS_CLOSE_TIMEOUT_S)
        if self._http is not None:  # closes the connection, answered or not
            await self._http.close()
        self._fail_pending()

    def _fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(JanusDisconnected("Janus connection closed"))
        self._pending.clear()
        for handle in self.handles.values():
            handle.events.put_nowait(dict(DISCONNECTED))

    # ----- requests ----------------------------------------------------------------------------
    async def request(self, payload: dict[str, Any], timeout_s: float = REQUEST_TIMEOUT_S,
                      accept_ack: bool = False) -> dict[str, Any]:
        if self._ws is None or self.closed.is_set():
            raise JanusDisconnected("not connected to Janus")
        transaction = f"{self._prefix}-{next(self._ids)}"
        message = dict(payload, transaction=transaction)
        if self.session_id is not None and message["janus"] != "create":
            message["session_id"] = self.session_id
        if self.api_secret:
            message["apisecret"] = self.api_secret
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[transaction] = fut
        if accept_ack:
            self._accept_ack.add(transaction)
        try:
            await self._ws.send_str(json.dumps(message))
            reply = await asyncio.wait_for(fut, timeout_s)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise JanusDisconnected(str(exc)) from exc
        finally:
            self._pending.pop(transaction, None)
            self._accept_ack.discard(transaction)
        if reply.get("janus") == "error":
            error = reply.get("error", {})
            raise JanusError(int(error.get("code", 0)), str(error.get("reason", "unknown")))
        return reply

    async def attach(self, plugin: str) -> JanusHandle:
        reply = await self.request({"janus": "attach", "plugin": plugin})
        handle = JanusHandle(self, int(reply["data"]["id"]), plugin)
        self.handles[handle.id] = handle
        return handle

    async def info(self) -> dict[str, Any]:
        return await self.request({"janus": "info"})

    # ----- background tasks --------------------------------------------------------------------
    async def _keepalive(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            try:
                await self.request({"janus": "keepalive"}, accept_ack=True)
            except (TimeoutError, JanusError, JanusDisconnected) as exc:
                log.warning("keepalive failed: %s", exc)

    async def _reader(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    log.warning("ignoring non-JSON message from Janus: %.200r", msg.data)
                    continue
                if isinstance(data, dict):
                    self._dispatch(data)
        finally:
            if not self.closed.is_set():
                log.warning("WebSocket to %s closed", self.url)
            await self._shutdown()

    def _dispatch(self, data: dict[str, Any]) -> None:
        kind = data.get("janus")
        transaction = data.get("transaction")
        fut = self._pending.get(transaction) if isinstance(transaction, str) else None
        final = kind in ("success", "error", "server_info") or (kind == "ack" and transaction in self._accept_ack)
        if fut is not None and not fut.done() and final:
            fut.set_result(data)
            return
        if kind in ("ack", "success", "error", "server_info"):
            return
        sender = data.get("sender")
        handle = self.handles.get(sender) if isinstance(sender, int) else None
        if handle is None:
            if kind == "timeout":
                log.error("Janus session %s timed out", self.session_id)
            else:
                log.debug("event for unknown handle: %s", data)
            return
        if kind == "detached":
            handle.detached = True
            self.handles.pop(handle.id, None)
        handle.events.put_nowait(data)
