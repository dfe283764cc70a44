"""The local echo peer's RTCP half (sipbridge/testing/rtcpecho.py): keyframe requests come back, nothing else."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

from sipbridge.testing.localcall import udp_ports, wait_until
from sipbridge.testing.rtcpecho import asks_for_keyframe

RECEIVER_REPORT = struct.pack("!BBHI", 0x80, 201, 1, 0x1111)  # RR with no report blocks
PLI = struct.pack("!BBHII", 0x81, 206, 2, 0x1111, 0x2222)
FIR = struct.pack("!BBHIIII", 0x84, 206, 4, 0x1111, 0, 0x2222, 0x01000000)
NACK = struct.pack("!BBHIII", 0x81, 205, 3, 0x1111, 0x2222, 0x00050000)  # transport feedback, not a keyframe ask


def test_keyframe_requests_are_found_in_compound_packets_and_nothing_else_is() -> None:
    assert asks_for_keyframe(PLI) and asks_for_keyframe(FIR)
    assert asks_for_keyframe(RECEIVER_REPORT + PLI)
    assert not asks_for_keyframe(RECEIVER_REPORT) and not asks_for_keyframe(NACK)
    assert not asks_for_keyframe(b"") and not asks_for_keyframe(b"\x00" * 40)  # garbage: not version 2
    assert not asks_for_keyframe(RECEIVER_REPORT[:3])  # shorter than a header


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_echo_returns_a_pli_to_its_sender_and_drops_a_report() -> None:
    port = free_udp_port()
    proc = subprocess.Popen([sys.executable, "-m", "sipbridge.testing.rtcpecho", "127.0.0.1", str(port)],
                            stdout=subprocess.PIPE, text=True)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.settimeout(5)
    try:
        wait_until(lambda: port in udp_ports() or proc.poll() is not None, 10, "rtcpecho to listen")
        assert proc.poll() is None
        sender.sendto(RECEIVER_REPORT, ("127.0.0.1", port))
        sender.sendto(b"garbage", ("127.0.0.1", port))
        sender.sendto(RECEIVER_REPORT + PLI, ("127.0.0.1", port))
        # Datagrams on loopback keep their order: the first thing back is the PLI, so the report was dropped.
        assert sender.recv(2048) == RECEIVER_REPORT + PLI
    finally:
        sender.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "returned 1 keyframe requests, dropped 2 other RTCP packets" in out
