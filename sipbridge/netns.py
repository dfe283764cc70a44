"""Private network namespaces for tests and the demo (needs root).

Why: Janus never gathers ICE candidates on a LOOPBACK interface and aioice drops
127.0.0.1, so a loopback-only setup needs a namespace with a veth pair whose ends
both stay inside it, and 127.0.0.2/32 on ``lo`` *and* on the veth end ``sbv0``
(see the field notes). Janus then uses ``ice_enforce_list = "sbv0"``; every packet
still travels over ``lo`` and nothing can leave the namespace.

API:

* ``NetNs(name=None)``: ``create()``, ``delete()`` (idempotent), ``argv(cmd)``
  (prefix with ``ip netns exec NAME``), ``run(cmd)``, ``popen(cmd)``; a context manager
  that creates and always deletes. Names default to ``sb-<pid>-<n>``, unique per process.
* ``entered(name)``: context manager that moves the *calling thread* into the namespace
  with setns(2) and moves it back on exit. Network namespaces are per thread in Linux:
  sockets created by that thread, threads it starts afterwards and child processes it
  spawns all live in the namespace. Threads started earlier (a ZeroMQ context's I/O
  threads, executors) stay outside, which does not matter for ``ipc://`` endpoints.
* ``call_in(name, fn, *args)``: run ``fn`` in a short-lived thread inside the namespace
  (used to probe a server in a namespace the caller is not in).
* ``cleanup_stale()``: delete ``sb-<pid>-*`` namespaces whose creating process is gone.

CLI: ``sipbridge netns create NAME``, ``sipbridge netns delete NAME``,
``sipbridge netns exec NAME -- CMD...``, ``sipbridge netns cleanup``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import click

log = logging.getLogger("sipbridge.netns")

VETH_INSIDE = "sbv0"
VETH_PEER = "sbv1"
# aioice drops exactly 127.0.0.1 from its host candidates and libnice pins to the interface that
# carries the address: putting 127.0.0.2 on lo and on the veth gives both a usable candidate.
ICE_ADDRESS = "127.0.0.2/32"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
NAME_PREFIX = "sb"
STALE_NAME_RE = re.compile(rf"^{NAME_PREFIX}-(\d+)-\d+$")
IP_TIMEOUT_S = 10.0

_counter = itertools.count()
T = TypeVar("T")


class NetNsError(RuntimeError):
    """A namespace operation failed (usually: not root, or the name exists)."""


def unique_name(prefix: str = NAME_PREFIX) -> str:
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def _ip(*args: str) -> None:
    cmd = ["ip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise NetNsError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.returncode}")


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


class NetNs:
    """One private network namespace with the loopback ICE set-up."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name()
        self.created = False

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.argv(cmd), **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.argv(cmd), **kwargs)

    def create(self) -> NetNs:
        if exists(self.name):
            raise NetNsError(f"network namespace {self.name} already exists")
        _ip("netns", "add", self.name)
        self.created = True
        try:
            inside = ("netns", "exec", self.name)
            _ip(*inside, "ip", "link", "set", "lo", "up")
            _ip(*inside, "ip", "link", "add", VETH_INSIDE, "type", "veth", "peer", "name", VETH_PEER)
            for dev in (VETH_INSIDE, VETH_PEER, "lo"):
                # IPv6 off: no link-local candidates that would only slow ICE down.
                _ip(*inside, "sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1")
            _ip(*inside, "ip", "addr", "add", ICE_ADDRESS, "dev", "lo")
            _ip(*inside, "ip", "addr", "add", ICE_ADDRESS, "dev", VETH_INSIDE)
            _ip(*inside, "ip", "link", "set", VETH_INSIDE, "up")
            _ip(*inside, "ip", "link", "set", VETH_PEER, "up")
        except Exception:
            self.delete()
            raise
        log.info("created network namespace %s", self.name)
        return self

    def delete(self) -> None:
        """Remove the namespace; its veth pair disappears with it. Safe to call twice."""
        if not exists(self.name):
            self.created = False
            return
        try:
            _ip("netns", "delete", self.name)
        except NetNsError as exc:
            log.warning("could not delete network namespace %s: %s", self.name, exc)
            return
        self.created = False
        log.info("deleted network namespace %s", self.name)

    def entered(self) -> contextlib.AbstractContextManager[None]:
        return entered(self.name)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return call_in(self.name, fn, *args)

    def __enter__(self) -> NetNs:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"NetNs({self.name!r})"


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    # os.setns only exists from Python 3.12; this project runs on 3.11.
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetNsError(f"setns failed: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into namespace ``name`` for the ``with`` body."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(original)


def call_in(name: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a fresh thread that lives in namespace ``name``; return its result."""
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            try:
                _setns(target)  # the thread ends afterwards, so there is nothing to restore
            finally:
                os.close(target)
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]  # type: ignore[no-any-return]


def ice_ready() -> bool:
    """Whether the calling thread's namespace has the ICE set-up (the veth end Janus is told to use)."""
    import socket

    try:
        socket.if_nametoindex(VETH_INSIDE)
    except OSError:
        return False
    return True


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def cleanup_stale() -> list[str]:
    """Delete ``sb-<pid>-<n>`` namespaces left behind by processes that no longer exist."""
    removed = []
    for name in list_names():
        match = STALE_NAME_RE.match(name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            NetNs(name).delete()
            removed.append(name)
    return removed


@click.group("netns")
def command() -> None:
    """Create, use and remove the private network namespaces used by tests and the demo (root)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@command.command("create")
@click.argument("name")
def create_cmd(name: str) -> None:
    """Create NAME with lo up, veth sbv0/sbv1 inside and 127.0.0.2/32 on lo and sbv0."""
    try:
        NetNs(name).create()
    except NetNsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(name)


@command.command("delete")
@click.argument("name")
def delete_cmd(name: str) -> None:
    """Delete NAME (no error when it does not exist)."""
    NetNs(name).delete()


@command.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(name: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside NAME (use -- before CMD): replaces this process."""
    if not exists(name):
        raise click.ClickException(f"no network namespace {name}")
    argv = NetNs(name).argv(cmd)
    os.execvp(argv[0], argv)


@command.command("cleanup")
def cleanup_cmd() -> None:
    """Delete sb-<pid>-<n> namespaces whose creating process has exited."""
    for name in cleanup_stale():
        click.echo(f"deleted {name}")
