"""Join recipes: how the bot joins one particular WebRTC app.

A recipe says which URL to open, what to fill in and click, how to tell that the bot is in the call, and how the
page shows which participant a media element belongs to. Two ways to write one:

* Declarative, in TOML (``--recipe path/to/app.toml`` or a table in the pipeline config)::

      url = "https://app.example/room/{room}?name={display_name}"
      participant_attribute = "data-participant"      # attribute on an ancestor of each <video>/<audio>
      # participant_script = "return element.closest('.tile').querySelector('.name').textContent"
      joined_selector = "#status[data-state='joined']"  # present while the bot is in the call
      steps = [
        { fill = "#display-name", value = "{display_name}" },
        { click = "#join-button" },
        { wait_for = "#status[data-state='joined']", timeout_s = 20 },
      ]

  Step kinds: ``goto`` (a URL), ``fill`` + ``value``, ``click``, ``press`` + ``key``, ``wait_for`` (a selector,
  optional ``state``), ``wait_s`` (seconds), ``evaluate`` (JavaScript run in the page). Strings are formatted
  with the recipe variables (``display_name``, ``room`` and anything given with ``--var NAME=VALUE``).

* As a Python module (``--recipe my_package.my_app``) exposing ``RECIPE`` (a ``Recipe``) or
  ``make_recipe(variables) -> Recipe``; subclass ``Recipe`` and override ``join``/``is_joined``/``leave`` when
  the app needs real logic (logging in, dismissing dialogs, handling a lobby).

Built-in recipes by name: ``local-room`` (this project's Janus VideoRoom page, ``local_room.toml``) and ``janus-demo``
(Janus's own VideoRoom demo page, ``janus_demo.toml``).
"""

from __future__ import annotations

import importlib
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Page

RECIPE_DIR = Path(__file__).resolve().parent
BUILTIN = {"local-room": RECIPE_DIR / "local_room.toml", "janus-demo": RECIPE_DIR / "janus_demo.toml"}
DEFAULT_STEP_TIMEOUT_S = 20.0
STEP_KINDS = ("goto", "fill", "click", "press", "wait_for", "wait_s", "evaluate")


class RecipeError(ValueError):
    """A recipe that cannot be loaded or a join step that failed."""


class RecipeStepError(RecipeError):
    """A join step that failed: which one (0 is opening the page), what it did, and the page's error."""

    def __init__(self, recipe: str, index: int, total: int, description: str, step: dict[str, Any] | None,
                 cause: BaseException) -> None:
        self.recipe = recipe
        self.index = index
        self.total = total
        self.description = description
        self.step = step
        self.cause = cause
        super().__init__(f"recipe {recipe}: step {index}/{total} ({description}) failed: {first_line(cause)}")


