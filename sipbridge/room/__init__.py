"""The local room that stands in for a CPaaS: Janus VideoRoom, a small conference page, synthetic participants.

``sipbridge room serve`` serves the page; ``sipbridge room participant`` starts test-pattern participants.
"""

from __future__ import annotations

import asyncio
import logging

import click

from sipbridge.room.server import DEFAULT_JANUS_WS


@click.group()
def command() -> None:
    """The local conference room (Janus VideoRoom) and its synthetic participants."""


@command.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8480, show_default=True)
@click.option("--janus", "janus_url", default=DEFAULT_JANUS_WS, show_default=True,
              help="Janus WebSocket URL the page connects to.")
def serve(host: str, port: int, janus_url: str) -> None:
    """Serve the room page (Janus must run separately, see `sipbridge janus-server`)."""
    from sipbridge.room.server import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [room] %(message)s")
    run_server(host, port, janus_url)


@command.command()
@click.option("--room-url", default="http://127.0.0.1:8480/", show_default=True)
@click.option("--room", type=int, default=1234, show_default=True)
@click.option("--name", "names", multiple=True, default=["alice"], show_default=True,
              help="Display name of a participant (repeat for several in one browser).")
@click.option("--tone", "tones", type=float, multiple=True, default=[440.0], show_default=True,
              help="Tone of each participant in Hz (same order as --name; the last repeats).")
@click.option("--viewer", "viewers", multiple=True, help="A receive-only participant (repeatable).")
@click.option("--janus", default=None, help="Override the Janus URL the page uses.")
@click.option("--codec", type=click.Choice(["h264", "vp8", "vp9"]), default="h264", show_default=True)
@click.option("--size", default="640x480", show_default=True)
@click.option("--fps", type=int, default=30, show_default=True)
@click.option("--probe/--no-probe", default=False, help="Report received counters and tones as JSON lines.")
@click.option("--duration", type=float, default=None, help="Leave after this many seconds (default: until SIGTERM).")
@click.option("--sync-marks", is_flag=True, default=False,
              help="Lip-sync marks: every 2 s a bright bottom band and a 2.5 kHz burst at the same instant.")
def participant(room_url: str, room: int, names: tuple[str, ...], tones: tuple[float, ...], viewers: tuple[str, ...],
                janus: str | None,
                codec: str, size: str, fps: int, probe: bool, duration: float | None, sync_marks: bool) -> None:
    """Join synthetic participants that publish a frame-counter pattern and a tone."""
    from sipbridge.room.participant import ParticipantSpec, run_participants

    width, _, height = size.partition("x")
    specs = [ParticipantSpec(name, tones[min(i, len(tones) - 1)]) for i, name in enumerate(names)]
    specs += [ParticipantSpec(name, 0.0, publish=False) for name in viewers]
    raise SystemExit(asyncio.run(run_participants(room_url, room, specs, janus=janus, codec=codec, width=int(width),
                                                  height=int(height), fps=fps, probe=probe, duration_s=duration,
                                                  sync_marks=sync_marks)))
