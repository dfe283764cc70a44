"""The little SIP a node's front and its hold-call UA need: parse, build, Via handling (no I/O).

Only what RFC 3261 asks of a stateless proxy and a simple UA over UDP: a start line, headers kept in
order (compact forms expanded), a body sized by Content-Length. Anything that does not parse raises
``SipError`` (a ``ValueError``); callers count it as a drop and go on.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field

MAGIC_COOKIE = "z9hG4bK"
MAX_MESSAGE_BYTES = 65_535
# RFC 3261 7.3.3 compact header names, expanded so lookups need one spelling.
COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
           "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding"}
REASONS = {100: "Trying", 180: "Ringing", 200: "OK", 400: "Bad Request", 405: "Method Not Allowed",
           481: "Call/Transaction Does Not Exist", 483: "Too Many Hops", 486: "Busy Here",
           500: "Server Internal Error", 503: "Service Unavailable"}
_REQUEST_RE = re.compile(r"^([A-Z]+) (\S+) SIP/2\.0$")
_STATUS_RE = re.compile(r"^SIP/2\.0 ([1-6]\d\d) ?(.*)$")
_URI_HOSTPORT_RE = re.compile(r"sips?:(?:[^@;>]*@)?(\[[^\]]+\]|[^:;>?]+)(?::(\d+))?")


class SipError(ValueError):
    """A datagram that is not a SIP message we can handle."""


@dataclass
class SipMessage:
    method: str | None = None  # requests
    uri: str | None = None
    status: int | None = None  # responses
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # (lower-case name, value), in order
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return self.method is not None

    def get(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, comma-separated lists split (Via, Route, Record-Route)."""
        name = name.lower()
        values: list[str] = []
        for key, value in self.headers:
            if key == name:
                values.extend(split_commas(value))
        return values

    def set(self, name: str, value: str) -> None:
        name = name.lower()
        for i, (key, _) in enumerate(self.headers):
            if key == name:
                self.headers[i] = (name, value)
                return
        self.headers.append((name, value))

    def remove(self, name: str) -> None:
        name = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k != name]

    @property
    def call_id(self) -> str:
        value = self.get("call-id")
        if not value:
            raise SipError("no Call-ID")
        return value

    @property
    def cseq(self) -> tuple[int, str]:
        value = self.get("cseq") or ""
        parts = value.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SipError(f"bad CSeq {value!r}")
        return int(parts[0]), parts[1].upper()

    def top_via(self) -> str:
        vias = self.get_all("via")
        if not vias:
            raise SipError("no Via")
        return vias[0]

    def to_bytes(self) -> bytes:
        if self.is_request:
            lines = [f"{self.method} {self.uri} SIP/2.0"]
        else:
            lines = [f"SIP/2.0 {self.status} {self.reason or REASONS.get(self.status or 0, '')}".rstrip()]
        for key, value in self.headers:
            if key != "content-length":
                lines.append(f"{header_name(key)}: {value}")
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def header_name(lower: str) -> str:
    special = {"call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate"}
    return special.get(lower) or "-".join(part.capitalize() for part in lower.split("-"))


