"""The product, end to end: `dpo-kit run` executes all five notebooks on the tiny model (minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dpo_kit.run.cli import main
from dpo_kit.run.runner import RunError, run_pipeline
from tests.notebook_warnings import warning_lines

pytestmark = pytest.mark.notebook
REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"
FAKE_TOKEN = "hf_this_secret_must_never_reach_a_file"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """One complete tiny run with a (fake) HF_TOKEN in the environment of every kernel."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = [f"run.output_dir={runs}", f"model.name_or_path={tiny_model_dir}"]
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_TOKEN", FAKE_TOKEN)
    try:
        run_dir = run_pipeline(TINY, overrides, project_dir=REPO, progress=False)
    finally:
        patch.undo()
    return run_dir, overrides


def test_run_directory_holds_every_output(tiny_run):
    run_dir, _ = tiny_run
    for name in ["params.yaml", "manifest.json", "data/train.jsonl", "data/eval.jsonl", "data/dropped.jsonl",
                 "adapter/adapter_model.safetensors", "merged/model.safetensors", "merged/tokenizer_config.json",
                 "generations.jsonl", "metrics.json", "training_curves.png", "token_lengths.png", "evaluation.png"]:
        assert (run_dir / name).is_file(), name
    executed = sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb"))
    assert executed == ["01_format_data.ipynb", "02_train_dpo.ipynb", "03_merge.ipynb", "04_generate.ipynb",
                        "05_evaluate.ipynb"]
    assert not list((run_dir / "merged").glob("*.bin")), "weights are saved as safetensors only"


