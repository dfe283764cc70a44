"""Turn a pipeline description into a supervisord configuration, run it, and watch it.

A pipeline TOML lists stages in order; each names its kind (a ``sipbridge stage`` command) or gives any
``command`` to put in that stage's place, plus its arguments and the stages it reads from::

    [[stage]]
    name = "source"
    kind = "source"
    args = ["--frames", "300"]

    [[stage]]
    name = "sink"
    kind = "sink"
    inputs = ["source"]

The generated file has the same shape as the top-level ``supervisord.conf``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from socket import AF_UNIX, SOCK_STREAM, socket
from typing import Any

SUPERVISOR_START_TIMEOUT_S = 15.0
# Stages flush and send end of stream on SIGTERM; give them time before supervisord escalates to SIGKILL.
STAGE_STOP_WAIT_S = 15
# The browser leaves children behind if only its leader is signalled.
GROUP_STOP_KINDS = {"browser"}
FINAL_STATES = {"EXITED", "FATAL", "STOPPED"}


class PipelineError(ValueError):
    """A pipeline description that cannot be run; the message names the bad key."""


@dataclass
class StageSpec:
    name: str
    kind: str | None = None
    command: str | None = None
    args: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # supervisord priority; None derives it from the list order (consumers start first).
    priority: int | None = None


def parse_pipeline(data: dict[str, Any]) -> list[StageSpec]:
    stages_data = data.get("stage")
    if not isinstance(stages_data, list) or not stages_data:
        raise PipelineError("pipeline needs at least one [[stage]] table")
    specs: list[StageSpec] = []
    for index, raw in enumerate(stages_data):
        where = f"stage[{index}]"
        if not isinstance(raw, dict):
            raise PipelineError(f"{where} must be a table")
        unknown = set(raw) - {"name", "kind", "command", "args", "inputs", "env"}
        if unknown:
            raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name = raw.get("name")
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise PipelineError(f"{where}.name must be a word of letters, digits, - and _")
        kind, command = raw.get("kind"), raw.get("command")
        if (kind is None) == (command is None):
            raise PipelineError(f"stage {name!r}: give exactly one of 'kind' or 'command'")
        args = raw.get("args", [])
        inputs = raw.get("inputs", [])
        env = raw.get("env", {})
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise PipelineError(f"stage {name!r}.args must be a list of strings")
        if not isinstance(inputs, list) or not all(isinstance(a, str) for a in inputs):
            raise PipelineError(f"stage {name!r}.inputs must be a list of stage names")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise PipelineError(f"stage {name!r}.env must be a table of strings")
        specs.append(StageSpec(name, kind, command, list(args), list(inputs), dict(env)))
    names = [s.name for s in specs]
    for spec in specs:
        if names.count(spec.name) > 1:
            raise PipelineError(f"stage name {spec.name!r} is used twice")
        for upstream in spec.inputs:
            if upstream not in names:
                raise PipelineError(f"stage {spec.name!r}.inputs names unknown stage {upstream!r}")
    return specs


def _program(spec: StageSpec, priority: int, run_dir: Path) -> str:
    if spec.command is not None:
        command = spec.command
    else:
        argv = [sys.executable, "-m", "sipbridge", "stage", spec.kind or "", "--name", spec.name]
        for upstream in spec.inputs:
            argv += ["--in", f"ipc://{run_dir}/{upstream}.sock"]
        # supervisord expands %(name)s in command lines: a literal % (a URL escape, a regex) must be doubled.
        command = shlex.join([*argv, *spec.args]).replace("%", "%%")
    group_stop = "true" if spec.kind in GROUP_STOP_KINDS else "false"
    env = ",".join(f'{k}="{v}"' for k, v in {"SIPBRIDGE_RUN_DIR": str(run_dir), **spec.env}.items())
    return f"""
[program:{spec.name}]
command={command}
priority={priority}
autostart=true
autorestart=unexpected
exitcodes=0
startsecs=1
startretries=5
stopsignal=TERM
stopwaitsecs={STAGE_STOP_WAIT_S}
stopasgroup={group_stop}
killasgroup={group_stop}
redirect_stderr=true
stdout_logfile={run_dir}/logs/%(program_name)s.log
stdout_logfile_maxbytes=10MB
stdout_logfile_backups=2
environment={env}
"""


def render_config(specs: list[StageSpec], run_dir: Path) -> str:
    """A supervisord configuration: consumers get lower priorities, so they start first and stop last."""
    header = f"""; generated by `sipbridge up`; see the top-level supervisord.conf for the commented original
[unix_http_server]
file={run_dir}/supervisor.sock
chmod=0700

[supervisord]
nodaemon=true
logfile={run_dir}/logs/supervisord.log
pidfile={run_dir}/supervisord.pid
childlogdir={run_dir}/logs

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{run_dir}/supervisor.sock
"""
    count = len(specs)
    programs = [
        _program(spec, spec.priority if spec.priority is not None else 100 + 10 * (count - i), run_dir)
        for i, spec in enumerate(specs)
    ]
    return header + "".join(programs)


class _UnixHTTPConnection(HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def connect(self) -> None:
        sock = socket(AF_UNIX, SOCK_STREAM)
        sock.connect(self.unix_path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.unix_path = path

    def make_connection(self, host: Any) -> HTTPConnection:
        return _UnixHTTPConnection(self.unix_path)


def rpc(run_dir: Path) -> Any:
    """XML-RPC proxy of a running supervisord (the ``supervisor`` namespace)."""
    proxy = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(str(run_dir / "supervisor.sock")))
    return proxy.supervisor


def process_states(run_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        return {p["name"]: p for p in rpc(run_dir).getAllProcessInfo()}
    except (OSError, xmlrpc.client.Error):
        return {}


class Supervisor:
    """A supervisord child process running one configuration in the foreground."""

    def __init__(self, config_path: Path, run_dir: Path) -> None:
        self.config_path = config_path
        self.run_dir = run_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        sock = self.run_dir / "supervisor.sock"
        if sock.exists() and process_states(self.run_dir):
            raise PipelineError(f"a pipeline already runs in {self.run_dir}; stop it or choose another --run-dir")
        supervisord = shutil.which("supervisord") or str(Path(sys.executable).with_name("supervisord"))
        env = {**os.environ, "SIPBRIDGE_RUN_DIR": str(self.run_dir)}
        self.proc = subprocess.Popen(
            [supervisord, "-n", "-c", str(self.config_path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT_S
        while not process_states(self.run_dir):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise PipelineError(f"supervisord exited at start ({self.proc.returncode}): {err.strip()}")
            if time.monotonic() > deadline:
                raise PipelineError("supervisord did not answer on its socket")
            time.sleep(0.1)

    def states(self) -> dict[str, dict[str, Any]]:
        return process_states(self.run_dir)

    def all_finished(self) -> bool:
        states = self.states()
        return bool(states) and all(p["statename"] in FINAL_STATES for p in states.values())

    def stop(self, timeout_s: float = 60.0) -> int:
        """Stop every program (highest priority number first) and supervisord itself."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
