"""One call on a node: its configuration checked, its processes under their own supervisord, its figures.

A call is what `sipbridge up BRIDGE.toml` runs (``bridge_stages`` rendered by ``render_config``), but:
* in its own private run folder (0700, created fresh; a folder that exists is refused, never wiped), so its
  sockets, logs and supervisord never meet another call's;
* under a supervisord started in a new session (its own process group), with umask 077 (sockets and logs 0600)
  and an allow-list of the node's environment (supervise.supervisor_environment: no secret, not the API
  token); the stages that need a secret (the janus stage) get it from a SecretBroker run by the node;
* watched from the node: supervisord's process states, every stage's statistics, the SIP call's state. A call
  whose SIP call has ended (outbound), or whose stages have all ended, is stopped and its slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

import protocol
from sipbridge import supervisord
from sipbridge.bridge import BridgeConfigError, bridge_stages, missing_secrets, parse_bridge
from sipbridge.node.config import CALL_ID_LENGTH_MAX, NODE_JANUS_SECRET_ENV
from sipbridge.node.hostinfo import ProcInfo, scan_sessions, still_same
from sipbridge.supervise import (
    FINAL_STATES,
    PipelineError,
    SecretBroker,
    StageSpec,
    parse_pipeline,
    process_states,
    render_config,
    stage_secrets,
    supervisor_environment,
)

log = logging.getLogger("sipbridge.node")

SUPERVISOR_START_TIMEOUT_S = 15.0
# supervisord gives each stage STAGE_STOP_WAIT_S (15 s) to flush after SIGTERM before SIGKILL; stages stop one
# after another, so a whole call may take a few of those.
CALL_STOP_TIMEOUT_S = 45.0
HANGUP_TIMEOUT_S = 3.0
CONTROL_TIMEOUT_S = 5.0
STATS_DISCOVER_INTERVAL_S = 1.0
CALL_ID_RE = re.compile(rf"[a-z0-9][a-z0-9-]{{0,{CALL_ID_LENGTH_MAX - 1}}}")
# SIP call states after which an outbound call is over (the janus stage stays up, waiting for commands).
SIP_FINAL_STATES = {"ended", "failed", "declined", "janus_disconnected"}
DTMF_RE = re.compile(r"[0-9*#A-Da-d]{1,32}")
DTMF_DURATION_MS = (40, 2000)
# Figures the call view already shows in its own shape (the SIP call, streams, drops, errors).
BASE_FIGURES = {"pid", "streams", "drops", "errors", "call"}


class CallRequestError(ValueError):
    """A call request the node will not run; the message names the key (HTTP 400)."""


@dataclass
class CallPlan:
    """A validated call: its stages for a given run folder, and how to reach its SIP leg."""

    kind: str  # "bridge" or "pipeline"
    stages: Callable[[Path], list[StageSpec]]
    janus_stage: str | None  # name of the stage holding the SIP call, if any
    janus_control: str | None  # its --control endpoint when given, else RUN_DIR/NAME.control
    inbound: bool
    summary: dict[str, Any] = field(default_factory=dict)
    # One inbound call per pipeline (the node's SIP front started it for one INVITE): it ends with that call.
    one_call: bool = False


def plan_call(data: Any, allow_pipelines: bool, environ: dict[str, str] | None = None) -> CallPlan:
    """Check a POST /calls body: a bridge configuration (the bridge.toml schema, as JSON), or with
    ``allow_pipelines`` a [[stage]] list of project stage kinds."""
    if not isinstance(data, dict):
        raise CallRequestError("the body must be a JSON object: a bridge configuration")
    if "stage" in data:
        return _plan_pipeline(data, allow_pipelines)
    try:
        cfg = parse_bridge(data)
    except BridgeConfigError as exc:
        raise CallRequestError(str(exc)) from None
    if cfg.start_janus:
        raise CallRequestError("janus.start is for `sipbridge up`: a node's calls use a running Janus (janus.url), "
                               "each call on its own handle")
    if cfg.janus_api_secret is None and environ and NODE_JANUS_SECRET_ENV in environ:
        cfg.janus_api_secret = NODE_JANUS_SECRET_ENV  # the node's own Janus secret (janus_api_secret_file)
    missing = missing_secrets(cfg, environ)
    if missing:
        raise CallRequestError(f"environment variable(s) {', '.join(missing)} not set on this node")
    summary = {"room": cfg.room_url, "sip": cfg.call or "inbound", "to_sip": f"{cfg.to_sip.video_codec}/"
               f"{cfg.to_sip.audio_codec}"}
    return CallPlan("bridge", lambda run_dir: bridge_stages(cfg, run_dir), "janus", None, cfg.inbound, summary)


def _plan_pipeline(data: dict[str, Any], allow_pipelines: bool) -> CallPlan:
    if not allow_pipelines:
        raise CallRequestError("this node takes bridge configurations only ([[stage]] pipelines are off: "
                               "allow_pipelines)")
    unknown = set(data) - {"stage", "live"}
    if unknown:
        raise CallRequestError(f"unknown key {sorted(unknown)[0]} next to stage (a pipeline has [[stage]] and live)")
    try:
        specs = parse_pipeline(data)
    except PipelineError as exc:
        raise CallRequestError(str(exc)) from None
    from sipbridge.cli import STAGE_COMMANDS

    for spec in specs:
        # Over an API, a pipeline may only name the project's own stages: no program, no environment of its own.
        if spec.command is not None:
            raise CallRequestError(f"stage {spec.name!r}: 'command' is not accepted over the API; use a kind")
        if spec.kind not in STAGE_COMMANDS:
            raise CallRequestError(f"stage {spec.name!r}.kind must be one of {', '.join(sorted(STAGE_COMMANDS))}")
        if spec.env:
            raise CallRequestError(f"stage {spec.name!r}: 'env' is not accepted over the API")
        if spec.secrets and spec.kind != "janus":
            raise CallRequestError(f"stage {spec.name!r}: only a janus stage takes secrets")
    janus = next((s for s in specs if s.kind == "janus"), None)
    control = None
    if janus is not None and "--control" in janus.args:
        index = janus.args.index("--control") + 1
        control = janus.args[index] if index < len(janus.args) else None
    inbound = janus is not None and "--inbound" in janus.args
    summary = {"stages": [s.name for s in specs]}
    return CallPlan("pipeline", lambda run_dir: [_copy(s) for s in specs], janus.name if janus else None, control,
                    inbound, summary)


def _copy(spec: StageSpec) -> StageSpec:
    return dataclasses.replace(spec, args=list(spec.args), inputs=list(spec.inputs), env=dict(spec.env),
                               secrets=dict(spec.secrets))


class RunFolderInUse(RuntimeError):
    """The call's run folder already exists: another call (or something else) may be using it."""


