"""Running a stage notebook again: same params show the stored result, changed params move the earlier
result aside (never destroy it), and a later stage never builds on another parameter set's output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpo_kit import manifest as mf
from dpo_kit.params import PLACE_ONLY_KEYS, load_params, params_to_dict
from dpo_kit.run.stage import (
    STAGE_INPUTS,
    StageError,
    open_stage,
    params_fingerprint,
)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"


def leaves(tree: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in tree.items():
        found += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
    return found


@pytest.mark.parametrize("path", sorted((REPO / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_key_belongs_to_a_stage(path):
    listed = [key for keys in STAGE_INPUTS.values() for key in keys] + list(PLACE_ONLY_KEYS)
    for key in leaves(params_to_dict(load_params(path))):
        assert any(key == k or key.startswith(f"{k}.") for k in listed), f"{key}: add it to STAGE_INPUTS"


def test_a_stage_fingerprint_follows_the_params_it_and_earlier_stages_depend_on():
    base = params_to_dict(load_params(TINY))
    def changed(override: str) -> set[str]:
        other = params_to_dict(load_params(TINY, [override]))
        return {s for s in mf.STAGES if params_fingerprint(other, s) != params_fingerprint(base, s)}

    assert changed("dpo.beta=0.5") == {"train", "merge", "generate", "evaluate"}
    assert changed("dpo.max_length=128") == set(mf.STAGES)  # the audit drops pairs above it
    assert changed("data.eval_fraction=0.2") == set(mf.STAGES)
    assert changed("generate.max_new_tokens=8") == {"generate", "evaluate"}
    assert changed("evaluate.judge=OpenAssistant/reward-model") == {"evaluate"}
    assert changed("run.name=elsewhere") == set()  # it names the place, not the content


def open_format(run_dir: Path, tiny_model_dir: Path, *extra: str, on_rerun: str = "show"):
    """The format notebook's code, in process: open the stage, compute or show, complete."""
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer, model_source

    stage = open_stage("format", str(TINY), [f"model.name_or_path={tiny_model_dir}", *extra], str(REPO),
                       str(run_dir), on_rerun)
    if stage.reused:
        report = stage.stored_result()
    else:
        tokenizer = load_tokenizer(model_source(stage.params, stage.project_dir), stage.params)
        report = prepare_data(stage.params, tokenizer, stage.run_dir, stage.project_dir)
    stage.complete(rows_kept=report.rows_kept)
    return stage, report


def test_same_params_show_the_stored_result_and_recompute_moves_it_aside(tmp_path, tiny_model_dir, capsys):
    run_dir = tmp_path / "run"
    _, first = open_format(run_dir, tiny_model_dir)
    entry = mf.read_manifest(run_dir)["stages"]["format"]
    data_time = (run_dir / "data" / "train.jsonl").stat().st_mtime_ns

    stage, shown = open_format(run_dir, tiny_model_dir)
    assert stage.reused and "showing its stored result" in capsys.readouterr().out
    assert shown == first, "the stored report reads back whole, token lengths included"
    assert mf.read_manifest(run_dir)["stages"]["format"] == entry
    assert (run_dir / "data" / "train.jsonl").stat().st_mtime_ns == data_time

    stage, _ = open_format(run_dir, tiny_model_dir, on_rerun="recompute")
    assert not stage.reused
    manifest = mf.read_manifest(run_dir)
    [moved] = manifest["previous"]
    assert moved["stages"] == ["format"] and "recompute" in moved["reason"]
    assert (run_dir / moved["path"] / "data" / "train.jsonl").stat().st_mtime_ns == data_time
    assert json.loads((run_dir / moved["path"] / "manifest.json").read_text())["stages"]["format"] == entry
    assert manifest["stages"]["format"]["finished"] >= entry["finished"]


def test_a_stage_notebooks_last_output_is_one_line_not_the_manifest_entry(tmp_path, tiny_model_dir):
    """Each stage notebook ends with `stage.complete(...)`, and showed the whole entry it returns: the pid, boot id
    and start ticks that find a dead stage, the heartbeat, and in 05 every metric to 16 digits."""
    from IPython.lib.pretty import pretty

    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer, model_source

    run_dir = tmp_path / "run"
    for shown in (False, True):
        stage = open_stage("format", str(TINY), [f"model.name_or_path={tiny_model_dir}"], str(REPO), str(run_dir),
                           "show")  # fmt: skip
        assert stage.reused == shown
        if not shown:
            prepare_data(stage.params, load_tokenizer(model_source(stage.params, stage.project_dir), stage.params),
                         stage.run_dir, stage.project_dir)  # fmt: skip
        entry = stage.complete(rows_kept=1)
        assert entry == mf.read_manifest(run_dir)["stages"]["format"] and entry["rows_kept"] == 1  # a dict to code
        line = pretty(entry)  # what IPython shows as the cell's output
        assert "\n" not in line and "pid" not in line and "boot_id" not in line, line
        assert "stages.format" in line and str(mf.manifest_path(run_dir)) in line
        assert ("nothing recomputed" in line) == shown and ("completed in" in line) == (not shown)


