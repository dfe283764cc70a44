"""`sipbridge demo` gives a verdict: PASS or FAIL per check first, then the details; non-zero exit on any FAIL.

The verdict is a pure function of the figures the demo collects, so its logic is tested here on figures written by
hand; two real runs (heavy: four Chromiums, Janus, sipp, tshark) check that a good call passes and a call the SIP peer
rejects fails with the rejection named.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest

from sipbridge.testing.demo import LIPSYNC_AUDIO_LATE_MS, claim_run_dir, preflight, verdict
from sipbridge.testing.localcall import SIP_PEER_MEDIA_PORT
from tests.stagehelp import SIPBRIDGE
from tests.test_bridge_e2e import need_media_tools

AUDIO, VIDEO = str(SIP_PEER_MEDIA_PORT), str(SIP_PEER_MEDIA_PORT + 2)
DEMO_SECONDS = 15
# Set-up (Janus, room, 2 participants' Chromium, the bot) and the media window, on a loaded 2-core machine.
DEMO_TIMEOUT_S = 480.0
REJECT_TIMEOUT_S = 300.0

CHECKS = [
    "SIP call answered",
    "room -> SIP video arrived and decoded",
    "room -> SIP audio arrived and decoded",
    "SIP -> room video arrived",
    "SIP -> room audio arrived",
    "codecs on the wire as configured",
    "lip sync at the SIP peer",
]


def good_figures() -> dict[str, Any]:
    """What a good demo call collects (shaped like demo-summary.json)."""
    return {
        "expected": {"video_codec": "h264", "audio_codec": "pcmu", "tiles": 2, "cameras": 2, "tones": [440.0, 660.0]},
        "call": {"state": "media_up", "audio_codec": "PCMU", "video_codec": "H264"},
        "observer": "alice",
        "sip": {
            "invite_responses": [(200, "OK")],
            "sdp": {"offer": ["H264/90000", "PCMU/8000"], "answer": ["H264/90000", "PCMU/8000"]},
            "payload_map": {0: "PCMU", 8: "PCMA", 9: "G722", 96: "H264"},
            "rtp": {
                f"to_sip:{AUDIO}": {"packets": 700, "payload_types": {0: 700}, "frames": 700},
                f"from_sip:{AUDIO}": {"packets": 700, "payload_types": {0: 700}, "frames": 700},
                f"to_sip:{VIDEO}": {"packets": 900, "payload_types": {96: 900}, "frames": 210},
                f"from_sip:{VIDEO}": {"packets": 900, "payload_types": {96: 900}, "frames": 210},
            },
            "video_frames_decoded": 210,
            "tile_counters": [list(range(10, 220)), list(range(40, 250))],
            "audio": {"seconds": 14.2, "tone_hz": 440.8, "rms": 0.19},
        },
        "room": {
            "track1": {"frames": 190, "counters": "12..201", "counter_list": list(range(12, 202))},
            "track2": {"frames": 185, "counters": "45..229", "counter_list": list(range(45, 230))},
            "tone_hz": 659.5,
        },
        "lipsync": {"sip": {"marks": 6, "offset_ms_p50": 21.0}},
    }


def failing(figures: dict[str, Any]) -> list[str]:
    return [c.name for c in verdict(figures) if not c.ok]


def check_named(figures: dict[str, Any], prefix: str) -> Any:
    (check,) = [c for c in verdict(figures) if c.name.startswith(prefix)]
    return check


def test_good_figures_pass_every_check_and_lines_start_with_pass() -> None:
    checks = verdict(good_figures())
    assert [c.name.split(" within")[0] for c in checks] == CHECKS
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    assert all(c.line().startswith("PASS  ") for c in checks)


def test_verdict_reads_the_written_summary_json_alike() -> None:
    """demo-summary.json turns int keys and tuples into strings and lists: the verdict must not change."""
    round_tripped = json.loads(json.dumps(good_figures()))
    assert [c.line() for c in verdict(round_tripped)] == [c.line() for c in verdict(good_figures())]


def _without(path: str, value: Any = None) -> dict[str, Any]:
    """Good figures with the item at a dotted ``path`` removed (value None) or replaced."""
    figures = copy.deepcopy(good_figures())
    *parents, last = path.split(".")
    node = figures
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return figures


@pytest.mark.parametrize(
    ("path", "value", "check", "words"),
    [
        ("sip.video_frames_decoded", 0, "room -> SIP video", "0 pictures"),
        ("sip.video_frames_decoded", None, "room -> SIP video", "not decoded"),
        ("sip.tile_counters", [list(range(10, 220))], "room -> SIP video", "1 tiles read"),
        ("sip.audio", {"seconds": 0.0, "tone_hz": None}, "room -> SIP audio", "0.0 s"),
        ("sip.audio", None, "room -> SIP audio", "0.0 s"),
        ("sip.audio", {"seconds": 12.0, "tone_hz": 1000.0}, "room -> SIP audio", "1000.0 Hz"),
        ("sip.audio", {"seconds": 13.4, "tone_hz": 0.1, "rms": 0.0}, "room -> SIP audio", "silent (RMS 0.0)"),
        ("room.track2", None, "SIP -> room video", "190 and 0 frames"),
        ("room.track1", {"frames": 3}, "SIP -> room video", "3 and 185"),
        ("room.track2.counter_list", [0] * 185, "SIP -> room video", "190 and 0 distinct"),
        ("room.track1.counter_list", list(range(500, 690)), "SIP -> room video", "0 and 185 distinct"),
        ("room.tone_hz", None, "SIP -> room audio", "no tone"),
        ("room.tone_hz", 2500.0, "SIP -> room audio", "2500 Hz"),
        ("room.tone_hz", 0.0, "SIP -> room audio", "0 Hz"),
        ("sip.sdp", {"offer": ["H264/90000", "PCMU/8000"], "answer": ["PCMU/8000"]}, "codecs", "lacks H264"),
        ("sip.rtp", {}, "codecs", "no audio RTP"),
        (f"sip.rtp.to_sip:{AUDIO}.payload_types", {0: 600, 8: 100}, "codecs", "PT 8 (PCMA) x100"),
        (f"sip.rtp.from_sip:{VIDEO}.payload_types", {97: 5}, "codecs", "PT 97 (unknown)"),
        ("lipsync", None, "lip sync", "0 lip-sync marks"),
        ("lipsync.sip", {"marks": 2, "offset_ms_p50": 10.0}, "lip sync", "2 lip-sync marks"),
        ("lipsync.sip", {"marks": 6, "offset_ms_p50": LIPSYNC_AUDIO_LATE_MS + 1}, "lip sync", "+186 ms"),
        ("lipsync.sip", {"marks": 6, "offset_ms_p50": -120.0}, "lip sync", "-120 ms"),
        ("lipsync", {"error": "ValueError: bad capture"}, "lip sync", "not measured: ValueError"),
        (
            "lipsync.sip",
            {"marks": 15, "offset_ms_p50": 20.0, "offset_ms_p50_last5": -95.0},
            "lip sync",
            "-95 ms against video (median of the last 5 of 15 marks; all of them +20 ms",
        ),
    ],
)
def test_each_missing_or_wrong_figure_fails_its_own_check_only(
    path: str, value: Any, check: str, words: str
) -> None:
    figures = _without(path, value)
    failed = failing(figures)
    assert len(failed) == 1 and failed[0].startswith(check), failed
    line = check_named(figures, check).line()
    assert line.startswith("FAIL  ") and words in line, line


@pytest.mark.parametrize(
    ("tiles", "words", "echoed"),
    [
        ([list(range(10, 220)), []], "tile 2 of the composite shows 0 readable", "190 and 0 distinct"),
        ([[0] * 200, list(range(40, 250))], "tile 1's frame counter shows 0 values other than 0", "0 and 185 distinct"),
        ([[7] * 200, list(range(40, 250))], "tile 1's frame counter shows 1 values other than 0", "0 and 185 distinct"),
    ],
)
def test_a_participant_missing_at_the_sip_peer_fails_both_video_checks(
    tiles: list[list[int]], words: str, echoed: str
) -> None:
    """What the room gets back is the echo of what the SIP peer received: an empty tile there cannot come back."""
    figures = _without("sip.tile_counters", tiles)
    assert failing(figures) == ["room -> SIP video arrived and decoded", "SIP -> room video arrived"]
    assert words in check_named(figures, "room -> SIP video").line()
    assert echoed in check_named(figures, "SIP -> room video").line()


def test_a_tile_black_at_the_start_and_end_of_the_call_still_passes() -> None:
    """The composite is the room's slate (counter band black, read as 0) before the participants are in and after
    the bot has left at the hang-up: what counts is the counter moving in between."""
    figures = good_figures()
    figures["sip"]["tile_counters"] = [[0] * 30 + list(range(10, 220)) + [0] * 12, list(range(40, 250)) + [0] * 12]
    check = check_named(figures, "room -> SIP video")
    assert check.ok and "10..219, 210 values" in check.line(), check.line()


def test_lip_sync_is_judged_once_the_call_has_settled() -> None:
    figures = good_figures()
    figures["lipsync"]["sip"] = {"marks": 15, "offset_ms_p50": -97.8, "offset_ms_p50_last5": 6.0}
    check = check_named(figures, "lip sync")
    assert check.ok and "+6 ms" in check.line() and "all of them -98 ms" in check.line(), check.line()
    figures["lipsync"]["sip"] = {"marks": 4, "offset_ms_p50": 30.0, "offset_ms_p50_last5": 500.0}
    check = check_named(figures, "lip sync")  # too few marks for a settled figure: all of them count
    assert check.ok and "median of 4 marks" in check.line(), check.line()


def test_a_rejected_call_fails_first_with_the_sip_code_and_reason() -> None:
    figures = good_figures()
    figures["sip"]["invite_responses"] = [(486, "Busy Here")]
    check = verdict(figures)[0]
    assert not check.ok and check.line() == "FAIL  SIP call answered: the SIP peer rejected the call: 486 Busy Here"


def test_a_call_without_an_answer_in_the_capture_fails_naming_the_stage_state() -> None:
    figures = _without("sip.invite_responses", [])
    figures["call"] = {"state": "failed", "code": 408, "reason": "Request Timeout"}
    assert verdict(figures)[0].line() == "FAIL  SIP call answered: call failed: SIP 408 Request Timeout"
    figures["call"] = {}
    assert "no final answer to an INVITE" in verdict(figures)[0].line()


def test_preflight_names_each_missing_dependency_in_one_sentence(tmp_path: Path) -> None:
    problems = preflight(
        tmp_path,
        euid=1000,
        which=lambda program: None if program in ("sipp", "janus") else f"/usr/bin/{program}",
        chromium=str(tmp_path / "no-chromium"),
    )
    assert len(problems) == 4, problems
    assert "root" in problems[0]
    assert any("`sipp`" in p and "sip-tester" in p for p in problems)
    assert any("`janus`" in p for p in problems)
    assert any("no Chromium" in p for p in problems)
    assert preflight(tmp_path, euid=0, which=lambda p: f"/usr/bin/{p}", chromium="/bin/sh") == []


def test_preflight_sees_a_live_pipeline_in_the_run_directory(tmp_path: Path) -> None:
    (tmp_path / "supervisord.pid").write_text(f"{os.getpid()}\n")
    problems = preflight(tmp_path, euid=0, which=lambda p: f"/usr/bin/{p}", chromium="/bin/sh")
    assert len(problems) == 1 and "busy" in problems[0] and str(os.getpid()) in problems[0]


def test_a_run_directory_holds_one_demo_at_a_time(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with claim_run_dir(run_dir), pytest.raises(click.ClickException, match="busy"), claim_run_dir(run_dir):
        pass
    with claim_run_dir(run_dir):  # released on exit
        pass


def test_missing_programs_give_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    """No janus/sipp/tshark on PATH: one clear line on stderr, no traceback (runs as any user)."""
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(
        [*SIPBRIDGE, "demo", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the demo cannot run:"), result.stderr
    assert "`janus` not found" in lines[0] and "`sipp` not found" in lines[0]


def run_demo_process(run_dir: Path, *extra: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIPBRIDGE, "demo", "--run-dir", str(run_dir), "--seconds", str(DEMO_SECONDS), *extra],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def verdict_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = lines.index("verdict") + 1
    return lines[start : start + len(CHECKS)]


@pytest.mark.media
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_of_a_good_call_passes_every_check_and_exits_zero(tmp_path: Path) -> None:
    need_media_tools()
    run_dir = tmp_path / "demo"
    result = run_demo_process(run_dir, timeout_s=DEMO_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    lines = verdict_lines(result.stdout)
    assert [line.split(":")[0] for line in lines] == [f"PASS  {name}" for name in CHECKS[:-1]] + [
        lines[-1].split(":")[0]
    ]
    assert lines[-1].startswith("PASS  lip sync at the SIP peer")
    assert "demo PASSED" in result.stdout
    # The figures behind the verdict are written out, and the latency lines say what shares the machine.
    summary = json.loads((run_dir / "demo-summary.json").read_text())
    assert summary["sip"]["video_frames_decoded"] > 0 and summary["room"]["track1"]["frames"] > 0
    assert all(line.startswith("PASS") for line in summary["verdict"])
    assert "these figures share the machine: load average" in result.stdout
    assert summary["load"]["cores"]["room"] > 0 and summary["load"]["cores"]["janus"] > 0
    assert (run_dir / "sip-received.png").stat().st_size > 0


@pytest.mark.media
@pytest.mark.timeout(REJECT_TIMEOUT_S + 30)
def test_demo_of_a_rejected_call_fails_naming_the_rejection(tmp_path: Path) -> None:
    need_media_tools()
    run_dir = tmp_path / "demo"
    result = run_demo_process(run_dir, "--sip-peer", "reject", timeout_s=REJECT_TIMEOUT_S)
    assert result.returncode != 0, result.stdout[-4000:]
    lines = verdict_lines(result.stdout)
    assert lines[0] == "FAIL  SIP call answered: the SIP peer rejected the call: 486 Busy Here", lines
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: demo FAILED: SIP call answered: the SIP peer rejected the call: 486 Busy Here")


def test_a_set_up_failure_is_one_line_with_the_traceback_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever breaks while the call is set up (here: a port Janus cannot bind) ends the command with one line
    naming it, a non-zero exit and the traceback in a file, not on the terminal."""
    from click.testing import CliRunner

    import sipbridge.commands  # noqa: F401  (registers the demo command)
    import sipbridge.testing.demo as demo
    from sipbridge.cli import cli

    def fail(*_args: Any) -> dict[str, Any]:
        raise RuntimeError("Janus did not start: port 8188 in use\nmore detail on a second line")

    monkeypatch.setattr(demo, "preflight", lambda _run_dir: [])
    monkeypatch.setattr(demo, "_run_demo", fail)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["demo", "--run-dir", str(run_dir)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [
        f"Error: the demo failed to run: RuntimeError: Janus did not start: port 8188 in use (traceback in "
        f"{run_dir}/demo-error.log, logs in {run_dir}/logs)"
    ]
    assert "Traceback (most recent call last)" in (run_dir / "demo-error.log").read_text()
