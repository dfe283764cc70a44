"""The browser stage: a headless Chromium bot that joins a WebRTC room for the pipeline.

Pieces: ``chromium.py`` (launch flags), ``js/hook.js`` + ``js/encoded_worker.js`` (the page side: capture every
remote track, replace the camera and microphone), ``stage.py`` (page WebSocket, Playwright session, watchdog and
rejoin, protocol translation), ``recipes/`` (how to join each app), ``procs.py`` (process-tree CPU/PSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
from typing import Any

import click

import stages.options as stage_options_module
from stages.options import build_options, run, stage_options


def _parse_vars(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--var")
        out[name] = value
    return out


def _parse_route(text: str) -> Any:
    from stages.browser.stage import CallRoute

    try:
        data = json.loads(text)
        pattern = re.compile(data["match"])
        variables = data.get("vars", {})
    except (ValueError, KeyError, TypeError, re.error) as exc:
        raise click.BadParameter(f"{exc} in {text!r}", param_hint="--route") from None
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise click.BadParameter(f"vars must map names to strings in {text!r}", param_hint="--route")
    return CallRoute(pattern, dict(variables))


@click.command()
@stage_options("browser", has_inputs=False)
@click.option("--in", "inputs", multiple=True, help="Pipeline output(s) to inject as the bot's camera/microphone.")
@click.option("--recipe", default="local-room", show_default=True,
              help="Join recipe: built-in name, path to a .toml, a Python module, or 'config' for the [recipe] "
              "table of the --config file.")
@click.option("--var", "variables", multiple=True, help="Recipe variable NAME=VALUE (repeatable).")
@click.option("--url", default=None, help="Shortcut for --var for recipes whose url is '{url}'-based; "
              "also sets the 'room_url' variable.")
@click.option("--display-name", default=None, help="Name the bot joins with (recipe variable display_name).")
@click.option("--mode", type=click.Choice(["raw", "encoded"]), default="raw", show_default=True,
              help="raw: decoded I420/s16 out of the page; encoded: frames as received, for the decoder stage.")
@click.option("--page-video", type=click.Choice(["shown", "hidden"]), default="shown", show_default=True,
              help="hidden: the page's video elements are not displayed, so the bot's renderer does not paint "
              "pictures nobody looks at; capture is unchanged.")
@click.option("--passthrough/--no-passthrough", default=False, show_default=True,
              help="Send the SIP side's encoded video into the room as it came wherever the room takes its codec: "
              "the bot's camera then carries a small placeholder for Chromium to encode, and each encoded "
              "placeholder is replaced by the SIP side's frame. Elsewhere the page decodes it as usual.")
@click.option("--video-tracks", type=int, default=1, show_default=True,
              help="Cameras the bot offers (one per injected video stream).")
@click.option("--max-backlog-mb", type=float, default=2.0, show_default=True,
              help="Unsent page->stage data above which the page drops video (counted).")
# 500 is stage.DEFAULT_MAX_PAGE_LAG_MS, not imported: the command line must not load Playwright to show its help.
@click.option("--max-page-lag-ms", type=click.IntRange(min=0), default=500, show_default=True,
              help="The page drops media (counted as page_lag) while this stage has not read what it sent this "
              "long ago: bounds the time media waits between them. 0: no bound.")
@click.option("--max-restarts", type=int, default=5, show_default=True,
              help="Rejoins allowed within --restart-window before exiting non-zero (supervisord restarts).")
@click.option("--restart-window", type=float, default=300.0, show_default=True)
@click.option("--ws-port", type=int, default=0, show_default=True, help="Page socket port (0: any free port).")
@click.option("--chromium-socket", default=None, metavar="PATH",
              help="Drive the Chromium that `sipbridge chromium` keeps on this socket instead of launching one: a "
              "restarted stage takes over the bot's page, still in the room.")
@click.option("--join-on-call", is_flag=True,
              help="Join only while a SIP call is up (CALL_STATE events from the pipeline), leave when it ends.")
@click.option("--route", "routes", multiple=True, metavar="JSON",
              help='With --join-on-call: {"match": REGEX on the caller URI, "vars": {NAME: VALUE}}; the first '
              "match sets the recipe variables (which room) for that call (repeatable, in order).")
@click.pass_context
def command(ctx: click.Context, **params: Any) -> None:
    """Join a WebRTC room with headless Chromium: capture every participant, inject the pipeline's media."""
    from stages.browser.recipes import RecipeError, load_recipe, recipe_from_mapping

    options = build_options(params)
    variables = _parse_vars(params["variables"])
    if params["url"]:
        variables.setdefault("room_url", params["url"])
        variables.setdefault("url", params["url"])
    if params["display_name"]:
        variables["display_name"] = params["display_name"]
    try:
        if params["recipe"] == "config":
            root = ctx.find_root().obj or {}
            table = root.get("config", {}).get("recipe")
            if not isinstance(table, dict):
                raise RecipeError("--recipe config needs a [recipe] table in the --config file")
            recipe = recipe_from_mapping(table, variables, "config")
        else:
            recipe = load_recipe(params["recipe"], variables)
    except RecipeError as exc:
        raise click.BadParameter(str(exc), param_hint="--recipe") from None
    if stage_options_module.collecting is not None:  # built for another process (fused stages): nothing to start
        run(_build_stage(options, params, recipe, None))
        return
    # The stage is kept until the process exits, as run() keeps it: at a group stop Playwright's driver ends with
    # us and its transport holds an error nobody reads, which a collection inside the loop logs as an error.
    code, _stage = asyncio.run(_run_started_early(options, params, recipe))
    raise SystemExit(code)


def _build_stage(options: Any, params: dict[str, Any], recipe: Any, early: Any) -> Any:
    from stages.browser.stage import BrowserConfig, BrowserStage, CaptureMode

    config = BrowserConfig(
        recipe=recipe,
        mode=CaptureMode(params["mode"]),
        page_video=params["page_video"],
        passthrough=params["passthrough"],
        ws_port=params["ws_port"],
        max_backlog_bytes=int(params["max_backlog_mb"] * 1024 * 1024),
        max_page_lag_ms=params["max_page_lag_ms"],
        video_tracks=params["video_tracks"],
        max_restarts=params["max_restarts"],
        restart_window_s=params["restart_window"],
        join_on_call=params["join_on_call"],
        routes=[_parse_route(text) for text in params["routes"]],
        chromium_socket=params["chromium_socket"],
    )
    return BrowserStage(options, config, early=early)


async def _run_started_early(options: Any, params: dict[str, Any], recipe: Any) -> tuple[int, Any]:
    """Run the stage with Playwright, Chromium and a page started while the stage's modules import (early.py)."""
    from stages.base import run_dir
    from stages.browser import early

    early.use_compile_cache(run_dir())
    # A kept Chromium (--chromium-socket) needs no launch: only Playwright's driver is started ahead.
    started = asyncio.ensure_future(early.start(bypass_csp=recipe.bypass_csp,
                                                launch=params["chromium_socket"] is None))
    stage = None
    try:
        # A worker thread: the event loop meanwhile answers the driver, so Chromium launches in parallel.
        await asyncio.to_thread(importlib.import_module, "stages.browser.stage")
        stage = _build_stage(options, params, recipe, started)
        return int(await stage.run()), stage
    finally:
        if stage is None or stage.early is not None:  # the stage never took what was started for it
            started.cancel()
            with contextlib.suppress(BaseException):
                await (await started).close()
