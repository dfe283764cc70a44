"""A janus stage whose control socket already has a live owner (a second `sipbridge up` for the same run folder)
refuses to start, naming the endpoint, and leaves the live owner's socket in place and answering."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import zmq

from tests.stagehelp import SIPBRIDGE

EXIT_TIMEOUT_S = 60.0  # the stage exits before touching Janus; the import is what takes the time on a loaded machine
REPLY_TIMEOUT_MS = 10_000


def test_second_janus_stage_does_not_take_a_live_control_socket(tmp_path: Path) -> None:
    control = tmp_path / "janus.control"
    ctx = zmq.Context.instance()
    owner = ctx.socket(zmq.ROUTER)  # the live stage's control socket, as the janus stage binds it
    owner.setsockopt(zmq.LINGER, 0)
    owner.bind(f"ipc://{control}")
    try:
        env = {**os.environ, "SIPBRIDGE_RUN_DIR": str(tmp_path)}
        # Janus is never reached: a closed port, so a stage that wrongly went on would fail differently (and late).
        proc = subprocess.run([*SIPBRIDGE, "stage", "janus", "--name", "janus", "--janus-url", "ws://127.0.0.1:9",
                             "--in", f"ipc://{tmp_path}/upstream.sock"],
                              env=env, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert f"ipc://{control}" in out and "in use by a live process" in out, out
        assert "Traceback" not in out, out
        # The live owner still has its socket: a client reaches it through the same file.
        assert control.exists()
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(f"ipc://{control}")
        try:
            client.send(b"status?")
            assert owner.poll(REPLY_TIMEOUT_MS), "the live owner no longer receives on its control socket"
            assert owner.recv_multipart()[-1] == b"status?"
        finally:
            client.close()
    finally:
        owner.close()


def test_janus_stage_binds_a_control_socket_left_by_a_dead_owner(tmp_path: Path) -> None:
    """The check refuses only a live owner: a socket file left by a killed stage is no reason to refuse."""
    control = tmp_path / "janus.control"
    ctx = zmq.Context.instance()
    # A killed process leaves its socket file behind. A plain unix socket closed makes exactly that file (a ZeroMQ
    # socket would not do: its I/O thread unlinks the path at close, later, maybe after the new stage has bound).
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gone.bind(str(control))
    gone.close()
    assert control.is_socket()
    env = {**os.environ, "SIPBRIDGE_RUN_DIR": str(tmp_path)}
    proc = subprocess.Popen([*SIPBRIDGE, "stage", "janus", "--name", "janus", "--janus-url", "ws://127.0.0.1:9",
                             "--in", f"ipc://{tmp_path}/upstream.sock"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        client = ctx.socket(zmq.REQ)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(f"ipc://{control}")
        try:
            deadline = time.monotonic() + EXIT_TIMEOUT_S
            client.send_json({"cmd": "status"})
            while not client.poll(500):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                if time.monotonic() > deadline:
                    proc.kill()
                    out = proc.communicate(10)[0]
                    raise AssertionError(f"no reply from the new stage's control socket in {EXIT_TIMEOUT_S:.0f} s "
                                         f"(socket file there: {control.exists()}); the stage said:\n{out}")
            assert "ok" in client.recv_json()  # type: ignore[operator]
        finally:
            client.close()
    finally:
        proc.kill()
        proc.wait(10)


def test_janus_stage_that_cannot_bind_its_control_socket_exits_instead_of_running_without_it(tmp_path: Path) -> None:
    """A stage with no call control would look alive to supervisord and to `sipbridge status` while nothing can
    hang up or dial: it exits 1, naming the endpoint, so it is restarted and the reason is in its log."""
    control = f"ipc://{tmp_path}/no-such-folder/janus.control"
    env = {**os.environ, "SIPBRIDGE_RUN_DIR": str(tmp_path)}
    proc = subprocess.run([*SIPBRIDGE, "stage", "janus", "--name", "janus", "--janus-url", "ws://127.0.0.1:9",
                           "--in", f"ipc://{tmp_path}/upstream.sock", "--control", control],
                          env=env, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "the control task ended" in out and control in out, out
    assert "without end of stream" in out and "Unclosed client session" not in out, out