def test_changed_params_move_the_earlier_result_aside_and_the_manifest_tells_them_apart(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    _, first = open_format(run_dir, tiny_model_dir)
    _, second = open_format(run_dir, tiny_model_dir, "data.eval_fraction=0.2")
    assert (first.n_eval, second.n_eval) == (40, 80)
    manifest = mf.read_manifest(run_dir)
    [moved] = manifest["previous"]
    assert moved["reason"] == "params changed: data.eval_fraction: 0.1 -> 0.2"
    archived = json.loads((run_dir / moved["path"] / "manifest.json").read_text())["stages"]["format"]
    current = manifest["stages"]["format"]
    assert archived["params_id"] != current["params_id"]
    for entry, fraction, directory in ((archived, 0.1, run_dir / moved["path"]), (current, 0.2, run_dir)):
        assert load_params(run_dir / entry["params_file"]).data.eval_fraction == fraction
        assert len((directory / "data" / "eval.jsonl").read_text().splitlines()) == int(400 * fraction)


def test_an_unreadable_stored_result_is_computed_again_and_kept(tmp_path, tiny_model_dir, capsys):
    run_dir = tmp_path / "run"
    open_format(run_dir, tiny_model_dir)
    report = run_dir / "data" / "report.json"
    report.write_text(json.dumps({k: v for k, v in json.loads(report.read_text()).items() if k != "pair_token_lengths"}))
    stage, _ = open_format(run_dir, tiny_model_dir)
    assert not stage.reused
    [moved] = mf.read_manifest(run_dir)["previous"]
    assert "could not be read (KeyError" in moved["reason"]
    assert (run_dir / moved["path"] / "data" / "report.json").exists()


def test_an_edited_data_file_is_formatted_again_not_shown_stale(tmp_path, tiny_model_dir, capsys):
    """The params name the file, not its content: the format stage records the file's sha256 and computes again
    when it changed, in the notebook (on_rerun show) and for --reuse-format and a sweep's shared pairs."""
    from dpo_kit.bundled import bundled_preference_rows
    from dpo_kit.run.stage import format_stage_differences

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in bundled_preference_rows()))
    run_dir = tmp_path / "run"
    _, first = open_format(run_dir, tiny_model_dir, f"data.source={pairs}")
    recorded = mf.read_manifest(run_dir)["stages"]["format"]["input_files"]
    assert recorded == {"data.source": {"path": str(pairs.resolve()), "sha256": mf.sha256_of(pairs)}}
    stage, _ = open_format(run_dir, tiny_model_dir, f"data.source={pairs}")
    assert stage.reused  # unchanged: shown
    resolved = params_to_dict(stage.params)
    assert format_stage_differences(run_dir, resolved, REPO) == []

    pairs.write_text("".join(json.dumps(row) + "\n" for row in bundled_preference_rows()[:200]))
    assert format_stage_differences(run_dir, resolved, REPO) == [f"data.source {pairs.resolve()} changed since the stage ran"]
    stage, second = open_format(run_dir, tiny_model_dir, f"data.source={pairs}")
    assert not stage.reused and (first.rows_read, second.rows_read) == (400, 200)
    [moved] = mf.read_manifest(run_dir)["previous"]
    assert moved["reason"] == f"data.source {pairs.resolve()} changed since the stage ran: computed again with the same params"
    assert len((run_dir / moved["path"] / "data" / "train.jsonl").read_text().splitlines()) == first.n_train


