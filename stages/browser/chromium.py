"""Launching Debian's Chromium through Playwright: as an unprivileged user, with its sandbox on.

Chromium loads third-party pages, so it never runs as root. When the caller is root (supervisord runs the stages as
root), Playwright starts ``chromium-as-user.sh`` in Chromium's place, which drops to the system user
``sipbridge-browser`` (created by ``make setup``; another one with ``SIPBRIDGE_CHROMIUM_USER``) for the browser
process only: Playwright's driver and the stage stay as they are. An unprivileged caller runs Chromium as itself.
Either way the sandbox is on (Chromium uses user namespaces here; field notes) and the browser gets a minimal
environment, so secrets meant for other programs never reach it.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the keeper (keeper.py) launches Chromium without Playwright: its start stays short
    from playwright.async_api import Browser, Playwright

CHROMIUM_PATH = os.environ.get("SIPBRIDGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_USER = os.environ.get("SIPBRIDGE_CHROMIUM_USER", "sipbridge-browser")
AS_USER_WRAPPER = Path(__file__).resolve().parent / "chromium-as-user.sh"
# What the browser's environment keeps from ours (when it runs as ourselves).
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "XDG_RUNTIME_DIR")
SETUP_HINT = ("create it with `make setup` (or: useradd --system --user-group --home-dir /nonexistent "
              "--no-create-home --shell /usr/sbin/nologin {user})")

# Chromium takes only the last --disable-features it is given, so every feature the bot turns off is in this one list.
DISABLED_FEATURES = [
    # mDNS names instead of the host candidates a loopback-only room needs.
    "WebRtcHideLocalIpsWithMdns",
    # Chromium 156 starts the address bar's popup (chrome://omnibox-popup.top-chrome) in a renderer of its own with
    # every browser window, headless too: 80 MB PSS for a UI nobody opens. The preload of other top-chrome WebUIs
    # would take its place.
    "WebUIOmniboxPopup",
    "WebUIOmniboxAimPopup",
    "PreloadTopChromeWebUI",
    # A renderer started ahead for the next site (20 MB); the bot opens one page and stays on it.
    "SpareRendererForSitePerProcess",
]

CHROMIUM_FLAGS = [
    "--headless=new",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    # Loopback-only rooms: without this Chromium gathers no candidate on 127.x.
    "--allow-loopback-in-peer-connection",
    "--disable-features=" + ",".join(DISABLED_FEATURES),
    # A hidden page must keep its timers and media pipeline at full speed.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    # Synthetic participants start a tone without a user gesture.
    "--autoplay-policy=no-user-gesture-required",
]


class ChromiumUserError(RuntimeError):
    """Chromium would have to run as root: the unprivileged user it runs as is missing or unusable."""


def browser_identity(user: str = CHROMIUM_USER) -> tuple[int, int] | None:
    """(uid, gid) Chromium runs as when we are root; None when we are not (it then runs as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ChromiumUserError(f"Chromium never runs as root, and the user {user!r} it runs as does not exist: "
                                f"{SETUP_HINT.format(user=user)}") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ChromiumUserError(f"Chromium never runs as root: user {user!r} has uid or gid 0")
    if not os.access(AS_USER_WRAPPER, os.X_OK):
        raise ChromiumUserError(f"{AS_USER_WRAPPER} is missing or not executable")
    return entry.pw_uid, entry.pw_gid


def launch_settings(user: str = CHROMIUM_USER) -> tuple[str, dict[str, str]]:
    """The executable Playwright starts and the environment it gets."""
    identity = browser_identity(user)
    if identity is None:
        return CHROMIUM_PATH, {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    uid, gid = identity
    return str(AS_USER_WRAPPER), {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SIPBRIDGE_CHROMIUM_UID": str(uid),
        "SIPBRIDGE_CHROMIUM_GID": str(gid),
        "SIPBRIDGE_CHROMIUM_BIN": CHROMIUM_PATH,
    }


async def launch_chromium(playwright: Playwright, extra_args: list[str] | None = None, **kwargs: Any) -> Browser:
    executable, settings_env = launch_settings()
    env: dict[str, str | float | bool] = dict(settings_env)
    return await playwright.chromium.launch(
        executable_path=executable,
        headless=True,
        args=[*CHROMIUM_FLAGS, *(extra_args or [])],
        # Playwright adds --no-sandbox unless asked not to.
        chromium_sandbox=True,
        env=env,
        # Playwright's own SIGTERM/SIGINT handlers would close the browser before our stage notices.
        handle_sigint=False,
        handle_sigterm=False,
        handle_sighup=False,
        **kwargs,
    )