def make_run_folder(run_root: Path, call_id: str) -> Path:
    """RUN_ROOT/CALL_ID, created 0700 (and RUN_ROOT 0700 too); an existing one is refused, never reused."""
    run_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if run_root.stat().st_uid != os.geteuid():
        raise RunFolderInUse(f"{run_root} belongs to another user")
    os.chmod(run_root, 0o700)  # mkdir's mode is masked by the umask, and an existing root keeps its own
    run_dir = run_root / call_id
    try:
        run_dir.mkdir(mode=0o700)
    except FileExistsError:
        raise RunFolderInUse(f"run folder {run_dir} exists: refused (it is never wiped; remove it if it is stale)")\
            from None
    os.chmod(run_dir, 0o700)
    (run_dir / "logs").mkdir(mode=0o700)
    return run_dir


class StatsFeed:
    """Every stage's latest statistics, heard on their PUB sockets in the call's run folder (asyncio)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.connected: set[Path] = set()
        self.figures: dict[str, dict[str, Any]] = {}
        self.heard_ns: dict[str, int] = {}

    def discover(self) -> None:
        for path in sorted(self.run_dir.glob("*.stats")):
            if path not in self.connected:
                self.sock.connect(f"ipc://{path}")
                self.connected.add(path)

    async def run(self) -> None:
        while True:
            parts = await self.sock.recv_multipart()
            try:
                msg = protocol.decode(parts)
            except protocol.ProtocolError:
                continue
            if isinstance(msg, protocol.Stats):
                self.figures[msg.stage] = msg.figures
                self.heard_ns[msg.stage] = time.time_ns()

    def close(self) -> None:
        self.sock.close(linger=0)


async def control_request(endpoint: str, request: dict[str, Any], timeout_s: float = CONTROL_TIMEOUT_S
                          ) -> dict[str, Any]:
    """One JSON request on a janus stage's REP control socket; TimeoutError if it does not answer."""
    sock = zmq.asyncio.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        await asyncio.wait_for(sock.send(json.dumps(request).encode()), timeout_s)
        raw = await asyncio.wait_for(sock.recv(), timeout_s)
        reply = json.loads(raw)
        return reply if isinstance(reply, dict) else {"ok": False, "error": "reply is not a JSON object"}
    finally:
        sock.close(linger=0)


