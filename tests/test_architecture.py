"""The layout is the architecture: each wing imports only from the wings below it, nothing imports in a circle,
and each wing can be imported alone (docs/architecture.md draws the floors)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"

# Lowest first. A wing may import its own modules and any wing on a lower floor, never one on its floor or above.
FLOORS: list[set[str]] = [
    {"__init__", "errors"},
    {"console", "choices", "speed"},  # the ground floor: plain modules the whole house uses
    {"data"},
    {"weights"},
    {"students"},
    {"teachers", "losses"},
    {"config"},
    {"training"},
    {"stages", "tools"},
    {"cli"},
    {"__main__"},
]
FLOOR = {wing: level for level, wings in enumerate(FLOORS) for wing in wings}


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported distill module, line, at module level) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("distill"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                if (PACKAGE.parent / (name.replace(".", "/") + ".py")).exists() or (
                        PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists():
                    found.append((name, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names if alias.name.startswith("distill")]
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_wing_has_a_floor():
    assert {wing_of(name) for name in MODULES if name != "distill"} <= set(FLOOR)


def test_no_import_runs_upward_or_sideways():
    wrong = []
    for name, path in MODULES.items():
        mine = wing_of(name)
        for target, line, _ in imports_of(path):
            theirs = wing_of(target)
            if theirs != mine and target != "distill" and FLOOR[theirs] >= FLOOR[mine]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_circles_between_modules():
    """Module-level imports form no circle (lazy imports inside functions are checked by the floors above)."""
    graph = {name: {t for t, _, top in imports_of(path) if top and t in MODULES and t != name}
             for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        for child in sorted(graph[node]):
            assert child not in trail, "import circle: " + " -> ".join(trail[trail.index(child):] + [child])
            if child not in done:
                visit(child, trail + [child])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])


def test_each_wing_imports_alone():
    """Importing a wing, in a fresh interpreter, loads no module of a wing above it or beside it (all wings at once,
    each in its own process)."""
    code = "import sys, distill.{}; print(' '.join(sorted(m for m in sys.modules if m.startswith('distill.'))))"
    wings = sorted(w for w in FLOOR if w not in ("__init__", "__main__"))
    running = {wing: subprocess.Popen([sys.executable, "-c", code.format(wing)], stdout=subprocess.PIPE, text=True)
               for wing in wings}
    wrong = []
    for wing, process in running.items():
        loaded = process.communicate(timeout=300)[0].split()
        assert process.returncode == 0, f"import distill.{wing} failed"
        wrong += [f"distill.{wing} loads {m}" for m in loaded if wing_of(m) != wing and FLOOR[wing_of(m)] >= FLOOR[wing]]
    assert not wrong, "\n".join(wrong)


def test_the_command_line_starts_without_torch():
    """`distill --help` and every refusal of a flag come before torch is loaded: the CLI imports the stages and
    tools inside each command."""
    code = "import sys, distill.cli; print(sorted(m for m in ('torch', 'timm', 'accelerate') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
