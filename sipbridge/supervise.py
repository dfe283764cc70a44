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

The generated file has the same shape as the top-level ``supervisord.conf``. ``live = true`` at the top marks a
pipeline that runs until stopped (a bridge): every program is restarted whatever its exit code, and an end of
stream ends streams, never a stage. ``{run_dir}`` in an argument is the pipeline's run folder.

Secrets never pass through supervisord: a stage's ``secrets = {VAR = "env:NAME"}`` are handed by the process
that started supervisord (``SecretBroker``) to that one program at its start, which puts them in its own
environment (``sipbridge.secretenv``); supervisord itself gets an environment without them.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket as socketlib
import struct
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from socket import AF_UNIX, SOCK_STREAM, socket
from typing import Any

from sipbridge import supervisord
from sipbridge.lifetime import die_with_parent
from stages.base import LIVE_ENV, ipc_owner_alive, make_run_dir

SUPERVISOR_START_TIMEOUT_S = 15.0
# One XML-RPC call to supervisord: a hung supervisord must not hang its caller.
RPC_TIMEOUT_S = 5.0
# Stages flush and send end of stream on SIGTERM; give them time before supervisord escalates to SIGKILL.
STAGE_STOP_WAIT_S = 15
# The browser leaves children behind if only its leader is signalled.
GROUP_STOP_KINDS = {"browser"}
FINAL_STATES = {"EXITED", "FATAL", "STOPPED"}
SECRETS_SOCKET_NAME = "secrets.sock"
# How long a program's start waits for the broker's answer (supervisord has the pid the moment it forks).
SECRET_REQUEST_TIMEOUT_S = 10.0
MAX_SECRET_REQUEST_BYTES = 4096
# supervisord passes its environment to every program: only these names reach it (and a name that looks like a
# secret never does, even under one of these prefixes). Programs get their secrets from the broker instead.
PASS_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR", "CI",
    "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONFAULTHANDLER",
    "LD_LIBRARY_PATH", "XDG_RUNTIME_DIR", "DISPLAY", "SSL_CERT_FILE", "SSL_CERT_DIR",
})
PASS_ENV_PREFIXES = ("LC_", "SIPBRIDGE_", "PLAYWRIGHT_", "XDG_", "FONTCONFIG_")
SECRET_NAME_PATTERN = re.compile(r"SECRET|PASSW|TOKEN|API_?KEY|CREDENTIAL", re.IGNORECASE)
ENV_REFERENCE = re.compile(r"env:([A-Za-z_][A-Za-z0-9_]*)")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
INLINE_COMMENT = re.compile(r"\s[;#]")


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
    # Variable in this program's environment -> the variable of the starting environment that holds the secret.
    secrets: dict[str, str] = field(default_factory=dict)
    # Runs until stopped (a bridge): restarted whatever its exit code; end of stream does not end it.
    live: bool = False
    # CPU niceness of the program and its children (-20..19): below 0 puts a call's media ahead of batch work on the
    # host (bench_bridge --busy); needs root, CAP_SYS_NICE or RLIMIT_NICE (check_nice).
    nice: int = 0


