"""A bridge configuration (TOML) and the graph of stage processes it turns into.

Room to SIP:  browser -> room-decoder -> room-transformer (layout, mix) -> sip-encoder -> janus
SIP to room:  janus -> sip-decoder (decode, resample) -> [sip-transformer (split), only to split] -> browser

The graph's shape is data (sipbridge/pipelines/bridge.toml); this module fills in each stage's arguments from the
configuration, inserts the bridge file's ``[[transform]]`` stages on the layout's insertion points and puts a
``[stages.NAME] command`` in a stage's place (sipbridge/graph.py).

Every key is validated up front; an error names the key. Secrets are written ``"env:NAME"`` and reach the
janus stage's environment only (through supervise.SecretBroker), never a file, a command line or a log.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import Message, VideoFrame
from sipbridge.graph import STAGE_NAME, Graph, GraphError, graph_from_data, read_layout
from sipbridge.supervise import NICE_MAX, NICE_MIN, StageSpec
from stages import codecs
from stages.browser.keeper import SOCKET_NAME as KEEPER_SOCKET_NAME

# What a SIP call can carry (the codec registry, stages/codecs.py), in the registry's order.
VIDEO_CODECS = (*codecs.names(video=True, sip=True), "none")
AUDIO_CODECS = tuple(codecs.names(video=False, sip=True))
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")
LAYOUTS = ("single", "grid", "active", "speaker")
FITS = ("letterbox", "stretch")  # how a picture fills its grid tile: its own shape with bars, or all of the tile
CAPTURE_MODES = ("raw", "encoded")
INJECT_MODES = ("auto", "raw", "encoded")
CODEC_AUDIO_RATE_HZ = {name: codecs.BY_NAME[name].sample_rate_hz or 0 for name in AUDIO_CODECS}
ROOM_AUDIO_RATE_HZ = 48000
SECRET_ENV_PREFIX = "SIPBRIDGE_SECRET_"
# janus.start without janus.api_secret: `sipbridge up` generates the Janus API secret for the run under this name
# (in its own memory; the broker hands it to the janus-server and janus programs only).
RUN_JANUS_SECRET_ENV = "SIPBRIDGE_RUN_JANUS_API_SECRET"
# The browser -> room-decoder edge carries every participant's encoded frames (a few kB each). Dropping one
# stalls that participant until a keyframe, which the room's sender may be slow to give, so this edge rides
# out short CPU stalls with a deeper queue (about a second of two participants' audio and video).
ENCODED_EDGE_HWM_MSGS = 64
# Every value becomes part of a command line: bound it here with a message naming the key, rather than let a huge
# one fail every exec with E2BIG. A URL or a regular expression fits well within these.
MAX_STRING_CHARS = 2048
MAX_ITEMS = 64  # entries of any list or table (routes, vars, participants)
# [sip] wait_for_room_s by default: a bot whose first join attempt failed (a 20 s step timeout) and that got in
# at its next one is still in time; measured here, the bot's start and join alone took 70 s at a load average of 45.
WAIT_FOR_ROOM_S = 120.0
WAIT_FOR_ROOM_MAX_S = 3600.0
LAYOUT = "bridge"  # sipbridge/pipelines/bridge.toml: the graph of a bridged call
# The first word of a transformer spec (stages/transformer.py parse_transform): checked here, loaded in the stage.
TRANSFORM_NAMES = ("identity", "crop", "resize", "split", "compose", "mix", "resample", "plugin", "entry")


class BridgeConfigError(ValueError):
    """A bridge configuration that cannot run; the message names the key."""


@dataclass
class MediaLeg:
    video_codec: str = "h264"
    audio_codec: str = "pcmu"
    width: int = 640
    height: int = 480
    fps: int = 30
    bitrate_kbps: int = 800
    # libx264 speed/quality trade-off. superfast encodes 640x480 in about half the CPU of veryfast
    # (1.5 vs 2.8 ms per frame measured here); baseline profile already rules out most of what slower buys.
    preset: str = "superfast"
    # to_sip: the shown participant's H.264 goes to the SIP side as the room sent it (no decode, no layout, no
    # encode) whenever its profile is the one the SIP side was offered; other cameras and the slate as usual.
    # to_room: the SIP side's frames go into the room as they came wherever the room takes their codec (the bot's
    # camera carries a placeholder for Chromium to encode, whose frames the page replaces); elsewhere it decodes.
    passthrough: bool = False


@dataclass
class InsertedStage:
    """A ``[[transform]]`` table: a stage put on an insertion point of the layout."""

    at: str
    name: str
    kind: str | None = None
    command: str | None = None
    args: list[str] = field(default_factory=list)


@dataclass
class StageOverride:
    """A ``[stages.NAME]`` table: another command in the stage's place, or more arguments for it."""

    command: str | None = None
    args: list[str] = field(default_factory=list)


