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
    "path",
    python_files("moderator", "data_prep", "train", "export", "eval", "launch", "serve", "assets"),
    ids=lambda p: str(p),
)
def test_real_code_never_imports_the_tiny_model_factories(path):
    assert "tiny_models" not in imported_packages(path), f"{path} imports tiny_models (tests and demo only)"


def test_export_is_its_own_stage():
    assert (REPO_ROOT / "export" / "__main__.py").is_file()
    assert not list((REPO_ROOT / "train").glob("export*.py"))


@pytest.mark.parametrize("path", python_files("moderator"), ids=lambda p: p.name)
def test_the_shared_core_imports_no_stage(path):
    # moderator/ is what serving imports: it must not pull in training, export or eval code.
    assert not imported_packages(path) & {"train", "export", "eval", "data_prep", "serve", "assets"}, (
        f"{path} imports a stage"
    )


# -- issue 22: no cycles, one owner per artefact, eval without mixins ---------------------------------------

PRODUCT_PACKAGES = (
    "moderator",
    "data_prep",
    "train",
    "export",
    "eval",
    "serve",
    "assets",
    "tiny_models",
    "bench",
    "launch",
)
ARTEFACT_OWNERS = {"moderator/artefacts.py"}  # the module that opens every file one stage hands to another
INTER_STAGE_FILES = {"stats.json", "moderator_run.json", "moderator_config.json", "manifest.json", "report.json"}
INTER_STAGE_FILES |= {"eval_report.json"}


def product_modules() -> dict[str, object]:
    """Dotted module name -> path, for every product file."""
    modules = {}
    for path in python_files(*PRODUCT_PACKAGES):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path, name: str, modules) -> set[str]:
    """Product modules ``path`` imports anywhere in it (top level, under TYPE_CHECKING, inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # The deepest product module the import names (``a.b.c`` -> ``a.b`` when c is a name in a.b).
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def test_no_two_product_files_import_each_other_directly_or_through_others():
    modules = product_modules()
    graph = {name: imported_modules(path, name, modules) for name, path in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle between files of the product.
    graph = {name: {m for m in deps if not name or not m.startswith(name + ".")} for name, deps in graph.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert not cycles, f"import cycles: {cycles}"


def _relative(path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def _names_a_threshold(node) -> bool:
    text = ast.unparse(node).lower()
    return "threshold" in text


@pytest.mark.parametrize("path", python_files(*PRODUCT_PACKAGES), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_the_threshold_default_validator_and_flag_rule_live_only_in_the_owner(path):
    if _relative(path) in ARTEFACT_OWNERS:
        return
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        # A default: ``threshold = 0.5``, ``threshold: float = 0.5``, ``f(threshold=0.5)``, a field(default=0.5).
        pairs = []
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            pairs += [(t, node.value) for t in targets]
        if isinstance(node, ast.keyword) and node.arg:
            pairs.append((ast.Name(node.arg), node.value))
        if isinstance(node, ast.arguments):
            positional = [*node.posonlyargs, *node.args]
            pairs += list(zip(positional[len(positional) - len(node.defaults) :], node.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d is not None]
        for target, value in pairs:
            name = target.arg if isinstance(target, ast.arg) else ast.unparse(target)
            if "threshold" in name.lower() and isinstance(value, ast.Constant) and value.value == 0.5:
                problems.append(f"line {node.lineno if hasattr(node, 'lineno') else '?'}: a threshold default 0.5")
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("field"):
            owner_default = [k for k in node.keywords if k.arg == "default"]
            help_text = ast.unparse(node).lower()
            if (
                owner_default
                and isinstance(owner_default[0].value, ast.Constant)
                and owner_default[0].value.value == 0.5
            ) and "threshold" in help_text:
                problems.append(f"line {node.lineno}: a threshold field defaulting to 0.5")
        # A validator: a function whose name says it checks a threshold.
        if isinstance(node, ast.FunctionDef) and "threshold" in node.name and node.name.startswith(("_check", "check")):
            problems.append(f"line {node.lineno}: validator {node.name}")
        # The flag rule: a score compared with a threshold.
        compares = isinstance(node, ast.Compare) and any(isinstance(op, ast.GtE | ast.Gt) for op in node.ops)
        if compares and any(_names_a_threshold(c) for c in node.comparators):
            problems.append(f"line {node.lineno}: flag rule {ast.unparse(node)!r}")
    assert not problems, f"{_relative(path)}: use moderator.artefacts instead: {problems}"


@pytest.mark.parametrize("path", python_files(*PRODUCT_PACKAGES), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_inter_stage_file_is_named_only_by_its_owner(path):
    if _relative(path) in ARTEFACT_OWNERS:
        return
    named = sorted(
        {
            node.value
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
            if isinstance(node, ast.Constant) and node.value in INTER_STAGE_FILES
        }
    )
    assert not named, f"{_relative(path)} names {named}: open it through moderator.artefacts"


@pytest.mark.parametrize("path", python_files("eval"), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_eval_has_no_mixin_classes(path):
    project_classes = {
        node.name
        for module in python_files(*PRODUCT_PACKAGES)
        for node in ast.walk(ast.parse(module.read_text()))
        if isinstance(node, ast.ClassDef)
    }
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b).rpartition(".")[2] for b in node.bases]
            assert "Mixin" not in node.name, f"{_relative(path)}: class {node.name}"
            assert len([b for b in bases if b in project_classes]) <= 1, (
                f"{_relative(path)}: class {node.name} inherits several project classes {bases}"
            )