def split_commas(value: str) -> list[str]:
    """Split a header value on commas outside <...> and quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth = max(0, depth - 1)
        elif not quoted and depth == 0 and ch == ",":
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def parse(data: bytes) -> SipMessage:
    if len(data) > MAX_MESSAGE_BYTES:
        raise SipError("message too large")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise SipError("no end of headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipError("headers are not UTF-8") from None
    lines = text.split("\r\n")
    while lines and not lines[0]:
        lines.pop(0)  # keep-alive CRLFs before a message
    if not lines:
        raise SipError("empty message")
    msg = SipMessage()
    if m := _REQUEST_RE.match(lines[0]):
        msg.method, msg.uri = m.group(1), m.group(2)
    elif m := _STATUS_RE.match(lines[0]):
        msg.status, msg.reason = int(m.group(1)), m.group(2)
    else:
        raise SipError(f"bad start line {lines[0][:80]!r}")
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and msg.headers:  # folded continuation
            key, value = msg.headers[-1]
            msg.headers[-1] = (key, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise SipError(f"bad header line {line[:80]!r}")
        key = name.strip().lower()
        msg.headers.append((COMPACT.get(key, key), value.strip()))
    length = msg.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > len(body):
            raise SipError(f"bad Content-Length {length!r}")
        body = body[: int(length)]
    msg.body = body
    for required in ("via", "call-id", "cseq", "from", "to"):
        if msg.get(required) is None:
            raise SipError(f"no {header_name(required)} header")
    msg.cseq  # noqa: B018 - validates
    return msg


def param(value: str, name: str) -> str | None:
    """A ;name=value parameter of a header value (outside <...>), '' for a flag, None when absent."""
    tail = value.rsplit(">", 1)[-1] if ">" in value else value
    for part in tail.split(";")[1:]:
        key, eq, val = part.partition("=")
        if key.strip().lower() == name:
            return val.strip() if eq else ""
    return None


def tag(value: str) -> str | None:
    return param(value, "tag")


def uri_of(value: str) -> str:
    """The URI inside a name-addr (``"x" <sip:a@b;lr>;tag=1``) or an addr-spec."""
    if "<" in value:
        return value.split("<", 1)[1].split(">", 1)[0]
    return value.split(";", 1)[0].strip()


def host_port(uri: str, default_port: int = 5060) -> tuple[str, int]:
    m = _URI_HOSTPORT_RE.search(uri)
    if not m:
        raise SipError(f"no host in {uri!r}")
    return m.group(1).strip("[]"), int(m.group(2) or default_port)


def via_sent_by(via: str) -> tuple[str, int]:
    """Where a response to this Via goes: received/rport when present (RFC 3581), else sent-by."""
    parts = via.split(";")[0].split()
    if len(parts) != 2:
        raise SipError(f"bad Via {via!r}")
    host, _, port = parts[1].rpartition(":") if ":" in parts[1] else (parts[1], "", "")
    received, rport = param(via, "received"), param(via, "rport")
    port_num = int(rport) if rport and rport.isdigit() else (int(port) if port.isdigit() else 5060)
    return (received or host), port_num


def branch_for(upstream_branch: str, salt: str) -> str:
    """Our branch for a request we forward: the same for its retransmissions, its CANCEL and its ACK."""
    return MAGIC_COOKIE + hashlib.sha1(f"{salt}:{upstream_branch}".encode()).hexdigest()[:20]


def new_branch() -> str:
    return MAGIC_COOKIE + secrets.token_hex(10)


def new_tag() -> str:
    return secrets.token_hex(6)


def response(req: SipMessage, status: int, reason: str = "", *, to_tag: str | None = None,
             extra: list[tuple[str, str]] | None = None, body: bytes = b"") -> SipMessage:
    """A response to ``req`` (RFC 3261 8.2.6): Via, From, To (+tag), Call-ID, CSeq copied."""
    resp = SipMessage(status=status, reason=reason or REASONS.get(status, ""))
    for key, value in req.headers:
        if key in ("via", "from", "call-id", "cseq", "record-route"):
            resp.headers.append((key, value))
        elif key == "to":
            if to_tag and status != 100 and tag(value) is None:
                value = f"{value};tag={to_tag}"
            resp.headers.append((key, value))
    if status == 100:
        resp.headers = [(k, v) for k, v in resp.headers if k != "record-route"]
    resp.headers.extend(extra or [])
    resp.body = body
    return resp


def audio_sdp(ip: str, rtp_port: int, session_id: int) -> bytes:
    """A PCMU-only offer/answer: the hold call's media is one audio stream."""
    return (
        f"v=0\r\no=sipbridge {session_id} {session_id} IN IP4 {ip}\r\ns=sipbridge hold call\r\n"
        f"c=IN IP4 {ip}\r\nt=0 0\r\nm=audio {rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    ).encode()


def sdp_audio_target(body: bytes) -> tuple[str, int] | None:
    """The address and port the peer's SDP asks audio to be sent to (None without an audio line)."""
    text = body.decode("utf-8", "replace")
    conn = re.search(r"^c=IN IP4 (\S+)", text, re.M)
    audio = re.search(r"^m=audio (\d+) ", text, re.M)
    if not conn or not audio or audio.group(1) == "0":
        return None
    return conn.group(1), int(audio.group(1))
