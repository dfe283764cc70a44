"""The Janus stage's call control without I/O: control requests, re-dial policy. No root, Janus or sipp."""

from __future__ import annotations

import asyncio
import fractions
import json
import random
import re

import pytest

from protocol import Codec
from stages.janus import aiortc_adapter, sdp
from stages.janus import callcontrol as cc
from stages.janus.aiortc_adapter import sending_payload_type
from stages.janus.callcontrol import (
    DTMF_DURATION_MS,
    REQUEST_MAX_BYTES,
    Command,
    CommandError,
    RedialPolicy,
    parse_command,
    request_id_of,
)
from stages.janus.media import KeyframeThrottle, SingleNalPacker, split_annex_b
from stages.janus.sip import CallInfo, SipCall

GOOD = [
    (b'{"cmd": "status"}', Command("status")),
    (b'{"cmd": "hangup", "id": 7}', Command("hangup", 7)),
    (b'{"cmd": "call", "uri": "sip:a@127.0.0.1:5090"}', Command("call", uri="sip:a@127.0.0.1:5090")),
    (b'{"cmd": "call", "uri": "sips:a@b", "wait": true, "timeout_s": 2.5, "id": "x"}',
     Command("call", "x", uri="sips:a@b", wait=True, timeout_s=2.5)),
    (b'{"cmd": "dtmf", "digits": "12#a"}', Command("dtmf", digits="12#A", duration_ms=DTMF_DURATION_MS)),
    (b'{"cmd": "dtmf", "digits": "5", "duration_ms": 200}', Command("dtmf", digits="5", duration_ms=200)),
    (b'{"cmd": "hold"}', Command("hold")),
    (b'{"cmd": "unhold"}', Command("unhold")),
]

BAD = [
    (b"", "not JSON"),
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b"null", "JSON object"),
    (b'{"cmd": "fly"}', "cmd must be"),
    (b'{"cmd": null}', "cmd must be"),
    (b'{"cmd": ["status"]}', "cmd must be"),
    (b'{"cmd": "status", "verbose": 1}', "takes no verbose"),
    (b'{"cmd": "call"}', "sip:"),
    (b'{"cmd": "call", "uri": "http://x"}', "sip:"),
    (b'{"cmd": "call", "uri": 5}', "sip:"),
    (b'{"cmd": "call", "uri": "sip:a b@c"}', "spaces"),
    (b'{"cmd": "call", "uri": "sip:a@b", "wait": "yes"}', "wait"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": null}', "timeout_s"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": true}', "timeout_s"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": -1}', "timeout_s"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": 1e999}', "timeout_s"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": NaN}', "timeout_s"),
    (b'{"cmd": "dtmf", "duration_ms": null}', "digits"),  # the request that used to end the control task
    (b'{"cmd": "dtmf", "digits": "1", "duration_ms": null}', "duration_ms"),
    (b'{"cmd": "dtmf", "digits": "1", "duration_ms": "160"}', "duration_ms"),
    (b'{"cmd": "dtmf", "digits": "1", "duration_ms": 10}', "duration_ms"),
    (b'{"cmd": "dtmf", "digits": "1", "duration_ms": 99999999}', "duration_ms"),
    (b'{"cmd": "dtmf", "digits": "x"}', "not DTMF"),
    (b'{"cmd": "dtmf", "digits": ""}', "digits"),
    (b'{"cmd": "dtmf", "digits": 12}', "digits"),
    (b'{"cmd": "dtmf", "digits": "' + b"1" * 65 + b'"}', "at most"),
    (b'{"cmd": "status", "id": [1]}', "id must be"),
    (b'{"cmd": "status", "id": true}', "id must be"),
    (b" " * (REQUEST_MAX_BYTES + 1), "too large"),
    (b"[" * 60_000, "not JSON"),  # deep nesting: RecursionError inside json, still an answer
]


@pytest.mark.parametrize(("raw", "expected"), GOOD)
def test_valid_requests(raw: bytes, expected: Command) -> None:
    assert parse_command(raw) == expected


