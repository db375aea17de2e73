"""The package layers: each package imports only the layers below it, so the dependency graph has no cycles.

Every import in the installed packages is read from the source (also the ones inside functions, which are
how the CLI keeps heavy imports lazy), resolved to a ``boltstream.*`` module and checked against
:data:`LAYERS`. The layers, bottom first, are those of the README's layout table.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Bottom first. A module may import its own package and any package of a lower layer, nothing else
#: (so not a peer of its own layer).
LAYERS: list[tuple[str, ...]] = [
    ("boltstream.schemas",),
    ("boltstream.infra.common",),
    ("boltstream.producers",),
    ("boltstream.agl",),
    ("boltstream.stream_processors", "boltstream.trainer"),  # peers: neither imports the other
    ("boltstream.infra.serving",),
    ("boltstream.infra.stack",),
    ("boltstream.infra.demo",),
    ("boltstream.infra.cli",),
]
#: The imports of a higher layer that are allowed, each with why. Each must be inside a function (loaded on
#: first use only) and still exist (tested below), so the list says exactly where the layering bends.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("boltstream.agl", "boltstream.infra.demo.fit"): (
        "agl.Trainer is Agent Lightning's entry point, kept under the SDK's name; it drives the whole stack, "
        "so the SDK's module __getattr__ imports it on first use and `import boltstream.agl` loads none of it"
    ),
}
#: Where each import root's source lives in the checkout (pyproject's package-dir).
SOURCES = {
    "boltstream": ROOT / "boltstream",
    "boltstream.agl": ROOT / "boltstream" / "agl",  # the one package kept under the import root itself
    "boltstream.schemas": ROOT / "schemas",
    "boltstream.producers": ROOT / "producers",
    "boltstream.stream_processors": ROOT / "stream_processors",
    "boltstream.trainer": ROOT / "trainer",
    "boltstream.infra": ROOT / "infra",
}


def layer_of(module: str) -> int | None:
    for index, packages in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in packages):
            return index
    return None


def package_of(module: str) -> str:
    for packages in LAYERS:
        for package in packages:
            if module == package or module.startswith(package + "."):
                return package
    return module


def modules() -> dict[str, Path]:
    found = {}
    for root, directory in SOURCES.items():
        for path in directory.rglob("*.py"):
            relative = path.relative_to(directory).with_suffix("").parts
            if root == "boltstream" and len(relative) > 1:
                continue
            parts = relative[:-1] if relative[-1] == "__init__" else relative
            found[".".join((root, *parts))] = path
    return found


def imports_of(name: str, path: Path) -> list[tuple[int, str]]:
    """Every ``boltstream.*`` module ``path`` imports, with the line, wherever the import statement stands."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from boltstream import agl` imports the submodule boltstream.agl
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if target == "boltstream"]
    return [(line, module) for line, module in found if module.split(".")[0] in ("boltstream", "tests")]


def test_every_import_points_down_the_layers() -> None:
    all_modules = modules()
    assert len(all_modules) > 50, "the source folders were not found"
    wrong = []
    for name, path in sorted(all_modules.items()):
        mine = layer_of(name)
        for line, target in imports_of(name, path):
            if target == "boltstream" or package_of(target) == package_of(name):
                continue
            theirs = layer_of(target)
            if (name, target) in UPWARD_EXCEPTIONS:
                continue
            if target.startswith("tests") or theirs is None or mine is None or theirs >= mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({package_of(name)}) imports {target}")
    assert not wrong, "imports that do not point down the layers:\n" + "\n".join(wrong)


def test_each_upward_exception_is_a_lazy_import_that_still_exists() -> None:
    all_modules = modules()
    for (name, target), why in UPWARD_EXCEPTIONS.items():
        assert why, f"{name} -> {target} needs its reason"
        path = all_modules[name]
        lines = [line for line, imported in imports_of(name, path) if imported == target]
        assert lines, f"{name} no longer imports {target}: drop the exception"
        top_level = {node.lineno for node in ast.parse(path.read_text()).body}
        assert not top_level & set(lines), f"{name} imports {target} at module level: it must stay lazy"
    loaded = "[m for m in sys.modules if m.startswith('boltstream.infra.demo')]"
    code = f"import sys\nfrom boltstream import agl\nassert not {loaded}"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)


def test_every_source_module_has_a_layer() -> None:
    orphans = [n for n in modules() if layer_of(n) is None and n not in ("boltstream", "boltstream.infra")]
    assert not orphans, f"modules outside every layer: {orphans}"


def test_the_import_root_and_infra_import_nothing() -> None:
    for name in ("boltstream", "boltstream.infra"):
        assert imports_of(name, modules()[name]) == [], f"{name} must stay an empty namespace"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from boltstream.infra.demo.run import demo_command\n")
    target = imports_of("boltstream.trainer.x", source)[0][1]
    assert layer_of(target) > layer_of("boltstream.trainer.x")


@pytest.mark.parametrize("heavy", ["torch", "vllm", "faust", "deepspeed"])
def test_help_imports_no_heavy_library(heavy: str) -> None:
    code = (
        "import sys\nfrom boltstream.infra.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"assert {heavy!r} not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)


def test_help_answers_within_a_second() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "boltstream.infra.cli", "--help"], capture_output=True, text=True)
    elapsed = time.monotonic() - started
    assert done.returncode == 0 and "replay" in done.stdout
    assert elapsed < 1.0, f"boltstream --help took {elapsed:.2f} s"
