"""The bot's Chromium as a program of its own, so that a restarted browser stage finds its bot still in the room.

Launched by Playwright, Chromium is a child of Playwright's driver, which is a child of the browser stage: when the
stage dies, the driver and Chromium go with it, and its replacement must launch Chromium and join the room again
(2.6-3.6 s without the SIP side in the room, issue 15). ``sipbridge chromium`` keeps Chromium instead, and the
browser stage drives it over the DevTools protocol (Playwright's ``connect_over_cdp``, through the stage's own page
server: ``stage.py``). A restarted stage takes over the page that is still in the room and only points the page's
hook at its new socket.

Only this process talks to Chromium: over the pipe Chromium opens with ``--remote-debugging-pipe`` (it reads
commands on fd 3 and writes on fd 4), so no DevTools port is open on the host. The browser stage reaches it through
a Unix socket in the run folder (0600 in a 0700 folder), one client at a time (greeted with ``GREETING``; any other
is closed at once); messages are the protocol's JSON, each ended by a NUL byte, as on Chromium's pipe.

When a client goes (a killed stage), what it made in Chromium stays (its contexts and pages: the bot stays in the
room), but its sessions are detached and auto-attach is turned off: Playwright asks Chromium to hold every new
target until a debugger lets it run, and without this a worker the page starts later would wait for ever. Message
ids are renumbered per client, so an answer to a gone client's command never reaches the next one.

Chromium runs as an unprivileged user with its sandbox on (``chromium.py``), in a fresh profile folder that is
removed when it stops; what it prints goes to ``chromium-stderr.log`` in the run folder. SIGTERM closes Chromium
(the bot leaves the room). If Chromium dies, its client is dropped (the stage joins again) and a new Chromium starts
at once; past ``MAX_CRASHES`` in ``CRASH_WINDOW_S`` this process exits 1 and supervisord takes over. No process of
Chromium's own process group outlives the Chromium it belongs to. Chromium also ends when this process is killed:
its pipe closes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import click

SOCKET_NAME = "chromium.cdp"
# The profile lives in the system's temporary folder, as Playwright's do: Chromium's user cannot enter the run folder
# (0700, ours). Its path is noted in the run folder, so a keeper started after a killed one removes the old one.
PROFILE_PREFIX = "sipbridge-chromium-"
PROFILE_NOTE = "chromium.profile"
STDERR_LOG = "chromium-stderr.log"  # what Chromium says (mostly noise), for the reason when it dies
STDERR_TAIL_BYTES = 4000
STDERR_TAIL_LINES = 4
STDERR_LINE_CHARS = 240
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CLOSE_TIMEOUT_S = 5.0
# Chromium dying more often than this is not fixed by starting it again here: exit, and supervisord's start limits
# take over.
MAX_CRASHES = 5
CRASH_WINDOW_S = 300.0
HELPERS_GONE_TIMEOUT_S = 2.0
# Chromium's --remote-debugging-pipe: commands in on fd 3, answers and events out on fd 4.
CHROMIUM_IN_FD, CHROMIUM_OUT_FD = 3, 4
# Above the descriptors a child's 0-4 are made from, so setting those up never overwrites one still to be copied.
HIGH_FD = 10
# Flags Playwright passes to a browser it launches that matter to a bot (the rest of what it passes is Chrome's
# and Edge's own housekeeping); stages.browser.chromium.CHROMIUM_FLAGS comes first.
KEEPER_FLAGS = [
    "--remote-debugging-pipe",
    "--no-startup-window",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-breakpad",
    "--disable-hang-monitor",
    "--disable-ipc-flooding-protection",
    "--disable-popup-blocking",
    "--disable-prompt-on-repost",
    "--no-default-browser-check",
    "--password-store=basic",
    "--use-mock-keychain",
    "--mute-audio",
]
# The first message to the client this keeper serves (any other is closed at once): it may start talking.
GREETING = b"sipbridge-chromium-keeper 1"
_ANSWER_ID = re.compile(rb'^\{"id":(\d+)')
_ATTACH_EVENTS = (b'"Target.attachedToTarget"', b'"Target.detachedFromTarget"')

log = logging.LoggerAdapter(logging.getLogger("sipbridge.chromium"), {"stage": "chromium"})


class Keeper:
    """Chromium on a pipe, shared with one client at a time over a Unix socket."""

    def __init__(self, socket_path: Path, extra_args: list[str] | None = None) -> None:
        self.socket_path = socket_path
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self._commands_w = self._output_r = -1
        self.profile: Path | None = None
        self.stderr_log = socket_path.parent / STDERR_LOG
        self._to_chromium: asyncio.WriteTransport | None = None
        self._from_chromium: asyncio.StreamReader | None = None
        self._client: asyncio.StreamWriter | None = None
        self._generation = 0
        self._next_id = 0
        # Our id -> (client generation, the client's id); generation 0: our own commands, never forwarded.
        self._pending: dict[int, tuple[int, int]] = {}
        self._sessions: set[str] = set()
        self.dropped: dict[str, int] = {}
        # Set while a Chromium's pipe is open: a client is greeted only then.
        self._ready = asyncio.Event()
        self._launches = 0  # which Chromium a client talked to (its sessions die with that one)
        self._crashes: collections.deque[float] = collections.deque()

    # ----- Chromium ----------------------------------------------------------------------------------------------
    def _launch(self) -> None:
        from stages.browser.chromium import CHROMIUM_FLAGS, launch_settings

        executable, env = launch_settings()
        run_folder = self.socket_path.parent
        note = run_folder / PROFILE_NOTE
        with contextlib.suppress(OSError):
            stale = Path(note.read_text().strip())
            if stale.name.startswith(PROFILE_PREFIX):  # left by a keeper that was killed
                shutil.rmtree(stale, ignore_errors=True)
        self.profile = Path(tempfile.mkdtemp(prefix=PROFILE_PREFIX))
        note.write_text(f"{self.profile}\n")
        self.stderr_log = run_folder / STDERR_LOG
        commands_r, commands_w = os.pipe()
        output_r, output_w = os.pipe()
        child_in = fcntl.fcntl(commands_r, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
        child_out = fcntl.fcntl(output_w, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
        for fd in (commands_r, output_w):
            os.close(fd)

        def pipe_fds() -> None:  # in the child, before exec: os.dup2 makes the copies inheritable
            os.dup2(child_in, CHROMIUM_IN_FD)
            os.dup2(child_out, CHROMIUM_OUT_FD)

        args = [*CHROMIUM_FLAGS, *KEEPER_FLAGS, f"--user-data-dir={self.profile}", *self.extra_args]
        stderr = self.stderr_log.open("wb")
        try:
            # preexec_fn: no other thread runs yet (the loop has started none), so the fork is safe.
            self.proc = subprocess.Popen(
                [executable, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, preexec_fn=pipe_fds, process_group=0, pass_fds=(CHROMIUM_IN_FD, CHROMIUM_OUT_FD),
            )  # fmt: skip
        finally:
            stderr.close()
            os.close(child_in)
            os.close(child_out)
        self._commands_w, self._output_r = commands_w, output_r
        self._launches += 1
        log.info("Chromium started (pid %d, profile %s)", self.proc.pid, self.profile)

    async def _open_pipe(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_MESSAGE_BYTES)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._output_r, "rb", 0))
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(self._commands_w, "wb", 0))
        self._from_chromium, self._to_chromium = reader, transport

    def _send(self, message: bytes) -> None:
        if self._to_chromium is None or self._to_chromium.is_closing():
            self._drop("Chromium is not running")  # a command of a client whose Chromium just died
            return
        self._to_chromium.write(message + b"\0")

    def _own(self, method: str, params: dict[str, Any], session: str | None = None) -> None:
        self._next_id += 1
        self._pending[self._next_id] = (0, 0)
        body: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            body["sessionId"] = session
        self._send(json.dumps(body).encode())

    def _drop(self, reason: str) -> None:
        count = self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: a flood does not flood the log
            log.warning("dropped a message: %s (%d so far)", reason, count)

    async def _pump_from_chromium(self) -> None:
        assert self._from_chromium is not None
        while True:
            try:
                raw = (await self._from_chromium.readuntil(b"\0"))[:-1]
            except asyncio.IncompleteReadError:
                return  # Chromium closed its end: it is gone
            except asyncio.LimitOverrunError as exc:
                await self._from_chromium.readexactly(exc.consumed)  # skip it; the rest stays in sync
                self._drop("message from Chromium over the size limit")
                continue
            answer = _ANSWER_ID.match(raw)
            if answer is None:
                if any(name in raw[:64] for name in _ATTACH_EVENTS):
                    self._track_session(raw)
                if self._client is not None:
                    self._client.write(raw + b"\0")
                continue
            entry = self._pending.pop(int(answer.group(1)), None)
            if entry is None or entry[0] != self._generation or self._client is None:
                continue  # ours, or a gone client's
            self._client.write(b'{"id":%d' % entry[1] + raw[answer.end():] + b"\0")

    def _track_session(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
            session = event["params"]["sessionId"]
        except (ValueError, KeyError, TypeError):
            return
        if event.get("method") == "Target.attachedToTarget":
            self._sessions.add(session)
        else:
            self._sessions.discard(session)

    # ----- the client ----------------------------------------------------------------------------------------
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._client is not None:
            log.warning("refused a second client: one is connected")
            writer.close()
            return
        await self._ready.wait()  # Chromium is being started again
        if self._client is not None:
            writer.close()
            return
        launch = self._launches
        self._generation += 1
        generation = self._generation
        self._client = writer
        writer.write(GREETING + b"\0")
        log.info("client %d connected", generation)
        try:
            while True:
                try:
                    raw = (await reader.readuntil(b"\0"))[:-1]
                except asyncio.LimitOverrunError as exc:
                    await reader.readexactly(exc.consumed)
                    self._drop("command over the size limit")
                    continue
                self._forward_command(raw, generation)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._client = None
            writer.close()
            self._pending = {k: v for k, v in self._pending.items() if v[0] != generation}
            if launch == self._launches:  # else its Chromium is gone, and its sessions with it
                self._release_sessions()
                log.info("client %d gone: its pages stay, %d session(s) detached", generation, len(self._sessions))
            else:
                log.info("client %d gone with the Chromium it used", generation)
            self._sessions.clear()

    def _forward_command(self, raw: bytes, generation: int) -> None:
        try:
            command = json.loads(raw)
        except ValueError:
            self._drop("command is not JSON")
            return
        if not isinstance(command, dict) or not isinstance(command.get("id"), int):
            self._drop("command without an integer id")
            return
        self._next_id += 1
        self._pending[self._next_id] = (generation, command["id"])
        command["id"] = self._next_id
        self._send(json.dumps(command, separators=(",", ":")).encode())

    def _release_sessions(self) -> None:
        """Undo what a gone client asked of Chromium that would hold pages back: auto-attach and its sessions."""
        if self._to_chromium is None or self._to_chromium.is_closing():
            return
        self._own("Target.setAutoAttach", {"autoAttach": False, "waitForDebuggerOnStart": False, "flatten": True})
        self._own("Target.setDiscoverTargets", {"discover": False})
        for session in self._sessions:
            self._own("Runtime.runIfWaitingForDebugger", {}, session)
            self._own("Target.detachFromTarget", {"sessionId": session})

    # ----- lifetime ------------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopping = asyncio.ensure_future(stop.wait())
        server: asyncio.Server | None = None
        try:
            while True:
                self._launch()
                assert self.proc is not None
                await self._open_pipe()
                self._ready.set()
                if server is None:
                    server = await self._serve()
                pump = asyncio.ensure_future(self._pump_from_chromium())
                await asyncio.wait([pump, stopping], return_when=asyncio.FIRST_COMPLETED)
                pump.cancel()
                self._ready.clear()
                if stopping.done():
                    server.close()
                    self._drop_client()
                    log.info("stopping: closing Chromium")
                    self._own("Browser.close", {})
                    await self._wait_chromium(helpers_gone=True)
                    return 0
                # Chromium died, and the bot's page with it. Its client goes (its stage sees the browser gone and
                # joins again) and a new Chromium starts at once: a new process of this program would cost its
                # start too. Its helpers get one SIGKILL and no wait.
                self._drop_client()
                await self._wait_chromium(helpers_gone=False)
                log.error("Chromium closed its pipe (exit status %s); its last words: %s", self.proc.returncode,
                          self._stderr_tail())
                self._end_pipe()
                self._remove_profile()
                now = time.monotonic()
                self._crashes.append(now)
                while self._crashes and now - self._crashes[0] > CRASH_WINDOW_S:
                    self._crashes.popleft()
                if len(self._crashes) > MAX_CRASHES:
                    log.error("Chromium died %d times in %.0f s: exiting (supervisord starts this program again)",
                              len(self._crashes), CRASH_WINDOW_S)
                    return 1
                log.info("starting Chromium again")
        finally:
            stopping.cancel()
            if server is not None:
                server.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            self._remove_profile()

    async def _serve(self) -> asyncio.Server:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old_umask = os.umask(0o177)  # the socket is 0600 from the moment it exists
        try:
            server = await asyncio.start_unix_server(self._serve_client, self.socket_path, limit=MAX_MESSAGE_BYTES)
        finally:
            os.umask(old_umask)
        log.info("serving Chromium's DevTools protocol on %s", self.socket_path)
        return server

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()

    def _end_pipe(self) -> None:
        if self._to_chromium is not None:
            self._to_chromium.close()
        self._to_chromium = self._from_chromium = None
        self._pending.clear()

    def _remove_profile(self) -> None:
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.socket_path.parent / PROFILE_NOTE).unlink()
            self.profile = None

    def _stderr_tail(self) -> str:
        try:
            with self.stderr_log.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - STDERR_TAIL_BYTES))
                lines = f.read().decode(errors="replace").strip().splitlines()[-STDERR_TAIL_LINES:]
            return " | ".join(line[:STDERR_LINE_CHARS] for line in lines) or "(nothing)"
        except OSError as exc:
            return f"({exc})"

    async def _wait_chromium(self, *, helpers_gone: bool) -> None:
        """Until Chromium has exited (killed if it does not close), then end its helpers; with ``helpers_gone``
        also wait until none is left."""
        assert self.proc is not None
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("Chromium did not close within %.0f s: killing it", CLOSE_TIMEOUT_S)
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        # Its helpers (zygotes, renderers, crash handler) are in its process group: none outlives this program, or
        # a host that checks what a call left behind finds them (the node does).
        deadline = time.monotonic() + (HELPERS_GONE_TIMEOUT_S if helpers_gone else 0.0)
        while True:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            except PermissionError:
                log.warning("cannot end Chromium's helper processes (process group %d)", self.proc.pid)
                return
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.02)


@click.command()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Unix socket the browser stage connects to [RUN_DIR/{SOCKET_NAME}].")
@click.option("--log-level", default="INFO", show_default=True)
def command(socket_path: Path | None, log_level: str) -> None:
    """Keep the bot's Chromium for the browser stage (its --chromium-socket): the bot stays in the room when the
    stage restarts."""
    from stages.base import configure_logging, run_dir
    from stages.browser.chromium import ChromiumUserError

    configure_logging(log_level)
    path = socket_path or Path(run_dir()) / SOCKET_NAME
    if not path.parent.is_dir():
        raise click.ClickException(f"{path.parent} does not exist (the run folder)")
    try:
        raise SystemExit(asyncio.run(Keeper(path).run()))
    except ChromiumUserError as exc:
        raise click.ClickException(str(exc)) from None
