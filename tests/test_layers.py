"""Layers: data flows one way, and prediction and evaluation load no training machinery.

Every package of damformer sits on a layer; a module may import only packages of lower layers (its own
package aside). Checked on the source (every import statement, at any depth), so a lazy import inside
a function counts as much as one at the top.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "damformer"
LAYERS = [
    {"__init__", "errors"},  # the version; our exception types and exit codes
    {"atomic", "logs", "progress"},  # safe writes and output folders, logging, progress bars
    {"data"},  # the FLAIR-2 dataset
    {"miniature", "shards"},  # the generator; the shard format, writer and sets
    {"loading"},  # training input
    {"models"},
    {"config", "uda"},  # the run config (builds ModelConfig); one UDA step (knows only models)
    {"runtime"},  # device, process group, run folder schema: what every command shares
    {"eval"},
    {"predict", "tracking"},
    {"engine", "study"},  # training; studies of trainings (through the command line, not the trainer)
    {"cli_data"},  # the data commands' parsers
    {"cli"},  # parsers and dispatch: each command's body is imported when it runs
    {"__main__"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}
TRAINING = ("damformer.engine", "damformer.uda")


def _package(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("damformer"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("damformer")}
    return found


def test_every_package_has_a_layer():
    packages = {_package(path) for path in PACKAGE.rglob("*.py")}
    assert packages <= set(LAYER), sorted(packages - set(LAYER))


def test_no_import_goes_up_or_sideways():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _package(path)
        if path == PACKAGE / "__init__.py":  # only its lazy damformer.load_model reaches up, on first use
            assert _top_level_imports(path) <= {"damformer.runtime.model_files"}, _top_level_imports(path)
            continue
        for module in _imports(path):
            parts = module.split(".")
            there = parts[1] if len(parts) > 1 else "__init__"
            if there != here and LAYER[there] >= LAYER[here]:
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)} imports {module} ({there} is not below {here})"
                )
    assert not wrong, "\n".join(wrong)


def _top_level_imports(path: Path) -> set[str]:
    """The damformer modules a file imports, at module level or inside a module-level __getattr__."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name != "__getattr__":
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and inner.module and inner.module.startswith("damformer"):
                found.add(inner.module)
    return found


def test_predict_eval_study_and_tracking_import_nothing_of_training():
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}: {module}"
        for package in ("predict", "eval", "study", "tracking")
        for path in (PACKAGE / package).rglob("*.py")
        for module in _imports(path)
        if module.startswith(TRAINING)
    ]
    assert not wrong, wrong


def _loaded(*modules: str) -> set[str]:
    code = f"import sys; import {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_predict_and_evaluate_load_no_training_module():
    loaded = _loaded("damformer.predict.command", "damformer.eval.command", "damformer.runtime.artifacts")
    assert not [m for m in loaded if m.startswith(TRAINING)], sorted(
        m for m in loaded if m.startswith(TRAINING)
    )


def test_predict_help_does_not_import_the_trainer():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "damformer", "predict", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "damformer.engine.train" not in result.stderr and "| damformer.predict" not in result.stderr


def test_modules_stay_small_and_the_command_line_holds_no_logic():
    sizes = {path: len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert not [f"{p.name}: {n}" for p, n in sizes.items() if n > 450], "modules over 450 lines"
    assert sizes[PACKAGE / "cli.py"] <= 400
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    bodies = [
        node.name for node in cli.body if isinstance(node, ast.FunctionDef) and node.name.startswith("_cmd")
    ]
    assert not bodies, bodies  # each command's body lives in its package (a command module)


def test_the_run_folder_schema_is_defined_once():
    """The file names of a run folder are literals in damformer/runtime/artifacts.py only."""
    names = ('"checkpoint.pt"', '"config.yaml"', '"history.json"', '"scores.json"')
    found = {
        str(path.relative_to(PACKAGE.parent)): [n for n in names if n in path.read_text()]
        for path in PACKAGE.rglob("*.py")
    }
    assert {path: hits for path, hits in found.items() if hits} == {
        "damformer/runtime/artifacts.py": list(names)
    }
