"""Faults during one bridged call: each stage, Chromium's renderer and browser process, and Janus SIGKILLed in turn
(issue 15, item 3). Measured from outside the bridge, with no step taken on the bridge after a fault.

The call: one browserless (aiortc) participant in the local room (640x480@15 VP8 + Opus), the bot, the bridge
stages under supervisord, Janus and a sipp echo peer (``sipbridge.testing.LocalCall``); a receive-only aiortc
viewer reads the frame counters and the tone of the bot's camera and microphone, i.e. the participant's picture
and tone after the whole loop room -> bridge -> SIP peer (echo) -> bridge -> room.

For each fault, in the window from the kill to halfway through the settle after media came back:
* the media gap at the SIP peer, per direction (to the peer and echoed back, audio and video): the largest
  interval between consecutive RTP packets in the capture that overlaps the window (from the last packet before
  the kill to the first after the hole);
* the media gap in the room: the largest interval between the viewer's reports (every 0.5 s: that is the
  resolution) that carried a picture of the bot, and between those that heard the tone;
* frames lost: frame counters that the viewer never read from the bot across the window;
* whether the call survived with no manual step: media back both ways at the SIP peer and in the room, and every
  supervised program running again. Janus is restarted by the bench the way a service manager would (the local
  room lives in the same Janus, so the simulated room's participant and viewer are restarted with it: what the
  room reports after a Janus fault includes their rejoin);
* met / not met against the targets: media back < 2 s for a Python stage, < 3 s for the browser stage or
  Chromium, < 10 s for Janus.

Run as root: ``python bench/bench_faults.py`` (or ``sipbridge bench faults --runs 3``); prints the table and writes
bench/results/faults.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipbridge.testing import endurance
from sipbridge.testing.localcall import (
    BOT_NAME,
    SIP_PEER_MEDIA_PORT,
    SIP_PEER_PORT,
    VIEWER_NAME,
    CallOptions,
    LocalCall,
)
from stages.browser.procs import browser_main_pids, renderer_pids

RESULTS = Path(__file__).resolve().parent / "results" / "faults.json"
WIDTH, HEIGHT, FPS = 640, 480, 15
MEDIA_TIMEOUT_S = 150.0
# After a fault, how long the call has to bring media back before it is declared lost (then the bench stops).
# Far above the targets: on a machine loaded by other work (load average 60+ on 2 cores) a restarted stage was
# measured to take 66 s just to import, and the figures after it are still worth having.
RECOVERY_TIMEOUT_S = 120.0
# Steady media after a fault before the next one; the fault's window ends halfway through it, so two faults'
# windows are SETTLE_S / 2 apart.
SETTLE_S = 6.0
# The viewer reports every 0.5 s: three reports in a row with pictures is media back, not a stray frame.
STEADY_REPORTS = 3
REPORT_PERIOD_S = 0.5
TONE_HZ = 440.0
TONE_TOLERANCE = 0.05
# Janus down this long before the bench starts it again (a service manager's restart delay).
JANUS_DOWN_S = 1.0
DIRECTIONS = {  # name -> (port, packets go to it?)
    "to_sip_audio": (SIP_PEER_MEDIA_PORT, True),
    "to_sip_video": (SIP_PEER_MEDIA_PORT + 2, True),
    "from_sip_audio": (SIP_PEER_MEDIA_PORT, False),
    "from_sip_video": (SIP_PEER_MEDIA_PORT + 2, False),
}


@dataclass
class Fault:
    name: str
    kind: str  # python_stage, browser, janus (which target applies)
    killed: list[int] = field(default_factory=list)
    at_wall: float = 0.0
    at_mono: float = 0.0
    janus_back_wall: float | None = None
    window_end_wall: float = 0.0
    window_end_mono: float = 0.0
    recovered: bool = False
    note: str = ""


def program_pids(call: LocalCall) -> dict[str, int]:
    states = call.supervisor.states() if call.supervisor else {}
    return {name: int(info["pid"]) for name, info in states.items() if info.get("pid")}


def all_running(call: LocalCall) -> bool:
    states = call.supervisor.states() if call.supervisor else {}
    return bool(states) and all(info.get("statename") == "RUNNING" for info in states.values())


def stage_kind(program: str) -> str:
    # The chromium program keeps the bot's Chromium (stages/browser/keeper.py): killing it is a browser fault.
    return "browser" if program.startswith(("browser", "chromium")) else "python_stage"


def fault_plan(programs: list[str]) -> list[tuple[str, str]]:
    """(fault, kind) in order: the stages in pipeline order (the janus stage last of them), Chromium's renderer and
    browser process, then Janus (it takes the room with it: last)."""

    def order(name: str) -> tuple[int, str]:
        for rank, prefix in enumerate(("browser", "chromium", "decode", "transform", "layout", "compose", "encode")):
            if name.startswith(prefix):
                return rank, name
        return (9 if name.startswith("janus") else 6), name

    plan = [(name, stage_kind(name)) for name in sorted(programs, key=order)]
    return [*plan, ("chromium-renderer", "browser"), ("chromium-browser", "browser"), ("janus-server", "janus")]


class FaultCall(LocalCall):
    def viewer_reports(self) -> list[dict[str, Any]]:
        assert self.participants is not None
        return self.participants.matching(event="received", participant=VIEWER_NAME, **{"from": BOT_NAME})

    def restart_room(self) -> None:
        """The simulated room again, after Janus lost it: participant and viewer rejoin the restarted Janus."""
        from sipbridge.testing.localcall import _stop

        for name in [n for n in self.procs if n.startswith("participants")]:
            _stop(self.procs[name])
        self._start_participants(list(self.options.participants), f"participants-{int(time.time())}", viewer=True)


def steady_since(reports: list[dict[str, Any]], since_mono: float) -> float | None:
    """When the viewer saw the bot's picture move in STEADY_REPORTS reports in a row after ``since_mono``."""
    times = [t for t in endurance.moving_picture_times(reports) if t > since_mono]
    return endurance.recovered_after(times, since_mono, REPORT_PERIOD_S * 2.5, STEADY_REPORTS)


