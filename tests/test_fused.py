"""Process boundaries as configuration: adjacent stages in one process (stages/fused.py), same edges, same media."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from sipbridge.bridge import BridgeConfigError, bridge_stages, parse_bridge
from sipbridge.graph import GraphError, graph_from_data
from sipbridge.supervise import render_config
from tests.stagehelp import SIPBRIDGE, stage_procs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bridge-local.toml"
FRAMES = 45
# Every process of the chain exits after its end of stream; a loaded 2-core machine was seen taking 40 s for it all.
EXIT_TIMEOUT_S = 90.0


@pytest.mark.timeout(120)
def test_an_encoder_and_a_decoder_in_one_process_deliver_every_frame_and_end_cleanly(tmp_path: Path) -> None:
    """source -> [encoder + decoder, one process] -> sink: what the sink reads is what separate processes give
    (every counter in order, the tone), and the fused process ends with its inputs, exit 0."""
    report = tmp_path / "report.json"
    with stage_procs(tmp_path) as procs:
        procs.start("sink", "sink", "--in", procs.endpoint("decoder"), "--report", str(report), "--video-policy", "all")
        log = open(tmp_path / "fused.log", "wb")  # noqa: SIM115 - closed with the process
        procs.procs["fused"] = subprocess.Popen(
            [*SIPBRIDGE, "stage", "fused",
             "--stage", f"encoder --name encoder --in {procs.endpoint('source')} --video-codec vp8 --audio-codec opus "
                        "--video-policy all",
             "--stage", f"decoder --name decoder --in {procs.endpoint('encoder')} --video-policy all"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SIPBRIDGE_RUN_DIR": str(tmp_path)},
        )  # fmt: skip
        procs.start("source", "source", "--frames", str(FRAMES), "--width", "320", "--height", "240",
                    "--video-policy", "all")
        codes = procs.wait_all(EXIT_TIMEOUT_S)
        fused_log = procs.log("fused")
    assert codes == {"sink": 0, "fused": 0, "source": 0}, (codes, fused_log[-2000:])
    # Both stages ran, each under its own name, with its own codec thread.
    assert "[encoder] started" in fused_log and "[decoder] started" in fused_log, fused_log[-2000:]
    summary = json.loads(report.read_text())
    video = summary["video"]["video0"]
    assert video["frames"] == FRAMES and (video["first_counter"], video["last_counter"]) == (0, FRAMES - 1)
    assert video["missing"] == video["out_of_order"] == video["duplicates"] == video["unreadable"] == 0
    assert abs(summary["audio"]["audio0"]["frequency_hz"] - 440.0) < 1.0


def test_a_bridge_file_fuses_adjacent_stages_into_one_program(tmp_path: Path, monkeypatch) -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    data["transform"] = [{"name": "overlay", "video": "plugin:stages.overlay:NameClock"}]
    data["processes"] = {"fuse": [["room-decoder", "overlay", "room-transformer", "sip-encoder"]]}
    specs = bridge_stages(parse_bridge(data), tmp_path)
    names = [s.name for s in specs]
    assert "room-decoder+overlay+room-transformer+sip-encoder" in names
    assert not {"room-decoder", "overlay", "room-transformer", "sip-encoder"} & set(names)
    # Consumers still start first: the fused group where its first member was, janus (its consumer) before it.
    assert names.index("janus") < names.index("room-decoder+overlay+room-transformer+sip-encoder")
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "supervisord.conf"
    conf.write_text(render_config(specs, tmp_path))
    monkeypatch.setenv("SIPBRIDGE_PYTHON", sys.executable)
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    commands = {p.name: p.command for g in options.process_group_configs for p in g.process_configs}
    argv = shlex.split(commands["room-decoder+overlay+room-transformer+sip-encoder"])
    assert argv[:5] == [sys.executable, "-m", "sipbridge", "stage", "fused"]
    lines = [shlex.split(argv[i + 1]) for i, a in enumerate(argv) if a == "--stage"]
    assert [line[:3] for line in lines] == [["decoder", "--name", "room-decoder"], ["transformer", "--name", "overlay"],
                                           ["transformer", "--name", "room-transformer"],
                                           ["encoder", "--name", "sip-encoder"]]
    assert lines[1][3:] == ["--in", f"ipc://{tmp_path}/room-decoder.sock", "--video", "plugin:stages.overlay:NameClock"]
    # The janus stage still reads the encoder's socket, which the fused process binds under the encoder's name.
    assert f"ipc://{tmp_path}/sip-encoder.sock" in shlex.split(commands["janus"])


@pytest.mark.parametrize(
    "fuse, message",
    [
        ([["room-decoder", "sip-encoder"]], "'sip-encoder' does not read from 'room-decoder'"),
        ([["browser", "room-decoder"]], "'browser' cannot share a process"),
        ([["room-decoder"]], "a group is at least two stages"),
        ([["room-decoder", "room-transformer"], ["room-transformer", "sip-encoder"]], "'room-transformer' is in two"),
        ([["room-decoder", "mixer"]], "no stage named 'mixer'"),
    ],
)
def test_only_chains_of_project_stages_are_fused(fuse: list[list[str]], message: str) -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    data["processes"] = {"fuse": fuse}
    with pytest.raises(BridgeConfigError, match=re.escape(message)):
        parse_bridge(data)


def test_a_layout_may_fuse_too() -> None:
    data = {"stage": [{"name": "a", "kind": "source"}, {"name": "b", "kind": "transformer", "inputs": ["a"]},
                      {"name": "c", "kind": "sink", "inputs": ["b"]}], "fuse": [["a", "b"]]}
    assert graph_from_data(data).fused == [["a", "b"]]
    with pytest.raises(GraphError, match="fuse must be a list"):
        graph_from_data({**data, "fuse": "a,b"})