def parse_pipeline(data: dict[str, Any]) -> list[StageSpec]:
    unknown_top = set(data) - {"stage", "live", "nice"}
    if unknown_top:
        raise PipelineError(f"unknown key(s) {', '.join(sorted(unknown_top))} (a pipeline has [[stage]], live, nice)")
    live = data.get("live", False)
    if not isinstance(live, bool):
        raise PipelineError("live must be true or false")
    nice = data.get("nice", 0)
    if not isinstance(nice, int) or isinstance(nice, bool) or not NICE_MIN <= nice <= NICE_MAX:
        raise PipelineError(f"nice must be a whole number from {NICE_MIN} to {NICE_MAX}, not {nice!r}")
    stages_data = data.get("stage")
    if not isinstance(stages_data, list) or not stages_data:
        raise PipelineError("pipeline needs at least one [[stage]] table")
    specs: list[StageSpec] = []
    for index, raw in enumerate(stages_data):
        where = f"stage[{index}]"
        if not isinstance(raw, dict):
            raise PipelineError(f"{where} must be a table")
        unknown = set(raw) - {"name", "kind", "command", "args", "inputs", "env", "secrets"}
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
        for key, value in env.items():
            check_env_entry(f"stage {name!r}.env.{key}", key, value)
        secrets_raw = raw.get("secrets", {})
        if not isinstance(secrets_raw, dict):
            raise PipelineError(f'stage {name!r}.secrets must be a table of VAR = "env:NAME"')
        secrets = {}
        for key, value in secrets_raw.items():
            match = ENV_REFERENCE.fullmatch(value) if isinstance(value, str) else None
            if not ENV_NAME.fullmatch(key) or match is None:
                raise PipelineError(f'stage {name!r}.secrets.{key} must be "env:NAME" (secrets stay out of files)')
            secrets[key] = match[1]
        specs.append(StageSpec(name, kind, command, list(args), list(inputs), dict(env), secrets=secrets, live=live,
                               nice=nice))
    names = [s.name for s in specs]
    for spec in specs:
        if names.count(spec.name) > 1:
            raise PipelineError(f"stage name {spec.name!r} is used twice")
        for upstream in spec.inputs:
            if upstream not in names:
                raise PipelineError(f"stage {spec.name!r}.inputs names unknown stage {upstream!r}")
    return specs


def check_env_entry(where: str, key: str, value: str) -> None:
    """supervisord's environment= line has no escapes: refuse what it would misread, naming the key."""
    if not ENV_NAME.fullmatch(key):
        raise PipelineError(f"{where}: {key!r} is not an environment variable name")
    if "\n" in value or "\r" in value or ('"' in value and "'" in value):
        raise PipelineError(f"{where}: a value with a newline, or with both kinds of quote, cannot pass supervisord")
    if INLINE_COMMENT.search(value):
        raise PipelineError(f"{where}: a value with a space before ; or # cannot pass supervisord (it reads a comment)")


def config_quote(arg: str) -> str:
    """shlex-quote ``arg`` for a supervisord command= line, where a ; or # after a space starts a comment.

    Inside a quoted argument each ; and # is put in double quotes of its own ('a '"#"'1' is "a #1" to the
    shlex.split supervisord runs), so no whitespace ever stands right before one.
    """
    quoted = shlex.quote(arg)
    if quoted.startswith("'"):
        quoted = quoted.replace("#", "'\"#\"'").replace(";", "'\";\"'")
    return quoted


def _env_entry(key: str, value: str) -> str:
    quote = "'" if '"' in value else '"'
    return f"{key}={quote}{value.replace('%', '%%')}{quote}"


NICE_MIN, NICE_MAX = -20, 19
CAP_SYS_NICE_BIT = 23  # linux/capability.h


def nice_floor() -> int:
    """The lowest niceness this process may give its children: -20 with CAP_SYS_NICE (root has it), else what
    RLIMIT_NICE allows (its soft limit r lets a process go down to 20 - r; ``ulimit -e``), else its own."""
    try:
        status = Path("/proc/self/status").read_text()
        cap_eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError, IndexError):
        cap_eff = 0
    if cap_eff >> CAP_SYS_NICE_BIT & 1:
        return NICE_MIN
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    by_limit = 20 - soft if soft != resource.RLIM_INFINITY else NICE_MIN
    return max(NICE_MIN, min(by_limit, os.getpriority(os.PRIO_PROCESS, 0)))


def check_nice(specs: list[StageSpec]) -> None:
    """Refuse a niceness this user may not set, before anything starts (a program would run at its default and
    the call would lose to batch work with no word)."""
    wanted = min((spec.nice for spec in specs), default=0)
    floor = nice_floor()
    if wanted < floor:
        raise PipelineError(
            f"nice {wanted} is not allowed for this user (lowest allowed: {floor}): run as root, give the process "
            f"CAP_SYS_NICE, or raise RLIMIT_NICE to {20 - wanted} (limits.conf 'nice' or `ulimit -e`), or set nice "
            f">= {floor}")
    if any(spec.nice for spec in specs) and shutil.which("nice") is None:
        raise PipelineError("nice is set but the nice command (coreutils) is not on PATH")


