"""The bridge's graph as data: the packaged layout, transforms and commands inserted from the bridge file only."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from sipbridge.bridge import BridgeConfigError, bridge_graph, bridge_stages, parse_bridge
from sipbridge.graph import Graph, GraphError, graph_from_data, read_layout
from sipbridge.supervise import StageSpec, render_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bridge-local.toml"


def example() -> dict:
    return tomllib.loads(EXAMPLE.read_text())


def chain(specs: list[StageSpec], start: str) -> list[str]:
    """Stage names from ``start`` downstream, following each stage's single consumer, until the ring closes."""
    consumers = {i: s.name for s in specs for i in s.inputs}
    names = [start]
    while (nxt := consumers.get(names[-1])) is not None and nxt not in names:
        names.append(nxt)
    return names


def command_of(conf: str, program: str) -> list[str]:
    section = conf.split(f"[program:{program}]", 1)[1]
    return shlex.split(next(line for line in section.splitlines() if line.startswith("command="))[8:])


def test_the_packaged_layout_is_the_bridged_call(tmp_path: Path) -> None:
    specs = bridge_stages(parse_bridge(example()), tmp_path)
    assert chain(specs, "browser") == ["browser", "room-decoder", "room-transformer", "sip-encoder", "janus",
                                       "sip-decoder"]
    layout = read_layout("bridge")
    assert set(layout["insert"]) == {"to_sip", "to_sip_composite", "to_room"}
    # Every stage of the layout's kinds is a registered stage kind.
    from sipbridge.cli import stage_kinds

    assert {s.kind for s in specs if s.kind} <= set(stage_kinds())


def test_transforms_are_inserted_on_either_direction_from_the_bridge_file(tmp_path: Path) -> None:
    data = example()
    data["room_side"] = {"split": "2x1"}
    data["transform"] = [
        {"name": "overlay", "video": "plugin:my_overlays:NameClock:big"},
        {"at": "to_sip", "audio": ["resample:16000"]},
        {"at": "to_sip_composite", "name": "logo", "kind": "transformer", "args": ["--video", "entry:logo"]},
        {"at": "to_room", "name": "mirror", "command": "/opt/mirror --name {name} {in} --out ipc://{run_dir}/x"},
    ]
    specs = bridge_stages(parse_bridge(data), tmp_path)
    by_name = {s.name: s for s in specs}
    assert chain(specs, "browser") == ["browser", "room-decoder", "overlay", "transform-2", "room-transformer",
                                       "logo", "sip-encoder", "janus", "sip-decoder", "sip-transformer", "mirror"]
    assert by_name["browser"].inputs == ["mirror"]  # the split first, then the bridge file's to_room stages
    assert by_name["overlay"].args == ["--video", "plugin:my_overlays:NameClock:big"]
    assert by_name["transform-2"].args == ["--audio", "resample:16000"]
    assert all(s.live for s in specs)
    conf = render_config(specs, tmp_path)
    assert command_of(conf, "overlay")[-4:] == ["--in", f"ipc://{tmp_path}/room-decoder.sock",
                                                "--video", "plugin:my_overlays:NameClock:big"]
    assert command_of(conf, "room-transformer")[7:9] == ["--in", f"ipc://{tmp_path}/transform-2.sock"]
    assert command_of(conf, "mirror") == ["/opt/mirror", "--name", "mirror", "--in",
                                          f"ipc://{tmp_path}/sip-transformer.sock", "--out", f"ipc://{tmp_path}/x"]
    # Each inserted stage starts after its consumer and before its producer, as the layout's own stages do.
    order = [s.name for s in specs]
    for name in ("overlay", "transform-2", "logo", "mirror"):
        spec = by_name[name]
        consumer = next(s.name for s in specs if name in s.inputs)
        assert order.index(consumer) < order.index(name) < order.index(spec.inputs[0]), (name, order)


