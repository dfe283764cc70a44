"""Call control of the Janus stage, without I/O: what a request, a Janus message or a timer means.

Everything here is pure: functions and small state machines that take data (control requests as bytes,
Janus JSON, SIP codes, times) and return data (validated commands, actions, delays). The stage
(``stages/janus/__init__.py``) does the I/O and runs them. Tests drive them from tables without root,
Janus or sipp (``tests/test_call_control.py``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from stages.janus.sdp import SdpError, peer_holds

DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")
DTMF_DURATION_MS = 160
DTMF_MIN_DURATION_MS = 40  # RFC 4733 receivers ignore shorter events
DTMF_MAX_DURATION_MS = 5000  # the 16-bit duration field holds 8.2 s at 8 kHz
DTMF_MAX_DIGITS = 64
CALL_WAIT_TIMEOUT_S = 30.0
CALL_MAX_TIMEOUT_S = 300.0
URI_MAX_CHARS = 512
REQUEST_MAX_BYTES = 64 * 1024  # a control request is a small JSON object; anything larger is refused unread
# Optional on every request: echoed in the reply, so a client with several requests in flight can pair them.
REQUEST_ID_MAX_CHARS = 128

COMMANDS = ("status", "call", "hangup", "dtmf", "hold", "unhold")
_KEYS: dict[str, frozenset[str]] = {
    "status": frozenset(),
    "call": frozenset({"uri", "wait", "timeout_s"}),
    "hangup": frozenset(),
    "dtmf": frozenset({"digits", "duration_ms"}),
    "hold": frozenset(),
    "unhold": frozenset(),
}


class CommandError(ValueError):
    """A control request that cannot be carried out as asked; the message says why, for the reply."""


@dataclass(frozen=True)
class Command:
    """One validated control request."""

    cmd: str
    request_id: str | int | None = None
    uri: str = ""
    wait: bool = False
    timeout_s: float = CALL_WAIT_TIMEOUT_S
    digits: str = ""
    duration_ms: int = DTMF_DURATION_MS


def _number(request: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = request.get(key, default)
    # bool is an int in Python, but `"timeout_s": true` is a client's mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandError(f"{key} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise CommandError(f"{key} must be between {low:g} and {high:g}, not {value!r}")
    return float(value)


def parse_command(raw: bytes) -> Command:
    """Validate one control request (UTF-8 JSON object) completely; raise CommandError naming the problem."""
    if len(raw) > REQUEST_MAX_BYTES:
        raise CommandError(f"request too large ({len(raw)} bytes, at most {REQUEST_MAX_BYTES})")
    try:
        request = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CommandError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(request, dict):
        raise CommandError(f"a request is a JSON object, not {type(request).__name__}")
    request_id = request.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))
                                   or len(str(request_id)) > REQUEST_ID_MAX_CHARS):
        raise CommandError("id must be a short string or an integer")
    cmd = request.get("cmd")
    if not isinstance(cmd, str) or cmd not in _KEYS:
        raise CommandError(f"cmd must be one of {', '.join(COMMANDS)}, not {str(cmd)[:40]!r}")
    unknown = set(request) - _KEYS[cmd] - {"cmd", "id"}
    if unknown:
        raise CommandError(f"{cmd} takes no {', '.join(sorted(str(k)[:40] for k in unknown))}")
    if cmd == "call":
        uri = request.get("uri")
        if not isinstance(uri, str) or not uri.startswith(("sip:", "sips:")) or len(uri) > URI_MAX_CHARS:
            raise CommandError("call needs a sip: or sips: uri")
        if any(ord(c) < 0x21 or c in "<>\"" for c in uri):
            raise CommandError("the uri holds spaces, control characters or <>\"")
        wait = request.get("wait", False)
        if not isinstance(wait, bool):
            raise CommandError("wait must be true or false")
        timeout_s = _number(request, "timeout_s", CALL_WAIT_TIMEOUT_S, 0.0, CALL_MAX_TIMEOUT_S)
        return Command(cmd, request_id, uri=uri, wait=wait, timeout_s=timeout_s)
    if cmd == "dtmf":
        digits = request.get("digits")
        if not isinstance(digits, str) or not digits:
            raise CommandError("dtmf needs digits (a string of 0-9 * # A-D)")
        if len(digits) > DTMF_MAX_DIGITS:
            raise CommandError(f"at most {DTMF_MAX_DIGITS} digits per request")
        bad = set(digits) - DTMF_DIGITS
        if bad:
            raise CommandError(f"not DTMF digits: {''.join(sorted(bad))[:20]!r}")
        duration = _number(request, "duration_ms", DTMF_DURATION_MS, DTMF_MIN_DURATION_MS, DTMF_MAX_DURATION_MS)
        return Command(cmd, request_id, digits=digits.upper(), duration_ms=int(duration))
    return Command(cmd, request_id)


def error_reply(message: str, request_id: str | int | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "error": message}
    if request_id is not None:
        reply["id"] = request_id
    return reply


def request_id_of(raw: bytes) -> str | int | None:
    """The id of a request that failed validation, when it can still be read (for the error reply)."""
    try:
        request = json.loads(raw) if len(raw) <= REQUEST_MAX_BYTES else None
    except (ValueError, RecursionError):
        return None
    value = request.get("id") if isinstance(request, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or len(str(value)) > REQUEST_ID_MAX_CHARS:
        return None
    return value


# ----- re-dialling -------------------------------------------------------------------------------------
@dataclass
class RedialPolicy:
    """When an outbound call that ended for a reason other than a hang-up is placed again.

    ``after_janus_restart``: the call Janus took down with it is dialled again once the stage has
    reconnected and registered (the default: a Janus restart should cost seconds of media, not the call).
    ``interval_s`` > 0: also dial again that long after a call ended or failed (``--redial-s``).
    Failed attempts back off from ``backoff_s`` doubling up to ``backoff_max_s``; ``max_tries`` (0 = no
    limit) bounds the attempts in a row that do not reach an answer.
    """

    after_janus_restart: bool = True
    interval_s: float = 0.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    max_tries: int = 0
    failures: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for name in ("interval_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"redial {name} must be a finite number >= 0, not {value!r}")
        if self.max_tries < 0:
            raise ValueError("redial max_tries must be >= 0")

    def connected(self) -> None:
        """A call was answered: the next failure starts a fresh back-off."""
        self.failures = 0

    def after_end(self, reason: str, answered: bool) -> float | None:
        """Seconds until the call is dialled again, or None for not at all.

        ``reason`` is one of ``janus_restart`` (Janus went away during or before the call),
        ``failed`` (no answer: SIP error, timeout), ``ended`` (the call was up and ended without our
        hang-up), ``hangup`` (we or the user hung up on purpose) and ``stopping``.
        """
        if reason in ("hangup", "stopping"):
            return None
        if reason == "janus_restart":
            if not self.after_janus_restart:
                return None
        elif self.interval_s <= 0:
            return None
        if answered:
            self.failures = 0
        else:
            self.failures += 1
        if self.max_tries and self.failures > self.max_tries:
            return None
        if reason == "janus_restart" and self.failures <= 1:
            return 0.0  # at once: the peer lost us seconds ago and is likely still there
        delay = self.interval_s if reason != "janus_restart" else 0.0
        if self.failures > 1:
            delay = max(delay, min(self.backoff_max_s, self.backoff_s * 2 ** (self.failures - 2)))
        return delay


# ----- the bot in the room before an outbound call is placed ------------------------------------------------
# The browser stage's STAGE_STATE values (stages/browser/stage.py); "joined" is the only one where the bot is in.
BOT_STATES = frozenset({"starting", "launching", "joining", "joined", "rejoining", "failed", "waiting_for_call"})
BOT_JOINED = "joined"
ROOM_WAIT_MAX_S = 3600.0
# The bot's reason travels in the call's state, statistics and logs: a line, not a page.
BOT_REASON_MAX_CHARS = 240
BOT_DETAIL_MAX_CHARS = 800


@dataclass(frozen=True)
class DialNow:
    """Place the call: the bot is in the room (or this stage does not wait for it)."""


@dataclass(frozen=True)
class KeepWaiting:
    """Not yet: wait for the bot's next state or until ``remaining_s`` have passed."""

    remaining_s: float


