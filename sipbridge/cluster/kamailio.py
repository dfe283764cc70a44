"""Render the shipped Kamailio configuration (deploy/kamailio/kamailio.cfg) for a list of nodes."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sipbridge.cluster import sipmsg

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "kamailio" / "kamailio.cfg"
DISPATCHER_SET = 1
DEFAULT_PING_INTERVAL_S = 5
DEFAULT_FR_TIMER_MS = 2000
# How long an INVITE may wait for its final answer once a node said 100 Trying (a bridged call starts meanwhile).
DEFAULT_FR_INV_TIMER_MS = 60_000
_FIELD_RE = re.compile(r"@@([A-Z_]+)@@")


class KamailioConfigError(ValueError):
    """A node list or option that cannot make a working configuration."""


@dataclass(frozen=True)
class Node:
    uri: str  # sip:HOST:PORT of the node's SIP front
    slots: int
    duid: str


def parse_node(spec: str, default_slots: int, index: int) -> Node:
    """``sip:HOST[:PORT][,slots=N][,id=NAME]``."""
    uri, *opts = spec.split(",")
    if not re.fullmatch(r"sip:[A-Za-z0-9.\-]+(:\d{1,5})?", uri):
        raise KamailioConfigError(f"node {spec!r}: expected sip:HOST[:PORT][,slots=N][,id=NAME]")
    slots, duid = default_slots, f"node{index}"
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "slots" and value.isdigit() and int(value) > 0:
            slots = int(value)
        elif key == "id" and re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
            duid = value
        else:
            raise KamailioConfigError(f"node {spec!r}: bad option {opt!r} (slots=N with N > 0, id=NAME)")
    host, port = sipmsg.host_port(uri)
    return Node(f"sip:{host}:{port}", slots, duid)


def dispatcher_list(nodes: list[Node]) -> str:
    if not nodes:
        raise KamailioConfigError("at least one --node is needed")
    if len({n.uri for n in nodes}) != len(nodes) or len({n.duid for n in nodes}) != len(nodes):
        raise KamailioConfigError("node addresses and ids must be unique")
    lines = ["# setid destination flags priority attributes (sipbridge cluster kamailio-config)"]
    # duid: the node's id for call-load tracking (alg 10); maxload: its slots, the most calls it is sent.
    lines += [f"{DISPATCHER_SET} {n.uri} 0 0 duid={n.duid};maxload={n.slots}" for n in nodes]
    return "\n".join(lines) + "\n"


def render(nodes: list[Node], *, listen: str, out_dir: Path, ping_interval_s: int = DEFAULT_PING_INTERVAL_S,
           fr_timer_ms: int = DEFAULT_FR_TIMER_MS, fr_inv_timer_ms: int = DEFAULT_FR_INV_TIMER_MS, children: int = 2,
           template: Path = TEMPLATE) -> Path:
    """Write kamailio.cfg and dispatcher.list into ``out_dir``; return the cfg's path."""
    if not re.fullmatch(r"[0-9.]+:\d{1,5}", listen):
        raise KamailioConfigError(f"--listen must be IP:PORT, not {listen!r}")
    if ping_interval_s < 1:
        raise KamailioConfigError("the probing interval is whole seconds, at least 1")
    if not template.exists():
        raise KamailioConfigError(f"template {template} not found (it ships in the repository's deploy/kamailio/)")
    out_dir.mkdir(parents=True, exist_ok=True)
    list_file = out_dir / "dispatcher.list"
    list_file.write_text(dispatcher_list(nodes))
    fields = {
        "LISTEN": listen, "LISTEN_HOST": listen.rsplit(":", 1)[0], "LIST_FILE": str(list_file.resolve()),
        "PING_INTERVAL_S": str(ping_interval_s), "FR_TIMER_MS": str(fr_timer_ms),
        "FR_INV_TIMER_MS": str(fr_inv_timer_ms), "CHILDREN": str(children),
        "CTL_SOCKET": str((out_dir / "kamailio_ctl").resolve()),
        "RPC_FIFO": str((out_dir / "kamailio_rpc.fifo").resolve()),
        "RPC_SOCKET": str((out_dir / "kamailio_rpc.sock").resolve()),
    }

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in fields:
            raise KamailioConfigError(f"template field @@{m.group(1)}@@ has no value")
        return fields[m.group(1)]

    cfg = out_dir / "kamailio.cfg"
    cfg.write_text(_FIELD_RE.sub(fill, template.read_text()))
    return cfg


def check(cfg: Path) -> str:
    """``kamailio -c``: the configuration parses and every module loads; returns its output, raises if not."""
    binary = shutil.which("kamailio") or "/usr/sbin/kamailio"
    proc = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise KamailioConfigError(f"kamailio -c rejected {cfg}:\n{proc.stderr[-3000:]}")
    return proc.stderr


def command(cfg: Path, pid_file: Path | None = None) -> list[str]:
    """Run Kamailio in the foreground, logging to stderr."""
    binary = shutil.which("kamailio") or "/usr/sbin/kamailio"
    argv = [binary, "-DD", "-E", "-f", str(cfg)]
    if pid_file:
        argv += ["-P", str(pid_file)]
    return argv
