"""One bridged call run locally in a private network namespace: the harness of the demo, tests and benchmarks.

``LocalCall`` sets up everything one bridged call needs on this machine, inside a fresh namespace (root):
Janus (project configuration), the local room (``sipbridge room serve``) with synthetic participants, a sipp
SIP peer that echoes RTP (or answers like a legacy endpoint), a tshark capture of the SIP leg, a viewer page
that reports what the room receives back, and the bridge stages of a generated bridge configuration under
supervisord. The demo (``sipbridge demo``), the end-to-end tests and the bridge benchmark all use it.

What is checked comes from outside the bridge: the SIP leg's codecs and frames from the capture
(``sipbridge.testing.capture``), the room side from a participant page that reads the frame counters out of the
pixels it receives, lip sync from marks in the participants' media (``sipbridge.testing.lipsync``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import click

from sipbridge.lifetime import die_with_parent

# Children run from this interpreter: `make demo` uses .venv/bin/sipbridge, whose directory may not be on PATH.
SIPBRIDGE = [sys.executable, "-m", "sipbridge"]
ROOM_HTTP_PORT = 8480
SIP_PEER_PORT = 5090
SIP_PEER_MEDIA_PORT = 6000  # audio; video on +2 (sipp's -rtp_echo convention)
# sipp scenarios: the harness's own (package data, present when installed), then a checkout's tests/sipp/.
SIPP_DIR = Path(str(resources.files("sipbridge.testing") / "sipp"))
CHECKOUT_SIPP_DIR = Path(__file__).resolve().parents[2] / "tests" / "sipp"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# Participants' Chromium start and join: ~3 s on a quiet machine, over 40 s at a load average of 30+ on 2 cores
# (measured); a deadline costs nothing when they are quick.
JOIN_TIMEOUT_S = 120.0
# From the bridge's start to the first echoed frame in the room: ~10 s on a quiet machine, 40-90 s measured at a
# load average of 30-50 on 2 cores (the bot's Chromium starts and joins late).
MEDIA_START_TIMEOUT_S = 150.0
# The call waits for the bot to be in the room as long as the harness waits for media (the bot's start and join
# took 70 s at a load average of 45 here).
WAIT_FOR_ROOM_S = MEDIA_START_TIMEOUT_S
BOT_NAME = "bot"
VIEWER_NAME = "viewer"
GENERATORS = ("chromium", "aiortc")
# The first aiortc participants on a machine encode their loop before joining (cached afterwards).
LOOP_ENCODE_ALLOWANCE_S = 90.0
PROBE_PREFIX = "SBPROBE "
# The local Janus has an API secret like any project Janus; the bridge file names it as env:THIS, which the harness
# sets in its own environment while the call runs (supervisord never sees it: its name says secret; the secret
# broker hands it to the janus stage alone). The room server reads it from Janus's 0600 file for its pages.
JANUS_SECRET_ENV = "SIPBRIDGE_LOCAL_JANUS_API_SECRET"


def sipp_scenario(name: str) -> Path:
    """The sipp scenario ``name`` (``uas_echo`` or ``uas_echo.xml``): the harness's, else a checkout's tests/sipp/."""
    filename = name if name.endswith(".xml") else f"{name}.xml"
    for folder in (SIPP_DIR, CHECKOUT_SIPP_DIR):
        if (folder / filename).is_file():
            return folder / filename
    raise FileNotFoundError(f"sipp scenario {filename}: not in {SIPP_DIR} nor {CHECKOUT_SIPP_DIR}")


@dataclass
class CallOptions:
    """What one local bridged call looks like."""

    room: int = 1234
    participants: list[tuple[str, float]] = field(default_factory=lambda: [("alice", 440.0), ("bob", 660.0)])
    room_codec: str = "vp8"  # what the participants publish
    participant_size: str = "320x240"
    participant_fps: int = 15
    capture: str = "encoded"
    inject: str = "auto"  # [room] inject: "encoded" hands the SIP side's video to the bot's page undecoded
    page_video: str = "shown"  # the bot page's video elements: "hidden" is not displayed
    sip_scenario: str = "uas_echo"  # a scenario for ``sipp_scenario`` (echoes with -rtp_echo)
    # Return the bridge's keyframe requests to it (rtcpecho.py), as a peer that honours them would answer with a
    # keyframe: sipp echoes RTP only.
    rtcp_echo: bool = True
    # Calls the SIP peer takes before it exits: more than one when the bridge may dial again (after a Janus
    # restart the re-dialled call is a second call: the first never got its BYE).
    sip_calls: int = 1
    sip_video: str = "h264"
    sip_audio: str = "pcmu"
    width: int = 640
    height: int = 480
    fps: int = 15
    bitrate_kbps: int = 800
    # [media.to_sip] passthrough: the shown participant's H.264 goes to the SIP side as it came (layout single).
    passthrough: bool = False
    # [media.to_room] passthrough: the SIP side's H.264 goes into the room as it came (the bot's Chromium encodes a
    # placeholder whose frames the page replaces).
    room_passthrough: bool = False
    layout: str = "grid"
    max_tiles: int = 2
    split: str | None = "2x1"
    layout_ids: list[str] = field(default_factory=list)  # stream ids in tile order (default: order of arrival)
    stagger_s: float = 0.0  # > 0: each participant joins alone (own process), this long after the previous one
    fps_of: dict[str, int] = field(default_factory=dict)  # per-participant frame rate (with stagger_s > 0)
    # A receive-only page: the local room's publish=0 page never reaches its "load" event (room leg, being
    # fixed), so by default the first participant's probe reports what the room receives back.
    viewer: bool = False
    # Lip-sync marks in the participants' media (synthetic.js), found again at the SIP peer and in the room.
    sync_marks: bool = False
    snapshot_dir: Path | None = None
    # Who simulates the room: "chromium" (a page per participant) or "aiortc" (browserless publishers sending a loop
    # encoded once, and a browserless viewer: sipbridge/room/cheap.py), so that a small machine measures the bridge
    # rather than its simulation. aiortc publishers receive nothing: the viewer then reports what the room gets.
    generators: str = "chromium"
    # More bridge file, appended as it is (e.g. [[transform]] tables: tests/test_overlay.py).
    bridge_extra: str = ""

    def __post_init__(self) -> None:
        if self.generators not in GENERATORS:
            raise ValueError(f"generators must be one of {', '.join(GENERATORS)}, not {self.generators!r}")
        if self.generators == "aiortc":
            self.viewer = True

    def grid(self) -> tuple[int, int]:
        """Columns and rows of the composite the SIP side receives."""
        cols = 1
        while cols * cols < self.max_tiles:
            cols += 1
        return cols, -(-self.max_tiles // cols)

    def bridge_toml(self) -> str:
        split = f'split = "{self.split}"' if self.split else ""
        return f"""# generated by sipbridge.testing