@pytest.mark.parametrize(("raw", "message"), BAD)
def test_invalid_requests_are_named(raw: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        parse_command(raw)


def test_random_input_only_ever_raises_command_error() -> None:
    rng = random.Random(12)
    values: list[object] = [None, True, 0, -1, 1.5, 1e308, "", "x", "sip:a@b", [], {}, [None], {"a": 1}, "9" * 70]
    keys = ["cmd", "uri", "wait", "timeout_s", "digits", "duration_ms", "id", "x"]
    cmds = ["status", "call", "hangup", "dtmf", "hold", "unhold", "nope"]
    accepted = 0
    for _ in range(3000):
        choice = rng.random()
        if choice < 0.3:
            raw = rng.randbytes(rng.randrange(0, 64))
        else:
            request: dict[str, object] = {"cmd": rng.choice(cmds + values)}  # type: ignore[operator]
            for key in rng.sample(keys, rng.randrange(0, 4)):
                request[key] = rng.choice(values)
            raw = json.dumps(request).encode()
        try:
            parse_command(raw)
            accepted += 1
        except CommandError as exc:
            assert str(exc)
    assert accepted < 3000 * 0.2  # most of it is wrong, and every wrong one was an error with a message


def test_request_id_survives_a_bad_request() -> None:
    assert request_id_of(b'{"cmd": "dtmf", "id": "r1", "duration_ms": null}') == "r1"
    assert request_id_of(b"garbage") is None
    assert request_id_of(b'{"id": {"x": 1}}') is None


# ----- re-dial policy --------------------------------------------------------------------------------------
def test_janus_restart_redials_at_once_by_default() -> None:
    policy = RedialPolicy()
    assert policy.after_end("janus_restart", answered=True) == 0.0
    # The re-dialled call died with Janus again before an answer: back off, doubling, bounded.
    assert policy.after_end("janus_restart", answered=False) == 0.0
    assert policy.after_end("janus_restart", answered=False) == policy.backoff_s
    assert policy.after_end("janus_restart", answered=False) == policy.backoff_s * 2
    for _ in range(20):
        delay = policy.after_end("janus_restart", answered=False)
    assert delay == policy.backoff_max_s


def test_no_redial_after_a_hangup_or_a_stop() -> None:
    policy = RedialPolicy(interval_s=5.0)
    assert policy.after_end("hangup", answered=True) is None
    assert policy.after_end("stopping", answered=True) is None


def test_redial_switched_off() -> None:
    policy = RedialPolicy(after_janus_restart=False)
    assert policy.after_end("janus_restart", answered=True) is None
    assert policy.after_end("failed", answered=False) is None  # no --redial-s
    assert policy.after_end("ended", answered=True) is None


def test_redial_interval_and_max_tries() -> None:
    policy = RedialPolicy(interval_s=0.3, backoff_s=1.0, max_tries=3)
    assert policy.after_end("failed", answered=False) == 0.3
    assert policy.after_end("failed", answered=False) == 1.0
    assert policy.after_end("failed", answered=False) == 2.0
    assert policy.after_end("failed", answered=False) is None  # three failures in a row: give up
    policy.connected()
    assert policy.after_end("ended", answered=True) == 0.3  # an answered call resets the count


@pytest.mark.parametrize("kwargs", [{"interval_s": float("nan")}, {"backoff_s": -1.0}, {"max_tries": -2},
                                    {"backoff_max_s": float("inf")}])
def test_redial_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="redial"):
        RedialPolicy(**kwargs)  # type: ignore[arg-type]


# ----- SDP: the softphone's offer, as Janus passes it to the stage ---------------------------------------------
# What Janus 1.1.2 hands its WebRTC peer for an INVITE from a softphone that offers two H.264 variants
# (96: packetization-mode 0, 97: mode 1), H.263 and MP4V-ES: the SIP payload types and fmtp pass through.
SOFTPHONE_OFFER = "\r\n".join([
    "v=0", "o=- 1733212345 1 IN IP4 127.0.0.2", "s=Softphone", "t=0 0", "a=group:BUNDLE 0 1",
    "a=ice-options:trickle", "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=msid-semantic: WMS janus",
    "m=audio 9 UDP/TLS/RTP/SAVPF 0 8 101", "c=IN IP4 127.0.0.2", "a=sendrecv", "a=mid:0", "a=rtcp-mux",
    "a=ice-ufrag:Ab1c", "a=ice-pwd:0123456789abcdef012345", "a=ice-options:trickle", "a=setup:actpass",
    "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000", "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16",
    "a=msid:janus janusa0", "a=ssrc:11 cname:janus",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 34 98", "c=IN IP4 127.0.0.2", "a=sendrecv", "a=mid:1", "a=rtcp-mux",
    "a=ice-ufrag:Ab1c", "a=ice-pwd:0123456789abcdef012345", "a=ice-options:trickle", "a=setup:actpass",
    "a=rtpmap:96 H264/90000", "a=fmtp:96 profile-level-id=42801f;packetization-mode=0",
    "a=rtcp-fb:96 nack", "a=rtcp-fb:96 nack pli", "a=rtcp-fb:96 ccm fir",
    "a=rtpmap:97 H264/90000", "a=fmtp:97 profile-level-id=42801f;packetization-mode=1",
    "a=rtcp-fb:97 nack", "a=rtcp-fb:97 nack pli", "a=rtcp-fb:97 ccm fir",
    "a=rtpmap:34 H263/90000", "a=rtpmap:98 MP4V-ES/90000", "a=fmtp:98 profile-level-id=3",
    "a=msid:janus janusv0", "a=ssrc:12 cname:janus", "",
])


def test_sdp_round_trip_keeps_every_line() -> None:
    parsed = sdp.SessionDescription.parse(SOFTPHONE_OFFER)
    assert str(parsed) == SOFTPHONE_OFFER
    video = parsed.section("video")
    assert video is not None
    assert [(c.payload_type, c.name, c.packetization_mode) for c in video.codecs()] == [
        (96, "H264", 0), (97, "H264", 1), (34, "H263", 0), (98, "MP4V-ES", 0)]


