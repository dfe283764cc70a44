"""What the cluster layer needs from a node: the ``CallRunner`` interface.

The cluster layer (SIP front for Kamailio, Redis Streams worker) never starts processes itself; it asks
the node's runner. ``sipbridge node`` (issue 12) implements this over its own call manager;
``sipbridge.cluster.holdnode.HoldRunner`` implements it with hold calls (SIP + RTP, no browser) for
placement tests and benches.

Contract:

* ``snapshot()`` is cheap and synchronous (the SIP front answers every OPTIONS probe from it).
* ``start_call(call_id, config)`` starts an API-started call under the cluster's id, or raises
  ``CallRejected`` (no slot, draining, invalid config: the reason is shown to the submitter).
* ``screen(caller)`` says whether the node's rules refuse an INVITE from this caller URI (a ``CallRejected``
  with its SIP code, e.g. 403) before any slot is looked at; None lets it through.
* ``start_inbound(call_id, caller)`` reserves a slot for an INVITE the front accepted and returns the
  (host, port) of a fresh SIP user agent that will answer it; the front proxies the INVITE there. Raises
  ``CallRejected`` (its ``status`` is the SIP answer: 503 by default, so Kamailio tries the next node).
* ``call_state(call_id)`` says where a call is; the cluster polls it (about once a second) to acknowledge
  ended calls. ``None`` means the node does not know the id (any more).
* ``stop_call(call_id)`` hangs up (BYE) and releases the slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

# Call states a runner reports; "ended" and "failed" are final.
STARTING, UP, ENDED, FAILED = "starting", "up", "ended", "failed"
FINAL_STATES = (ENDED, FAILED)


class CallRejected(Exception):
    """The node will not take this call; ``reason`` is for the submitter and the logs."""

    def __init__(self, reason: str, *, retry: bool = True, status: int = 503, sip_reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        # retry=False: the call itself is bad (invalid config); no other node would do better.
        self.retry = retry
        # The SIP answer to a refused INVITE: 503 (full, draining: another node may take it) unless said.
        self.status = status
        self.sip_reason = sip_reason or ("Service Unavailable" if status == 503 else "")


@dataclass(frozen=True)
class NodeSnapshot:
    node_id: str
    slots: int
    active: int
    draining: bool

    @property
    def free(self) -> int:
        return max(0, self.slots - self.active)

    @property
    def admitting(self) -> bool:
        return not self.draining and self.free > 0


@dataclass
class CallStatus:
    state: str  # STARTING, UP, ENDED or FAILED
    reason: str = ""
    since_s: float = 0.0  # time.time() of the last state change
    detail: dict[str, Any] | None = None


class CallRunner(Protocol):
    def snapshot(self) -> NodeSnapshot: ...

    async def start_call(self, call_id: str, config: dict[str, Any]) -> None: ...

    def screen(self, caller: str) -> CallRejected | None: ...

    async def start_inbound(self, call_id: str, caller: str = "") -> tuple[str, int]: ...

    def call_state(self, call_id: str) -> CallStatus | None: ...

    async def stop_call(self, call_id: str) -> None: ...
