"""The package's shape, read from its source (ast): no import cycle between its modules, lazy
imports included, and no function longer than a screen; and the tests' own: no test module
imports another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "resnetdist"
TESTS = Path(__file__).resolve().parent
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (top level, in functions, under
    TYPE_CHECKING). `from .x import y` counts as x.y when y is a module, else as x."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def unresolved_relative_imports(name: str, path: Path, known: set[str]) -> list[str]:
    """`from .x import y` where .x is no module of the package (a file left behind by a move)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
            if base not in known:
                missing.append(f"{name}: from {'.' * node.level}{node.module or ''} import ...")
    return missing


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    assert "resnetdist.config" in graph and graph["resnetdist.config"] == set(), "config imports nothing of ours"
    assert graph["resnetdist.training.worker"] >= {"resnetdist.training.trainer", "resnetdist.training.announce",
                                                   "resnetdist.rundir"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_every_relative_import_names_a_module_of_the_package():
    mods = modules()
    missing = [m for name, path in mods.items() for m in unresolved_relative_imports(name, path, set(mods))]
    assert not missing, missing


def test_no_function_longer_than_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


MAX_CLASS_LINES = 120


def test_no_class_longer_than_120_lines():
    """No god classes: a class that long does several jobs (TrainStep once held the step,
    DDP/compile wrapping and graph capture)."""
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


ENV_SWITCH = re.compile(r"RESNETDIST_[A-Z0-9_]+")


def env_switches(text: str) -> set[str]:
    """The RESNETDIST_* environment variables a source text names."""
    return set(ENV_SWITCH.findall(text))


def test_every_environment_switch_of_the_package_is_documented():
    """Each RESNETDIST_* variable the package reads is a user's switch, named in README.md or
    docs/: a switch only the tests know (a fault injected by an environment variable) fails here.
    Faults are injected from the tests instead (tests/_kill_worker.py wraps the Trainer)."""
    docs = "\n".join(p.read_text() for p in [PACKAGE.parent / "README.md", *(PACKAGE.parent / "docs").glob("*.md")])
    read = {name: module for module, path in modules().items() for name in env_switches(path.read_text())}
    assert read, "the package reads no RESNETDIST_* variable: the pattern no longer matches its spelling"
    undocumented = {name: module for name, module in read.items() if name not in env_switches(docs)}
    assert not undocumented, f"environment variables the docs do not name: {undocumented}"


def test_suite_and_tools_use_only_trainings_public_surface():
    """suite/ and tools/ import resnetdist.training (its __init__'s documented names), never one of
    its modules: what they may use is listed in one place."""
    mods = modules()
    inside = sorted(f"{name} imports {imported}" for name, path in mods.items()
                    if name.startswith(("resnetdist.suite", "resnetdist.tools"))
                    for imported in imports_of(name, path, set(mods)) if imported.startswith("resnetdist.training."))
    assert not inside, inside


def test_tools_do_not_import_the_run():
    """bench and doctor build through the trainer, not through worker.py (one rank's whole run)."""
    mods = modules()
    for tool in ("resnetdist.tools.bench", "resnetdist.tools.doctor"):
        assert "resnetdist.training.worker" not in imports_of(tool, mods[tool], set(mods)), tool


def test_exit_codes_come_from_one_table():
    """cli.py writes no exit code as a number: every error it exits with carries its code
    (`exit_code`, from errors.py's table of codes)."""
    from resnetdist import errors

    literal = []
    for node in ast.walk(ast.parse((PACKAGE / "cli.py").read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        codes = node.args[1:] if name == "fail" else node.args if name == "Exit" else []
        codes += [k.value for k in node.keywords if k.arg == "code"] if name in ("fail", "Exit") else []
        if any(isinstance(c, ast.Constant) and isinstance(c.value, int) for c in codes):
            literal.append(f"line {node.lineno}")
    assert not literal, f"exit codes written as numbers in cli.py: {literal}"
    carried = {name: cls.exit_code for name, cls in vars(errors).items() if isinstance(getattr(cls, "exit_code", None), int)}
    assert carried == {
        "ConfigError": 2, "DataError": 2, "CheckpointError": 2, "NonFiniteLoss": 3, "WriteError": 4, "RunDirBusy": 5, "Preempted": 6,
        "PeerLost": 7, "GraphUnavailable": 8}


def imported_test_modules(source: str) -> set[str]:
    """The test modules (test_*) a file of tests/ imports, however it spells the import."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [module] + [f"{module}.{a.name}" for a in node.names]  # also `from . import test_x`
        else:
            continue
        found |= {part for name in names for part in name.split(".") if part.startswith("test_")}
    return found


def test_the_test_import_finder_sees_every_spelling():
    source = ("from .test_train import x\nfrom . import test_loop\nimport tests.test_faults\n"
              "from tests.test_report import y\nfrom .helpers import z\nfrom .conftest import TINY\n")
    assert imported_test_modules(source) == {"test_train", "test_loop", "test_faults", "test_report"}


def test_no_test_module_imports_another():
    """Each test module stands on its own: what several share lives in conftest.py or a helper
    module (tests/helpers.py, wandb_file.py, fake_cuda.py, slurm_cluster.py, netns.py), so a
    change to one test file cannot break another's collection or fixtures."""
    leaning = {p.name: sorted(found) for p in sorted(TESTS.glob("*.py"))
               if (found := imported_test_modules(p.read_text()))}
    assert not leaning, f"test modules imported by other files of tests/: {leaning}"
