"""A pipeline as a graph in data: stages (nodes) and the edges between them, and the one step to supervisord.

A node is a ``StageSpec``: a stage kind (``sipbridge stage KIND``) or any command, its arguments, and its
``inputs`` (the edges into it: every stage binds its own output and connects to its producers'). A layout file
(``sipbridge/pipelines/*.toml``, package data) describes a graph::

    live = true                      # runs until stopped (a bridge)

    [[stage]]
    name = "room-decoder"            # the process's name, its socket and its log
    kind = "decoder"                 # or command = "..." for any program in its place
    inputs = ["browser"]
    args = ["--hwm", "64"]           # fixed arguments
    args_from = "room-decoder"       # arguments a builder computes from the configuration (bridge.py)
    when = "start_janus"             # only when this condition holds
    priority = 10                    # supervisord priority; default: derived from the order

    fuse = [["room-decoder", "room-transformer"]]   # adjacent stages that share one process (stages/fused.py)

    [insert.to_sip]                  # a named edge where transforms may be inserted
    producer = "room-decoder"
    consumer = "room-transformer"

``Graph.insert`` puts a stage on a named edge (after what was inserted there before), ``Graph.replace`` puts a
command in a stage's place, ``Graph.fuse`` runs a chain of adjacent stages in one process, and ``render`` is the
one generic step from any graph to a supervisord configuration.
The order of the stages is the start order reversed (earlier stages start later and stop earlier).
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from sipbridge.supervise import GROUP_STOP_KINDS, StageSpec, config_quote, render_config

STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
LAYOUT_PACKAGE = "sipbridge.pipelines"
STAGE_KEYS = {"name", "kind", "command", "args", "args_from", "inputs", "when", "priority"}


class GraphError(ValueError):
    """A graph (or a layout file) that cannot run; the message names the stage or key."""


@dataclass
class Edge:
    """The edge ``producer -> consumer``; an insertion point names one."""

    producer: str
    consumer: str


@dataclass
class Graph:
    stages: list[StageSpec]
    points: dict[str, Edge] = field(default_factory=dict)
    # Groups of adjacent stages that run in one process (stages/fused.py), each upstream first.
    fused: list[list[str]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise GraphError(f"no stage named {name!r} (the stages: {', '.join(self.names())})")

    def insert(self, point: str, spec: StageSpec) -> None:
        """Put ``spec`` on the edge ``point`` names, after the stages inserted there before (nearest the consumer).

        In the list it goes right after its consumer: it starts before its producer and after its consumer,
        as every stage on a chain does.
        """
        if point not in self.points:
            raise GraphError(f"no insertion point {point!r} (the points: {', '.join(sorted(self.points))})")
        if spec.name in self.names():
            raise GraphError(f"stage name {spec.name!r} is used twice")
        edge = self.points[point]
        consumer = self.stage(edge.consumer)
        if edge.producer not in consumer.inputs:
            raise GraphError(f"insertion point {point!r}: {edge.consumer!r} does not read from {edge.producer!r}")
        consumer.inputs[consumer.inputs.index(edge.producer)] = spec.name
        spec.inputs = [edge.producer]
        self.stages.insert(self.stages.index(consumer) + 1, spec)
        for other in self.points.values():  # every point on this edge now ends at the new stage
            if other.producer == edge.producer and other.consumer == edge.consumer and other is not edge:
                other.consumer = spec.name
        self.points[point] = Edge(spec.name, edge.consumer)

    def replace(self, name: str, command: str) -> None:
        """Run ``command`` in the stage's place; it keeps the stage's name, edges, secrets and environment.

        In the command, ``{run_dir}`` is the run folder, ``{name}`` the stage's name (it must bind its output on
        ``ipc://{run_dir}/{name}.sock``) and ``{in}`` the ``--in ENDPOINT`` options of its producers.
        """
        spec = self.stage(name)
        spec.command, spec.kind, spec.args = command, None, []

    def fuse(self, names: list[str]) -> None:
        """Run ``names`` (a chain, upstream first: each reads from the one before) in one process."""
        if len(names) < 2:
            raise GraphError(f"fuse {names}: a group is at least two stages")
        grouped = {n for group in self.fused for n in group}
        for index, name in enumerate(names):
            spec = self.stage(name)
            if spec.kind is None or spec.kind in GROUP_STOP_KINDS or spec.kind == "fused":
                raise GraphError(f"fuse: {name!r} cannot share a process (only project stages, not the browser, "
                                 "not a command)")
            if name in grouped or names.count(name) > 1:
                raise GraphError(f"fuse: {name!r} is in two groups")
            if index and names[index - 1] not in spec.inputs:
                raise GraphError(f"fuse: {name!r} does not read from {names[index - 1]!r} (a group is a chain of "
                                 "adjacent stages, upstream first)")
        self.fused.append(list(names))

    def check(self) -> None:
        names = self.names()
        for spec in self.stages:
            if names.count(spec.name) > 1:
                raise GraphError(f"stage name {spec.name!r} is used twice")
            for upstream in spec.inputs:
                if upstream not in names:
                    raise GraphError(f"stage {spec.name!r} reads from unknown stage {upstream!r}")

    def specs(self, run_dir: Path) -> list[StageSpec]:
        """The stages to run in ``run_dir``: a command's ``{run_dir}``, ``{name}`` and ``{in}`` filled in."""
        self.check()
        out = []
        for spec in self.stages:
            spec = replace(spec, args=list(spec.args), inputs=list(spec.inputs))
            if spec.command is not None:
                inputs = shlex.join(a for upstream in spec.inputs for a in ("--in", f"ipc://{run_dir}/{upstream}.sock"))
                spec.command = (spec.command.replace("{run_dir}", str(run_dir)).replace("{name}", spec.name)
                                .replace("{in}", inputs))
            out.append(spec)
        for group in self.fused:
            members = [next(s for s in out if s.name == name) for name in group]
            at = min(out.index(m) for m in members)
            lines = []
            for m in members:
                argv = [m.kind or "", "--name", m.name]
                for upstream in m.inputs:
                    argv += ["--in", f"ipc://{run_dir}/{upstream}.sock"]
                lines.append(shlex.join([*argv, *(a.replace("{run_dir}", str(run_dir)) for a in m.args)]))
            argv = [sys.executable, "-m", "sipbridge", "stage", "fused"]
            argv += [a for line in lines for a in ("--stage", line)]
            fused = StageSpec(
                "+".join(group),
                # As supervise renders a stage's own command: quoted for supervisord, a literal % doubled.
                command=" ".join(config_quote(a) for a in argv).replace("%", "%%"),
                env={k: v for m in members for k, v in m.env.items()},
                secrets={k: v for m in members for k, v in m.secrets.items()},
                live=any(m.live for m in members),
            )
            out = [s for s in out if s not in members]
            out.insert(min(at, len(out)), fused)
        return out

    def render(self, run_dir: Path) -> str:
        """The one generic step: any graph to the supervisord configuration that runs it."""
        return render_config(self.specs(run_dir), run_dir)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GraphError(f"{where} must be a list of strings")
    return list(value)