@pytest.mark.parametrize(("variants", "expected"), [
    # (payload type, fmtp) of each offered H.264 variant -> the one answered: the first that is mode 0 or 1,
    # because Janus's SIP stack renumbers any other choice to it (see sdp.choose_codec)
    ([(96, "profile-level-id=42801f;packetization-mode=0"), (97, "profile-level-id=42801f;packetization-mode=1")], 96),
    ([(97, "profile-level-id=42801f;packetization-mode=1"), (96, "profile-level-id=42801f;packetization-mode=0")], 97),
    ([(100, "profile-level-id=42e01f"), (101, "packetization-mode=1")], 100),  # no mode: mode 0
    ([(96, "packetization-mode=2"), (97, "packetization-mode=1")], 97),  # interleaved: not ours to send
    ([(96, "packetization-mode=2")], None),
])
def test_one_h264_variant_is_chosen(variants: list[tuple[int, str]], expected: int | None) -> None:
    lines = ["v=0", "s=-", "t=0 0", "m=video 9 RTP/AVP " + " ".join(str(pt) for pt, _ in variants)]
    for pt, fmtp in variants:
        lines += [f"a=rtpmap:{pt} H264/90000", f"a=fmtp:{pt} {fmtp}"]
    section = sdp.SessionDescription.parse("\r\n".join(lines)).section("video")
    assert section is not None
    chosen = sdp.choose_codec(section, "H264")
    assert (chosen.payload_type if chosen else None) == expected


def test_softphone_offer_is_reduced_to_one_variant_per_codec() -> None:
    offer = sdp.SessionDescription.parse(SOFTPHONE_OFFER)
    chosen = sdp.restrict_offer(offer, {"audio": ["PCMA", "PCMU"], "video": ["H264"]})
    assert {k: c.payload_type for k, c in chosen.items()} == {"audio": 8, "video": 96}
    text = str(offer)
    assert "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n" in text and "m=audio 9 UDP/TLS/RTP/SAVPF 8 101\r\n" in text
    for gone in ("a=rtpmap:97", "a=fmtp:97", "a=rtcp-fb:97", "a=rtpmap:34", "a=rtpmap:98", "a=rtpmap:0 "):
        assert gone not in text
    assert "a=fmtp:96 profile-level-id=42801f;packetization-mode=0" in text and "a=rtcp-fb:96 nack pli" in text


def test_answer_carries_the_offered_fmtp() -> None:
    answer = sdp.SessionDescription.parse("v=0\r\ns=-\r\nt=0 0\r\nm=video 9 RTP/AVP 97\r\na=rtpmap:97 H264/90000\r\n"
                                          "a=fmtp:97 level-asymmetry-allowed=1;packetization-mode=1;"
                                          "profile-level-id=42e01f\r\na=rtcp-fb:97 nack\r\n")
    codec = sdp.Codec(97, "H264", 90000, {"profile-level-id": "42801f", "packetization-mode": "1"})
    sdp.answer_with_offered_fmtp(answer, {"video": codec})
    assert str(answer).count("a=fmtp:97") == 1
    assert "a=fmtp:97 profile-level-id=42801f;packetization-mode=1\r\na=rtcp-fb:97 nack" in str(answer)


def test_telephone_event_and_hold() -> None:
    assert sdp.telephone_event_pt(SOFTPHONE_OFFER) == 101
    plain = "v=0\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    added = sdp.add_telephone_event(plain, 126)
    assert "m=audio 4000 RTP/AVP 0 126\r\n" in added and "a=rtpmap:126 telephone-event/8000\r\na=fmtp:126 0-16" in added
    assert sdp.telephone_event_pt(added) == 126 and sdp.add_telephone_event(added, 127) == added
    assert not sdp.peer_holds(plain)
    assert sdp.peer_holds(plain.replace("a=sendrecv", "a=sendonly"))
    assert sdp.peer_holds(plain.replace("a=sendrecv", "a=inactive"))


def test_rejected_video_section_is_repaired_for_aiortc() -> None:
    offer = ("v=0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
             "a=rtpmap:0 PCMU/8000\r\nm=video 9 UDP/TLS/RTP/SAVPF 97\r\na=mid:1\r\na=rtpmap:97 H264/90000\r\n"
             "a=fmtp:97 packetization-mode=1\r\n")
    # Janus's answer when the SIP peer put port 0 on video: a bare section, outside the BUNDLE group.
    answer = ("v=0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
              "a=ice-ufrag:u\r\na=ice-pwd:p\r\na=setup:active\r\na=rtpmap:0 PCMU/8000\r\n"
              "m=video 0 UDP/TLS/RTP/SAVPF 0\r\na=mid:1\r\n")
    repaired, rejected = sdp.repair_rejected_sections(answer, offer)
    assert rejected == ["video"]
    video = sdp.SessionDescription.parse(repaired).media[1]
    assert video.formats == ["97"] and video.direction == "inactive"
    assert video.attribute("ice-ufrag") == "u" and video.attribute("setup") == "active"
    assert "a=group:BUNDLE 0 1" in repaired
    assert sdp.repair_rejected_sections(repaired, offer) == (repaired, [])


