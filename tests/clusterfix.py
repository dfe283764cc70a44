"""A cluster on one machine for tests and benches: one network namespace, distinct 127.0.0.x addresses.

Kamailio and Redis on 127.0.0.10, node N's SIP front on 127.0.0.(10+N):5060, callers and far ends on
127.0.0.50+. Everything runs inside the namespace the fixture creates (root), so no packet leaves it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sipbridge.cluster import kamailio
from sipbridge.cluster.holdnode import events_of
from sipbridge.netns import NetNs
from sipbridge.testing.localcall import wait_until
from tests.stagehelp import SIPBRIDGE

PROXY_IP = "127.0.0.10"
PROXY_PORT = 5060
REDIS_PORT = 6390
CALLER_IP = "127.0.0.50"
FAR_END_IP = "127.0.0.60"
FAR_END_PORT = 5070
SIPP_DIR = Path(__file__).parent / "sipp"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 40.0


def node_ip(n: int) -> str:
    return f"127.0.0.{10 + n}"


def have_tools() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for a network namespace"
    for tool in ("kamailio", "redis-server", "sipp"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            return f"{tool} is not installed (make setup)"
    return None


class Cluster:
    def __init__(self, ns: NetNs, run_dir: Path) -> None:
        self.ns = ns
        self.run_dir = run_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.redis_url = f"redis://{PROXY_IP}:{REDIS_PORT}/0"

    # -- processes --------------------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        proc = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)

    def wait_exit(self, name: str, timeout_s: float = STOP_TIMEOUT_S) -> int:
        return self.procs[name].wait(timeout_s)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def dispatcher_flags(self) -> dict[str, str]:
        """Kamailio's view of each node: {"sip:IP:PORT": "AP" (active) or "IP" (inactive), ...}."""
        ctl = self.run_dir / "kamailio" / "kamailio_ctl"
        out = self.ns.run(["kamcmd", "-s", f"unix:{ctl}", "dispatcher.list"], capture_output=True, text=True,
                          timeout=10, check=False).stdout
        flags, uri = {}, None
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("URI:"):
                uri = line.split(None, 1)[1]
            elif line.startswith("FLAGS:") and uri:
                flags[uri] = line.split(None, 1)[1]
                uri = None
        return flags

    def udp_listening(self, ip: str, port: int) -> bool:
        out = self.ns.run(["ss", "-lunH"], capture_output=True, text=True, check=False).stdout
        return any(line.split()[3] == f"{ip}:{port}" for line in out.splitlines() if len(line.split()) > 3)

    def tcp_listening(self, ip: str, port: int) -> bool:
        out = self.ns.run(["ss", "-ltnH"], capture_output=True, text=True, check=False).stdout
        return any(line.split()[3] == f"{ip}:{port}" for line in out.splitlines() if len(line.split()) > 3)

    # -- components -------------------------------------------------------------------------------------
    def start_redis(self) -> None:
        data = self.run_dir / "redis"
        data.mkdir(exist_ok=True)
        # appendonly + fsync always: a restarted Redis has every submitted call and every ack.
        self.spawn("redis", ["redis-server", "--bind", PROXY_IP, "--port", str(REDIS_PORT), "--dir", str(data),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                             "--protected-mode", "no"])
        wait_until(lambda: self.tcp_listening(PROXY_IP, REDIS_PORT), START_TIMEOUT_S, "redis to listen")

    def start_kamailio(self, nodes: list[int], slots: int = 2, ping_interval_s: int = 1) -> None:
        specs = [kamailio.Node(f"sip:{node_ip(n)}:5060", slots, f"n{n}") for n in nodes]
        cfg = kamailio.render(specs, listen=f"{PROXY_IP}:{PROXY_PORT}", out_dir=self.run_dir / "kamailio",
                              ping_interval_s=ping_interval_s, fr_timer_ms=1000)
        self.spawn("kamailio", kamailio.command(cfg, self.run_dir / "kamailio.pid"))
        wait_until(lambda: self.udp_listening(PROXY_IP, PROXY_PORT), START_TIMEOUT_S, "kamailio to listen")

    def start_node(self, n: int, slots: int = 2, hold_s: float = 0.0, redis: bool = False,
                   stale_s: float = 3.0, drain_timeout_s: float = 30.0) -> None:
        argv = [*SIPBRIDGE, "cluster", "node", "--id", f"n{n}", "--sip", f"{node_ip(n)}:5060", "--slots",
                str(slots), "--hold-s", str(hold_s), "--events", str(self.events_path(n)), "--stale-s",
                str(stale_s), "--refresh-s", "0.5", "--drain-timeout-s", str(drain_timeout_s)]
        if redis:
            argv += ["--redis", self.redis_url]
        before = len(self.events(n))
        self.spawn(f"n{n}", argv)
        wait_until(lambda: any(e["event"] == "ready" for e in self.events(n)[before:]) or self.procs[f"n{n}"].poll()
                   is not None, START_TIMEOUT_S, f"node n{n} to start")
        assert self.procs[f"n{n}"].poll() is None, self.log(f"n{n}")

    def events_path(self, n: int) -> Path:
        return self.run_dir / f"n{n}.events"

    def events(self, n: int) -> list[dict[str, Any]]:
        return events_of(self.events_path(n))

    def count(self, n: int, event: str, kind: str | None = None) -> int:
        return sum(1 for e in self.events(n) if e["event"] == event and (kind is None or e.get("kind") == kind))

    def sipbridge(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.ns.run([*SIPBRIDGE, *args], capture_output=True, text=True, timeout=timeout_s, check=False)

    def status(self) -> dict[str, Any]:
        proc = self.sipbridge("cluster", "status", "--json", "--calls", "1000", "--redis", self.redis_url)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)  # type: ignore[no-any-return]


@contextmanager
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    ns = NetNs()
    ns.create()
    c = Cluster(ns, tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
        ns.delete()


def sipp(scenario: str, target: str, local_port: int, *extra: str) -> list[str]:
    """A sipp caller on CALLER_IP running tests/sipp/SCENARIO.xml against target (IP:PORT)."""
    return ["sipp", "-sf", str(SIPP_DIR / f"{scenario}.xml"), "-i", CALLER_IP, "-p", str(local_port),
            "-mi", CALLER_IP, "-mp", str(6000 + (local_port - 5000) * 10), "-rtp_echo", "-nostdin", *extra, target]
