"""Pipelines under supervisord: clean end, a SIGKILLed stage restarted, and the CLI around them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sipbridge.cli import cli
from sipbridge.supervise import PipelineError, Supervisor, parse_pipeline, render_config

pytestmark = pytest.mark.timeout(180)

PIPELINE = {
    "stage": [
        {"name": "source", "kind": "source", "args": ["--frames", "150", "--width", "320", "--height", "240"]},
        {"name": "transformer", "kind": "transformer", "inputs": ["source"], "args": ["--video", "resize:160x120"]},
        {"name": "sink", "kind": "sink", "inputs": ["transformer"]},
    ]
}


def _run_dir(tmp_path: Path) -> Path:
    # ipc:// paths must stay under the 107-byte unix socket limit. A new folder each time: a name made of the pid
    # and the test's name can meet the folder of an earlier run (pids repeat), logs and all.
    return Path(tempfile.mkdtemp(prefix=f"sbt-{tmp_path.name[-12:]}-", dir="/tmp"))


def test_killed_stage_is_restarted_and_the_pipeline_resumes(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    specs = parse_pipeline(PIPELINE)
    specs[2].args += ["--report", str(run_dir / "report.json")]
    conf = run_dir / "supervisord.conf"
    conf.write_text(render_config(specs, run_dir))
    os.environ["SIPBRIDGE_PYTHON"] = sys.executable
    supervisor = Supervisor(conf, run_dir)
    supervisor.start()
    try:
        deadline = time.monotonic() + 30
        while supervisor.states()["transformer"]["statename"] != "RUNNING" or not (run_dir / "sink.stats").exists():
            assert time.monotonic() < deadline, supervisor.states()
            time.sleep(0.1)
        time.sleep(2.0)  # let media flow
        victim = supervisor.states()["transformer"]["pid"]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        restarted_pid = None
        while time.monotonic() - killed_at < 20:
            info = supervisor.states()["transformer"]
            if info["statename"] == "RUNNING" and info["pid"] != victim:
                restarted_pid = info["pid"]
                break
            time.sleep(0.05)
        assert restarted_pid, "supervisord did not restart the killed stage"
        deadline = time.monotonic() + 60
        while not supervisor.all_finished():
            assert time.monotonic() < deadline, supervisor.states()
            time.sleep(0.2)
        states = supervisor.states()
    finally:
        supervisor.stop()
    assert {name: info["exitstatus"] for name, info in states.items()} == {"source": 0, "transformer": 0, "sink": 0}
    report = json.loads((run_dir / "report.json").read_text())
    video = report["video"]["video0"]
    assert video["out_of_order"] == 0 and video["duplicates"] == 0
    assert video["last_counter"] == 149, "the pipeline did not resume after the restart"
    lost = video["missing"] + video["first_counter"]
    print(f"\nframes lost across a SIGKILL + restart of the transformer: {lost} of 150 ({lost / 30:.2f} s)")
    assert 0 < lost < 150 - 30, "a kill must lose some frames, and the pipeline must resume"


def test_pipeline_errors_name_the_bad_key() -> None:
    with pytest.raises(PipelineError, match=r"stage 'b'\.inputs names unknown stage 'zz'"):
        parse_pipeline({"stage": [{"name": "a", "kind": "source"}, {"name": "b", "kind": "sink", "inputs": ["zz"]}]})
    with pytest.raises(PipelineError, match="exactly one of 'kind' or 'command'"):
        parse_pipeline({"stage": [{"name": "a"}]})
    with pytest.raises(PipelineError, match="unknown key"):
        parse_pipeline({"stage": [{"name": "a", "kind": "source", "colour": "red"}]})


def test_any_command_can_take_a_stage_place(tmp_path: Path) -> None:
    specs = parse_pipeline(
        {
            "stage": [
                {"name": "src", "command": "/usr/bin/env my-own-source --fast"},
                {"name": "sink", "kind": "sink", "inputs": ["src"]},
            ]
        }
    )
    conf = render_config(specs, tmp_path)
    assert "command=/usr/bin/env my-own-source --fast" in conf
    assert f"--in ipc://{tmp_path}/src.sock" in conf
    assert "autorestart=unexpected" in conf


def test_cli_up_runs_a_toml_pipeline_and_status_reports(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[[stage]]\nname = "source"\nkind = "source"\nargs = ["--frames", "30", "--width", "160", "--height", "120"]\n'
        f'[[stage]]\nname = "sink"\nkind = "sink"\ninputs = ["source"]\nargs = ["--report", "{run_dir}/r.json"]\n'
    )
    for run in (1, 2):
        result = CliRunner().invoke(cli, ["up", str(pipeline), "--run-dir", str(run_dir)])
        assert result.exit_code == 0, result.output
        assert "how each stage ended:" in result.output
        assert "sink: ended by itself (exit status 0; expected)" in result.output, result.output
        report = json.loads((run_dir / "r.json").read_text())
        assert report["video"]["video0"]["last_counter"] == 29
        # Each run starts fresh logs; the previous run's are kept beside them.
        assert (run_dir / "logs" / "supervisord.log").read_text().count("supervisord started with pid") == 1
        assert (run_dir / "logs.1").is_dir() == (run == 2)
    assert (run_dir / "logs.1" / "sink.log").is_file()


def test_cli_options_come_from_env_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "sb.toml"
    config.write_text("[status]\ninterval = 0.2\n")
    runner = CliRunner()
    missing = runner.invoke(cli, ["--config", str(config), "status", "--once", "--run-dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no pipeline run directory" in missing.output
    env = runner.invoke(cli, ["status", "--json"], env={"SIPBRIDGE_RUN_DIR": str(tmp_path)})
    assert env.exit_code == 0, env.output
    assert json.loads(env.output) == {"call": None, "inbound_uri": None, "stages": {}}
    bad = tmp_path / "bad.toml"
    bad.write_text("not = [valid")
    broken = runner.invoke(cli, ["--config", str(bad), "status"])
    assert broken.exit_code != 0 and "not valid TOML" in broken.output


def test_cli_stage_options_from_config_file_and_environment(tmp_path: Path) -> None:
    """Precedence: command line, then SIPBRIDGE_* environment, then the config file, then defaults."""
    config = tmp_path / "sb.toml"
    config.write_text('[stage.transformer]\nvideo = ["from-config"]\n[stage.source]\nwidth = 7\n')
    runner = CliRunner()
    help_text = runner.invoke(cli, ["--config", str(config), "stage", "source", "--help"]).output
    assert "[default: 7]" in help_text
    from_config = runner.invoke(cli, ["--config", str(config), "stage", "transformer", "--in", "ipc:///nowhere"])
    assert from_config.exit_code == 2 and "unknown transform 'from-config'" in from_config.output
    from_env = runner.invoke(
        cli,
        ["--config", str(config), "stage", "transformer", "--in", "ipc:///nowhere"],
        env={"SIPBRIDGE_STAGE_TRANSFORMER_VIDEO": "from-env"},
    )
    assert from_env.exit_code == 2 and "unknown transform 'from-env'" in from_env.output
    from_cli = runner.invoke(
        cli,
        ["--config", str(config), "stage", "transformer", "--in", "ipc:///x", "--video", "from-cli"],
        env={"SIPBRIDGE_STAGE_TRANSFORMER_VIDEO": "from-env"},
    )
    assert from_cli.exit_code == 2 and "unknown transform 'from-cli'" in from_cli.output


def test_status_shows_live_figures_and_sigterm_stops_everything_cleanly(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    specs = parse_pipeline(PIPELINE)
    specs[0].args = ["--frames", "0", "--width", "320", "--height", "240"]  # runs until stopped
    specs[2].args += ["--report", str(run_dir / "report.json")]
    conf = run_dir / "supervisord.conf"
    conf.write_text(render_config(specs, run_dir))
    os.environ["SIPBRIDGE_PYTHON"] = sys.executable
    supervisor = Supervisor(conf, run_dir)
    supervisor.start()

    def video_of(snapshot: dict, stage: str) -> dict:
        return (((snapshot.get(stage) or {}).get("figures") or {}).get("streams") or {}).get("video0") or {}

    def live_figures(snapshot: dict) -> bool:
        # Each stage's figures are its own latest report, taken at its own moment: wait until all of them show
        # the condition, never compare one stage's count against another's.
        return (
            {name: s["state"] for name, s in snapshot.items()} == dict.fromkeys(("sink", "source", "transformer"),
                                                                                "RUNNING")
            and video_of(snapshot, "sink").get("frames_in", 0) > 30
            and video_of(snapshot, "source").get("frames_out", 0) > 30
            and video_of(snapshot, "transformer").get("latency_ms_p50") is not None
        )

    try:
        deadline = time.monotonic() + 60
        snapshot: dict = {}
        while time.monotonic() < deadline and not live_figures(snapshot):
            result = CliRunner().invoke(cli, ["status", "--json", "--run-dir", str(run_dir)])
            assert result.exit_code == 0, result.output
            snapshot = json.loads(result.output)["stages"]
        assert live_figures(snapshot), snapshot
    finally:
        code = supervisor.stop()
    assert code == 0
    log = (run_dir / "logs" / "supervisord.log").read_text()
    for name in ("source", "transformer", "sink"):
        # A stage either gets SIGTERM itself or ends first on its upstream's end of stream: both exit 0.
        assert re.search(rf"(stopped|exited): {name} \(exit status 0", log), log
    report = json.loads((run_dir / "report.json").read_text())
    video = report["video"]["video0"]
    assert video["frames"] > 30 and video["out_of_order"] == 0


def test_status_table_tells_the_call_and_each_stage_state(tmp_path: Path) -> None:
    from rich.console import Console

    from sipbridge.status import StatusCollector, call_summary, render

    figures = {
        "janus": {"streams": {}, "registration": {"state": "registered"},
                  "call": {"call_id": "c1", "state": "media_up", "direction": "outbound", "peer": "sip:echo@h",
                           "audio_codec": "PCMU", "video_codec": "H264", "media_up_ns": 1_000_000_000}},
        "browser": {"streams": {}, "state": "joined"},
    }
    assert call_summary(figures, now_ns=43_000_000_000) == (
        "call c1: media_up, outbound sip:echo@h, PCMU/H264, up 42 s")
    assert call_summary({"janus": {"registration": {"state": "registered"}}}) == "no call (janus: SIP registered)"
    collector = StatusCollector(tmp_path)
    collector.figures = figures
    console = Console(width=200, record=True)
    console.print(render(collector, {"browser": {"statename": "RUNNING"}, "janus": {"statename": "RUNNING"}}))
    text = console.export_text()
    assert "RUNNING · joined" in text and "call c1: media_up" in text
    # On an 80-column terminal every stage name stays whole (room-decoder vs room-transformer), nothing is wider.
    names = ["browser", "room-decoder", "room-transformer", "sip-encoder", "janus", "sip-decoder", "sip-transformer"]
    busy = {"streams": {"v": {"frames_in": 1234567, "frames_out": 1234560, "fps_in": 29.97, "latency_ms_p50": 88.1}},
            "drops": {"send_full": 12345}, "errors": {}, "process_ms_p50": 1.5}
    collector.figures = {name: dict(busy) for name in names}
    collector.figures["browser"]["state"] = "waiting_for_call"
    console = Console(width=80, record=True)
    console.print(render(collector, {name: {"statename": "RUNNING"} for name in names}, 80))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in names:
        assert [line for line in lines if line.split() and line.split()[0] == name], (name, lines)
    assert any("1.2M" in line for line in lines) and any("waiting" in line for line in lines)
    collector.close()


def test_logs_rotate_per_run_and_endings_are_told(tmp_path: Path) -> None:
    from sipbridge.supervise import KEPT_LOG_RUNS, rotate_logs, stage_endings

    logs = tmp_path / "logs"
    for run in range(KEPT_LOG_RUNS + 2):
        logs.mkdir(exist_ok=True)
        (logs / "janus.log").write_text(f"run {run}\n")
        rotate_logs(tmp_path)
        assert not logs.exists()
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == [f"logs.{i}" for i in range(1, KEPT_LOG_RUNS + 1)]
    assert (tmp_path / "logs.1" / "janus.log").read_text() == f"run {KEPT_LOG_RUNS + 1}\n"
    # The oldest holds something that is not ours: it is never deleted, this run's logs get a time-stamped name.
    (tmp_path / f"logs.{KEPT_LOG_RUNS}" / "notes.txt").write_text("mine")
    logs.mkdir()
    (logs / "janus.log").write_text("latest\n")
    rotate_logs(tmp_path)
    assert (tmp_path / f"logs.{KEPT_LOG_RUNS}" / "notes.txt").exists()
    assert [p for p in tmp_path.glob("logs.2*-*") if (p / "janus.log").read_text() == "latest\n"]
    # An empty logs folder (nothing ran) stays where it is.
    logs.mkdir()
    rotate_logs(tmp_path)
    assert logs.is_dir()
    # Only `up` asks for fresh logs: the local-call harness writes its own (sipp, room server) before it starts
    # supervisord, and they must stay where they are.
    from sipbridge.supervise import ensure_run_dir_free

    (logs / "sipp.log").write_text("harness")
    ensure_run_dir_free(tmp_path)
    assert (logs / "sipp.log").read_text() == "harness"

    (logs / "supervisord.log").write_text(
        "2026-12-03 07:00:00,001 INFO spawned: 'janus' with pid 10\n"
        "2026-12-03 07:00:05,001 WARN exited: browser (exit status 1; not expected)\n"
        "2026-12-03 07:00:09,001 WARN exited: browser (exit status 1; not expected)\n"
        "2026-12-03 07:00:09,002 INFO gave up: browser entered FATAL state, too many start retries too quickly\n"
        "2026-12-03 07:00:20,001 INFO stopped: janus (exit status 0)\n"
        "2026-12-03 07:00:21,001 WARN stopped: sip-encoder (terminated by SIGKILL)\n"
        "2026-12-03 07:00:22,001 INFO exited: sink (exit status 0; expected)\n")
    endings = stage_endings(tmp_path, {"janus": {"statename": "RUNNING"}, "relay": {"statename": "RUNNING"}})
    assert endings["janus"] == "stopped on request (exit status 0)"
    assert endings["browser"].startswith("FATAL: gave up restarting it (last: exit status 1; not expected)")
    assert endings["sip-encoder"].startswith("killed: it did not stop within")
    assert endings["sink"] == "ended by itself (exit status 0; expected)"
    assert endings["relay"] == "RUNNING when supervisord went away (no record of its end)"


def test_sigterm_to_up_stops_every_stage_and_supervisord(tmp_path: Path) -> None:
    """`sipbridge up` under systemd or docker gets SIGTERM, not Ctrl-C: it must still stop what it started."""
    run_dir = _run_dir(tmp_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[[stage]]\nname = "source"\nkind = "source"\nargs = ["--frames", "0", "--width", "160", "--height", "120"]\n'
        '[[stage]]\nname = "sink"\nkind = "sink"\ninputs = ["source"]\n'
    )
    up = subprocess.Popen([sys.executable, "-m", "sipbridge", "up", str(pipeline), "--run-dir", str(run_dir),
                           "--forever"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(pids) < 2:
            time.sleep(0.5)
            result = CliRunner().invoke(cli, ["status", "--json", "--run-dir", str(run_dir)])
            if result.exit_code == 0:
                stages = json.loads(result.output)["stages"]
                pids = {s["figures"]["pid"] for s in stages.values() if s.get("figures")}
        assert len(pids) == 2, "the pipeline never came up"
        supervisord = int((run_dir / "supervisord.pid").read_text())
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0, up.stdout.read().decode() if up.stdout else ""
        # The summary says how each stage ended, not the state it was in before the stop (RUNNING).
        output = up.stdout.read().decode() if up.stdout else ""
        summary = output[output.index("how each stage ended:"):]
        assert "RUNNING" not in summary, summary
        assert re.search(r"sink: (stopped on request|ended by itself) \(exit status 0", summary), summary
    finally:
        if up.poll() is None:
            up.kill()
            _kill_leftovers(run_dir)
    for pid in (*pids, supervisord):
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid


LIVE_PIPELINE = """live = true
[[stage]]
name = "source"
kind = "source"
args = ["--frames", "0", "--width", "160", "--height", "120", "--fps", "30"]
[[stage]]
name = "relay"
kind = "transformer"
inputs = ["source"]
[[stage]]
name = "relay2"
kind = "transformer"
inputs = ["relay"]
[[stage]]
name = "sink"
kind = "sink"
inputs = ["relay2"]
"""


def _wait(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def _start_up(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    run_dir = _run_dir(tmp_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(text)
    up = subprocess.Popen([sys.executable, "-m", "sipbridge", "up", str(pipeline), "--run-dir", str(run_dir),
                           "--forever"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    return up, run_dir


def _kill_leftovers(run_dir: Path) -> None:
    """A test that failed half-way must not leave its pipeline running on a shared machine."""
    from sipbridge.commands import _pipeline_processes

    pids = set(_pipeline_processes(run_dir))
    with contextlib.suppress(OSError, ValueError):
        supervisord = int((run_dir / "supervisord.pid").read_text())
        if str(run_dir).encode() in Path(f"/proc/{supervisord}/cmdline").read_bytes():  # not a reused pid
            pids.add(supervisord)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _stop_up(up: subprocess.Popen[bytes], run_dir: Path) -> str:
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    _kill_leftovers(run_dir)
    return up.stdout.read().decode(errors="replace") if up.stdout else ""


def test_a_live_pipeline_survives_a_stage_killed_or_stopped_mid_call(tmp_path: Path) -> None:
    """SIGKILL of a middle stage, then a clean exit 0 of it (SIGTERM): each time the stage comes back, the stages
    downstream keep running (same pids) and media reaches the sink again. Before, an exit 0 sent end of stream,
    every stage downstream exited 0 and supervisord (autorestart=unexpected) left them down."""
    from sipbridge.supervise import process_states
    from tests.stagehelp import StatsWatcher

    up, run_dir = _start_up(tmp_path, LIVE_PIPELINE)
    watcher = None
    try:
        names = ("source", "relay", "relay2", "sink")
        states = _wait(lambda: (s := process_states(run_dir)) and all(
            s.get(n, {}).get("statename") == "RUNNING" for n in names) and s, 60, "the pipeline to come up")
        watcher = StatsWatcher(f"ipc://{run_dir}/sink.stats")

        def sink_frames() -> int:
            try:
                figures = watcher.latest_stats(timeout_s=5)
            except AssertionError:  # no statistics yet: a loaded machine can take a while to start Python
                return 0
            return figures["streams"].get("video0", {}).get("frames_in", 0)

        _wait(lambda: sink_frames() > 10, 120, "media at the sink")
        for how in (signal.SIGKILL, signal.SIGTERM):
            victim = states["relay"]["pid"]
            downstream = {n: states[n]["pid"] for n in ("relay2", "sink")}
            os.kill(victim, how)
            states = _wait(lambda victim=victim: (s := process_states(run_dir)) and s["relay"]["statename"] == "RUNNING"
                           and s["relay"]["pid"] != victim and s, 60, f"relay back after {how.name}")
            assert {n: states[n]["pid"] for n in downstream} == downstream, f"a stage downstream ended ({how.name})"
            assert all(states[n]["statename"] == "RUNNING" for n in downstream), states
            before = sink_frames()
            _wait(lambda before=before: sink_frames() > before + 15, 60, f"media flowing again after {how.name}")
            states = process_states(run_dir)
            assert {n: states[n]["pid"] for n in downstream} == downstream
    finally:
        if watcher is not None:
            watcher.close()
        output = _stop_up(up, run_dir)
    assert up.returncode == 0, output


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_up_exits_non_zero_when_its_supervisord_dies_or_hangs(fault: str, tmp_path: Path) -> None:
    from sipbridge.supervise import process_states

    up, run_dir = _start_up(tmp_path, LIVE_PIPELINE)
    try:
        states = _wait(lambda: (s := process_states(run_dir)) and len(s) == 4 and all(
            i["statename"] == "RUNNING" for i in s.values()) and s, 60, "the pipeline to come up")
        stage_pids = [info["pid"] for info in states.values()]
        supervisord = int((run_dir / "supervisord.pid").read_text())
        os.kill(supervisord, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        code = up.wait(90)
    finally:
        output = _stop_up(up, run_dir)
    assert code != 0
    expected = "supervisord exited unexpectedly" if fault == "killed" else "supervisord has not answered"
    assert expected in output, output
    assert not os.path.exists(f"/proc/{supervisord}") or "zombie" in Path(f"/proc/{supervisord}/status").read_text()
    # The stages it left behind are stopped, not orphaned.
    _wait(lambda: not any(os.path.exists(f"/proc/{p}") and "zombie" not in Path(f"/proc/{p}/status").read_text()
                          for p in stage_pids), 60, "the orphaned stages to stop")


JANUS_STAND_IN = """import hashlib, os, sys, time
for name in ("SIPBRIDGE_STAGE_JANUS_SECRET", "SIPBRIDGE_STAGE_JANUS_API_SECRET"):
    print(name, hashlib.sha256(os.environ.get(name, "").encode()).hexdigest(), flush=True)