@dataclass(frozen=True)
class NotPlaced:
    """The bound passed without the bot in the room: the call ends without an INVITE, for this reason."""

    reason: str


@dataclass
class RoomGate:
    """Whether an outbound call may be placed: only once the room's bot is in the room.

    A SIP peer that answers while the bot cannot get in hears silence and sees a slate for nothing (issues 12, 14),
    so an outbound call waits up to ``wait_s`` for the browser stage to report ``joined`` (its STAGE_STATE events
    reach this stage in-band through the room-to-SIP stages) and is not placed past that bound. ``wait_s`` = 0:
    no waiting (a pipeline without a bot). The bot re-announces its state every few seconds, so a gate that
    started late (a restarted janus stage) learns it without a join.
    """

    wait_s: float = 0.0
    state: str = ""  # the bot's last state, "" before it said anything
    detail: str = ""  # why it is not in, as it said (the failed step, what the page shows, the likely fix)

    def __post_init__(self) -> None:
        if not math.isfinite(self.wait_s) or not 0 <= self.wait_s <= ROOM_WAIT_MAX_S:
            raise ValueError(f"the wait for the room must be 0..{ROOM_WAIT_MAX_S:g} s, not {self.wait_s!r}")

    @property
    def in_room(self) -> bool:
        return self.state == BOT_JOINED

    def observe(self, attributes: dict[str, Any]) -> bool:
        """Take one STAGE_STATE event's attributes; True when the bot's state changed (a waiting call looks again).

        Events of other stages, or with states the bot never sends, are not the bot's and change nothing."""
        state = attributes.get("state")
        if not isinstance(state, str) or state not in BOT_STATES:
            return False
        detail = "" if state == BOT_JOINED else _bot_detail(attributes)
        changed = state != self.state or detail != self.detail
        self.state, self.detail = state, detail
        return changed

    def decide(self, waited_s: float) -> DialNow | KeepWaiting | NotPlaced:
        """What a call that has waited ``waited_s`` for the bot does now."""
        if self.wait_s <= 0 or self.in_room:
            return DialNow()
        if waited_s < self.wait_s:
            return KeepWaiting(self.wait_s - waited_s)
        return NotPlaced(f"not placed: the bot was not in the room after {self.wait_s:g} s ({self.describe()})")

    def describe(self) -> str:
        """The bot's state in words, for a waiting call's state and a call that was not placed."""
        if not self.state:
            return "the bot has not reported any state"
        text = f"bot {self.state}" + (f": {self.detail}" if self.detail else "")
        return text if len(text) <= BOT_DETAIL_MAX_CHARS else text[:BOT_DETAIL_MAX_CHARS - 3] + "..."