@dataclass
class BridgeConfig:
    room_url: str
    recipe: str = "local-room"
    display_name: str = "SIP bridge"
    capture: str = "encoded"
    # "encoded": the SIP side's H.264 and VP8 reach the bot's page as they came and are decoded there (WebCodecs),
    # not by the SIP decoder: no decode in the bridge and no raw picture between processes. "raw": decoded here.
    # "auto": encoded unless something on the way to the room needs the pictures (a split, a to_room transform).
    inject: str = "auto"
    page_video: str = "shown"  # "hidden": the bot page's video elements are not displayed (no painting for nobody)
    # The bot's Chromium in a program of its own (stages/browser/keeper.py): a restarted browser stage takes over the
    # bot still in the room instead of joining again. False: each browser stage launches its own.
    keep_browser: bool = True
    recipe_vars: dict[str, str] = field(default_factory=dict)
    janus_url: str = "ws://127.0.0.1:8188"
    janus_api_secret: str | None = None
    start_janus: bool = False
    identity: str = "sip:bridge@127.0.0.1"
    register: str = "guest"
    proxy: str | None = None
    authuser: str | None = None
    secret: str | None = None
    call: str | None = None
    inbound: bool = False
    accept_from: str | None = None  # required for inbound calls: no caller is answered by default
    # Inbound: (caller URI pattern, recipe variables) in order; with any, the bot joins only while a call is up.
    routes: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    dtmf: str = "auto"  # RFC 4733 events when the peer takes telephone-event, else SIP INFO
    media_timeout_s: float = 30.0  # hang up after this long without media from the SIP peer (0 = never)
    # An outbound call is placed only once the bot is in the room, waiting at most this long (not placed past it).
    # Inbound calls do not wait: the caller is answered, and with routes the bot joins for the call.
    # The bot's Chromium start and join take seconds on a quiet machine, tens of seconds on a loaded one.
    wait_for_room_s: float = WAIT_FOR_ROOM_S
    # [sip.redial]: when an outbound call is dialled again (the janus stage's --redial-* options).
    redial: Redial = field(default_factory=lambda: Redial())
    to_sip: MediaLeg = field(default_factory=MediaLeg)
    to_room: MediaLeg = field(default_factory=lambda: MediaLeg(video_codec="none", audio_codec="opus"))
    layout: str = "grid"
    max_tiles: int = 4
    participants: list[str] = field(default_factory=list)
    names: bool | None = None  # participants' names on their tiles; None: on for grid, off for single
    fit: str = "letterbox"
    title: str | None = None  # the room's name on the empty room's slate; None: the room variable, else the URL
    split: tuple[int, int] | None = None
    transforms: list[InsertedStage] = field(default_factory=list)
    stages: dict[str, StageOverride] = field(default_factory=dict)
    # [processes] fuse: chains of adjacent stages that share one process (stages/fused.py); default: one each.
    fuse: list[list[str]] = field(default_factory=list)
    # [processes] nice: CPU niceness of every process of the call (stages, the bot's Chromium, a Janus it starts).
    nice: int = 0


