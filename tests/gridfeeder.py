"""A stand-in for the room decoder, as its own process (so a test can SIGSTOP it): binds where a transformer's
``--in`` connects and sends each participant's test pattern at that participant's rate, on a wall-clock schedule.
After a stall it sends every frame that fell due meanwhile at once, as a decoder working off its backlog would.

    python -m tests.gridfeeder ENDPOINT alice:15 bob:10 carol:6 [--size 320x240]

Participant i (from 1) sends ``{name}/video`` frames whose counter reads 1000 * i + n. SIGTERM ends the streams.
"""

from __future__ import annotations

import signal
import sys
import time
from fractions import Fraction

from protocol import EndOfStream, MediaHeader, VideoFrame
from stages.pattern import PatternGenerator
from tests.stagehelp import Feeder

COUNTER_PER_PERSON = 1000


def main(argv: list[str]) -> int:
    endpoint, *rest = argv
    width, height = 320, 240
    if "--size" in rest:
        at = rest.index("--size")
        width, height = (int(v) for v in rest[at + 1].split("x"))
        del rest[at : at + 2]
    people = [(name, float(fps)) for name, fps in (p.split(":") for p in rest)]
    feeder = Feeder(endpoint)
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    patterns = [PatternGenerator(width, height, i + 1) for i in range(len(people))]
    sent = [0] * len(people)
    start = time.monotonic()
    while not stop:
        now = time.monotonic()
        for i, (name, fps) in enumerate(people):
            while start + sent[i] / fps <= now:  # every frame due by now, a backlog after a stall included
                counter = COUNTER_PER_PERSON * (i + 1) + sent[i]
                header = MediaHeader(f"{name}/video", sent[i], round(sent[i] * 90000 / fps), Fraction(1, 90000),
                                     time.time_ns())
                feeder.send(VideoFrame(header, width, height, patterns[i].frame(counter)))
                sent[i] += 1
        due = min(start + sent[i] / fps for i, (_, fps) in enumerate(people))
        time.sleep(max(0.0, min(0.05, due - time.monotonic())))
    feeder.send(EndOfStream(""))
    feeder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
