"""notebooks/00_dpo_from_scratch.ipynb: committed clean and thin, and it runs end to end under papermill."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import nbformat
import pytest

from tests.notebook_warnings import warning_lines

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "00_dpo_from_scratch.ipynb"
REQUIRED_PARAMETERS = {
    "project_dir", "run_dir", "model_dir", "scratch_steps", "beta", "loss_type", "label_smoothing",
    "learning_rate", "batch_size", "seed", "betas_to_compare",
}


def parameters_cell(notebook):
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    return tagged[0]


def test_committed_notebook_is_clean_and_thin():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, "committed without outputs"
        for node in ast.walk(ast.parse(cell.source)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), (
                "cells define no functions or classes; logic lives in dpo_kit.scratch"
            )

    source = parameters_cell(notebook).source
    names = set()
    for statement in ast.parse(source).body:
        assert isinstance(statement, ast.Assign) and len(statement.targets) == 1, ast.unparse(statement)
        ast.literal_eval(statement.value)  # raises unless the value is a literal
        names.add(statement.targets[0].id)
    assert REQUIRED_PARAMETERS <= names
    lines = [line for line in source.splitlines() if line.strip()]
    assert len(lines) == len(names), "one assignment per line"
    assert all(" # " in line for line in lines), "every parameter carries a trailing comment"
    assert 'project_dir = ".."  # relative paths resolve from here (the repo root)' in lines
    assert any(line.startswith('run_dir = ""  #') for line in lines)


def test_defaults_are_the_documented_ones():
    values = {
        statement.targets[0].id: ast.literal_eval(statement.value)
        for statement in ast.parse(parameters_cell(nbformat.read(NOTEBOOK, as_version=4)).source).body
    }
    assert values["scratch_steps"] == 30 and values["beta"] == 0.1 and values["seed"] == 0
    assert values["betas_to_compare"] == [0.05, 0.1, 0.5]
    assert values["model_dir"] == "" and values["run_dir"] == ""  # standalone defaults: the tiny offline model


def test_running_again_with_other_settings_moves_the_earlier_outputs_aside(tmp_path):
    from dpo_kit.scratch.outputs import keep_earlier_outputs

    out = tmp_path / "from-scratch"
    assert keep_earlier_outputs(out, {"beta": 0.1}) == ""
    (out / "curves.json").write_text("beta 0.1")
    assert keep_earlier_outputs(out, {"beta": 0.1}) == "", "same settings: the notebook rewrites the same files"
    assert (out / "curves.json").read_text() == "beta 0.1"
    note = keep_earlier_outputs(out, {"beta": 0.5})
    [kept] = (out / "previous").iterdir()
    assert "other beta" in note and str(kept) in note
    assert (kept / "curves.json").read_text() == "beta 0.1" and json.loads((kept / "settings.json").read_text()) == {"beta": 0.1}
    assert sorted(p.name for p in out.iterdir()) == ["previous", "settings.json"]
    assert json.loads((out / "settings.json").read_text()) == {"beta": 0.5}
    (out / "someone-elses-run").mkdir()  # a shared folder: only the notebook's own files move
    keep_earlier_outputs(out, {"beta": 0.05})
    assert (out / "someone-elses-run").is_dir()


def bf16_gpt2_without_pad_token(tiny_model_dir, path):
    """A model_dir unlike the tiny model in three ways TRL handles: a checkpoint saved in bf16 (TRL loads a path in
    fp32), nn.Dropout layers of 0.1 (TRL sets them to 0) and a tokenizer without a pad token (TRL pads with eos)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.notebook
@pytest.mark.parametrize("model", ["tiny", "bf16 gpt2 without pad token"])
def test_notebook_runs_and_trl_matches_the_scratch_loop(tmp_path, tiny_model_dir, model):
    import papermill

    steps = 8
    model_dir = tiny_model_dir if model == "tiny" else bf16_gpt2_without_pad_token(tiny_model_dir, tmp_path / "model")
    executed_path = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(executed_path),
        parameters=dict(
            project_dir=str(REPO),
            run_dir=str(tmp_path / "run"),
            model_dir=str(model_dir),  # a model outside the repo: nothing is written into it
            scratch_steps=steps,
        ),
        kernel_name="python3",
        cwd=str(NOTEBOOK.parent),
        progress_bar=False,
    )

    executed = nbformat.read(executed_path, as_version=4)
    outputs = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert not warning_lines(outputs)
    inline_figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(inline_figures) == 2  # training curves and the beta figure, shown inline

    run = tmp_path / "run"
    for name in ("scratch_vs_trl.png", "beta_effect.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    curves = json.loads((run / "curves.json").read_text())
    scratch_run, trl_run = curves["scratch"], curves["trl"]
    assert [entry["step"] for entry in scratch_run] == [entry["step"] for entry in trl_run] == list(range(1, steps + 1))
    assert scratch_run[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert trl_run[-1]["loss"] < trl_run[0]["loss"] - 0.05  # it learns...
    for mine, theirs in zip(scratch_run, trl_run, strict=True):  # ...and the two implementations learn identically
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        assert mine["rewards/margins"] == pytest.approx(theirs["rewards/margins"], abs=1e-4)
    assert curves["gaps"]["loss"] < 1e-4


@pytest.mark.notebook
def test_a_mistake_in_the_parameters_cell_is_named_before_anything_loads(tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(
            str(NOTEBOOK), str(tmp_path / "executed.ipynb"),
            parameters=dict(project_dir=str(REPO), run_dir=str(tmp_path / "run"), model_dir="no-such-model",
                            batch_size=0),
            kernel_name="python3", cwd=str(NOTEBOOK.parent), progress_bar=False,
        )
    # Before, batch_size = 0 failed two cells later in collate_pairs with "max() arg is an empty sequence".
    assert error.value.ename == "ValueError"
    assert error.value.evalue == "batch_size = 0: expected a whole number of at least 1"
    assert not (tmp_path / "run").exists()  # refused before any output was written
