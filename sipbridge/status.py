"""Live figures of every stage in a run directory, from their statistics PUB sockets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import zmq
from rich.table import Table

import protocol

HEARTBEAT_STALE_S = 3.0


class StatusCollector:
    """Subscribes to every ``*.stats`` endpoint in the run directory and keeps the latest figures."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.connected: set[Path] = set()
        self.figures: dict[str, dict[str, Any]] = {}
        self.heartbeats: dict[str, float] = {}
        self.errors: dict[str, protocol.ErrorReport] = {}

    def discover(self) -> None:
        for path in sorted(self.run_dir.glob("*.stats")):
            if path not in self.connected:
                self.sock.connect(f"ipc://{path}")
                self.connected.add(path)

    def poll(self, duration_s: float) -> None:
        self.discover()
        deadline = time.monotonic() + duration_s
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(remaining * 1000) + 1):
                continue
            try:
                msg = protocol.decode(self.sock.recv_multipart())
            except protocol.ProtocolError:
                continue
            if isinstance(msg, protocol.Stats):
                self.figures[msg.stage] = msg.figures
            elif isinstance(msg, protocol.Heartbeat):
                self.heartbeats[msg.stage] = time.time()
            elif isinstance(msg, protocol.ErrorReport):
                self.errors[msg.stage] = msg

    def close(self) -> None:
        self.sock.close()


def progress_line(collector: StatusCollector, states: dict[str, dict[str, Any]]) -> str:
    """One line per refresh for a pipeline running in the foreground (`up`, the demo): each stage's process state,
    frames and drops."""
    parts = []
    for stage in sorted(set(states) | set(collector.figures)):
        figures = collector.figures.get(stage, {})
        streams = figures.get("streams", {})
        frames = sum(s.get("frames_in", 0) or s.get("frames_out", 0) for s in streams.values())
        drops = sum(figures.get("drops", {}).values())
        state = states.get(stage, {}).get("statename", "?")
        parts.append(f"{stage}[{state.lower()}] {frames} fr" + (f" {drops} drop" if drops else ""))
    return " | ".join(parts)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def inbound_uri(figures: dict[str, dict[str, Any]]) -> str | None:
    """The SIP URI callers dial, as an inbound janus stage reports it (``registration.contact``: its Janus SIP
    handle's own address, learnt after registering), or None."""
    for _, fig in sorted(figures.items()):
        registration = fig.get("registration")
        if isinstance(registration, dict) and isinstance(registration.get("contact"), str):
            return str(registration["contact"])
    return None


def call_summary(figures: dict[str, dict[str, Any]], now_ns: int | None = None) -> str | None:
    """One line on the SIP call from the janus stage's figures (any stage reporting a ``call``), or None."""
    now_ns = now_ns or time.time_ns()
    for stage, fig in sorted(figures.items()):
        call = fig.get("call")
        registration = fig.get("registration")
        if not isinstance(call, dict) or "state" not in call:
            if isinstance(registration, dict) and registration.get("state"):
                contact = registration.get("contact")
                dial = f"; callers dial {contact}" if isinstance(contact, str) else ""
                return f"no call ({stage}: SIP {registration['state']}{dial})"
            continue
        parts = [f"call {call.get('call_id', '?')}: {call['state']}"]
        if call.get("peer"):
            parts.append(f"{call.get('direction', '')} {call['peer']}".strip())
        codecs = [c for c in (call.get("audio_codec"), call.get("video_codec")) if c]
        if codecs:
            parts.append("/".join(codecs))
        if call.get("code"):
            parts.append(f"SIP {call['code']} {call.get('reason', '')}".strip())
        elif call.get("reason"):
            parts.append(str(call["reason"]))
        up_ns = call.get("media_up_ns") or call.get("accepted_ns")
        if up_ns and not call.get("ended_ns"):
            parts.append(f"up {(now_ns - int(up_ns)) / 1e9:.0f} s")
        return ", ".join(parts)
    return None