def inject(call: FaultCall, fault: Fault) -> None:
    pids = program_pids(call)
    # Chromium's processes: under its keeper (the chromium program) when there is one, else under the browser stage.
    browser_pid = pids.get("chromium") or next((pid for name, pid in pids.items() if name.startswith("browser")), None)
    if fault.name == "chromium-renderer":
        targets = renderer_pids(browser_pid) if browser_pid else []
    elif fault.name == "chromium-browser":
        targets = browser_main_pids(browser_pid) if browser_pid else []
    elif fault.name == "janus-server":
        targets = [call.janus.proc.pid] if call.janus is not None and call.janus.proc is not None else []
    else:
        targets = [pids[fault.name]] if fault.name in pids else []
    if not targets:
        fault.note = "no process to kill"
        return
    fault.at_wall, fault.at_mono = time.time(), time.monotonic()
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    fault.killed = targets
    if fault.name == "janus-server":
        call.janus.proc.wait()
        time.sleep(JANUS_DOWN_S)
        call.janus.start()
        fault.janus_back_wall = time.time()
        call.restart_room()


def wait_recovered(call: FaultCall, fault: Fault, collect: Any) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        collect(0.25)
        if steady_since(call.viewer_reports(), fault.at_mono) is not None and all_running(call):
            fault.recovered = True
            break
    # The fault's window closes halfway through the settle, not at the next kill: a gap counts for a window when
    # it starts inside it, and the next fault's gap starts at the last packet before that kill, which a window
    # ending just before the kill would still hold (each row then showed the next fault's gap).
    for _ in range(2):
        end = time.monotonic() + SETTLE_S / 2
        while time.monotonic() < end:
            collect(0.25)
        if not fault.window_end_mono:
            fault.window_end_wall, fault.window_end_mono = time.time(), time.monotonic()


Packet = endurance.Packet