[room]
url = "http://127.0.0.1:{ROOM_HTTP_PORT}/"
recipe = "local-room"
display_name = "{BOT_NAME}"
capture = "{self.capture}"
inject = "{self.inject}"
page_video = "{self.page_video}"
vars = {{ room = "{self.room}", codec = "h264" }}

[janus]
url = "ws://127.0.0.1:8188"
api_secret = "env:{JANUS_SECRET_ENV}"

[sip]
identity = "sip:bridge@127.0.0.1"
register = "guest"
wait_for_room_s = {WAIT_FOR_ROOM_S}
call = "sip:echo@127.0.0.1:{SIP_PEER_PORT}"

[media.to_sip]
video_codec = "{self.sip_video}"
audio_codec = "{self.sip_audio}"
width = {self.width}
height = {self.height}
fps = {self.fps}
bitrate_kbps = {self.bitrate_kbps}
passthrough = {str(self.passthrough).lower()}

[media.to_room]
passthrough = {str(self.room_passthrough).lower()}

[layout]
mode = "{self.layout}"
max_tiles = {self.max_tiles}
participants = {json.dumps(self.layout_ids or [f"{name}/video" for name, _ in self.participants])}
# Counters and lip-sync marks are read at fixed places: each participant pinned to a tile (a grid that follows the
# room would show the first to arrive full frame for a moment), pictures filling their cells up to the edges.
fit = "stretch"

