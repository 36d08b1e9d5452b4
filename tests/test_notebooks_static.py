"""Every committed notebook is thin: one parameters cell of commented literals, no functions, no outputs."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from dpo_kit.run.runner import STAGE_NOTEBOOKS

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_all_stage_notebooks_and_the_from_scratch_one_exist():
    names = {p.name for p in NOTEBOOKS}
    assert set(STAGE_NOTEBOOKS.values()) <= names
    assert "00_dpo_from_scratch.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin_and_committed_clean(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    for statement in ast.parse(tagged[0].source).body:
        assert isinstance(statement, ast.Assign), f"only assignments in the parameters cell: {ast.unparse(statement)}"
        ast.literal_eval(statement.value)  # raises unless the value is a literal
    for line in tagged[0].source.splitlines():
        assert "#" in line, f"every parameter carries a comment: {line!r}"
        # papermill's parameter inspection skips a line with a second '=', hiding it from --help-notebook.
        assert line.count("=") == 1, f"no '=' in a parameter's value or comment: {line!r}"
    for cell in code:
        assert not cell.get("outputs") and cell.get("execution_count") is None, "committed without outputs"
        python = TransformerManager().transform_cell(cell.source)  # %magics become plain calls
        for node in ast.walk(ast.parse(python)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), (
                f"{path.name}: cells define no functions or classes; move logic into dpo_kit"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_first_code_cell_installs_the_kit_in_colab_only(path):
    """Imports, then one `if "google.colab" in sys.modules:` holding everything else, before the parameters cell:
    outside Colab (JupyterLab, papermill, `dpo-kit run`) it does nothing (tests/test_colab_and_wheel.py runs it)."""
    code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    body = ast.parse(code[0].source).body
    assert all(isinstance(statement, (ast.Import, ast.ImportFrom)) for statement in body[:-1]), path.name
    assert isinstance(body[-1], ast.If) and not body[-1].orelse, f"{path.name}: the Colab cell ends in one guarded if"
    assert ast.unparse(body[-1].test) == "'google.colab' in sys.modules", f"{path.name}: first code cell is unguarded"
    assert "parameters" in code[1].metadata.get("tags", []), f"{path.name}: the parameters cell follows the Colab cell"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name in STAGE_NOTEBOOKS.values()], ids=lambda p: p.name)
def test_stage_notebooks_take_the_runner_parameters(path):
    notebook = nbformat.read(path, as_version=4)
    source = next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    names = {node.targets[0].id for node in ast.parse(source).body}
    assert names == {"params_path", "overrides", "project_dir", "run_dir", "on_rerun"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_notebook_loads_model_weights_from_safetensors_only(path):
    """A model a notebook loads itself (notebook 00's model_dir, which a user may point anywhere) must not be
    unpickled: every AutoModel*.from_pretrained passes use_safetensors=True, and so does TRL for what it loads."""
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(TransformerManager().transform_cell(cell.source))):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            function = ast.unparse(node.func)
            if function.startswith("AutoModel") and function.endswith(".from_pretrained"):
                assert ast.unparse(keywords.get("use_safetensors", ast.Constant(None))) == "True", ast.unparse(node)
            if function == "DPOConfig":
                init = ast.literal_eval(keywords.get("model_init_kwargs", ast.Constant({})))
                assert init.get("use_safetensors") is True, "DPOConfig(model_init_kwargs={'use_safetensors': True})"