def _bot_detail(attributes: dict[str, Any]) -> str:
    """The reason a bot state event gives (rejoining, failed), with the likely fix when it found one."""
    parts = []
    reason = attributes.get("reason")
    if isinstance(reason, str) and reason:
        parts.append(reason if len(reason) <= BOT_REASON_MAX_CHARS else reason[:BOT_REASON_MAX_CHARS - 3] + "...")
    diagnosis = attributes.get("diagnosis")
    if isinstance(diagnosis, dict):
        errors = diagnosis.get("page_errors")
        if isinstance(errors, list) and errors:
            parts.append("page shows: " + " | ".join(repr(str(e)[:100]) for e in errors[:2]))
        suggestion = diagnosis.get("suggestion")
        if isinstance(suggestion, str) and suggestion:
            parts.append("likely fix: " + suggestion)
        screenshot = diagnosis.get("screenshot")
        if isinstance(screenshot, str) and screenshot:
            parts.append("screenshot: " + screenshot)
    return "; ".join(parts)


# ----- call states ---------------------------------------------------------------------------------------------
class CallState:
    """Values of the ``state`` attribute of CALL_STATE events."""

    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"
    REGISTRATION_FAILED = "registration_failed"
    CALLING = "calling"
    INCOMING = "incoming"
    RINGING = "ringing"
    PROCEEDING = "proceeding"
    PROGRESS = "progress"
    ACCEPTED = "accepted"
    MEDIA_UP = "media_up"
    HOLDING = "holding"
    ON_HOLD = "on_hold"
    RESUMED = "resumed"
    WAITING_FOR_ROOM = "waiting_for_room"  # an outbound call not placed yet: the room's bot is not in the room
    HANGINGUP = "hangingup"
    ENDED = "ended"
    FAILED = "failed"
    DECLINED = "declined"
    DISCONNECTED = "janus_disconnected"


ACTIVE_STATES = {CallState.WAITING_FOR_ROOM, CallState.CALLING, CallState.INCOMING, CallState.RINGING,
                 CallState.PROCEEDING, CallState.PROGRESS, CallState.ACCEPTED, CallState.MEDIA_UP, CallState.HOLDING,
                 CallState.ON_HOLD, CallState.RESUMED}


