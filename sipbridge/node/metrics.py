"""The node's /metrics: built at scrape time from the node's calls, so a call that ended leaves no stale series.

Per call and stage the figures are the stages' own (frames, drops and errors by reason, latency p50/p95 from
capture); a stage restarted by supervisord starts its counters again from zero, which Prometheus reads as a
counter reset.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sipbridge.node.service import Node

# Where a bridged call's latency from capture is read, per direction (as bench_calls does): room -> SIP at the
# janus stage's input (the composed picture and the mix), SIP -> room at the browser stage's input.
DIRECTION_STREAMS = {
    ("janus", "room-video"): ("room_to_sip", "video"),
    ("janus", "room-audio"): ("room_to_sip", "audio"),
    ("browser", "sip-video"): ("sip_to_room", "video"),
    ("browser", "sip-audio"): ("sip_to_room", "audio"),
}


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        slots = GaugeMetricFamily("sipbridge_node_slots", "Calls this node takes at once.")
        slots.add_metric([], node.settings.slots)
        free = GaugeMetricFamily("sipbridge_node_free_slots", "Slots not in use.")
        free.add_metric([], node.free_slots())
        draining = GaugeMetricFamily("sipbridge_node_draining", "1 while the node drains (admits no call).")
        draining.add_metric([], 1 if node.draining else 0)
        cpu = GaugeMetricFamily("sipbridge_node_cpu_busy_ratio", "Host CPU busy, 0..1 of all cores.")
        cpu.add_metric([], node.cpu_busy)
        ceiling = GaugeMetricFamily("sipbridge_node_cpu_ceiling_ratio", "Host CPU above which calls are refused.")
        ceiling.add_metric([], node.settings.cpu_ceiling)
        active = GaugeMetricFamily("sipbridge_calls_active", "Calls whose processes run.", labels=["state"])
        for state in ("starting", "running", "stopping"):
            active.add_metric([state], sum(1 for c in node.calls.values() if c.state == state))
        started = CounterMetricFamily("sipbridge_calls_started", "Calls admitted.", labels=["kind"])
        for kind, count in sorted(node.started.items()):
            started.add_metric([kind], count)
        ended = CounterMetricFamily("sipbridge_calls_ended", "Calls ended, by reason.", labels=["reason"])
        for reason, count in sorted(node.ended.items()):
            ended.add_metric([reason], count)
        rejected = CounterMetricFamily("sipbridge_calls_rejected", "Calls refused: full, cpu, draining, invalid.",
                                       labels=["reason"])
        for reason, count in sorted(node.rejected.items()):
            rejected.add_metric([reason], count)
        yield from (slots, free, draining, cpu, ceiling, active, started, ended, rejected)

        call_cpu = GaugeMetricFamily("sipbridge_call_cpu_cores", "CPU of the call's processes (cores).",
                                     labels=["call"])
        call_mem = GaugeMetricFamily("sipbridge_call_memory_bytes", "Memory (PSS) of the call's processes.",
                                     labels=["call"])
        call_procs = GaugeMetricFamily("sipbridge_call_processes", "Live processes of the call.", labels=["call"])
        frames_in = CounterMetricFamily("sipbridge_call_stage_frames_in", "Frames a stage received.",
                                        labels=["call", "stage"])
        frames_out = CounterMetricFamily("sipbridge_call_stage_frames_out", "Frames a stage sent.",
                                         labels=["call", "stage"])
        drops = CounterMetricFamily("sipbridge_call_stage_drops", "Messages a stage dropped, by reason.",
                                    labels=["call", "stage", "reason"])
        errors = CounterMetricFamily("sipbridge_call_stage_errors", "Errors a stage reported, by code.",
                                     labels=["call", "stage", "code"])
        latency = GaugeMetricFamily("sipbridge_call_stage_latency_ms",
                                    "Latency from capture to this stage over its recent frames, per stream.",
                                    labels=["call", "stage", "stream", "quantile"])
        sip_up = GaugeMetricFamily("sipbridge_call_sip_media_up", "1 while the call's SIP media is up.",
                                   labels=["call"])
        direction = GaugeMetricFamily("sipbridge_call_latency_ms",
                                      "A bridged call's latency from capture, per direction, over recent frames.",
                                      labels=["call", "direction", "media", "quantile"])
        for call in list(node.calls.values()):
            if call.state == "ended":
                continue
            call_cpu.add_metric([call.id], call.cpu_cores)
            call_mem.add_metric([call.id], call.memory_bytes)
            call_procs.add_metric([call.id], len(call.processes))
            sip = call.sip()
            if sip is not None:
                sip_up.add_metric([call.id], 1 if sip.get("state") == "media_up" else 0)
            for stage, fig in sorted(call.figures().items()):
                streams = fig.get("streams", {}) if isinstance(fig.get("streams"), dict) else {}
                frames_in.add_metric([call.id, stage], sum(int(s.get("frames_in", 0)) for s in streams.values()))
                frames_out.add_metric([call.id, stage], sum(int(s.get("frames_out", 0)) for s in streams.values()))
                for reason, count in sorted(fig.get("drops", {}).items()):
                    drops.add_metric([call.id, stage, reason], count)
                for code, count in sorted(fig.get("errors", {}).items()):
                    errors.add_metric([call.id, stage, code], count)
                for stream, s in sorted(streams.items()):
                    way = DIRECTION_STREAMS.get((stage, stream)) if call.plan.kind == "bridge" else None
                    for quantile, key in (("0.5", "latency_ms_p50"), ("0.95", "latency_ms_p95")):
                        if s.get(key) is not None:
                            latency.add_metric([call.id, stage, stream, quantile], s[key])
                            if way is not None:
                                direction.add_metric([call.id, *way, quantile], s[key])
        yield from (call_cpu, call_mem, call_procs, sip_up, frames_in, frames_out, drops, errors, latency, direction)


def registry_for(node: Node) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    ProcessCollector(namespace="sipbridge_node", registry=registry)  # the node process itself
    return registry