def first_line(exc: BaseException) -> str:
    """Playwright's errors carry a multi-line call log; its first line says what went wrong."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# (step index, step count, description, seconds taken, the error or None)
StepProgress = Callable[[int, int, str, float, BaseException | None], None]


def join_query(url: str) -> str:
    """A template's ``{room_url}?room=...`` on a URL that has a query already: join with ``&``, not a second ``?``.

    Percent escapes and the fragment are kept as they are.
    """
    head, hash_mark, fragment = url.partition("#")
    base, question, query = head.partition("?")
    if not question or "?" not in query:
        return url
    parts = [p for p in query.split("?") if p]
    return f"{base}?{'&'.join(parts)}{hash_mark}{fragment}"


@dataclass
class Recipe:
    url: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    joined_selector: str | None = None
    participant_attribute: str | None = "data-participant"
    participant_script: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    name: str = "recipe"
    # Ignore the page's Content-Security-Policy: only for an app whose CSP blocks the bot's local WebSocket or its
    # Blob workers (it weakens the page's own protection against injected content).
    bypass_csp: bool = False

    def format(self, text: str) -> str:
        try:
            return text.format(**self.variables)
        except KeyError as exc:
            raise RecipeError(f"recipe {self.name}: unknown variable {exc} in {text!r}") from None

    def start_url(self) -> str:
        return join_query(self.format(self.url))

    async def join(self, page: Page, progress: StepProgress | None = None) -> None:
        """Open the app and do the steps; raise ``RecipeStepError`` naming the step that failed or timed out.

        ``progress(index, total, description, seconds, error)`` is called after each step (0 is opening the page).
        """
        total = len(self.steps)
        # Not "load": the steps wait for what matters, and a busy call page can delay its load event.
        await self._timed(0, total, f"open {self.start_url()}", None, progress,
                          page.goto(self.start_url(), wait_until="domcontentloaded"))
        for index, step in enumerate(self.steps, 1):
            await self._timed(index, total, self.describe_step(step), step, progress, self._step(page, step))

    async def _timed(self, index: int, total: int, description: str, step: dict[str, Any] | None,
                     progress: StepProgress | None, action: Awaitable[Any]) -> None:
        started = time.monotonic()
        try:
            await action
        except Exception as exc:
            if progress is not None:
                progress(index, total, description, time.monotonic() - started, exc)
            if isinstance(exc, RecipeStepError):
                raise
            raise RecipeStepError(self.name, index, total, description, step, exc) from exc
        if progress is not None:
            progress(index, total, description, time.monotonic() - started, None)

    def describe_step(self, step: dict[str, Any]) -> str:
        """One line for a person: the step's kind and what it acts on, variables filled in."""
        for kind in STEP_KINDS:
            if kind not in step:
                continue
            target = step[kind]
            try:
                shown = self.format(str(target)) if kind != "wait_s" else f"{target} s"
            except RecipeError:
                shown = str(target)
            text = f"{kind} {shown!r}" if kind != "wait_s" else f"wait {shown}"
            if kind == "fill":
                try:
                    text += f" with {self.format(str(step.get('value', '')))!r}"
                except RecipeError:
                    text += f" with {step.get('value', '')!r}"
            elif kind == "press":
                text += f" key {step.get('key')!r}"
            elif kind == "wait_for" and step.get("state"):
                text += f" to be {step['state']}"
            return text
        return str(step)

    async def _step(self, page: Page, step: dict[str, Any]) -> None:
        timeout_ms = float(step.get("timeout_s", DEFAULT_STEP_TIMEOUT_S)) * 1000
        if "goto" in step:
            await page.goto(self.format(step["goto"]), timeout=timeout_ms, wait_until="domcontentloaded")
        elif "fill" in step:
            await page.fill(self.format(step["fill"]), self.format(str(step.get("value", ""))), timeout=timeout_ms)
        elif "click" in step:
            await page.click(self.format(step["click"]), timeout=timeout_ms)
        elif "press" in step:
            await page.press(self.format(step["press"]), str(step["key"]), timeout=timeout_ms)
        elif "wait_for" in step:
            await page.wait_for_selector(self.format(step["wait_for"]), state=step.get("state", "attached"),
                                         timeout=timeout_ms)
        elif "wait_s" in step:
            await page.wait_for_timeout(float(step["wait_s"]) * 1000)
        elif "evaluate" in step:
            await page.evaluate(self.format(step["evaluate"]))
        else:
            raise RecipeError(f"recipe {self.name}: unknown step {step} (kinds: {', '.join(STEP_KINDS)})")

    async def is_joined(self, page: Page) -> bool:
        """Whether the bot is still in the call (checked periodically to notice being dropped)."""
        if not self.joined_selector:
            return True
        # A count, not query_selector: each ElementHandle stays registered in Playwright's client and driver until
        # the page closes, and this runs every second for the whole call (issue 15's steady growth).
        return await page.locator(self.format(self.joined_selector)).count() > 0

    async def leave(self, page: Page) -> None:
        """Leave politely before closing (optional)."""


RECIPE_KEYS = ("url", "steps", "joined_selector", "participant_attribute", "participant_script", "defaults",
               "bypass_csp")
# Keys a step may carry besides its kind.
STEP_OPTIONS = {"goto": {"timeout_s"}, "fill": {"value", "timeout_s"}, "click": {"timeout_s"},
                "press": {"key", "timeout_s"}, "wait_for": {"state", "timeout_s"}, "wait_s": set(), "evaluate": set()}
