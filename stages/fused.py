"""Several adjacent stages in one process (the idea of Flink's operator chaining), as configuration.

``sipbridge stage fused --stage "decoder --name room-decoder --in ..." --stage "transformer --name ..."`` builds
each stage from its own command line, exactly as ``sipbridge stage KIND`` would, and runs them on one event loop.
Nothing else changes: each stage keeps its codec thread, its sockets, its statistics and its edge semantics
(bounded queues, drop policy, keyframe requests upstream, end of stream): the edges between them stay ZeroMQ
ipc sockets, now between threads of one process. What is saved is the processes: an interpreter, its imports and
its scheduling per stage. A bridge file asks for it with ``[processes] fuse = [["room-decoder", ...]]``
(sipbridge/graph.py renders the group as one program).

SIGTERM stops the stages in the order given (upstream first), each flushing and sending its end of stream
before the next is stopped, as supervisord would stop them one program after the other. A stage that fails
ends the process with exit code 1 at once, without end of stream: a crash is not an end, and the consumers
outside keep their state for the restart.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import signal
import sys

import click

from stages import options as stage_options_module
from stages.base import Stage

log = logging.getLogger("sipbridge")


def build_stages(command_lines: list[str]) -> list[Stage]:
    """Each ``KIND ARGS...`` command line as the stage ``sipbridge stage KIND ARGS...`` would run."""
    from sipbridge.cli import _load, stage_kinds

    kinds = stage_kinds()
    built: list[Stage] = []
    for line in command_lines:
        argv = shlex.split(line)
        if not argv or argv[0] not in kinds or argv[0] == "fused":
            raise click.BadParameter(f"{line!r} must start with a stage kind ({', '.join(sorted(kinds))})",
                                     param_hint="--stage")
        command = _load(kinds[argv[0]])
        collected: list[Stage] = []
        stage_options_module.collecting = collected
        try:
            # The environment prefix `sipbridge stage KIND` has: SIPBRIDGE_STAGE_JANUS_SECRET reaches the janus stage.
            command.main(argv[1:], prog_name=f"sipbridge stage {argv[0]}", standalone_mode=False,
                         auto_envvar_prefix=f"SIPBRIDGE_STAGE_{argv[0].upper().replace('-', '_')}")
        finally:
            stage_options_module.collecting = None
        if len(collected) != 1:
            raise click.ClickException(f"{argv[0]} did not build a stage from {line!r}")
        built.append(collected[0])
    return built


async def run_fused(stages: list[Stage]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for stage in stages:
        stage.own_signals = False
    tasks = [asyncio.create_task(stage.run(), name=stage.name) for stage in stages]
    stop_wait = asyncio.create_task(stop.wait())
    pending = set(tasks)
    while pending and not stop.is_set():
        done, _ = await asyncio.wait([*pending, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stop_wait}:
            pending.discard(task)
            code = task.result() if task.exception() is None else 1
            if code != 0:
                log.error("fused stage %s exited %d: the process exits 1 (its stages are restarted together)",
                          task.get_name(), code)
                return 1
    # Stopped: one stage after the other, upstream first, each flushing and ending its streams before the next.
    for stage, task in zip(stages, tasks, strict=True):
        if not task.done():
            log.info("stopping fused stage %s", stage.name)
            stage.request_stop()
        await asyncio.wait([task])
    stop_wait.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)  # a late SIGTERM must not turn the clean exit into a kill
    codes = [task.result() if task.exception() is None else 1 for task in tasks]
    return max(codes, default=0)


@click.command("fused")
@click.option("--stage", "command_lines", multiple=True, required=True,
              help='One stage as "KIND ARGS..." (repeat, upstream first); each runs as `sipbridge stage KIND ARGS`.')
def command(command_lines: tuple[str, ...]) -> None:
    """Run several adjacent stages in one process, each with its own codec thread and sockets."""
    stages = build_stages(list(command_lines))
    code = asyncio.run(run_fused(stages))
    sys.stdout.flush()
    raise SystemExit(code)
