"""A small SDP model for what the Janus stage changes in offers and answers, without I/O.

aiortc's own parser (``aiortc.sdp``) reads what WebRTC needs and writes back only what it understood,
so an SDP from a SIP phone does not survive a round trip through it. Here a description is its session
lines plus one ``Media`` per m= section, each keeping every line it had; the helpers below change codecs,
directions and sections by payload type, and ``str()`` gives the SDP back (CRLF line ends).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages import codecs as codec_registry

H264 = "H264"
TELEPHONE_EVENT = "TELEPHONE-EVENT"
TELEPHONE_EVENT_CLOCK_HZ = 8000
H264_PACKETIZATION_MODES = (0, 1)  # single NAL unit and non-interleaved; we send neither interleaved mode
# Lines of an m= section that name a payload type: they go when their payload type goes.
_PT_ATTRIBUTES = ("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class SdpError(ValueError):
    """Text that is not an SDP this module can work on."""


@dataclass
class Codec:
    payload_type: int
    name: str  # upper case, e.g. H264, PCMU, TELEPHONE-EVENT
    clock_rate: int
    fmtp: dict[str, str] = field(default_factory=dict)

    @property
    def packetization_mode(self) -> int:
        return int(self.fmtp.get("packetization-mode", "0") or 0)


def parse_fmtp(value: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in value.split(";"):
        key, _, val = item.strip().partition("=")
        if key:
            params[key.strip().lower()] = val.strip()
    return params


@dataclass
class Media:
    kind: str
    port: int
    proto: str
    formats: list[str]
    lines: list[str]  # every line after the m= line, in order

    @property
    def m_line(self) -> str:
        return f"m={self.kind} {self.port} {self.proto} {' '.join(self.formats)}".rstrip()

    def attribute(self, name: str) -> str | None:
        """The value of the first ``a=name:value`` (or "" for a flag ``a=name``), None when absent."""
        for line in self.lines:
            if line == f"a={name}":
                return ""
            if line.startswith(f"a={name}:"):
                return line[len(name) + 3:]
        return None

    @property
    def direction(self) -> str:
        for line in self.lines:
            if line[2:] in DIRECTIONS and line.startswith("a="):
                return line[2:]
        return "sendrecv"

    def codecs(self) -> list[Codec]:
        """The codecs of this section in format order (static payload types without rtpmap by their number)."""
        rtpmaps: dict[int, tuple[str, int]] = {}
        fmtps: dict[int, dict[str, str]] = {}
        for line in self.lines:
            if line.startswith(("a=rtpmap:", "a=fmtp:")):
                head, _, value = line.partition(" ")
                pt_text = head.split(":", 1)[1]
                if not pt_text.isdigit():
                    continue
                if line.startswith("a=rtpmap:"):
                    encoding, _, rest = value.partition("/")
                    clock_text = rest.split("/")[0]
                    rtpmaps[int(pt_text)] = (encoding.upper(), int(clock_text) if clock_text.isdigit() else 0)
                else:
                    fmtps[int(pt_text)] = parse_fmtp(value)
        out = []
        for fmt in self.formats:
            if not fmt.isdigit():
                continue
            pt = int(fmt)
            name, clock = rtpmaps.get(pt, STATIC_PAYLOAD_TYPES.get(pt, ("", 0)))
            out.append(Codec(pt, name, clock, fmtps.get(pt, {})))
        return out

    def keep_payload_types(self, keep: list[int]) -> None:
        """Drop every format not in ``keep`` (and its rtpmap, fmtp, rtcp-fb lines); ``keep`` gives the order."""
        wanted = [str(pt) for pt in keep if str(pt) in self.formats]
        gone = set(self.formats) - set(wanted)
        self.formats = wanted
        self.lines = [line for line in self.lines
                      if not (line.startswith(_PT_ATTRIBUTES) and line.partition(" ")[0].split(":", 1)[1] in gone)]

    def set_fmtp(self, payload_type: int, value: str | None) -> None:
        """Replace (or remove, for None) the fmtp of ``payload_type``; a new one goes after its rtpmap."""
        prefix = f"a=fmtp:{payload_type} "
        self.lines = [line for line in self.lines if not line.startswith(prefix)]
        if value is None:
            return
        at = next((i + 1 for i, line in enumerate(self.lines) if line.startswith(f"a=rtpmap:{payload_type} ")),
                  len(self.lines))
        self.lines.insert(at, prefix + value)

    def add_codec(self, payload_type: int, rtpmap: str, fmtp: str | None = None) -> None:
        self.formats.append(str(payload_type))
        last = max((i for i, line in enumerate(self.lines) if line.startswith(_PT_ATTRIBUTES)), default=-1)
        new = [f"a=rtpmap:{payload_type} {rtpmap}"] + ([f"a=fmtp:{payload_type} {fmtp}"] if fmtp else [])
        at = last + 1 if last >= 0 else len(self.lines)
        self.lines[at:at] = new

    def __str__(self) -> str:
        return "\r\n".join([self.m_line, *self.lines])


# RFC 3551 static payload types a SIP peer may use without an rtpmap line.
# Ours come from the codec registry; G.729 and H.263 are known only to be recognised (and not answered).
STATIC_PAYLOAD_TYPES: dict[int, tuple[str, int]] = {
    **{pt: (info.rtp_name, info.clock_hz) for pt, info in codec_registry.BY_STATIC_PAYLOAD_TYPE.items()},
    18: ("G729", 8000),
    34: ("H263", 90000),
}


@dataclass
class SessionDescription:
    session: list[str]
    media: list[Media]

    @classmethod
    def parse(cls, text: str) -> SessionDescription:
        lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
        if not lines or not lines[0].startswith("v="):
            raise SdpError("an SDP starts with v=")
        session: list[str] = []
        media: list[Media] = []
        for line in lines:
            if len(line) < 2 or line[1] != "=":
                raise SdpError(f"not an SDP line: {line[:60]!r}")
            if line.startswith("m="):
                parts = line[2:].split()
                if len(parts) < 3 or not parts[1].split("/")[0].isdigit():
                    raise SdpError(f"bad m= line: {line[:80]!r}")
                media.append(Media(parts[0], int(parts[1].split("/")[0]), parts[2], parts[3:], []))
            elif media:
                media[-1].lines.append(line)
            else:
                session.append(line)
        return cls(session, media)

    def section(self, kind: str) -> Media | None:
        return next((m for m in self.media if m.kind == kind and m.port != 0), None)

    def __str__(self) -> str:
        return "\r\n".join([*self.session, *(str(m) for m in self.media)]) + "\r\n"


# ----- choices ---------------------------------------------------------------------------------------------
def choose_codec(section: Media, name: str) -> Codec | None:
    """The one variant of codec ``name`` in ``section`` to answer and send with, or None.

    For H.264 that is the offer's *first* variant in packetization-mode 0 or 1, whatever a later one
    offers: Janus hands our answer to sofia-sip's offer/answer engine, which matches codecs by name and
    clock rate only and renumbers ours to the offer's first H.264 payload type, keeping our fmtp. Answering
    another variant gives the phone that first payload type with another variant's fmtp (and us sending
    under the other number): the "no video" of the field notes. So we answer that first variant as it is,
    and a mode 0 variant is sent in single NAL unit packets (see ``media.SingleNalPacker``).
    """
    candidates = [c for c in section.codecs() if c.name == name.upper()]
    if name.upper() == H264:
        candidates = [c for c in candidates if c.packetization_mode in H264_PACKETIZATION_MODES]
    return candidates[0] if candidates else None


def restrict_offer(offer: SessionDescription, wanted: dict[str, list[str]]) -> dict[str, Codec]:
    """Reduce ``offer`` (in place) to one codec per media section: the first of ``wanted[kind]`` (our order,
    what our encoder makes) that the offer has, in the variant ``choose_codec`` picks, with its own payload
    type and fmtp; telephone-event/8000 stays beside an audio codec. Returns the chosen codec per kind.
    A section with nothing we can send keeps its formats (the answer rejects it)."""
    chosen: dict[str, Codec] = {}
    for section in offer.media:
        if section.port == 0 or section.kind not in wanted or section.kind in chosen:
            continue
        pick = next((c for name in wanted[section.kind] if (c := choose_codec(section, name)) is not None), None)
        if pick is None:
            continue
        chosen[section.kind] = pick
        keep = [pick.payload_type]
        if section.kind == "audio":
            event = next((c for c in section.codecs() if c.name == TELEPHONE_EVENT
                          and c.clock_rate == TELEPHONE_EVENT_CLOCK_HZ), None)
            if event is not None:
                keep.append(event.payload_type)
        section.keep_payload_types(keep)
    return chosen


def as_aiortc_offer(offer: SessionDescription, chosen: dict[str, Codec]) -> str:
    """The reduced offer as aiortc is shown it: aiortc negotiates H.264 only in packetization-mode 1, so a
    chosen mode 0 variant is presented as mode 1 (its packets are made by our own single NAL unit packer,
    and aiortc's depacketiser reads both modes). The answer gets the offer's real fmtp back
    (``answer_with_offered_fmtp``)."""
    shown = SessionDescription.parse(str(offer))
    for section in shown.media:
        codec = chosen.get(section.kind)
        if codec is not None and codec.name == H264 and codec.packetization_mode == 0:
            section.set_fmtp(codec.payload_type, fmtp_text({**codec.fmtp, "packetization-mode": "1"}))
    return str(shown)


def fmtp_text(params: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" if v else k for k, v in params.items())


def answer_with_offered_fmtp(answer: SessionDescription, chosen: dict[str, Codec]) -> None:
    """Give each chosen codec in ``answer`` the offer's own fmtp for its payload type (aiortc writes its
    local defaults, e.g. packetization-mode=1 under a payload type the offer made mode 0)."""
    for section in answer.media:
        codec = chosen.get(section.kind)
        if codec is None or str(codec.payload_type) not in section.formats:
            continue
        section.set_fmtp(codec.payload_type, fmtp_text(codec.fmtp) if codec.fmtp else None)


def telephone_event_pt(sdp: str) -> int | None:
    """The telephone-event/8000 payload type of the first audio section, if any."""
    section = SessionDescription.parse(sdp).section("audio")
    if section is None:
        return None
    return next((c.payload_type for c in section.codecs()
                 if c.name == TELEPHONE_EVENT and c.clock_rate == TELEPHONE_EVENT_CLOCK_HZ), None)


def add_telephone_event(sdp: str, payload_type: int) -> str:
    """Offer or answer telephone-event/8000 in the audio section (aiortc cannot negotiate it, but Janus
    passes it on, and the stage sends and receives the events itself)."""
    description = SessionDescription.parse(sdp)
    section = description.section("audio")
    if section is None or any(c.name == TELEPHONE_EVENT for c in section.codecs()):
        return sdp
    section.add_codec(payload_type, f"telephone-event/{TELEPHONE_EVENT_CLOCK_HZ}", "0-16")
    return str(description)


def peer_holds(sdp: str) -> bool:
    """A re-offer that puts us on hold: its audio (else first) section is sendonly or inactive."""
    description = SessionDescription.parse(sdp)
    section = description.section("audio") or (description.media[0] if description.media else None)
    return section is not None and section.direction in ("sendonly", "inactive")


def repair_rejected_sections(answer_text: str, offer_text: str) -> tuple[str, list[str]]:
    """Make a Janus answer with a rejected media section acceptable to aiortc.

    When the SIP peer declines a stream (port 0), Janus answers that section bare: no ICE credentials,
    no DTLS role, a payload type of the other kind, and aiortc refuses the whole answer (field notes). The
    section gets the bundled transport's credentials, our offered codecs back and ``a=inactive``, and joins
    the BUNDLE group; the stream is reported as rejected. Returns (answer, rejected kinds).
    """
    answer = SessionDescription.parse(answer_text)
    offer = SessionDescription.parse(offer_text)
    if len(answer.media) != len(offer.media):
        return answer_text, []
    live = next((m for m in answer.media if m.port != 0), None)
    if live is None:
        return answer_text, []
    transport = [f"a={name}:{value}" for name in ("ice-ufrag", "ice-pwd", "setup")
                 if (value := live.attribute(name)) is not None]
    rejected: list[str] = []
    for index, section in enumerate(answer.media):
        if section.port != 0 or section.attribute("ice-ufrag") is not None:
            continue
        offered = offer.media[index]
        mid = section.attribute("mid")
        if mid is None:
            mid = offered.attribute("mid")
        codec_lines = [line for line in offered.lines if line.startswith(("a=rtpmap:", "a=fmtp:"))]
        answer.media[index] = Media(section.kind, 9, section.proto, list(offered.formats),
                                    ["c=IN IP4 0.0.0.0", "a=inactive", *([f"a=mid:{mid}"] if mid else []),
                                     "a=rtcp-mux", *transport, *codec_lines])
        rejected.append(section.kind)
        if mid:
            answer.session = [f"{line} {mid}" if line.startswith("a=group:BUNDLE ") else line
                              for line in answer.session]
    if not rejected:
        return answer_text, []
    return str(answer), rejected