def capture_packets(pcap: Path) -> tuple[dict[str, list[Packet]], list[tuple[float, str]]]:
    """RTP packets per direction at the SIP peer, and the SIP requests/answers (time, what)."""
    media = [a for p in (SIP_PEER_MEDIA_PORT, SIP_PEER_MEDIA_PORT + 2) for a in ("-d", f"udp.port=={p},rtp")]
    out = subprocess.run(
        ["tshark", "-r", str(pcap), *media, "-d", f"udp.port=={SIP_PEER_PORT},sip", "-Y", "rtp || sip",
         "-T", "fields", "-e", "frame.time_epoch", "-e", "udp.srcport", "-e", "udp.dstport", "-e", "sip.Method",
         "-e", "sip.Status-Code", "-e", "sip.CSeq.method", "-e", "rtp.ssrc", "-e", "rtp.seq"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    packets: dict[str, list[Packet]] = {d: [] for d in DIRECTIONS}
    sip: list[tuple[float, str]] = []
    for line in out.splitlines():
        cols = line.split("\t") + [""] * 8
        try:
            t, src, dst = float(cols[0]), int(cols[1]), int(cols[2])
        except ValueError:
            continue
        if cols[3] or cols[4]:
            sip.append((t, cols[3] or f"{cols[4]} ({cols[5]})"))
            continue
        try:
            ssrc, seq = int(cols[6], 0), int(cols[7])
        except ValueError:
            continue
        for name, (port, inbound) in DIRECTIONS.items():
            if (dst if inbound else src) == port:
                packets[name].append((t, ssrc, seq))
    return packets, sip


def analyse(faults: list[Fault], rtp: dict[str, list[Packet]], sip: list[tuple[float, str]],
            reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fault: gaps at the SIP peer and in the room, frames lost, survival and targets."""
    rows: list[dict[str, Any]] = []
    picture_times = endurance.moving_picture_times(reports)
    tone_times = [r["t"] for r in reports
                  if r.get("tone_hz") and abs(float(r["tone_hz"]) - TONE_HZ) <= TONE_HZ * TONE_TOLERANCE]
    for fault in faults:
        if not fault.killed:
            rows.append({"fault": fault.name, "kind": fault.kind, "note": fault.note})
            continue
        target = endurance.gap_target_s(fault.kind)
        sip_gaps: dict[str, float | None] = {}
        missed: dict[str, int] = {}
        for name, packets in rtp.items():
            gap = endurance.largest_gap([t for t, _, _ in packets], fault.at_wall, fault.window_end_wall)
            sip_gaps[name] = None if gap is None else round(gap.seconds, 2)
            missed[name] = 0 if gap is None else endurance.capture_missed(packets, gap.start, gap.end)
        room_video = endurance.largest_gap(picture_times, fault.at_mono, fault.window_end_mono)
        room_audio = endurance.largest_gap(tone_times, fault.at_mono, fault.window_end_mono)
        before = [r for r in reports if r["t"] <= fault.at_mono][-1:]
        window = [r for r in reports if fault.at_mono < r["t"] <= fault.window_end_mono]
        counters = [c for r in before + window for c in r.get("counters", [])]
        sip_events = [what for t, what in sip if fault.at_wall <= t <= fault.window_end_wall]
        worst_sip = max((g for name, g in sip_gaps.items() if g is not None and not missed[name]), default=None)
        survived = fault.recovered and all(
            g is not None and g < RECOVERY_TIMEOUT_S and rtp[name] and rtp[name][-1][0] > fault.at_wall
            for name, g in sip_gaps.items())  # fmt: skip
        rows.append({
            "fault": fault.name,
            "kind": fault.kind,
            "killed_pids": fault.killed,
            "sip_gap_s": sip_gaps,
            "sip_gap_s_max": worst_sip,
            # Packets the capture itself missed inside each gap (the machine too loaded for tshark): such a gap is
            # the capture's, not the media's, and is left out of the target.
            "sip_gap_capture_missed": missed,
            "room_video_gap_s": None if room_video is None else round(room_video.seconds, 2),
            "room_audio_gap_s": None if room_audio is None else round(room_audio.seconds, 2),
            "room_frames_lost": endurance.counters_lost(counters),
            "janus_back_after_s": (round(fault.janus_back_wall - fault.at_wall, 2)
                                   if fault.janus_back_wall is not None else None),
            "sip_signalling": sip_events,
            "survived": survived,
            "target_s": target,
            "sip_target": endurance.met(worst_sip, target) if survived else "not met",
            "room_target": (endurance.met(None if room_video is None else room_video.seconds, target)
                            if survived else "not met"),
            "note": fault.note,
        })  # fmt: skip
    return rows


def run() -> dict[str, Any]:
    from sipbridge.status import StatusCollector

    options = CallOptions(
        participants=[("alice", TONE_HZ)], room_codec="vp8", participant_size=f"{WIDTH}x{HEIGHT}",
        participant_fps=FPS, fps=FPS, layout="single", max_tiles=1, split=None, layout_ids=["alice/video"],
        viewer=True, generators="aiortc", sip_calls=20,
    )  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(prefix="sb-bench-faults-"))
    faults: list[Fault] = []
    call = FaultCall(run_dir, options)
    with call:
        collector = StatusCollector(call.run_dir)
        deadline = time.monotonic() + MEDIA_TIMEOUT_S
        while time.monotonic() < deadline and steady_since(call.viewer_reports(), 0.0) is None:
            collector.poll(0.5)
        if steady_since(call.viewer_reports(), 0.0) is None:
            raise click.ClickException(f"no media through the bridge; see {call.run_dir}/logs")
        collector.poll(SETTLE_S)
        for name, kind in fault_plan(sorted(program_pids(call))):
            fault = Fault(name, kind)
            faults.append(fault)
            click.echo(f"-- SIGKILL {name}", nl=False)
            inject(call, fault)
            wait_recovered(call, fault, collector.poll)
            click.echo(f": pids {fault.killed}, media back in the room: {fault.recovered}"
                       + (f" ({fault.note})" if fault.note else ""))
            if fault.killed and not fault.recovered:
                click.echo("   the call did not come back: later faults would measure nothing")
                break
        drops = {stage: fig.get("drops", {}) for stage, fig in collector.figures.items() if fig.get("drops")}
        restarts = {name: info.get("statename") for name, info in (call.supervisor.states() if call.supervisor
                                                                    else {}).items()}
        reports = call.viewer_reports()
        collector.close()
    rtp, sip = capture_packets(call.pcap)
    (run_dir / "viewer-reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))
    rows = analyse(faults, rtp, sip, reports)
    return {
        "config": {"call": f"room VP8 + Opus {WIDTH}x{HEIGHT}@{FPS}, 1 aiortc participant <-> SIP H.264 + PCMU "
                           f"{WIDTH}x{HEIGHT}@{FPS}, sipp echo", "run_dir": str(run_dir),
                   "settle_s": SETTLE_S, "recovery_timeout_s": RECOVERY_TIMEOUT_S, "janus_down_s": JANUS_DOWN_S,
                   "room_resolution_s": REPORT_PERIOD_S},
        "faults": rows,
        "all_survived": all(r.get("survived") for r in rows if "survived" in r),
        "targets_s": endurance.TARGET_GAP_S,
        "drops_at_end": drops,
        "programs_at_end": restarts,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
    }  # fmt: skip


def print_table(r: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    click.echo(f"\nfaults during one bridged call ({r['config']['call']}); load avg at the end "
               f"{r['machine']['load_avg_1m_at_end']:.1f}")
    click.echo(f"{'fault':<20}{'SIP gap s: to a/v':>19}{'from a/v':>13}{'room gap v/a s':>16}{'lost':>6}"
               f"{'survived':>9}{'target':>8}  SIP / room")
    for row in r["faults"]:
        if "survived" not in row:
            click.echo(f"{row['fault']:<20}  {row.get('note', '')}")
            continue
        miss = row["sip_gap_capture_missed"]
        g = {k: f(v) + ("*" if miss.get(k) else "") for k, v in row["sip_gap_s"].items()}
        click.echo(f"{row['fault']:<20}{g['to_sip_audio']:>10}/{g['to_sip_video']:<8}"
                   f"{g['from_sip_audio']:>7}/{g['from_sip_video']:<6}"
                   f"{f(row['room_video_gap_s']):>9}/{f(row['room_audio_gap_s']):<6}{row['room_frames_lost']:>6}"
                   f"{'yes' if row['survived'] else 'NO':>9}{'< ' + str(row['target_s']):>8}  "
                   f"{row['sip_target']} / {row['room_target']}")  # fmt: skip
    click.echo("*: the capture itself missed packets inside that gap (tshark behind on a loaded machine): not judged. "
               "Room gaps: between the viewer's reports (every 0.5 s) in which the bot's picture moved; the tone is "
               "estimated over 1 s. After the Janus fault the simulated room rejoins too.")
    click.echo(f"every fault survived with no manual step: {'yes' if r['all_survived'] else 'NO'}")


@click.command()
def main() -> None:
    """SIGKILL each stage, Chromium's renderer and browser process, and Janus during one call; gaps and targets."""
    if os.geteuid() != 0:
        raise click.ClickException("needs root (network namespace)")
    result = run()
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