def _program(spec: StageSpec, priority: int, run_dir: Path) -> str:
    if spec.command is not None:
        command = spec.command
        if spec.secrets:
            command = f"{shlex.join(_secret_wrapper(spec.name, run_dir))} {command}"
    else:
        argv = [sys.executable, "-m", "sipbridge", "stage", spec.kind or "", "--name", spec.name]
        for upstream in spec.inputs:
            argv += ["--in", f"ipc://{run_dir}/{upstream}.sock"]
        args = [a.replace("{run_dir}", str(run_dir)) for a in spec.args]
        wrapper = _secret_wrapper(spec.name, run_dir) if spec.secrets else []
        # supervisord expands %(name)s in command lines: a literal % (a URL escape, a regex) must be doubled.
        command = " ".join(config_quote(a) for a in [*wrapper, *argv, *args]).replace("%", "%%")
    if spec.nice:
        # coreutils nice execs the program: supervisord's pid is still the program's, and its children inherit.
        command = f"{shutil.which('nice') or 'nice'} -n {spec.nice} {command}"
    group_stop = "true" if spec.kind in GROUP_STOP_KINDS else "false"
    variables = {"SIPBRIDGE_RUN_DIR": str(run_dir), **({LIVE_ENV: "1"} if spec.live else {}), **spec.env}
    env = ",".join(_env_entry(k, v) for k, v in variables.items())
    # A live program is restarted whatever its exit code: during a call nothing but the bridge's stop ends a stage.
    restart = "true" if spec.live else "unexpected"
    return f"""
[program:{spec.name}]
command={command}
priority={priority}
autostart=true
autorestart={restart}
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
    check_nice(specs)
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


def _secret_wrapper(program: str, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "sipbridge.secretenv", "--socket", str(run_dir / SECRETS_SOCKET_NAME),
            "--program", program, "--"]


def stage_secrets(specs: list[StageSpec], environ: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Each program's secret variables with their values, read from ``environ``; a missing one is an error."""
    env = os.environ if environ is None else environ
    out: dict[str, dict[str, str]] = {}
    missing = sorted({source for spec in specs for source in spec.secrets.values() if source not in env})
    if missing:
        raise PipelineError(f"environment variable(s) {', '.join(missing)} not set")
    for spec in specs:
        if spec.secrets:
            out[spec.name] = {var: env[source] for var, source in spec.secrets.items()}
    return out


def supervisor_environment(environ: Mapping[str, str], secret_names: set[str] | frozenset[str] = frozenset()
                           ) -> dict[str, str]:
    """What supervisord (and so every program) may see of ``environ``: an allow-list, secrets left out."""
    return {
        k: v
        for k, v in environ.items()
        if (k in PASS_ENV_NAMES or k.startswith(PASS_ENV_PREFIXES))
        and k not in secret_names
        and not SECRET_NAME_PATTERN.search(k)
    }


def ensure_run_dir_free(run_dir: Path, fresh_logs: bool = False) -> None:
    """Create the run folder (0700) unless a live pipeline uses it; never delete anything in it. With
    ``fresh_logs`` (``sipbridge up``) this run gets an empty ``logs``, the previous runs' kept as ``logs.1``
    (newest) .. ``logs.3`` (see ``rotate_logs``); callers that put their own logs there first (the local-call
    harness) leave it False."""
    make_run_dir(run_dir)
    if ipc_owner_alive(str(run_dir / "supervisor.sock")):
        raise PipelineError(f"a pipeline already runs in {run_dir}; stop it or choose another --run-dir")
    if fresh_logs:
        rotate_logs(run_dir)
    (run_dir / "logs").mkdir(mode=0o700, exist_ok=True)


# Earlier runs' log folders kept beside the current one (stage logs were appended across runs before, issue 14).
KEPT_LOG_RUNS = 3
# What a log folder of ours holds: supervisord's and the stages' logs with their size-rotated backups.
OUR_LOG_NAME = re.compile(r"[\w.-]+\.(log(\.\d+)?|stderr)")


