"""Start the Janus WebRTC Server with the project's own configuration.

The templates in ``sipbridge/janus-conf/`` hold only the settings the project depends on, with
``${NAME}`` placeholders for what differs between instances (ports, RTP ranges,
log file, ICE interface). ``render_config()`` writes a filled-in copy to a folder
and ``janus -F FOLDER`` runs with it, so two Janus instances (two tests, or two
namespaces) never share ports or a log file.

Python API::

    with JanusServer(work_dir=tmp, netns="sb-123-0") as janus:   # start() + stop()
        janus.ws_url      # ws://127.0.0.1:8188  (reachable inside that namespace)
        janus.http_url    # http://127.0.0.1:8088/janus

API secret: ``sipbridge janus-server`` always sets one (Janus then refuses every request without it): the one
in ``SIPBRIDGE_JANUS_API_SECRET`` when given (``sipbridge up`` hands it over through its secret broker, never a
command line), else the one in ``WORK_DIR/api_secret`` from an earlier start (a node's Janus keeps its secret
across restarts), else a new one. It is written to ``WORK_DIR/api_secret`` (0600, for the local clients: the
room server, tools) and into the rendered configuration (0600 files in a 0700 folder); never logged. The
Python ``JanusServer`` sets one when ``JanusConfig.api_secret`` is given (``generate_api_secret()``).

``netns`` makes Janus run under ``ip netns exec``; readiness is probed from a thread
inside that namespace, so the caller itself need not be in it. When the caller
already is in the namespace (``sipbridge.netns.entered``), leave ``netns`` unset:
children inherit the caller thread's namespace.

CLI (foreground, for supervisord): ``sipbridge janus-server --work-dir DIR ...``
renders the configuration and replaces itself with ``janus`` so that supervisord's
SIGTERM reaches Janus directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import click

from sipbridge import netns as netns_mod
from sipbridge.lifetime import die_with_parent

log = logging.getLogger("sipbridge.janus")

# Package data (pyproject package-data), so an installed wheel finds it as a checkout does.
TEMPLATE_DIR = Path(str(resources.files("sipbridge") / "janus-conf"))
JANUS_BINARY = "janus"
DEFAULT_HTTP_PORT = 8088
DEFAULT_WS_PORT = 8188
# WebRTC side (Janus <-> aiortc/Chromium) and SIP side (Janus <-> SIP peers) get separate ranges
# so a capture filter can tell the legs apart.
DEFAULT_RTP_PORT_RANGE = "20000-29999"
DEFAULT_SIP_RTP_PORT_RANGE = "30000-39999"
DEFAULT_ICE_ENFORCE_LIST = netns_mod.VETH_INSIDE
READY_TIMEOUT_S = 10.0
READY_POLL_S = 0.05
PROBE_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 10.0
API_SECRET_ENV = "SIPBRIDGE_JANUS_API_SECRET"
API_SECRET_FILE_NAME = "api_secret"
API_SECRET_BYTES = 32  # secrets.token_urlsafe: 43 characters


class JanusError(RuntimeError):
    """Janus could not be started or did not answer."""


@dataclass
class JanusConfig:
    http_port: int = DEFAULT_HTTP_PORT
    ws_port: int = DEFAULT_WS_PORT
    bind_ip: str = "127.0.0.1"
    sip_ip: str = "127.0.0.1"
    rtp_port_range: str = DEFAULT_RTP_PORT_RANGE
    sip_rtp_port_range: str = DEFAULT_SIP_RTP_PORT_RANGE
    ice_enforce_list: str = DEFAULT_ICE_ENFORCE_LIST
    debug_level: int = 4
    log_file: str = ""  # empty: log to stdout only
    # Every request must carry it; None: no secret (see generate_api_secret). Never in a repr or a log.
    api_secret: str | None = field(default=None, repr=False)

    def values(self, configs_folder: Path) -> dict[str, str]:
        return {
            "CONFIGS_FOLDER": str(configs_folder),
            "LOG_FILE": self.log_file,
            "DEBUG_LEVEL": str(self.debug_level),
            "HTTP_PORT": str(self.http_port),
            "WS_PORT": str(self.ws_port),
            "BIND_IP": self.bind_ip,
            "SIP_IP": self.sip_ip,
            "RTP_PORT_RANGE": self.rtp_port_range,
            "SIP_RTP_PORT_RANGE": self.sip_rtp_port_range,
            "ICE_ENFORCE_LIST": self.ice_enforce_list,
            "API_SECRET": self.api_secret or "",
        }


_PLACEHOLDER_RE = re.compile(r"\$\{([A-Z_]+)\}")
# A setting whose value came out empty is commented out, so Janus uses its default.
_EMPTY_SETTING_RE = re.compile(r'^(\s*)(\w+ = "")', re.MULTILINE)


def generate_api_secret() -> str:
    return secrets.token_urlsafe(API_SECRET_BYTES)


def check_api_secret(value: str) -> str:
    """A secret goes into a Janus configuration string: printable ASCII without quotes or backslashes."""
    if not 16 <= len(value) <= 256 or not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", value):
        raise JanusError("the Janus API secret must be 16..256 characters of letters, digits and ._~+/=-")
    return value


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: set it
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def load_or_create_api_secret(path: Path, environ: dict[str, str] | None = None) -> str:
    """The secret this Janus runs with (see the module docstring), written to ``path`` (0600)."""
    env = os.environ if environ is None else environ
    secret = env.get(API_SECRET_ENV)
    if not secret and path.is_file():
        secret = path.read_text().strip()
    secret = check_api_secret(secret or generate_api_secret())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, secret + "\n")
    return secret


def render_config(config: JanusConfig, out_dir: str | os.PathLike[str], template_dir: Path = TEMPLATE_DIR) -> Path:
    """Write filled-in copies of every ``*.jcfg`` template to ``out_dir`` (0700; files 0600: they may hold the
    API secret); return it."""
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    out.chmod(0o700)
    templates = sorted(template_dir.glob("*.jcfg"))
    if not templates:
        raise JanusError(f"no .jcfg templates in {template_dir}")
    values = config.values(out)
    for template in templates:
        # Only ${UPPER_CASE} is ours: the comments in Debian's files mention $HOME and the like.
        text = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template.read_text())
        text = _EMPTY_SETTING_RE.sub(r"\1#\2", text)
        write_private(out / template.name, text)
    return out


def janus_argv(conf_dir: Path, stdout_log: bool = True) -> list[str]:
    argv = [JANUS_BINARY, "-F", str(conf_dir), "-o"]  # -o: no colour codes in logs
    if not stdout_log:
        argv.append("-N")
    return argv


def fetch_info(http_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """GET ``<http_url>/info``; raises OSError/ValueError when Janus does not answer properly."""
    with urllib.request.urlopen(f"{http_url}/info", timeout=timeout_s) as resp:
        info = json.loads(resp.read())
    if info.get("janus") != "server_info":
        raise ValueError(f"unexpected /janus/info answer: {info!r}")
    return info  # type: ignore[no-any-return]


class JanusServer:
    """One Janus process with a rendered private configuration."""

    def __init__(
        self,
        config: JanusConfig | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        netns: str | None = None,
        template_dir: Path = TEMPLATE_DIR,
    ) -> None:
        self.config = config or JanusConfig()
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="sb-janus-"))
        self.conf_dir = self.work_dir / "conf"
        if not self.config.log_file:
            self.config.log_file = str(self.work_dir / "janus.log")
        self.netns = netns
        self.template_dir = template_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def http_url(self) -> str:
        return f"http://{self.config.bind_ip}:{self.config.http_port}/janus"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.bind_ip}:{self.config.ws_port}"

    @property
    def log_file(self) -> Path:
        return Path(self.config.log_file)

    @property
    def api_secret(self) -> str | None:
        return self.config.api_secret

    @property
    def api_secret_file(self) -> Path:
        """Where the secret is kept for this Janus's local clients (0600), when it has one."""
        return self.work_dir / API_SECRET_FILE_NAME

    def _probe(self) -> dict[str, Any]:
        if self.netns:
            return netns_mod.call_in(self.netns, fetch_info, self.http_url)
        return fetch_info(self.http_url)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> JanusServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.config.api_secret:
            check_api_secret(self.config.api_secret)
            self.work_dir.mkdir(parents=True, exist_ok=True)
            write_private(self.api_secret_file, self.config.api_secret + "\n")
        render_config(self.config, self.conf_dir, self.template_dir)
        argv = janus_argv(self.conf_dir, stdout_log=False)
        if self.netns:
            argv = netns_mod.NetNs(self.netns).argv(argv)
        # Own session: a Ctrl-C in the terminal goes to us, and we stop Janus in order.
        self.proc = subprocess.Popen(die_with_parent(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise JanusError(f"janus exited with {self.proc.returncode} during start-up: {self.tail_log()}")
            try:
                self.info = self._probe()
                log.info("Janus %s ready on %s (pid %d, ns %s)", self.info.get("version_string"), self.http_url,
                         self.proc.pid, self.netns or "-")
                return self
            except (OSError, ValueError) as exc:
                last_error = exc
            time.sleep(READY_POLL_S)
        self.stop()
        raise JanusError(f"Janus did not answer {self.http_url}/info within {timeout_s}s: {last_error}; "
                         f"{self.tail_log()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("Janus (pid %d) ignored SIGTERM for %.0fs: killing it", proc.pid, timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """Kill Janus abruptly (tests of the stage's reaction to a Janus crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no Janus log)"

    def cleanup(self) -> None:
        self.stop()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> JanusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@click.command("janus-server")
@click.option("--template-dir", "--conf-dir", "template_dir", type=click.Path(file_okay=False, exists=True),
              default=str(TEMPLATE_DIR), help="Folder of .jcfg templates.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the rendered configuration goes [RUN_DIR/janus].")
@click.option("--http-port", type=int, default=DEFAULT_HTTP_PORT)
@click.option("--ws-port", type=int, default=DEFAULT_WS_PORT)
@click.option("--bind-ip", default="127.0.0.1", help="Address of the HTTP and WebSocket transports.")
@click.option("--sip-ip", default="127.0.0.1", help="SIP plugin signalling, media and SDP address.")
@click.option("--rtp-port-range", default=DEFAULT_RTP_PORT_RANGE, help="WebRTC-side RTP ports.")
@click.option("--sip-rtp-port-range", default=DEFAULT_SIP_RTP_PORT_RANGE, help="SIP-side RTP ports.")
@click.option("--ice-enforce-list", default=DEFAULT_ICE_ENFORCE_LIST,
              help="Interfaces Janus gathers ICE candidates on ('' = all non-loopback).")
@click.option("--debug-level", type=click.IntRange(0, 7), default=4)
@click.option("--log-file", default="", help="Also log to this file.")
@click.option("--netns", default=None, help="Run Janus inside this network namespace.")
@click.option("--render-only", is_flag=True, help="Write the configuration, print its folder and exit.")
@click.option("--api-secret-file", type=click.Path(dir_okay=False), default=None,
              help=f"Where the API secret is kept (0600) [WORK_DIR/{API_SECRET_FILE_NAME}]; the secret itself comes "
                   f"from ${API_SECRET_ENV}, else this file, else is generated.")
def command(template_dir: str, work_dir: str | None, http_port: int, ws_port: int, bind_ip: str, sip_ip: str,
            rtp_port_range: str, sip_rtp_port_range: str, ice_enforce_list: str, debug_level: int, log_file: str,
            netns: str | None, render_only: bool, api_secret_file: str | None) -> None:
    """Run Janus in the foreground with the project's configuration (for supervisord)."""
    from stages.base import run_dir

    work = Path(work_dir or os.path.join(run_dir(), "janus"))
    secret_file = Path(api_secret_file) if api_secret_file else work / API_SECRET_FILE_NAME
    try:
        secret = load_or_create_api_secret(secret_file)
    except (JanusError, OSError) as exc:
        raise click.ClickException(f"Janus API secret: {exc}") from None
    # Janus reads it from its configuration: it need not stay in any process's environment.
    os.environ.pop(API_SECRET_ENV, None)
    config = JanusConfig(http_port=http_port, ws_port=ws_port, bind_ip=bind_ip, sip_ip=sip_ip,
                         rtp_port_range=rtp_port_range, sip_rtp_port_range=sip_rtp_port_range,
                         ice_enforce_list=ice_enforce_list, debug_level=debug_level, log_file=log_file,
                         api_secret=secret)
    conf_dir = render_config(config, work / "conf", Path(template_dir))
    click.echo(f"Janus API secret in {secret_file} (0600); every client passes it", err=True)
    if render_only:
        click.echo(str(conf_dir))
        return
    if shutil.which(JANUS_BINARY) is None:
        raise click.ClickException("janus is not installed (Debian package 'janus')")
    argv = janus_argv(conf_dir)
    if netns:
        argv = netns_mod.NetNs(netns).argv(argv)
    os.execvp(argv[0], argv)