@pytest.mark.parametrize("text", ["", "x=1", "v=0\r\nm=audio\r\n", "v=0\r\nbad line"])
def test_sdp_errors_are_named(text: str) -> None:
    with pytest.raises(sdp.SdpError):
        sdp.SessionDescription.parse(text)


@pytest.mark.parametrize("recorded", [False, True], ids=["written", "recorded-from-janus"])
def test_aiortc_answers_and_sends_the_chosen_variant(recorded: bool) -> None:
    """The real answer path (aiortc, no Janus): the softphone's offer gets one H.264 payload type, its first (96),
    with the offer's own mode-0 fmtp and feedback for 96 only; the sender sends 96, in single NAL unit packets;
    audio is what our encoder makes."""
    async def run() -> tuple[str, SipCall]:
        info = CallInfo("t1", "inbound", "sip:phone@x")
        call = SipCall(info, [Codec.PCMU], Codec.H264, lambda kind, frame: None, lambda: None,
                       lambda digit, ms: None)
        try:
            offer = (str(_recorded()["inbound_softphone_two_h264_variants"][0]["jsep"]["sdp"])  # type: ignore[index]
                     if recorded else SOFTPHONE_OFFER)
            answer = await call.answer({"type": "offer", "sdp": offer})
            return answer["sdp"], call
        finally:
            await call.close()

    text, call = asyncio.run(run())
    video = sdp.SessionDescription.parse(text).section("video")
    audio = sdp.SessionDescription.parse(text).section("audio")
    assert video is not None and audio is not None
    assert video.formats == ["96"], video.formats
    assert video.attribute("fmtp") == "96 profile-level-id=42801f;packetization-mode=0"
    # Feedback, where the offer had any, only for that payload type (the recorded offer has none).
    assert {line.split()[0] for line in video.lines if line.startswith("a=rtcp-fb:")} == (
        set() if recorded else {"a=rtcp-fb:96"})
    assert audio.formats == ["0", "101"]  # PCMU and the offer's telephone-event payload type
    assert call.video is not None and sending_payload_type(call.video) == 96
    assert isinstance(getattr(call.video.sender, "_RTCRtpSender__encoder", None), SingleNalPacker)
    assert call.info.video_codec == "H264" and call.info.audio_codec == "PCMU"


def test_aiortc_adapter_check_names_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    aiortc_adapter.check()  # the installed aiortc is the pinned one, with every hook
    monkeypatch.setattr(aiortc_adapter, "installed_version", lambda: "1.99.0")
    with pytest.raises(aiortc_adapter.AiortcMismatch, match=r"aiortc==1\.16\.0 \(installed: 1\.99\.0"):
        aiortc_adapter.check()
    monkeypatch.undo()
    monkeypatch.setattr(aiortc_adapter, "_HOOKS", [*aiortc_adapter._HOOKS,
                                                   (SipCall, "_no_such_hook", "class")])
    with pytest.raises(aiortc_adapter.AiortcMismatch, match=r"missing: SipCall\._no_such_hook"):
        aiortc_adapter.check()