[room_side]
{split}
{self.bridge_extra}"""


def udp_ports() -> set[int]:
    """UDP ports bound in the caller's network namespace."""
    out = subprocess.run(["ss", "-lunH"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def wait_until(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Signal a child's process group (each child runs in its own session), escalate to SIGKILL."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (Chromium children)


class ProbeLines:
    """JSON lines of participant processes (their probes' reports), each stamped with its arrival time ``t``."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError), self._lock:
                    self.records.append({**json.loads(line), "t": time.monotonic()})

    def matching(self, **want: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if all(r.get(k) == v for k, v in want.items())]


class LocalCall:
    """One bridged call on this machine. Use as a context manager; everything is torn down on exit."""

    def __init__(self, run_dir: Path, options: CallOptions | None = None, *, own_netns: bool = True) -> None:
        self.run_dir = run_dir.resolve()
        self.options = options or CallOptions()
        self.own_netns = own_netns
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stack = contextlib.ExitStack()
        self.ns: Any = None
        self.janus: Any = None
        self.supervisor: Any = None
        self.participants: ProbeLines | None = None
        self.viewer: ProbeLines | None = None
        self.pcap = self.run_dir / "sip-leg.pcapng"
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SIPBRIDGE_RUN_DIR": str(self.run_dir),
            "SIPBRIDGE_PYTHON": sys.executable,
        }

    # ----- set-up ---------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalCall:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(
        self, name: str, argv: list[str], *, pipe: bool = False, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / "logs" / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(
            die_with_parent(argv),  # a test killed by its timeout leaves no room, peer or capture running
            stdout=subprocess.PIPE if pipe else log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=cwd or self.run_dir,
            start_new_session=True,
        )
        self.stack.callback(log.close)
        self.procs[name] = proc
        return proc

    def start(self) -> None:
        from sipbridge import netns as netns_mod
        from sipbridge.janus_server import JanusConfig, JanusServer, generate_api_secret

        # A fresh run directory: stale sockets or statistics endpoints of an earlier run would mislead.
        shutil.rmtree(self.run_dir, ignore_errors=True)
        (self.run_dir / "logs").mkdir(parents=True)
        if self.own_netns:
            if os.geteuid() != 0:
                raise click.ClickException("the local bridged call needs root (it creates a network namespace)")
            netns_mod.cleanup_stale()
            self.ns = netns_mod.NetNs().create()
            self.stack.callback(self.ns.delete)
            # This thread (and every child and thread it starts from now on) lives in the namespace.
            self.stack.enter_context(self.ns.entered())
        secret = generate_api_secret()
        self.janus = JanusServer(JanusConfig(api_secret=secret), work_dir=self.run_dir / "janus").start()
        self.stack.callback(self.janus.stop)
        os.environ[JANUS_SECRET_ENV] = secret
        self.stack.callback(lambda: os.environ.pop(JANUS_SECRET_ENV, None))
        self._spawn(
            "room-server", [*SIPBRIDGE, "room", "serve", "--port", str(ROOM_HTTP_PORT), "--janus", self.janus.ws_url,
                            "--janus-secret-file", str(self.janus.api_secret_file)]
        )
        wait_until(self._room_healthy, START_TIMEOUT_S, "room server")
        self._start_sip_peer()
        self._start_capture()
        opts = self.options
        self.participants = ProbeLines()
        groups = [[p] for p in opts.participants] if opts.stagger_s > 0 else [list(opts.participants)]
        self._start_participants(groups[0], "participants", viewer=opts.viewer)
        self._start_bridge()
        for group in groups[1:]:
            time.sleep(opts.stagger_s)
            self._start_participants(group, f"participants-{group[0][0]}", viewer=False)

    def _start_participants(self, group: list[tuple[str, float]], name: str, *, viewer: bool) -> None:
        opts = self.options
        argv = [*SIPBRIDGE, "room", "participant", "--room-url", f"http://127.0.0.1:{ROOM_HTTP_PORT}/",
                "--room", str(opts.room), "--codec", opts.room_codec, "--size", opts.participant_size,
                "--fps", str(opts.fps_of.get(group[0][0], opts.participant_fps)), "--probe"]  # fmt: skip
        for person, tone in group:
            argv += ["--name", person, "--tone", str(tone)]
        if opts.sync_marks:
            argv += ["--sync-marks"]
        if viewer:
            argv += ["--viewer", VIEWER_NAME]
        if opts.generators != "chromium":
            argv += ["--engine", opts.generators]
        proc = self._spawn(name, argv, pipe=True)
        assert self.participants is not None
        self.participants.add(proc)
        names = [person for person, _ in group] + ([VIEWER_NAME] if viewer else [])
        lines = self.participants

        def joined() -> bool:
            done = {r.get("participant") for r in lines.matching(event="joined")}
            return set(names) <= done or proc.poll() is not None

        allowance = LOOP_ENCODE_ALLOWANCE_S if opts.generators == "aiortc" else 0.0
        wait_until(joined, JOIN_TIMEOUT_S + allowance, f"{', '.join(names)} joining")
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited; see {self.run_dir}/logs/{name}.log")

    def _room_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ROOM_HTTP_PORT}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def _start_sip_peer(self) -> None:
        scenario = sipp_scenario(self.options.sip_scenario)
        sipp_dir = self.run_dir / "sipp"
        sipp_dir.mkdir(exist_ok=True)
        argv = [
            "sipp",
            "-sf",
            str(scenario),
            "-i",
            "127.0.0.1",
            "-p",
            str(SIP_PEER_PORT),
            "-mi",
            "127.0.0.1",
            "-mp",
            str(SIP_PEER_MEDIA_PORT),
            "-m",
            str(self.options.sip_calls),
            "-nostdin",
            "-rtp_echo",
            "-trace_msg",
            "-trace_err",
        ]
        proc = self._spawn("sipp", argv, cwd=sipp_dir)
        wait_until(lambda: SIP_PEER_PORT in udp_ports() or proc.poll() is not None, START_TIMEOUT_S, "sipp to listen")
        if proc.poll() is not None:
            raise RuntimeError(f"sipp exited at start; see {self.run_dir}/logs/sipp.log")
        if self.options.rtcp_echo:
            rtcp_ports = [SIP_PEER_MEDIA_PORT + 1, SIP_PEER_MEDIA_PORT + 3]  # next to sipp's audio and video
            echo = self._spawn("rtcpecho", [sys.executable, "-m", "sipbridge.testing.rtcpecho", "127.0.0.1",
                                            *map(str, rtcp_ports)])
            wait_until(lambda: set(rtcp_ports) <= set(udp_ports()) or echo.poll() is not None, START_TIMEOUT_S,
                       "the RTCP echo to listen")
            if echo.poll() is not None:
                raise RuntimeError(f"the RTCP echo exited at start; see {self.run_dir}/logs/rtcpecho.log")

    def _start_capture(self) -> None:
        ports = f"udp port {SIP_PEER_PORT} or udp portrange {SIP_PEER_MEDIA_PORT}-{SIP_PEER_MEDIA_PORT + 3}"
        proc = self._spawn("tshark", ["tshark", "-q", "-i", "lo", "-f", ports, "-w", str(self.pcap)])
        log_path = self.run_dir / "logs" / "tshark.log"
        wait_until(
            lambda: b"Capturing on" in log_path.read_bytes() or proc.poll() is not None,
            START_TIMEOUT_S,
            "tshark to capture",
        )

    def _start_bridge(self) -> None:
        from sipbridge.bridge import bridge_stages, parse_bridge
        from sipbridge.supervise import Supervisor, render_config, stage_secrets

        text = self.options.bridge_toml()
        (self.run_dir / "bridge.toml").write_text(text)
        import tomllib

        specs = bridge_stages(parse_bridge(tomllib.loads(text)), self.run_dir)
        conf = self.run_dir / "supervisord.conf"
        conf.write_text(render_config(specs, self.run_dir))
        os.environ["SIPBRIDGE_RUN_DIR"] = str(self.run_dir)
        os.environ["SIPBRIDGE_PYTHON"] = sys.executable
        # The janus stage's Janus API secret reaches it through the secret broker, as with `sipbridge up`.
        self.supervisor = Supervisor(conf, self.run_dir, secrets=stage_secrets(specs),
                                     secret_names={source for spec in specs for source in spec.secrets.values()})
        self.supervisor.start()
        self.stack.callback(self.stop_bridge)

    def stop_bridge(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None

    def close(self) -> None:
        """Stop in reverse order: bridge (hangs up: BYE to sipp), participants, sipp, capture, room, Janus, netns."""
        self.stop_bridge()
        for name in [n for n in self.procs if n.startswith("participants")] + ["sipp", "room-server"]:
            _stop(self.procs.get(name))
        _stop(self.procs.get("tshark"), signal.SIGINT)
        self.stack.close()

    # ----- while it runs ------------------------------------------------------------------------------------
    @property
    def sync_observer(self) -> str:
        """Whose page measures lip sync: it must receive the first participant directly (the baseline) as well as
        the bot: the viewer, else the second participant."""
        if self.options.viewer or len(self.options.participants) < 2:
            return VIEWER_NAME
        return self.options.participants[1][0]

    @property
    def observer(self) -> str:
        """The participant whose probe reports what the room receives from the bot."""
        return VIEWER_NAME if self.options.viewer else self.options.participants[0][0]

    def stage_log(self, name: str, tail: int = 40) -> str:
        path = self.run_dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:]) if path.exists() else "(no log)"

    def room_received(self, track: int = 1) -> list[int]:
        """Counters the viewer read from the bot's ``track``-th camera (1-based)."""
        assert self.participants is not None
        source = BOT_NAME if track == 1 else f"{BOT_NAME}#{track}"
        records = self.participants.matching(event="received", participant=self.observer, **{"from": source})
        return [c for r in records for c in r.get("counters", [])]

    def room_tones(self, track_source: str = BOT_NAME) -> list[float]:
        """Every tone estimate the observer's page reported for ``track_source``'s audio, in order."""
        assert self.participants is not None
        records = self.participants.matching(event="received", participant=self.observer, **{"from": track_source})
        return [float(r["tone_hz"]) for r in records if r.get("tone_hz") is not None]

    def room_tone(self, track_source: str = BOT_NAME) -> float | None:
        tones = self.room_tones(track_source)
        return tones[-1] if tones else None

    def sipp_finished(self) -> bool:
        proc = self.procs.get("sipp")
        return proc is None or proc.poll() is not None
