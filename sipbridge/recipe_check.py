"""``sipbridge recipe check RECIPE``: try a join recipe against the app the way the bot would, and say what it found.

It launches Chromium as the browser stage does (same user, sandbox, flags and page hook), runs the recipe's steps
one by one printing each with its time, then feeds a test camera and microphone into the page for a few seconds
and reports what the bot would bridge: the page's RTCPeerConnections, each remote track with the participant it is
attributed to and how (the recipe's ``participant_attribute``, its ``participant_script``, or the sender's msid
when the page shows the track nowhere), codecs both ways, whether the app called getUserMedia and whether the
injected camera is what it sends. When a step fails it names the step, saves a screenshot, the page's console and
the error text the page shows (stages/browser/diagnose.py), and suggests the likely fix. Exit status 0 when the
bot got into the call, 1 when it did not, 2 for a recipe that cannot be loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from aiohttp import WSMsgType, web

CHECK_WATCH_S = 8.0
INJECT_FPS = 15
INJECT_SIZE = (320, 240)
AUDIO_RATE_HZ = 48000
AUDIO_CHUNK_MS = 20
TONE_HZ = 440.0
REPORT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
EXIT_JOINED, EXIT_NOT_JOINED, EXIT_BAD_RECIPE = 0, 1, 2

# Runs in every frame that has the hook: its connections (with getStats), remote tracks and camera use.
PAGE_REPORT_JS = """
async () => {
  const hook = window.__sipbridgeHook;
  if (!hook) return null;
  const pcs = [];
  for (const pc of hook.pcs) {
    const entry = { id: pc.__sbId, state: pc.connectionState, inbound: [], outbound: [], senders: [] };
    let stats = new Map();
    try { stats = await pc.getStats(); } catch (e) {}
    const codecs = {};
    stats.forEach((r) => { if (r.type === "codec") codecs[r.id] = r.mimeType; });
    stats.forEach((r) => {
      if (r.type === "inbound-rtp")
        entry.inbound.push({ kind: r.kind, mid: r.mid, codec: codecs[r.codecId] || null,
          packets: r.packetsReceived || 0, frames: r.framesDecoded === undefined ? null : r.framesDecoded });
      if (r.type === "outbound-rtp")
        entry.outbound.push({ kind: r.kind, mid: r.mid, codec: codecs[r.codecId] || null, bytes: r.bytesSent || 0,
          frames: r.framesEncoded === undefined ? null : r.framesEncoded });
    });
    for (const t of pc.getTransceivers()) {
      const track = t.sender && t.sender.track;
      if (!track) continue;
      entry.senders.push({ kind: track.kind, mid: t.mid, injected: hook.gumTracks.has(track),
        live: track.readyState === "live", direction: t.currentDirection });
    }
    pcs.push(entry);
  }
  return { url: location.href, pcs, gum: hook.gum, injected: hook.injected };
}
"""


@dataclass
class SeenTrack:
    key: str
    kind: str
    participant: str
    identified_by: str
    pc: Any
    mid: Any
    frames: int = 0
    ended: str | None = None


@dataclass
class HookLink:
    """The Python end of the page hook's sockets, as far as a check needs it: what the page announces, how much
    media reaches us per track, and a test camera and microphone fed into the page."""

    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    url: str = ""
    tracks: dict[str, SeenTrack] = field(default_factory=dict)
    pc_states: dict[Any, str] = field(default_factory=dict)
    pages: list[tuple[web.WebSocketResponse, dict[str, Any]]] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/sipbridge", self._handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"ws://127.0.0.1:{port}/sipbridge?token={self.token}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handler(self, request: web.Request) -> web.StreamResponse:
        if not secrets.compare_digest(request.query.get("token", ""), self.token):
            raise web.HTTPForbidden()
        ws = web.WebSocketResponse(compress=False, max_msg_size=64 * 1024 * 1024)
        await ws.prepare(request)
        info: dict[str, Any] = {"role": "unknown", "camera_at": 0.0}
        self.pages.append((ws, info))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    self._on_media(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    with contextlib.suppress(ValueError):
                        body = json.loads(msg.data)
                        if isinstance(body, dict):
                            self._on_control(info, body)
        finally:
            self.pages.remove((ws, info))
        return ws

    def _on_media(self, data: bytes) -> None:
        from stages.browser.stage import PageMessageError, parse_page_message

        try:
            header, _ = parse_page_message(data)
        except PageMessageError:
            self.drops["malformed"] += 1
            return
        track = self.tracks.get(str(header.get("k")))
        if track is not None:
            track.frames += 1

    def _on_control(self, info: dict[str, Any], body: dict[str, Any]) -> None:
        kind = body.get("t")
        if kind == "hello":
            info["role"] = str(body.get("role"))
            info["top"] = bool(body.get("top"))
        elif kind == "gum":
            info["camera_at"] = time.monotonic()
        elif kind == "track":
            key = str(body.get("k"))
            self.tracks[key] = SeenTrack(key, str(body.get("kind")), str(body.get("participant")),
                                         str(body.get("identified_by")), body.get("pc"), body.get("mid"))
        elif kind == "ended" and str(body.get("k")) in self.tracks:
            self.tracks[str(body.get("k"))].ended = str(body.get("reason", "ended"))
        elif kind == "pc":
            self.pc_states[body.get("pc")] = str(body.get("state"))
        elif kind == "drops":
            for reason, count in (body.get("drops") or {}).items():
                if isinstance(count, int):
                    self.drops[reason] += count

    def camera_page(self) -> web.WebSocketResponse | None:
        pages = [(ws, info) for ws, info in self.pages if info["role"] == "page"]
        users = [(ws, info) for ws, info in pages if info["camera_at"]]
        chosen = max(users, key=lambda p: p[1]["camera_at"]) if users else next(
            (p for p in pages if p[1].get("top")), None)
        return chosen[0] if chosen else None

    async def feed(self, stop: asyncio.Event) -> None:
        """A moving grey ramp and a tone, as the pipeline would inject them, until ``stop``."""
        import numpy as np

        from stages.browser.stage import pack_page_message

        width, height = INJECT_SIZE
        chroma = np.full(2 * (width // 2) * (height // 2), 128, np.uint8)
        samples = AUDIO_RATE_HZ * AUDIO_CHUNK_MS // 1000
        seq = 0
        started = time.monotonic()
        next_video = next_audio = started
        while not stop.is_set():
            now = time.monotonic()
            ws = self.camera_page()
            if ws is not None and not ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    if now >= next_video:
                        seq += 1
                        luma = ((np.arange(width, dtype=np.int32)[None, :] + seq * 4) % 256).astype(np.uint8)
                        frame = np.concatenate([np.repeat(luma, height, axis=0).ravel(), chroma])
                        await ws.send_bytes(pack_page_message({"t": "v", "slot": 0, "w": width, "h": height,
                                                               "seq": seq, "ct": time.time() * 1000}, frame))
                        next_video += 1 / INJECT_FPS
                    if now >= next_audio:
                        t = (np.arange(samples) + round((next_audio - started) * AUDIO_RATE_HZ)) / AUDIO_RATE_HZ
                        tone = (np.sin(2 * math.pi * TONE_HZ * t) * 8000).astype(np.int16)
                        await ws.send_bytes(pack_page_message({"t": "a", "sr": AUDIO_RATE_HZ, "ch": 1, "n": samples,
                                                               "ct": time.time() * 1000}, tone))
                        next_audio += AUDIO_CHUNK_MS / 1000
            else:
                next_video = next_audio = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, min(next_video, next_audio) - time.monotonic()))


def _print_step(out: Callable[[str], None]) -> Callable[[int, int, str, float, BaseException | None], None]:
    def progress(index: int, total: int, description: str, seconds: float, error: BaseException | None) -> None:
        from stages.browser.recipes import first_line

        status = "ok" if error is None else f"FAILED: {first_line(error)}"
        out(f"  step {index}/{total} {description} ... {status} ({seconds:.2f} s)")

    return progress


def summarize(link: HookLink, frames: list[dict[str, Any]]) -> dict[str, Any]:
    """The facts of the check as one JSON-able dict (also what the human report is printed from)."""
    pcs = [pc for frame in frames for pc in frame["pcs"]]
    gum_calls = sum(int(frame["gum"]["calls"]) for frame in frames)
    camera = []
    for pc in pcs:
        sent = {o["mid"]: o for o in pc["outbound"]}
        for sender in pc["senders"]:
            if sender["kind"] != "video":
                continue
            out = sent.get(sender["mid"], {})
            camera.append({"pc": pc["id"], "mid": sender["mid"], "injected": sender["injected"],
                           "live": sender["live"], "codec": out.get("codec"), "frames": out.get("frames") or 0,
                           "bytes": out.get("bytes") or 0})
    return {
        "peer_connections": [{"id": pc["id"], "state": pc["state"],
                              "receives": sorted({i["codec"] for i in pc["inbound"] if i["codec"]}),
                              "sends": sorted({o["codec"] for o in pc["outbound"] if o["codec"]})} for pc in pcs],
        "tracks": [{"participant": t.participant, "kind": t.kind, "identified_by": t.identified_by, "pc": t.pc,
                    "mid": t.mid, "frames_to_bot": t.frames, "ended": t.ended} for t in link.tracks.values()],
        "get_user_media_calls": gum_calls,
        "camera": camera,
        "camera_sent": any(c["injected"] and c["frames"] > 0 for c in camera),
    }


def print_report(report: dict[str, Any], out: Callable[[str], None]) -> None:
    out(f"peer connections: {len(report['peer_connections'])}")
    for pc in report["peer_connections"]:
        out(f"  pc {pc['id']}: {pc['state']}; receives {', '.join(pc['receives']) or 'nothing'}; "
            f"sends {', '.join(pc['sends']) or 'nothing'}")
    out(f"remote tracks: {len(report['tracks'])}")
    for t in report["tracks"]:
        how = {"attribute": "participant_attribute", "script": "participant_script",
               "msid": "the sender's msid: the page shows this track nowhere the recipe looks"}.get(
            t["identified_by"], t["identified_by"])
        ended = f", ended ({t['ended']})" if t["ended"] else ""
        out(f"  {t['kind']} of {t['participant']!r} (by {how}; pc {t['pc']}, mid {t['mid']}; "
            f"{t['frames_to_bot']} frames reached the bot{ended})")
    if report["get_user_media_calls"]:
        out(f"getUserMedia: called {report['get_user_media_calls']} time(s)")
    else:
        out("getUserMedia: never called (the app did not ask for a camera: the bot's camera cannot be sent)")
    for cam in report["camera"]:
        source = "the injected camera" if cam["injected"] else "a track the page made itself (not getUserMedia's)"
        out(f"  pc {cam['pc']} mid {cam['mid']} sends {source}: {cam['codec'] or 'no codec yet'}, "
            f"{cam['frames']} frames encoded")
    out("camera sent: " + ("yes" if report["camera_sent"] else "NO"))
    if not report["tracks"]:
        out("warning: no remote track seen (an empty room, or the page did not connect)")
    if report["tracks"] and all(t["identified_by"] == "msid" for t in report["tracks"]):
        out("warning: no track was attributed by the page: check participant_attribute / participant_script")


async def check(recipe: Any, *, mode: str, watch_s: float, save_dir: Path, out: Callable[[str], None]) -> tuple[
        int, dict[str, Any]]:
    from playwright.async_api import async_playwright

    from stages.browser.chromium import launch_chromium
    from stages.browser.diagnose import PageWatch, diagnose
    from stages.browser.recipes import Recipe, RecipeError
    from stages.browser.stage import CaptureMode, init_script

    result: dict[str, Any] = {"recipe": recipe.name, "url": recipe.start_url(), "steps": [], "joined": False}
    link = HookLink()
    await link.start()

    def progress(index: int, total: int, description: str, seconds: float, error: BaseException | None) -> None:
        result["steps"].append({"index": index, "description": description, "seconds": round(seconds, 3),
                                "ok": error is None})
        _print_step(out)(index, total, description, seconds, error)

    try:
        async with async_playwright() as pw:
            browser = await launch_chromium(pw)
            try:
                context = await browser.new_context(bypass_csp=recipe.bypass_csp)
                await context.add_init_script(script=init_script(link.url, recipe, mode=CaptureMode(mode)))
                page = await context.new_page()
                watch = PageWatch(page)
                out(f"recipe {recipe.name}: joining {recipe.start_url()}")
                started = time.monotonic()
                try:
                    if type(recipe).join is Recipe.join:
                        await recipe.join(page, progress)
                    else:  # a Python recipe with its own join: one step as far as we can see
                        try:
                            await recipe.join(page)
                        except Exception as exc:
                            progress(1, 1, "join (Python recipe)", time.monotonic() - started, exc)
                            raise
                        progress(1, 1, "join (Python recipe)", time.monotonic() - started, None)
                    if not await recipe.is_joined(page):
                        raise RecipeError(f"joined_selector {recipe.joined_selector!r} is not on the page after the "
                                          "steps: the bot would count itself out of the call and rejoin")
                except Exception as exc:
                    diagnosis = await diagnose(page, recipe, exc, save_dir, "recipe-check", watch)
                    result.update(diagnosis.attributes())
                    out("FAILED: " + diagnosis.reason)
                    for text in diagnosis.error_texts:
                        out(f"  page shows: {text!r}")
                    if diagnosis.suggestion:
                        out("  likely fix: " + diagnosis.suggestion)
                    for what, path in diagnosis.files.items():
                        out(f"  {what}: {path}")
                    return EXIT_NOT_JOINED, result
                result["joined"] = True
                out(f"joined in {time.monotonic() - started:.2f} s; watching for {watch_s:.0f} s with a test camera")
                stop = asyncio.Event()
                feeder = asyncio.create_task(link.feed(stop))
                await asyncio.sleep(watch_s)
                frames = []
                for frame in page.frames:
                    with contextlib.suppress(Exception):
                        data = await asyncio.wait_for(frame.evaluate(PAGE_REPORT_JS), REPORT_TIMEOUT_S)
                        if data:
                            frames.append(data)
                stop.set()
                await feeder
                result.update(summarize(link, frames))
                print_report(result, out)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(recipe.leave(page), CLOSE_TIMEOUT_S)
                return EXIT_JOINED, result
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(browser.close(), CLOSE_TIMEOUT_S)
    finally:
        await link.stop()


@click.group()
def command() -> None:
    """Join recipes: try one against your app before bridging it."""


@command.command("check")
@click.argument("recipe_spec", metavar="RECIPE")
@click.option("--var", "variables", multiple=True, help="Recipe variable NAME=VALUE (repeatable).")
@click.option("--display-name", default=None, help="Name the bot joins with (recipe variable display_name).")
@click.option("--mode", type=click.Choice(["raw", "encoded"]), default="raw", show_default=True,
              help="Capture mode, as the browser stage's --mode.")
@click.option("--watch-s", type=click.FloatRange(0, 600), default=CHECK_WATCH_S, show_default=True,
              help="Seconds to watch the call after joining, feeding a test camera.")
@click.option("--save-dir", type=click.Path(file_okay=False), default=None,
              help="Where a failure's screenshot, console and page text go [the run folder].")
@click.option("--json", "as_json", is_flag=True, help="Also print the whole result as one JSON object (last line).")
def check_command(recipe_spec: str, variables: tuple[str, ...], display_name: str | None, mode: str, watch_s: float,
                  save_dir: str | None, as_json: bool) -> None:
    """Open the app with RECIPE as the bot would; print each step with its time, then what the bot found."""
    from stages.base import run_dir
    from stages.browser import _parse_vars
    from stages.browser.chromium import ChromiumUserError
    from stages.browser.recipes import RecipeError, load_recipe

    values = _parse_vars(variables)
    if display_name is not None:
        values["display_name"] = display_name
    try:
        recipe = load_recipe(recipe_spec, values)
        recipe.start_url()
    except RecipeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_RECIPE)
    folder = Path(save_dir) if save_dir else Path(run_dir())
    try:
        code, result = asyncio.run(check(recipe, mode=mode, watch_s=watch_s, save_dir=folder,
                                         out=lambda line: click.echo(line)))
    except ChromiumUserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_RECIPE)
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":")))
    sys.exit(code)
