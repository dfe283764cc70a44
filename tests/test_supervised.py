"""Pipelines under supervisord: clean end, a SIGKILLed stage restarted, and the CLI around them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
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
    # ipc:// paths must stay under the 107-byte unix socket limit.
    short = Path(f"/tmp/sbt-{os.getpid()}-{tmp_path.name[-12:]}")
    short.mkdir(parents=True, exist_ok=True)
    return short


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
    result = CliRunner().invoke(cli, ["up", str(pipeline), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "sink: EXITED (exit 0)" in result.output
    report = json.loads((run_dir / "r.json").read_text())
    assert report["video"]["video0"]["last_counter"] == 29


def test_cli_options_come_from_env_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "sb.toml"
    config.write_text("[status]\ninterval = 0.2\n")
    runner = CliRunner()
    missing = runner.invoke(cli, ["--config", str(config), "status", "--once", "--run-dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no pipeline run directory" in missing.output
    env = runner.invoke(cli, ["status", "--json"], env={"SIPBRIDGE_RUN_DIR": str(tmp_path)})
    assert env.exit_code == 0, env.output
    assert json.loads(env.output) == {"call": None, "stages": {}}
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
    try:
        deadline = time.monotonic() + 30
        snapshot: dict = {}
        while time.monotonic() < deadline:
            result = CliRunner().invoke(cli, ["status", "--json", "--run-dir", str(run_dir)])
            assert result.exit_code == 0, result.output
            snapshot = json.loads(result.output)["stages"]
            sink = (snapshot.get("sink") or {}).get("figures") or {}
            if sink.get("streams", {}).get("video0", {}).get("frames_in", 0) > 30:
                break
        assert {name: s["state"] for name, s in snapshot.items()} == dict.fromkeys(
            ("sink", "source", "transformer"), "RUNNING"
        )
        source = snapshot["source"]["figures"]["streams"]["video0"]
        assert source["frames_out"] > 30
        assert snapshot["transformer"]["figures"]["streams"]["video0"]["latency_ms_p50"] is not None
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
    collector.close()


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
    finally:
        if up.poll() is None:
            up.kill()
    for pid in (*pids, supervisord):
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