def read_layout(name: str) -> dict[str, Any]:
    """A packaged layout (``sipbridge/pipelines/NAME.toml``) as data."""
    try:
        text = resources.files(LAYOUT_PACKAGE).joinpath(f"{name}.toml").read_text()
    except FileNotFoundError:
        raise GraphError(f"no packaged layout {name!r}") from None
    return tomllib.loads(text)


def graph_from_data(data: Mapping[str, Any], conditions: Mapping[str, bool] | None = None,
                    builders: Mapping[str, Callable[[], list[str]]] | None = None) -> Graph:
    """The graph a layout describes: stages whose ``when`` condition is false are left out; ``args_from`` names
    the builder in ``builders`` whose arguments follow the fixed ``args``."""
    conditions = conditions or {}
    builders = builders or {}
    unknown = set(data) - {"stage", "insert", "live", "fuse"}
    if unknown:
        raise GraphError(f"unknown key {sorted(unknown)[0]} in a layout (it has [[stage]], [insert.POINT], fuse "
                         "and live)")
    live = data.get("live", False)
    if not isinstance(live, bool):
        raise GraphError("live must be true or false")
    stages: list[StageSpec] = []
    for index, raw in enumerate(data.get("stage", [])):
        where = f"stage[{index}]"
        if not isinstance(raw, dict) or set(raw) - STAGE_KEYS:
            raise GraphError(f"{where} must be a table with keys among {', '.join(sorted(STAGE_KEYS))}")
        name = raw.get("name")
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
            raise GraphError(f"{where}.name must be a word of letters, digits, - and _")
        when = raw.get("when")
        if when is not None:
            if when not in conditions:
                raise GraphError(f"stage {name!r}: unknown condition {when!r}")
            if not conditions[when]:
                continue
        if ("kind" in raw) == ("command" in raw):
            raise GraphError(f"stage {name!r}: give exactly one of 'kind' or 'command'")
        args = _strings(raw.get("args", []), f"stage {name!r}.args")
        if "args_from" in raw:
            builder = builders.get(raw["args_from"])
            if builder is None:
                raise GraphError(f"stage {name!r}: no argument builder {raw['args_from']!r}")
            args += builder()
        priority = raw.get("priority")
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
            raise GraphError(f"stage {name!r}.priority must be an integer")
        stages.append(StageSpec(name, raw.get("kind"), raw.get("command"), args,
                                _strings(raw.get("inputs", []), f"stage {name!r}.inputs"), priority=priority,
                                live=live))
    points = {}
    for point, raw in data.get("insert", {}).items():
        if not isinstance(raw, dict) or set(raw) != {"producer", "consumer"}:
            raise GraphError(f"insert.{point} must have exactly producer and consumer")
        points[point] = Edge(raw["producer"], raw["consumer"])
    graph = Graph(stages, points)
    graph.check()
    fuse = data.get("fuse", [])
    if not isinstance(fuse, list):
        raise GraphError("fuse must be a list of lists of stage names")
    for group in fuse:
        graph.fuse(_strings(group, "fuse[]"))
    return graph
