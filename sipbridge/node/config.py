"""The node's settings (from `sipbridge node` options, SIPBRIDGE_NODE_* variables or a node.toml [node] table)
and the checks that make a bad one fail at start with a message naming the setting."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_PORT = 8090
DEFAULT_CPU_CEILING = 0.9
DEFAULT_DRAIN_TIMEOUT_S = 60.0
# One whole bridged call (Chromium, the codec stages, the janus stage) measured 0.88-1.01 cores, median 0.95
# (README, "whole bridged call"): without a configured slot count a node takes what its cores allow at that cost.
BRIDGED_CALL_CORES = 1.0
SYSTEM_RUN_ROOT = Path("/run/sipbridge")
# Unix socket paths are limited to 107 bytes; the longest the pipeline binds is RUN_DIR/room-transformer.sock.ctl.
LONGEST_SOCKET_NAME = "room-transformer.sock.ctl"
UNIX_PATH_MAX_BYTES = 107
CALL_ID_LENGTH_MAX = 32


# Where the node keeps its Janus API secret for the calls' janus stages (in the node's own memory; the broker
# hands it out; supervisor_environment keeps it from every program's environment).
NODE_JANUS_SECRET_ENV = "SIPBRIDGE_NODE_JANUS_API_SECRET"


class NodeConfigError(ValueError):
    """A node setting that cannot work; the message names it."""


@dataclass
class NodeSettings:
    listen: str = DEFAULT_LISTEN
    port: int = DEFAULT_PORT
    # Name of the environment variable holding the API's bearer token; None only with auth turned off.
    token_env: str | None = None
    auth: bool = True
    slots: int = 1
    cpu_ceiling: float = DEFAULT_CPU_CEILING
    run_root: Path = SYSTEM_RUN_ROOT
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    # Accept [[stage]] pipelines (project stage kinds only) besides bridge configurations: for tests and load
    # generators. Off by default: a bridge configuration is all a service needs.
    allow_pipelines: bool = False
    name: str = ""
    # The node's SIP front ("IP:PORT", sipbridge/cluster/front.py): where callers (or Kamailio) send INVITEs, and
    # what Kamailio probes with OPTIONS (200 with a free slot, 503 full or draining).
    sip: str | None = None
    # Inbound calls: a bridge file (sip.inbound = true, accept_from, routes) each INVITE's call is made from.
    inbound: str | None = None
    # How long an INVITE waits for its call's Janus handle to listen before the node answers 500; keep it under
    # the INVITE timer of a proxy in front (Kamailio's fr_inv_timer: 60 s as shipped).
    inbound_ready_timeout_s: float = 55.0
    # Cluster mode (issue 13, sipbridge/cluster): API-started calls go through this Redis stream.
    cluster_redis: str | None = None
    # The node's Janus API secret: the 0600 file `sipbridge janus-server` writes in its work folder (generated
    # once per node, kept across restarts). Calls whose bridge names no janus.api_secret get this one, through
    # the secret broker like the SIP secret: never in a command line, supervisord's environment or a log.
    janus_api_secret_file: Path | None = None


def default_slots(cpu_ceiling: float, cores: int | None = None) -> int:
    cores = cores or os.cpu_count() or 1
    return max(1, int(cores * min(cpu_ceiling, 1.0) / BRIDGED_CALL_CORES))


def default_run_root(euid: int | None = None, environ: dict[str, str] | None = None) -> Path:
    """/run/sipbridge for root (a system service), else $XDG_RUNTIME_DIR/sipbridge (the user's private tmpfs)."""
    env = os.environ if environ is None else environ
    if (os.geteuid() if euid is None else euid) == 0:
        return SYSTEM_RUN_ROOT
    xdg = env.get("XDG_RUNTIME_DIR")
    if not xdg:
        raise NodeConfigError("run_root: not root and XDG_RUNTIME_DIR is not set; give --run-root")
    return Path(xdg) / "sipbridge"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_env_name(value: str) -> str:
    if not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", value):
        raise NodeConfigError(f'token must name an environment variable as "env:NAME", not {value!r}')
    return value[4:]


def check(settings: NodeSettings, environ: dict[str, str] | None = None) -> str | None:
    """Validate ``settings``; return the API token (None with auth off)."""
    env = os.environ if environ is None else environ
    if not 1 <= settings.port <= 65535:
        raise NodeConfigError(f"port must be 1..65535, not {settings.port}")
    if settings.slots < 1:
        raise NodeConfigError(f"slots must be 1 or more, not {settings.slots}")
    if not 0.05 <= settings.cpu_ceiling <= 1.0:
        raise NodeConfigError(f"cpu_ceiling must be 0.05..1.0 of the host (1.0 = never refuse for CPU), "
                              f"not {settings.cpu_ceiling}")
    if settings.drain_timeout_s < 0:
        raise NodeConfigError(f"drain_timeout_s must be 0 or more, not {settings.drain_timeout_s}")
    longest = len(str(settings.run_root)) + 1 + CALL_ID_LENGTH_MAX + 1 + len(LONGEST_SOCKET_NAME)
    if longest > UNIX_PATH_MAX_BYTES:
        raise NodeConfigError(f"run_root {settings.run_root} is too long for the calls' unix sockets "
                              f"(at most {UNIX_PATH_MAX_BYTES - longest + len(str(settings.run_root))} characters)")
    if settings.cluster_redis is not None and not re.fullmatch(r"rediss?://\S+", settings.cluster_redis):
        raise NodeConfigError(f"cluster_redis must be a redis:// URL, not {settings.cluster_redis!r}")
    if settings.sip is not None:
        host, _, port = settings.sip.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            host = ""
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise NodeConfigError(f"sip must be IP:PORT (the SIP front's IPv4 address and UDP port), not "
                                  f"{settings.sip!r}")
    if not 1.0 <= settings.inbound_ready_timeout_s <= 600.0:
        raise NodeConfigError(f"inbound_ready_timeout_s must be 1..600 seconds, not {settings.inbound_ready_timeout_s}")
    if settings.janus_api_secret_file is not None:
        read_janus_api_secret(settings.janus_api_secret_file)
    if settings.inbound is not None and settings.sip is None:
        raise NodeConfigError("inbound needs sip = \"IP:PORT\": the address callers send their INVITEs to")
    if not settings.auth:
        if not is_loopback(settings.listen):
            raise NodeConfigError(f"auth can only be turned off on a loopback address, not on {settings.listen}")
        return None
    if not settings.token_env:
        raise NodeConfigError('token is required: token = "env:NAME" (or turn auth off for loopback-only dev)')
    token = env.get(settings.token_env, "")
    if not token:
        raise NodeConfigError(f"token: environment variable {settings.token_env} is not set or empty")
    if len(token) < 16:
        raise NodeConfigError(f"token: {settings.token_env} holds fewer than 16 characters; use a long random one")
    return token


def read_janus_api_secret(path: Path) -> str:
    """The node's Janus API secret from ``path``: a regular file only its owner can read, not empty."""
    try:
        info = path.stat()
        secret = path.read_text().strip()
    except OSError as exc:
        raise NodeConfigError(f"janus_api_secret_file: cannot read {path}: {exc.strerror}") from None
    if info.st_mode & 0o077:
        raise NodeConfigError(f"janus_api_secret_file: {path} is readable by others (mode "
                              f"{info.st_mode & 0o777:o}); chmod 600 it")
    if not secret:
        raise NodeConfigError(f"janus_api_secret_file: {path} is empty")
    return secret
