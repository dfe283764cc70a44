"""Soak: one bridged call at a steady load below capacity for N minutes, sampled every minute (issue 15, item 7).

The call: one browserless (aiortc) participant at 640x480@15 H.264 + Opus in the local room, the bot, the bridge
stages, Janus and a sipp echo peer (``sipbridge.testing.LocalCall``), with the lip-sync marks on. Every minute:
* each process's PSS and CPU (cores over the minute): every supervised program's own process, its Chromium children
  by kind (browser, renderer, gpu-process, utility, zygote), Janus; the simulated room (aiortc participant and
  viewer) apart, as it is not the bridge;
* the call's bridge-added latency p50 / p95 each way and direction (the stages' own per-hop figures, as in
  bench_bridge.py), and the A/V offset the stages add (their audio p50 - video p50);
* lip sync in the room, from the viewer's marks: the bot (the SIP echo) and the participant directly (baseline);
* every stage's drop counters.
At the end, lip sync at the SIP peer per minute from the capture (split into minutes with editcap), and:
each process's PSS slope (MB/min, least squares over the soak) against 0.05 MB/min; latency and lip-sync drift
(median of the last quarter - median of the first quarter); drop counters that grew steadily.

Run as root: ``python bench/bench_soak.py --minutes 60`` (or ``sipbridge bench soak --minutes 60``); prints the
tables and writes bench/results/soak.json.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipbridge.testing import endurance
from sipbridge.testing.localcall import BOT_NAME, CallOptions, LocalCall
from stages.browser.procs import children_map, command_name, cpu_seconds, pss_kb

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
WIDTH, HEIGHT, FPS = 640, 480, 15
MEDIA_TIMEOUT_S = 150.0
SAMPLE_PERIOD_S = 60.0
STATS_POLL_S = 1.0
# Chromium and the stages fill their caches and pools in the first minutes of a call; a slope from then on tells
# start-up from a leak. The first quarter of the soak, at most this many minutes, is the warm-up.
WARMUP_MAX_MIN = 10
LATENCY_KEYS = {  # figure name -> (stage whose input measures it, stream id)
    "room_to_sip_video": ("janus", "room-video"),
    "room_to_sip_audio": ("janus", "room-audio"),
    "sip_to_room_video": ("browser", "sip-video"),
    "sip_to_room_audio": ("browser", "sip-audio"),
}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def process_key(program: str, pid: int, root: bool) -> str:
    """A stable name for one process of the call: the program's own process, or its child by kind."""
    if root:
        return program
    comm = command_name(pid)
    if comm.startswith("chrom"):
        cmd = _cmdline(pid)
        kind = "browser"
        for part in cmd.replace(b" ", b"\0").split(b"\0"):
            if part.startswith(b"--type="):
                kind = part.split(b"=", 1)[1].decode(errors="replace")
                break
        return f"{program}/chromium-{kind}"
    return f"{program}/{comm or pid}"


def call_processes(call: LocalCall) -> dict[str, list[int]]:
    """Process key -> pids, for every process of the call (supervised programs with their children, Janus) and,
    under ``room-sim/``, the simulated room's processes."""
    tree = children_map()

    def below(pid: int) -> list[int]:
        found, stack = [], [pid]
        while stack:
            for child in tree.get(stack.pop(), []):
                found.append(child)
                stack.append(child)
        return found

    out: dict[str, list[int]] = {}
    roots: list[tuple[str, int]] = []
    for name, info in (call.supervisor.states() if call.supervisor else {}).items():
        if info.get("pid"):
            roots.append((name, int(info["pid"])))
    if call.janus is not None and call.janus.proc is not None and call.janus.proc.poll() is None:
        roots.append(("janus-server", call.janus.proc.pid))
    for name, proc in call.procs.items():
        if name.startswith("participants") and proc.poll() is None:
            roots.append((f"room-sim/{name}", proc.pid))
    for program, pid in roots:
        out.setdefault(process_key(program, pid, True), []).append(pid)
        for child in below(pid):
            out.setdefault(process_key(program, child, False), []).append(child)
    return out


def sample_processes(call: LocalCall) -> dict[str, dict[str, float]]:
    """Per process key: PSS MB (sum over its pids), CPU seconds so far, process count."""
    out = {}
    for key, pids in call_processes(call).items():
        out[key] = {"pss_mb": sum(pss_kb(p) for p in pids) / 1024, "cpu_s": sum(cpu_seconds(p) for p in pids),
                    "processes": len(pids)}
    return out