def test_a_moved_project_reads_its_data_files_as_unchanged(tmp_path, tiny_model_dir, capsys):
    """The format stage's input files are compared by params key and content, not by absolute path: a project
    copied to another folder shows its stored pairs there, and an edit there is still seen, naming its new path."""
    import shutil

    from dpo_kit.bundled import bundled_preference_rows
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer, model_source
    from dpo_kit.run.stage import format_stage_differences

    first_project, moved_project = tmp_path / "first", tmp_path / "moved"
    first_project.mkdir()
    (first_project / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in bundled_preference_rows()))
    stage = open_stage("format", str(TINY), [f"model.name_or_path={tiny_model_dir}", "data.source=pairs.jsonl"],
                       str(first_project), str(first_project / "run"), "show")  # fmt: skip
    tokenizer = load_tokenizer(model_source(stage.params, stage.project_dir), stage.params)
    stage.complete(rows_kept=prepare_data(stage.params, tokenizer, stage.run_dir, stage.project_dir).rows_kept)
    resolved = params_to_dict(stage.params)
    shutil.copytree(first_project, moved_project)
    shutil.rmtree(first_project)

    assert format_stage_differences(moved_project / "run", resolved, moved_project) == []
    shown = open_stage("format", str(TINY), [f"model.name_or_path={tiny_model_dir}", "data.source=pairs.jsonl"],
                       str(moved_project), str(moved_project / "run"), "show")  # fmt: skip
    assert shown.reused
    pairs = moved_project / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in bundled_preference_rows()[:10]))
    assert format_stage_differences(moved_project / "run", resolved, moved_project) == [
        f"data.source {pairs.resolve()} changed since the stage ran"
    ]
    pairs.unlink()
    assert format_stage_differences(moved_project / "run", resolved, moved_project) == [
        f"data.source {pairs.resolve()} is gone"  # where this project looks for it
    ]


def test_a_folder_that_holds_no_run_is_not_taken_over_by_a_notebook_stage(tmp_path, tiny_model_dir):
    """run.name naming a folder of the user's: dpo-kit run refused it, a notebook stage wrote its run into it."""
    from dpo_kit.run.stage import StageError

    folder = tmp_path / "my-notes"
    folder.mkdir()
    (folder / "ideas.txt").write_text("mine")
    with pytest.raises(StageError, match=r"my-notes exists and already holds files but no dpo-kit run \(no"
                                         r" manifest.json\): it is not taken over"):
        open_stage("format", str(TINY), [f"model.name_or_path={tiny_model_dir}"], str(REPO), str(folder), "show")
    assert sorted(p.name for p in folder.iterdir()) == ["ideas.txt"]


def test_refuse_keeps_the_batch_behaviour(tmp_path, tiny_model_dir):
    from dpo_kit.params import ParamsError

    run_dir = tmp_path / "run"
    open_format(run_dir, tiny_model_dir, on_rerun="refuse")
    with pytest.raises(StageError, match="never overwritten"):
        open_format(run_dir, tiny_model_dir, on_rerun="refuse")
    with pytest.raises(ParamsError, match="data.eval_fraction: 0.1 -> 0.2"):
        open_format(run_dir, tiny_model_dir, "data.eval_fraction=0.2", on_rerun="refuse")
    with pytest.raises(StageError, match="on_rerun: 'again' is not one of 'show', 'recompute', 'refuse'"):
        open_format(run_dir, tiny_model_dir, on_rerun="again")
    assert "previous" not in mf.read_manifest(run_dir)


@pytest.mark.notebook
def test_rerunning_02_with_another_beta_keeps_both_results_and_03_refuses_the_mix(tmp_path, tiny_model_dir):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    project = tmp_path / "project"
    shutil.copytree(REPO / "notebooks", project / "notebooks")
    shutil.copytree(REPO / "params", project / "params")
    model = [f"model.name_or_path={tiny_model_dir}", "dpo.max_steps=10"]

    def run(notebook: str, overrides: list[str]) -> Path:
        output = tmp_path / f"{notebook}-{len(list(tmp_path.glob('*.ipynb')))}.ipynb"
        papermill.execute_notebook(str(project / "notebooks" / notebook), str(output), kernel_name="python3",
                                   parameters={"overrides": overrides}, cwd=str(project / "notebooks"),
                                   progress_bar=False)
        return output

    run("01_format_data.ipynb", model)
    run("02_train_dpo.ipynb", model)
    run_dir = project / "runs" / "tiny-notebooks"
    first_log = (run_dir / "train_log.jsonl").read_text()
    second = run("02_train_dpo.ipynb", [*model, "dpo.beta=0.5"])
    assert "moved the earlier output of stage(s) train" in second.read_text()

    manifest = mf.read_manifest(run_dir)
    [moved] = manifest["previous"]
    assert moved["stages"] == ["train"] and moved["reason"] == "params changed: dpo.beta: 0.1 -> 0.5"
    kept = run_dir / moved["path"]
    assert (kept / "adapter" / "adapter_model.safetensors").exists() and (run_dir / "adapter").exists()
    assert (kept / "train_log.jsonl").read_text() == first_log != (run_dir / "train_log.jsonl").read_text()
    assert load_params(kept / "params.yaml").dpo["beta"] == 0.1
    assert load_params(run_dir / manifest["stages"]["train"]["params_file"]).dpo["beta"] == 0.5
    # the format stage was made with β 0.1 and is reused under β 0.5: its data does not depend on β
    assert manifest["stages"]["format"]["params_id"] != manifest["stages"]["train"]["params_id"]

    with pytest.raises(PapermillExecutionError, match="dpo.beta: 0.5 -> 0.1"):
        run("03_merge.ipynb", model)  # the notebook's own β (0.1) against the adapter's (0.5)
    assert not (run_dir / "merged").exists()
    run("03_merge.ipynb", [*model, "dpo.beta=0.5"])
    assert mf.read_manifest(run_dir)["stages"]["merge"]["status"] == "completed"


