"""The notebook tier: nbval runs every notebook in notebooks/ (pyproject's testpaths and addopts), and the
checks it makes are real: expected outputs match the notebooks, and a raising cell or a changed output fails
naming the notebook and the cell."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import tomllib
from nbval_expected import EXPECTED_OUTPUTS, NOTEBOOKS, is_checked

REPO = Path(__file__).resolve().parent.parent
SANITIZE = EXPECTED_OUTPUTS / "sanitize.cfg"


def nbval(project: Path, *paths: str) -> subprocess.CompletedProcess:
    """`pytest --nbval-lax` in `project`, as a user runs it, outside this session."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rf", "--color=no", f"--rootdir={project}",
               "--nbval-lax", "--nbval-current-env",
               "--nbval-sanitize-with", str(SANITIZE), *paths]
    return subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=900)


def copy_project(destination: Path, with_checks: bool = False) -> Path:
    """notebooks/ and params/ in a new project; `with_checks` adds the nbval glue and the expected outputs."""
    shutil.copytree(REPO / "notebooks", destination / "notebooks")
    shutil.copytree(REPO / "params", destination / "params")
    if with_checks:
        for name in ("conftest.py", "pyproject.toml", "tests/nbval_expected.py", "tests/notebook_warnings.py"):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, destination / name)
        shutil.copytree(EXPECTED_OUTPUTS, destination / "tests" / "notebook_outputs")
    return destination


def test_the_test_command_runs_every_notebook_under_nbval():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["testpaths"][0] == "notebooks", "notebooks/ is collected, and first"
    assert "--nbval-lax" in options["addopts"].split()
    assert str(SANITIZE.relative_to(REPO)) in options["addopts"]


def test_every_checked_cell_has_a_captured_output_with_the_same_source():
    checked = 0
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        code = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
        marked = [i for i, cell in enumerate(code) if is_checked(cell.source)]
        if not marked:
            assert not (EXPECTED_OUTPUTS / notebook.name).exists(), f"stale expected outputs for {notebook.name}"
            continue
        expected = [c for c in nbformat.read(EXPECTED_OUTPUTS / notebook.name, as_version=4).cells if c.cell_type == "code"]
        assert [c.source for c in expected] == [c.source for c in code], f"{notebook.name}: recapture its outputs"
        for index in marked:
            assert expected[index].outputs and expected[index].execution_count, f"{notebook.name} cell {index}"
            checked += 1
        for index in set(range(len(code))) - set(marked):
            assert not expected[index].outputs, f"{notebook.name} cell {index} is not checked; keep no output"
    assert checked >= 4  # the from-scratch loss and gap cells, the format stage's counts and drop table


def test_sanitize_keeps_a_real_gap_and_hides_rounding():
    import re

    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns(SANITIZE.read_text())

    def sanitize(text: str) -> str:
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    assert sanitize("{'loss': '6.56e-07'}") == sanitize("{'loss': '1.91e-06'}") == "{'loss': '<1e-4'}"
    assert sanitize("{'loss': '3.20e-02'}") != sanitize("{'loss': '1.91e-06'}")
    assert sanitize("loss 0.69314718") == sanitize("loss 0.69317") != sanitize("loss 0.70")
    assert sanitize("kept 400 (360 train / 40 eval)") == "kept 400 (360 train / 40 eval)"


@pytest.mark.notebook
def test_a_raising_cell_and_a_changed_output_fail_naming_notebook_and_cell(tmp_path):
    project = copy_project(tmp_path / "project")
    for notebook in (project / "notebooks").glob("*.ipynb"):
        notebook.unlink()
    source = nbformat.read(NOTEBOOKS / "01_format_data.ipynb", as_version=4)

    raising = nbformat.from_dict(json.loads(json.dumps(source)))
    raising.cells.insert(3, nbformat.v4.new_code_cell("raise RuntimeError('a planted failure')"))
    nbformat.write(raising, project / "notebooks" / "01_raises.ipynb")

    changed = nbformat.from_dict(json.loads(json.dumps(source)))
    expected = [c for c in nbformat.read(EXPECTED_OUTPUTS / "01_format_data.ipynb", as_version=4).cells if c.cell_type == "code"]
    code = [c for c in changed.cells if c.cell_type == "code"]
    counts = next(i for i, c in enumerate(code) if is_checked(c.source) and "kept" in c.source)
    code[counts].outputs = nbformat.from_dict(json.loads(json.dumps(expected[counts].outputs).replace("kept 400", "kept 401")))
    code[counts].execution_count = expected[counts].execution_count
    assert "kept 401" in json.dumps(code[counts].outputs), "the captured output changed; update this test"
    nbformat.write(changed, project / "notebooks" / "01_changed_output.ipynb")

    done = nbval(project, "notebooks/")
    report = done.stdout + done.stderr
    assert done.returncode != 0
    assert "FAILED notebooks/01_changed_output.ipynb::Cell " + str(counts) in report, report[-3000:]
    assert "FAILED notebooks/01_raises.ipynb::Cell 2" in report, report[-3000:]
    assert "a planted failure" in report and "Cell outputs differ" in report
    assert "2 failed" in report, "nothing else failed: the copies run where the notebooks do"


