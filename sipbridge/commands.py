"""Pipeline-level commands: up, status, bench, demo."""

from __future__ import annotations

from sipbridge.cli import cli  # noqa: F401
