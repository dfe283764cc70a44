"""The node's HTTP API (aiohttp). Every answer is JSON; every error is ``{"error": "..."}`` with a 4xx/5xx code.

    POST   /calls              a bridge configuration (bridge.toml's schema, as JSON) -> 201 {"id": ...}
                               (?id=NAME chooses the id: lower-case letters, digits and -, at most 32)
    GET    /calls              every call this node knows (running and recently ended), and "dial": the SIP
                               URI callers dial (inbound), else null
    GET    /calls/{id}         state, SIP state/code/codecs, per-stage figures
    DELETE /calls/{id}         hang up, flush, stop -> the ended call
    POST   /calls/{id}/dtmf    {"digits": "123#", "duration_ms": 160}
    GET    /node               the node's snapshot (slots, free, draining, calls)
    GET    /healthz            200 ready, 429 full, 503 draining (no token needed: for load balancers)
    GET    /metrics            Prometheus text

Every path but /healthz needs ``Authorization: Bearer TOKEN`` unless auth was turned off (loopback only).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sipbridge.node.calls import DTMF_DURATION_MS, DTMF_RE, CallRequestError, RunFolderInUse
from sipbridge.node.metrics import registry_for
from sipbridge.node.service import RETRY_AFTER_S, Node, Refused

log = logging.getLogger("sipbridge.node")

MAX_BODY_BYTES = 64 * 1024
OPEN_PATHS = {"/healthz"}
NODE_KEY = web.AppKey("node", Node)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def make_app(node: Node, token: str | None) -> web.Application:
    registry = registry_for(node)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            challenge = {"WWW-Authenticate": 'Bearer realm="sipbridge-node"'}
            if scheme.lower() != "bearer" or not given:
                return error(401, "missing bearer token: send Authorization: Bearer TOKEN", challenge)
            if not hmac.compare_digest(given.strip().encode(), token.encode()):
                return error(401, "wrong bearer token", challenge)
        try:
            return await handler(request)
        except ApiError as exc:
            return error(exc.status, str(exc))
        except web.HTTPException as exc:  # aiohttp's own answers, in JSON like ours
            if exc.status == 404:
                return error(404, f"no such path: {request.path}")
            if exc.status == 405:
                return error(405, f"{request.method} is not allowed on {request.path}",
                             {"Allow": exc.headers.get("Allow", "")})
            if exc.status == 413:
                return error(413, f"body over {MAX_BODY_BYTES} bytes")
            raise

    app = web.Application(middlewares=[auth], client_max_size=MAX_BODY_BYTES)
    app[NODE_KEY] = node

    def find(request: web.Request) -> Any:
        call = node.calls.get(request.match_info["id"])
        if call is None:
            raise ApiError(404, f"no call {request.match_info['id']!r} on this node")
        return call

    async def read_json(request: web.Request) -> Any:
        text = await request.text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from None

    async def post_call(request: web.Request) -> web.Response:
        if node.settings.cluster_redis:
            return await queue_call(request)
        # Capacity first: a full node says so before reading a body it would not run.
        refused = node.refusal()
        if refused is not None:
            node.rejected[refused.reason] += 1
            return error(refused.status, str(refused), {"Retry-After": str(RETRY_AFTER_S)})
        data = await read_json(request)
        try:
            plan = node.plan(data)
        except CallRequestError as exc:
            node.rejected["invalid"] += 1
            return error(400, str(exc))
        try:
            call = await node.start_call(plan, request.query.get("id"))
        except Refused as exc:
            return error(exc.status, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
        except ValueError as exc:
            return error(400, str(exc))
        except RunFolderInUse as exc:
            return error(409, str(exc))
        except (OSError, RuntimeError) as exc:
            log.error("call could not start: %s", exc)
            return error(500, f"call could not start: {exc}")
        return web.json_response(call.view(), status=201, headers={"Location": f"/calls/{call.id}"})

    async def queue_call(request: web.Request) -> web.Response:
        """Cluster mode (issue 13): validate here, queue in the cluster's stream; the first node with a free slot
        runs it. An Idempotency-Key header makes a repeated request return the first call."""
        from redis.exceptions import RedisError

        from sipbridge.cluster.noderunner import submit_to_cluster

        data = await read_json(request)
        try:
            node.plan(data)
        except CallRequestError as exc:
            node.rejected["invalid"] += 1
            return error(400, str(exc))
        try:
            call_id, created = await submit_to_cluster(node.settings.cluster_redis or "", data,
                                                       request.headers.get("Idempotency-Key"))
        except (RedisError, OSError) as exc:
            return error(503, f"the cluster's Redis is unreachable: {exc}", {"Retry-After": str(RETRY_AFTER_S)})
        return web.json_response({"call": call_id, "created": created, "queued": True},
                                 status=202 if created else 200)

    async def list_calls(request: web.Request) -> web.Response:
        dial = node.inbound.dial_uri() if node.inbound is not None else None
        return web.json_response({"calls": [c.view() for c in list(node.calls.values())], "dial": dial})

    async def get_call(request: web.Request) -> web.Response:
        return web.json_response(find(request).view(detail=True))

    async def delete_call(request: web.Request) -> web.Response:
        call = find(request)
        if call.state != "ended":
            await node.stop_call(call, "deleted")
        return web.json_response(call.view(detail=True))

    async def post_dtmf(request: web.Request) -> web.Response:
        call = find(request)
        data = await read_json(request)
        if not isinstance(data, dict):
            return error(400, 'body must be a JSON object: {"digits": "123#"}')
        digits = data.get("digits")
        if not isinstance(digits, str) or not DTMF_RE.fullmatch(digits):
            return error(400, "digits must be 1..32 of 0-9 * # A-D")
        duration = data.get("duration_ms", 160)
        low, high = DTMF_DURATION_MS
        if not isinstance(duration, int) or isinstance(duration, bool) or not low <= duration <= high:
            return error(400, f"duration_ms must be an integer {low}..{high}")
        if call.state != "running":
            return error(409, f"call {call.id} is {call.state}")
        try:
            reply = await node.dtmf(call, digits, duration)
        except LookupError as exc:
            return error(409, str(exc))
        except TimeoutError:
            return error(504, "the call's SIP stage did not answer")
        if not reply.get("ok"):
            return error(409, f"SIP stage refused: {reply.get('error', reply)}")
        return web.json_response({"ok": True, "digits": digits, "duration_ms": duration})

    async def get_node(request: web.Request) -> web.Response:
        return web.json_response(node.snapshot().to_dict())

    async def healthz(request: web.Request) -> web.Response:
        refused = node.refusal()
        snap = node.snapshot()
        body = {"status": "ready" if refused is None else refused.reason, "slots": snap.slots, "free": snap.free,
                "draining": snap.draining, "cpu_busy": snap.cpu_busy}
        if refused is not None:
            body["reason"] = str(refused)
        return web.json_response(body, status=200 if refused is None else refused.status)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_post("/calls", post_call)
    app.router.add_get("/calls", list_calls)
    app.router.add_get("/calls/{id}", get_call)
    app.router.add_delete("/calls/{id}", delete_call)
    app.router.add_post("/calls/{id}/dtmf", post_dtmf)
    app.router.add_get("/node", get_node)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
