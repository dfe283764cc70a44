"""The Janus stage's call control without I/O: control requests, re-dial policy. No root, Janus or sipp."""

from __future__ import annotations

import json
import random

import pytest

from stages.janus.callcontrol import (
    DTMF_DURATION_MS,
    REQUEST_MAX_BYTES,
    Command,
    CommandError,
    RedialPolicy,
    parse_command,
    request_id_of,
)

GOOD = [
    (b'{"cmd": "status"}', Command("status")),
    (b'{"cmd": "hangup", "id": 7}', Command("hangup", 7)),
    (b'{"cmd": "call", "uri": "sip:a@127.0.0.1:5090"}', Command("call", uri="sip:a@127.0.0.1:5090")),
    (b'{"cmd": "call", "uri": "sips:a@b", "wait": true, "timeout_s": 2.5, "id": "x"}',
     Command("call", "x", uri="sips:a@b", wait=True, timeout_s=2.5)),
    (b'{"cmd": "dtmf", "digits": "12#a"}', Command("dtmf", digits="12#A", duration_ms=DTMF_DURATION_MS)),
    (b'{"cmd": "dtmf", "digits": "5", "duration_ms": 200}', Command("dtmf", digits="5", duration_ms=200)),
    (b'{"cmd": "hold"}', Command("hold")),
    (b'{"cmd": "unhold"}', Command("unhold")),
]

BAD = [
    (b"", "not JSON"),
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b"null", "JSON object"),
    (b'{"cmd": "fly"}', "cmd must be"),
    (b'{"cmd": null}', "cmd must be"),
    (b'{"cmd": ["status"]}', "cmd must be"),
    (b'{"cmd": "status", "verbose": 1}', "takes no verbose"),
    (b'{"cmd": "call"}', "sip:"),
    (b'{"cmd": "call", "uri": "http://x"}', "sip:"),
    (b'{"cmd": "call", "uri": 5}', "sip:"),
    (b'{"cmd": "call", "uri": "sip:a b@c"}', "spaces"),
    (b'{"cmd": "call", "uri": "sip:a@b", "wait": "yes"}', "wait"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": null}', "timeout_s"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": true}', "timeout_s"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": -1}', "timeout_s"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": 1e999}', "timeout_s"),
    (b'{"cmd": "call", "uri": "sip:a@b", "timeout_s": NaN}', "timeout_s"),
    (b'{"cmd": "dtmf", "duration_ms": null}', "digits"),  # the request that used to end the control task
    (b'{"cmd": "dtmf", "digits": "1", "duration_ms": null}', "duration_ms"),
    (b'{"cmd": "dtmf", "digits": "1", "duration_ms": "160"}', "duration_ms"),
    (b'{"cmd": "dtmf", "digits": "1", "duration_ms": 10}', "duration_ms"),
    (b'{"cmd": "dtmf", "digits": "1", "duration_ms": 99999999}', "duration_ms"),
    (b'{"cmd": "dtmf", "digits": "x"}', "not DTMF"),
    (b'{"cmd": "dtmf", "digits": ""}', "digits"),
    (b'{"cmd": "dtmf", "digits": 12}', "digits"),
    (b'{"cmd": "dtmf", "digits": "' + b"1" * 65 + b'"}', "at most"),
    (b'{"cmd": "status", "id": [1]}', "id must be"),
    (b'{"cmd": "status", "id": true}', "id must be"),
    (b" " * (REQUEST_MAX_BYTES + 1), "too large"),
    (b"[" * 60_000, "not JSON"),  # deep nesting: RecursionError inside json, still an answer
]


@pytest.mark.parametrize(("raw", "expected"), GOOD)
def test_valid_requests(raw: bytes, expected: Command) -> None:
    assert parse_command(raw) == expected


@pytest.mark.parametrize(("raw", "message"), BAD)
def test_invalid_requests_are_named(raw: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        parse_command(raw)


def test_random_input_only_ever_raises_command_error() -> None:
    rng = random.Random(12)
    values: list[object] = [None, True, 0, -1, 1.5, 1e308, "", "x", "sip:a@b", [], {}, [None], {"a": 1}, "9" * 70]
    keys = ["cmd", "uri", "wait", "timeout_s", "digits", "duration_ms", "id", "x"]
    cmds = ["status", "call", "hangup", "dtmf", "hold", "unhold", "nope"]
    accepted = 0
    for _ in range(3000):
        choice = rng.random()
        if choice < 0.3:
            raw = rng.randbytes(rng.randrange(0, 64))
        else:
            request: dict[str, object] = {"cmd": rng.choice(cmds + values)}  # type: ignore[operator]
            for key in rng.sample(keys, rng.randrange(0, 4)):
                request[key] = rng.choice(values)
            raw = json.dumps(request).encode()
        try:
            parse_command(raw)
            accepted += 1
        except CommandError as exc:
            assert str(exc)
    assert accepted < 3000 * 0.2  # most of it is wrong, and every wrong one was an error with a message


def test_request_id_survives_a_bad_request() -> None:
    assert request_id_of(b'{"cmd": "dtmf", "id": "r1", "duration_ms": null}') == "r1"
    assert request_id_of(b"garbage") is None
    assert request_id_of(b'{"id": {"x": 1}}') is None


# ----- re-dial policy --------------------------------------------------------------------------------------
def test_janus_restart_redials_at_once_by_default() -> None:
    policy = RedialPolicy()
    assert policy.after_end("janus_restart", answered=True) == 0.0
    # The re-dialled call died with Janus again before an answer: back off, doubling, bounded.
    assert policy.after_end("janus_restart", answered=False) == 0.0
    assert policy.after_end("janus_restart", answered=False) == policy.backoff_s
    assert policy.after_end("janus_restart", answered=False) == policy.backoff_s * 2
    for _ in range(20):
        delay = policy.after_end("janus_restart", answered=False)
    assert delay == policy.backoff_max_s


def test_no_redial_after_a_hangup_or_a_stop() -> None:
    policy = RedialPolicy(interval_s=5.0)
    assert policy.after_end("hangup", answered=True) is None
    assert policy.after_end("stopping", answered=True) is None


def test_redial_switched_off() -> None:
    policy = RedialPolicy(after_janus_restart=False)
    assert policy.after_end("janus_restart", answered=True) is None
    assert policy.after_end("failed", answered=False) is None  # no --redial-s
    assert policy.after_end("ended", answered=True) is None


def test_redial_interval_and_max_tries() -> None:
    policy = RedialPolicy(interval_s=0.3, backoff_s=1.0, max_tries=3)
    assert policy.after_end("failed", answered=False) == 0.3
    assert policy.after_end("failed", answered=False) == 1.0
    assert policy.after_end("failed", answered=False) == 2.0
    assert policy.after_end("failed", answered=False) is None  # three failures in a row: give up
    policy.connected()
    assert policy.after_end("ended", answered=True) == 0.3  # an answered call resets the count


@pytest.mark.parametrize("kwargs", [{"interval_s": float("nan")}, {"backoff_s": -1.0}, {"max_tries": -2},
                                    {"backoff_max_s": float("inf")}])
def test_redial_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="redial"):
        RedialPolicy(**kwargs)  # type: ignore[arg-type]
