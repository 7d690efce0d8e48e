"""Import boundaries between the stages: training never depends on eval, real code never on tiny models."""

import ast

import pytest

from tests.conftest import REPO_ROOT


def imported_packages(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def python_files(*packages: str):
    return sorted(p for package in packages for p in (REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", python_files("train"), ids=lambda p: p.name)
def test_training_does_not_import_eval_or_export(path):
    assert not imported_packages(path) & {"eval", "export"}, f"{path} imports a later stage"


@pytest.mark.parametrize(
    "path", python_files("moderator", "data_prep", "train", "export", "eval", "launch"), ids=lambda p: str(p)
)
def test_real_code_never_imports_the_tiny_model_factories(path):
    assert "tiny_models" not in imported_packages(path), f"{path} imports tiny_models (tests and demo only)"


def test_export_is_its_own_stage():
    assert (REPO_ROOT / "export" / "__main__.py").is_file()
    assert not list((REPO_ROOT / "train").glob("export*.py"))


@pytest.mark.parametrize("path", python_files("moderator"), ids=lambda p: p.name)
def test_the_shared_core_imports_no_stage(path):
    # moderator/ is what serving imports: it must not pull in training, export or eval code.
    assert not imported_packages(path) & {"train", "export", "eval", "data_prep"}, f"{path} imports a stage"
