"""Pipeline-level commands: up, status, bench, demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click

from sipbridge.cli import cli
from stages.base import DEFAULT_RUN_DIR

PROGRESS_INTERVAL_S = 2.0
# supervisord silent on its socket this long (alive but hung) ends `up` with an error.
SUPERVISOR_SILENT_LIMIT_S = 15.0
PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
DEFAULT_PIPELINE = PACKAGE_DIR / "pipelines" / "synthetic.toml"

run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SIPBRIDGE_RUN_DIR",
    default=DEFAULT_RUN_DIR,
    show_default=True,
    help="Where sockets, logs and reports of the pipeline live.",
)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class SupervisorLost(click.ClickException):
    """supervisord died or stopped answering under `up`."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _pipeline_processes(run_dir: Path) -> dict[int, str | None]:
    """Processes started for the pipeline in ``run_dir``: every program gets SIPBRIDGE_RUN_DIR in its environment."""
    marker = f"SIPBRIDGE_RUN_DIR={run_dir}".encode()
    found: dict[int, str | None] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found[int(entry)] = _start_time(int(entry))
    return found


def _stop_orphans(known: dict[int, str | None], run_dir: Path) -> list[int]:
    """SIGTERM the stages a dead supervisord left running (each in its own process group), pid reuse excluded."""
    stopped = []
    for pid, started in {**_pipeline_processes(run_dir), **known}.items():
        if started is not None and _start_time(pid) == started:
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    continue
            stopped.append(pid)
    return stopped


NETNS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def _check_local_janus(config: Path) -> None:
    """janus.start runs the project's Janus, which gathers ICE candidates only on the veth end of a namespace made
    by `sipbridge netns` (it skips loopback interfaces): outside one, no call could carry media. Say what to run."""
    from sipbridge import netns as netns_mod

    if netns_mod.ice_ready():
        return
    raise click.ClickException(
        f"{config}: janus.start = true runs the project's Janus, which gathers ICE candidates only on the veth "
        f"'{netns_mod.VETH_INSIDE}' of a network namespace made for it (Janus skips loopback interfaces), and this "
        "process is not in one. Let `up` make one, run the bridge in it and delete it at the end (root):\n"
        f"    sipbridge up {config} --netns sb-bridge\n"
        "or make it yourself and run the bridge inside:\n"
        "    sipbridge netns create sb-bridge\n"
        f"    sipbridge netns exec sb-bridge -- sipbridge up {config}\n"
        "A namespace reaches nothing outside itself: run what the bridge talks to in it too, e.g. the local room "
        "(`sipbridge netns exec sb-bridge -- sipbridge room serve`) and the SIP peer.")


