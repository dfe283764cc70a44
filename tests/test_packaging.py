"""The shipped package: the CLI does not import the local-call harness, and an installed wheel works on its own.

The harness (``sipbridge.testing``: LocalCall, the capture readers, lip sync, the demo) is for the demo, the tests
and the benchmarks; the CLI loads it only inside the demo command. The wheel carries its data (the Janus
configuration, the demo's sipp scenarios, the room pages, the recipes) and runs without the checkout.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "sipbridge"
HARNESS = "sipbridge.testing"
# The one place outside the harness allowed to import it: inside the demo command's function.
ALLOWED_LAZY_IMPORT = ("commands.py", "demo")
# What a wheel is built from (pyproject's packages and readme).
WHEEL_SOURCES = ["pyproject.toml", "README.md", "protocol", "stages", "sipbridge"]
WHEEL_TIMEOUT_S = 120.0


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names an import statement in ``module`` loads (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    # `from sipbridge import testing` loads sipbridge.testing: count each name as a possible submodule too.
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def imports_of(path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, enclosing function or None, line) for every import statement in a source file."""
    return imports_in(path.read_text(), _module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[str, str | None, int]]:
    """``imports_of`` for the source text of ``module``."""
    tree = ast.parse(source)
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                for name in _imported_modules(child, module, is_package):
                    found.append((name, function, child.lineno))
            else:
                visit(child, function)

    visit(tree, None)
    return found


def _is(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_nothing_in_sipbridge_outside_the_harness_imports_it() -> None:
    offenders = []
    lazy = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "testing"):
            continue
        for name, function, line in imports_of(path):
            if not _is(name, HARNESS):
                continue
            where = f"{path.relative_to(PROJECT)}:{line}"
            if (path.name, function) == ALLOWED_LAZY_IMPORT:
                lazy.append(where)
            else:
                offenders.append(f"{where} imports {name}" + (f" in {function}()" if function else ""))
    assert offenders == []
    assert lazy, "the demo command no longer loads the harness: update ALLOWED_LAZY_IMPORT"


def test_the_harness_does_not_import_the_cli() -> None:
    """The old cycle (commands -> demo -> commands) is gone: the harness needs nothing of the CLI."""
    offenders = [
        f"{path.relative_to(PROJECT)}:{line} imports {name}"
        for path in sorted((PACKAGE / "testing").rglob("*.py"))
        for name, _function, line in imports_of(path)
        if _is(name, "sipbridge.cli") or _is(name, "sipbridge.commands")
    ]
    assert offenders == []


def test_the_import_checker_sees_every_spelling_of_an_import_of_the_harness() -> None:
    """The checks above must be able to fail."""
    source = (
        "import sipbridge.testing.demo\n"
        "from sipbridge import testing\n"
        "from . import testing as harness\n"
        "def f():\n"
        "    from .testing.capture import rtp_flows\n"
    )
    names = {(name, function) for name, function, _ in imports_in(source, "sipbridge.status") if _is(name, HARNESS)}
    assert names == {
        ("sipbridge.testing.demo", None),
        ("sipbridge.testing", None),
        ("sipbridge.testing.capture", "f"),
        ("sipbridge.testing.capture.rtp_flows", "f"),
    }
    assert imports_in("from ..cli import cli\n", "sipbridge.testing.demo")[0][0] == "sipbridge.cli"


def test_loading_the_cli_and_every_command_leaves_the_harness_unloaded() -> None:
    code = (
        "import sys\n"
        "from sipbridge.cli import cli\n"
        "import sipbridge.commands, sipbridge.status, sipbridge.bridge, sipbridge.supervise, sipbridge.janus_server\n"
        "print(sorted(m for m in sys.modules if m.startswith('sipbridge.testing')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout


def _dev_site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def test_a_wheel_installed_in_a_fresh_venv_runs_and_finds_its_data(tmp_path: Path) -> None:
    """Build the wheel, install it alone into a new venv (dependencies come from the dev venv's site-packages
    through a .pth; the dev venv's editable install is not picked up, as its own .pth files are not read from
    there), and run the CLI from a folder outside the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in WHEEL_SOURCES:
        item = PROJECT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(item, src / name)
    wheels = tmp_path / "wheels"
    # No build isolation: the dev venv's setuptools builds it, without fetching anything.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        check=True,
        timeout=WHEEL_TIMEOUT_S,
    )
    (wheel,) = wheels.glob("sipbridge-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=WHEEL_TIMEOUT_S)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=WHEEL_TIMEOUT_S,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "dev-venv-dependencies.pth").write_text(_dev_site_packages() + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*argv: str) -> str:
        result = subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    sipbridge = str(venv / "bin" / "sipbridge")
    assert "Usage: sipbridge [OPTIONS] COMMAND" in run(sipbridge, "--help")
    assert "Usage: sipbridge stage decoder" in run(sipbridge, "stage", "decoder", "--help")
    assert "--sip-peer" in run(sipbridge, "demo", "--help")
    probe = run(
        str(python),
        "-c",
        "import sipbridge, stages\n"
        "from sipbridge.janus_server import JanusConfig, render_config\n"
        "from sipbridge.testing.localcall import sipp_scenario\n"
        "import sys, tempfile\n"
        "out = render_config(JanusConfig(), tempfile.mkdtemp())\n"
        "print(sipbridge.__file__); print(stages.__file__)\n"
        "print(sorted(p.name for p in out.glob('*.jcfg')))\n"
        "print(sipp_scenario('uas_echo')); print(sipp_scenario('uas_486'))\n"
        "from importlib import resources\n"
        "print(resources.files('stages.browser.recipes').joinpath('local_room.toml').is_file(),\n"
        "      resources.files('sipbridge.room').joinpath('static/index.html').is_file(),\n"
        "      resources.files('stages.browser').joinpath('js/hook.js').is_file(),\n"
        "      resources.files('sipbridge.pipelines').joinpath('bridge.toml').is_file())\n",
    )
    lines = probe.splitlines()
    # The installed copy, not the checkout.
    assert lines[0].startswith(purelib) and lines[1].startswith(purelib), lines
    assert "janus.plugin.sip.jcfg" in lines[2] and "janus.jcfg" in lines[2]
    assert lines[3].startswith(purelib) and lines[4].startswith(purelib), lines
    # The join recipe, the local room's pages, the bot's init script and the bridged call's layout.
    assert lines[5] == "True True True True", lines
