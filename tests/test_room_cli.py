"""`sipbridge room participant` starts exactly the participants asked for (no browser started here)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from sipbridge.cli import cli


@pytest.mark.parametrize("engine", ["chromium", "aiortc"])
def test_a_viewer_alone_publishes_nothing(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sipbridge.room.cheap as cheap
    import sipbridge.room.participant as participant

    started: list[tuple[str, bool]] = []

    async def fake_chromium(room_url: str, room: int, specs: list[Any], **_: Any) -> int:
        started.extend((spec.name, spec.publish) for spec in specs)
        return 0

    async def fake_aiortc(room_url: str, room: int, publishers: list[Any], viewers: list[str], **_: Any) -> int:
        started.extend([(spec.name, True) for spec in publishers] + [(name, False) for name in viewers])
        return 0

    monkeypatch.setattr(participant, "run_participants", fake_chromium)
    monkeypatch.setattr(cheap, "run_cheap", fake_aiortc)
    runner = CliRunner()

    def run(*args: str) -> list[tuple[str, bool]]:
        started.clear()
        result = runner.invoke(cli, ["room", "participant", "--engine", engine, *args])
        assert result.exit_code == 0, result.output
        return sorted(started)

    assert run("--viewer", "watcher") == [("watcher", False)]
    assert run() == [("alice", True)]
    assert run("--name", "bob", "--viewer", "watcher") == [("bob", True), ("watcher", False)]