def test_nothing_else_touches_aiortc_internals() -> None:
    """Every private aiortc name is used in the adapter only (so a new aiortc is checked in one place)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "stages" / "janus"
    pattern = re.compile(r"\._(RTCRtp\w+|send_keyframe|send_rtcp_pli|handle_rtp_packet|rtp_router|send_rtp|codecs|"
                         r"ssrc|origin|packets|data)\b")
    offenders = [f"{path.name}: {m.group(0)}" for path in root.glob("*.py") if path.name != "aiortc_adapter.py"
                 for m in pattern.finditer(path.read_text())]
    assert not offenders, offenders


def test_single_nal_packer_sends_each_nal_unit_alone() -> None:
    """packetization-mode 0: one NAL unit per RTP payload, never STAP-A (24); a NAL unit too big for one packet
    goes in FU-A fragments (counted) that reassemble to it."""
    import av

    sps, pps = b"\x67\x42\x80\x1f\xda", b"\x68\xce\x3c\x80"
    slice_ = b"\x65" + bytes(range(200))
    idr = b"\x65" + bytes(range(256)) * 20  # 5 kB
    stream = b"".join([b"\x00\x00\x00\x01", sps, b"\x00\x00\x01", pps, b"\x00\x00\x01", slice_,
                       b"\x00\x00\x00\x01", idr])
    assert split_annex_b(stream) == [sps, pps, slice_, idr]
    packet = av.Packet(stream)
    packet.pts = 3000
    packet.time_base = fractions.Fraction(1, 90000)
    packer = SingleNalPacker()
    payloads, timestamp = packer.pack(packet)
    assert timestamp == 3000 and payloads[:3] == [sps, pps, slice_]
    fragments = payloads[3:]
    assert len(fragments) == 4 and all(len(p) <= 1300 and p[0] & 0x1F == 28 for p in fragments)
    assert fragments[0][1] & 0x80 and fragments[-1][1] & 0x40 and packer.oversized_nal_units == 1
    assert bytes([(fragments[0][0] & 0xE0) | (fragments[0][1] & 0x1F)]) + b"".join(f[2:] for f in fragments) == idr
    assert all(p[0] & 0x1F != 24 for p in payloads)


# ----- Janus SIP plugin messages in, actions out ------------------------------------------------------------------
def _sip_event(result: dict[str, object], call_id: str = "abc123", jsep: dict[str, str] | None = None,
               **data: object) -> dict[str, object]:
    """A message as Janus 1.1.2 pushes it for a SIP plugin handle (janus_sip.c, janus_plugin_push_event)."""
    event: dict[str, object] = {"janus": "event", "session_id": 3071502925441387, "sender": 8172336102341571,
                                "transaction": "b1c2",
                                "plugindata": {"plugin": "janus.plugin.sip",
                                               "data": {"sip": "event", "call_id": call_id, "result": result,
                                                        **data}}}
    if jsep is not None:
        event["jsep"] = jsep
    return event


OUT = cc.CallView("c1", "outbound", "calling", accepted=False)
UP = cc.CallView("c1", "outbound", "media_up", accepted=True, sip_call_id="abc123")
IN = cc.CallView("c2", "inbound", "incoming", accepted=False, sip_call_id="x")
RULES = cc.InboundRules(True, re.compile("^sip:caller@"), 603)
ANSWER = {"type": "answer", "sdp": "v=0\r\n"}
OFFER = {"type": "offer", "sdp": SOFTPHONE_OFFER}

TABLE: list[tuple[str, dict[str, object], cc.CallView | None, list[object]]] = [
    ("ringing", _sip_event({"event": "ringing"}), OUT,
     [cc.SetSipCallId("abc123"), cc.Publish("ringing")]),
    ("calling again is not news", _sip_event({"event": "calling"}), OUT, [cc.SetSipCallId("abc123")]),
    ("early media", _sip_event({"event": "progress", "username": "sip:peer@x"}, jsep=ANSWER), UP,
     [cc.SetAnswer(ANSWER), cc.Publish("progress")]),
    ("answered", _sip_event({"event": "accepted", "username": "sip:peer@x"}, jsep=ANSWER), UP,
     [cc.SetAnswer(ANSWER), cc.MarkAccepted(), cc.Publish("accepted"), cc.RequestKeyframe("call accepted")]),
    ("inbound accepted: no answer to set", _sip_event({"event": "accepted"}, call_id="x"), IN,
     [cc.MarkAccepted(), cc.Publish("accepted"), cc.RequestKeyframe("call accepted")]),
    ("media up", {"janus": "webrtcup", "session_id": 1, "sender": 2}, UP,
     [cc.MarkMediaUp(), cc.Publish("media_up"), cc.RequestKeyframe("call media up")]),
    ("busy", _sip_event({"event": "hangup", "code": 486, "reason": "Busy Here"}), OUT,
     [cc.SetSipCallId("abc123"), cc.EndCall("failed", 486, "Busy Here")]),
    ("BYE from the peer", _sip_event({"event": "hangup", "code": 200, "reason": "Session Terminated"}), UP,
     [cc.EndCall("ended", 200, "Session Terminated")]),
    ("our media timeout is the reason", _sip_event({"event": "hangup", "code": 200, "reason": "to BYE"}),
     cc.CallView("c1", "outbound", "media_up", True, "no media from the SIP peer for 30 s", "abc123"),
     [cc.EndCall("ended", 200, "no media from the SIP peer for 30 s")]),
    ("447 before an answer", _sip_event({}, error_code=447, error="Wrong state (not in a call?)"), OUT,
     [cc.ReportError("janus_sip_error", "447 Wrong state (not in a call?)"),
      cc.EndCall("failed", 447, "Wrong state (not in a call?)")]),
    ("an error mid-call is reported only", _sip_event({}, error_code=440, error="Missing element"), UP,
     [cc.ReportError("janus_sip_error", "440 Missing element")]),
    ("peer holds us", _sip_event({"event": "updatingcall"},
                                 jsep={"type": "offer", "sdp": "v=0\r\nm=audio 1 RTP/AVP 0\r\na=sendonly\r\n"}),
     UP, [cc.Note("the peer re-offered"), cc.PeerHold(True)]),
    ("peer resumes", _sip_event({"event": "updatingcall"},
                                jsep={"type": "offer", "sdp": "v=0\r\nm=audio 1 RTP/AVP 0\r\na=sendrecv\r\n"}),
     UP, [cc.Note("the peer re-offered"), cc.PeerHold(False)]),
    ("a bad re-offer is reported", _sip_event({"event": "updatingcall"}, jsep={"type": "offer", "sdp": "junk"}),
     UP, [cc.Note("the peer re-offered"), cc.ReportError("bad_sdp", "re-offer: an SDP starts with v=")]),
    ("we hold", _sip_event({"event": "holding"}), UP, [cc.Publish("on_hold")]),
    ("DTMF by SIP INFO", _sip_event({"event": "info", "type": "application/dtmf-relay",
                                     "content": "Signal=5\r\nDuration=160\r\n"}), UP,
     [cc.DtmfReceived("5", 160, "info")]),
    ("other INFO", _sip_event({"event": "info", "type": "text/plain", "content": "hello"}), UP,
     [cc.Note("SIP INFO text/plain: 'hello'")]),
    ("caller accepted", _sip_event({"event": "incomingcall", "username": "sip:caller@127.0.0.1:5090"},
                                   call_id="1-2@h", jsep=OFFER), None,
     [cc.Accept("sip:caller@127.0.0.1:5090", "1-2@h", OFFER)]),
    ("caller refused by rule", _sip_event({"event": "incomingcall", "username": "sip:mallory@x"}, jsep=OFFER), None,
     [cc.Decline("sip:mallory@x", "abc123", 603, "declined by rule")]),
    ("second caller while busy", _sip_event({"event": "incomingcall", "username": "sip:caller@x"}, jsep=OFFER), UP,
     [cc.Decline("sip:caller@x", "abc123", 603, "busy with call c1")]),
    ("offerless INVITE", _sip_event({"event": "incomingcall", "username": "sip:caller@x"}), None,
     [cc.Decline("sip:caller@x", "abc123", 488, "offerless INVITE not supported")]),
    ("late hangup, no call", _sip_event({"event": "hangup", "code": 200, "reason": "to BYE"}), None,
     [cc.Note("hangup for no active call: 200 to BYE")]),
    ("not a plugin event", {"janus": "ack", "transaction": "x"}, UP, []),
    ("plugin data of the wrong shape", {"janus": "event", "plugindata": ["x"]}, UP, []),
    ("result of the wrong shape", _sip_event("accepted", call_id=5), UP,  # type: ignore[arg-type]
     [cc.Note("SIP plugin event None: {}")]),
]


@pytest.mark.parametrize(("event", "call", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_janus_events_to_actions(event: dict[str, object], call: cc.CallView | None, expected: list[object]) -> None:
    assert cc.on_janus_event(event, call, RULES) == expected


def test_inbound_disabled_declines_everyone() -> None:
    event = _sip_event({"event": "incomingcall", "username": "sip:caller@x"}, jsep=OFFER)
    actions = cc.on_janus_event(event, None, cc.InboundRules(False, re.compile(".*"), 486))
    assert actions == [cc.Decline("sip:caller@x", "abc123", 486, "inbound calls disabled")]


# ----- the bridge file's [sip.redial] reaches the janus stage ------------------------------------------------------
def _bridge_example() -> dict[str, object]:
    import tomllib
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "bridge-local.toml"
    return tomllib.loads(path.read_text())


def test_bridge_file_redial_policy_reaches_the_stage(tmp_path: object) -> None:
    from pathlib import Path

    import click

    from sipbridge.bridge import bridge_stages, parse_bridge
    from stages.janus import command as janus_command

    data = _bridge_example()
    data["sip"]["redial"] = {"after_janus_restart": False, "backoff_s": 2, "backoff_max_s": 20.5,  # type: ignore[index]
                             "max_tries": 4, "interval_s": 0.5}
    specs = {s.name: s for s in bridge_stages(parse_bridge(data), Path(str(tmp_path)))}
    args = specs["janus"].args
    assert "--no-redial-after-janus-restart" in args
    for option, value in (("--redial-s", "0.5"), ("--redial-backoff-s", "2.0"), ("--redial-backoff-max-s", "20.5"),
                          ("--redial-max-tries", "4")):
        assert args[args.index(option) + 1] == value
    # The stage's own command line takes them as they are.
    ctx = janus_command.make_context("janus", [a for a in args if not a.startswith("%(")], resilient_parsing=True)
    assert ctx.params["redial_after_janus_restart"] is False and ctx.params["redial_max_tries"] == 4
    assert isinstance(ctx, click.Context)
    # By default a Janus restart is survived.
    default = {s.name: s for s in bridge_stages(parse_bridge(_bridge_example()), Path(str(tmp_path)))}
    assert "--redial-after-janus-restart" in default["janus"].args


@pytest.mark.parametrize(("redial", "message"), [
    ({"backoff_s": -1}, "sip.redial.backoff_s must be a number of seconds"),
    ({"interval_s": float("nan")}, "sip.redial.interval_s"),
    ({"max_tries": -1}, "sip.redial.max_tries must be 0"),
    ({"max_tries": 1.5}, "sip.redial.max_tries must be int"),
    ({"after_janus_restart": "yes"}, "sip.redial.after_janus_restart must be bool"),
    ({"retry": 1}, "sip.redial"),
    ("often", "sip.redial"),
])
def test_bridge_file_redial_errors_name_the_key(redial: object, message: str) -> None:
    from sipbridge.bridge import BridgeConfigError, parse_bridge

    data = _bridge_example()
    data["sip"]["redial"] = redial  # type: ignore[index]
    with pytest.raises(BridgeConfigError, match=re.escape(message)):
        parse_bridge(data)


# ----- recorded Janus messages, replayed ----------------------------------------------------------------------
def _recorded() -> dict[str, list[dict[str, object]]]:
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parent / "janus_sip_events.json").read_text())
    return {k: v for k, v in data.items() if isinstance(v, list)}


def _replay(events: list[dict[str, object]], call: cc.CallView | None) -> tuple[list[str], list[object]]:
    """Feed messages through the machine, applying its state actions to the call view as the stage does."""
    from dataclasses import replace

    states: list[str] = []
    kinds: list[object] = []
    for event in events:
        for action in cc.on_janus_event(event, call, RULES):
            kinds.append(type(action).__name__)
            if isinstance(action, cc.Publish) and call is not None:
                call = replace(call, state=action.state)
                states.append(action.state)
            elif isinstance(action, cc.MarkAccepted) and call is not None:
                call = replace(call, accepted=True)
            elif isinstance(action, cc.MarkMediaUp) and call is not None:
                call = replace(call, media_up=True)
            elif isinstance(action, cc.SetSipCallId) and call is not None:
                call = replace(call, sip_call_id=action.value)
            elif isinstance(action, cc.Accept):
                call = cc.CallView(action.sip_call_id, "inbound", "incoming", False, sip_call_id=action.sip_call_id)
                states.append("incoming")
            elif isinstance(action, cc.EndCall):
                states.append(f"{action.state} {action.code} {action.reason}")
                call = None
    return states, kinds


def test_recorded_busy_call() -> None:
    states, _ = _replay(_recorded()["outbound_busy_486"], cc.CallView("c1", "outbound", "calling", False))
    assert states == ["failed 486 Busy Here"]


def test_recorded_answered_call() -> None:
    states, kinds = _replay(_recorded()["outbound_answered_then_hung_up_by_us"],
                            cc.CallView("c1", "outbound", "calling", False))
    assert states == ["ringing", "proceeding", "accepted", "media_up", "ended 200 to BYE"], states
    assert kinds.count("SetAnswer") == 1 and kinds.count("RequestKeyframe") == 2


def test_recorded_inbound_softphone_call() -> None:
    events = _recorded()["inbound_softphone_two_h264_variants"]
    states, kinds = _replay(events, None)
    assert states == ["incoming", "accepted", "media_up", "ended 200 Session Terminated"], states
    assert kinds[0] == "Accept" and "SetAnswer" not in kinds  # inbound: we answer, Janus's answer never comes
    # The offer Janus passed on (rtx added for each video payload type) reduces to PCMU + telephone-event and
    # the first H.264 variant alone.
    offer = sdp.SessionDescription.parse(str(events[0]["jsep"]["sdp"]))  # type: ignore[index]
    chosen = sdp.restrict_offer(offer, {"audio": ["PCMU"], "video": ["H264"]})
    assert {k: c.payload_type for k, c in chosen.items()} == {"audio": 0, "video": 96}
    assert [m.formats for m in offer.media] == [["0", "101"], ["96"]]


def test_inbound_media_up_before_the_accept_is_reported_ends_media_up() -> None:
    """Both race after our 200 OK: on a loaded machine Janus pushed webrtcup before its "accepted" event, and the
    call stayed "accepted" for good with its media flowing (a node's status then never showed it up)."""
    events = _recorded()["inbound_softphone_two_h264_variants"]
    accepted = next(i for i, e in enumerate(events) if cc.plugin_data(e).get("result", {}).get("event") == "accepted")
    up = next(i for i, e in enumerate(events) if e.get("janus") == "webrtcup")
    assert accepted < up  # as recorded
    swapped = list(events)
    swapped[accepted], swapped[up] = swapped[up], swapped[accepted]
    states, _ = _replay(swapped, None)
    assert states == ["incoming", "media_up", "accepted", "media_up", "ended 200 Session Terminated"], states


# ----- an outbound call waits for the bot to be in the room -----------------------------------------------------
JOINED = {"stage": "browser", "state": "joined", "session": 1}
REFUSED_NAME = {"stage": "browser", "state": "rejoining", "session": 1,
                "reason": "join failed at step 3/3 (wait_for '#videos' to be visible): Timeout 20000ms exceeded.",
                "diagnosis": {"page_errors": ["Input is not alphanumeric"], "screenshot": "/run/x/browser-failure.png",
                              "suggestion": "give a display_name the page accepts, e.g. --var display_name=SIPbridge"}}


@pytest.mark.parametrize(("wait_s", "events", "waited_s", "expected"), [
    # No waiting configured (a pipeline without a bot): dial at once whatever the bot says or does not say.
    (0.0, [], 0.0, cc.DialNow()),
    (0.0, [REFUSED_NAME], 100.0, cc.DialNow()),
    # Waiting, nothing heard yet: keep waiting for what is left of the bound ...
    (60.0, [], 0.0, cc.KeepWaiting(60.0)),
    (60.0, [{"state": "launching"}, {"state": "joining", "url": "http://room/"}], 45.0, cc.KeepWaiting(15.0)),
    # ... dial as soon as the bot is in, also when it got in after a failed attempt or announced it only again later.
    (60.0, [JOINED], 0.0, cc.DialNow()),
    (60.0, [REFUSED_NAME, {"state": "joining"}, JOINED], 30.0, cc.DialNow()),
    (60.0, [{**JOINED, "repeat": True}], 59.0, cc.DialNow()),
    # Past the bound without the bot: not placed, saying what the bot said.
    (60.0, [], 60.0, cc.NotPlaced("not placed: the bot was not in the room after 60 s (the bot has not reported "
                                  "any state)")),
    (5.0, [{"state": "joining"}], 7.5, cc.NotPlaced("not placed: the bot was not in the room after 5 s (bot joining)")),
    # The bot left again (dropped, rejoining): a call placed now would meet an empty room.
    (60.0, [JOINED, {"state": "rejoining", "reason": "dropped from the room"}], 1.0, cc.KeepWaiting(59.0)),
    # Other stages' states, or nonsense, are not the bot's and change nothing.
    (60.0, [JOINED, {"state": "pondering"}, {"state": 7}, {}], 1.0, cc.DialNow()),
])
def test_room_gate(wait_s: float, events: list[dict[str, object]], waited_s: float, expected: object) -> None:
    gate = cc.RoomGate(wait_s)
    for attributes in events:
        gate.observe(attributes)
    assert gate.decide(waited_s) == expected


def test_room_gate_says_why_the_bot_is_not_in() -> None:
    gate = cc.RoomGate(60.0)
    assert gate.observe(REFUSED_NAME) is True
    assert gate.observe({**REFUSED_NAME, "repeat": True}) is False  # the bot said it again: nothing new to look at
    decision = gate.decide(60.0)
    assert isinstance(decision, cc.NotPlaced)
    assert decision.reason.startswith("not placed: the bot was not in the room after 60 s (bot rejoining: join failed "
                                      "at step 3/3 (wait_for '#videos' to be visible)")
    for part in ("page shows: 'Input is not alphanumeric'", "likely fix: give a display_name the page accepts",
                 "screenshot: /run/x/browser-failure.png"):
        assert part in decision.reason
    # A page's endless error text stays a line in the call's state and logs.
    gate.observe({"state": "failed", "reason": "x" * 5000, "diagnosis": {"page_errors": ["y" * 5000] * 50}})
    reason = gate.decide(61.0)
    assert isinstance(reason, cc.NotPlaced) and len(reason.reason) < 1000 and "bot failed: xxx" in reason.reason
    assert gate.observe(JOINED) is True and gate.in_room and gate.describe() == "bot joined"


@pytest.mark.parametrize("wait_s", [-1.0, float("nan"), float("inf"), 1e9])
def test_room_gate_refuses_nonsense(wait_s: float) -> None:
    with pytest.raises(ValueError, match="wait for the room"):
        cc.RoomGate(wait_s)


def test_bridge_file_wait_for_room_reaches_the_stage(tmp_path: object) -> None:
    from pathlib import Path

    from sipbridge.bridge import WAIT_FOR_ROOM_S, BridgeConfigError, bridge_stages, parse_bridge
    from stages.janus import command as janus_command

    def janus_args(data: dict[str, object]) -> list[str]:
        return {s.name: s for s in bridge_stages(parse_bridge(data), Path(str(tmp_path)))}["janus"].args

    args = janus_args(_bridge_example())  # an outbound call waits for the bot by default
    assert args[args.index("--wait-for-room-s") + 1] == str(WAIT_FOR_ROOM_S) and WAIT_FOR_ROOM_S > 0
    data = _bridge_example()
    data["sip"]["wait_for_room_s"] = 12  # type: ignore[index]
    args = janus_args(data)
    assert args[args.index("--wait-for-room-s") + 1] == "12.0"
    ctx = janus_command.make_context("janus", [a for a in args if not a.startswith("%(")], resilient_parsing=True)
    assert ctx.params["wait_for_room_s"] == 12.0
    for value, message in ((0, "must be more than 0"), (-5, "must be more than 0"), (1e6, "must be more than 0 and "
                           "at most 3600 s"), ("60", "must be int or float"), (True, "must be int or float")):
        data["sip"]["wait_for_room_s"] = value  # type: ignore[index]
        with pytest.raises(BridgeConfigError, match=re.escape(f"sip.wait_for_room_s {message}")):
            parse_bridge(data)
    inbound = _bridge_example()  # an inbound call does not wait: the caller is answered
    inbound["sip"] = {"inbound": True, "accept_from": ".*", "wait_for_room_s": 10}
    assert "--wait-for-room-s" not in janus_args(inbound)


def test_keyframe_requests_inside_the_interval_are_held_to_its_end_not_lost() -> None:
    """A restarted SIP-side decoder asks right after a request made for the one it replaced: the encoder must still
    hear it (it used to be dropped, and the decoder waited a second for its next request)."""
    throttle = KeyframeThrottle(0.25)
    assert throttle.request(10.0) == 0.0  # the first goes out at once
    wait_s = throttle.request(10.1)
    assert wait_s == pytest.approx(0.15)  # held to the interval's end
    assert throttle.request(10.2) is None  # rides on the held one
    throttle.fire(10.25)
    assert throttle.request(10.3) == pytest.approx(0.2)  # the interval now runs from the held one's sending
    throttle.cancel()  # its task was cancelled (the stage stopping): the next request is not blocked for good
    assert throttle.request(10.6) == 0.0
    assert throttle.request(10.9) == 0.0  # a whole interval later: at once again
