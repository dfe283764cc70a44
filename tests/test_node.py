"""`sipbridge node`: the API, admission, drain and metrics.

API tests run the aiohttp app in-process (no call processes where none are needed). Real-process tests run
cheap calls ([[stage]] pipelines: a 160x120@10 test pattern and a tone into a sink, three processes a call) so
a 2-core machine holds several at once; one test runs a real SIP call (encoder -> janus stage -> Janus ->
sipp echo and back) through the node; one runs `sipbridge node` itself and drains it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from sipbridge.node.api import make_app
from sipbridge.node.calls import Call, RunFolderInUse, make_run_folder, plan_call
from sipbridge.node.config import NodeConfigError, NodeSettings, check, default_run_root, default_slots
from sipbridge.node.hostinfo import scan_sessions
from sipbridge.node.service import Node
from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)
from tests.stagehelp import SIPBRIDGE

pytestmark = pytest.mark.timeout(240)

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CALL_START_TIMEOUT_S = 90.0  # three calls' Python stages importing PyAV at once on a busy 2-core machine
CALL_MEMORY_FLOOR_BYTES = 10e6  # PSS of a running call: supervisord plus two Python stages that imported numpy


def cheap_call(frames: int = 0, fps: int = 10) -> dict[str, Any]:
    """A call that holds a slot with real processes and media: test pattern + tone -> sink."""
    return {"stage": [
        {"name": "source", "kind": "source",
         "args": ["--width", "160", "--height", "120", "--fps", str(fps), "--frames", str(frames)]},
        {"name": "sink", "kind": "sink", "inputs": ["source"]},
    ]}


@pytest.fixture(name="run_root")
def run_root_fixture(tmp_path: Path) -> Any:
    # The calls' unix sockets must stay under 107 bytes: a short root, not pytest's long tmp_path.
    root = Path(f"/tmp/sbn-{secrets.token_hex(4)}-{tmp_path.name[-10:]}")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def settings_for(run_root: Path, **overrides: Any) -> NodeSettings:
    values: dict[str, Any] = {"slots": 3, "cpu_ceiling": 1.0, "run_root": run_root, "allow_pipelines": True,
                              "token_env": "SBN_TEST_TOKEN", "drain_timeout_s": 0.0, **overrides}
    return NodeSettings(**values)


@asynccontextmanager
async def node_client(settings: NodeSettings, cpu: Callable[[], float] | None = None
                      ) -> AsyncIterator[tuple[Node, TestClient[Any, Any]]]:
    node = Node(settings, environ={**os.environ, "SBN_TEST_TOKEN": TOKEN}, cpu=cpu)
    await node.start()
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(node, TOKEN)))
    await client.start_server()
    try:
        yield node, client
    finally:
        await node.drain(timeout_s=0)
        await client.close()
        await node.close()


async def until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


async def get_call(client: TestClient[Any, Any], call_id: str) -> dict[str, Any]:
    resp = await client.get(f"/calls/{call_id}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def video_frames(view: dict[str, Any], stage: str = "sink") -> int:
    streams = view["stages"].get(stage, {}).get("streams", {})
    return int(streams.get("video0", {}).get("frames_in", 0))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def stage_pids(view: dict[str, Any]) -> dict[str, int]:
    return {name: stage["pid"] for name, stage in view["stages"].items() if stage.get("pid")}


# ----- no processes: configuration, validation, auth, admission -------------------------------------------
def test_settings_fail_at_start_with_the_setting_named(tmp_path: Path) -> None:
    good = settings_for(Path("/tmp/sbn"))
    assert check(good, {"SBN_TEST_TOKEN": TOKEN}) == TOKEN
    with pytest.raises(NodeConfigError, match="SBN_TEST_TOKEN is not set"):
        check(good, {})
    with pytest.raises(NodeConfigError, match="fewer than 16"):
        check(good, {"SBN_TEST_TOKEN": "short"})
    with pytest.raises(NodeConfigError, match="token is required"):
        check(settings_for(Path("/tmp/sbn"), token_env=None), {})
    with pytest.raises(NodeConfigError, match="only be turned off on a loopback"):
        check(settings_for(Path("/tmp/sbn"), auth=False, listen="0.0.0.0"), {})
    assert check(settings_for(Path("/tmp/sbn"), auth=False, listen="127.0.0.1"), {}) is None
    with pytest.raises(NodeConfigError, match="too long for the calls' unix sockets"):
        check(settings_for(Path("/tmp/" + "x" * 80)), {"SBN_TEST_TOKEN": TOKEN})
    with pytest.raises(NodeConfigError, match="cpu_ceiling"):
        check(settings_for(Path("/tmp/sbn"), cpu_ceiling=1.5), {"SBN_TEST_TOKEN": TOKEN})
    assert default_slots(0.9, cores=2) == 1 and default_slots(0.9, cores=8) == 7
    assert default_run_root(0, {}) == Path("/run/sipbridge")
    assert default_run_root(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == Path("/run/user/1000/sipbridge")
    with pytest.raises(NodeConfigError, match="XDG_RUNTIME_DIR is not set"):
        default_run_root(1000, {})


def test_options_come_from_the_command_line_then_env_then_the_config_file(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    import sipbridge.node as node_cli
    from sipbridge.cli import cli

    seen: list[tuple[NodeSettings, str | None]] = []

    async def fake_serve(settings: NodeSettings, token: str | None) -> None:
        seen.append((settings, token))

    monkeypatch.setattr(node_cli, "serve", fake_serve)
    config = tmp_path / "node.toml"
    config.write_text('[node]\nport = 9001\nslots = 5\ntoken = "env:SBN_TEST_TOKEN"\nrun_root = "/tmp/sbn-x"\n'
                      'cpu_ceiling = 0.8\n')
    env = {"SBN_TEST_TOKEN": TOKEN, "SIPBRIDGE_NODE_SLOTS": "4"}
    result = CliRunner().invoke(cli, ["node", "--config", str(config), "--port", "9002"], env=env)
    assert result.exit_code == 0, result.output
    settings, token = seen[-1]
    assert (settings.port, settings.slots, settings.cpu_ceiling, token) == (9002, 4, 0.8, TOKEN)
    assert settings.run_root == Path("/tmp/sbn-x")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nslot = 3\n")
    result = CliRunner().invoke(cli, ["node", "--config", str(bad)], env=env)
    assert result.exit_code != 0 and "unknown key node.slot" in result.output
    result = CliRunner().invoke(cli, ["node", "--listen", "0.0.0.0", "--no-auth"])
    assert result.exit_code != 0 and "loopback" in result.output


def test_the_node_s_janus_secret_file_reaches_only_the_janus_stage(tmp_path: Path) -> None:
    """[node] janus_api_secret_file: a 0600 file (as `sipbridge janus-server` writes it) is the Janus API secret of
    every call whose bridge names none; it goes to the janus stage through the broker, never into supervisord's
    environment. A file others can read, a missing or an empty one, stops the node at start naming the key."""
    from sipbridge.node.config import NODE_JANUS_SECRET_ENV
    from sipbridge.supervise import stage_secrets, supervisor_environment

    secret_file = tmp_path / "api_secret"
    secret_file.write_text("s3cret-of-this-node\n")
    secret_file.chmod(0o600)
    settings = NodeSettings(auth=False, run_root=Path("/run/sipbridge"), janus_api_secret_file=secret_file)
    assert check(settings, {}) is None
    node = Node(settings, environ={"PATH": "/usr/bin"})
    body = json.loads((EXAMPLES / "node-call.json").read_text())
    body.setdefault("janus", {}).pop("api_secret", None)
    specs = node.plan(body).stages(tmp_path / "run" / "abc")
    secrets = stage_secrets(specs, node.environ)
    assert secrets["janus"]["SIPBRIDGE_STAGE_JANUS_API_SECRET"] == "s3cret-of-this-node", secrets
    assert all("s3cret" not in str(v) for name, s in secrets.items() if name != "janus" for v in s.values())
    names = {source for spec in specs for source in spec.secrets.values()}
    assert NODE_JANUS_SECRET_ENV not in supervisor_environment(node.environ, names)
    assert all("s3cret" not in " ".join([*spec.args, spec.command or ""]) for spec in specs)
    for mode, text, expected in ((0o644, "x", "readable by others"), (0o600, "", "is empty")):
        secret_file.write_text(text)
        secret_file.chmod(mode)
        with pytest.raises(NodeConfigError, match=f"janus_api_secret_file: .*{expected}"):
            check(settings, {})
    with pytest.raises(NodeConfigError, match="janus_api_secret_file: cannot read"):
        check(NodeSettings(auth=False, janus_api_secret_file=tmp_path / "missing"), {})


def test_the_node_example_files_are_valid() -> None:
    import tomllib

    data = tomllib.loads((EXAMPLES / "node.toml").read_text())
    assert set(data["node"]) <= {"listen", "port", "token", "auth", "slots", "cpu_ceiling", "run_root",
                                 "drain_timeout_s", "allow_pipelines", "name"}
    from sipbridge.node.inbound import InboundCalls

    class Planner:
        def plan(self, body: Any) -> Any:
            return plan_call(body, False, {})
    inbound = InboundCalls(Planner(), tomllib.loads((EXAMPLES / "node-inbound.toml").read_text()))
    assert inbound.config_for("sip:sales-ann@pbx.example")["room"]["vars"]["room"] == "2001"
    plan = plan_call(json.loads((EXAMPLES / "node-call.json").read_text()), allow_pipelines=False, environ={})
    assert plan.kind == "bridge" and plan.janus_stage == "janus" and not plan.inbound
    stages = [s.name for s in plan.stages(Path("/run/sipbridge/abc"))]
    assert "browser" in stages and "janus" in stages and "janus-server" not in stages


def test_host_cpu_and_call_processes_are_read_from_proc(tmp_path: Path) -> None:
    from sipbridge.node.hostinfo import CpuSampler, scan_sessions

    proc = tmp_path / "proc"
    proc.mkdir()

    def stat(user: int, idle: int) -> None:  # cpu user nice system idle iowait irq softirq steal
        (proc / "stat").write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")

    stat(100, 100)
    sampler = CpuSampler(proc)
    stat(190, 110)  # 90 busy of 100 jiffies
    assert sampler.sample() == pytest.approx(0.9)
    # A command name with spaces and parentheses; the session is field 6, utime/stime 14/15, start time 22.
    for pid, comm, session in ((11, "python3", 500), (12, "a (b) c", 500), (13, "other", 600)):
        (proc / str(pid)).mkdir()
        fields = ["S", "1", str(pid), str(session)] + ["0"] * 7 + ["30", "12"] + ["0"] * 6 + ["4242"]
        (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    found = scan_sessions({500, 700}, proc)
    assert sorted(p.pid for p in found[500]) == [11, 12] and found[700] == []
    assert {(p.cpu_ticks, p.start_ticks) for p in found[500]} == {(42, 4242)}


def test_run_folder_is_private_and_an_existing_one_is_refused_untouched(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_dir = make_run_folder(root, "abc")
    assert (root.stat().st_mode & 0o777, run_dir.stat().st_mode & 0o777) == (0o700, 0o700)
    (run_dir / "keep.txt").write_text("someone's")
    with pytest.raises(RunFolderInUse, match="never wiped"):
        make_run_folder(root, "abc")
    assert (run_dir / "keep.txt").read_text() == "someone's"


async def _auth_and_bad_requests(run_root: Path) -> None:
    async with node_client(settings_for(run_root, allow_pipelines=False)) as (node, client):
        resp = await client.get("/calls")
        assert resp.status == 401 and "missing bearer token" in (await resp.json())["error"]
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = await client.get("/calls", headers={"Authorization": "Bearer not-the-token"})
        assert resp.status == 401 and (await resp.json())["error"] == "wrong bearer token"
        resp = await client.get("/metrics", headers={"Authorization": "Basic abc"})
        assert resp.status == 401
        assert (await client.get("/healthz")).status == 200  # open, for load balancers
        assert (await client.get("/calls", headers=AUTH)).status == 200

        async def post(body: str) -> tuple[int, str]:
            resp = await client.post("/calls", data=body, headers=AUTH)
            return resp.status, (await resp.json())["error"]

        status, message = await post("{not json")
        assert status == 400 and message.startswith("body is not valid JSON")
        assert await post("[1, 2]") == (400, "the body must be a JSON object: a bridge configuration")
        status, message = await post(json.dumps({"room": {"url": "http://x/"}, "sip": {"call": "sip:a@b"},
                                                 "colour": 1}))
        assert (status, message) == (400, "unknown key bridge file.colour")
        status, message = await post(json.dumps({"room": {"url": "http://x/"}, "sip": {"call": "sip:a@b"},
                                                 "media": {"to_sip": {"fps": 500}}}))
        assert (status, message) == (400, "media.to_sip.fps must be 1..60, not 500")
        status, message = await post(json.dumps({"room": {"url": "http://x/"}, "sip": {"call": "sip:a@b",
                                                 "register": "digest", "proxy": "sip:p", "secret": "env:NOPE_X"}}))
        assert (status, message) == (400, "environment variable(s) NOPE_X not set on this node")
        status, message = await post(json.dumps({"room": {"url": "http://x/"}, "sip": {"call": "sip:a@b"},
                                                 "janus": {"start": True}}))
        assert status == 400 and message.startswith("janus.start is for `sipbridge up`")
        status, message = await post(json.dumps(cheap_call()))
        assert status == 400 and "pipelines are off" in message
        status, message = await post("x" * 70_000)
        assert status == 413 and "body over" in message
        assert node.calls == {} and node.rejected["invalid"] == 6

        for method, path in (("GET", "/calls/nope"), ("DELETE", "/calls/nope"), ("POST", "/calls/nope/dtmf")):
            resp = await client.request(method, path, headers=AUTH, json={"digits": "1"})
            assert resp.status == 404 and (await resp.json())["error"] == "no call 'nope' on this node"
        resp = await client.get("/nowhere", headers=AUTH)
        assert resp.status == 404 and (await resp.json())["error"] == "no such path: /nowhere"
        resp = await client.put("/calls", headers=AUTH)
        assert resp.status == 405 and "PUT is not allowed" in (await resp.json())["error"]

        # DTMF on a call without a SIP stage (a record put in place by hand: no process is started).
        call = Call("c1", plan_call(cheap_call(), allow_pipelines=True), run_root, {})
        call.state = "running"
        node.calls["c1"] = call
        for body, expected in ((b"{", "body is not valid JSON"), (b'"1"', "body must be a JSON object"),
                               (b'{"digits": "12x"}', "digits must be"),
                               (b'{"digits": "1", "duration_ms": 5}', "duration_ms must be an integer")):
            resp = await client.post("/calls/c1/dtmf", data=body, headers=AUTH)
            assert resp.status == 400 and expected in (await resp.json())["error"], body
        resp = await client.post("/calls/c1/dtmf", json={"digits": "1"}, headers=AUTH)
        assert resp.status == 409 and (await resp.json())["error"] == "this call has no SIP stage"
        call.state = "ended"


def test_api_rejects_bad_requests_with_a_clear_4xx(run_root: Path) -> None:
    asyncio.run(_auth_and_bad_requests(run_root))


async def _chosen_ids(run_root: Path) -> None:
    async with node_client(settings_for(run_root, slots=3)) as (node, client):
        resp = await client.post("/calls?id=Not_An_Id", json=cheap_call(), headers=AUTH)
        assert resp.status == 400 and "call id must be" in (await resp.json())["error"]
        # A folder that exists under the run root (another node's, a stale one) is refused and left as it was.
        (run_root / "taken").mkdir(parents=True)
        (run_root / "taken" / "keep").write_text("theirs")
        resp = await client.post("/calls?id=taken", json=cheap_call(), headers=AUTH)
        assert resp.status == 409 and "never wiped" in (await resp.json())["error"]
        assert (run_root / "taken" / "keep").read_text() == "theirs"
        call = Call("dup1", plan_call(cheap_call(), allow_pipelines=True), run_root, {})
        call.state = "running"
        node.calls["dup1"] = call
        resp = await client.post("/calls?id=dup1", json=cheap_call(), headers=AUTH)
        assert resp.status == 409 and (await resp.json())["error"] == "call dup1 exists on this node"
        assert set(node.calls) == {"dup1"} and node.started["pipeline"] == 0
        call.state = "ended"


def test_a_chosen_call_id_is_checked_and_never_takes_an_existing_folder(run_root: Path) -> None:
    asyncio.run(_chosen_ids(run_root))


async def _weighing(run_root: Path) -> None:
    # A stand-in call whose session holds a shell and its child; the test kills the child and the shell starts a
    # different one: the call's processes change between two samples, as when a stage is restarted. (The child
    # once ended by itself after 0.5 s, and on a loaded machine the first sample came after it, or before the
    # shell had started it.)
    shell = subprocess.Popen(["sh", "-c", "sleep 300; sleep 300"], start_new_session=True)

    def session() -> set[int]:
        return {p.pid for p in scan_sessions({shell.pid}).get(shell.pid, [])}

    async with node_client(settings_for(run_root, slots=1)) as (node, _client):
        call = Call("w", plan_call(cheap_call(), allow_pipelines=True), run_root, {})
        call.state, call.proc = "running", shell
        node.calls["w"] = call
        try:
            await until(lambda: len(session()) == 2, 10, "the shell's first child")
            await node.sample()  # the first sample weighs every call
            first = call.weighed_pids
            assert shell.pid in first and len(first) == 2 and call.memory_bytes > 0
            call.memory_bytes = 1  # a sentinel: a sample that does not weigh the call leaves it
            await node.sample()
            assert call.memory_bytes == 1 and call.weighed_pids == first
            os.kill(next(pid for pid in first if pid != shell.pid), signal.SIGKILL)
            await until(lambda: session() - first, 10, "the shell's second child")
            await node.sample()  # not a weighing round (every 5th), but the call's processes changed
            assert call.memory_bytes > 1 and call.weighed_pids != first and shell.pid in call.weighed_pids
        finally:
            call.state = "ended"
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()


def test_a_call_whose_processes_changed_is_weighed_at_the_next_sample(run_root: Path) -> None:
    asyncio.run(_weighing(run_root))


async def _admission(run_root: Path) -> None:
    cpu = [0.2]
    async with node_client(settings_for(run_root, slots=2, cpu_ceiling=0.9), cpu=lambda: cpu[0]) as (node, client):
        await node.sample()
        resp = await client.get("/healthz")
        assert resp.status == 200 and (await resp.json())["status"] == "ready"
        # Two slots taken by call records (no processes): full.
        for call_id in ("a", "b"):
            call = Call(call_id, plan_call(cheap_call(), allow_pipelines=True), run_root, {})
            call.state = "running"
            node.calls[call_id] = call
        resp = await client.post("/calls", json=cheap_call(), headers=AUTH)
        assert resp.status == 429 and (await resp.json())["error"] == "no free slot (2 of 2 in use)"
        assert resp.headers["Retry-After"]
        resp = await client.get("/healthz")
        assert resp.status == 429 and (await resp.json())["free"] == 0
        node.calls["b"].state = "ended"
        assert (await client.get("/healthz")).status == 200
        # Over the CPU ceiling.
        cpu[0] = 0.95
        await node.sample()
        resp = await client.post("/calls", json=cheap_call(), headers=AUTH)
        assert resp.status == 429 and "above the ceiling 0.90" in (await resp.json())["error"]
        assert (await client.get("/healthz")).status == 429
        cpu[0] = 0.1
        await node.sample()
        # Draining.
        node.draining = True
        resp = await client.post("/calls", json=cheap_call(), headers=AUTH)
        assert resp.status == 503 and (await resp.json())["error"] == "node is draining: no new calls"
        resp = await client.get("/healthz")
        assert resp.status == 503 and (await resp.json())["draining"] is True
        snap = (await (await client.get("/node", headers=AUTH)).json())
        assert (snap["slots"], snap["free"], snap["draining"], snap["admitting"]) == (2, 1, True, False)
        assert {c["id"]: c["state"] for c in snap["calls"]} == {"a": "running", "b": "ended"}
        metrics = await (await client.get("/metrics", headers=AUTH)).text()
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        rejected = {s.labels["reason"]: s.value for s in families["sipbridge_calls_rejected"].samples
                    if s.name.endswith("_total")}
        assert rejected == {"full": 1, "cpu": 1, "draining": 1}
        node.calls["a"].state = "ended"


def test_admission_refuses_when_full_over_the_cpu_ceiling_or_draining(run_root: Path) -> None:
    asyncio.run(_admission(run_root))


# ----- real processes -----------------------------------------------------------------------------------------
def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def _three_calls(run_root: Path) -> None:
    async with node_client(settings_for(run_root, slots=3)) as (node, client):
        ids = []
        for _ in range(3):
            resp = await client.post("/calls", json=cheap_call(), headers=AUTH)
            assert resp.status == 201, await resp.text()
            body = await resp.json()
            assert body["state"] == "running" and resp.headers["Location"] == f"/calls/{body['id']}"
            ids.append(body["id"])
        resp = await client.post("/calls", json=cheap_call(), headers=AUTH)
        assert resp.status == 429, await resp.text()
        assert (await client.get("/healthz")).status == 429

        async def all_flowing(minimum: int, calls: list[str] = ids) -> bool:
            return all([video_frames(await get_call(client, i)) >= minimum for i in calls])

        await until(lambda: all_flowing(10), CALL_START_TIMEOUT_S, "media in all three calls")
        listed = (await (await client.get("/calls", headers=AUTH)).json())["calls"]
        assert sorted(c["id"] for c in listed) == sorted(ids) and {c["state"] for c in listed} == {"running"}
        for call_id in ids:  # each in its own private folder, its own session
            run_dir = run_root / call_id
            assert run_dir.stat().st_mode & 0o777 == 0o700
            assert all(p.stat().st_mode & 0o077 == 0 for p in run_dir.glob("*.sock"))
        sessions = {node.calls[i].session for i in ids}
        assert len(sessions) == 3

        # DELETE one: its processes are gone, the others' run on with the same pids and media advancing.
        a, b, c = ids
        before = {i: await get_call(client, i) for i in ids}
        a_session = node.calls[a].session
        resp = await client.delete(f"/calls/{a}", headers=AUTH)
        assert resp.status == 200, await resp.text()
        gone = await resp.json()
        assert (gone["state"], gone["end_reason"]) == ("ended", "deleted")
        assert a_session is not None and scan_sessions({a_session})[a_session] == []
        assert not any(pid_alive(p) for p in stage_pids(before[a]).values())
        await until(lambda: all_flowing(max(video_frames(before[i]) for i in (b, c)) + 20, [b, c]), 60,
                    "media to go on in the other calls")
        for i in (b, c):
            now = await get_call(client, i)
            assert stage_pids(now) == stage_pids(before[i]) and all(pid_alive(p) for p in stage_pids(now).values())

        # SIGKILL one stage of call b: supervisord restarts it; call c is untouched throughout.
        c_pids = stage_pids(await get_call(client, c))
        victim = stage_pids(await get_call(client, b))["source"]
        os.kill(victim, signal.SIGKILL)

        async def b_recovered() -> bool:
            view = await get_call(client, b)
            return view["stages"]["source"]["process"] == "RUNNING" and view["stages"]["source"]["pid"] != victim \
                and view["stages"]["source"]["frames_out"] > 20
        await until(b_recovered, 60, "call b's source to be restarted and sending")
        c_frames = video_frames(await get_call(client, c))

        async def c_advanced() -> bool:
            return video_frames(await get_call(client, c)) >= c_frames + 10
        await until(c_advanced, 60, "call c's media to go on")
        assert stage_pids(await get_call(client, c)) == c_pids
        assert (await get_call(client, c))["stages"]["sink"]["errors"] == {}

        # The freed slot takes a new call.
        resp = await client.post("/calls", json=cheap_call(), headers=AUTH)
        assert resp.status == 201, await resp.text()
        d = (await resp.json())["id"]
        await until(lambda: all_flowing(5, [d]), CALL_START_TIMEOUT_S, "media in the new call")

        async def d_source_reported() -> bool:  # the sink's figures can come before the source's first report
            return (await get_call(client, d))["stages"]["source"]["frames_out"] > 0
        await until(d_source_reported, 30, "the new call's source to report its figures")

        # PSS is weighed every few samples, and first when a call's processes may still be importing: wait for a
        # weighing of each call made while its stages run (floor: supervisord and two Python stages with numpy).
        async def weighed() -> bool:
            views = [await get_call(client, i) for i in (b, c, d)]
            return all(view["memory_bytes"] > CALL_MEMORY_FLOOR_BYTES for view in views)
        await until(weighed, 30, "each call's memory (PSS) to be weighed with its stages running")

        # /metrics agrees with the calls: counts exactly, frame counters between two readings of each call.
        views_before = {i: await get_call(client, i) for i in (b, c, d)}
        text = await (await client.get("/metrics", headers=AUTH)).text()
        views_after = {i: await get_call(client, i) for i in (b, c, d)}
        samples = metric_samples(text)
        assert samples[("sipbridge_calls_active", (("state", "running"),))] == 3
        assert samples[("sipbridge_calls_started_total", (("kind", "pipeline"),))] == 4
        assert samples[("sipbridge_calls_ended_total", (("reason", "deleted"),))] == 1
        assert samples[("sipbridge_calls_rejected_total", (("reason", "full"),))] == 1
        assert samples[("sipbridge_node_slots", ())] == 3 and samples[("sipbridge_node_free_slots", ())] == 0
        assert not any(dict(labels).get("call") == a for _, labels in samples)  # an ended call leaves no series
        for i in (b, c, d):
            for stage, key in (("sink", "frames_in"), ("source", "frames_out")):
                value = samples[(f"sipbridge_call_stage_{key}_total", (("call", i), ("stage", stage)))]
                low, high = views_before[i]["stages"][stage][key], views_after[i]["stages"][stage][key]
                assert low <= value <= high, (i, stage, key, low, value, high)
            assert samples[("sipbridge_call_processes", (("call", i),))] >= 3  # supervisord, source, sink
            assert samples[("sipbridge_call_memory_bytes", (("call", i),))] > CALL_MEMORY_FLOOR_BYTES
            assert samples[("sipbridge_call_stage_latency_ms", (("call", i), ("quantile", "0.5"), ("stage", "sink"),
                                                                ("stream", "video0")))] >= 0
        assert 0.0 <= samples[("sipbridge_node_cpu_busy_ratio", ())] <= 1.0
        assert samples[("sipbridge_node_process_resident_memory_bytes", ())] > 0

        sessions = {i: node.calls[i].session for i in (b, c, d)}
    # Leaving the block drained the node: every call's processes are gone.
    assert all(scan_sessions({s})[s] == [] for s in sessions.values() if s is not None)


@pytest.mark.timeout(300)
def test_three_calls_at_once_fourth_refused_delete_and_kill_leave_the_others(run_root: Path) -> None:
    asyncio.run(_three_calls(run_root))


async def _call_ends_by_itself(run_root: Path) -> None:
    async with node_client(settings_for(run_root, slots=1)) as (node, client):
        lossless = cheap_call(frames=20)  # every frame counts here: no stale-frame skipping on a loaded machine
        for stage in lossless["stage"]:
            stage["args"] = [*stage.get("args", []), "--video-policy", "all"]
        resp = await client.post("/calls", json=lossless, headers=AUTH)
        assert resp.status == 201, await resp.text()
        call_id = (await resp.json())["id"]

        async def ended() -> Any:
            view = await get_call(client, call_id)
            return view if view["state"] == "ended" else None
        view = await until(ended, CALL_START_TIMEOUT_S, "a 2 s call to end")
        assert view["end_reason"] == "completed", view
        assert view["stages"]["sink"]["streams"]["video0"]["frames_in"] == 20
        assert (await client.get("/healthz")).status == 200  # its slot is free again
        assert node.ended["completed"] == 1


def test_a_call_whose_stages_end_frees_its_slot(run_root: Path) -> None:
    asyncio.run(_call_ends_by_itself(run_root))


SIP_SECRET = "sip-secret-for-the-scan-31337"


def secret_call() -> dict[str, Any]:
    """A janus stage given a SIP secret (it talks to no Janus: the port is closed, it keeps reconnecting)."""
    return {"stage": [
        {"name": "source", "kind": "source", "args": ["--width", "160", "--height", "120", "--fps", "10"]},
        {"name": "encoder", "kind": "encoder", "inputs": ["source"], "args": ["--audio-codec", "pcmu"]},
        {"name": "janus", "kind": "janus", "inputs": ["encoder"],
         "args": ["--janus-url", f"ws://127.0.0.1:{free_tcp_port()}", "--call", "sip:peer@127.0.0.1:5999"],
         "secrets": {"SIPBRIDGE_STAGE_JANUS_SECRET": "env:SBN_SIP_SECRET"}},
    ]}


async def _secrets(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBN_SIP_SECRET", SIP_SECRET)
    async with node_client(settings_for(run_root, slots=2)) as (node, client):
        bad = secret_call()
        bad["stage"][0]["secrets"] = {"X": "env:SBN_SIP_SECRET"}
        resp = await client.post("/calls", json=bad, headers=AUTH)
        assert resp.status == 400 and "only a janus stage takes secrets" in (await resp.json())["error"]
        resp = await client.post("/calls", json=secret_call(), headers=AUTH)
        assert resp.status == 201, await resp.text()
        call_id = (await resp.json())["id"]

        async def janus_running() -> Any:
            view = await get_call(client, call_id)
            pid = view["stages"].get("janus", {}).get("pid")
            return pid if pid and view["stages"]["janus"]["process"] == "RUNNING" and "janus" in view["stages"] \
                and Path(f"/proc/{pid}/cmdline").read_bytes().find(b"sipbridge.secretenv") < 0 else None
        janus_pid = await until(janus_running, CALL_START_TIMEOUT_S, "the janus stage running with its secrets")
        session = node.calls[call_id].session
        assert session is not None
        procs = scan_sessions({session})[session]
        assert len(procs) >= 4  # supervisord, source, encoder, janus
        holders = []
        for info in procs:
            environ = Path(f"/proc/{info.pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes()
            assert TOKEN.encode() not in environ + cmdline, f"the API token reached pid {info.pid}"
            assert SIP_SECRET.encode() not in cmdline
            if SIP_SECRET.encode() in environ:
                holders.append(info.pid)
        assert holders == [janus_pid], (holders, janus_pid)
        for path in (run_root / call_id).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert SIP_SECRET.encode() not in data and TOKEN.encode() not in data, path
        metrics = await (await client.get("/metrics", headers=AUTH)).text()
        view = await (await client.get(f"/calls/{call_id}", headers=AUTH)).text()
        assert SIP_SECRET not in metrics + view and TOKEN not in metrics + view


def test_secrets_reach_only_the_janus_stage_and_the_token_no_call(run_root: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_secrets(run_root, monkeypatch))


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(240)
def test_sigterm_drains_and_exits_0(run_root: Path, tmp_path: Path) -> None:
    port = free_tcp_port()
    log_path = tmp_path / "node.log"
    env = {**os.environ, "SBN_TEST_TOKEN": TOKEN}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*SIPBRIDGE, "node", "--port", str(port), "--token", "env:SBN_TEST_TOKEN",
                                 "--slots", "3", "--cpu-ceiling", "1.0", "--run-root", str(run_root),
                                 "--allow-pipelines", "--drain-timeout-s", "40"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(_drain(proc, port, run_root))
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    print(text)
    # The short call ended by itself during the drain; the endless one was hung up at the drain limit.
    assert re.search(r"call \w+: ended \(completed\)", text) and re.search(r"call \w+: ended \(drained\)", text)
    assert "drained 1" in text and "completed 1" in text


async def _drain(proc: subprocess.Popen[bytes], port: int, run_root: Path) -> None:
    base = f"http://127.0.0.1:{port}"
    async with ClientSession() as http:
        async def healthy() -> bool:
            with contextlib.suppress(OSError):
                async with http.get(f"{base}/healthz") as resp:
                    return resp.status == 200
            return False
        await until(healthy, 30, "the node's API")
        ids = []
        for body in (cheap_call(frames=60), cheap_call()):  # 6 s, and endless
            async with http.post(f"{base}/calls", json=body, headers=AUTH) as resp:
                assert resp.status == 201, await resp.text()
                ids.append((await resp.json())["id"])

        async def flowing() -> bool:
            for call_id in ids:
                async with http.get(f"{base}/calls/{call_id}", headers=AUTH) as resp:
                    if video_frames(await resp.json()) < 5:
                        return False
            return True
        await until(flowing, CALL_START_TIMEOUT_S, "media in both calls")
        async with http.get(f"{base}/node", headers=AUTH) as resp:
            sessions = [c["id"] for c in (await resp.json())["calls"]]
        assert sorted(sessions) == sorted(ids)
        pids = set()
        for call_id in ids:
            async with http.get(f"{base}/calls/{call_id}", headers=AUTH) as resp:
                pids |= set(stage_pids(await resp.json()).values())

        proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            async with http.get(f"{base}/healthz") as resp:
                return resp.status == 503
        await until(draining, 20, "healthz to say 503")
        async with http.post(f"{base}/calls", json=cheap_call(), headers=AUTH) as resp:
            assert resp.status == 503 and (await resp.json())["error"] == "node is draining: no new calls"
        async with http.get(f"{base}/calls/{ids[1]}", headers=AUTH) as resp:
            assert (await resp.json())["state"] == "running"  # still going while the node waits
    await until(lambda: proc.poll() is not None, 90, "the node to exit")
    assert not any(pid_alive(p) for p in pids), "a call's process outlived the node"
    assert sorted(p.name for p in run_root.iterdir()) == sorted(ids)  # folders kept for their logs


# ----- a real SIP call through the node ---------------------------------------------------------------------
SIPP_PORT = 5090
SIPP_MEDIA_PORT = 6000


def sip_call(janus_url: str, port: int = SIPP_PORT) -> dict[str, Any]:
    """The SIP leg of a bridged call without the browser: test pattern + tone -> H.264 + PCMU -> janus stage ->
    Janus -> SIP peer (sipp echoes the RTP) -> janus stage -> decoder -> sink."""
    return {"stage": [
        {"name": "source", "kind": "source", "args": ["--width", "160", "--height", "120", "--fps", "10"]},
        {"name": "encoder", "kind": "encoder", "inputs": ["source"],
         "args": ["--video-codec", "h264", "--audio-codec", "pcmu", "--fps", "10"]},
        {"name": "janus", "kind": "janus", "inputs": ["encoder"],
         "args": ["--janus-url", janus_url, "--call", f"sip:peer@127.0.0.1:{port}", "--audio-codec", "pcmu",
                  "--video-codec", "h264"]},
        {"name": "decoder", "kind": "decoder", "inputs": ["janus"]},
        {"name": "sink", "kind": "sink", "inputs": ["decoder"]},
    ]}


async def _sip_call(run_root: Path, janus_url: str, sipp: Any, sipp_dir: Path, second: Any, busy: Any) -> None:
    async with node_client(settings_for(run_root, slots=2)) as (node, client):
        resp = await client.post("/calls", json=sip_call(janus_url), headers=AUTH)
        assert resp.status == 201, await resp.text()
        call_id = (await resp.json())["id"]

        async def echoed() -> Any:
            view = await get_call(client, call_id)
            streams = view["stages"].get("sink", {}).get("streams", {})
            up = (view["sip"] or {}).get("state") == "media_up"
            return view if up and streams.get("sip-video", {}).get("frames_in", 0) >= 10 else None
        view = await until(echoed, CALL_START_TIMEOUT_S, "the SIP call up and the echo back at the sink")
        sip = view["sip"]
        assert (sip["direction"], sip["audio_codec"], sip["video_codec"]) == ("outbound", "PCMU", "H264"), sip
        assert sip["peer"] == f"sip:peer@127.0.0.1:{SIPP_PORT}"

        resp = await client.post(f"/calls/{call_id}/dtmf", json={"digits": "19*"}, headers=AUTH)
        assert resp.status == 200, await resp.text()

        def digits_at_peer() -> list[str]:
            logs = "".join(p.read_text(errors="replace") for p in sipp_dir.glob("*_logs.log"))
            return re.findall(r"DTMF received (\S)", logs)
        await until(lambda: len(digits_at_peer()) >= 3, 30, "three DTMF digits at the SIP peer")
        assert digits_at_peer() == ["1", "9", "*"]

        async def peer_digits_back() -> bool:  # the peer answers with 7 and # (SIP INFO) before it waits for BYE
            return (await get_call(client, call_id))["stages"]["janus"]["extra"].get("dtmf_received", 0) >= 2
        await until(peer_digits_back, 30, "the peer's two DTMF digits at the janus stage")

        metrics = metric_samples(await (await client.get("/metrics", headers=AUTH)).text())
        assert metrics[("sipbridge_call_sip_media_up", (("call", call_id),))] == 1
        session = node.calls[call_id].session
        resp = await client.delete(f"/calls/{call_id}", headers=AUTH)
        assert resp.status == 200, await resp.text()
        gone = await resp.json()
        assert (gone["state"], gone["end_reason"]) == ("ended", "deleted")
        assert session is not None and scan_sessions({session})[session] == []
        # The peer got a BYE and answered it: its scenario (INVITE, DTMF both ways, BYE) completed.
        assert await asyncio.to_thread(sipp.wait, 15) == 0, sipp.output()
        assert "BYE sip:" in sipp.messages()

        # A peer that answers 486: the call ends by itself, failed, with the SIP code for the submitter to read.
        resp = await client.post("/calls", json=sip_call(janus_url, busy.port), headers=AUTH)
        assert resp.status == 201, await resp.text()
        busy_id = (await resp.json())["id"]

        async def refused() -> Any:
            view = await get_call(client, busy_id)
            return view if view["state"] == "ended" else None
        view = await until(refused, CALL_START_TIMEOUT_S, "the call refused with 486 to end")
        assert view["end_reason"] == "sip_failed" and view["error"] == "SIP failed 486 Busy Here", view
        assert view["sip"]["code"] == 486

        # A drain that reaches its limit hangs the running call up the same way: BYE, the peer's scenario done.
        resp = await client.post("/calls", json=sip_call(janus_url, second.port), headers=AUTH)
        assert resp.status == 201, await resp.text()
        second_id = (await resp.json())["id"]

        async def second_up() -> bool:
            return ((await get_call(client, second_id))["sip"] or {}).get("state") == "media_up"
        await until(second_up, CALL_START_TIMEOUT_S, "the second SIP call up")
        await node.drain(timeout_s=1.0)
        view = await get_call(client, second_id)
        assert (view["state"], view["end_reason"]) == ("ended", "drained")
        assert (await client.get("/healthz")).status == 503
        assert await asyncio.to_thread(second.wait, 15) == 0, second.output()
        assert "BYE sip:" in second.messages()


@pytest.mark.media
@pytest.mark.timeout(180)
def test_sip_calls_through_the_node_dtmf_delete_and_drain_send_bye(netns: Any, janus: Any, run_root: Path,
                                                               tmp_path: Path) -> None:
    from tests.sipfix import Sipp

    sipp_dir = tmp_path / "sipp"
    sipp = Sipp("uas_dtmf", sipp_dir, SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo", "-trace_logs"]).start()
    second = Sipp("uas_echo", tmp_path / "sipp2", SIPP_PORT + 2, SIPP_MEDIA_PORT + 10, extra=["-rtp_echo"]).start()
    busy = Sipp("uas_486", tmp_path / "sipp3", SIPP_PORT + 4, SIPP_MEDIA_PORT + 20).start()
    try:
        asyncio.run(_sip_call(run_root, janus.ws_url, sipp, sipp_dir, second, busy))
    finally:
        sipp.stop()
        second.stop()
        busy.stop()


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify on the shipped unit, its install paths pointed at this checkout."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    checkout = Path(__file__).resolve().parent.parent
    unit = (checkout / "deploy" / "sipbridge-node.service").read_text()
    assert "KillMode=mixed" in unit and "RuntimeDirectory=sipbridge" in unit
    assert "ExecStart=/opt/sipbridge/.venv/bin/python -m sipbridge node --config /etc/sipbridge/node.toml" in unit
    (tmp_path / "node.env").write_text("SIPBRIDGE_NODE_TOKEN=x\n")
    python = Path(sys.executable)
    local = (unit.replace("/opt/sipbridge/.venv/bin/python", str(python)).replace("/opt/sipbridge", str(checkout))
             .replace("/etc/sipbridge/node.env", str(tmp_path / "node.env")))
    path = tmp_path / "sipbridge-node.service"
    path.write_text(local)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sipbridge-node.service" not in result.stderr, result.stderr  # no warning about the unit itself


# ----- a real bridged call (room bot, codec stages, SIP) started over the API ------------------------------
async def _bridged(call: Any, run_root: Path) -> None:
    import tomllib

    body = tomllib.loads(call.options.bridge_toml())  # the harness's bridge.toml, sent as JSON
    async with node_client(settings_for(run_root, slots=1, allow_pipelines=False)) as (node, client):
        resp = await client.post("/calls", json=body, headers=AUTH)
        assert resp.status == 201, await resp.text()
        call_id = (await resp.json())["id"]
        assert (await client.post("/calls", json=body, headers=AUTH)).status == 429  # one slot

        # Media both ways through every stage: the room's video at the janus stage (composed, encoded), the SIP
        # echo at the bot (decoded). Whether its pixels reach the room's viewers is the bridge's own test
        # (test_cheap_room, test_bridge_e2e); this one is about the node running the bridge configuration.
        def stream_in(view: dict[str, Any], stage: str, stream: str) -> int:
            return int(view["stages"].get(stage, {}).get("streams", {}).get(stream, {}).get("frames_in", 0))

        async def both_ways() -> Any:
            view = await get_call(client, call_id)
            up = (view["sip"] or {}).get("state") == "media_up"
            flowing = stream_in(view, "janus", "room-video") >= 10 and stream_in(view, "browser", "sip-video") >= 10
            return view if up and flowing else None
        try:
            await until(both_ways, 150, "media both ways through the bridge")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {json.dumps((await get_call(client, call_id))['stages'])[:3000]}\n"
                                 f"{(run_root / call_id / 'logs' / 'browser.log').read_text()[-3000:]}") from None
        view = await get_call(client, call_id)
        sip = view["sip"]
        assert (sip["state"], sip["audio_codec"], sip["video_codec"]) == ("media_up", "PCMU", "H264"), sip
        for stage in ("browser", "room-decoder", "room-transformer", "sip-encoder", "janus", "sip-decoder"):
            assert view["stages"][stage]["process"] == "RUNNING", (stage, view["stages"][stage])
        samples = metric_samples(await (await client.get("/metrics", headers=AUTH)).text())
        for way, stage, stream in (("room_to_sip", "janus", "room-video"), ("sip_to_room", "browser", "sip-video")):
            value = samples[("sipbridge_call_latency_ms", (("call", call_id), ("direction", way), ("media", "video"),
                                                           ("quantile", "0.5")))]
            assert value == samples[("sipbridge_call_stage_latency_ms", (("call", call_id), ("quantile", "0.5"),
                                                                          ("stage", stage), ("stream", stream)))]
            assert value > 0
        resp = await client.delete(f"/calls/{call_id}", headers=AUTH)
        assert resp.status == 200 and (await resp.json())["end_reason"] == "deleted"
        session = node.calls[call_id].session
        assert session is not None and scan_sessions({session})[session] == []  # Chromium's helpers included
    # The hang-up reached the SIP peer: BYE answered, scenario done.
    assert await asyncio.to_thread(call.procs["sipp"].wait, 15) == 0


@pytest.mark.media
@pytest.mark.timeout(300)
def test_a_bridged_call_started_over_the_api(run_root: Path, tmp_path: Path) -> None:
    """A bridge configuration (not a pipeline) through POST /calls: the room bot joins the local room where a
    browserless participant publishes, its picture goes to a sipp echo as H.264 + PCMU, the echo comes back to
    the bot, and DELETE hangs up with BYE and leaves no process (Chromium's included)."""
    from sipbridge.testing.localcall import CallOptions, LocalCall

    for tool in ("janus", "sipp", "tshark", "chromium"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")

    class NodeCall(LocalCall):
        def _start_bridge(self) -> None:  # the node starts the bridge, over its API
            pass

    options = CallOptions(participants=[("alice", 440.0)], room_codec="vp8", layout="single", max_tiles=1,
                          split=None, layout_ids=["alice/video"], width=320, height=240, generators="aiortc")
    with NodeCall(tmp_path / "run", options) as call:
        asyncio.run(_bridged(call, run_root))