# ----- Janus SIP plugin events in, actions out -------------------------------------------------------------------
@dataclass(frozen=True)
class CallView:
    """What the machine reads of the current call."""

    call_id: str
    direction: str  # "outbound" or "inbound"
    state: str
    accepted: bool
    hangup_reason: str | None = None  # we hung up for a reason of our own (media timeout): why it ended
    sip_call_id: str = ""
    media_up: bool = False  # Janus said webrtcup for this call


@dataclass(frozen=True)
class InboundRules:
    enabled: bool = False
    accept_from: re.Pattern[str] = field(default_factory=lambda: re.compile("(?!)"))  # matches nothing
    decline_code: int = 486


@dataclass(frozen=True)
class Publish:
    """Set the call's state and announce it (CALL_STATE event, log line)."""

    state: str


@dataclass(frozen=True)
class SetAnswer:
    """Hand Janus's answer (an outbound call's) to the WebRTC peer."""

    jsep: dict[str, Any]


@dataclass(frozen=True)
class Accept:
    """Answer an incoming call's offer and accept it."""

    caller: str
    sip_call_id: str
    jsep: dict[str, Any]


@dataclass(frozen=True)
class Decline:
    caller: str
    sip_call_id: str
    code: int
    reason: str


@dataclass(frozen=True)
class EndCall:
    state: str
    code: int | None
    reason: str


@dataclass(frozen=True)
class MarkAccepted:
    """The call is answered: note the time, count it, reset the re-dial back-off."""


@dataclass(frozen=True)
class MarkMediaUp:
    """ICE and DTLS with Janus are up: note the time, restart the media watchdog."""


@dataclass(frozen=True)
class RequestKeyframe:
    reason: str


@dataclass(frozen=True)
class PeerHold:
    """The peer re-offered: it holds us (sendonly/inactive, may send nothing) or not."""

    on: bool


@dataclass(frozen=True)
class DtmfReceived:
    digit: str
    duration_ms: int | None
    method: str


@dataclass(frozen=True)
class SetSipCallId:
    value: str


@dataclass(frozen=True)
class Registered:
    pass


@dataclass(frozen=True)
class ReportError:
    code: str
    message: str


@dataclass(frozen=True)
class Note:
    """Worth a log line, nothing more."""

    text: str


Action = (Publish | SetAnswer | Accept | Decline | EndCall | MarkAccepted | MarkMediaUp | RequestKeyframe | PeerHold
          | DtmfReceived | SetSipCallId | Registered | ReportError | Note)

DTMF_RELAY_RE = re.compile(r"Signal\s*=\s*([0-9A-Da-d*#])", re.IGNORECASE)
DTMF_DURATION_RE = re.compile(r"Duration\s*=\s*(\d+)", re.IGNORECASE)
_LOGGED_ONLY = ("updated", "accepting", "hangingup", "declining", "dtmfsent", "infosent", "messagesent",
                "messagedelivery", "registering")


def plugin_data(event: dict[str, Any]) -> dict[str, Any]:
    plugindata = event.get("plugindata")
    data = plugindata.get("data") if isinstance(plugindata, dict) else None
    return data if isinstance(data, dict) else {}


def dtmf_from_info(content_type: str, content: str) -> tuple[str, int | None] | None:
    """The digit (and duration) of a SIP INFO carrying DTMF, or None for any other INFO."""
    if content_type.lower() == "application/dtmf-relay":
        match = DTMF_RELAY_RE.search(content)
        if match is None:
            return None
        duration = DTMF_DURATION_RE.search(content)
        return match.group(1).upper(), int(duration.group(1)) if duration else None
    if content_type.lower() == "application/dtmf" and content.strip()[:1] in DTMF_DIGITS:
        return content.strip()[:1].upper(), None
    return None


