"""`sipbridge node`: one long-running service per host that runs many calls, started and stopped over an HTTP API.

Settings come from the command line, then SIPBRIDGE_NODE_* variables (SIPBRIDGE_NODE_SLOTS=3), then the
``[node]`` table of ``--config node.toml`` (see examples/node.toml), then the defaults. SIGTERM drains: no new
call is admitted (/healthz answers 503), running calls get ``drain_timeout_s`` to end, the rest are hung up
cleanly, and the node exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tomllib
from pathlib import Path
from typing import Any

import click

from sipbridge.node.config import (
    DEFAULT_CPU_CEILING,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_LISTEN,
    DEFAULT_PORT,
    NodeConfigError,
    NodeSettings,
    check,
    default_run_root,
    default_slots,
    token_env_name,
)

log = logging.getLogger("sipbridge.node")

NODE_KEYS = {"listen", "port", "token", "auth", "slots", "cpu_ceiling", "run_root", "drain_timeout_s",
             "allow_pipelines", "name", "sip", "inbound", "inbound_ready_timeout_s", "cluster_redis",
             "janus_api_secret_file"}


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--config FILE``: its [node] table gives option defaults (below the command line and environment)."""
    if not value:
        return
    try:
        with open(value, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise click.BadParameter(f"config file not found: {value}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from None
    table = data.get("node")
    if not isinstance(table, dict):
        raise click.BadParameter(f"{value} needs a [node] table")
    unknown = set(table) - NODE_KEYS
    if unknown:
        raise click.BadParameter(f"{value}: unknown key node.{sorted(unknown)[0]}")
    if isinstance(table.get("inbound"), str):
        # A relative inbound bridge file is next to the node's config file, wherever the node is started from.
        table["inbound"] = str(Path(value).resolve().parent / table["inbound"])
    if isinstance(table.get("janus_api_secret_file"), str):
        table["janus_api_secret_file"] = str(Path(value).resolve().parent / table["janus_api_secret_file"])
    ctx.default_map = {**(ctx.default_map or {}), **table}


async def serve(settings: NodeSettings, token: str | None) -> None:
    from aiohttp import web

    from sipbridge.node.api import make_app
    from sipbridge.node.service import Node

    node = Node(settings)
    if settings.inbound:
        node.inbound = load_inbound(node, settings.inbound, settings.inbound_ready_timeout_s)
    await node.start()
    runner = web.AppRunner(make_app(node, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await node.close()
        raise click.ClickException(f"cannot listen on {settings.listen}:{settings.port}: {exc}") from None
    front = None
    if settings.sip:
        from sipbridge.cluster.noderunner import start_front

        host, _, sip_port = settings.sip.rpartition(":")
        try:
            front = await start_front(node, host, int(sip_port))
        except OSError as exc:
            await runner.cleanup()
            await node.close()
            raise click.ClickException(f"cannot listen for SIP on udp {settings.sip}: {exc}") from None
        if node.inbound is not None:
            node.inbound.front = (front.host, front.port)
            log.info("node %s: inbound calls: dial %s (callers matching %s; each call its own pipeline)", node.name,
                     node.inbound.dial_uri(), node.inbound.accept_from.pattern)
        else:
            log.info("node %s: SIP front on udp %s:%d (no inbound bridge: INVITEs are answered 503)", node.name,
                     front.host, front.port)
    member = None
    if settings.cluster_redis:
        from sipbridge.cluster.noderunner import join_cluster

        member = await join_cluster(node, settings.cluster_redis, front=front,
                                    api_address=f"http://{settings.listen}:{settings.port}")
        log.info("node %s: cluster member (redis %s, SIP front %s)", node.name, settings.cluster_redis,
                 settings.sip or "off")
    log.info("node %s: API on http://%s:%d (%s), %d slot(s), CPU ceiling %.2f, run folders in %s", node.name,
             settings.listen, settings.port, "bearer token" if token else "NO AUTH, loopback only", settings.slots,
             settings.cpu_ceiling, settings.run_root)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.info("second %s: hanging up every call now", signal.Signals(signum).name)
            hurry.set()
        else:
            log.info("%s: draining", signal.Signals(signum).name)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await stop.wait()
        # The API keeps answering while the node drains: /healthz says 503, POST /calls is refused.
        drain = asyncio.create_task(node.drain())
        hurried = asyncio.create_task(hurry.wait())
        await asyncio.wait({drain, hurried}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await node.drain(timeout_s=0)
        hurried.cancel()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        if member is not None:
            await member.close()  # after the drain: the last calls' ends are recorded in Redis
        if front is not None:
            front.close()  # after the drain: it answered 503 meanwhile
        if node.inbound is not None:
            await node.inbound.close()
        await node.close()
    log.info("node %s: stopped (%s)", node.name, ", ".join(f"{k} {v}" for k, v in sorted(node.ended.items()))
             or "no calls")


def load_inbound(node: Any, path: str, ready_timeout_s: float = 55.0) -> Any:
    """The node's inbound bridge file, checked as each INVITE's call will be (ClickException naming the key)."""
    from sipbridge.node.inbound import InboundCalls, InboundConfigError

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise click.ClickException(f"inbound: cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.ClickException(f"inbound: {path} is not valid TOML: {exc}") from None
    try:
        return InboundCalls(node, data, source=path, ready_timeout_s=ready_timeout_s)
    except InboundConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("node")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_config, help="TOML file with a [node] table (see examples/node.toml).")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="Address of the HTTP API.")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--token", default=None, help='Bearer token of the API, as "env:NAME" (never the token itself).')
@click.option("--auth/--no-auth", default=True, show_default=True,
              help="--no-auth: no token, allowed only on a loopback address (development).")
@click.option("--slots", type=int, default=None,
              help="Calls at once [cores x cpu-ceiling / 1.0 core per bridged call, at least 1].")
@click.option("--cpu-ceiling", type=float, default=DEFAULT_CPU_CEILING, show_default=True,
              help="Refuse calls while the host's CPU is busier than this share of all cores (1.0 = never).")
@click.option("--run-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where each call's private run folder is made [/run/sipbridge as root, else "
                   "$XDG_RUNTIME_DIR/sipbridge].")
@click.option("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S, show_default=True,
              help="On SIGTERM, how long running calls may go on before they are hung up.")
@click.option("--allow-pipelines/--no-allow-pipelines", default=False, show_default=True,
              help="Also take [[stage]] pipelines of project stages as calls (tests, load generators).")
@click.option("--name", default="", help="Node name in logs and the state snapshot [host name].")
@click.option("--sip", default=None,
              help="IP:PORT of the node's SIP front (UDP): callers' and Kamailio's INVITEs, Kamailio's probes.")
@click.option("--inbound", default=None, type=click.Path(dir_okay=False),
              help="Bridge file (sip.inbound = true, accept_from, routes) each inbound call runs; needs --sip.")
@click.option("--inbound-ready-timeout-s", type=float, default=55.0, show_default=True,
              help="How long an INVITE waits for its call to listen before 500 (under a proxy's INVITE timer).")
@click.option("--cluster-redis", default=None,
              help="Cluster mode: take API-started calls from this Redis (redis://HOST:PORT/DB); POST /calls queues.")
@click.option("--janus-api-secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The node's Janus API secret (0600 file, as `sipbridge janus-server` writes it) for calls whose "
                   "bridge names none.")
@click.option("--log-level", default="INFO", show_default=True)
def command(listen: str, port: int, token: str | None, auth: bool, slots: int | None, cpu_ceiling: float,
            run_root: Path | None, drain_timeout_s: float, allow_pipelines: bool, name: str,
            sip: str | None, inbound: str | None, inbound_ready_timeout_s: float, cluster_redis: str | None,
            janus_api_secret_file: Path | None, log_level: str) -> None:
    """Run many calls on this host behind an HTTP API (admission, drain on SIGTERM, Prometheus metrics)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s node %(levelname)s %(message)s")
    try:
        settings = NodeSettings(
            listen=listen, port=port, token_env=token_env_name(token) if token else None, auth=auth,
            slots=slots if slots is not None else default_slots(cpu_ceiling), cpu_ceiling=cpu_ceiling,
            run_root=(run_root or default_run_root()).resolve(), drain_timeout_s=drain_timeout_s,
            allow_pipelines=allow_pipelines, name=name, sip=sip, inbound=inbound,
            inbound_ready_timeout_s=inbound_ready_timeout_s, cluster_redis=cluster_redis,
            janus_api_secret_file=janus_api_secret_file,
        )
        api_token = check(settings)
    except NodeConfigError as exc:
        raise click.ClickException(str(exc)) from None
    asyncio.run(serve(settings, api_token))


__all__: list[Any] = ["command"]