def _only_our_logs(folder: Path) -> bool:
    try:
        return all(entry.is_file() and not entry.is_symlink() and OUR_LOG_NAME.fullmatch(entry.name)
                   for entry in folder.iterdir())
    except OSError:
        return False


def rotate_logs(run_dir: Path) -> None:
    """``logs`` -> ``logs.1`` -> ... -> ``logs.KEPT_LOG_RUNS``; an empty ``logs`` stays (nothing ran). The oldest is
    dropped only when it holds nothing but our log files; otherwise the runs are kept under a time-stamped name."""
    logs = run_dir / "logs"
    if not logs.is_dir() or not any(logs.iterdir()):
        return
    oldest = run_dir / f"logs.{KEPT_LOG_RUNS}"
    if oldest.exists():
        if oldest.is_dir() and _only_our_logs(oldest):
            shutil.rmtree(oldest)
        else:
            logs.rename(run_dir / f"logs.{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            return
    for index in range(KEPT_LOG_RUNS - 1, 0, -1):
        older = run_dir / f"logs.{index}"
        if older.exists():
            older.rename(run_dir / f"logs.{index + 1}")
    logs.rename(run_dir / "logs.1")


# supervisord's own log lines on how a program ended (supervisor/process.py): "stopped: NAME (exit status 0)",
# "exited: NAME (exit status 1; not expected)", "gave up: NAME entered FATAL state, too many start retries ...".
ENDING_LINE = re.compile(r"\b(stopped|exited|gave up): (\S+) (.*)$")


def stage_endings(run_dir: Path, states: dict[str, dict[str, Any]]) -> dict[str, str]:
    """How each program of the run ended, in words, from supervisord's log (``states``: its last process states,
    for a program the log says nothing about)."""
    events: dict[str, list[tuple[str, str]]] = {}
    try:
        text = (run_dir / "logs" / "supervisord.log").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        match = ENDING_LINE.search(line)
        if match:
            events.setdefault(match[2], []).append((match[1], match[3].strip().strip("()")))
    endings = {}
    for name in sorted(set(states) | set(events)):
        seen = events.get(name, [])
        info = states.get(name, {})
        if not seen:
            state = info.get("statename", "unknown")
            endings[name] = f"{state} when supervisord went away (no record of its end)"
            continue
        kind, detail = seen[-1]
        if kind == "stopped":
            how = f"stopped on request ({detail})" if "SIGKILL" not in detail else (
                f"killed: it did not stop within {STAGE_STOP_WAIT_S} s of SIGTERM ({detail})")
        elif kind == "gave up":
            last_exit = next((d for k, d in reversed(seen) if k == "exited"), None)
            how = "FATAL: gave up restarting it" + (f" (last: {last_exit})" if last_exit else "")
        else:
            how = f"ended by itself ({detail})"
        earlier = sum(1 for k, _ in seen[:-1] if k == "exited")
        if earlier:
            how += f"; it had exited {earlier} time(s) before and was restarted"
        endings[name] = how
    return endings


def _peer_pid(conn: socketlib.socket) -> tuple[int, int]:
    creds = conn.getsockopt(socketlib.SOL_SOCKET, socketlib.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


class SecretBroker:
    """Hands each program its secrets over a unix socket (0600) in the run folder, to that program's process only.

    The asker names its program; the broker answers only when the asking process (its pid from SO_PEERCRED)
    is the one supervisord started for that program, and it runs as this user. The values never touch a file,
    a command line, supervisord's environment or a log.
    """

    def __init__(self, run_dir: Path, secrets: dict[str, dict[str, str]], pid_of: Callable[[str], int | None]) -> None:
        self.path = run_dir / SECRETS_SOCKET_NAME
        self.secrets = secrets
        self.pid_of = pid_of
        self.refused = 0
        self.handed = 0
        self._sock: socketlib.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if ipc_owner_alive(str(self.path)):
            raise PipelineError(f"{self.path} is in use by a live process")
        self.path.unlink(missing_ok=True)
        sock = socketlib.socket(AF_UNIX, SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: no window where another user could connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(8)
        self._sock = sock
        # The thread gets the socket itself: stop() clears self._sock while accept() may still be returning.
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="secret-broker", daemon=True)
        self._thread.start()

    def _serve(self, sock: socketlib.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(SECRET_REQUEST_TIMEOUT_S)
                try:
                    self._answer(conn)
                except (OSError, ValueError):
                    self.refused += 1

    def _answer(self, conn: socketlib.socket) -> None:
        request = json.loads(conn.recv(MAX_SECRET_REQUEST_BYTES).decode())
        program = request.get("program") if isinstance(request, dict) else None
        pid, uid = _peer_pid(conn)
        if not isinstance(program, str) or program not in self.secrets:
            reply: dict[str, Any] = {"error": f"no secrets for program {program!r}"}
        elif uid != os.getuid():
            reply = {"error": "asked by another user"}
        elif self.pid_of(program) != pid:
            reply = {"error": f"pid {pid} is not supervisord's {program!r}"}
        else:
            reply = {"env": self.secrets[program]}
        if "error" in reply:
            self.refused += 1
        else:
            self.handed += 1
        conn.sendall(json.dumps(reply).encode())

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)


class _UnixHTTPConnection(HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def connect(self) -> None:
        sock = socket(AF_UNIX, SOCK_STREAM)
        sock.settimeout(RPC_TIMEOUT_S)
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


def _program_pid(run_dir: Path, program: str) -> int | None:
    try:
        info = rpc(run_dir).getProcessInfo(program)
    except (OSError, xmlrpc.client.Error):
        return None
    return int(info["pid"]) or None


class Supervisor:
    """A supervisord child process running one configuration in the foreground.

    ``secrets`` (program -> variable -> value, see ``stage_secrets``) are served to those programs only; the
    names in ``secret_names`` (the variables they were read from) are kept out of supervisord's environment.
    """

    def __init__(self, config_path: Path, run_dir: Path, secrets: dict[str, dict[str, str]] | None = None,
                 secret_names: set[str] | None = None) -> None:
        self.config_path = config_path
        self.run_dir = run_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.secrets = secrets or {}
        self.secret_names = set(secret_names or ())
        self.broker: SecretBroker | None = None

    @classmethod
    def for_specs(cls, specs: list[StageSpec], run_dir: Path, environ: Mapping[str, str] | None = None
                  ) -> Supervisor:
        """Render ``specs`` into RUN_DIR/supervisord.conf; their secrets are read from ``environ`` and served."""
        ensure_run_dir_free(run_dir)
        conf = run_dir / "supervisord.conf"
        conf.write_text(render_config(specs, run_dir))
        names = {source for spec in specs for source in spec.secrets.values()}
        return cls(conf, run_dir, secrets=stage_secrets(specs, environ), secret_names=names)

    def start(self) -> None:
        ensure_run_dir_free(self.run_dir)
        env = {**supervisor_environment(os.environ, self.secret_names), "SIPBRIDGE_RUN_DIR": str(self.run_dir)}
        if self.secrets:
            self.broker = SecretBroker(self.run_dir, self.secrets, lambda name: _program_pid(self.run_dir, name))
            self.broker.start()
        self.proc = subprocess.Popen(
            die_with_parent(supervisord.command(self.config_path)),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT_S
        while not process_states(self.run_dir):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self._close_broker()
                raise PipelineError(f"supervisord exited at start ({self.proc.returncode}): {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PipelineError("supervisord did not answer on its socket")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """End a supervisord that no longer answers (SIGKILL: a hung or stopped process takes no SIGTERM)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self._close_broker()

    def _close_broker(self) -> None:
        if self.broker is not None:
            self.broker.close()
            self.broker = None

    def states(self) -> dict[str, dict[str, Any]]:
        return process_states(self.run_dir)

    def all_finished(self) -> bool:
        states = self.states()
        return bool(states) and all(p["statename"] in FINAL_STATES for p in states.values())

    def stop(self, timeout_s: float = 60.0) -> int:
        """Stop every program (highest priority number first) and supervisord itself."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                return self.proc.returncode if self.proc else 0
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            self._close_broker()
