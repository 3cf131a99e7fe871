"""No folder or module that Python can import from where this project's commands start may take the
name of an installed distribution's top-level module.

`python -m ...` and pytest put the repository root first on ``sys.path``; a script run by path (the
2-rank driver, ``tests/parallel_driver.py``) puts its own folder first. A `kernels/` folder at the root
once shadowed Hugging Face's `kernels` package, which transformers 5.25 imports when it loads a model,
and every command started from the root crashed.
"""
import importlib.metadata as md
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folders that go first on sys.path: the root, and that of each script the suite runs by path.
FIRST_ON_PATH = [ROOT, os.path.join(ROOT, "tests")]
OWN = {"metarm-fast"}


def importable_names(folder: str) -> set[str]:
    """The top-level names a Python started with ``folder`` first on sys.path finds there first: a
    package (a folder with __init__.py) or a module (a .py file). A folder without __init__.py is a
    namespace portion, which any regular package later on sys.path wins over, so it shadows nothing."""
    names = set()
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif entry.endswith(".py"):
            names.add(entry[:-3])
    return names


def shadowed(folder: str, installed: dict[str, list[str]]) -> dict[str, list[str]]:
    return {n: installed[n] for n in sorted(importable_names(folder))
            if n in installed and not set(installed[n]) <= OWN}


@pytest.mark.parametrize("folder", FIRST_ON_PATH, ids=lambda f: os.path.relpath(f, ROOT))
def test_nothing_first_on_sys_path_shadows_an_installed_distribution(folder):
    clash = shadowed(folder, md.packages_distributions())
    assert not clash, (f"{folder}: these names would shadow installed distributions when Python starts here: "
                       f"{clash}; rename them or move them into the metarm_fast package")


def test_a_kernels_folder_at_the_root_would_be_caught(tmp_path):
    """The check itself, on the name that broke: Hugging Face's `kernels` is installed with
    transformers >= 5.25 (the pinned set holds it)."""
    installed = md.packages_distributions()
    assert "kernels" in installed, "Hugging Face's kernels distribution is not installed: this check cannot bite"
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "no_package").mkdir()  # a namespace portion: shadows nothing
    assert shadowed(str(tmp_path), installed) == {"kernels": installed["kernels"]}
