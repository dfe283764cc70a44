"""Failures that explain themselves: what the page showed and said when the bot could not join.

On a failed join (in the browser stage, and in ``sipbridge recipe check``) this saves a screenshot, the page's
console (Playwright keeps the last 200 messages of every page, whoever listens) and the error text the page shows
(modal dialogs, ``[role=alert]``, form validation messages, the page's own error elements, and any ``alert()`` it
raised), then builds one line naming the step, the page's own words, a likely fix and the saved files.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Dialog, Page

from stages.browser.recipes import Recipe, RecipeStepError, first_line

# Failure captures kept per folder: a crash loop must not fill the disk.
MAX_CAPTURES_KEPT = 10
MAX_DIALOGS_KEPT = 20
# The whole capture is bounded: a wedged page must not hold up the rejoin.
CAPTURE_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 3.0
MAX_ERROR_TEXTS = 12
MAX_TEXT_CHARS = 300
NAME_VARIABLES = ("display_name", "name", "username", "user")
# Words with which pages turn down a name.
NAME_REFUSAL = re.compile(r"alphanumeric|letters|digits|characters?|name|invalid|not allowed|too (long|short)|"
                          r"required|special", re.IGNORECASE)
STEP_SELECTOR_KINDS = ("fill", "click", "press", "wait_for")
_captures = 0  # captures made by this process

# Runs in every frame: visible error text, most specific first. Returns [{kind, text, where}].
VISIBLE_ERRORS_JS = """
(maxItems) => {
  const out = [];
  const seen = new Set();
  const visible = (el) => {
    if (!el.getClientRects().length) return false;
    const style = getComputedStyle(el);
    return style.visibility !== "hidden" && style.display !== "none" && parseFloat(style.opacity || "1") > 0;
  };
  const clean = (t) => (t || "").replace(/\\s+/g, " ").trim().slice(0, 300);
  const where = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
    [...el.classList].slice(0, 2).map((c) => "." + c).join("");
  const add = (kind, el, text) => {
    text = clean(text === undefined ? el.innerText : text);
    if (!text || seen.has(text) || out.length >= maxItems) return;
    for (const t of seen) if (t.includes(text)) return;  // already inside a bigger message
    seen.add(text);
    out.push({ kind, text, where: where(el) });
  };
  const all = (sel) => { try { return [...document.querySelectorAll(sel)]; } catch (e) { return []; } };
  for (const el of all("dialog[open], [role=alertdialog], [role=dialog], [aria-modal=true], .modal.show, " +
                       ".modal.in, .bootbox"))
    if (visible(el)) add("dialog", el);
  for (const el of all("[role=alert], [aria-live=assertive]")) if (visible(el)) add("alert", el);
  for (const el of all("input, select, textarea")) {
    if (el.willValidate && !el.checkValidity())
      add("validation", el, (el.name || el.id || el.type) + ": " + el.validationMessage);
  }
  for (const el of all("[aria-invalid=true]"))
    add("validation", el, (el.name || el.id || el.tagName.toLowerCase()) + " is marked invalid" +
      (el.getAttribute("aria-errormessage") ? ": " + clean((document.getElementById(
        el.getAttribute("aria-errormessage")) || {}).innerText) : ""));
  for (const el of all("[class*=error i], [id*=error i], [class*=invalid i], [class*=alert i], [class*=warning i], " +
                       "[class*=toast i], [class*=notification i], [class*=snackbar i], [role=status]"))
    if (visible(el)) add("page", el);
  return out;
}
"""

# What is on the page for a selector that did not work: matches, visible ones, and candidates to use instead.
SELECTOR_CANDIDATES_JS = """
(kind) => {
  const visible = (el) => el.getClientRects().length && getComputedStyle(el).visibility !== "hidden";
  const describe = (el) => {
    let sel = el.tagName.toLowerCase();
    if (el.id) sel = "#" + el.id;
    else if (el.name) sel += `[name="${el.name}"]`;
    else if (el.getAttribute("placeholder")) sel += `[placeholder="${el.getAttribute("placeholder")}"]`;
    else if (el.getAttribute("data-testid")) sel += `[data-testid="${el.getAttribute("data-testid")}"]`;
    const label = (el.innerText || el.value || el.getAttribute("aria-label") || "").replace(/\\s+/g, " ").trim();
    return label ? `${sel} "${label.slice(0, 40)}"` : sel;
  };
  const query = kind === "fill" ? "input:not([type=hidden]), textarea, [contenteditable=true]"
    : kind === "click" || kind === "press" ? "button, a[href], input[type=button], input[type=submit], [role=button]"
    : "[id]";
  return [...document.querySelectorAll(query)].filter(visible).slice(0, 8).map(describe);
}
"""


@dataclass
class Diagnosis:
    """What went wrong and what the page showed, with the files it was saved to."""

    reason: str  # one line: the step and the error
    error_texts: list[str] = field(default_factory=list)
    suggestion: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # screenshot, console, page

    def line(self) -> str:
        parts = [self.reason]
        if self.error_texts:
            parts.append("page shows: " + " | ".join(repr(t) for t in self.error_texts[:3]))
        if self.suggestion:
            parts.append("likely fix: " + self.suggestion)
        if self.files:
            parts.append("saved: " + ", ".join(f"{k} {v}" for k, v in self.files.items()))
        return "; ".join(parts)

    def attributes(self) -> dict[str, Any]:
        return {"reason": self.reason, "page_errors": self.error_texts, "suggestion": self.suggestion, **self.files}


class PageWatch:
    """Keeps what a page raised in modal ``alert()``/``confirm()`` dialogs (dismissed, as Playwright would)."""

    def __init__(self, page: Page) -> None:
        self.dialogs: deque[str] = deque(maxlen=MAX_DIALOGS_KEPT)
        page.on("dialog", self._on_dialog)

    async def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        with contextlib.suppress(Exception):
            await dialog.dismiss()


@dataclass
class SelectorProbe:
    selector: str
    count: int = 0
    visible: int = 0
    first: str = ""  # the first match, abbreviated
    in_frames: list[str] = field(default_factory=list)  # child frames where it matches
    candidates: list[str] = field(default_factory=list)


async def probe_selector(page: Page, selector: str, kind: str) -> SelectorProbe:
    probe = SelectorProbe(selector)
    locator = page.locator(selector)
    probe.count = await locator.count()
    for index in range(min(probe.count, 5)):
        if await locator.nth(index).is_visible():
            probe.visible += 1
    if probe.count:
        html = await locator.first.evaluate("(el) => el.outerHTML")
        probe.first = re.sub(r"\s+", " ", str(html))[:120]
    for frame in page.frames[1:]:
        with contextlib.suppress(Exception):
            if await frame.locator(selector).count():
                probe.in_frames.append(frame.url)
    probe.candidates = list(await page.evaluate(SELECTOR_CANDIDATES_JS, kind))
    return probe


def suggest(recipe: Recipe, failure: RecipeStepError | None, error_texts: list[str],
            probe: SelectorProbe | None) -> str | None:
    """The likely fix, from the failed step, what the page shows and what its selector matched."""
    cause = str(failure.cause) if failure is not None else ""
    if failure is not None and failure.index == 0:
        if re.search(r"ERR_CONNECTION_REFUSED|ERR_NAME_NOT_RESOLVED|ERR_ADDRESS_UNREACHABLE|ERR_CONNECTION", cause):
            return (f"nothing answers at {recipe.start_url()}: is the app running, and reachable from where the "
                    "bridge runs (a local room or Janus needs the bridge in the same network namespace)?")
        if "ERR_UNSAFE_PORT" in cause:
            return f"Chromium never opens {recipe.start_url()}: its port is on the browser's unsafe-port list"
        if "ERR_FILE_NOT_FOUND" in cause or "ERR_ACCESS_DENIED" in cause:
            return ("Chromium cannot read that file: it runs as an unprivileged user (sipbridge-browser), so the "
                    "file and its folders must be readable by that user")
        return None
    name_fix = _refused_name(recipe, failure, error_texts)
    if name_fix:
        return name_fix
    if failure is not None and failure.step is not None and "evaluate" in failure.step:
        return f"the step's JavaScript threw in the page: {first_line(failure.cause)}"
    if probe is not None:
        kind = next((k for k in STEP_SELECTOR_KINDS if failure and failure.step and k in failure.step), "wait_for")
        if probe.count == 0:
            where = f" (it does match inside the frame {probe.in_frames[0]}: a TOML recipe acts on the top page; " \
                    "use a Python recipe with page.frame_locator)" if probe.in_frames else ""
            others = f"; on the page now: {', '.join(probe.candidates)}" if probe.candidates and not where else ""
            return f"no element matches {probe.selector!r}{where}{others}"
        if probe.visible == 0 and (kind != "wait_for" or (failure and failure.step and
                                                          failure.step.get("state") == "visible")):
            after = " after the previous steps" if failure and failure.index > 1 else ""
            seen = " (see what the page shows)" if error_texts else ""
            return (f"{probe.selector!r} matched a hidden element {probe.first}: the page did not reach that state"
                    f"{after}{seen}, or the selector names the wrong element")
        if probe.count > 1 and "strict mode violation" in cause:
            return f"{probe.selector!r} matches {probe.count} elements: make it name exactly one"
    if error_texts:
        return "the page shows an error (above): fix what it complains about, often a --var value"
    return None


def _refused_name(recipe: Recipe, failure: RecipeStepError | None, error_texts: list[str]) -> str | None:
    """A name the page turned down: a fill step typed a name variable, and the page complains about it."""
    if not error_texts or failure is None:
        return None
    filled = [step for step in recipe.steps[: max(0, failure.index - 1)] if "fill" in step]
    for variable in NAME_VARIABLES:
        if not any("{" + variable + "}" in str(step.get("value", "")) for step in filled):
            continue
        complaint = next((t for t in error_texts if NAME_REFUSAL.search(t)), None)
        if complaint is None:
            continue
        value = recipe.variables.get(variable, "")
        plain = re.sub(r"[^A-Za-z0-9]", "", value) or "sipbridge"
        return (f"the page refused the {variable} {value!r} ({complaint!r}): give one it accepts, e.g. "
                f"--var {variable}={plain} (or --display-name / room.display_name in a bridge file)")
    return None


async def visible_error_texts(page: Page) -> list[str]:
    texts: list[str] = []
    for frame in page.frames:
        with contextlib.suppress(Exception):
            for item in await frame.evaluate(VISIBLE_ERRORS_JS, MAX_ERROR_TEXTS):
                text = str(item.get("text", ""))[:MAX_TEXT_CHARS]
                if text and text not in texts:
                    texts.append(text)
    return texts[:MAX_ERROR_TEXTS]


async def console_lines(page: Page) -> list[str]:
    lines = []
    with contextlib.suppress(Exception):
        for msg in await page.console_messages(filter="all"):
            location = msg.location
            where = f" ({location['url']}:{location['lineNumber']})" if location.get("url") else ""
            lines.append(f"[{msg.type}] {msg.text}{where}")
    with contextlib.suppress(Exception):
        for error in await page.page_errors(filter="all"):
            lines.append(f"[uncaught] {first_line(error)}")
    return lines


async def diagnose(page: Page | None, recipe: Recipe, error: BaseException, folder: Path, prefix: str,
                   watch: PageWatch | None = None, headline: str = "join failed") -> Diagnosis:
    """Capture what the page shows and said, save it under ``folder``, and explain the failure in one line."""
    failure = error if isinstance(error, RecipeStepError) else None
    reason = (f"{headline} at step {failure.index}/{failure.total} ({failure.description}): "
              f"{_short_cause(failure.cause)}" if failure is not None else f"{headline}: {first_line(error)}")
    diagnosis = Diagnosis(reason)
    if page is None or page.is_closed():
        return diagnosis
    try:
        await asyncio.wait_for(_capture(page, recipe, failure, error, folder, prefix, watch, diagnosis),
                               CAPTURE_TIMEOUT_S)
    except Exception as exc:  # a capture that fails must not hide the failure it was explaining
        diagnosis.files.setdefault("capture_error", first_line(exc))
    return diagnosis


def _short_cause(cause: BaseException) -> str:
    """The error's first line, plus Playwright's last word on the element when it has one."""
    text = str(cause)
    line = first_line(cause)
    hints = [h.strip(" -") for h in text.splitlines()[1:] if "resolved to" in h or "not visible" in h
             or "not enabled" in h or "intercepts pointer" in h]
    return f"{line} ({hints[-1]})" if hints else line


async def _capture(page: Page, recipe: Recipe, failure: RecipeStepError | None, error: BaseException, folder: Path,
                   prefix: str, watch: PageWatch | None, diagnosis: Diagnosis) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    global _captures
    _captures += 1
    # Files of one process sort in order and never collide; _prune keeps the newest of every ``prefix``.
    base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{_captures}"
    texts = [f"dialog {d}" for d in (watch.dialogs if watch else [])] + await visible_error_texts(page)
    diagnosis.error_texts = texts
    probe = None
    selector = _step_selector(recipe, failure)
    if selector is not None:
        kind = next(k for k in STEP_SELECTOR_KINDS if failure and failure.step and k in failure.step)
        with contextlib.suppress(Exception):
            probe = await asyncio.wait_for(probe_selector(page, selector, kind), PROBE_TIMEOUT_S)
    diagnosis.suggestion = suggest(recipe, failure, texts, probe)
    screenshot = folder / f"{base}.png"
    with contextlib.suppress(Exception):
        await page.screenshot(path=str(screenshot), timeout=PROBE_TIMEOUT_S * 1000)
        diagnosis.files["screenshot"] = str(screenshot)
    console = folder / f"{base}.console.log"
    console.write_text("\n".join(await console_lines(page)) + "\n")
    diagnosis.files["console"] = str(console)
    report = folder / f"{base}.page.txt"
    title = ""
    with contextlib.suppress(Exception):
        title = await page.title()
    report.write_text("\n".join([
        f"recipe: {recipe.name}",
        f"url: {page.url}",
        f"title: {title}",
        f"failure: {diagnosis.reason}",
        f"error: {error}",
        "page shows:",
        *[f"  {t}" for t in texts or ["(no visible error text)"]],
        f"likely fix: {diagnosis.suggestion or '(none found)'}",
        *([f"selector {probe.selector!r}: {probe.count} match(es), {probe.visible} visible; first: {probe.first}",
           f"on the page: {', '.join(probe.candidates)}"] if probe else []),
    ]) + "\n")
    diagnosis.files["page"] = str(report)
    _prune(folder, prefix)


def _step_selector(recipe: Recipe, failure: RecipeStepError | None) -> str | None:
    if failure is None or failure.step is None:
        return None
    for kind in STEP_SELECTOR_KINDS:
        if kind in failure.step:
            with contextlib.suppress(Exception):
                return recipe.format(str(failure.step[kind]))
    return None


def _prune(folder: Path, prefix: str) -> None:
    captures = sorted(folder.glob(f"{prefix}-*.page.txt"), key=lambda p: p.stat().st_mtime)
    for old in captures[:-MAX_CAPTURES_KEPT]:
        stem = old.name[: -len(".page.txt")]
        for suffix in (".png", ".console.log", ".page.txt"):
            with contextlib.suppress(OSError):
                (folder / f"{stem}{suffix}").unlink()
