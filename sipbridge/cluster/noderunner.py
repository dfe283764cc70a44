"""``CallRunner`` over ``sipbridge node``'s ``Node`` (issue 12): the cluster layer on the real node.

API-started calls from the stream become the node's own calls under the cluster's call id (same schema
and validation as ``POST /calls``); the node's admission (slots, CPU ceiling, draining) decides, and its
``snapshot()`` answers the SIP front's OPTIONS probes.

Inbound calls through the front need a SIP user agent per call whose address the front can forward the
INVITE to: a bridged call's Janus SIP handle, started per INVITE by the node's ``InboundCalls``
(sipbridge/node/inbound.py), which waits for the janus stage to report the handle's SIP address. A node
without an inbound configuration refuses INVITEs with 503 (Kamailio tries the next node).
"""

from __future__ import annotations

from typing import Any

from sipbridge.cluster.agent import AgentOptions, NodeAgent
from sipbridge.cluster.front import SipFront
from sipbridge.cluster.runner import ENDED, FAILED, STARTING, UP, CallRejected, CallStatus, NodeSnapshot
from sipbridge.cluster.streams import DEFAULT_PLACE_TIMEOUT_S, DEFAULT_PREFIX, CallStore

# The node's end reasons that mean the call failed (the rest: it finished, was hung up, stopped or drained).
FAILED_REASONS = {"failed", "start_failed", "sip_failed", "supervisor_exited"}


class NodeRunner:
    def __init__(self, node: Any) -> None:
        self.node = node  # sipbridge.node.service.Node (not imported: the node imports the cluster, not back)

    def snapshot(self) -> NodeSnapshot:
        snap = self.node.snapshot()
        # The node's own admission (slots and CPU ceiling) is the truth: a node over its CPU ceiling has no
        # free slot as far as the cluster is concerned.
        active = snap.slots - snap.free if snap.admitting or snap.draining else snap.slots
        return NodeSnapshot(snap.name, snap.slots, active, snap.draining)

    async def start_call(self, call_id: str, config: dict[str, Any]) -> None:
        from sipbridge.node.calls import CallRequestError, RunFolderInUse
        from sipbridge.node.service import Refused

        existing = self.node.calls.get(call_id)
        if existing is not None and existing.state != "ended":
            return  # delivered twice: the call already runs here
        try:
            plan = self.node.plan(config)
        except CallRequestError as exc:
            raise CallRejected(f"invalid call: {exc}", retry=False) from None
        try:
            await self.node.start_call(plan, call_id)
        except Refused as exc:
            raise CallRejected(str(exc), retry=True) from None
        except ValueError as exc:
            raise CallRejected(str(exc), retry=False) from None
        except (RunFolderInUse, OSError, RuntimeError) as exc:
            # Something of this host (a folder in use, a process that would not start): another node may do.
            raise CallRejected(f"could not start here: {exc}", retry=True) from None

    def screen(self, caller: str) -> CallRejected | None:
        inbound = self.node.inbound
        reason = inbound.screen(caller) if inbound is not None else None
        return CallRejected(reason, retry=False, status=403, sip_reason="Forbidden (caller not accepted)") \
            if reason else None

    async def start_inbound(self, call_id: str, caller: str = "") -> tuple[str, int]:
        """``call_id`` is the INVITE's SIP Call-ID; the node's call gets an id of its own."""
        from sipbridge.node.inbound import CallerRefused
        from sipbridge.node.service import Refused

        inbound = self.node.inbound
        if inbound is None:
            raise CallRejected("this node takes no inbound calls (no inbound bridge configured)")
        try:
            return await inbound.start(call_id, caller)  # type: ignore[no-any-return]
        except CallerRefused as exc:
            raise CallRejected(str(exc), retry=False, status=403, sip_reason="Forbidden (caller not accepted)") \
                from None
        except Refused as exc:
            raise CallRejected(str(exc)) from None
        except (RuntimeError, OSError, ValueError) as exc:
            raise CallRejected(f"the call could not start here: {exc}", status=500,
                               sip_reason="Server Internal Error (call could not start)") from None

    def call_state(self, call_id: str) -> CallStatus | None:
        call = self.node.calls.get(call_id)
        if call is None and self.node.inbound is not None:
            call = self.node.inbound.node_call(call_id)  # the front asks by SIP Call-ID
        if call is None:
            return None
        if call.state == "starting":
            return CallStatus(STARTING, "", call.since)
        if call.state != "ended":
            return CallStatus(UP, "", call.since)
        reason = call.end_reason or ""
        error = getattr(call, "error", None)
        if error:
            reason = f"{reason}: {error}" if reason else str(error)
        return CallStatus(FAILED if call.end_reason in FAILED_REASONS else ENDED, reason, call.since)

    async def stop_call(self, call_id: str) -> None:
        call = self.node.calls.get(call_id)
        reason = "cluster: the call was taken over by another node"
        if call is None and self.node.inbound is not None:
            call = self.node.inbound.node_call(call_id)  # the front lets go of a CANCELled INVITE's call
            reason = "cancelled"
        if call is not None and call.state != "ended":
            await self.node.stop_call(call, reason)


