"""Room media that reaches the browser stage too late is dropped, not emitted (issue 15's soak: a backlog of
minutes in the socket from the page), and an encoded video track then resumes on a keyframe."""

from __future__ import annotations

from stages.browser.stage import MAX_CAPTURE_AGE_MS, PageTrack, capture_admission

NOW_MS = 1_800_000_000_000.0


def track(kind: str) -> PageTrack:
    return PageTrack(key="k1", kind=kind, participant="alice", stream_id=f"alice/{kind}", attributes={})


def encoded(age_ms: float, key: bool = False) -> dict[str, object]:
    return {"t": "e", "k": "k1", "ct": NOW_MS - age_ms, "key": key}


def test_fresh_media_goes_on() -> None:
    video = track("video")
    assert capture_admission(video, encoded(20.0), NOW_MS) == (None, False)
    assert capture_admission(track("audio"), {"t": "e", "ct": NOW_MS - 20.0}, NOW_MS) == (None, False)
    assert capture_admission(video, encoded(MAX_CAPTURE_AGE_MS - 1), NOW_MS) == (None, False)


def test_stale_audio_is_dropped_and_the_next_fresh_packet_goes_on() -> None:
    audio = track("audio")
    assert capture_admission(audio, {"t": "e", "ct": NOW_MS - 277_000.0}, NOW_MS) == ("page_stale", False)
    assert capture_admission(audio, {"t": "e", "ct": NOW_MS - 5.0}, NOW_MS) == (None, False)


def test_stale_encoded_video_waits_for_a_keyframe_asked_for_once() -> None:
    video = track("video")
    # A backlog: three stale frames, one keyframe request.
    assert capture_admission(video, encoded(5000.0), NOW_MS) == ("page_stale", True)
    assert capture_admission(video, encoded(4000.0), NOW_MS) == ("page_stale", False)
    assert capture_admission(video, encoded(3000.0, key=True), NOW_MS) == ("page_stale", False)
    # Fresh again, but the references are gone: deltas wait for the keyframe.
    assert capture_admission(video, encoded(10.0), NOW_MS) == ("page_stale_awaiting_keyframe", False)
    assert capture_admission(video, encoded(10.0, key=True), NOW_MS) == (None, False)
    assert capture_admission(video, encoded(10.0), NOW_MS) == (None, False)


def test_raw_video_frames_stand_alone() -> None:
    video = track("video")
    raw = {"t": "v", "ct": NOW_MS - 5000.0}
    assert capture_admission(video, raw, NOW_MS) == ("page_stale", False)
    assert capture_admission(video, {"t": "v", "ct": NOW_MS - 10.0}, NOW_MS) == (None, False)
