"""The cluster's SIP message handling alone (no root, no network): parsing, Via and route handling, and
that any byte string either parses or raises SipError (a counted drop), never anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipbridge.cluster import sipmsg

INVITE = (
    b"INVITE sip:service@127.0.0.10:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.10;branch=z9hG4bKkam1, SIP/2.0/UDP 127.0.0.50:5061;branch=z9hG4bK-1;rport=5061;"
    b"received=127.0.0.50\r\n"
    b"Record-Route: <sip:127.0.0.10;lr=on;ftag=abc>\r\n"
    b'f: "sipp caller" <sip:caller@127.0.0.50:5061>;tag=abc\r\n'
    b"t: <sip:service@127.0.0.10:5060>\r\n"
    b"i: 1-2@127.0.0.50\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"m: <sip:caller@127.0.0.50:5061;transport=UDP>\r\n"
    b"Max-Forwards: 69\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 78\r\n\r\n"
    b"v=0\r\nc=IN IP4 127.0.0.50\r\nt=0 0\r\nm=audio 6010 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\nEXTRA"
)


def test_an_invite_parses_with_compact_headers_comma_vias_and_a_body_cut_at_content_length() -> None:
    msg = sipmsg.parse(INVITE)
    assert msg.method == "INVITE" and msg.uri == "sip:service@127.0.0.10:5060"
    assert msg.call_id == "1-2@127.0.0.50" and msg.cseq == (1, "INVITE")
    assert sipmsg.tag(msg.get("from") or "") == "abc" and sipmsg.tag(msg.get("to") or "") is None
    vias = msg.get_all("via")
    assert len(vias) == 2 and sipmsg.param(vias[0], "branch") == "z9hG4bKkam1"
    assert sipmsg.via_sent_by(vias[1]) == ("127.0.0.50", 5061)
    assert sipmsg.uri_of(msg.get("contact") or "") == "sip:caller@127.0.0.50:5061;transport=UDP"
    assert sipmsg.host_port(sipmsg.uri_of(msg.get_all("record-route")[0])) == ("127.0.0.10", 5060)
    assert not msg.body.endswith(b"EXTRA") and sipmsg.sdp_audio_target(msg.body) == ("127.0.0.50", 6010)
    # Written back, it parses to the same message (what the front forwards is what it read, plus its Via).
    again = sipmsg.parse(msg.to_bytes())
    assert again.headers == msg.headers and again.body == msg.body


def test_a_response_copies_the_dialog_headers_and_tags_the_to() -> None:
    req = sipmsg.parse(INVITE)
    ok = sipmsg.parse(sipmsg.response(req, 200, to_tag="xyz", extra=[("contact", "<sip:n1@127.0.0.11:4000>")],
                                      body=sipmsg.audio_sdp("127.0.0.11", 7000, 1)).to_bytes())
    assert ok.status == 200 and sipmsg.tag(ok.get("to") or "") == "xyz"
    assert ok.get_all("via") == req.get_all("via") and ok.get_all("record-route") == req.get_all("record-route")
    trying = sipmsg.response(req, 100, to_tag="xyz")
    assert sipmsg.tag(trying.get("to") or "") is None and trying.get("record-route") is None
    # A forwarded request's branch is stable for its retransmissions, CANCEL and ACK, and salted per front.
    assert sipmsg.branch_for("z9hG4bK-1", "a") == sipmsg.branch_for("z9hG4bK-1", "a") != sipmsg.branch_for(
        "z9hG4bK-1", "b")
    assert sipmsg.branch_for("z9hG4bK-1", "a").startswith(sipmsg.MAGIC_COOKIE)


@pytest.mark.parametrize("data", [
    b"", b"\r\n\r\n", b"INVITE\r\n\r\n", b"HELLO sip:x SIP/2.0\r\n\r\n",
    INVITE.replace(b"CSeq: 1 INVITE", b"CSeq: one INVITE"),
    INVITE.replace(b"Content-Length: 78", b"Content-Length: 9999"),
    INVITE.replace(b"i: 1-2@127.0.0.50\r\n", b""),
    b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n", b"\xff\xfe" * 40 + b"\r\n\r\n",
    b"INVITE sip:a SIP/2.0\r\nno colon here\r\n\r\n", b"A" * 70_000,
])
def test_malformed_messages_raise_sip_error(data: bytes) -> None:
    with pytest.raises(sipmsg.SipError):
        sipmsg.parse(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600) | st.builds(lambda cut, junk: INVITE[:cut] + junk, st.integers(0, len(INVITE)),
                                           st.binary(max_size=40)))
def test_any_bytes_parse_or_raise_sip_error_only(data: bytes) -> None:
    try:
        msg = sipmsg.parse(data)
    except sipmsg.SipError:
        return
    msg.to_bytes()  # whatever parsed can be written again