time.sleep(600)
"""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def test_secrets_reach_only_the_janus_stage(tmp_path: Path) -> None:
    """The SIP password and the Janus API secret, with quotes, %, backslashes and a newline, reach the janus
    stage's environment intact and nothing else: no other process's environment or command line, no file in the
    run folder (rendered configuration, logs), not `sipbridge status`, not supervisord's errors or `up`'s output.
    The same run shows the run folder rules: 0700, and a second `up` there is refused without touching it."""
    import hashlib

    from sipbridge.supervise import process_states

    sip_secret = 'pa"ss\'w%(ENV_HOME)s\\d\nline2 ;x'
    api_secret = "api-%s-secret-\\-value"
    stand_in = tmp_path / "janus_stand_in.py"
    stand_in.write_text(JANUS_STAND_IN)
    text = LIVE_PIPELINE + f"""[[stage]]
name = "janus"
command = "{sys.executable} {stand_in}"
[stage.secrets]
SIPBRIDGE_STAGE_JANUS_SECRET = "env:SB_TEST_SIP_SECRET"
SIPBRIDGE_STAGE_JANUS_API_SECRET = "env:SB_TEST_API"
"""
    env = {**os.environ, "SB_TEST_SIP_SECRET": sip_secret, "SB_TEST_API": api_secret}
    up, run_dir = _start_up(tmp_path, text, env)
    try:
        states = _wait(lambda: (s := process_states(run_dir)) and len(s) == 5 and all(
            i["statename"] == "RUNNING" for i in s.values()) and s, 60, "the pipeline to come up")
        janus_log = run_dir / "logs" / "janus.log"
        _wait(lambda: janus_log.exists() and janus_log.read_text().count("\n") >= 2, 30, "the stand-in's report")
        assert janus_log.read_text().split() == [
            "SIPBRIDGE_STAGE_JANUS_SECRET", hashlib.sha256(sip_secret.encode()).hexdigest(),
            "SIPBRIDGE_STAGE_JANUS_API_SECRET", hashlib.sha256(api_secret.encode()).hexdigest()]
        assert (run_dir.stat().st_mode & 0o777) == 0o700

        # A second pipeline in the same folder is refused, and the running one's files are left as they were.
        conf_before = (run_dir / "supervisord.conf").read_bytes()
        second = subprocess.run([sys.executable, "-m", "sipbridge", "up", str(tmp_path / "p.toml"), "--run-dir",
                                 str(run_dir)], capture_output=True, text=True, timeout=60, env=env)
        assert second.returncode != 0 and "a pipeline already runs in" in second.stderr, second
        assert (run_dir / "supervisord.conf").read_bytes() == conf_before
        assert process_states(run_dir)["sink"]["pid"] == states["sink"]["pid"]

        status = subprocess.run([sys.executable, "-m", "sipbridge", "status", "--json", "--run-dir", str(run_dir)],
                                capture_output=True, timeout=60)
        supervisord = int((run_dir / "supervisord.pid").read_text())
        janus_pid = states["janus"]["pid"]
        needles = [s.encode() for s in (sip_secret, api_secret)]
        seen_in: list[str] = []
        for pid in _descendants(supervisord):
            for part in ("environ", "cmdline"):
                try:
                    data = Path(f"/proc/{pid}/{part}").read_bytes()
                except OSError:
                    continue
                if any(n in data for n in needles):
                    seen_in.append(f"{pid}/{part}")
        for path in run_dir.rglob("*"):
            if path.is_file() and not path.is_symlink() and any(n in path.read_bytes() for n in needles):
                seen_in.append(str(path))
        if any(n in status.stdout + status.stderr for n in needles):
            seen_in.append("sipbridge status")
        assert sorted(seen_in) == [f"{janus_pid}/environ"]
        assert all(n in Path(f"/proc/{janus_pid}/environ").read_bytes() for n in needles)
    finally:
        output = _stop_up(up, run_dir)
    assert up.returncode == 0, output
    assert sip_secret not in output and api_secret not in output
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert sip_secret.encode() not in path.read_bytes(), path


def test_the_secret_broker_answers_only_the_program_supervisord_started(tmp_path: Path) -> None:
    from sipbridge.secretenv import fetch
    from sipbridge.supervise import SecretBroker

    run_dir = _run_dir(tmp_path)
    owner = {"janus": os.getpid()}
    broker = SecretBroker(run_dir, {"janus": {"SIPBRIDGE_STAGE_JANUS_SECRET": 'a"b%c\\d\ne'}}, owner.get)
    broker.start()
    try:
        assert (run_dir / "secrets.sock").stat().st_mode & 0o777 == 0o600
        assert fetch(str(run_dir / "secrets.sock"), "janus") == {"SIPBRIDGE_STAGE_JANUS_SECRET": 'a"b%c\\d\ne'}
        owner["janus"] = 1  # another process is supervisord's janus: this one is refused
        with pytest.raises(RuntimeError, match="is not supervisord's 'janus'") as refused:
            fetch(str(run_dir / "secrets.sock"), "janus")
        assert "a\"b" not in str(refused.value)
        with pytest.raises(RuntimeError, match="no secrets for program 'browser'"):
            fetch(str(run_dir / "secrets.sock"), "browser")
        assert (broker.handed, broker.refused) == (1, 2)
    finally:
        broker.close()
    assert not (run_dir / "secrets.sock").exists()


def test_environment_values_reach_the_program_exactly_or_are_refused(tmp_path: Path, monkeypatch) -> None:
    """supervisord's environment= line has no escapes: a value with one kind of quote and % signs is quoted with
    the other kind and passes unchanged; one it cannot carry is refused, naming the key. Arguments pass exactly,
    even with a ; or # after a space (which supervisord's file format reads as the start of a comment)."""
    from supervisor.options import ServerOptions

    value = 'say "hi" at 100%;now'
    args = ["--display-name", "Team #1 ; it's 100%", "--x", "a#b;c"]
    specs = parse_pipeline({"stage": [{"name": "a", "kind": "source", "env": {"GREETING": value, "PLAIN": "x y"},
                                       "args": args}]})
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "supervisord.conf"
    conf.write_text(render_config(specs, tmp_path))
    monkeypatch.setenv("SIPBRIDGE_PYTHON", sys.executable)
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    [program] = [p for g in options.process_group_configs for p in g.process_configs]
    assert program.environment["GREETING"] == value and program.environment["PLAIN"] == "x y"
    assert shlex.split(program.command)[-len(args):] == args
    for bad, why in (("line\nbreak", "a newline"), ("both ' and \"", "both kinds"), ("a #b", "a space before")):
        with pytest.raises(PipelineError, match=rf"stage 'a'\.env\.X: a value with .*{why}"):
            parse_pipeline({"stage": [{"name": "a", "kind": "source", "env": {"X": bad}}]})


