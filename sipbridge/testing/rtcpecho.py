"""Keyframe requests sent back to whoever sent them: the RTCP half of the local echo peer.

``sipp -rtp_echo`` echoes the RTP on its media port and on that port + 2 (audio, video) but not the RTCP next to
each. The bridge's video back from such a peer is its own, echoed: a keyframe request the bridge sends the peer (a
SIP decoder restarted, a packet lost) went nowhere, and the picture came back only with the bridge's encoder's next
scheduled keyframe (every 2 s). This program listens on the RTCP ports and returns each compound packet holding a
PLI or FIR to its sender, so the request reaches the bridge's own encoder as it would a real peer's; any other RTCP
(reports, REMB, NACK) is dropped, as sipp drops it, so that nothing but the keyframe request comes back.

Run: ``python -m sipbridge.testing.rtcpecho HOST PORT [PORT ...]``; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys

MAX_DATAGRAM_BYTES = 2048
PSFB = 206  # RTCP payload-specific feedback (RFC 4585)
FMT_PLI = 1
FMT_FIR = 4  # RFC 5104
RTCP_HEADER_BYTES = 4


def feedback_formats(data: bytes) -> set[int]:
    """The payload-specific feedback formats (FMT_PLI, FMT_FIR, ...) in an RTCP compound packet, walked by the
    packets' length words; the walk stops at anything that is not RTCP version 2."""
    found: set[int] = set()
    offset = 0
    while offset + RTCP_HEADER_BYTES <= len(data):
        first, packet_type = data[offset], data[offset + 1]
        if first >> 6 != 2:
            break
        if packet_type == PSFB:
            found.add(first & 0x1F)
        offset += (int.from_bytes(data[offset + 2:offset + 4], "big") + 1) * 4
    return found


def asks_for_keyframe(data: bytes) -> bool:
    """Whether an RTCP compound packet holds a PLI or FIR."""
    return bool(feedback_formats(data) & {FMT_PLI, FMT_FIR})


def serve(host: str, ports: list[int]) -> int:
    selector = selectors.DefaultSelector()
    sockets = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
        sockets.append(sock)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    returned = dropped = 0
    print(f"rtcpecho: returning keyframe requests on {host} ports {ports}", flush=True)
    while not stopping:
        for key, _ in selector.select(timeout=0.5):
            ready: socket.socket = key.data
            try:
                data, sender = ready.recvfrom(MAX_DATAGRAM_BYTES)
            except OSError:
                continue
            if asks_for_keyframe(data):
                returned += 1
                try:
                    ready.sendto(data, sender)
                except OSError as exc:  # the sender's port went away: nothing to return it to
                    print(f"rtcpecho: could not return to {sender}: {exc}", flush=True)
            else:
                dropped += 1
    print(f"rtcpecho: returned {returned} keyframe requests, dropped {dropped} other RTCP packets", flush=True)
    for sock in sockets:
        sock.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all(a.isdigit() for a in argv[1:]):
        print("usage: python -m sipbridge.testing.rtcpecho HOST PORT [PORT ...]", file=sys.stderr)
        return 2
    return serve(argv[0], [int(a) for a in argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