# Below this many terminal columns the table drops the stream count and codec-thread time, abbreviates counts
# (12.3k) and loses its vertical rules, so an 80-column terminal shows every stage name whole.
NARROW_WIDTH = 110


def _count(value: int, narrow: bool) -> str:
    if not narrow or value < 10_000:
        return str(value)
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if value >= size:
            scaled = value / size
            return f"{scaled:.1f}{unit}" if scaled < 100 else f"{scaled:.0f}{unit}"
    return str(value)


def render(collector: StatusCollector, states: dict[str, dict[str, Any]], width: int | None = None) -> Table:
    """The status table; ``width`` is the terminal's (narrow terminals get the compact form, names never cut)."""
    from rich import box

    narrow = width is not None and width < NARROW_WIDTH
    call = call_summary(collector.figures)
    contact = inbound_uri(collector.figures)
    if call and contact and contact not in call:
        call += f"\ninbound: callers dial {contact}"
    stages = sorted(set(collector.figures) | set(states))
    table = Table(title=f"sipbridge pipeline in {collector.run_dir}", expand=False,
                  caption=call or "no SIP stage reporting", box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
                  pad_edge=not narrow)
    # Two stages may differ only at the end of their names (room-decoder, room-transformer): never cut one.
    table.add_column("stage", no_wrap=True, min_width=max((len(s) for s in stages), default=5))
    table.add_column("state", overflow="fold")
    columns = (["in", "out", "fps", "lat ms", "drops", "err", "beat"] if narrow else
               ["streams", "in", "out", "fps", "lat p50 ms", "proc p50 ms", "drops", "errors", "heartbeat"])
    for column in columns:
        table.add_column(column, no_wrap=True, justify="right" if narrow else "left")
    now = time.time()
    for stage in stages:
        figures = collector.figures.get(stage, {})
        streams = figures.get("streams", {})
        frames_in = sum(s.get("frames_in", 0) for s in streams.values())
        frames_out = sum(s.get("frames_out", 0) for s in streams.values())
        fps = sum(s.get("fps_in", 0.0) for s in streams.values())
        latencies = [s["latency_ms_p50"] for s in streams.values() if s.get("latency_ms_p50") is not None]
        latency = _fmt(max(latencies) if latencies else None, 0 if narrow else 1)
        drops = sum(figures.get("drops", {}).values())
        errors = sum(figures.get("errors", {}).values())
        beat = collector.heartbeats.get(stage)
        age = (f"{now - beat:.1f}s" if narrow else f"{now - beat:.1f}s ago") if beat else "-"
        if beat and now - beat > HEARTBEAT_STALE_S:
            age = f"[red]{age}[/red]"
        state = states.get(stage, {}).get("statename", "?")
        if isinstance(figures.get("state"), str):
            # The stage's own, e.g. the bot: joined, waiting_for_call.
            # Narrow: words, so the column wraps between them.
            own = str(figures["state"])
            state = f"{state.lower()} {own.replace('_', ' ')}" if narrow else f"{state} · {own}"
        elif narrow:
            state = state.lower()
        if narrow:
            table.add_row(stage, state, _count(frames_in, True), _count(frames_out, True), _fmt(fps, 0), latency,
                          _count(drops, True), _count(errors, True), age)
        else:
            table.add_row(stage, state, str(len(streams)), str(frames_in), str(frames_out), _fmt(fps), latency,
                          _fmt(figures.get("process_ms_p50"), 2), str(drops), str(errors), age)
    return table


def snapshot(collector: StatusCollector, states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "call": call_summary(collector.figures),
        "inbound_uri": inbound_uri(collector.figures),
        "stages": {
            stage: {"state": states.get(stage, {}).get("statename"), "figures": collector.figures.get(stage)}
            for stage in sorted(set(collector.figures) | set(states))
        }
    }
