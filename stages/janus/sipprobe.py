"""Learn the SIP address of a Janus SIP plugin handle: where a caller must send its INVITE.

Janus's SIP plugin gives every registered handle its own sofia-sip stack listening on a random UDP port
(``sip:LOCAL_IP:*``) and reports that port nowhere: not in the ``registered`` event, not in any request. But
sofia sends its requests from that socket and names it in the top Via. So the stage asks its handle to send one
out-of-dialog SIP MESSAGE (which Janus allows for guests and registered accounts alike) to a UDP socket of its
own, reads the handle's address from the Via's sent-by, and answers 200 so sofia does not retransmit.

Only possible where the stage can bind an address that Janus's SIP stack reaches: Janus on the same host.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Awaitable, Callable

PROBE_TIMEOUT_S = 5.0
PROBE_USER = "sipbridge-probe"
MAX_DATAGRAM_BYTES = 65_535
# The Via's sent-by: SIP/2.0/UDP HOST[:PORT] (RFC 3261 20.42); IPv6 references in brackets.
_VIA_RE = re.compile(r"^SIP/2\.0/UDP\s+(\[[^\]]+\]|[^\s:;,]+)(?::(\d+))?", re.IGNORECASE)
_HEADER_NAMES = {"v": "via", "f": "from", "t": "to", "i": "call-id"}


class ProbeError(RuntimeError):
    """The handle's SIP address could not be learned; the message says why."""


def parse_probe(data: bytes, token: str) -> tuple[tuple[str, int], bytes]:
    """A probe MESSAGE carrying ``token`` -> (the sender's SIP host and port from its top Via, our 200 answer).

    Raises ProbeError for anything else (another datagram on the socket is not ours to answer)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProbeError("not UTF-8") from None
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    if not lines[0].startswith("MESSAGE ") or not lines[0].endswith(" SIP/2.0"):
        raise ProbeError(f"not a SIP MESSAGE: {lines[0][:80]!r}")
    if token not in body:
        raise ProbeError("a MESSAGE without this probe's token")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProbeError(f"header line without a colon: {line[:80]!r}")
        key = name.strip().lower()
        headers.append((_HEADER_NAMES.get(key, key), value.strip()))
    vias = [value for key, value in headers if key == "via"]
    if not vias:
        raise ProbeError("no Via")
    match = _VIA_RE.match(vias[0].split(",")[0].strip())
    if match is None:
        raise ProbeError(f"not a UDP Via: {vias[0][:80]!r}")
    host = match[1].strip("[]")
    port = int(match[2]) if match[2] else 5060
    answer = ["SIP/2.0 200 OK"]
    for key, value in headers:
        if key in ("via", "from", "call-id", "cseq"):
            answer.append(f"{key.title()}: {value}")
        elif key == "to":
            answer.append(f"To: {value}" + ("" if ";tag=" in value else f";tag={secrets.token_hex(4)}"))
    answer.append("Content-Length: 0")
    return (host, port), ("\r\n".join(answer) + "\r\n\r\n").encode()


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, token: str) -> None:
        self.token = token
        self.found: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.DatagramTransport | None = None
        self.ignored = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            sent_by, answer = parse_probe(data, self.token)
        except ProbeError:
            self.ignored += 1
            return
        if self.transport is not None:
            self.transport.sendto(answer, addr)  # every retransmission gets its 200, too
        if not self.found.done():
            self.found.set_result(sent_by)


async def learn_sip_address(send_message: Callable[[str, str], Awaitable[object]], bind_host: str,
                            timeout_s: float = PROBE_TIMEOUT_S) -> tuple[str, int]:
    """Bind a UDP socket on ``bind_host``, have the handle send a MESSAGE there (``send_message(uri, content)``),
    return the handle's (host, port) as its Via names it. ProbeError on failure."""
    token = secrets.token_hex(8)
    loop = asyncio.get_running_loop()
    try:
        transport, listener = await loop.create_datagram_endpoint(lambda: _Listener(token),
                                                                  local_addr=(bind_host, 0))
    except OSError as exc:
        raise ProbeError(f"cannot listen on {bind_host} for the probe (is Janus on this host?): {exc}") from None
    try:
        port = transport.get_extra_info("sockname")[1]
        host = f"[{bind_host}]" if ":" in bind_host else bind_host
        await send_message(f"sip:{PROBE_USER}@{host}:{port}", token)
        try:
            return await asyncio.wait_for(asyncio.shield(listener.found), timeout_s)
        except TimeoutError:
            raise ProbeError(f"no MESSAGE from the handle within {timeout_s:.0f} s") from None
    finally:
        # Linger a moment so a retransmitted MESSAGE still gets its 200 (sofia retransmits after 500 ms).
        with contextlib.suppress(Exception):
            await asyncio.sleep(0.05)
        transport.close()
