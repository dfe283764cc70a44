"""The single ``sipbridge`` command group."""

from __future__ import annotations

import importlib
import importlib.metadata
import tomllib
from typing import Any

import click

# The registry of stage kinds: a new kind is one module with a click `command`, registered here (or, outside this
# project, as a `sipbridge.stages` entry point). Stage commands load lazily so `sipbridge status` does not import
# PyAV or Playwright.
STAGE_ENTRY_POINTS = "sipbridge.stages"
STAGE_COMMANDS: dict[str, str] = {
    "source": "stages.source:command",
    "sink": "stages.sink:command",
    "decoder": "stages.decoder:command",
    "encoder": "stages.encoder:command",
    "transformer": "stages.transformer:command",
    "janus": "stages.janus:command",
    "browser": "stages.browser:command",
    "fused": "stages.fused:command",  # several of the above in one process
}

# Top-level commands that live next to their subject (Janus server, namespaces, the local room).
EXTRA_COMMANDS: dict[str, str] = {
    "janus-server": "sipbridge.janus_server:command",
    "chromium": "stages.browser.keeper:command",
    "netns": "sipbridge.netns:command",
    "node": "sipbridge.node:command",
    "recipe": "sipbridge.recipe_check:command",
    "room": "sipbridge.room:command",
    "cluster": "sipbridge.cluster.cli:command",
}


def stage_kinds() -> dict[str, str]:
    """Every stage kind: the project's, then those installed packages register as ``sipbridge.stages`` entry points
    (``NAME = "module:command"``); a project kind keeps its name."""
    kinds = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=STAGE_ENTRY_POINTS)}
    return {**kinds, **STAGE_COMMANDS}


def _load(target: str) -> click.Command:
    module_name, _, attr = target.partition(":")
    command = getattr(importlib.import_module(module_name), attr)
    assert isinstance(command, click.Command)
    return command


class LazyStageGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(stage_kinds())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = stage_kinds().get(cmd_name)
        return _load(target) if target else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        kinds = stage_kinds()
        with formatter.section("Stages"):
            formatter.write_dl([(name, kinds[name]) for name in self.list_commands(ctx)])


class LazyTopGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *EXTRA_COMMANDS])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help lists commands by name only, so it never imports PyAV, aiortc or Playwright.
        rows = []
        for name in self.list_commands(ctx):
            command = self.commands.get(name)
            rows.append((name, command.get_short_help_str(60) if command else f"see `sipbridge {name} --help`"))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = EXTRA_COMMANDS.get(cmd_name)
        return _load(target) if target else super().get_command(ctx, cmd_name)


def load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise click.BadParameter(f"config file not found: {path}", param_hint="--config") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}", param_hint="--config") from None


@click.group(cls=LazyTopGroup, context_settings={"auto_envvar_prefix": "SIPBRIDGE", "show_default": True})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="SIPBRIDGE_CONFIG",
    help="TOML file whose tables give option defaults, e.g. [stage.encoder] codec = 'vp8'.",
)
@click.version_option(package_name="sipbridge")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Bridge a WebRTC room and SIP endpoints through a pipeline of media stages."""
    config = load_config(config_path)
    ctx.obj = {"config": config, "config_path": config_path}
    # Options precedence: command line, then SIPBRIDGE_* environment, then the config file, then defaults.
    ctx.default_map = {key: value for key, value in config.items() if isinstance(value, dict)}


@cli.group(cls=LazyStageGroup)
def stage() -> None:
    """Run one stage process in the foreground."""


def main() -> None:
    cli(prog_name="sipbridge")


from sipbridge import commands as _commands  # noqa: E402,F401  (registers up/status/bench/demo)

__all__ = ["cli", "main"]