def test_up_with_a_local_janus_outside_a_namespace_says_what_to_run(tmp_path: Path) -> None:
    """janus.start = true outside a namespace with the ICE set-up cannot carry media: `up` refuses with the exact
    commands (before starting anything)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "bridge-local.toml"
    run_dir = _run_dir(tmp_path)
    result = CliRunner().invoke(cli, ["up", str(example), "--run-dir", str(run_dir)])
    assert result.exit_code == 1, result.output
    assert f"sipbridge up {example} --netns sb-bridge" in result.output
    assert "sipbridge netns create sb-bridge" in result.output
    assert f"sipbridge netns exec sb-bridge -- sipbridge up {example}" in result.output
    assert not (run_dir / "supervisord.conf").exists()


@pytest.mark.media
def test_up_netns_makes_the_namespace_runs_the_pipeline_in_it_and_removes_it(tmp_path: Path) -> None:
    from sipbridge import netns as netns_mod

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    run_dir = _run_dir(tmp_path)
    name = netns_mod.unique_name()
    pipeline = tmp_path / "p.toml"
    # A stage that says which namespace it runs in and whether the veth a local Janus uses is there.
    probe = "sh -c 'readlink /proc/self/ns/net; ip -o link show sbv0; sleep 1.5'"
    pipeline.write_text(f'[[stage]]\nname = "probe"\ncommand = "{probe}"\n')
    result = CliRunner().invoke(cli, ["up", str(pipeline), "--run-dir", str(run_dir), "--netns", name])
    assert result.exit_code == 0, result.output
    assert f"network namespace {name} (made for this run; deleted at its end)" in result.output
    log = (run_dir / "logs" / "probe.log").read_text()
    assert os.readlink("/proc/self/ns/net") not in log and "net:[" in log and "sbv0" in log, log
    assert not netns_mod.exists(name)
    # Inside such a namespace the local-Janus check passes.
    with netns_mod.NetNs(name) as namespace, namespace.entered():
        from sipbridge.commands import _check_local_janus

        _check_local_janus(pipeline)


FAKE_INBOUND_JANUS = """
import sys, time
import zmq
import protocol