def test_launch_params_left_at_their_defaults_keep_fingerprints_of_earlier_runs():
    """Runs recorded before the launch section keep their fingerprints: a single-process run is the same run."""
    import hashlib
    import json

    from dpo_kit.run.stage import stage_inputs

    base = params_to_dict(load_params(TINY))
    before_launch = {key: base_value(base, key) for key in stage_inputs("train") if not key.startswith("launch.")}
    # nor did such a run hold data.config, data.data_dir and data.eval_split, which came later still
    before_launch["data"] = {k: v for k, v in before_launch["data"].items() if k not in ("config", "data_dir", "eval_split")}
    digest = hashlib.sha256(json.dumps(before_launch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert params_fingerprint(base, "train") == digest
    launched = params_to_dict(load_params(TINY, ["launch.num_processes=2"]))
    assert params_fingerprint(launched, "train") != digest  # two processes: another run (other batch shards)
    placed = params_to_dict(load_params(TINY, ["launch.main_process_port=29999"]))
    assert params_fingerprint(placed, "train") == digest  # where it runs is not what it computes


def test_generate_best_of_n_left_at_zero_keeps_fingerprints_of_earlier_runs():
    """generate.best_of_n came later: at 0 the generate stage is that of runs made before it; at 16 it is another."""
    base = params_to_dict(load_params(TINY))
    before = json.loads(json.dumps(base))
    del before["generate"]["best_of_n"]  # what a run recorded before the key holds
    assert params_fingerprint(base, "generate") == params_fingerprint(before, "generate")
    assert params_fingerprint(base, "evaluate") == params_fingerprint(before, "evaluate")  # later stages too
    drawn = params_to_dict(load_params(TINY, ["generate.best_of_n=16"]))
    assert params_fingerprint(drawn, "generate") != params_fingerprint(base, "generate")
    assert params_fingerprint(drawn, "train") == params_fingerprint(base, "train")  # earlier stages unaffected


def test_the_sentiment_judges_floor_left_at_its_default_keeps_fingerprints_of_earlier_runs():
    """sentiment_min_words came later, in data.generate (the format stage's section data) and in evaluate."""
    sentiment = REPO / "params" / "smollm2-135m-sentiment.yaml"
    base = params_to_dict(load_params(sentiment))
    before = json.loads(json.dumps(base))
    del before["data"]["generate"]["sentiment_min_words"], before["evaluate"]["sentiment_min_words"]
    assert all(params_fingerprint(base, s) == params_fingerprint(before, s) for s in mf.STAGES)
    assert base["data"]["generate"]["sentiment_min_words"] == 8  # the params were left as they were
    changed = {}
    for override in ("data.generate.sentiment_min_words=3", "evaluate.sentiment_min_words=3"):
        other = params_to_dict(load_params(sentiment, [override]))
        changed[override] = {s for s in mf.STAGES if params_fingerprint(other, s) != params_fingerprint(base, s)}
    assert changed == {"data.generate.sentiment_min_words=3": set(mf.STAGES),
                       "evaluate.sentiment_min_words=3": {"evaluate"}}  # fmt: skip


def test_a_hub_datasets_subset_is_another_format_stage_and_none_keeps_earlier_runs():
    """data.config and data.data_dir came later: left at None, every stage is that of runs made before them; a subset
    (hh-rlhf's harmless-base, a configuration) is other data, so no stage of another subset's run is reused."""
    hh = REPO / "params" / "stablelm-2-1_6b-hh-rlhf-lora-8bit.yaml"
    base = params_to_dict(load_params(hh))
    before = json.loads(json.dumps(base))
    del before["data"]["config"], before["data"]["data_dir"]
    assert all(params_fingerprint(base, s) == params_fingerprint(before, s) for s in mf.STAGES)
    harmless = params_to_dict(load_params(hh, ["data.data_dir=harmless-base"]))
    helpful = params_to_dict(load_params(hh, ["data.data_dir=helpful-base"]))
    configured = params_to_dict(load_params(hh, ["data.config=default"]))
    for stage in mf.STAGES:
        assert len({params_fingerprint(p, stage) for p in (base, harmless, helpful, configured)}) == 4, stage


def test_data_eval_split_is_another_format_stage_and_none_keeps_earlier_runs():
    """data.eval_split came later: left at None, every stage is that of runs made before it; set, the held-out pairs
    are another split's (and eval_fraction 0), so no stage of a run that held out a share of the train split is reused,
    nor one of a run that held out another slice."""
    base = params_to_dict(load_params(TINY, ["data.source=org/prefs", "evaluate.judge=unused/reward-model"]))
    before = json.loads(json.dumps(base))
    assert before["data"].pop("eval_split") is None
    assert all(params_fingerprint(base, s) == params_fingerprint(before, s) for s in mf.STAGES)
    test = params_to_dict(load_params(TINY, ["data.source=org/prefs", "evaluate.judge=unused/reward-model",
                                             "data.eval_split=test", "data.eval_fraction=0"]))  # fmt: skip
    sliced = json.loads(json.dumps(test))
    sliced["data"]["eval_split"] = "test[:1000]"
    for stage in mf.STAGES:
        assert len({params_fingerprint(p, stage) for p in (base, test, sliced)}) == 3, stage


def test_top_k_left_at_50_keeps_fingerprints_of_earlier_runs():
    """top_k came later, in data.generate and generate; at 50 (what transformers applied before the key existed)
    every stage is that of runs made before it, and top_k 0 is another run from the stage that samples on."""
    sentiment = REPO / "params" / "smollm2-135m-sentiment.yaml"
    base = params_to_dict(load_params(sentiment))
    before = json.loads(json.dumps(base))
    del before["data"]["generate"]["top_k"], before["generate"]["top_k"]
    assert all(params_fingerprint(base, s) == params_fingerprint(before, s) for s in mf.STAGES)
    changed = {}
    for override in ("data.generate.top_k=0", "generate.top_k=0"):
        other = params_to_dict(load_params(sentiment, [override]))
        changed[override] = {s for s in mf.STAGES if params_fingerprint(other, s) != params_fingerprint(base, s)}
    assert changed == {"data.generate.top_k=0": set(mf.STAGES), "generate.top_k=0": {"generate", "evaluate"}}


def base_value(resolved: dict, dotted: str):
    value = resolved
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def test_a_moved_run_shows_its_stored_training_and_merge_from_where_it_is_now(tmp_path, tiny_model_dir, capsys):
    """The train and merge entries name their weights by the absolute path they were saved to. A run directory moved
    (or copied) to another folder or machine read those paths: the first run's weights where it still was, and where
    it was gone, an "unreadable" stored result that notebook 02 trained again. The weights are read where the run is."""
    overrides = [f"model.name_or_path={tiny_model_dir}"]
    resolved = params_to_dict(load_params(TINY, overrides))
    first, moved = tmp_path / "first" / "run", tmp_path / "moved" / "run"
    manifest = mf.new_manifest("tiny", 42, REPO, {})
    merge = {"dtype": "float32", "max_abs_logit_diff": 0.0, "max_abs_reload_diff": 0.0, "tolerance": 1e-4,
             "pushed_to": None}  # fmt: skip
    manifest["stages"] = {
        "train": {"status": "completed", "params_fingerprint": params_fingerprint(resolved, "train"),
                  "model_dir": str(first / "adapter"), "precision": {}, "trainable_parameters": 1, "total_parameters": 2},
        "merge": {"status": "completed", "params_fingerprint": params_fingerprint(resolved, "merge"),
                  "merged_dir": str(first / "merged"), **merge},
    }  # fmt: skip
    for folder in ("adapter", "merged"):
        (first / folder).mkdir(parents=True)
    (first / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    mf.write_manifest(first, manifest)
    shutil.copytree(first.parent, moved.parent)
    shutil.rmtree(first.parent)

    train = open_stage("train", str(TINY), overrides, str(REPO), str(moved), "show")
    assert train.reused, capsys.readouterr().out
    assert train.stored_result().model_dir == moved / "adapter"
    merged = open_stage("merge", str(TINY), overrides, str(REPO), str(moved), "show")
    assert merged.reused and merged.stored_result().merged_dir == str(moved / "merged")
    assert "previous" not in mf.read_manifest(moved) and sorted(p.name for p in moved.iterdir()) == [
        "adapter", "manifest.json", "merged", "train_log.jsonl"]
