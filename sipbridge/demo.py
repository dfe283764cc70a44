"""The main job on the embedded default: run a pipeline locally, show progress, then a summary."""

from __future__ import annotations

import json
import tempfile
import tomllib
from pathlib import Path

import click

from sipbridge.commands import DEFAULT_PIPELINE, run_pipeline


def run_demo(run_dir: Path, seconds: float) -> None:
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    report = run_dir / "sink.report.json"
    report.unlink(missing_ok=True)
    with open(DEFAULT_PIPELINE, "rb") as fh:
        text = DEFAULT_PIPELINE.read_text()
        tomllib.load(fh)  # validate before rewriting paths
    frames = str(int(seconds * 30))
    text = text.replace('"--frames", "300"', f'"--frames", "{frames}"').replace("/tmp/sipbridge", str(run_dir))
    with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=run_dir, delete=False) as pipeline:
        pipeline.write(text)
    click.echo(
        f"demo: synthetic room media ({seconds:.0f} s of 640x480@30 VP8 + Opus) through decoder, "
        "transformer (320x240, 8 kHz) and the verifying sink, under supervisord"
    )
    final = run_pipeline(Path(pipeline.name), run_dir, forever=False)
    if not report.exists():
        raise click.ClickException(f"the sink wrote no report; see {run_dir}/logs")
    summary = json.loads(report.read_text())
    click.echo("\nsummary")
    for sid, video in sorted(summary["video"].items()):
        click.echo(
            f"  video {sid}: {video['frames']} frames {video['size'][0]}x{video['size'][1]}, counters "
            f"{video['first_counter']}..{video['last_counter']}, missing {video['missing']}, "
            f"out of order {video['out_of_order']}, latency p50 {video['latency_ms_p50']:.1f} ms "
            f"p95 {video['latency_ms_p95']:.1f} ms"
        )
    for sid, audio in sorted(summary["audio"].items()):
        click.echo(
            f"  audio {sid}: {audio['samples']} samples at {audio['sample_rate']} Hz, tone "
            f"{audio['frequency_hz']} Hz at {audio['level_dbfs']} dBFS, latency p50 "
            f"{audio['latency_ms_p50']:.1f} ms"
        )
    for sid, path in sorted(summary["recordings"].items()):
        click.echo(f"  recording {sid}: {path} (+ .png snapshot)")
    failed = [n for n, info in final.items() if info.get("exitstatus")]
    if failed:
        raise click.ClickException(f"stage(s) failed: {', '.join(failed)}")
