"""The node as the cluster layer's ``CallRunner`` (sipbridge.cluster.runner): what the Redis Streams agent and
the SIP front call to start, follow and stop calls on this node.

Mapping: a node over its CPU ceiling reports itself full (``active == slots``), so the cluster sends it nothing;
a call is ``up`` from the moment its processes run (``detail`` carries the SIP state) until it has ended; it
ended ``ended`` when it finished, was stopped or drained, ``failed`` when it could not start or its SIP call or
a stage failed.
"""

from __future__ import annotations

from typing import Any

from sipbridge.cluster.runner import ENDED, FAILED, STARTING, UP, CallRejected, CallStatus, NodeSnapshot
from sipbridge.node.calls import CallRequestError, RunFolderInUse
from sipbridge.node.service import Node, Refused

FAILED_REASONS = {"failed", "start_failed", "sip_failed", "supervisor_exited"}


class NodeRunner:
    def __init__(self, node: Node) -> None:
        self.node = node

    def snapshot(self) -> NodeSnapshot:
        node = self.node
        active = len(node.active())
        refused = node.refusal()
        if refused is not None and refused.reason == "cpu":
            active = max(active, node.settings.slots)
        return NodeSnapshot(node.name, node.settings.slots, active, node.draining)

    async def start_call(self, call_id: str, config: dict[str, Any]) -> None:
        existing = self.node.calls.get(call_id)
        if existing is not None and existing.state != "ended":
            return  # delivered twice: the call already runs here
        try:
            plan = self.node.plan(config)
        except CallRequestError as exc:
            raise CallRejected(str(exc), retry=False) from None
        try:
            await self.node.start_call(plan, call_id)
        except Refused as exc:
            raise CallRejected(str(exc), retry=True) from None
        except ValueError as exc:
            raise CallRejected(str(exc), retry=False) from None
        except (RunFolderInUse, OSError, RuntimeError) as exc:
            raise CallRejected(f"could not start here: {exc}", retry=True) from None

    async def start_inbound(self, call_id: str) -> tuple[str, int]:
        # Inbound calls (one SIP identity per node, a pipeline per INVITE) are not run by the node yet.
        raise CallRejected("this node takes API-started calls only", retry=True)

    def call_state(self, call_id: str) -> CallStatus | None:
        call = self.node.calls.get(call_id)
        if call is None:
            return None
        if call.state == "starting":
            state = STARTING
        elif call.state != "ended":
            state = UP
        else:
            state = FAILED if call.end_reason in FAILED_REASONS else ENDED
        sip = call.sip() or {}
        reason = call.end_reason or ""
        if call.error:
            reason = f"{reason}: {call.error}" if reason else call.error
        return CallStatus(state, reason, call.since, {"node_state": call.state, "sip_state": sip.get("state"),
                                                      "sip_code": sip.get("code")})

    async def stop_call(self, call_id: str) -> None:
        call = self.node.calls.get(call_id)
        if call is not None and call.state != "ended":
            await self.node.stop_call(call, "deleted")