def run_pipeline(config: Path, run_dir: Path, forever: bool, quiet: bool = False) -> dict[str, Any]:
    """Start a pipeline under supervisord, print progress, stop it when done; return the final states."""
    from sipbridge.status import StatusCollector, inbound_uri, progress_line
    from sipbridge.supervise import (
        PipelineError,
        Supervisor,
        ensure_run_dir_free,
        parse_pipeline,
        render_config,
        stage_endings,
        stage_secrets,
    )

    run_dir = run_dir.resolve()
    secrets: dict[str, dict[str, str]] = {}
    secret_names: set[str] = set()
    try:
        # Before anything is written: a folder where a pipeline runs is refused, and never wiped.
        ensure_run_dir_free(run_dir, fresh_logs=True)
    except (PipelineError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if config.suffix == ".toml":
        from sipbridge.bridge import BridgeConfigError, bridge_stages, parse_bridge, run_secrets

        try:
            with open(config, "rb") as fh:
                data = tomllib.load(fh)
            specs = parse_pipeline(data) if "stage" in data else bridge_stages(parse_bridge(data), run_dir)
            secrets = stage_secrets(specs, run_secrets(specs))
            secret_names = {source for spec in specs for source in spec.secrets.values()}
        except (tomllib.TOMLDecodeError, PipelineError, BridgeConfigError) as exc:
            raise click.ClickException(f"{config}: {exc}") from None
        if "stage" not in data and parse_bridge(data).start_janus:
            _check_local_janus(config)
        conf_path = run_dir / "supervisord.conf"
        try:
            conf_path.write_text(render_config(specs, run_dir))
        except PipelineError as exc:
            raise click.ClickException(f"{config}: {exc}") from None
    else:
        conf_path = config
    os.environ["SIPBRIDGE_RUN_DIR"] = str(run_dir)
    os.environ["SIPBRIDGE_PYTHON"] = sys.executable
    supervisor = Supervisor(conf_path, run_dir, secrets=secrets, secret_names=secret_names)
    try:
        supervisor.start()
    except PipelineError as exc:
        raise click.ClickException(str(exc)) from None
    collector = StatusCollector(run_dir)
    click.echo(f"pipeline up: {conf_path} (logs in {run_dir}/logs; `sipbridge status --run-dir {run_dir}`)")
    final: dict[str, Any] = {}
    announced: str | None = None  # the inbound SIP URI last printed
    # Every stage process seen, with its start time: what to stop if supervisord dies under us.
    known: dict[int, str | None] = {}
    answered_s = time.monotonic()
    # SIGTERM (systemd, docker stop, kill) takes the same way out as Ctrl-C: hang up, flush, stop supervisord.
    # Left at its default it would end this process at once and orphan supervisord with every stage.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            collector.poll(PROGRESS_INTERVAL_S)
            states = supervisor.states()
            if not supervisor.alive():
                code = supervisor.proc.returncode if supervisor.proc else None
                stopped = _stop_orphans(known, run_dir)
                raise SupervisorLost(f"supervisord exited unexpectedly (code {code}); the pipeline is down"
                                     + (f"; stopped {len(stopped)} stage process(es) it left" if stopped else ""))
            if states:
                final = states
                answered_s = time.monotonic()
                for info in states.values():
                    if info.get("pid") and info["pid"] not in known:
                        known[info["pid"]] = _start_time(info["pid"])
            elif time.monotonic() - answered_s > SUPERVISOR_SILENT_LIMIT_S:
                supervisor.kill()
                stopped = _stop_orphans(known, run_dir)
                raise SupervisorLost(f"supervisord has not answered on {run_dir}/supervisor.sock for "
                                     f"{SUPERVISOR_SILENT_LIMIT_S:.0f} s; killed it"
                                     + (f" and stopped {len(stopped)} stage process(es)" if stopped else ""))
            contact = inbound_uri(collector.figures)
            if contact and contact != announced:
                # Printed whatever `quiet` says: it is what a caller needs (a new Janus handle gets a new port).
                click.echo(f"inbound: callers dial {contact}")
                announced = contact
            if not quiet:
                click.echo(progress_line(collector, states))
            if not forever and supervisor.all_finished():
                break
    except KeyboardInterrupt:
        click.echo("stopping: stages flush and send end of stream")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean stop short
        final = supervisor.states() or final
        supervisor.stop()
        collector.close()
        signal.signal(signal.SIGTERM, previous)
    click.echo("how each stage ended:")
    for name, how in stage_endings(run_dir, final).items():
        click.echo(f"  {name}: {how}")
    return final


def _run_in_netns(name: str, config: Path, run_dir: Path, forever: bool) -> dict[str, Any]:
    """``run_pipeline`` from inside namespace ``name`` (supervisord and every stage inherit it from this thread)."""
    from sipbridge import netns as netns_mod

    if not NETNS_NAME.fullmatch(name):
        raise click.BadParameter("letters, digits, _ . - (up to 32)", param_hint="--netns")
    namespace = netns_mod.NetNs(name)
    made = not netns_mod.exists(name)
    try:
        if made:
            namespace.create()
        with namespace.entered():
            click.echo(f"network namespace {name}" + (" (made for this run; deleted at its end)" if made else ""))
            return run_pipeline(config, run_dir, forever)
    except netns_mod.NetNsError as exc:
        raise click.ClickException(f"--netns {name}: {exc}") from None
    finally:
        if made:
            namespace.delete()


@cli.command()
@click.argument("config", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@run_dir_option
@click.option("--forever/--until-done", default=False, help="Keep running after every stage has ended.")
@click.option("--netns", default=None, metavar="NAME",
              help="Run the pipeline inside network namespace NAME (root): made, with the loopback ICE set-up a local "
                   "Janus (janus.start) needs, unless it exists, and then deleted at the end.")
def up(config: Path | None, run_dir: Path, forever: bool, netns: str | None) -> None:
    """Start a pipeline under supervisord: a supervisord .conf, a pipeline .toml or a bridge .toml.

    Without CONFIG it runs ./supervisord.conf when present, else the packaged synthetic pipeline.
    """
    if config is None:
        local = Path("supervisord.conf")
        config = local if local.exists() else DEFAULT_PIPELINE
    final = run_pipeline(config, run_dir, forever) if netns is None else _run_in_netns(netns, config, run_dir,
                                                                                        forever)
    failed = [n for n, info in final.items() if info["statename"] == "FATAL" or info.get("exitstatus")]
    if failed:
        raise click.ClickException(f"stage(s) failed: {', '.join(sorted(failed))}")


@cli.command()
@run_dir_option
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON (implies --once).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Refresh period in seconds.")
def status(run_dir: Path, once: bool, as_json: bool, interval: float) -> None:
    """Show each stage's live figures (refreshing table)."""
    from rich.console import Console
    from rich.live import Live

    from sipbridge.status import StatusCollector, render, snapshot
    from sipbridge.supervise import process_states

    if not run_dir.is_dir():
        raise click.ClickException(f"no pipeline run directory at {run_dir}")
    collector = StatusCollector(run_dir)
    try:
        if once or as_json:
            collector.poll(max(interval, 1.2))  # long enough to hear every stage's periodic statistics
            states = process_states(run_dir)
            if as_json:
                click.echo(json.dumps(snapshot(collector, states), indent=2, sort_keys=True))
            else:
                console = Console()
                console.print(render(collector, states, console.width))
            return
        with Live(render(collector, {}), refresh_per_second=4) as live:
            while True:
                collector.poll(interval)
                live.update(render(collector, process_states(run_dir), live.console.width))
    except KeyboardInterrupt:
        pass
    finally:
        collector.close()


BENCHMARKS = {
    "protocol": "bench_protocol.py",
    "chain": "bench_chain.py",
    "sip": "bench_sip.py",
    "browser": "bench_browser.py",
    "bridge": "bench_bridge.py",
    "calls": "bench_calls.py",
    "generators": "bench_generators.py",
    "cluster": "bench_cluster.py",
    "faults": "bench_faults.py",
    "soak": "bench_soak.py",
}
# Benchmarks that take a length in minutes (`sipbridge bench soak --minutes 60`).
MINUTES_BENCHMARKS = {"soak"}


@cli.command()
@click.argument("names", nargs=-1, metavar=f"[{'|'.join(sorted(BENCHMARKS))}]...")
@click.option("--runs", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Run each benchmark this many times; the JSON keeps every run and the min-max of each figure.")
@click.option("--bench-args", default="", help="Arguments passed to each benchmark script (e.g. '--seconds 10').")
@click.option("--minutes", type=click.IntRange(1), default=None,
              help=f"Length of a soak benchmark ({', '.join(sorted(MINUTES_BENCHMARKS))}) in minutes.")
def bench(names: tuple[str, ...], runs: int, bench_args: str, minutes: int | None) -> None:
    """Run the benchmarks in bench/ (all but the soak by default); each prints a table and writes bench/results/*.json.

    Each run's JSON records the commit, the machine, the load average before and after, and every program's
    CPU and peak PSS while it ran. A figure belongs in the README only as the min-max of at least 3 runs.
    """
    import shlex

    from sipbridge.benchrun import ProcessAccountant, provenance, summarise

    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not one of {', '.join(sorted(BENCHMARKS))}",
                                 param_hint="NAMES")
    if minutes is not None and not names:
        raise click.BadParameter(f"--minutes needs a benchmark that takes it: {', '.join(sorted(MINUTES_BENCHMARKS))}",
                                 param_hint="--minutes")
    if minutes is not None and set(names) - MINUTES_BENCHMARKS:
        raise click.BadParameter(f"--minutes applies to {', '.join(sorted(MINUTES_BENCHMARKS))} only, not "
                                 f"{', '.join(sorted(set(names) - MINUTES_BENCHMARKS))}", param_hint="--minutes")
    if minutes is not None:
        bench_args = f"{bench_args} --minutes {minutes}".strip()
    bench_dir = PROJECT_DIR / "bench"
    if not bench_dir.is_dir():
        raise click.ClickException(f"benchmarks live in the project checkout; {bench_dir} not found")
    failed = []
    # A soak runs for as long as it is asked to: only by name.
    for name in names or sorted(set(BENCHMARKS) - MINUTES_BENCHMARKS):
        script = bench_dir / BENCHMARKS[name]
        if not script.exists():
            click.echo(f"== {name}: {script.name} not found, skipped")
            continue
        result_path = bench_dir / "results" / f"{name}.json"
        records: list[dict[str, Any]] = []
        for index in range(runs):
            click.echo(f"== {name}" + (f" (run {index + 1} of {runs})" if runs > 1 else ""))
            result_path.unlink(missing_ok=True)  # a failed run must not pass off the previous run's figures
            started = time.monotonic()
            # Benchmarks import the project (tests.*, stages.*) from the checkout they live in.
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")])),
            }
            load_before = os.getloadavg()
            accountant = ProcessAccountant()
            accountant.start()
            code = subprocess.call([sys.executable, str(script), *shlex.split(bench_args)], cwd=PROJECT_DIR, env=env)
            programs = accountant.stop()
            wall_s = time.monotonic() - started
            click.echo(f"== {name}: exit {code} after {wall_s:.0f} s; load average "
                       f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
            top = ", ".join(f"{label} {fig['cpu_s'] / wall_s:.2f}" for label, fig in list(programs.items())[:8])
            click.echo(f"   cores by program over the run: {top}")
            if code:
                failed.append(name)
                break
            try:
                result = json.loads(result_path.read_text())
            except (OSError, ValueError) as exc:
                failed.append(name)
                click.echo(f"== {name}: no readable result in {result_path}: {exc}")
                break
            records.append({"result": result, "wall_s": round(wall_s, 1),
                            "load_avg_before": [round(x, 2) for x in load_before],
                            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
                            "programs": programs})
        if records:
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.write_text(json.dumps({
                "benchmark": name, "provenance": provenance(PROJECT_DIR), "bench_args": bench_args,
                "runs": records,
                "summary": summarise([r["result"] for r in records]),
                "programs_summary": summarise([r["programs"] for r in records]),
                "load_summary": summarise([{"before": r["load_avg_before"], "after": r["load_avg_after"]}
                                           for r in records]),
            }, indent=2) + "\n")
            click.echo(f"== {name}: {len(records)} run(s) written to {result_path}")
    if failed:
        raise click.ClickException(f"benchmark(s) failed: {', '.join(failed)}")


@cli.command()
@run_dir_option
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Length of the synthetic media.")
@click.option(
    "--sip-peer",
    type=click.Choice(["echo", "reject", "not-found"]),
    default="echo",
    show_default=True,
    help="The SIP peer: echoes RTP, or rejects the call (486 Busy Here, 404 Not Found) to see a FAIL.",
)
def demo(run_dir: Path, seconds: float, sip_peer: str) -> None:
    """Run one real bridged call on this machine (root) and print PASS/FAIL per check, then the details.

    Exits non-zero when any check fails.
    """
    # The local-call harness is imported here only: it is no part of the CLI's import path.
    from sipbridge.testing.demo import run_demo

    run_demo(run_dir, seconds, sip_peer)