def shows_an_image(path: Path) -> bool:
    notebook = nbformat.read(path, as_version=4)
    return any("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def test_every_file_of_a_run_belongs_to_a_stage_or_to_the_run(tiny_run):
    """A stage run again moves its outputs aside by STAGE_OUTPUTS: a file missing there would be left behind."""
    from dpo_kit.run.stage import RUN_FILES, STAGE_OUTPUTS

    run_dir, _ = tiny_run
    owned = {path for paths in STAGE_OUTPUTS.values() for path in paths}
    for path in run_dir.iterdir():
        if path.name == "notebooks":
            assert {f"notebooks/{p.name}" for p in path.iterdir()} <= owned
        else:
            assert path.name in owned | set(RUN_FILES), f"{path.name}: add it to STAGE_OUTPUTS"


def test_stage_notebooks_show_their_plots_inline(tiny_run):
    run_dir, _ = tiny_run
    for name in ["01_format_data", "02_train_dpo", "05_evaluate"]:
        assert shows_an_image(run_dir / "notebooks" / f"{name}.ipynb"), name


def test_executed_notebooks_show_no_warning_and_text_progress_bars(tiny_run):
    """What a reader of the executed notebooks sees: no warning line (tests/notebook_warnings.py) and no kernel
    security notice; each one the stack printed here was fixed at its source. Progress bars are text: a widget
    saved by papermill shows only its first frame ("0%"), and would hide the bar from `dpo-kit run`'s line."""
    run_dir, _ = tiny_run
    bars = 0
    for path in sorted((run_dir / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            outputs = cell.get("outputs", [])
            flagged = warning_lines(outputs) + [line for o in outputs for line in o.get("text", "").splitlines()
                                                if "without encryption" in line]  # fmt: skip
            assert not flagged, f"{path.name}: {flagged}"
            assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), path.name
            bars += sum("100%|" in o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert bars >= 3, "the tiny run's loading, tokenizing and sampling bars end as text"


def test_manifest_records_stages_hardware_versions_and_data(tiny_run):
    run_dir, _ = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    for stage in ["format", "train", "merge", "generate", "evaluate"]:
        entry = manifest["stages"][stage]
        assert entry["status"] == "completed" and entry["seconds"] > 0 and entry["wall_seconds"] >= entry["seconds"]
    assert manifest["stages"]["train"]["precision"] == {"bf16": False, "fp16": False, "gradient_checkpointing": False}
    # What training cost: the Trainer's own token count (unpadded), its rate, and the process's peak memory.
    cost = manifest["stages"]["train"]["cost"]
    last_log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()][-1]
    assert cost["steps"] == 40 and cost["tokens"] == last_log["num_input_tokens_seen"] > 40 * 8 * 2
    assert cost["tokens_per_second"] == pytest.approx(cost["tokens"] / cost["train_runtime_s"], rel=1e-3)
    assert cost["pairs_per_second"] == pytest.approx(40 * 8 / cost["train_runtime_s"], rel=1e-2)
    assert 0.1 < cost["process_peak_rss_gib"] < 24 and "cuda_peak_allocated_gib" not in cost
    assert manifest["hardware"]["device"] == "cpu" and "reason" in manifest["hardware"]
    assert manifest["packages"]["trl"] and manifest["packages"]["torch"]
    assert manifest["seed"] == 42 and "commit" in manifest["git"]
    assert len(manifest["data"]["fingerprint"]) == 64
    assert manifest["data"]["rows_kept"] + manifest["data"]["rows_dropped"] == manifest["data"]["rows_read"]


def test_dpo_learned_the_bundled_preference(tiny_run):
    run_dir, _ = tiny_run
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert losses[-1] < losses[0] < 0.7, "loss starts near ln 2 and falls"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rewards/accuracies"] > 0.8, "held-out pairs: the policy prefers the chosen reply"
    assert metrics["rewards/margins"] > 0
    assert metrics["kl"] >= 0


def test_generations_compare_reference_and_policy(tiny_run):
    run_dir, _ = tiny_run
    rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert all("reference" in row and "policy" in row for row in rows)


def test_no_secret_reaches_a_run_file(tiny_run):
    run_dir, _ = tiny_run
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_rerunning_a_completed_run_refuses_and_overwrite_archives(tiny_run, capsys):
    run_dir, overrides = tiny_run
    with pytest.raises(RunError, match="never overwritten"):
        run_pipeline(TINY, overrides, project_dir=REPO, progress=False)
    assert main(["run", str(TINY), "--quiet", *[a for o in overrides for a in ("--set", o)]]) == 1
    assert "never overwritten" in capsys.readouterr().err


def test_a_failing_stage_names_itself_and_its_notebook(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b"\n')  # not JSON: the format stage fails reading it
    overrides = [f"run.output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "run.name=broken",
                 f"data.source={pairs}", "evaluate.judge=sentiment"]
    with pytest.raises(RunError) as caught:
        run_pipeline(TINY, overrides, stages=["format"], project_dir=REPO, progress=False)
    executed = tmp_path / "broken" / "notebooks" / "01_format_data.ipynb"
    assert "stage 'format' failed" in str(caught.value) and str(executed) in str(caught.value)
    assert "Traceback" in executed.read_text()
    manifest = json.loads((tmp_path / "broken" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"]["format"]["status"] == "failed"


def test_continuing_a_run_with_other_params_is_refused(tmp_path, tiny_model_dir):
    from dpo_kit.params import ParamsError

    overrides = [f"run.output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "run.name=partial"]
    run_pipeline(TINY, overrides, stages=["format"], project_dir=REPO, progress=False)
    # The process has ended with one stage of five done: the run is partial, not running.
    assert json.loads((tmp_path / "partial" / "manifest.json").read_text())["status"] == "partial"
    with pytest.raises(ParamsError, match="dpo.beta: 0.1 -> 0.5"):
        run_pipeline(TINY, [*overrides, "dpo.beta=0.5"], stages=["train"], project_dir=REPO, progress=False)
    assert not (tmp_path / "partial" / "adapter").exists()


def test_a_new_run_reuses_the_pairs_of_a_run_with_the_same_data_params(tiny_run, tmp_path):
    source, overrides = tiny_run
    elsewhere = [*overrides, f"run.output_dir={tmp_path}"]
    run_dir = run_pipeline(TINY, [*elsewhere, "run.name=beta-0.5", "dpo.beta=0.5"], stages=["format"],
                           project_dir=REPO, progress=False, reuse_format=source)  # fmt: skip
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["format"]
    data = json.loads((source / "manifest.json").read_text())["data"]
    assert entry["status"] == "completed" and entry["reused_from"] == str(source)
    assert entry["data_fingerprint"] == data["fingerprint"]
    for split in ("train", "eval"):
        assert (run_dir / "data" / f"{split}.jsonl").read_bytes() == (source / "data" / f"{split}.jsonl").read_bytes()

    with pytest.raises(RunError, match=r"--reuse-format .*data.max_rows: \S+ -> 40.*leave --reuse-format out"):
        run_pipeline(TINY, [*elsewhere, "run.name=fewer", "data.max_rows=40"], stages=["format"], project_dir=REPO,
                     progress=False, reuse_format=source)  # fmt: skip
    assert not (tmp_path / "fewer" / "data").exists()
    with pytest.raises(RunError, match="--reuse-format starts a new run.*already holds one"):
        run_pipeline(TINY, [*elsewhere, "run.name=beta-0.5", "dpo.beta=0.5"], stages=["format"], project_dir=REPO,
                     progress=False, reuse_format=source)  # fmt: skip


def test_a_notebook_runs_under_plain_papermill_with_p(tmp_path, tiny_model_dir):
    """The README's plain-papermill invocation, for one stage (an absolute run_dir keeps it out of the repo)."""
    output = tmp_path / "01.ipynb"
    command = [sys.executable, "-m", "papermill", "notebooks/01_format_data.ipynb", str(output),
               "-p", "project_dir", ".", "-p", "run_dir", str(tmp_path / "run"),
               "-y", f"overrides: ['model.name_or_path={tiny_model_dir}']", "--no-progress-bar"]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    assert (tmp_path / "run" / "data" / "train.jsonl").exists()
    assert shows_an_image(output)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["format"]["status"] == "completed"


def test_a_named_hub_model_offline_fails_clearly_and_nothing_is_built_in_its_place(tmp_path):
    """The issue's reproduction: tiny.yaml (build_tiny_model: true) with a hub id, and no network. HF_HUB_OFFLINE is
    set, so the cache is looked in before the first stage (tests/test_hub_cache.py); the format stage's own message,
    for a hub that cannot be reached, is tested in tests/test_models.py."""
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"]
    with pytest.raises(RunError) as caught:
        run_pipeline(TINY, overrides, stages=["format"], project_dir=tmp_path, progress=False)
    message = str(caught.value)
    assert "model.name_or_path: 'Qwen/Qwen2.5-0.5B-Instruct' at revision main: no config.json for it" in message
    assert "HF_HUB_OFFLINE is set" in message and message.endswith("Nothing was run")
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "Qwen").exists() and not (REPO / "Qwen").exists()


def test_isolated_stages_each_get_a_kernel_of_their_own(tmp_path, tiny_model_dir):
    overrides = [f"run.output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "run.name=isolated"]
    run_dir = run_pipeline(TINY, overrides, stages=["format"], project_dir=REPO, progress=False, isolate_stages=True)
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["format"]["status"] == "completed"