class Call:
    """One call's processes and figures. States: starting, running, stopping, ended."""

    def __init__(self, call_id: str, plan: CallPlan, run_root: Path, environ: dict[str, str]) -> None:
        self.id = call_id
        self.plan = plan
        self.run_root = run_root
        self.run_dir = run_root / call_id
        self.environ = environ
        self.state = "starting"
        self.created = time.time()
        self.since = self.created
        self.end_reason: str | None = None
        self.error: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.states: dict[str, dict[str, Any]] = {}
        self.stats: StatsFeed | None = None
        self.processes: list[ProcInfo] = []  # the call's live processes at the last scan (node's sampler)
        self.cpu_cores = 0.0
        self.memory_bytes = 0
        self.weighed_pids: frozenset[int] = frozenset()  # the processes memory_bytes was summed over
        self.ended = asyncio.Event()
        self.broker: SecretBroker | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Task[None] | None = None

    # ----- life cycle --------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()
            log.info("call %s: %s%s", self.id, state, f" ({self.end_reason})" if state == "ended" else "")

    @property
    def session(self) -> int | None:
        """The session id of the call's processes (its supervisord's pid)."""
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        """Create the run folder, start supervisord, wait until it answers; then watch it in the background."""
        self.run_dir = make_run_folder(self.run_root, self.id)
        specs = self.plan.stages(self.run_dir)
        conf = self.run_dir / "supervisord.conf"
        conf.write_text(render_config(specs, self.run_dir))
        os.chmod(conf, 0o600)
        try:
            secrets = stage_secrets(specs, self.environ)
        except PipelineError as exc:
            raise RuntimeError(str(exc)) from None
        # supervisord (and so every program) sees an allow-list of the node's environment, never a secret: the
        # stages that need one (the janus stage) get it from the broker, to their own process only.
        secret_names = {source for spec in specs for source in spec.secrets.values()}
        env = {**supervisor_environment(self.environ, secret_names), "SIPBRIDGE_RUN_DIR": str(self.run_dir),
               "SIPBRIDGE_PYTHON": sys.executable}
        if secrets:
            run_dir = self.run_dir
            self.broker = SecretBroker(run_dir, secrets, lambda name: (process_states(run_dir).get(name) or {})
                                       .get("pid") or None)
            self.broker.start()
        with open(self.run_dir / "logs" / "supervisord.stderr", "wb") as stderr:
            # A new session: the call is its own process group, and a signal meant for the node (a terminal's
            # Ctrl-C) does not reach its stages; the node stops them in order. umask 077: sockets and logs 0600.
            self.proc = subprocess.Popen(supervisord.command(conf), env=env, cwd=self.run_dir,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                         start_new_session=True, umask=0o077)
        deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT_S
        while True:
            if self._stopping is not None:
                return  # stopped (DELETE, drain) while starting: the stop takes it from here
            states = await asyncio.to_thread(process_states, self.run_dir)
            if states:
                self.states = states
                break
            if self.proc.poll() is not None:
                err = (self.run_dir / "logs" / "supervisord.stderr").read_text(errors="replace").strip()
                raise RuntimeError(f"supervisord exited at start ({self.proc.returncode}): {err[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("supervisord did not answer on its socket")
            await asyncio.sleep(0.1)
        self.stats = StatsFeed(self.run_dir)
        self._tasks = [asyncio.create_task(self.stats.run(), name=f"stats-{self.id}"),
                       asyncio.create_task(self._watch(), name=f"watch-{self.id}")]
        self._set_state("running")

    async def _watch(self) -> None:
        """Follow supervisord and the SIP call; stop the call when it is over."""
        try:
            await self._follow()
        except Exception as exc:  # a bug here must not leave a call running unwatched, holding its slot
            log.exception("call %s: watching it failed; stopping it", self.id)
            self.error = f"node could not watch the call: {type(exc).__name__}: {exc}"
            self._spawn_stop("failed")

    async def _follow(self) -> None:
        while self.state in ("starting", "running"):
            assert self.stats is not None and self.proc is not None
            self.stats.discover()
            if self.proc.poll() is not None:
                self.error = f"supervisord exited ({self.proc.returncode})"
                self._spawn_stop("supervisor_exited")
                return
            states = await asyncio.to_thread(process_states, self.run_dir)
            if states:
                self.states = states
            fatal = sorted(n for n, p in self.states.items() if p["statename"] == "FATAL")
            if fatal:
                # supervisord gave up restarting it: the call cannot work; free its slot.
                self.error = f"stage(s) failed: {', '.join(fatal)} (FATAL: kept crashing)"
                self._spawn_stop("failed")
                return
            if self.states and all(p["statename"] in FINAL_STATES for p in self.states.values()):
                failed = [n for n, p in self.states.items() if p["statename"] == "FATAL" or p.get("exitstatus")]
                if failed:
                    self.error = f"stage(s) failed: {', '.join(sorted(failed))}"
                self._spawn_stop("failed" if failed else "completed")
                return
            sip = self.sip()
            if sip and (self.plan.one_call or not self.plan.inbound) and sip.get("state") in SIP_FINAL_STATES:
                if sip.get("not_placed"):
                    # No INVITE went out: the bot was not in the room within sip.wait_for_room_s (the reason says why).
                    self.error = str(sip.get("reason", "not placed"))
                    self._spawn_stop("not_placed")
                    return
                if sip.get("state") != "ended":
                    # What the submitter reads: the SIP code and reason (486 Busy Here, 404 Not Found, ...).
                    self.error = " ".join(str(p) for p in ("SIP", sip.get("state"), sip.get("code"), sip.get("reason"))
                                          if p)
                self._spawn_stop("sip_failed" if sip.get("state") != "ended" else "sip_ended")
                return
            await asyncio.sleep(STATS_DISCOVER_INTERVAL_S)

    def _spawn_stop(self, reason: str) -> None:
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(reason), name=f"stop-{self.id}")

    async def stop(self, reason: str) -> None:
        """Hang up, let every stage flush, stop supervisord; returns once every process of the call is gone."""
        self._spawn_stop(reason)
        await self.ended.wait()

    async def _stop(self, reason: str) -> None:
        self.end_reason = reason
        self._set_state("stopping")
        try:
            sip = self.sip()
            endpoint = self.control_endpoint()
            if endpoint and sip and sip.get("state") not in SIP_FINAL_STATES:
                # The janus stage also hangs up when it is stopped; asking first makes the BYE leave before any
                # stage upstream of it stops feeding it.
                with contextlib.suppress(TimeoutError, zmq.ZMQError, ValueError):
                    await control_request(endpoint, {"cmd": "hangup"}, HANGUP_TIMEOUT_S)
            await self._stop_processes()
        finally:
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            if self.stats is not None:
                self.stats.close()
            if self.broker is not None:
                self.broker.close()
            self._set_state("ended")
            self.ended.set()

    async def _stop_processes(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.states = await asyncio.to_thread(process_states, self.run_dir) or self.states
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # supervisord stops every stage (SIGTERM, then SIGKILL after a wait)
            deadline = time.monotonic() + CALL_STOP_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                log.warning("call %s: supervisord did not stop within %.0f s; killing it", self.id,
                            CALL_STOP_TIMEOUT_S)
                proc.kill()
                await asyncio.to_thread(proc.wait)
        # Whatever outlived supervisord in the call's session (a stage's orphaned child) goes too: they keep
        # the session id, which is supervisord's pid.
        leftovers = await asyncio.to_thread(scan_sessions, {proc.pid})
        for info in leftovers[proc.pid]:
            if still_same(info):
                log.warning("call %s: pid %d outlived supervisord; killing it", self.id, info.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(info.pid, signal.SIGKILL)

    # ----- figures -----------------------------------------------------------------------------
    def figures(self) -> dict[str, dict[str, Any]]:
        return self.stats.figures if self.stats is not None else {}

    def sip(self) -> dict[str, Any] | None:
        """The SIP call as the janus stage reports it (state, code, reason, codecs, peer), or None."""
        name = self.plan.janus_stage
        call = self.figures().get(name, {}).get("call") if name else None
        return call if isinstance(call, dict) else None

    def control_endpoint(self) -> str | None:
        if self.plan.janus_stage is None:
            return None
        return self.plan.janus_control or f"ipc://{self.run_dir}/{self.plan.janus_stage}.control"

    def stage_view(self, detail: bool) -> dict[str, dict[str, Any]]:
        view: dict[str, dict[str, Any]] = {}
        figures = self.figures()
        for name in sorted(set(self.states) | set(figures)):
            info = self.states.get(name, {})
            fig = figures.get(name, {})
            streams = fig.get("streams", {}) if isinstance(fig.get("streams"), dict) else {}
            p50 = [s["latency_ms_p50"] for s in streams.values() if s.get("latency_ms_p50") is not None]
            p95 = [s["latency_ms_p95"] for s in streams.values() if s.get("latency_ms_p95") is not None]
            row: dict[str, Any] = {
                "process": info.get("statename"),
                "pid": info.get("pid") or None,
                "exit": info.get("exitstatus") if info.get("statename") in FINAL_STATES else None,
                "frames_in": sum(int(s.get("frames_in", 0)) for s in streams.values()),
                "frames_out": sum(int(s.get("frames_out", 0)) for s in streams.values()),
                "fps_in": round(sum(float(s.get("fps_in", 0.0)) for s in streams.values()), 2),
                "latency_ms_p50": max(p50) if p50 else None,
                "latency_ms_p95": max(p95) if p95 else None,
                "drops": dict(fig.get("drops", {})),
                "errors": dict(fig.get("errors", {})),
            }
            if isinstance(fig.get("state"), str):
                row["stage_state"] = fig["state"]
            if detail:
                row["streams"] = streams
                # The rest of the stage's figures (backlogs, keyframe requests, the janus stage's counters).
                row["extra"] = {k: v for k, v in fig.items() if k not in BASE_FIGURES}
            view[name] = row
        return view

    def view(self, detail: bool = False) -> dict[str, Any]:
        sip = self.sip()
        return {
            "id": self.id,
            "kind": self.plan.kind,
            "state": self.state,
            "since": self.since,
            "created": self.created,
            "end_reason": self.end_reason,
            "error": self.error,
            "summary": self.plan.summary,
            "sip": None if sip is None else {k: sip.get(k) for k in (
                "state", "code", "reason", "direction", "peer", "audio_codec", "video_codec", "call_id",
                "media_up_ns", "ended_ns", "not_placed")},
            "cpu_cores": round(self.cpu_cores, 3),
            "memory_bytes": self.memory_bytes,
            "stages": self.stage_view(detail),
            **({"run_dir": str(self.run_dir)} if detail else {}),
        }