def on_janus_event(event: dict[str, Any], call: CallView | None, rules: InboundRules) -> list[Action]:
    """What one message Janus pushed for our SIP handle means for the call, as actions for the stage to run."""
    kind = event.get("janus")
    if kind == "webrtcup":
        return [MarkMediaUp(), Publish(CallState.MEDIA_UP), RequestKeyframe("call media up")] if call else []
    if kind == "hangup":  # the PeerConnection with Janus closed; the SIP side says why in its own event
        return [Note(f"Janus closed the PeerConnection ({event.get('reason')})")] if call else []
    if kind in ("media", "slowlink", "detached", "timeout"):
        return [Note(f"Janus {kind} event: { {k: v for k, v in event.items() if k != 'janus'} }")]
    if kind != "event":
        return []
    data = plugin_data(event)
    if not data:
        return []
    jsep = event.get("jsep") if isinstance(event.get("jsep"), dict) else None
    if "error_code" in data:
        code, error = data.get("error_code"), str(data.get("error", ""))
        actions: list[Action] = [ReportError("janus_sip_error", f"{code} {error}")]
        if call is not None and not call.accepted:
            actions.append(EndCall(CallState.FAILED, int(code) if isinstance(code, int) else 0, error))
        return actions
    raw_result = data.get("result")
    result: dict[str, Any] = raw_result if isinstance(raw_result, dict) else {}
    name = result.get("event")
    raw_call_id = data.get("call_id")
    sip_call_id = raw_call_id if isinstance(raw_call_id, str) else ""
    out: list[Action] = []
    if call is not None and sip_call_id and not call.sip_call_id and name != "incomingcall":
        out.append(SetSipCallId(sip_call_id))
    if name == "incomingcall":
        caller = str(result.get("username", ""))
        if not rules.enabled:
            return [Decline(caller, sip_call_id, rules.decline_code, "inbound calls disabled")]
        if not rules.accept_from.search(caller):
            return [Decline(caller, sip_call_id, rules.decline_code, "declined by rule")]
        if call is not None:
            return [Decline(caller, sip_call_id, rules.decline_code, f"busy with call {call.call_id}")]
        if jsep is None:
            return [Decline(caller, sip_call_id, 488, "offerless INVITE not supported")]
        return [Accept(caller, sip_call_id, jsep)]
    if call is None:
        if name == "hangup":
            return [Note(f"hangup for no active call: {result.get('code')} {result.get('reason', '')}")]
        if name == "missed_call":
            return [Note(f"missed call from {result.get('caller')} (busy)")]
        if name == "registered":
            return [Registered()]
        if name == "info":
            return _info(result)
        return [Note(f"SIP plugin event {name} with no call: {result}")] if name not in _LOGGED_ONLY else []
    if name in (CallState.CALLING, CallState.RINGING, CallState.PROCEEDING):
        if call.state != name:  # "calling" was published when the request went out
            out.append(Publish(name))
    elif name == "progress":
        if jsep is not None and call.direction == "outbound":
            out.append(SetAnswer(jsep))
        out.append(Publish(CallState.PROGRESS))
    elif name == "accepted":
        if jsep is not None and call.direction == "outbound":
            out.append(SetAnswer(jsep))
        out += [MarkAccepted(), Publish(CallState.ACCEPTED), RequestKeyframe("call accepted")]
        if call.media_up:
            # An inbound call's media can come up before Janus reports our accept done (both race after the 200
            # OK; seen on a loaded machine): the call must not stay "accepted" with its media flowing.
            out.append(Publish(CallState.MEDIA_UP))
    elif name == "updatingcall":
        out.append(Note("the peer re-offered"))
        if jsep is not None:
            try:
                out.append(PeerHold(peer_holds(str(jsep.get("sdp", "")))))
            except SdpError as exc:
                out.append(ReportError("bad_sdp", f"re-offer: {exc}"))
    elif name == "holding":
        out.append(Publish(CallState.ON_HOLD))
    elif name == "resuming":
        out.append(Publish(CallState.RESUMED))
    elif name in _LOGGED_ONLY:
        out.append(Note(str(name)))
    elif name == "hangup":
        code = result.get("code")
        failed = not call.accepted and call.direction == "outbound"
        out.append(EndCall(CallState.FAILED if failed else CallState.ENDED, code if isinstance(code, int) else None,
                           call.hangup_reason or str(result.get("reason", ""))))
    elif name == "missed_call":
        out.append(Note(f"missed call from {result.get('caller')} (busy)"))
    elif name == "info":
        out += _info(result)
    elif name == "registered":
        out.append(Registered())
    else:
        out.append(Note(f"SIP plugin event {name}: {result}"))
    return out


def _info(result: dict[str, Any]) -> list[Action]:
    content_type, content = str(result.get("type", "")), str(result.get("content", ""))
    dtmf = dtmf_from_info(content_type, content)
    if dtmf is None:
        return [Note(f"SIP INFO {content_type}: {content[:100]!r}")]
    return [DtmfReceived(dtmf[0], dtmf[1], "info")]
