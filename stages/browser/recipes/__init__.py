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

Built-in recipes by name: ``local-room`` (this project's Janus VideoRoom page, ``local_room.toml``).
"""

from __future__ import annotations

import importlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Page

RECIPE_DIR = Path(__file__).resolve().parent
BUILTIN = {"local-room": RECIPE_DIR / "local_room.toml"}
DEFAULT_STEP_TIMEOUT_S = 20.0
STEP_KINDS = ("goto", "fill", "click", "press", "wait_for", "wait_s", "evaluate")


class RecipeError(ValueError):
    """A recipe that cannot be loaded or a join step that failed."""


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
        return self.format(self.url)

    async def join(self, page: Page) -> None:
        """Open the app and do the steps; raise when a step fails or times out."""
        # Not "load": the steps wait for what matters, and a busy call page can delay its load event.
        await page.goto(self.start_url(), wait_until="domcontentloaded")
        for index, step in enumerate(self.steps):
            try:
                await self._step(page, step)
            except RecipeError:
                raise
            except Exception as exc:
                raise RecipeError(f"recipe {self.name}: step {index + 1} {step} failed: {exc}") from exc

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
        return await page.query_selector(self.format(self.joined_selector)) is not None

    async def leave(self, page: Page) -> None:
        """Leave politely before closing (optional)."""


def recipe_from_mapping(data: dict[str, Any], variables: dict[str, str], name: str) -> Recipe:
    if "url" not in data:
        raise RecipeError(f"recipe {name}: needs a url")
    steps = data.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise RecipeError(f"recipe {name}: steps must be a list of tables")
    for step in steps:
        if not any(kind in step for kind in STEP_KINDS):
            raise RecipeError(f"recipe {name}: unknown step {step} (kinds: {', '.join(STEP_KINDS)})")
    merged = {str(k): str(v) for k, v in data.get("defaults", {}).items()}
    merged.update(variables)
    return Recipe(
        url=str(data["url"]),
        steps=steps,
        joined_selector=data.get("joined_selector"),
        participant_attribute=data.get("participant_attribute", "data-participant"),
        participant_script=data.get("participant_script"),
        variables=merged,
        name=name,
        bypass_csp=bool(data.get("bypass_csp", False)),
    )


def load_recipe(spec: str, variables: dict[str, str]) -> Recipe:
    """``spec`` is a built-in name, a .toml path, or a Python module path."""
    path = BUILTIN.get(spec) or (Path(spec) if spec.endswith(".toml") else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise RecipeError(f"cannot read recipe {spec}: {exc}") from None
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
