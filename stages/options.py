"""Options every stage command shares, and the glue from click to ``Stage.run``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from stages.base import (
    DEFAULT_VIDEO_HWM_MSGS,
    StageOptions,
    VideoPolicy,
    configure_logging,
    default_endpoint,
    run_stage,
)

F = TypeVar("F", bound=Callable[..., Any])


def stage_options(default_name: str, has_inputs: bool = True, has_output: bool = True) -> Callable[[F], F]:
    """Add --name, --in, --out, --stats, --video-policy, --hwm and --log-level to a stage command."""

    def decorate(fn: F) -> F:
        opts = [
            click.option("--name", default=default_name, show_default=True, help="Stage name in logs and statistics."),
            click.option("--stats", "stats", default=None, help="Statistics PUB endpoint [ipc://RUN_DIR/NAME.stats]."),
            click.option(
                "--video-policy",
                type=click.Choice([p.value for p in VideoPolicy]),
                default=VideoPolicy.LATEST.value,
                show_default=True,
                help="latest: drop stale video (real time); all: lose nothing (offline, benchmarks).",
            ),
            click.option(
                "--hwm",
                type=int,
                default=DEFAULT_VIDEO_HWM_MSGS,
                show_default=True,
                help="High-water mark of each data socket, in messages.",
            ),
            click.option("--log-level", default="INFO", show_default=True),
        ]
        if has_inputs:
            opts.append(
                click.option(
                    "--in",
                    "inputs",
                    multiple=True,
                    required=True,
                    help="Upstream output endpoint to connect to (repeatable).",
                )
            )
        if has_output:
            opts.append(
                click.option(
                    "--out", "output", default=None, help="Output endpoint this stage binds [ipc://RUN_DIR/NAME.sock]."
                )
            )
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


def build_options(params: dict[str, Any], has_output: bool = True) -> StageOptions:
    """Pop the shared options out of a command's keyword arguments."""
    name = params.pop("name")
    configure_logging(params.pop("log_level"))
    output = params.pop("output", None)
    if has_output and output is None:
        output = default_endpoint(name)
    stats = params.pop("stats") or default_endpoint(name, "stats")
    return StageOptions(
        name=name,
        inputs=list(params.pop("inputs", ())),
        output=output,
        stats=stats,
        video_policy=VideoPolicy(params.pop("video_policy")),
        hwm=params.pop("hwm"),
    )


# Set by a fused process (stages/fused.py) while it builds its stages: ``run`` hands the stage over instead.
collecting: list[Any] | None = None


def run(stage: Any) -> None:
    if collecting is not None:
        collecting.append(stage)
        return
    raise SystemExit(run_stage(stage))
