"""Imports go one way: training imports the inference models and the shared pipeline helpers, never the curation
stages or the curation driver; the stages and the curation driver never import training; and no model module
imports the curation driver."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT

CURATION_MODULES = ("stages", "pipeline.config", "pipeline.curate", "pipeline.steps", "pipeline.plan", "pipeline.run")
# The commands that train (and the benchmarks) may import training; nothing else in the pipeline or the stages may.
TRAINING_IMPORTERS = {"pipeline/cli.py", "pipeline/demo.py"}


def imported_after(code: str) -> set[str]:
    """The modules loaded in a fresh interpreter after running ``code``."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_loading_a_training_recipe_imports_neither_the_stages_nor_the_curation_driver():
    modules = imported_after(f"""
        from models.training import task_class
        from models.training.loop import run_training
        from models.training.recipe import load_train_config

        load_train_config(task_class("clip"), {str(ROOT / "configs" / "train-clip-tiny.yaml")!r}, [])
    """)
    assert "models.training.clip" in modules
    assert not [name for name in CURATION_MODULES if loaded(modules, name)]
    # One task's recipe loads that task's module only.
    assert not [name for name in ("models.training.blip_base", "models.training.diffusion") if name in modules]


def test_every_task_loads_through_the_registry():
    modules = imported_after("""
        from models.training import TASK_CLASSES, task_class

        for name in TASK_CLASSES:
            assert task_class(name).name == name, name
    """)
    assert not [name for name in CURATION_MODULES if loaded(modules, name)]


def test_the_curation_side_does_not_import_training():
    modules = imported_after("import stages, pipeline.config, pipeline.plan, pipeline.run, pipeline.cli")
    assert not loaded(modules, "models.training")


def test_import_statements_point_one_way():
    """Also the imports inside functions, which the checks above only see when the function runs."""
    wrong = []
    for path in sorted((ROOT / "models").rglob("*.py")):
        for name in imports_of(path):
            forbidden = CURATION_MODULES if "training" in path.parts else ("pipeline.run",)
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    for folder in ("stages", "pipeline"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() in TRAINING_IMPORTERS:
                continue
            wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in imports_of(path)
                      if name == "models.training" or name.startswith("models.training.")]
    assert not wrong, wrong
