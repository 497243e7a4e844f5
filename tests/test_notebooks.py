"""The notebooks are kept without outputs (make test runs them with nbmake)."""

import ast
import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {
        "walkthrough.ipynb",
        "large-data.ipynb",
        "science-outputs.ipynb",
    }


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def _imported_modules(notebook: Path) -> set[str]:
    """The top-level modules a notebook's code cells import."""
    modules = set()
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
    return modules


def _installed_with(distribution: str, extras: set[str], seen: set[str]) -> set[str]:
    """The distributions ``pip install distribution[extras]`` brings, as installed here (the
    markers of each requirement evaluated for this machine)."""
    name = canonicalize_name(distribution)
    if (name, frozenset(extras)) in seen:
        return set()
    seen.add((name, frozenset(extras)))
    found = {name}
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        wanted = ({"extra": extra} for extra in extras or {""})
        if requirement.marker and not any(requirement.marker.evaluate(e) for e in wanted):
            continue
        found |= _installed_with(requirement.name, set(requirement.extras), seen)
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_with_the_extras_its_readme_names(notebook):
    # notebooks/README.md: pip install -e '.[notebook]' (a user without the test extras)
    assert "'.[notebook]'" in (notebook.parent / "README.md").read_text()
    installed = _installed_with("coron-dask", {"notebook"}, set())
    owners = importlib.metadata.packages_distributions()
    for module in _imported_modules(notebook) - set(sys.stdlib_module_names):
        distributions = {canonicalize_name(d) for d in owners.get(module, [module])}
        assert distributions & installed, f"{notebook.name} imports {module}: not in [notebook]"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_removes_its_folder(notebook):
    # each works in a temporary folder of its own; its last cell removes it, so a user who
    # runs them leaves nothing in /tmp
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    made = [c for c in cells if "tempfile.mkdtemp(" in "".join(c["source"])]
    assert len(made) == 1
    assert "shutil.rmtree(work)" in "".join(cells[-1]["source"])
