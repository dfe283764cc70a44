"""``sipbridge cluster``: render Kamailio's config, submit calls, show the cluster, run a hold-call node."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import click

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_OPTION = click.option("--redis", "redis_url", default=DEFAULT_REDIS_URL, envvar="SIPBRIDGE_REDIS_URL",
                            help="Redis URL of the cluster (redis://HOST:PORT/DB).")
PREFIX_OPTION = click.option("--prefix", default="sb", help="Prefix of the cluster's Redis keys.")


@click.group("cluster")
def command() -> None:
    """Many nodes: Kamailio in front for inbound calls, a Redis stream for API-started calls."""


@command.command("kamailio-config")
@click.option("--node", "nodes", multiple=True, required=True,
              help="A node's SIP front: sip:HOST[:PORT][,slots=N][,id=NAME] (repeat per node).")
@click.option("--slots", default=2, type=click.IntRange(1, 10000), help="Slots of nodes that do not say.")
@click.option("--listen", default="127.0.0.1:5060", help="Kamailio's UDP IP:PORT.")
@click.option("--ping-interval-s", default=5, type=click.IntRange(1, 3600),
              help="OPTIONS probing interval: how long a full, draining or dead node may still be picked.")
@click.option("--fr-timer-ms", default=2000, type=click.IntRange(100, 60000),
              help="How long a node may stay silent on an INVITE before the next one is tried.")
@click.option("--out", "out_dir", default="kamailio", type=click.Path(file_okay=False), help="Output folder.")
@click.option("--check/--no-check", default=True, help="Run `kamailio -c` on the result.")
def kamailio_config(nodes: tuple[str, ...], slots: int, listen: str, ping_interval_s: int, fr_timer_ms: int,
                    out_dir: str, check: bool) -> None:
    """Write OUT/kamailio.cfg and OUT/dispatcher.list for these nodes."""
    from sipbridge.cluster import kamailio

    try:
        parsed = [kamailio.parse_node(spec, slots, i) for i, spec in enumerate(nodes, 1)]
        cfg = kamailio.render(parsed, listen=listen, out_dir=Path(out_dir), ping_interval_s=ping_interval_s,
                              fr_timer_ms=fr_timer_ms)
        if check:
            kamailio.check(cfg)
    except kamailio.KamailioConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {cfg} and {Path(out_dir) / 'dispatcher.list'} ({len(parsed)} nodes)")
    click.echo("run: " + " ".join(kamailio.command(cfg)))


def _bridge_dict(path: str) -> dict[str, Any]:
    from sipbridge.bridge import BridgeConfigError, parse_bridge

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    try:
        parse_bridge(data)  # the same validation as `sipbridge up`: refuse before it reaches any node
    except BridgeConfigError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    return data


async def _with_store(redis_url: str, prefix: str, fn: Any) -> Any:
    import redis.asyncio as aioredis

    from sipbridge.cluster.streams import CallStore

    client = aioredis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        return await fn(CallStore(client, prefix))
    finally:
        await client.aclose()


@command.command("submit")
@click.argument("bridge_file", type=click.Path(dir_okay=False))
@click.option("--key", default=None, help="Idempotency key: submitting the same key again returns the first call.")
@click.option("--place-timeout-s", default=30.0, type=click.FloatRange(1, 86400),
              help="Fail the call with a reason when no node has taken it within this time.")
@click.option("--wait-s", default=0.0, type=click.FloatRange(0, 86400),
              help="Wait up to this long for the call to be up (or to fail) and print its state.")
@REDIS_OPTION
@PREFIX_OPTION
def submit(bridge_file: str, key: str | None, place_timeout_s: float, wait_s: float, redis_url: str,
           prefix: str) -> None:
    """Queue the call of BRIDGE_FILE for the first node with a free slot; prints JSON with its id."""
    from redis.exceptions import RedisError

    config = _bridge_dict(bridge_file)

    async def go(store: Any) -> dict[str, Any]:
        call_id, created = await store.submit(config, key, place_timeout_s)
        deadline = time.monotonic() + wait_s
        call = await store.get_call(call_id) or {}
        while wait_s and call.get("state") not in ("up", "ended", "failed") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            call = await store.get_call(call_id) or {}
        return {"call": call_id, "created": created, "state": call.get("state"), "node": call.get("node"),
                "reason": call.get("reason")}

    try:
        result = asyncio.run(_with_store(redis_url, prefix, go))
    except (RedisError, OSError) as exc:
        raise click.ClickException(f"redis at {redis_url}: {exc}") from None
    click.echo(json.dumps(result))
    if result["state"] == "failed":
        raise SystemExit(1)


@command.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--calls", "calls_limit", default=50, type=click.IntRange(0, 100000), help="Newest calls to list.")
@REDIS_OPTION
@PREFIX_OPTION
def status(as_json: bool, calls_limit: int, redis_url: str, prefix: str) -> None:
    """Nodes (slots, free, draining, last seen) and calls (node, state, since) from Redis."""
    from redis.exceptions import RedisError

    try:
        view = asyncio.run(_with_store(redis_url, prefix, lambda store: store.status(calls_limit)))
    except (RedisError, OSError) as exc:
        raise click.ClickException(f"redis at {redis_url}: {exc}") from None
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    now = time.time()
    click.echo(f"{'node':<16} {'slots':>5} {'free':>5} {'draining':>8} {'last seen':>10}  sip")
    for n in view["nodes"]:
        age = now - float(n.get("last_seen") or 0)
        click.echo(f"{n['node']:<16} {n.get('slots', '?'):>5} {n.get('free', '?'):>5} "
                   f"{'yes' if n.get('draining') == '1' else 'no':>8} {age:>8.1f} s  {n.get('sip', '')}")
    click.echo("")
    click.echo(f"{'call':<18} {'state':<9} {'node':<16} {'since':>9} {'tries':>5}  reason")
    for c in view["calls"]:
        since = now - float(c.get("since") or now)
        click.echo(f"{c.get('id', '?'):<18} {c.get('state', '?'):<9} {c.get('node') or '-':<16} "
                   f"{since:>7.1f} s {c.get('attempts', '0'):>5}  {c.get('reason', '')}")


@command.command("node")
@click.option("--id", "node_id", required=True, help="This node's name in the cluster.")
@click.option("--sip", "sip_address", default="127.0.0.1:5060", help="IP:PORT of the node's SIP front.")
@click.option("--slots", default=2, type=click.IntRange(0, 10000))
@click.option("--hold-s", default=0.0, type=click.FloatRange(0),
              help="Hang up API-started calls after this long (0: never); inbound ones end with the caller's BYE.")
@click.option("--redis", "redis_url", default=None, envvar="SIPBRIDGE_REDIS_URL",
              help="Take API-started calls from this Redis (none: inbound only).")
@PREFIX_OPTION
@click.option("--stale-s", default=6.0, type=click.FloatRange(1), help="Reap calls not refreshed for this long.")
@click.option("--refresh-s", default=1.0, type=click.FloatRange(0.1), help="Refresh and heartbeat interval.")
@click.option("--drain-timeout-s", default=30.0, type=click.FloatRange(0),
              help="On SIGTERM: wait this long for calls to end, then hang up the rest.")
@click.option("--events", "events_path", default=None, type=click.Path(dir_okay=False),
              help="Append JSON lines of call events here.")
def node(node_id: str, sip_address: str, slots: int, hold_s: float, redis_url: str | None, prefix: str,
         stale_s: float, refresh_s: float, drain_timeout_s: float, events_path: str | None) -> None:
    """A cluster node whose calls are hold calls (SIP + RTP, no browser): placement tests and benches."""
    from sipbridge.cluster.holdnode import NodeOptions, run_node

    if stale_s <= 2 * refresh_s:
        raise click.BadParameter("must be more than twice --refresh-s", param_hint="--stale-s")
    host, _, port = sip_address.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("IP:PORT", param_hint="--sip")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s node {node_id} %(name)s: %(message)s")
    opts = NodeOptions(node_id=node_id, sip_host=host, sip_port=int(port), slots=slots, hold_s=hold_s,
                       redis_url=redis_url, prefix=prefix, stale_s=stale_s, refresh_s=refresh_s,
                       drain_timeout_s=drain_timeout_s, events_path=events_path)
    raise SystemExit(asyncio.run(run_node(opts)))
