"""Lip sync on the way to the SIP peer: audio leaves as long after its capture as the video does.

The room's audio and pictures reach the bot together, but on the way to SIP the pictures are decoded, composed and
encoded again (tens of ms, more on a loaded machine) while the audio is only mixed. Sent as soon as ready, the audio
then arrives ahead of the picture, and many SIP endpoints play each stream on arrival. ITU-R BT.1359 finds audio
ahead by 45 ms detectable and by 90 ms unacceptable, while audio late is tolerated up to 125/185 ms: so the audio
waits for the video's delay, within a bound, and never the other way round.

``AudioHold`` is pure logic (no clock, no I/O): the janus stage feeds it the age of each picture it sends and asks
when each audio packet may go (monotonic seconds), then schedules the push itself.
"""

from __future__ import annotations

import collections
import statistics

# The video's delay is the median age of the pictures sent over about a second (15-30 fps).
VIDEO_AGE_WINDOW = 25
# Pictures older than this (video stopped: a held call, an audio-only answer) say nothing about the video's delay.
VIDEO_AGE_FRESH_S = 2.0
# Never hold audio longer than this: beyond it the video is not late, it is broken, and audio must not suffer.
MAX_AUDIO_HOLD_S = 0.25
# Below this the hold is not worth a timer.
MIN_AUDIO_HOLD_S = 0.002
# An age outside 0..this is no delay through this bridge but a capture time from another clock (a producer that set
# none, another host's): it neither moves the video's delay nor holds audio.
MAX_SANE_AGE_S = 10.0


class AudioHold:
    """When each audio packet may leave so that audio and video left the bridge equally long after capture."""

    def __init__(self, max_hold_s: float = MAX_AUDIO_HOLD_S) -> None:
        self.max_hold_s = max_hold_s
        self._video: collections.deque[tuple[float, float]] = collections.deque(maxlen=VIDEO_AGE_WINDOW)
        self._last_release_s = float("-inf")
        self.held = 0  # audio packets that waited
        self.capped = 0  # audio packets whose wanted hold exceeded max_hold_s

    def video_sent(self, now_s: float, age_s: float) -> None:
        """A picture captured ``age_s`` ago leaves now."""
        if 0.0 <= age_s <= MAX_SANE_AGE_S:
            self._video.append((now_s, age_s))

    def video_delay_s(self, now_s: float) -> float | None:
        """The video's current delay from capture to leaving, or None while no picture left recently."""
        fresh = [age for at, age in self._video if now_s - at <= VIDEO_AGE_FRESH_S]
        return statistics.median(fresh) if fresh else None

    def release_at(self, now_s: float, age_s: float) -> float:
        """The time an audio packet captured ``age_s`` ago should leave (>= now_s, never before an earlier one)."""
        video = self.video_delay_s(now_s)
        hold = 0.0 if video is None or not 0.0 <= age_s <= MAX_SANE_AGE_S else video - age_s
        if hold > self.max_hold_s:
            self.capped += 1
            hold = self.max_hold_s
        at = now_s + hold if hold >= MIN_AUDIO_HOLD_S else now_s
        at = max(at, self._last_release_s)  # the audio's order is never changed
        self._last_release_s = at
        if at > now_s:
            self.held += 1
        return at

    def reset(self) -> None:
        """A new call: the last one's pictures say nothing about this one."""
        self._video.clear()
        self._last_release_s = float("-inf")