class ClusterMember:
    """What a node runs to be part of a cluster: the Redis agent, and the SIP front when given an address."""

    def __init__(self, agent: NodeAgent, front: SipFront | None) -> None:
        self.agent = agent
        self.front = front

    async def close(self) -> None:
        """After the node drained: record the last call ends in Redis, stop answering probes."""
        await self.agent.stop()
        if self.front is not None:
            self.front.close()


async def start_front(node: Any, host: str, port: int) -> SipFront:
    """The node's SIP front on host:port: OPTIONS answered from its admission state, INVITEs to its inbound
    calls (``node.inbound``; without one, 503)."""
    def counted(event: str, **fields: Any) -> None:
        if event == "invite_refused":  # in /metrics: sipbridge_calls_rejected_total{reason="sip_..."}
            reason = str(fields.get("reason", ""))
            kind = reason if reason in ("full", "draining") else "forbidden" if "accept_from" in reason else "refused"
            node.rejected[f"sip_{kind}"] += 1

    front = SipFront(NodeRunner(node), host, port, on_event=counted)
    await front.start()
    return front


async def join_cluster(node: Any, redis_url: str, *, node_id: str | None = None, sip: tuple[str, int] | None = None,
                       prefix: str = DEFAULT_PREFIX, stale_s: float = 6.0, refresh_s: float = 1.0,
                       api_address: str = "", front: SipFront | None = None) -> ClusterMember:
    """Make ``node`` a cluster member: it takes API-started calls from the stream while it has room, and
    (with ``sip``, or its running ``front``) answers Kamailio's OPTIONS probes and INVITEs."""
    runner = NodeRunner(node)
    own_front = front is None and sip is not None
    if front is None and sip is not None:
        front = await start_front(node, sip[0], sip[1])
    agent = NodeAgent(runner, AgentOptions(
        redis_url=redis_url, node_id=node_id or node.name, prefix=prefix, refresh_s=refresh_s, stale_s=stale_s,
        sip_address=f"sip:{front.host}:{front.port}" if front else "", api_address=api_address))
    agent.start()
    return ClusterMember(agent, front if own_front else None)


async def submit_to_cluster(redis_url: str, config: dict[str, Any], key: str | None = None,
                            place_timeout_s: float = DEFAULT_PLACE_TIMEOUT_S, prefix: str = DEFAULT_PREFIX
                            ) -> tuple[str, bool]:
    """``POST /calls`` on a cluster node: queue the call for whichever node has room; (call id, created)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        return await CallStore(client, prefix).submit(config, key, place_timeout_s)  # type: ignore[no-any-return]
    finally:
        await client.aclose()