WAIT_STATES = ("attached", "detached", "visible", "hidden")


def check_step(step: Any, where: str) -> None:
    """A step is a table with exactly one kind and only that kind's keys, so a typo is an error, not ignored."""
    if not isinstance(step, dict):
        raise RecipeError(f"{where} must be a table like {{ click = \"#join\" }}, not {step!r}")
    kinds = [kind for kind in STEP_KINDS if kind in step]
    if len(kinds) != 1:
        what = "no step kind" if not kinds else f"several kinds ({', '.join(kinds)})"
        raise RecipeError(f"{where} {step} has {what}: one of {', '.join(STEP_KINDS)}")
    kind = kinds[0]
    unknown = set(step) - {kind} - STEP_OPTIONS[kind]
    if unknown:
        raise RecipeError(f"{where} ({kind}) has unknown key(s) {', '.join(sorted(unknown))}; a {kind} step takes "
                          f"{', '.join(sorted(STEP_OPTIONS[kind])) or 'no other key'}")
    if kind == "press" and "key" not in step:
        raise RecipeError(f"{where} (press) needs a key, e.g. key = \"Enter\"")
    if "state" in step and step["state"] not in WAIT_STATES:
        raise RecipeError(f"{where} (wait_for) state must be one of {', '.join(WAIT_STATES)}")
    for number in ("timeout_s", "wait_s"):
        if number in step and (isinstance(step[number], bool) or not isinstance(step[number], (int, float))
                               or not 0 <= step[number] < 3600):
            raise RecipeError(f"{where}: {number} must be a number of seconds (0 to 3600)")


def recipe_from_mapping(data: dict[str, Any], variables: dict[str, str], name: str) -> Recipe:
    if "url" not in data:
        raise RecipeError(f"recipe {name}: needs a url")
    unknown = set(data) - set(RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"recipe {name}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(keys: {', '.join(RECIPE_KEYS)})")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise RecipeError(f"recipe {name}: steps must be a list of tables")
    for index, step in enumerate(steps, 1):
        check_step(step, f"recipe {name}: step {index}")
    for key in ("joined_selector", "participant_attribute", "participant_script"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RecipeError(f"recipe {name}: {key} must be a string")
    if not isinstance(data.get("bypass_csp", False), bool):
        raise RecipeError(f"recipe {name}: bypass_csp must be true or false")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise RecipeError(f"recipe {name}: [defaults] must be a table of variables")
    merged = {str(k): str(v) for k, v in defaults.items()}
    merged.update(variables)
    return Recipe(
        url=str(data["url"]),
        steps=steps,
        joined_selector=data.get("joined_selector"),
        participant_attribute=data.get("participant_attribute", "data-participant"),
        participant_script=data.get("participant_script"),
        variables=merged,
        name=name,
        bypass_csp=data.get("bypass_csp", False),
    )


def load_recipe(spec: str, variables: dict[str, str]) -> Recipe:
    """``spec`` is a built-in name, a .toml path, or a Python module path."""
    path = BUILTIN.get(spec) or (Path(spec) if spec.endswith(".toml") else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            where = "" if path.is_absolute() else f" (a relative path is taken from {Path.cwd()})"
            raise RecipeError(f"cannot read recipe {spec}{where}: {exc}") from None
        return recipe_from_mapping(data, variables, spec)
    try:
        module = importlib.import_module(spec)
    except ImportError as exc:
        raise RecipeError(f"no recipe {spec!r}: not built in ({', '.join(BUILTIN)}), not a .toml, not a module: "
                          f"{exc}") from None
    if hasattr(module, "make_recipe"):
        recipe = module.make_recipe(variables)
    elif hasattr(module, "RECIPE"):
        recipe = module.RECIPE
        recipe.variables = {**recipe.variables, **variables}
    else:
        raise RecipeError(f"module {spec} has neither make_recipe() nor RECIPE")
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"module {spec} did not give a Recipe")
    return recipe
