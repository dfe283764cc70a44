"""Lip sync toward SIP: audio waits for the video's delay through the bridge (stages/janus/avsync.py)."""

from __future__ import annotations

import pytest

from stages.janus.avsync import MAX_AUDIO_HOLD_S, VIDEO_AGE_FRESH_S, AudioHold

FRAME_S = 0.02


def test_audio_leaves_as_long_after_capture_as_the_pictures_do() -> None:
    hold = AudioHold()
    for i in range(30):
        hold.video_sent(i / 15, 0.120)  # pictures leave 120 ms after capture
    now = 2.0
    # Audio captured 30 ms ago waits 90 ms more, so both left 120 ms after capture.
    assert hold.release_at(now, 0.030) == pytest.approx(now + 0.090)
    # The next packet, captured 20 ms later, leaves 20 ms later: the audio keeps its pace.
    assert hold.release_at(now + 0.001, 0.011) == pytest.approx(now + 0.110)
    assert hold.held == 2 and hold.capped == 0


def test_audio_is_never_held_when_the_video_is_faster_or_absent() -> None:
    hold = AudioHold()
    assert hold.release_at(1.0, 0.05) == 1.0  # no picture yet (an audio-only call)
    for i in range(10):
        hold.video_sent(1.0 + i * 0.06, 0.02)
    assert hold.release_at(1.6, 0.05) == 1.6  # audio later than video: sent at once, never pulled earlier
    # The video stopped (a held call): its old delay no longer holds the audio.
    assert hold.release_at(1.6 + VIDEO_AGE_FRESH_S + 0.1, 0.0) == pytest.approx(1.7 + VIDEO_AGE_FRESH_S)
    assert hold.held == 0


def test_a_broken_video_path_costs_the_audio_at_most_the_bound_and_is_counted() -> None:
    hold = AudioHold()
    for i in range(10):
        hold.video_sent(i * 0.06, 3.0)  # seconds behind: the video is broken, not late
    assert hold.release_at(1.0, 0.01) == pytest.approx(1.0 + MAX_AUDIO_HOLD_S)
    assert hold.capped == 1


def test_the_audio_order_never_changes_when_the_video_delay_drops() -> None:
    hold = AudioHold()
    for i in range(25):
        hold.video_sent(i * 0.04, 0.2)
    first = hold.release_at(1.0, 0.0)  # held 200 ms
    for i in range(25):
        hold.video_sent(1.0 + i * 0.001, 0.0)  # the video catches up at once
    second = hold.release_at(1.0 + FRAME_S, 0.0)
    assert second >= first


def test_a_new_call_forgets_the_last_one() -> None:
    hold = AudioHold()
    for i in range(10):
        hold.video_sent(i * 0.06, 0.2)
    hold.release_at(1.0, 0.0)
    hold.reset()
    assert hold.video_delay_s(1.0) is None
    assert hold.release_at(0.5, 0.0) == 0.5  # not held behind the last call's release times


def test_a_capture_time_from_another_clock_neither_moves_the_video_delay_nor_holds_audio() -> None:
    hold = AudioHold()
    for i in range(10):
        hold.video_sent(i * 0.06, 0.1)
    hold.video_sent(0.7, 1.7e9)  # capture time 0: the age is the epoch
    hold.video_sent(0.7, -0.5)  # a capture stamped ahead of this host's clock
    assert hold.video_delay_s(0.7) == pytest.approx(0.1)
    assert hold.release_at(0.8, 1.7e9) == 0.8  # an audio packet without a usable capture time goes at once
