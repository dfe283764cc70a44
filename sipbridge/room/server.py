"""The local room's web server: the conference page, janus.js and adapter.js from Debian, and its config; Janus's
own demo pages under /janus-demos/ (sipbridge/room/janusdemos.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from sipbridge.room import janusdemos

STATIC_DIR = Path(__file__).resolve().parent / "static"
JANUS_JS = Path("/usr/share/javascript/janus-gateway/janus.js")
ADAPTER_JS = Path("/usr/share/javascript/webrtc-adapter/adapter.js")
DEFAULT_JANUS_WS = "ws://127.0.0.1:8188"

log = logging.getLogger("sipbridge.room")


def make_app(janus_url: str = DEFAULT_JANUS_WS, api_secret: str | None = None) -> web.Application:
    """The room's pages get the Janus URL, and the API secret when that Janus has one, from /config.json: this room
    stands in for an app whose backend hands its own clients what they need to reach its Janus."""
    app = web.Application()

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def config(_: web.Request) -> web.Response:
        return web.json_response({"janus": janus_url, **({"apisecret": api_secret} if api_secret else {})})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def favicon(_: web.Request) -> web.Response:
        return web.Response(status=204)  # keeps "404" noise out of the pages' consoles

    async def lib(request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        path = {"janus.js": JANUS_JS, "adapter.js": ADAPTER_JS}.get(name)
        if path is None or not path.exists():
            raise web.HTTPNotFound(text=f"{name}: install libjs-janus-gateway and libjs-webrtc-adapter")
        return web.FileResponse(path, headers={"Content-Type": "application/javascript"})

    app.router.add_get("/", index)
    app.router.add_get("/config.json", config)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/lib/{name}", lib)
    janusdemos.add_routes(app, janus_url, api_secret)
    app.router.add_static("/", STATIC_DIR)
    return app


def serve(host: str, port: int, janus_url: str, api_secret: str | None = None) -> None:
    log.info("local room on http://%s:%d/ (Janus %s%s); Janus's VideoRoom demo on http://%s:%d%svideoroomtest.html",
             host, port, janus_url, ", with its API secret" if api_secret else "", host, port, janusdemos.PREFIX)
    web.run_app(make_app(janus_url, api_secret), host=host, port=port, print=None, access_log=None)
