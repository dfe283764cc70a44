"""Call control of the Janus stage, without I/O: what a request, a Janus message or a timer means.

Everything here is pure: functions and small state machines that take data (control requests as bytes,
Janus JSON, SIP codes, times) and return data (validated commands, actions, delays). The stage
(``stages/janus/__init__.py``) does the I/O and runs them. Tests drive them from tables without root,
Janus or sipp (``tests/test_call_control.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

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