def _take(table: dict[str, Any], where: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    # bool is an int in Python, but `wait_for_room_s = true` is a mistake, not one second.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BridgeConfigError(f"{where}.{key} must be {names}, not {value!r}")
    return value


def _choice(value: str, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise BridgeConfigError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _check_keys(table: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise BridgeConfigError(f"[{where}] must be a table")
    unknown = set(table) - allowed
    if unknown:
        raise BridgeConfigError(f"unknown key {where}.{sorted(unknown)[0]}")
    return table


def _secret(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    if not value.startswith("env:") or not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", value):
        raise BridgeConfigError(f'{where} must name an environment variable as "env:NAME" (secrets stay out of files)')
    return value[4:]


def _leg(table: Any, where: str, default: MediaLeg) -> MediaLeg:
    t = _check_keys(table, where, {"video_codec", "audio_codec", "width", "height", "fps", "bitrate_kbps", "preset",
                                   "passthrough"})
    leg = MediaLeg(
        video_codec=_choice(
            _take(t, where, "video_codec", str, default.video_codec), f"{where}.video_codec", VIDEO_CODECS
        ),
        audio_codec=_choice(
            _take(t, where, "audio_codec", str, default.audio_codec), f"{where}.audio_codec", AUDIO_CODECS
        ),
        width=_take(t, where, "width", int, default.width),
        height=_take(t, where, "height", int, default.height),
        fps=_take(t, where, "fps", int, default.fps),
        bitrate_kbps=_take(t, where, "bitrate_kbps", int, default.bitrate_kbps),
        preset=_choice(_take(t, where, "preset", str, default.preset), f"{where}.preset", X264_PRESETS),
        passthrough=_take(t, where, "passthrough", bool, default.passthrough),
    )
    for key in ("width", "height"):
        value = getattr(leg, key)
        if value <= 0 or value % 2 or value > 4096:
            raise BridgeConfigError(f"{where}.{key} must be an even number of pixels up to 4096, not {value}")
    if not 1 <= leg.fps <= 60:
        raise BridgeConfigError(f"{where}.fps must be 1..60, not {leg.fps}")
    if not 16 <= leg.bitrate_kbps <= 20000:
        raise BridgeConfigError(f"{where}.bitrate_kbps must be 16..20000, not {leg.bitrate_kbps}")
    return leg


def _routes(entries: list[Any]) -> list[tuple[str, dict[str, str]]]:
    routes = []
    for number, entry in enumerate(entries, 1):
        where = f"sip.route[{number}]"
        table = _check_keys(entry, where, {"match", "vars"})
        pattern = _take(table, where, "match", str, None)
        if pattern is None:
            raise BridgeConfigError(f"{where}.match is required (a regular expression on the caller's URI)")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise BridgeConfigError(f"{where}.match is not a valid regular expression: {exc}") from None
        variables = _take(table, where, "vars", dict, {})
        if not all(isinstance(v, str) for v in variables.values()):
            raise BridgeConfigError(f"{where}.vars must be a table of strings")
        routes.append((pattern, dict(variables)))
    return routes


def _check_bounds(value: Any, where: str) -> None:
    """Every string bounded, every list and table bounded, every number finite, anywhere in the file."""
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise BridgeConfigError(f"{where} is {len(value)} characters long; at most {MAX_STRING_CHARS}")
        if "\x00" in value:
            raise BridgeConfigError(f"{where} contains a NUL character")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BridgeConfigError(f"{where} must be a finite number, not {value}")
    elif isinstance(value, (list, dict)):
        if len(value) > MAX_ITEMS:
            raise BridgeConfigError(f"{where} has {len(value)} entries; at most {MAX_ITEMS}")
        items = value.items() if isinstance(value, dict) else enumerate(value, 1)
        for key, item in items:
            if isinstance(key, str) and len(key) > MAX_STRING_CHARS:
                raise BridgeConfigError(f"a key in {where} is {len(key)} characters long; at most {MAX_STRING_CHARS}")
            _check_bounds(item, f"{where}[{key}]" if isinstance(value, list) else f"{where}.{key}")


@dataclass
class Redial:
    """[sip.redial]: a call Janus took down with it is dialled again once Janus is back (after_janus_restart);
    interval_s > 0 also dials the sip.call target again that long after a call ends or fails; failures in a row
    wait backoff_s, doubling up to backoff_max_s; max_tries failures in a row end it (0 = no limit)."""

    after_janus_restart: bool = True
    interval_s: float = 0.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    max_tries: int = 0


def _redial(table: Any) -> Redial:
    where = "sip.redial"
    redial = _check_keys(table, where, {"after_janus_restart", "interval_s", "backoff_s", "backoff_max_s",
                                        "max_tries"})
    cfg = Redial()
    cfg.after_janus_restart = _take(redial, where, "after_janus_restart", bool, cfg.after_janus_restart)
    for key in ("interval_s", "backoff_s", "backoff_max_s"):
        value = float(_take(redial, where, key, (int, float), getattr(cfg, key)))
        if not math.isfinite(value) or value < 0:
            raise BridgeConfigError(f"{where}.{key} must be a number of seconds, 0 or more, not {value}")
        setattr(cfg, key, value)
    cfg.max_tries = _take(redial, where, "max_tries", int, cfg.max_tries)
    if cfg.max_tries < 0:
        raise BridgeConfigError(f"{where}.max_tries must be 0 (no limit) or more, not {cfg.max_tries}")
    return cfg


def _strings(table: dict[str, Any], where: str, key: str) -> list[str]:
    value = _take(table, where, key, (str, list), [])
    items = [value] if isinstance(value, str) else value
    if not all(isinstance(v, str) for v in items):
        raise BridgeConfigError(f"{where}.{key} must be a string or a list of strings")
    return list(items)


def _transform_spec(spec: str, where: str) -> str:
    name, _, rest = spec.partition(":")
    if name not in TRANSFORM_NAMES:
        raise BridgeConfigError(f"{where}: unknown transform {spec!r} (one of {', '.join(TRANSFORM_NAMES)})")
    if name == "plugin" and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(:.*)?", rest):
        raise BridgeConfigError(f"{where}: {spec!r} must be plugin:MODULE:ATTR[:ARG]")
    if name == "entry" and not rest:
        raise BridgeConfigError(f"{where}: {spec!r} must be entry:NAME[:ARG]")
    return spec


def _transforms(entries: list[Any], points: list[str]) -> list[InsertedStage]:
    """``[[transform]]``: transformer specs (``video``, ``audio``), a stage ``kind`` with ``args``, or any
    ``command``, inserted ``at`` one of the layout's points (in file order: each after the one before)."""
    inserted = []
    for number, entry in enumerate(entries, 1):
        where = f"transform[{number}]"
        table = _check_keys(entry, where, {"at", "name", "video", "audio", "kind", "args", "command"})
        at = _choice(_take(table, where, "at", str, "to_sip"), f"{where}.at", tuple(points))
        name = _take(table, where, "name", str, f"transform-{number}")
        if not STAGE_NAME.fullmatch(name):
            raise BridgeConfigError(f"{where}.name must be a word of letters, digits, - and _, not {name!r}")
        video = [_transform_spec(s, f"{where}.video") for s in _strings(table, where, "video")]
        audio = [_transform_spec(s, f"{where}.audio") for s in _strings(table, where, "audio")]
        kind = _take(table, where, "kind", str, None)
        command = _take(table, where, "command", str, None)
        args = _strings(table, where, "args")
        if sum((bool(video or audio), kind is not None, command is not None)) != 1:
            raise BridgeConfigError(f"{where}: give exactly one of video/audio (transform specs), kind or command")
        if command is not None and args:
            raise BridgeConfigError(f"{where}.args are for a kind; a command carries its own")
        if video or audio:
            kind = "transformer"
            args = [a for spec in video for a in ("--video", spec)] + [a for spec in audio for a in ("--audio", spec)]
        elif kind is not None:
            from sipbridge.cli import stage_kinds  # the registry of stage kinds (cli.STAGE_COMMANDS, entry points)

            if kind not in stage_kinds() or kind == "fused":
                raise BridgeConfigError(f"{where}.kind must be a stage kind ({', '.join(sorted(stage_kinds()))}), "
                                        f"not {kind!r}")
        inserted.append(InsertedStage(at, name, kind, command, args))
    return inserted


def _stage_overrides(table: Any) -> dict[str, StageOverride]:
    if not isinstance(table, dict):
        raise BridgeConfigError("[stages] must be a table of [stages.NAME] tables")
    overrides = {}
    for name, entry in table.items():
        where = f"stages.{name}"
        t = _check_keys(entry, where, {"command", "args"})
        overrides[name] = StageOverride(_take(t, where, "command", str, None), _strings(t, where, "args"))
    return overrides


def parse_bridge(data: dict[str, Any]) -> BridgeConfig:
    _check_keys(data, "bridge file", {"room", "janus", "sip", "media", "layout", "room_side", "transform", "stages",
                                      "processes"})
    for section, value in data.items():
        _check_bounds(value, section)
    if "room" not in data:
        raise BridgeConfigError("missing section [room] (url and recipe of the room the bot joins)")
    room = _check_keys(data.get("room"), "room",
                       {"url", "recipe", "display_name", "capture", "inject", "vars", "page_video", "keep_browser"})
    if "url" not in room:
        raise BridgeConfigError("room.url is required")
    janus = _check_keys(data.get("janus", {}), "janus", {"url", "api_secret", "start"})
    sip = _check_keys(
        data.get("sip", {}),
        "sip",
        {"identity", "register", "proxy", "authuser", "secret", "call", "inbound", "accept_from", "route", "dtmf",
         "media_timeout_s", "redial", "wait_for_room_s"},
    )
    media = _check_keys(data.get("media", {}), "media", {"to_sip", "to_room"})
    layout = _check_keys(data.get("layout", {}), "layout",
                         {"mode", "max_tiles", "participants", "names", "fit", "title"})
    room_side = _check_keys(data.get("room_side", {}), "room_side", {"split"})
    cfg = BridgeConfig(room_url=_take(room, "room", "url", str, ""))
    cfg.recipe = _take(room, "room", "recipe", str, cfg.recipe)
    cfg.display_name = _take(room, "room", "display_name", str, cfg.display_name)
    cfg.capture = _choice(_take(room, "room", "capture", str, cfg.capture), "room.capture", CAPTURE_MODES)
    cfg.inject = _choice(_take(room, "room", "inject", str, cfg.inject), "room.inject", INJECT_MODES)
    cfg.page_video = _choice(_take(room, "room", "page_video", str, cfg.page_video), "room.page_video",
                             ("shown", "hidden"))
    cfg.keep_browser = _take(room, "room", "keep_browser", bool, cfg.keep_browser)
    recipe_vars = _take(room, "room", "vars", dict, {})
    if not all(isinstance(v, str) for v in recipe_vars.values()):
        raise BridgeConfigError("room.vars must be a table of strings")
    cfg.recipe_vars = dict(recipe_vars)
    cfg.janus_url = _take(janus, "janus", "url", str, cfg.janus_url)
    if not cfg.janus_url.startswith(("ws://", "wss://")):
        raise BridgeConfigError(f"janus.url must be a ws:// or wss:// URL, not {cfg.janus_url!r}")
    cfg.janus_api_secret = _secret(_take(janus, "janus", "api_secret", str, None), "janus.api_secret")
    cfg.start_janus = _take(janus, "janus", "start", bool, cfg.start_janus)
    cfg.identity = _take(sip, "sip", "identity", str, cfg.identity)
    cfg.register = _choice(_take(sip, "sip", "register", str, cfg.register), "sip.register", ("guest", "digest"))
    cfg.proxy = _take(sip, "sip", "proxy", str, None)
    cfg.authuser = _take(sip, "sip", "authuser", str, None)
    cfg.secret = _secret(_take(sip, "sip", "secret", str, None), "sip.secret")
    cfg.call = _take(sip, "sip", "call", str, None)
    cfg.inbound = _take(sip, "sip", "inbound", bool, False)
    cfg.accept_from = _take(sip, "sip", "accept_from", str, None)
    for key, value in (("identity", cfg.identity), ("call", cfg.call), ("proxy", cfg.proxy)):
        if value is not None and not value.startswith(("sip:", "sips:")):
            raise BridgeConfigError(f"sip.{key} must be a sip: URI, not {value!r}")
    if cfg.accept_from is not None:
        try:
            re.compile(cfg.accept_from)
        except re.error as exc:
            raise BridgeConfigError(f"sip.accept_from is not a valid regular expression: {exc}") from None
    if bool(cfg.call) == cfg.inbound:
        raise BridgeConfigError("give exactly one of sip.call (outbound) or sip.inbound = true")
    if cfg.inbound and cfg.accept_from is None:
        raise BridgeConfigError('sip.accept_from is required with sip.inbound = true: a regular expression on the '
                                'caller\'s URI; nobody is answered by default (".*" answers every caller)')
    if cfg.accept_from is not None and not cfg.inbound:
        raise BridgeConfigError("sip.accept_from is for inbound calls (sip.inbound = true)")
    cfg.routes = _routes(_take(sip, "sip", "route", list, []))
    cfg.dtmf = _choice(_take(sip, "sip", "dtmf", str, cfg.dtmf), "sip.dtmf", ("auto", "rfc2833", "info"))
    cfg.media_timeout_s = float(_take(sip, "sip", "media_timeout_s", (int, float), cfg.media_timeout_s))
    if cfg.media_timeout_s < 0:
        raise BridgeConfigError(f"sip.media_timeout_s must be 0 (never) or more, not {cfg.media_timeout_s}")
    cfg.wait_for_room_s = float(_take(sip, "sip", "wait_for_room_s", (int, float), cfg.wait_for_room_s))
    if not 0 < cfg.wait_for_room_s <= WAIT_FOR_ROOM_MAX_S:
        raise BridgeConfigError(f"sip.wait_for_room_s must be more than 0 and at most {WAIT_FOR_ROOM_MAX_S:g} s "
                                "(how long an outbound call waits for the bot to be in the room), not "
                                f"{cfg.wait_for_room_s}")
    if cfg.routes and not cfg.inbound:
        raise BridgeConfigError("sip.route is for inbound calls (sip.inbound = true)")
    cfg.redial = _redial(sip.get("redial", {}))
    if cfg.register == "digest" and not (cfg.proxy and cfg.secret):
        raise BridgeConfigError('sip.register = "digest" needs sip.proxy and sip.secret')
    cfg.to_sip = _leg(media.get("to_sip", {}), "media.to_sip", cfg.to_sip)
    cfg.to_room = _leg(media.get("to_room", {}), "media.to_room", MediaLeg(video_codec="none", audio_codec="opus"))
    cfg.layout = _choice(_take(layout, "layout", "mode", str, cfg.layout), "layout.mode", LAYOUTS)
    cfg.max_tiles = _take(layout, "layout", "max_tiles", int, cfg.max_tiles)
    if not 1 <= cfg.max_tiles <= 16:
        raise BridgeConfigError(f"layout.max_tiles must be 1..16, not {cfg.max_tiles}")
    participants = _take(layout, "layout", "participants", list, [])
    if not all(isinstance(p, str) for p in participants):
        raise BridgeConfigError("layout.participants must be a list of stream ids")
    cfg.participants = participants
    cfg.names = _take(layout, "layout", "names", bool, None)
    cfg.fit = _choice(_take(layout, "layout", "fit", str, cfg.fit), "layout.fit", FITS)
    cfg.title = _take(layout, "layout", "title", str, None)
    split = _take(room_side, "room_side", "split", str, None)
    if split is not None:
        match = re.fullmatch(r"([1-4])x([1-4])", split)
        if not match:
            raise BridgeConfigError(f"room_side.split must be COLSxROWS with 1..4 each, not {split!r}")
        cfg.split = (int(match[1]), int(match[2]))
    layout_points = sorted(read_layout(LAYOUT).get("insert", {}))
    cfg.transforms = _transforms(_take(data, "bridge file", "transform", list, []), layout_points)
    cfg.stages = _stage_overrides(data.get("stages", {}))
    _check_passthrough(cfg)
    processes = _check_keys(data.get("processes", {}), "processes", {"fuse", "nice"})
    cfg.nice = _take(processes, "processes", "nice", int, 0)
    if not NICE_MIN <= cfg.nice <= NICE_MAX:
        raise BridgeConfigError(f"processes.nice must be from {NICE_MIN} to {NICE_MAX}, not {cfg.nice}")
    fuse = _take(processes, "processes", "fuse", list, [])
    if not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in fuse):
        raise BridgeConfigError("processes.fuse must be a list of lists of stage names")
    cfg.fuse = [list(g) for g in fuse]
    try:
        bridge_graph(cfg)  # the inserted stages' names are free, the replaced stages exist
    except GraphError as exc:
        raise BridgeConfigError(str(exc)) from None
    return cfg


def _check_passthrough(cfg: BridgeConfig) -> None:
    """Passthrough forwards one camera's frames undecoded: only where nothing between needs its pictures."""
    inserted = [t.name for t in cfg.transforms if t.at == "to_room"]
    what = "room_side.split" if cfg.split else f"the [[transform]] at to_room ({', '.join(inserted)})"
    if cfg.inject == "encoded" and (cfg.split or inserted):
        raise BridgeConfigError(f'room.inject = "encoded" hands the SIP side\'s video to the page undecoded, but '
                                f"{what} needs its pictures: use inject = \"raw\"")
    if cfg.to_room.passthrough and not injects_encoded(cfg):
        why = 'room.inject = "raw"' if cfg.inject == "raw" else what
        raise BridgeConfigError(f"media.to_room.passthrough sends the SIP side's frames as they came, but {why} "
                                "needs them decoded")
    if not cfg.to_sip.passthrough:
        return
    problems = []
    if cfg.to_sip.video_codec != "h264":
        problems.append(f'media.to_sip.video_codec = "h264" (not {cfg.to_sip.video_codec!r})')
    if cfg.layout != "single":
        problems.append(f'layout.mode = "single" (not {cfg.layout!r}: a composite is drawn, so encoded)')
    if cfg.capture != "encoded":
        problems.append('room.capture = "encoded" (raw capture hands over pictures, already decoded)')
    inserted = [t.name for t in cfg.transforms if t.at in ("to_sip", "to_sip_composite")]
    if inserted:
        problems.append(f"no [[transform]] at to_sip or to_sip_composite (found {', '.join(inserted)}: they would "
                        "see no pictures of the passed camera)")
    if problems:
        raise BridgeConfigError("media.to_sip.passthrough needs " + "; ".join(problems))


def injects_encoded(cfg: BridgeConfig) -> bool:
    """Whether the SIP side's video reaches the bot's page encoded (``room.inject``; "auto": unless a split or a
    to_room transform needs its pictures)."""
    if cfg.inject != "auto":
        return cfg.inject == "encoded"
    return not cfg.split and not any(t.at == "to_room" for t in cfg.transforms)


def missing_secrets(cfg: BridgeConfig, environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    return [name for name in (cfg.janus_api_secret, cfg.secret) if name and name not in env]


def run_secrets(specs: list[StageSpec], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the stages' secrets are read from: ``environ`` (os.environ) plus, when a stage needs it, the
    Janus API secret generated for this run."""
    from sipbridge.janus_server import generate_api_secret

    env = dict(os.environ if environ is None else environ)
    if RUN_JANUS_SECRET_ENV not in env and any(RUN_JANUS_SECRET_ENV in s.secrets.values() for s in specs):
        env[RUN_JANUS_SECRET_ENV] = generate_api_secret()
    return env


def _grid(cfg: BridgeConfig) -> list[str]:
    """The room-side transformer's video arguments for the layout."""
    size = f"{cfg.to_sip.width}x{cfg.to_sip.height}"
    # Whatever the layout, the SIP side never goes without video: a slate (waiting for participants, the room's
    # name) at the SIP frame rate while nobody is shown, the last picture repeated while every camera stalls.
    title = cfg.title if cfg.title is not None else cfg.recipe_vars.get("room", cfg.room_url)
    paced = ["--slate-title", title, "--grid-fps", str(cfg.to_sip.fps)]
    if cfg.layout in ("active", "speaker"):
        return ["--video", f"compose:{cfg.layout}:{size}", "--slate", *paced]
    # grid and single: the room's grid (stages/transformer.py RoomGrid).
    ids = cfg.participants[:1] if cfg.layout == "single" else cfg.participants
    tiles = 1 if cfg.layout == "single" else cfg.max_tiles
    names = cfg.names if cfg.names is not None else cfg.layout == "grid"
    return [
        "--video", f"compose:grid:{size}:{tiles}" + (f":{','.join(ids)}" if ids else ""),
        "--tile-names" if names else "--no-tile-names", "--fit", cfg.fit, *paced,
    ]


class DropVideo:
    """Room-side transform for a SIP endpoint without video: nothing is scaled or encoded for it."""

    def process(self, msg: Message) -> tuple[Message, ...]:
        return () if isinstance(msg, VideoFrame) else (msg,)

    def flush(self, stream_id: str) -> tuple[Message, ...]:
        return ()


DROP_VIDEO = f"plugin:{__name__}:DropVideo"


def _janus_args(cfg: BridgeConfig) -> list[str]:
    janus_args = [
        "--janus-url",
        cfg.janus_url,
        "--identity",
        cfg.identity,
        "--register",
        cfg.register,
        "--audio-codec",
        cfg.to_sip.audio_codec,
        "--video-codec",
        cfg.to_sip.video_codec,
    ]
    if cfg.proxy:
        janus_args += ["--proxy", cfg.proxy]
    if cfg.authuser:
        janus_args += ["--authuser", cfg.authuser]
    if cfg.call:
        janus_args += ["--call", cfg.call, "--wait-for-room-s", str(cfg.wait_for_room_s)]
    else:
        assert cfg.accept_from is not None  # parse_bridge requires it for inbound
        janus_args += ["--inbound", "--accept-from", cfg.accept_from]
    janus_args += ["--dtmf-method", cfg.dtmf, "--media-timeout-s", str(cfg.media_timeout_s)]
    redial = cfg.redial
    janus_args += ["--redial-after-janus-restart" if redial.after_janus_restart else "--no-redial-after-janus-restart",
                   "--redial-s", str(redial.interval_s), "--redial-backoff-s", str(redial.backoff_s),
                   "--redial-backoff-max-s", str(redial.backoff_max_s), "--redial-max-tries", str(redial.max_tries)]
    return janus_args


def _janus_secrets(cfg: BridgeConfig) -> dict[str, str]:
    """Only the janus stage gets the secrets, in its environment (handed over by supervise.SecretBroker)."""
    secrets: dict[str, str] = {}
    if cfg.secret:
        secrets["SIPBRIDGE_STAGE_JANUS_SECRET"] = cfg.secret
    api_secret = _janus_api_secret(cfg)
    if api_secret:
        secrets["SIPBRIDGE_STAGE_JANUS_API_SECRET"] = api_secret
    return secrets


def _janus_api_secret(cfg: BridgeConfig) -> str | None:
    """Our own Janus always has a secret: the one the file names, else one generated for this run."""
    return cfg.janus_api_secret or (RUN_JANUS_SECRET_ENV if cfg.start_janus else None)


def _browser_args(cfg: BridgeConfig) -> list[str]:
    video_tracks = cfg.split[0] * cfg.split[1] if cfg.split else 1
    browser_args = [
        "--recipe",
        cfg.recipe,
        "--url",
        cfg.room_url,
        "--display-name",
        cfg.display_name,
        "--mode",
        cfg.capture,
        "--page-video",
        cfg.page_video,
        "--video-tracks",
        str(video_tracks),
        *(["--passthrough"] if cfg.to_room.passthrough else []),
        "--hwm",
        str(ENCODED_EDGE_HWM_MSGS),
    ]
    if cfg.keep_browser:
        browser_args += ["--chromium-socket", f"{{run_dir}}/{KEEPER_SOCKET_NAME}"]
    for key, value in sorted(cfg.recipe_vars.items()):
        browser_args += ["--var", f"{key}={value}"]
    if cfg.routes:
        browser_args.append("--join-on-call")
        for pattern, variables in cfg.routes:
            browser_args += ["--route", json.dumps({"match": pattern, "vars": variables})]
    return browser_args


def _sip_encoder_args(cfg: BridgeConfig) -> list[str]:
    sip_video = cfg.to_sip.video_codec
    return [
        "--video-codec",
        sip_video if sip_video != "none" else "h264",
        "--audio-codec",
        cfg.to_sip.audio_codec,
        "--width",
        str(cfg.to_sip.width),
        "--height",
        str(cfg.to_sip.height),
        "--fps",
        str(cfg.to_sip.fps),
        "--bitrate-kbps",
        str(cfg.to_sip.bitrate_kbps),
        "--preset",
        cfg.to_sip.preset,
    ]


def _room_transformer_args(cfg: BridgeConfig) -> list[str]:
    sip_rate = CODEC_AUDIO_RATE_HZ[cfg.to_sip.audio_codec]
    # An audio-only endpoint: drop the room's video before it is scaled and encoded for nothing.
    room_video = _grid(cfg) if cfg.to_sip.video_codec != "none" else ["--video", DROP_VIDEO]
    return [
        *room_video,
        "--audio",
        f"resample:{sip_rate}",
        "--audio",
        # At the SIP rate from the start: an empty room's mix sends silence before any stream came.
        f"mix:{sip_rate}",
        *(["--passthrough"] if cfg.to_sip.passthrough else []),
        "--compose-id",
        "room-video",
        "--mix-id",
        "room-audio",
    ]


# What each stage of the layout (sipbridge/pipelines/bridge.toml, its `args_from`) gets from the configuration.
ARGUMENT_BUILDERS: dict[str, Callable[[BridgeConfig], list[str]]] = {
    "browser": _browser_args,
    "sip-decoder": lambda cfg: ["--audio-rate", str(ROOM_AUDIO_RATE_HZ),
                                *(["--pass-video", "h264", "--pass-video", "vp8"] if injects_encoded(cfg) else [])],
    "janus": _janus_args,
    "sip-encoder": _sip_encoder_args,
    "room-transformer": _room_transformer_args,
    "room-decoder": lambda cfg: ["--hwm", str(ENCODED_EDGE_HWM_MSGS),
                                 *(["--pass-video", "h264-offer"] if cfg.to_sip.passthrough else [])],
}


def bridge_graph(cfg: BridgeConfig) -> Graph:
    """The graph of one bridged call: the packaged layout, its arguments from ``cfg``, then the bridge file's
    inserted stages and replaced commands."""
    graph = graph_from_data(
        read_layout(LAYOUT),
        conditions={"start_janus": cfg.start_janus, "keep_browser": cfg.keep_browser},
        builders={name: functools.partial(build, cfg) for name, build in ARGUMENT_BUILDERS.items()},
    )
    graph.stage("janus").secrets = _janus_secrets(cfg)
    api_secret = _janus_api_secret(cfg)
    if cfg.start_janus and api_secret:
        graph.stage("janus-server").secrets = {"SIPBRIDGE_JANUS_API_SECRET": api_secret}
    if cfg.split:
        # A transformer process only where it earns its hop: to split a composite into several cameras.
        graph.insert("to_room", StageSpec("sip-transformer", "transformer", live=True,
                                          args=["--video", f"split:{cfg.split[0]}x{cfg.split[1]}"]))
    for inserted in cfg.transforms:
        graph.insert(inserted.at, StageSpec(inserted.name, inserted.kind, inserted.command, list(inserted.args),
                                            live=True))
    for name, override in cfg.stages.items():
        if name not in graph.names():
            known = ", ".join(graph.names())
            raise GraphError(f"stages.{name}: the bridge has no stage {name!r} (its stages: {known})")
        if override.command is not None:
            graph.replace(name, override.command)
        graph.stage(name).args += override.args
    for group in cfg.fuse:
        graph.fuse(group)
    return graph


def bridge_stages(cfg: BridgeConfig, run_dir: Path) -> list[StageSpec]:
    """The stage processes of one bridged call (earlier entries start later and stop earlier)."""
    specs = bridge_graph(cfg).specs(run_dir)
    for spec in specs:
        spec.nice = cfg.nice
    return specs
