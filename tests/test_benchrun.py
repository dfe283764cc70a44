"""The benchmark runner: repeated runs, min-max summaries, each program's CPU, provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sipbridge import benchrun, commands
from sipbridge.cli import cli

BUSY_CPU_S = 0.6


def test_summary_is_min_max_median_of_figures_present_in_every_run() -> None:
    runs = [
        {"video": {"p50_ms": 10.0, "p95_ms": [20, 30]}, "ok": True, "only_once": 1, "samples": list(range(50))},
        {"video": {"p50_ms": 14.0, "p95_ms": [22, 26]}, "ok": False},
        {"video": {"p50_ms": 12.0, "p95_ms": [21, 40]}, "ok": True, "nan": float("nan")},
    ]
    summary = benchrun.summarise(runs)
    assert summary["video.p50_ms"] == {"min": 10.0, "max": 14.0, "median": 12.0}
    assert summary["video.p95_ms[1]"] == {"min": 26.0, "max": 40.0, "median": 30.0}
    # Booleans are verdicts, a figure from one run is no min-max, long lists are samples, NaN is no figure.
    assert set(summary) == {"video.p50_ms", "video.p95_ms[0]", "video.p95_ms[1]"}


@pytest.mark.parametrize(
    ("comm", "argv", "label"),
    [
        ("python", [sys.executable, "-m", "sipbridge", "stage", "encoder", "--name", "sip-encoder"], "stage:encoder"),
        ("python", [sys.executable, "-m", "sipbridge", "room", "participant", "--room", "1"],
         "sipbridge room participant"),
        ("python", [sys.executable, "-m", "sipbridge.supervisord", "-n", "-c", "/tmp/x.conf"], "supervisord"),
        ("chromium", ["/usr/lib/chromium/chromium", "--type=renderer"], "chromium"),
        ("janus", ["janus", "-F", "/tmp/x"], "janus"),
        ("python3", ["python3", "/work/bench/bench_bridge.py"], "python bench_bridge.py"),
    ],
)
def test_processes_are_labelled_by_program(comm: str, argv: list[str], label: str) -> None:
    assert benchrun.label_of(comm, argv) == label


def test_accountant_attributes_a_child_s_cpu_time_to_its_program(tmp_path: Path) -> None:
    # Burns a fixed amount of its own CPU time, however loaded the machine is. The script's name is unique: the
    # accountant sees the whole machine, where other programs (a loaded run's busy loops) may be `python -c`.
    script = tmp_path / f"accountant_probe_{os.getpid()}.py"
    script.write_text(f"import time\nwhile time.process_time() < {BUSY_CPU_S}: pass\n")
    accountant = benchrun.ProcessAccountant()
    accountant.start()
    subprocess.run([sys.executable, str(script)], check=True)
    figures = accountant.stop()
    busy = figures.get(f"python {script.name}")
    assert busy is not None, figures
    # At most one sample period of a process that ended between samples is lost, never invented.
    assert BUSY_CPU_S - benchrun.SAMPLE_INTERVAL_S <= busy["cpu_s"] <= BUSY_CPU_S + 0.3, busy
    assert busy["pss_mb_max"] > 1


def test_bench_runs_n_times_and_records_provenance_load_and_programs(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    (bench_dir / "bench_fake.py").write_text(
        f"import json, pathlib, random, time\nwhile time.process_time() < {BUSY_CPU_S}: pass\n"
        "out = pathlib.Path(__file__).parent / 'results' / 'fake.json'\n"
        "out.parent.mkdir(exist_ok=True)\n"
        "out.write_text(json.dumps({'latency_ms': {'p50': random.uniform(1, 2)}}))\n"
    )
    monkeypatch.setattr(commands, "PROJECT_DIR", tmp_path)
    monkeypatch.setitem(commands.BENCHMARKS, "fake", "bench_fake.py")
    result = CliRunner().invoke(cli, ["bench", "fake", "--runs", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads((bench_dir / "results" / "fake.json").read_text())
    assert len(report["runs"]) == 3
    values = [r["result"]["latency_ms"]["p50"] for r in report["runs"]]
    assert report["summary"]["latency_ms.p50"]["min"] == min(values)
    assert report["summary"]["latency_ms.p50"]["max"] == max(values)
    for run in report["runs"]:
        assert len(run["load_avg_before"]) == 3 and len(run["load_avg_after"]) == 3
        assert "python bench_fake.py" in run["programs"], run["programs"]
    assert report["provenance"]["cores"] >= 1


def test_a_failing_benchmark_fails_the_command_and_leaves_no_stale_result(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bench_dir = tmp_path / "bench"
    (bench_dir / "results").mkdir(parents=True)
    (bench_dir / "results" / "fake.json").write_text('{"stale": 1}')
    (bench_dir / "bench_fake.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(commands, "PROJECT_DIR", tmp_path)
    monkeypatch.setitem(commands.BENCHMARKS, "fake", "bench_fake.py")
    result = CliRunner().invoke(cli, ["bench", "fake", "--runs", "2"])
    assert result.exit_code != 0
    assert "benchmark(s) failed: fake" in result.output
    assert not (bench_dir / "results" / "fake.json").exists()


def test_an_unknown_benchmark_is_refused_by_name() -> None:
    result = CliRunner().invoke(cli, ["bench", "nosuch"])
    assert result.exit_code == 2
    assert "nosuch: not one of" in result.output