def test_any_command_in_a_stage_s_place_keeps_its_edges_and_secrets(tmp_path: Path) -> None:
    data = example()
    data["sip"].update(register="digest", proxy="sip:127.0.0.1:5070", secret="env:SB_GRAPH_SECRET")
    data["stages"] = {"janus": {"command": "/opt/my-sip-leg {in}"}, "sip-encoder": {"args": ["--gop", "60"]}}
    specs = {s.name: s for s in bridge_stages(parse_bridge(data), tmp_path)}
    assert specs["janus"].command == f"/opt/my-sip-leg --in ipc://{tmp_path}/sip-encoder.sock"
    assert specs["janus"].kind is None
    assert specs["janus"].secrets["SIPBRIDGE_STAGE_JANUS_SECRET"] == "SB_GRAPH_SECRET"
    assert specs["sip-decoder"].inputs == ["janus"]
    assert specs["sip-encoder"].args[-2:] == ["--gop", "60"]
    conf = render_config(list(specs.values()), tmp_path)
    assert "-m sipbridge.secretenv" in next(line for line in conf.splitlines() if "/opt/my-sip-leg" in line)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"transform": [{"video": "sharpen"}]}, "transform[1].video: unknown transform 'sharpen'"),
        ({"transform": [{"video": "plugin:nomodule"}]}, "must be plugin:MODULE:ATTR[:ARG]"),
        ({"transform": [{"at": "middle", "video": "identity"}]}, "transform[1].at must be one of to_room, to_sip"),
        ({"transform": [{"video": "identity", "command": "x"}]}, "give exactly one of video/audio"),
        ({"transform": [{}]}, "give exactly one of video/audio"),
        ({"transform": [{"kind": "juggler"}]}, "transform[1].kind must be a stage kind"),
        ({"transform": [{"kind": "fused"}]}, "transform[1].kind must be a stage kind"),
        ({"transform": [{"name": "janus", "video": "identity"}]}, "stage name 'janus' is used twice"),
        ({"transform": [{"name": "a b", "video": "identity"}]}, "transform[1].name must be a word"),
        ({"transform": [{"command": "x", "args": ["y"]}]}, "transform[1].args are for a kind"),
        ({"stages": {"mixer": {"command": "x"}}}, "stages.mixer: the bridge has no stage 'mixer'"),
        ({"stages": {"janus": {"colour": "red"}}}, "unknown key stages.janus.colour"),
        ({"stages": {"janus": {"args": [1]}}}, "stages.janus.args must be a string or a list of strings"),
    ],
)
def test_bad_insertions_name_the_key(change: dict, message: str) -> None:
    data = example()
    data.update(change)
    with pytest.raises(BridgeConfigError, match=re.escape(message)):
        parse_bridge(data)


def test_a_stage_kind_registered_as_an_entry_point_is_a_kind(monkeypatch) -> None:
    import importlib.metadata

    from sipbridge import cli

    real = importlib.metadata.entry_points

    def entry_points(group: str):  # type: ignore[no-untyped-def]
        if group == cli.STAGE_ENTRY_POINTS:
            return [importlib.metadata.EntryPoint("juggler", "my_pkg.juggler:command", group)]
        return real(group=group)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert cli.stage_kinds()["juggler"] == "my_pkg.juggler:command"
    data = example()
    data["transform"] = [{"kind": "juggler", "args": ["--balls", "3"]}]
    graph = bridge_graph(parse_bridge(data))
    assert graph.stage("transform-1").kind == "juggler"


def test_a_layout_in_data_checks_its_edges(tmp_path: Path) -> None:
    data = {"stage": [{"name": "a", "kind": "source"}, {"name": "b", "kind": "sink", "inputs": ["c"]}]}
    with pytest.raises(GraphError, match="stage 'b' reads from unknown stage 'c'"):
        graph_from_data(data)
    data = {"stage": [{"name": "a", "kind": "source"}, {"name": "b", "kind": "sink", "inputs": ["a"]}],
            "insert": {"mid": {"producer": "a", "consumer": "b"}}}
    graph = graph_from_data(data)
    graph.insert("mid", StageSpec("t", "transformer"))
    assert isinstance(graph, Graph) and [s.inputs for s in graph.stages] == [[], ["t"], ["a"]]
    assert "[program:t]" in graph.render(tmp_path)
    with pytest.raises(GraphError, match="no insertion point 'end'"):
        graph.insert("end", StageSpec("u", "transformer"))
