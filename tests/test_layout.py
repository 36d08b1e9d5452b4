"""Every import inside dpo_kit points down the layers, so no stage reaches into a later one.

Each module belongs to a group: a sub-package (`dpo_kit/<group>/...`) or the floor (the modules directly
under `dpo_kit/`). An import of `dpo_kit...`, at module level or inside a function, must stay in its
own group or go to a group of a strictly lower layer. Nothing outside `dpo_kit/run/` imports from
`dpo_kit.run`. Read with `ast`, so nothing of the kit (or torch) is imported by this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

PACKAGE = Path(__file__).resolve().parent.parent / "dpo_kit"

# Lower layers are imported by higher ones, never the other way; groups sharing a layer import neither
# each other. The floor (params, hardware, manifest, chat_templates, bundled) imports only the floor.
LAYERS = {
    "floor": 0,
    "models": 1,  # loading, sampling, gguf, tiny: the floor only
    "judges": 1,  # the floor only (hardware)
    "data": 2,  # models (loading, sampling, tiny), judges (on-policy pairs)
    "scratch": 3,  # data (audit.common_prefix_length: tokenized as the audit and TRL do)
    "training": 4,  # data (load_split), models
    "evaluation": 4,  # scratch (sequence_logps), judges, models
    "run": 5,  # everything: the notebooks' stage helpers, the runner and the command line
}
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "matplotlib", "pandas", "bitsandbytes", "papermill")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module: str) -> str:
    """'dpo_kit.data.audit' -> 'data'; 'dpo_kit.params' -> 'floor'; a sub-package is a directory."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "floor"


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def kit_imports(source: str, module: str, is_package: bool) -> list[tuple[int, str, str]]:
    """(line, imported module, the statement) for every import of dpo_kit in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from dpo_kit import manifest` imports the module dpo_kit.manifest, `from dpo_kit.models import gguf`
            # the module dpo_kit.models.gguf; `from dpo_kit.params import Params` imports from dpo_kit.params.
            targets = [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):  # `from a import b, c` is one import of a
            if target == "dpo_kit" or target.startswith("dpo_kit."):
                found.append((node.lineno, target, ast.unparse(node)))
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    module = module_name(path)
    own = group_of(module)
    where = path.relative_to(PACKAGE.parent)
    problems = []
    for line, target, statement in kit_imports(source or path.read_text(), module, path.name == "__init__.py"):
        other = group_of(target)
        if not is_module(target):
            problems.append(f"{where}:{line}: `{statement}` names no module of the kit")
        elif other == "run" and own != "run":
            problems.append(f"{where}:{line}: `{statement}` imports dpo_kit.run, which only run/ may import")
        elif other != own and LAYERS[other] >= LAYERS[own]:
            problems.append(
                f"{where}:{line}: `{statement}` points up or sideways: {own} (layer {LAYERS[own]}) -> {other}"
                f" (layer {LAYERS[other]}); imports go to the same group or a lower layer"
            )
    return problems


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_group_has_a_layer():
    groups = {group_of(module_name(path)) for path in MODULES}
    assert groups <= set(LAYERS), f"give every group a layer; missing: {sorted(groups - set(LAYERS))}"
    assert set(LAYERS) <= groups, f"layers naming no group: {sorted(set(LAYERS) - groups)}"
    packages = {path.parent for path in MODULES if path.parent != PACKAGE}
    assert all((package / "__init__.py").exists() for package in packages), "every sub-package has an __init__.py"


def test_imports_point_down():
    problems = [problem for path in MODULES for problem in violations(path)]
    assert not problems, "imports that break the layering:\n" + "\n".join(problems)


def test_imports_from_tests_bench_and_notebooks_name_existing_modules():
    """A stale path in a function-level import fails only when the function runs; catch it here."""
    root = PACKAGE.parent
    sources = {path: path.read_text() for folder in ("tests", "bench") for path in sorted((root / folder).glob("*.py"))}
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        sources[path] = "\n".join(TransformerManager().transform_cell(c.source) for c in cells if c.cell_type == "code")
    problems = [
        f"{path.relative_to(root)}:{line}: `{statement}` names no module of the kit"
        for path, source in sources.items()
        for line, target, statement in kit_imports(source, path.stem, False)
        if not is_module(target)
    ]
    assert len(sources) > 20 and not problems, "\n".join(problems)


def test_the_check_sees_function_level_and_relative_imports():
    audit = PACKAGE / "data" / "audit.py"
    source = (
        "from dpo_kit.params import Params\n"
        "def f():\n"
        "    from dpo_kit.evaluation.generate import read_jsonl\n"
        "    from ..run import stage\n"
        "    import dpo_kit.scratch.loss\n"
        "    from dpo_kit.no_such_module import build_tiny_model\n"
    )
    problems = violations(audit, source)
    assert len(problems) == 4, problems
    assert problems[0].startswith("dpo_kit/data/audit.py:3: `from dpo_kit.evaluation.generate import read_jsonl`")
    assert "imports dpo_kit.run" in problems[1] and ":4:" in problems[1]
    assert "data (layer 2) -> scratch (layer 3)" in problems[2]
    assert problems[3] == (
        "dpo_kit/data/audit.py:6: `from dpo_kit.no_such_module import build_tiny_model` names no module of the kit"
    )


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_inits_import_nothing_heavy(path):
    for node in ast.parse(path.read_text()).body:  # module level only: functions may import what they need
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        heavy = [name for name in names if name.split(".")[0] in HEAVY]
        assert not heavy, f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {heavy} at import time"