def test_two_test_workers_keep_the_notebook_tier_on_one_and_each_test_file_together():
    """scripts/test.sh runs the unit and notebook tiers on two pytest-xdist workers (tests/parallel.py)."""
    from tests.parallel import NOTEBOOK_TIER, NOTEBOOK_TIER_TESTS, SLOWEST_FIRST, scope_of, slowest_first

    tier = {scope_of("notebooks/01_format_data.ipynb::Cell 3"), scope_of("notebooks/05_evaluate.ipynb::Cell 1"),
            scope_of(f"{NOTEBOOK_TIER_TESTS}::test_the_notebooks_leave_the_tiny_model_a_completed_run_and_the_figures")}
    assert len(tier) == 1
    assert scope_of("tests/test_sweep.py::test_a[x-y]") == scope_of("tests/test_sweep.py::test_b") == "tests/test_sweep.py"
    assert scope_of("tests/test_resume.py::test_c") not in tier | {"tests/test_sweep.py"}
    # Tests that read what the notebooks left behind must share their scope, so they live in that one file.
    marked = sorted(p.name for p in (REPO / "tests").glob("test_*.py") if "mark.after_notebooks" in p.read_text())
    assert marked == [Path(NOTEBOOK_TIER_TESTS).name], marked
    # The slowest scopes are handed out first; each one listed still exists.
    assert [scope for scope in SLOWEST_FIRST if scope != NOTEBOOK_TIER and not (REPO / scope).is_file()] == []
    assert slowest_first(["tests/test_params.py", "tests/test_resume.py", "tests/test_audit.py", NOTEBOOK_TIER]) == [
        NOTEBOOK_TIER, "tests/test_resume.py", "tests/test_params.py", "tests/test_audit.py"]


@pytest.mark.notebook
def test_the_whole_notebook_tier_runs_twice_in_one_checkout(tmp_path):
    """Run All a second time: every stage shows its stored result instead of refusing or recomputing, and the
    checked cells print what they printed the first time."""
    project = copy_project(tmp_path / "project", with_checks=True)
    copied = {p for p in project.rglob("*") if p.is_file()}
    first = nbval(project, "notebooks/")
    assert first.returncode == 0, first.stdout[-3000:]
    written = {p for p in project.rglob("*") if p.is_file()} - copied
    outside = sorted(str(p.relative_to(project)) for p in written
                     if p.relative_to(project).parts[0] != "runs" and "__pycache__" not in p.parts)  # pytest's own
    assert not outside, "the notebooks write only under the git-ignored runs/"
    run_dir = project / "runs" / "tiny-notebooks"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    second = nbval(project, "notebooks/")
    assert second.returncode == 0, second.stdout[-3000:]
    again = json.loads((run_dir / "manifest.json").read_text())
    assert again["stages"] == manifest["stages"], "nothing was recomputed or re-recorded"
    assert again["status"] == "completed" and not (run_dir / "previous").exists()


@pytest.fixture(scope="module")
def notebook_tier_ran(request) -> Path:
    """The checkout's notebook tier ran in this session (its cells come first), or run it now."""
    ran = any(type(item).__name__ == "IPyNbCell" and Path(str(item.fspath)).resolve().parent == NOTEBOOKS.resolve()
              for item in request.session.items)
    if not ran:
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "notebooks/"],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:]
    return REPO / "runs"


@pytest.mark.notebook
@pytest.mark.after_notebooks
def test_the_notebooks_leave_the_tiny_model_a_completed_run_and_the_figures(notebook_tier_ran):
    runs = notebook_tier_ran
    assert (runs / "_tiny-chat-model" / "model.safetensors").exists(), "the tiny model was built on demand"
    run_dir = runs / "tiny-notebooks"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [manifest["stages"][s]["status"] for s in ["format", "train", "merge", "generate", "evaluate"]] == [
        "completed"] * 5
    assert json.loads((run_dir / "metrics.json").read_text())["rewards/accuracies"] > 0.5
    assert list((runs / "from-scratch").glob("*.png")), "the from-scratch notebook saved its figures"