run_dir = sys.argv[1]
sock = zmq.Context().socket(zmq.PUB)
sock.bind(f"ipc://{run_dir}/janus.stats")
figures = {"streams": {}, "registration": {"state": "registered", "contact": "sip:bridge@127.0.0.1:41234"}}
end = time.monotonic() + 6
while time.monotonic() < end:
    sock.send_multipart(protocol.encode(protocol.Stats("janus", time.time_ns(), figures)))
    time.sleep(0.2)
"""


def test_up_prints_the_inbound_uri_and_status_shows_it(tmp_path: Path) -> None:
    """An inbound janus stage reports the URI callers dial (its Janus handle's own port): `up` prints it once it is
    known, and `status` shows it (a stand-in stage publishes the figures the janus stage does)."""
    from rich.console import Console

    from sipbridge.status import StatusCollector, render, snapshot

    run_dir = _run_dir(tmp_path)
    script = tmp_path / "fake_janus.py"
    script.write_text(FAKE_INBOUND_JANUS)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'[[stage]]\nname = "janus"\ncommand = "{sys.executable} {script} {run_dir}"\n')
    up = subprocess.Popen([sys.executable, "-m", "sipbridge", "up", str(pipeline), "--run-dir", str(run_dir)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        collector = StatusCollector(run_dir)
        try:
            _wait(lambda: (collector.poll(0.3), collector.figures.get("janus"))[1], 30, "the janus figures")
            text = snapshot(collector, {})
            assert text["inbound_uri"] == "sip:bridge@127.0.0.1:41234"
            assert text["call"] == "no call (janus: SIP registered; callers dial sip:bridge@127.0.0.1:41234)"
            console = Console(width=80, record=True)
            console.print(render(collector, {"janus": {"statename": "RUNNING"}}, 80))
            shown = console.export_text()
            assert "callers dial" in shown and "sip:bridge@127.0.0.1:41234" in shown, shown
        finally:
            collector.close()
        output, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            _kill_leftovers(run_dir)
    assert output.decode().count("inbound: callers dial sip:bridge@127.0.0.1:41234") == 1, output.decode()


def _niceness(pid: int) -> int:
    # /proc/PID/stat: field 19 is the nice value; the command name (field 2) may hold spaces, so split after it.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_nice_reaches_every_program_and_their_children(tmp_path: Path) -> None:
    """`nice = -5`: each program runs at -5 under supervisord (coreutils nice execs it, so supervisord's pid is still
    the program's), and what a program starts (the bot's Chromium, say) inherits it."""
    probe = tmp_path / "probe.sh"
    probe.write_text("#!/bin/sh\nsleep 300 &\nwait\n")  # a program with a child
    probe.chmod(0o755)
    up, run_dir = _start_up(tmp_path, "nice = -5\n" + LIVE_PIPELINE
                            + f'[[stage]]\nname = "probe"\ncommand = "{probe}"\n')  # fmt: skip
    try:
        from sipbridge.supervise import process_states

        def pids() -> dict[str, int] | None:
            states = process_states(run_dir)
            running = {name: int(s["pid"]) for name, s in states.items() if s.get("statename") == "RUNNING"}
            return running if len(running) == 5 else None

        running = _wait(pids, 60, "all five programs running")
        assert {name: _niceness(pid) for name, pid in running.items()} == dict.fromkeys(running, -5)
        children = _wait(lambda: Path(f"/proc/{running['probe']}/task/{running['probe']}/children").read_text().split(),
                         10, "the probe's child")  # fmt: skip
        assert _niceness(int(children[0])) == -5
        assert "cannot set niceness" not in (run_dir / "logs" / "source.log").read_text()
    finally:
        _stop_up(up, run_dir)


def test_a_niceness_the_user_may_not_set_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """Without CAP_SYS_NICE (dropped here from root's bounding set) and with RLIMIT_NICE at its default, a negative
    nice would be ignored by the kernel and the call would run at 0 with no word: `up` refuses it and says how to
    allow it; a pipeline that asks for nothing below what the user may set still starts."""
    run_dir = _run_dir(tmp_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("nice = -5\n" + LIVE_PIPELINE)
    no_cap = ["setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice"]
    result = subprocess.run([*no_cap, sys.executable, "-m", "sipbridge", "up", str(pipeline), "--run-dir",
                             str(run_dir)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1, result
    assert "nice -5 is not allowed for this user (lowest allowed: 0)" in result.stderr
    assert "CAP_SYS_NICE" in result.stderr and "RLIMIT_NICE to 25" in result.stderr
    assert not (run_dir / "supervisord.pid").exists()
    check = "from sipbridge.supervise import *; check_nice(parse_pipeline({'nice': 3, 'stage': [{'name': 'a', " \
            "'kind': 'sink'}]})); print('ok')"  # fmt: skip
    assert subprocess.run([*no_cap, sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "ok"  # fmt: skip


def test_pipeline_nice_must_be_a_niceness() -> None:
    for bad in (-21, 20, True, "5", 1.5):
        with pytest.raises(PipelineError, match="nice must be a whole number from -20 to 19"):
            parse_pipeline({"nice": bad, "stage": [{"name": "a", "kind": "sink"}]})
