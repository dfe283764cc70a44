"""Call control through the Janus stage: failures with SIP codes, BYE from the peer, DTMF, inbound calls,
digest registration and Janus restarts. Real Janus, real sipp, a private namespace per test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

import protocol
from protocol import Codec, EventType
from sipbridge.janus_server import JanusServer
from stages.janus.callcontrol import CommandError, parse_command
from tests.sipfix import (
    MediaCollector,
    MediaFeeder,
    Sipp,
    StageProcess,
    janus_fixture,  # noqa: F401  (pytest fixture)
    netns_fixture,  # noqa: F401  (pytest fixture)
    sip_listen_port,
    stop_stage_and_collector,
)

pytestmark = [pytest.mark.media]

SIPP_PORT = 5090
SIPP_MEDIA_PORT = 6000
REGISTRAR_PORT = 5070
PEER = f"sip:peer@127.0.0.1:{SIPP_PORT}"
MAX_SANE_FPS = 1000  # the feeder sends 15 fps; the old figure for these streams was ~1.5e12


class Rig:
    """Feeder -> Janus stage process -> collector, all in the test's namespace."""

    def __init__(self, tmp_path: Path, janus: JanusServer, args: list[str] | None = None,
                 video: Codec | None = Codec.H264, audio: Codec | None = Codec.PCMU) -> None:
        self.tmp_path = tmp_path
        feed = f"ipc://{tmp_path}/feed.sock"
        self.feeder = MediaFeeder(feed, video=video, audio=audio)
        self.stage = StageProcess(tmp_path / "stage", feed, janus.ws_url, args=args or []).start()
        self.collector = MediaCollector(self.stage.output)
        self.collect = asyncio.create_task(self.collector.run())
        self.feeding: asyncio.Task[None] | None = None
        self.exit_code: int | None = None

    def feed(self, seconds: float) -> None:
        self.feeding = asyncio.create_task(self.feeder.run(seconds))

    async def close(self) -> None:
        if self.feeding is not None:
            self.feeding.cancel()
        self.exit_code = await stop_stage_and_collector(self.stage, self.collector, self.collect)
        print(self.stage.log_text()[-5000:])
        self.feeder.close()

    async def wait_state(self, state: str, timeout_s: float = 15.0, after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            events = [e for e in self.collector.events if e.type is EventType.CALL_STATE][after:]
            for event in events:
                if event.attributes.get("state") == state:
                    return event.attributes
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {state} event; states so far {self.collector.states()}")

    async def wait_count(self, state: str, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.collector.states().count(state) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def n_states(self) -> int:
        return len(self.collector.states())


async def _next_stats(endpoint: str, timeout_s: float = 5.0) -> protocol.Stats:
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            parts = await asyncio.wait_for(sub.recv_multipart(), timeout_s)
            msg = protocol.decode(parts)
            if isinstance(msg, protocol.Stats):
                return msg
        raise AssertionError("no statistics message")
    finally:
        sub.close(linger=0)


async def _rejections_then_remote_bye(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus)
    try:
        await rig.stage.wait_registered()
        for scenario, code in (("uas_486", 486), ("uas_404", 404)):
            with Sipp(scenario, tmp_path / scenario, SIPP_PORT, SIPP_MEDIA_PORT) as sipp:
                reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
                assert not reply["ok"]
                assert reply["call"]["state"] == "failed" and reply["call"]["code"] == code, reply
                assert sipp.wait(10) == 0
        await rig.wait_count("failed", 2)  # the events travel through ZeroMQ after the replies
        failed = [e.attributes for e in rig.collector.events
                  if e.type is EventType.CALL_STATE and e.attributes.get("state") == "failed"]
        assert [f["code"] for f in failed] == [486, 404]
        assert "Busy Here" in failed[0]["reason"]
        # The stage is still up: the next call connects, carries media, and the peer hangs up first.
        with Sipp("uas_bye", tmp_path / "uas_bye", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]) as sipp:
            rig.feed(8.0)
            mark = rig.n_states()
            reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
            assert reply["ok"], reply
            ended = await rig.wait_state("ended", after=mark)
            assert ended["code"] == 200, ended
            assert sipp.wait(10) == 0
        assert len(rig.collector.counters) > 10
        status = await rig.stage.command({"cmd": "status"})
        assert status["counters"]["calls_failed"] == 2 and status["counters"]["calls_connected"] == 1
        assert status["errors"].get("call_failed") == 2
        # The same figures go out on the statistics socket (what `sipbridge status` shows).
        stats = await _next_stats(rig.stage.stats)
        assert stats.figures["calls_failed"] == 2 and stats.figures["calls_connected"] == 1
        assert stats.figures["call"]["state"] == "ended" and stats.figures["call"]["code"] == 200
        assert stats.figures["registration"]["state"] == "registered"
        # The received streams carry their receive times: a real frame rate, not frames over zero seconds.
        video = stats.figures["streams"]["sip-video"]
        assert video["frames_in"] > 10 and 1 < video["fps_in"] < MAX_SANE_FPS, video
    finally:
        await rig.close()
    assert rig.exit_code == 0


@pytest.mark.timeout(90)
def test_busy_and_unknown_target_then_remote_bye(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_rejections_then_remote_bye(tmp_path, janus))


async def _dtmf(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus)
    sipp = Sipp("uas_dtmf", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo", "-trace_logs"])
    sipp.start()
    try:
        await rig.stage.wait_registered()
        reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
        assert reply["ok"], reply
        assert (await rig.stage.command({"cmd": "dtmf", "digits": "19*"}))["ok"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            digits = [e.attributes["digit"] for e in rig.collector.events if e.type is EventType.DTMF]
            if len(digits) >= 2:
                break
            await asyncio.sleep(0.05)
        assert digits == ["7", "#"]
        assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
        assert sipp.wait(10) == 0, sipp.output()
        received = re.findall(r"DTMF received (\S)", "".join(p.read_text() for p in
                                                              (tmp_path / "sipp").glob("*_logs.log")))
        assert received == ["1", "9", "*"]
        bad = await rig.stage.command({"cmd": "dtmf", "digits": "x"})
        assert not bad["ok"]
    finally:
        sipp.stop()
        await rig.close()
    assert rig.exit_code == 0


@pytest.mark.timeout(60)
def test_dtmf_both_ways(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_dtmf(tmp_path, janus))


async def _inbound(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus, args=["--inbound", "--accept-from", "^sip:caller@"])
    try:
        await rig.stage.wait_registered()
        port = sip_listen_port()
        rig.feed(10.0)
        caller = Sipp("uac_call", tmp_path / "uac", SIPP_PORT, SIPP_MEDIA_PORT,
                      extra=["-rtp_echo", "-s", "bridge", "-d", "4000"], remote=f"127.0.0.1:{port}")
        with caller:
            incoming = await rig.wait_state("incoming")
            assert incoming["direction"] == "inbound" and incoming["peer"].startswith("sip:caller@")
            await rig.wait_state("accepted")
            ended = await rig.wait_state("ended")
            assert caller.wait(15) == 0, caller.output()
        assert ended["direction"] == "inbound"
        counters = rig.collector.counters
        assert len(counters) > 20 and counters == sorted(counters)
        assert abs(rig.collector.tone_hz() - 440.0) < 10
    finally:
        await rig.close()
    assert rig.exit_code == 0


@pytest.mark.timeout(60)
def test_inbound_call_accepted_with_media(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_inbound(tmp_path, janus))


async def _inbound_declined(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus, args=["--inbound", "--accept-from", "^sip:alice@", "--decline-code", "603"])
    try:
        await rig.stage.wait_registered()
        port = sip_listen_port()
        with Sipp("uac_call", tmp_path / "uac", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-s", "bridge"],
                  remote=f"127.0.0.1:{port}") as caller:
            declined = await rig.wait_state("declined")
            assert declined["code"] == 603
            assert caller.wait(15) != 0  # the caller's scenario expected a 200
            assert "SIP/2.0 603" in caller.messages()
    finally:
        await rig.close()


@pytest.mark.timeout(60)
def test_inbound_call_declined_by_rule(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_inbound_declined(tmp_path, janus))


async def _digest(tmp_path: Path, janus: JanusServer, secret: str) -> dict[str, Any]:
    args = ["--register", "digest", "--identity", "sip:bridge@127.0.0.1", "--proxy",
            f"sip:127.0.0.1:{REGISTRAR_PORT}", "--authuser", "bridge", "--secret", secret]
    rig = Rig(tmp_path, janus, args=args)
    try:
        with Sipp("registrar_digest", tmp_path / "registrar", REGISTRAR_PORT, SIPP_MEDIA_PORT) as registrar:
            event = await rig.wait_state("registered" if secret == "s3cret" else "registration_failed")
            registrar.wait(10)
            messages = registrar.messages()
        assert "Authorization: Digest" in messages and 'username="bridge"' in messages
        assert secret not in rig.stage.log_text()  # secrets never reach logs
        return event
    finally:
        await rig.close()


@pytest.mark.timeout(60)
def test_digest_register_success(janus: JanusServer, tmp_path: Path) -> None:
    event = asyncio.run(_digest(tmp_path, janus, "s3cret"))
    assert event["register_sent"] is True


@pytest.mark.timeout(60)
def test_digest_register_wrong_secret(janus: JanusServer, tmp_path: Path) -> None:
    event = asyncio.run(_digest(tmp_path, janus, "wrong-secret"))
    assert event["code"] == 403, event


async def _janus_restart(tmp_path: Path, janus: JanusServer) -> None:
    """Janus crashes mid-call and comes back: the stage reconnects, registers and dials the call again by
    itself, and the echo (media through the SIP peer and back) resumes with no request from outside."""
    rig = Rig(tmp_path, janus)
    # The peer takes the re-dialled call as a second call (the first one never got its BYE: Janus died).
    with Sipp("uas_echo", tmp_path / "echo", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"], calls=2):
        try:
            await rig.stage.wait_registered()
            rig.feed(60.0)
            reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
            assert reply["ok"], reply
            await _wait_frames(rig, 10)
            mark = rig.n_states()
            before = len(rig.collector.counters)
            killed_ns = time.time_ns()
            janus.kill()  # a crash, not a clean stop
            lost = await rig.wait_state("janus_disconnected", after=mark)
            assert lost["call_id"] == reply["call"]["call_id"]
            await asyncio.to_thread(janus.start)
            back_ns = time.time_ns()
            redialled = await rig.wait_state("media_up", after=mark, timeout_s=30)
            assert redialled["call_id"] != reply["call"]["call_id"] and redialled["peer"] == PEER
            await _wait_frames(rig, before + 10, timeout_s=30)
            arrivals = sorted(rig.collector.counter_ns.values())
            last_before = max(t for t in arrivals if t <= killed_ns)
            first_after = min(t for t in arrivals if t > back_ns)
            print(f"Janus restart: no echoed media for {(first_after - last_before) / 1e9:.2f} s; media back "
                  f"{(first_after - back_ns) / 1e9:.2f} s after Janus was (target < 10 s)")
            status = await rig.stage.command({"cmd": "status"})
            assert status["counters"]["janus_reconnects"] >= 1 and status["active"]
            assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
            await rig.wait_state("ended", after=mark)
        finally:
            await rig.close()
    assert rig.exit_code == 0
    assert rig.collector.states().count("calling") == 2  # the call we asked for and the re-dial, nothing more


async def _wait_frames(rig: Rig, count: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(rig.collector.counters) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(rig.collector.counters)} frames back, waited for {count}")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
def test_janus_restart_mid_call_redials_by_itself(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_janus_restart(tmp_path, janus))


async def _no_redial(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus, args=["--no-redial-after-janus-restart"])
    with Sipp("uas_echo", tmp_path / "echo", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"], calls=2):
        try:
            await rig.stage.wait_registered()
            reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
            assert reply["ok"], reply
            janus.kill()
            await rig.wait_state("janus_disconnected")
            await asyncio.to_thread(janus.start)
            status = await rig.stage.wait_registered()
            await asyncio.sleep(REDIAL_QUIET_S)  # a re-dial would have gone out at once
            status = await rig.stage.command({"cmd": "status"})
            assert not status["active"] and rig.collector.states().count("calling") == 1, rig.collector.states()
        finally:
            await rig.close()


REDIAL_QUIET_S = 3.0


@pytest.mark.timeout(90)
def test_janus_restart_without_redial_when_switched_off(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_no_redial(tmp_path, janus))


RFC2833_MEDIA_PORT = 6100  # fixed in uas_rfc2833.xml
DTMF_SETTLE_S = 1.0  # after the command returns (it waits for every event to be sent), for the last packets


def _rfc4733_packets(digit: str, payload_type: int, seq: int, timestamp: int, ssrc: int) -> list[bytes]:
    """One DTMF event as a sender emits it: a start packet (marker), updates, three end packets."""
    event = "0123456789*#ABCD".index(digit)
    packets = []
    for i, (end, duration) in enumerate([(False, 160), (False, 320), (False, 480), (True, 640), (True, 640),
                                         (True, 640)]):
        header = bytes([0x80, (0x80 if i == 0 else 0) | payload_type]) + (seq + i).to_bytes(2, "big")
        header += timestamp.to_bytes(4, "big") + ssrc.to_bytes(4, "big")
        payload = bytes([event, (0x80 if end else 0) | 10]) + duration.to_bytes(2, "big")
        packets.append(header + payload)
    return packets


async def _rfc2833(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus, args=["--video-codec", "none"], video=None)
    media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    media.bind(("127.0.0.1", RFC2833_MEDIA_PORT))
    sipp = Sipp("uas_rfc2833", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT).start()
    try:
        await rig.stage.wait_registered()
        rig.feed(6.0)
        reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
        assert reply["ok"], reply
        invite = sipp.messages()
        payload_type = int(re.search(r"a=rtpmap:(\d+) telephone-event/8000", invite).group(1))  # type: ignore[union-attr]
        janus_audio_port = int(re.search(r"m=audio (\d+) ", invite).group(1))  # type: ignore[union-attr]
        await rig.wait_state("media_up")
        seq, timestamp = 1000, 50_000
        for digit in "5#":
            for packet in _rfc4733_packets(digit, payload_type, seq, timestamp, 0x5EED):
                media.sendto(packet, ("127.0.0.1", janus_audio_port))
                await asyncio.sleep(0.02)
            seq += 6
            timestamp += 1600
        deadline = time.monotonic() + 5
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(events) < 2:
            events = [e.attributes for e in rig.collector.events if e.type is EventType.DTMF]
            await asyncio.sleep(0.05)
        assert [e["digit"] for e in events] == ["5", "#"], events
        assert {e["method"] for e in events} == {"rfc2833"}
        # And the other way: the peer took telephone-event, so the bridge's DTMF goes as RFC 4733 events in
        # the audio it receives on this very socket, numbered in the audio's own sequence.
        media.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                media.recv(2048)  # what arrived before the digits
        assert (await rig.stage.command({"cmd": "dtmf", "digits": "4*", "duration_ms": 200}))["ok"]
        packets = await _drain(media, DTMF_SETTLE_S)
        assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
        assert sipp.wait(10) == 0
    finally:
        media.close()
        sipp.stop()
        await rig.close()
    events_by_timestamp: dict[int, list[bytes]] = {}
    for packet in packets:
        if packet[1] & 0x7F == payload_type:
            events_by_timestamp.setdefault(int.from_bytes(packet[4:8], "big"), []).append(packet[12:16])
    digits = ["0123456789*#ABCD"[payloads[0][0]] for _, payloads in sorted(events_by_timestamp.items())]
    assert digits == ["4", "*"], events_by_timestamp
    for payloads in events_by_timestamp.values():
        final = [p for p in payloads if p[1] & 0x80]
        assert len(final) == 3 and int.from_bytes(final[0][2:4], "big") == 200 * 8  # 200 ms at 8 kHz, end x3
    audio = [p for p in packets if p[1] & 0x7F == 0]
    assert audio, "no PCMU beside the events"
    assert len({p[8:12] for p in packets}) == 1, "events must ride on the audio's SSRC"
    seqs = [int.from_bytes(p[2:4], "big") for p in packets]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs)), seqs  # one gapless sequence


async def _drain(sock: socket.socket, seconds: float) -> list[bytes]:
    packets: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            packets.append(sock.recv(2048))
        except BlockingIOError:
            await asyncio.sleep(0.005)
    return packets


@pytest.mark.timeout(60)
def test_dtmf_rfc2833_received(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_rfc2833(tmp_path, janus))


async def _redial(tmp_path: Path, janus: JanusServer) -> None:
    with Sipp("uas_486", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, calls=2) as sipp:
        rig = Rig(tmp_path, janus, args=["--call", PEER, "--redial-s", "0.3"])
        try:
            await rig.wait_count("failed", 2, timeout_s=20)
            assert rig.collector.states().count("failed") >= 2, rig.collector.states()
            assert sipp.wait(10) == 0
        finally:
            await rig.close()
    assert rig.exit_code == 0


@pytest.mark.timeout(60)
def test_call_at_start_and_redial_after_failure(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_redial(tmp_path, janus))


def _malformed_requests(count: int, seed: int = 15) -> list[list[bytes]]:
    """Bad control requests of every kind: garbage bytes, JSON of the wrong shape, known commands with wrong types,
    missing or extra fields, bad digits, non-finite numbers, and frames a REQ client cannot send."""
    rng = random.Random(seed)
    values: list[object] = [None, True, False, 0, -5, 2**70, 1.5, "", "x", "sip:", [], {}, [1, "a"], {"k": None},
                            "\u0000\u00ff", "9" * 80]
    templates: list[dict[str, object]] = [
        {"cmd": "dtmf", "duration_ms": None}, {"cmd": "dtmf", "digits": "1", "duration_ms": None},
        {"cmd": "dtmf", "digits": None}, {"cmd": "call"}, {"cmd": "call", "uri": None},
        {"cmd": "call", "uri": "sip:x@y", "timeout_s": "soon"}, {"cmd": "hangup", "now": True},
        {"cmd": "hold", "direction": 1}, {"cmd": 1}, {}, {"cmd": "status", "id": {}},
    ]
    cmds = ["status", "call", "hangup", "dtmf", "hold", "unhold", "reboot", ""]
    keys = ["uri", "wait", "timeout_s", "digits", "duration_ms", "extra"]
    requests: list[list[bytes]] = []
    while len(requests) < count:
        roll = rng.random()
        if roll < 0.2:
            raw = rng.randbytes(rng.randrange(0, 200))
        elif roll < 0.3:
            raw = json.dumps(rng.choice(values)).encode()
        elif roll < 0.5:
            raw = json.dumps(rng.choice(templates)).encode()
        else:
            request: dict[str, object] = {"cmd": rng.choice(cmds)}
            for key in rng.sample(keys, rng.randrange(1, 4)):
                request[key] = rng.choice(values)
            raw = json.dumps(request).encode()
        try:
            parse_command(raw)
            continue  # valid by chance (it could be a real hangup): not for this test
        except CommandError:
            pass
        requests.append([raw])
    return requests


async def _control_fuzz(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus)
    try:
        await rig.stage.wait_registered()
        rig.feed(60.0)
        with Sipp("uas_echo", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]) as sipp:
            reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
            assert reply["ok"], reply
            req = rig.stage.ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(rig.stage.control)
            dealer = rig.stage.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(rig.stage.control)
            errors = 0
            try:
                for index, frames in enumerate(_malformed_requests(N_MALFORMED)):
                    if index % 10 == 0:
                        # A DEALER may send several frames and no delimiter: still one error reply each.
                        await dealer.send_multipart([b"", *frames] if index % 20 else [b"x", b"y", *frames])
                        answer = await asyncio.wait_for(dealer.recv_multipart(), 5)
                        reply = json.loads(answer[-1])
                    else:
                        await req.send(frames[0])
                        reply = json.loads(await asyncio.wait_for(req.recv(), 5))
                    assert reply["ok"] is False and reply["error"], (frames, reply)
                    errors += 1
            finally:
                req.close()
                dealer.close()
            assert errors == N_MALFORMED
            status = await rig.stage.command({"cmd": "status"})
            assert status["active"] and status["call"]["state"] == "media_up", status["call"]
            assert status["counters"]["control_rejected"] >= N_MALFORMED * 0.9
            before = len(rig.collector.counters)
            assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
            assert sipp.wait(10) == 0, sipp.output()  # the peer got its BYE
        assert before > 0  # media flowed through the call the requests were aimed at
        ended = await rig.wait_state("ended")
        assert ended["call_id"] == reply_call_id(status)
    finally:
        await rig.close()
    assert rig.exit_code == 0


def reply_call_id(status: dict[str, Any]) -> str:
    return str(status["call"]["call_id"])


N_MALFORMED = 1000


@pytest.mark.timeout(120)
def test_control_socket_survives_malformed_requests(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_control_fuzz(tmp_path, janus))


async def _ringing_call_does_not_block(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus)
    try:
        await rig.stage.wait_registered()
        other = StageClient(rig.stage.ctx, rig.stage.control)
        with contextlib.closing(other), Sipp("uas_ring", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT) as sipp:
            placing = asyncio.create_task(other.command({"cmd": "call", "uri": PEER, "wait": True, "timeout_s": 60}))
            await rig.wait_state("ringing")
            # The call request is still waiting for an answer; status and hangup are answered meanwhile.
            status = await rig.stage.command({"cmd": "status"}, timeout_s=10)
            assert status["call"]["state"] in ("ringing", "proceeding") and not placing.done()
            assert (await rig.stage.command({"cmd": "hangup", "id": "h1"}, timeout_s=10)) == {"ok": True, "id": "h1"}
            placed = await asyncio.wait_for(placing, 15)
            assert placed["ok"] is False and placed["call"]["state"] in ("failed", "ended"), placed
            assert sipp.wait(10) == 0, sipp.output()  # CANCEL reached it, 487 acknowledged
    finally:
        await rig.close()
    assert rig.exit_code == 0


class StageClient:
    """A second REQ client of the stage's control socket."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def command(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.sock.send(json.dumps(request).encode())
        return json.loads(await self.sock.recv())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(90)
def test_waiting_call_does_not_block_status_or_hangup(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_ringing_call_does_not_block(tmp_path, janus))


async def _inbound_registration_renewed(tmp_path: Path, janus: JanusServer) -> None:
    """An inbound bridge registered at a registrar: after a Janus crash and restart it registers again by itself
    (with the new Janus's contact), so callers reach it again through the registrar."""
    args = ["--register", "digest", "--identity", "sip:bridge@127.0.0.1", "--proxy",
            f"sip:127.0.0.1:{REGISTRAR_PORT}", "--authuser", "bridge", "--secret", "s3cret",
            "--inbound", "--accept-from", "^sip:caller@"]
    rig = Rig(tmp_path, janus, args=args)
    try:
        with Sipp("registrar_digest", tmp_path / "registrar", REGISTRAR_PORT, SIPP_MEDIA_PORT, calls=2) as registrar:
            await rig.wait_state("registered")
            mark = rig.n_states()
            janus.kill()
            await rig.wait_state("janus_disconnected", after=mark)
            await asyncio.to_thread(janus.start)
            again = await rig.wait_state("registered", after=mark, timeout_s=30)
            assert again["register_sent"] is True
            assert registrar.wait(15) == 0, registrar.output()  # both registrations challenged and accepted
            messages = registrar.messages()
        registers = re.findall(r"^REGISTER sip:", messages, re.MULTILINE)
        contacts = set(re.findall(r"^Contact: <sip:bridge@127\.0\.0\.1:(\d+)", messages, re.MULTILINE))
        assert len(registers) == 4, messages  # challenge + answer, twice
        assert len(contacts) == 2, contacts  # the restarted Janus listens on a port of its own
        status = await rig.stage.command({"cmd": "status"})
        assert status["registration"]["state"] == "registered" and status["counters"]["janus_reconnects"] == 1
    finally:
        await rig.close()
    assert rig.exit_code == 0


@pytest.mark.timeout(90)
def test_janus_restart_renews_the_inbound_registration(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_inbound_registration_renewed(tmp_path, janus))