def latency_sample(figures: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    out = {}
    for key, (stage, sid) in LATENCY_KEYS.items():
        s = figures.get(stage, {}).get("streams", {}).get(sid, {})
        out[key] = {"p50_ms": s.get("latency_ms_p50"), "p95_ms": s.get("latency_ms_p95"), "frames": s.get("frames_in")}
    return out


def drop_sample(figures: dict[str, Any]) -> dict[str, int]:
    """Every stage's drop counters, flattened to 'stage.reason'."""
    out = {}
    for stage, fig in figures.items():
        for reason, count in (fig.get("drops") or {}).items():
            if isinstance(count, int | float):
                out[f"{stage}.{reason}"] = int(count)
    return out


def malloc_sample(figures: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Each stage's glibc heap figures (KiB; stages/memtrace.py), where its C library has them."""
    return {stage: fig["malloc"] for stage, fig in figures.items() if isinstance(fig.get("malloc"), dict)}


def sip_lipsync_per_minute(call: LocalCall, minute_starts_ms: list[float], work: Path) -> list[float | None]:
    """Lip sync at the SIP peer (audio - video p50, ms) in each sampled minute, from the capture split per minute
    (the whole capture of an hour would not fit the decoder's memory in one piece)."""
    from sipbridge.testing.lipsync import sync_at_sip

    if not call.pcap.exists() or shutil.which("editcap") is None:
        return [None] * len(minute_starts_ms)
    work.mkdir(parents=True, exist_ok=True)
    out: list[float | None] = []
    for i, start_ms in enumerate(minute_starts_ms):
        end_ms = minute_starts_ms[i + 1] if i + 1 < len(minute_starts_ms) else start_ms + SAMPLE_PERIOD_S * 1000
        piece = work / f"minute-{i:03d}.pcapng"
        # A few seconds before the minute: the decoder needs a key frame before the first mark of the minute.
        subprocess.run(["editcap", "-A", f"{(start_ms - 5000) / 1000:.3f}", "-B", f"{end_ms / 1000:.3f}",
                        str(call.pcap), str(piece)], capture_output=True, check=False)  # fmt: skip
        if not piece.exists():
            out.append(None)
            continue
        try:
            report = sync_at_sip(piece, call.options.grid(), call.options.sip_audio, since_ms=start_ms)
            out.append(report.get("offset_ms_p50"))
        finally:
            piece.unlink(missing_ok=True)
    return out


def room_lipsync(call: LocalCall, since_ms: float, until_ms: float) -> dict[str, float | None]:
    from sipbridge.testing.lipsync import pair_marks

    assert call.participants is not None
    out: dict[str, float | None] = {}
    for key, source in (("room_via_bridge", BOT_NAME), ("room_direct", call.options.participants[0][0])):
        records = call.participants.matching(event="received", participant=call.sync_observer, **{"from": source})
        video = [t for r in records for t in r.get("marks_video", []) if since_ms <= t < until_ms]
        audio = [t for r in records for t in r.get("marks_audio", []) if since_ms <= t < until_ms]
        offsets = sorted(p["offset_ms"] for p in pair_marks(video, audio))
        out[key] = round(offsets[len(offsets) // 2], 1) if offsets else None
    return out


def run(minutes: int) -> dict[str, Any]:
    from sipbridge.status import StatusCollector

    options = CallOptions(
        participants=[("alice", 440.0)], room_codec="h264", participant_size=f"{WIDTH}x{HEIGHT}",
        participant_fps=FPS, fps=FPS, layout="single", max_tiles=1, split=None, layout_ids=["alice/video"],
        viewer=True, sync_marks=True, generators="aiortc",
    )  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(prefix="sb-bench-soak-"))
    samples: list[dict[str, Any]] = []
    minute_starts_ms: list[float] = []
    with LocalCall(run_dir, options) as call:
        collector = StatusCollector(call.run_dir)
        deadline = time.monotonic() + MEDIA_TIMEOUT_S
        while time.monotonic() < deadline and len(call.room_received(1)) < FPS:
            collector.poll(0.5)
        if len(call.room_received(1)) < FPS:
            raise click.ClickException(f"no media through the bridge; see {call.run_dir}/logs")
        start = time.monotonic()
        previous = sample_processes(call)
        previous_t = start
        for minute in range(1, minutes + 1):
            minute_starts_ms.append(time.time() * 1000)
            until = start + minute * SAMPLE_PERIOD_S
            echoed0 = len(call.room_received(1))
            while (left := until - time.monotonic()) > 0:
                collector.poll(min(STATS_POLL_S, left))
            now = time.monotonic()
            procs = sample_processes(call)
            elapsed = now - previous_t
            per_process = {}
            for key, fig in procs.items():
                before = previous.get(key)
                # A process that restarted (fewer CPU seconds than before) counts from its start.
                used = fig["cpu_s"] - before["cpu_s"] if before and fig["cpu_s"] >= before["cpu_s"] else fig["cpu_s"]
                per_process[key] = {"pss_mb": round(fig["pss_mb"], 2), "cores": round(used / elapsed, 3)}
            previous, previous_t = procs, now
            figures = collector.figures
            latency = latency_sample(figures)
            stage_av = {}
            for direction in ("room_to_sip", "sip_to_room"):
                a, v = latency[f"{direction}_audio"]["p50_ms"], latency[f"{direction}_video"]["p50_ms"]
                stage_av[direction] = round(a - v, 1) if a is not None and v is not None else None
            sample = {
                "minute": minute,
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "processes": per_process,
                "latency": latency,
                "stage_av_offset_ms": stage_av,
                "room_lipsync_ms": room_lipsync(call, minute_starts_ms[-1], time.time() * 1000),
                "drops": drop_sample(figures),
                "malloc": malloc_sample(figures),
                "room_echoed_fps": round((len(call.room_received(1)) - echoed0) / SAMPLE_PERIOD_S, 1),
            }
            samples.append(sample)
            print_sample(sample)
        collector.close()
    # The capture is complete once the call is torn down.
    sip_sync = sip_lipsync_per_minute(call, minute_starts_ms, run_dir / "minutes")
    for sample, offset in zip(samples, sip_sync, strict=True):
        sample["sip_lipsync_ms"] = offset
    result = analyse(samples)
    result["config"] = {"minutes": minutes, "call": f"room H.264 + Opus {WIDTH}x{HEIGHT}@{FPS}, 1 aiortc "
                        f"participant <-> SIP H.264 + PCMU {WIDTH}x{HEIGHT}@{FPS}, sipp echo", "run_dir": str(run_dir)}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "load_avg_1m_per_minute": [s["load_avg_1m"] for s in samples]}
    result["samples"] = samples
    shutil.rmtree(run_dir / "minutes", ignore_errors=True)
    return result


def analyse(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Slopes, drifts and drop growth of the per-minute samples, each against its target."""
    keys = sorted({k for s in samples for k in s["processes"]})
    warmup = min(WARMUP_MAX_MIN, len(samples) // 4)
    pss: dict[str, Any] = {}
    for key in keys:
        points = [(s["minute"], s["processes"][key]["pss_mb"]) for s in samples if key in s["processes"]]
        value = endurance.slope([m for m, _ in points], [v for _, v in points])
        settled = [(m, v) for m, v in points if m > warmup]
        after = endurance.slope([m for m, _ in settled], [v for _, v in settled])
        floor = endurance.floor_slope([m for m, _ in settled], [v for _, v in settled])
        pss[key] = {
            "slope_mb_per_min": None if value is None else round(value, 4),
            "slope_after_warmup_mb_per_min": None if after is None else round(after, 4),
            "floor_slope_after_warmup_mb_per_min": None if floor is None else round(floor, 4),
            "warmup_min": warmup,
            "first_mb": points[0][1] if points else None, "last_mb": points[-1][1] if points else None,
            "cores_mean": round(sum(s["processes"][key]["cores"] for s in samples if key in s["processes"])
                                / max(1, len(points)), 3),
            "simulation": key.startswith("room-sim/"),
            "target": ("" if key.startswith("room-sim/")
                       else endurance.met(value, endurance.TARGET_PSS_SLOPE_MB_PER_MIN)),
            "target_after_warmup": ("" if key.startswith("room-sim/")
                                    else endurance.met(after, endurance.TARGET_PSS_SLOPE_MB_PER_MIN)),
            "target_floor": ("" if key.startswith("room-sim/")
                             else endurance.met(floor, endurance.TARGET_PSS_SLOPE_MB_PER_MIN)),
        }  # fmt: skip
    latency = {}
    for key in LATENCY_KEYS:
        for q in ("p50_ms", "p95_ms"):
            series = [s["latency"][key][q] for s in samples]
            d = endurance.drift(series)
            latency[f"{key}.{q}"] = {
                "first_quarter_to_last_ms": None if d is None else round(d, 1),
                "slope_ms_per_min": _round(endurance.slope([s["minute"] for s in samples], series)),
                "target": endurance.met(d, endurance.TARGET_LATENCY_DRIFT_MS, absolute=True) if q == "p50_ms" else "",
            }
    lipsync = {}
    series_of = {
        "sip (capture)": [s.get("sip_lipsync_ms") for s in samples],
        "room via bridge (viewer)": [s["room_lipsync_ms"]["room_via_bridge"] for s in samples],
        "room direct (viewer, baseline)": [s["room_lipsync_ms"]["room_direct"] for s in samples],
        "stages room_to_sip": [s["stage_av_offset_ms"]["room_to_sip"] for s in samples],
        "stages sip_to_room": [s["stage_av_offset_ms"]["sip_to_room"] for s in samples],
    }
    for name, series in series_of.items():
        d = endurance.drift(series)
        lipsync[name] = {"first_quarter_to_last_ms": _round(d),
                         "slope_ms_per_min": _round(endurance.slope([s["minute"] for s in samples], series)),
                         "target": endurance.met(d, endurance.TARGET_LIPSYNC_DRIFT_MS, absolute=True)
                         if "baseline" not in name else ""}  # fmt: skip
    counters = sorted({k for s in samples for k in s["drops"]})
    drops = {}
    for key in counters:
        growth = endurance.counter_growth([s["drops"].get(key, 0) for s in samples])
        growth["target"] = "not met" if growth["steady"] else "met"
        drops[key] = growth
    # Where a Python stage's PSS grows: glibc's heap in use (memory kept: a leak, in Python or in C) or free
    # inside the heap (holes that keep it from shrinking: fragmentation), slopes after the warm-up.
    malloc = {}
    for stage in sorted({k for s in samples for k in s.get("malloc", {})}):
        settled = [s for s in samples if s["minute"] > warmup and stage in s.get("malloc", {})]
        minutes_ = [s["minute"] for s in settled]
        malloc[stage] = {
            f"{field}_slope_mb_per_min": _round(
                endurance.slope(minutes_, [s["malloc"][stage][f"{field}_kb"] / 1024 for s in settled]), 4)
            for field in ("heap", "in_use", "free", "mmapped")
        }
    return {"pss": pss, "latency_drift": latency, "malloc": malloc, "lipsync_drift": lipsync, "drops": drops,
            "targets": {"pss_slope_mb_per_min": endurance.TARGET_PSS_SLOPE_MB_PER_MIN,
                        "latency_drift_ms": endurance.TARGET_LATENCY_DRIFT_MS,
                        "lipsync_drift_ms": endurance.TARGET_LIPSYNC_DRIFT_MS,
                        "drop_steady_share": endurance.STEADY_GROWTH_SHARE}}  # fmt: skip


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def print_sample(s: dict[str, Any]) -> None:
    lat = s["latency"]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    top = sorted(s["processes"].items(), key=lambda kv: -kv[1]["pss_mb"])[:6]
    click.echo(f"minute {s['minute']:3d} load {s['load_avg_1m']:5.1f} | latency p50 r->s v "
               f"{f(lat['room_to_sip_video']['p50_ms'])} a {f(lat['room_to_sip_audio']['p50_ms'])} s->r v "
               f"{f(lat['sip_to_room_video']['p50_ms'])} a "
               f"{f(lat['sip_to_room_audio']['p50_ms'])} ms | room lip sync {s['room_lipsync_ms']} | drops "
               f"{sum(s['drops'].values())} | echoed {s['room_echoed_fps']} fps | "
               + ", ".join(f"{k} {v['pss_mb']:.0f} MB" for k, v in top), err=False)  # fmt: skip


def print_report(r: dict[str, Any]) -> None:
    loads = r["machine"]["load_avg_1m_per_minute"]
    click.echo(f"\nsoak: {r['config']['minutes']} minutes, {r['config']['call']}; load average (1 min) "
               f"{min(loads):.1f}-{max(loads):.1f}, median {sorted(loads)[len(loads) // 2]:.1f}")
    warmup = next((p["warmup_min"] for p in r["pss"].values()), 0)
    click.echo(f"{'process':<40}{'PSS first':>10}{'last':>8}{'slope MB/min':>14}{f'after {warmup} min':>14}"
               f"{'floor':>9}{'cores':>7}  target < {endurance.TARGET_PSS_SLOPE_MB_PER_MIN} MB/min: whole / after "
               "warm-up / floor after warm-up")
    for key, p in sorted(r["pss"].items(), key=lambda kv: (kv[1]["simulation"], kv[0])):
        whole = "-" if p["slope_mb_per_min"] is None else f"{p['slope_mb_per_min']:+.4f}"
        after = "-" if p["slope_after_warmup_mb_per_min"] is None else f"{p['slope_after_warmup_mb_per_min']:+.4f}"
        floor_value = p.get("floor_slope_after_warmup_mb_per_min")  # results written before it have none
        floor = "-" if floor_value is None else f"{floor_value:+.4f}"
        judged = (f"{p['target']} / {p['target_after_warmup']} / {p.get('target_floor', 'no data')}" if p["target"]
                  else "(simulation, not judged)")
        click.echo(f"{key:<40}{p['first_mb']:>10.1f}{p['last_mb']:>8.1f}{whole:>14}{after:>14}{floor:>9}"
                   f"{p['cores_mean']:>7.2f}  {judged}")
    if r.get("malloc"):
        click.echo(f"\n{'glibc heap, after warm-up (MB/min)':<40}{'heap':>10}{'in use':>10}{'free':>10}{'mmapped':>10}"
                   "  (in use: kept; free: fragmentation)")
        for stage, m in r["malloc"].items():
            click.echo(f"{stage:<40}" + "".join(f"{_fmt4(m[f'{f}_slope_mb_per_min']):>10}"
                                                for f in ("heap", "in_use", "free", "mmapped")))
    click.echo(f"\n{'latency (bridge-added)':<44}{'last-first quarter ms':>22}{'slope ms/min':>14}  "
               f"target |drift| <= {endurance.TARGET_LATENCY_DRIFT_MS:.0f} ms (p50)")
    for key, d in r["latency_drift"].items():
        click.echo(f"{key:<44}{_fmt(d['first_quarter_to_last_ms']):>22}{_fmt(d['slope_ms_per_min']):>14}  "
                   f"{d['target']}")
    click.echo(f"\n{'lip sync (audio - video)':<44}{'last-first quarter ms':>22}{'slope ms/min':>14}  "
               f"target |drift| <= {endurance.TARGET_LIPSYNC_DRIFT_MS:.0f} ms")
    for key, d in r["lipsync_drift"].items():
        click.echo(f"{key:<44}{_fmt(d['first_quarter_to_last_ms']):>22}{_fmt(d['slope_ms_per_min']):>14}  "
                   f"{d['target'] or '(baseline)'}")
    click.echo(f"\n{'drop counter':<44}{'total':>8}{'minutes rising':>16}  target: no steady growth (rising in > "
               f"{endurance.STEADY_GROWTH_SHARE:.0%} of minutes)")
    for key, d in r["drops"].items():
        click.echo(f"{key:<44}{d['total']:>8}{d['minutes_rising']:>10} of {d['minutes']:<3}  {d['target']}")
    if not r["drops"]:
        click.echo("(no stage counted a drop)")


def _fmt4(v: float | None) -> str:
    return "-" if v is None else f"{v:+.4f}"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}"


def reanalyse(path: Path) -> list[dict[str, Any]]:
    """Each soak in a results file (one run, or `--runs N`'s list) analysed again from its per-minute samples."""
    try:
        data = json.loads(path.read_text())
        results = [run["result"] for run in data["runs"]] if "runs" in data else [data]
        again = []
        for old in results:
            fresh = analyse(old["samples"])
            again.append({**old, **fresh})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(f"{path}: not a soak results file ({type(exc).__name__}: {exc})") from None
    return again


@click.command()
@click.option("--minutes", type=click.IntRange(2, 24 * 60), default=10, show_default=True,
              help="Length of the soak; one sample per minute.")
@click.option("--report", "report_of", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run nothing: print the report of an earlier soak's results file, analysed again.")
def main(minutes: int, report_of: Path | None) -> None:
    """One bridged call for MINUTES: each process's PSS slope, latency and lip-sync drift, drop counter growth."""
    if report_of is not None:
        for result in reanalyse(report_of):
            print_report(result)
        return
    if os.geteuid() != 0:
        raise click.ClickException("needs root (network namespace)")
    result = run(minutes)
    print_report(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
