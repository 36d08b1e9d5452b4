"""The comparison report: its tables and frontier from hand-made runs, and `dpo-kit report` over real tiny runs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import nbformat
import pytest
import yaml

from dpo_kit.evaluation.report import (
    ReportError,
    RunRecord,
    best_of_n_baseline,
    best_of_n_baselines,
    best_of_n_kl,
    differing_params,
    expected_best_of_n,
    frontier_points,
    load_runs,
    params_table,
    plot_frontier,
    win_rate_table,
)
from dpo_kit.run.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"


def metrics(kl: float, reward: float, judge: str = "rule", **extra) -> dict:
    return {"beta": extra.pop("beta", 0.1), "judge": judge, "kl": kl, "judge/policy_score": reward,
            "judge/reference_score": 0.2, "win_rate": 0.6, "win_rate/ci_low": 0.3, "win_rate/ci_high": 0.9,
            "win_rate/ci_level": 0.95, "win_rate/n": 8, "rewards/accuracies": 0.75, "rewards/margins": 0.4,
            "num_generations": 8, "per_generation": {"policy_score": [reward - 0.1, reward + 0.1]}, **extra}  # fmt: skip


def params(name: str, beta: float, loss_type: str = "sigmoid") -> dict:
    return {"run": {"name": name, "seed": 42, "output_dir": "runs"}, "model": {"name_or_path": "tiny"},
            "dpo": {"beta": beta, "loss_type": [loss_type], "learning_rate": 0.005}}  # fmt: skip


def write_run(path: Path, run_params: dict | None, run_metrics: dict | None, status: str = "completed") -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"run": path.name, "status": status, "stages": {}}))
    if run_params is not None:
        (path / "params.yaml").write_text(yaml.safe_dump(run_params))
    if run_metrics is not None:
        (path / "metrics.json").write_text(json.dumps(run_metrics))
    return path


# ---------------------------------------------------------------------------------------------
# Best-of-N


def test_best_of_n_kl_is_log_n_minus_n_minus_1_over_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    values = [best_of_n_kl(n) for n in (1, 2, 4, 8, 16)]
    assert values == sorted(values) and all(v >= 0 for v in values)
    with pytest.raises(ValueError, match="at least 1"):
        best_of_n_kl(0)


def test_expected_best_of_n_is_the_mean_best_over_all_subsets_of_the_samples():
    scores = [0.3, -1.0, 0.9, 0.3, 0.5]
    for n in range(1, len(scores) + 1):
        subsets = list(itertools.combinations(scores, n))
        assert expected_best_of_n(scores, n) == pytest.approx(sum(map(max, subsets)) / len(subsets))
    assert expected_best_of_n(scores, 1) == pytest.approx(sum(scores) / len(scores))
    assert expected_best_of_n(scores, len(scores)) == max(scores)
    with pytest.raises(ValueError, match="best-of-6 needs at least 6 samples per prompt, got 5"):
        expected_best_of_n(scores, 6)


def test_best_of_n_uses_the_evaluated_prompts_and_says_which_n_it_cannot_estimate(tmp_path):
    run_params = params("a", 0.1)
    run_params["data"] = {"source": "generate", "generate": {"judge": "rule", "sampler": None, "temperature": 1.0}}
    run_params["generate"] = {"temperature": 0.7}
    run = write_run(tmp_path / "a", run_params, metrics(1.0, 0.5))
    held_out, trained = [{"role": "user", "content": "held out"}], [{"role": "user", "content": "trained on"}]
    (run / "data").mkdir()
    (run / "data" / "samples.jsonl").write_text(
        json.dumps({"prompt": held_out, "samples": ["a", "b", "c", "d"], "scores": [0.0, 1.0, 2.0, 3.0]}) + "\n"
        + json.dumps({"prompt": trained, "samples": ["a", "b", "c", "d"], "scores": [9.0, 9.0, 9.0, 9.0]}) + "\n"
    )  # fmt: skip
    (run / "generations.jsonl").write_text(json.dumps({"prompt": held_out}) + "\n")
    baseline = best_of_n_baseline(load_runs([run]).runs[0])
    assert baseline.table["N"].tolist() == [1, 2, 4]
    assert baseline.table["reward"].tolist() == pytest.approx([1.5, expected_best_of_n([0, 1, 2, 3], 2), 3.0])
    assert baseline.table["kl"].tolist() == pytest.approx([best_of_n_kl(1), best_of_n_kl(2), best_of_n_kl(4)])
    assert "on 1 prompts: the held-out prompts" in baseline.note
    assert ("N = 8, 16 not estimated: it needs at least 16 samples per prompt (generate.best_of_n, or"
            " data.generate.num_samples: 16)") in baseline.note
    assert "temperature 1.0" in baseline.note and "temperature 0.7" in baseline.note

    run_params["data"]["generate"]["judge"] = "sentiment"
    (run / "params.yaml").write_text(yaml.safe_dump(run_params))
    other_judge = best_of_n_baseline(load_runs([run]).runs[0])
    assert other_judge.table.empty and "scored by sentiment" in other_judge.note
    # The same judge with another length floor is another scale too; with the same floor it is one.
    run_params["data"]["generate"]["sentiment_min_words"] = 12
    (run / "params.yaml").write_text(yaml.safe_dump(run_params))
    (run / "metrics.json").write_text(json.dumps(metrics(1.0, 0.5, judge="sentiment")))
    other_floor = best_of_n_baseline(load_runs([run]).runs[0])
    assert other_floor.table.empty and "scored by sentiment (min_words 12), its generations by sentiment" in (
        other_floor.note)
    (run / "metrics.json").write_text(json.dumps(metrics(1.0, 0.5, judge="sentiment (min_words 12)")))
    assert not best_of_n_baseline(load_runs([run]).runs[0]).table.empty
    # The format stage samples; an evaluation that decoded greedily is another decoding, and the note says so.
    run_params["generate"] = {"temperature": 1.0, "do_sample": False}
    (run / "params.yaml").write_text(yaml.safe_dump(run_params))
    greedy = best_of_n_baseline(load_runs([run]).runs[0])
    assert "drawn with decoding sampling, the evaluated generations with decoding greedy" in greedy.note
    assert "temperature" not in greedy.note.split("drawn with")[1]  # both at 1.0
    no_samples = best_of_n_baseline(RunRecord("b", tmp_path / "b", params("b", 0.1), metrics(1.0, 0.5)))
    assert no_samples.table.empty and "no data/samples.jsonl" in no_samples.note


def test_reference_samples_drawn_for_best_of_n_replace_the_format_stages_samples(tmp_path):
    prompt = [{"role": "user", "content": "held out"}]
    drawn, formatted = (write_run(tmp_path / name, params(name, 0.1), metrics(1.0, 0.5)) for name in ("a", "b"))
    scores = [float(i) for i in range(16)]
    (drawn / "reference_samples.jsonl").write_text(
        json.dumps({"prompt": prompt, "judge": "rule", "samples": ["x"] * 16, "scores": scores}) + "\n")
    (formatted / "data").mkdir()
    (formatted / "data" / "samples.jsonl").write_text(
        json.dumps({"prompt": prompt, "samples": ["y"] * 4, "scores": [0.0, 0.0, 0.0, 9.0]}) + "\n")
    runs = load_runs([drawn, formatted]).runs

    own = best_of_n_baseline(runs[0])
    assert own.table["N"].tolist() == [1, 2, 4, 8, 16]
    assert own.table["reward"].tolist() == pytest.approx([expected_best_of_n(scores, n) for n in (1, 2, 4, 8, 16)])
    assert own.table["reward"].iloc[-1] == 15.0 and "16 judged responses per prompt" in own.note
    curves, notes = best_of_n_baselines(runs)
    assert [curve.run for curve in curves] == ["a"]  # b's format-stage samples are left out, and the notes say so
    assert any("samples of the other runs are not used" in note for note in notes)
    assert [c.run for c in best_of_n_baselines(runs[1:])[0]] == ["b"]  # alone, b's samples give the curve

    (drawn / "reference_samples.jsonl").write_text(
        json.dumps({"prompt": prompt, "judge": "sentiment", "samples": ["x"] * 4, "scores": scores[:4]}) + "\n")
    other_judge = best_of_n_baseline(load_runs([drawn]).runs[0])  # evaluated by "rule": another scale
    assert other_judge.table.empty and "scored by sentiment" in other_judge.note


# ---------------------------------------------------------------------------------------------
# Tables and the frontier from hand-made runs


def test_the_params_table_shows_only_what_differs_with_the_metrics():
    runs = [RunRecord("a", Path("a"), params("a", 0.1), metrics(2.0, 0.5)),
            RunRecord("b", Path("b"), params("b", 0.5), metrics(0.5, 0.3)),
            RunRecord("c", Path("c"), params("c", 0.1, "sft"), metrics(4.0, 0.4))]  # fmt: skip
    runs[1].params["tracking"] = {"report_to": ["wandb"], "project": "mine"}  # logged elsewhere, computed alike
    # run.name and the tracker differ too, but they name where the run happened and where its curves went
    assert differing_params(runs) == ["dpo.beta", "dpo.loss_type"]
    table = params_table(runs)
    assert table.loc[:, "dpo.beta"].to_dict() == {"a": 0.1, "b": 0.5, "c": 0.1}
    assert table.loc[:, "dpo.loss_type"].to_dict() == {"a": "sigmoid", "b": "sigmoid", "c": "sft"}
    assert table.loc["b", "judged reward"] == 0.3 and table.loc["c", "KL (nats)"] == 4.0
    assert table.loc["a", "win-rate CI low"] == 0.3


def test_frontier_points_are_labelled_by_beta_and_loss_type_and_preferred_ft_is_named():
    runs = [RunRecord("a", Path("a"), params("a", 0.1), metrics(2.0, 0.5)),
            RunRecord("c", Path("c"), params("c", 0.1, "sft"), metrics(4.0, 0.4)),
            RunRecord("no-generations", Path("n"), params("n", 0.2), {"beta": 0.2, "rewards/accuracies": 0.5})]  # fmt: skip
    points = frontier_points(runs)
    assert points["label"].tolist() == ["β=0.1 sigmoid", "preferred-FT (sft)"]  # no KL, no point
    assert points["kl"].tolist() == [2.0, 4.0] and points["reward"].tolist() == [0.5, 0.4]
    assert points["reward_sem"].tolist() == pytest.approx([0.1, 0.1])
    figure = plot_frontier(runs)
    axis = figure.axes[0]
    assert "KL" in axis.get_xlabel() and "judged reward (rule)" in axis.get_ylabel()
    assert {text.get_text() for text in axis.texts} == {"β=0.1 sigmoid", "preferred-FT (sft)"}


def test_a_run_that_a_table_or_figure_leaves_out_is_named_with_the_reason():
    """A run evaluated without generations has no point on the frontier and no win-rate, and one evaluated before the
    kit measured length and repetition has no row in the over-optimization table: each was left out without a word."""
    from dpo_kit.evaluation.report import left_out_notes, overoptimization_table

    text = {"text/policy_words": 9.0, "text/reference_words": 8.0, "text/policy_distinct_2": 0.9,
            "text/reference_distinct_2": 0.8, "text/policy_repeated_3grams": 0.0, "text/reference_repeated_3grams": 0.0}
    runs = [RunRecord("measured", Path("m"), params("measured", 0.1), metrics(2.0, 0.5, **text)),
            RunRecord("older", Path("o"), params("older", 0.5), metrics(1.0, 0.4, beta=0.5)),
            RunRecord("no-generations", Path("n"), params("n", 0.2), {"beta": 0.2, "rewards/accuracies": 0.5})]  # fmt: skip
    assert "older" not in overoptimization_table(runs).index
    notes = left_out_notes(runs)
    assert len(notes) == 3, notes
    assert notes[0].startswith("no-generations: no judged reward or KL") and "reward-against-KL figure" in notes[0]
    assert notes[1].startswith("no-generations: no win_rate") and "win-rate table" in notes[1]
    assert notes[2].startswith("older: no words per response") and "evaluate the run again" in notes[2]
    assert left_out_notes(runs[:1]) == []


def test_runs_that_share_beta_and_loss_type_are_labelled_by_name():
    """Two rounds of iterative DPO (or two learning rates) at the same β and loss: points named so, not twins."""
    runs = [RunRecord("round-1", Path("r1"), params("round-1", 0.1), metrics(18.7, 0.86)),
            RunRecord("round-2", Path("r2"), params("round-2", 0.1), metrics(56.3, 0.99)),
            RunRecord("beta-0.5", Path("b"), params("beta-0.5", 0.5), metrics(2.9, 0.54, beta=0.5))]  # fmt: skip
    assert frontier_points(runs)["label"].tolist() == ["round-1", "round-2", "β=0.5 sigmoid"]
    assert win_rate_table(runs)["label"].tolist() == ["round-1", "round-2", "β=0.5 sigmoid"]
    assert {text.get_text() for text in plot_frontier(runs).axes[0].texts} >= {"round-1", "round-2", "β=0.5 sigmoid"}
    from dpo_kit.evaluation.report import plot_win_rates

    ticks = [tick.get_text() for tick in plot_win_rates(runs).axes[0].get_yticklabels()]
    assert ticks == ["round-1", "round-2", "beta-0.5  (β=0.5 sigmoid)"]  # not 'round-1  (round-1)'


def test_runs_differing_in_the_seed_alone_are_summarised_with_mean_and_spread():
    """A sweep over seeds was shown one row per seed, leaving the mean and its spread to the reader."""
    import statistics

    from dpo_kit.evaluation.report import seed_summary_table

    def seeded(name, seed, beta, kl, reward):
        run_params = params(name, beta)
        run_params["run"]["seed"] = seed
        return RunRecord(name, Path(name), run_params, metrics(kl, reward, beta=beta, win_rate=reward))

    runs = [seeded("b0.1-s0", 0, 0.1, 18.7, 0.86), seeded("b0.1-s1", 1, 0.1, 13.7, 0.79),
            seeded("b0.1-s2", 2, 0.1, 13.4, 0.71), seeded("b0.5-s0", 0, 0.5, 2.9, 0.54)]  # fmt: skip
    table = seed_summary_table(runs)
    assert table.index.tolist() == ["b0.1-s0, b0.1-s1, b0.1-s2"]  # β=0.5 has one seed: no spread
    row = table.iloc[0]
    assert (row["runs"], row["seed values"]) == (3, "0, 1, 2")
    assert row["KL (nats) mean"] == pytest.approx(statistics.mean([18.7, 13.7, 13.4]))
    assert row["KL (nats) sd"] == pytest.approx(statistics.stdev([18.7, 13.7, 13.4]))
    assert row["win-rate sd"] == pytest.approx(statistics.stdev([0.86, 0.79, 0.71]))
    assert not any("CI" in column for column in table.columns)  # interval bounds do not average
    assert seed_summary_table(runs[2:]).empty
    # Three runs of one seed are repeats (the same numbers, give or take): no spread over seeds to show.
    repeats = [seeded(f"again-{i}", 42, 0.1, 13.4, 0.71) for i in range(3)]
    assert seed_summary_table(repeats).empty
    assert seed_summary_table([*repeats, seeded("other-seed", 7, 0.1, 18.7, 0.86)]).iloc[0]["seed values"] == (
        "42, 42, 42, 7")
    # A run made before a key existed has no line for it in its params.yaml; a later run writes its default, null
    # (data.eval_split). The params table reads the two alike; the seed summary kept them apart, so an old and a new
    # run of the same params and another seed gave no spread.
    older, newer = seeded("before-eval-split", 0, 0.1, 18.7, 0.86), seeded("with-eval-split", 1, 0.1, 13.7, 0.79)
    newer.params.setdefault("data", {})["eval_split"] = None
    assert seed_summary_table([older, newer]).iloc[0]["seed values"] == "0, 1"
    newer.params["data"]["eval_split"] = "test"  # held out otherwise: not the same params
    assert seed_summary_table([older, newer]).empty


def test_the_report_says_when_runs_were_evaluated_on_other_prompts_pairs_or_settings(tmp_path):
    """Three seeds hold out three sets of prompts: their rewards and win-rates are not prompt for prompt, and the
    report used to put them side by side without a word."""
    from dpo_kit.evaluation.report import comparability_notes

    def run(name, prompts, pairs, max_new_tokens=32, read=3, **extra):
        run_params = params(name, 0.1)
        run_params["generate"] = {"max_new_tokens": max_new_tokens}
        path = write_run(tmp_path / name, run_params, metrics(1.0, 0.5, num_pairs=read, **extra))
        (path / "generations.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        (path / "data").mkdir()
        (path / "data" / "eval.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in pairs))
        return path

    run("seed-0", ["a", "b"], ["a", "b", "c"])
    run("seed-0-again", ["a", "b"], ["a", "b", "c", "beyond evaluate.max_pairs"])  # only the pairs read count
    assert comparability_notes(load_runs([tmp_path]).runs) == []  # like for like: nothing to say

    run("seed-1", ["x", "y"], ["x", "y", "z"])
    run("longer", ["a", "b"], ["a", "b", "c"], max_new_tokens=64, **{"win_rate/ci_method": "wilson"})
    notes = comparability_notes(load_runs([tmp_path]).runs)
    assert len(notes) == 4, notes
    prompts, settings, pairs, methods = notes
    assert "2 different sets of prompts (1: longer, seed-0, seed-0-again; 2: seed-1)" in prompts
    assert "generate.max_new_tokens" in settings and "generate.top_k" not in settings
    assert "2 different sets of held-out pairs" in pairs and "2: seed-1" in pairs
    # the reason named was run.seed alone; data.eval_split (another split, or none) holds out other pairs as well
    assert "another run.seed, data.eval_fraction or data.eval_split holds out other prompts" in prompts
    assert "another run.seed, data.eval_fraction or data.eval_split holds out other pairs" in pairs
    assert "1: longer; 2: seed-0, seed-0-again, seed-1" in methods


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_named_with_what_would_be_valid(tmp_path):
    with pytest.raises(ReportError, match=f"{tmp_path / 'nowhere'}: no such directory"):
        load_runs([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=f"{tmp_path / 'empty'}: no runs in it.*sweep directory"):
        load_runs([tmp_path / "empty"])
    write_run(tmp_path / "sweep" / "failed", params("failed", 0.1), None, status="failed")
    with pytest.raises(ReportError, match="no complete run to compare.*failed: no metrics.json \\(run status failed"):
        load_runs([tmp_path / "sweep"])
    write_run(tmp_path / "judges" / "a", params("a", 0.1), metrics(1.0, 0.5, judge="rule"))
    write_run(tmp_path / "judges" / "b", params("b", 0.1), metrics(1.0, 0.5, judge="sentiment"))
    with pytest.raises(ReportError, match="different judges \\(a: rule, b: sentiment\\)"):
        load_runs([tmp_path / "judges"])


def test_runs_are_found_one_level_deep_and_incomplete_ones_are_listed_not_dropped(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "trial-0", params("trial-0", 0.1), metrics(1.0, 0.5))
    write_run(sweep / "trial-1", params("trial-1", 0.5), None, status="interrupted")
    write_run(sweep / "trial-0.archived-20260101-000000", params("trial-0", 0.1), metrics(1.0, 0.5))
    write_run(sweep / "deeper" / "trial-2", params("trial-2", 0.1), metrics(1.0, 0.5))  # two levels down: not a trial
    (sweep / "sweep.json").write_text("{}")
    comparison = load_runs(["sweep"], project_dir=tmp_path)  # relative paths resolve from the project
    assert [run.name for run in comparison.runs] == ["trial-0"]
    assert [run.name for run in comparison.incomplete] == ["trial-1"]
    assert "no metrics.json (run status interrupted" in comparison.incomplete[0].incomplete
    both = load_runs([sweep / "trial-0", sweep / "deeper" / "trial-2"])  # or run directories, one by one
    assert [run.name for run in both.runs] == ["trial-0", "trial-2"]


def test_runs_of_the_same_name_in_two_directories_are_both_compared_under_names_that_tell_them_apart(tmp_path):
    """Two sweeps both have a run `beta=0.1`: every table keyed its rows by the name, so one run replaced the other
    in the params and win-rate tables, and the frontier labelled both points with the second run's loss type."""
    write_run(tmp_path / "sweep-a" / "beta=0.1", params("beta=0.1", 0.1, "sigmoid"), metrics(1.0, 0.5))
    write_run(tmp_path / "sweep-b" / "beta=0.1", params("beta=0.1", 0.1, "ipo"), metrics(3.0, 0.9))
    runs = load_runs([tmp_path / "sweep-a", tmp_path / "sweep-b", tmp_path / "sweep-a" / "beta=0.1"]).runs
    assert [run.name for run in runs] == ["sweep-a/beta=0.1", "sweep-b/beta=0.1"], "each run once, told apart"
    assert params_table(runs)["dpo.loss_type"].to_dict() == {"sweep-a/beta=0.1": "sigmoid", "sweep-b/beta=0.1": "ipo"}
    assert params_table(runs)["judged reward"].to_dict() == {"sweep-a/beta=0.1": 0.5, "sweep-b/beta=0.1": 0.9}
    assert win_rate_table(runs)["label"].tolist() == ["β=0.1 sigmoid", "β=0.1 ipo"]
    points = frontier_points(runs)
    assert points[["label", "kl"]].values.tolist() == [["β=0.1 sigmoid", 1.0], ["β=0.1 ipo", 3.0]]


def test_the_cli_names_bad_input_and_asks_where_several_runs_report_to(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert f"dpo-kit report: {tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
    write_run(tmp_path / "a", params("a", 0.1), metrics(1.0, 0.5))
    write_run(tmp_path / "b", params("b", 0.5), metrics(1.0, 0.5))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "--output-dir DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# `dpo-kit report` over real tiny runs


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_dir):
    """Two tiny runs (β 0.1 and 0.5) on pairs sampled from the model, 16 judged samples per prompt, and a failed one."""
    from dpo_kit.bundled import bundled_preference_rows
    from dpo_kit.run.runner import run_pipeline

    root = tmp_path_factory.mktemp("report")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in bundled_preference_rows()[:32]))
    sweep_dir = root / "sweep"
    common = [f"run.output_dir={sweep_dir}", f"model.name_or_path={tiny_model_dir}", "model.build_tiny_model=false",
              "dpo.max_steps=6", "data.source=generate", "data.eval_fraction=0.25", "generate.max_new_tokens=12",
              f"data.generate={{prompts: {prompts}, judge: rule, num_samples: 16, max_new_tokens: 12, min_score_gap: 0.0}}"]  # fmt: skip
    for name, beta in (("beta-0.1", 0.1), ("beta-0.5", 0.5)):
        run_pipeline(TINY, [*common, f"run.name={name}", f"dpo.beta={beta}"], project_dir=REPO, progress=False)
    write_run(sweep_dir / "beta-1.0", params("beta-1.0", 1.0), None, status="failed")
    (sweep_dir / "sweep.json").write_text("{}")
    return sweep_dir


def outputs(notebook_path: Path) -> list[dict]:
    notebook = nbformat.read(notebook_path, as_version=4)
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def cell_outputs(notebook_path: Path, fragment: str) -> list[dict]:
    notebook = nbformat.read(notebook_path, as_version=4)
    return [output for cell in notebook.cells if fragment in cell.source for output in cell.outputs]


@pytest.mark.notebook
def test_dpo_kit_report_executes_notebook_06_into_the_sweep_with_the_frontier_and_html(sweep, capsys):
    assert main(["report", str(sweep), "--quiet"]) == 0
    assert f"{sweep / '06_compare_runs.html'}" in capsys.readouterr().out
    executed = sweep / "06_compare_runs.ipynb"
    assert (sweep / "frontier.png").read_bytes().startswith(b"\x89PNG")
    frontier = cell_outputs(executed, "plot_frontier(")
    assert any("image/png" in output.get("data", {}) for output in frontier), "the frontier is a figure"

    shown = next(o["data"]["text/html"] for o in cell_outputs(executed, "params_table(comparison.runs)") if "data" in o)
    assert "<th>dpo.beta</th>" in shown and "<th>beta-0.1</th>" in shown and "<th>beta-0.5</th>" in shown
    table = params_table(load_runs([sweep]).runs)  # what the notebook showed, as a frame
    assert table["dpo.beta"].to_dict() == {"beta-0.1": 0.1, "beta-0.5": 0.5}

    printed = "".join(o.get("text", "") for o in outputs(executed) if o["output_type"] == "stream")
    assert "comparing 2 runs" in printed and "1 incomplete, left out" in printed
    assert "best-of-N of the reference from 16 judged samples per prompt" in printed
    left_out = "".join(o.get("data", {}).get("text/html", "") for o in cell_outputs(executed, "incomplete_table("))
    assert "beta-1.0" in left_out and "no metrics.json (run status failed" in left_out
    best_of_n = next(o["data"]["text/plain"] for o in cell_outputs(executed, "best_of_n_table(") if "data" in o)
    assert [line.split()[2] for line in best_of_n.splitlines()[1:]] == ["1", "2", "4", "8", "16"]

    assert not [o for o in outputs(executed) if o["output_type"] == "error" or o.get("name") == "stderr"]
    html = (sweep / "06_compare_runs.html").read_text()
    assert html.count("data:image/png;base64") >= 4 and "dpo.beta" in html
    assert "<script src=" not in html, "the HTML reads offline: no script from a CDN"
    assert 'alt="figure: Reward against KL to the reference"' in html


@pytest.mark.notebook
def test_a_second_report_moves_the_first_aside(sweep, capsys):
    if not (sweep / "06_compare_runs.ipynb").exists():
        assert main(["report", str(sweep), "--quiet"]) == 0
    first = (sweep / "06_compare_runs.ipynb").read_bytes()
    assert main(["report", str(sweep), "--quiet"]) == 0
    assert "moved the earlier report to" in capsys.readouterr().out
    (previous,) = (sweep / "previous").iterdir()
    assert previous.name.endswith("-report")
    assert sorted(p.name for p in previous.iterdir()) == ["06_compare_runs.html", "06_compare_runs.ipynb", "frontier.png"]
    assert (previous / "06_compare_runs.ipynb").read_bytes() == first
    assert (sweep / "06_compare_runs.ipynb").is_file() and (sweep / "frontier.png").is_file()
    assert [run.name for run in load_runs([sweep]).runs] == ["beta-0.1", "beta-0.5"]  # previous/ is not a run


def test_runs_sharing_samples_give_one_best_of_n_curve_unless_evaluated_on_other_prompts(tmp_path):
    first, second = [{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]
    samples = "".join(json.dumps({"prompt": p, "samples": ["a", "b"], "scores": s}) + "\n"
                      for p, s in ((first, [0.0, 1.0]), (second, [4.0, 6.0])))  # fmt: skip

    def run_evaluated_on(name: str, prompts: list) -> Path:
        run_params = params(name, 0.1)
        run_params["data"] = {"source": "generate", "generate": {"judge": "rule", "sampler": None}}
        run = write_run(tmp_path / name, run_params, metrics(1.0, 0.5))
        (run / "data").mkdir()
        (run / "data" / "samples.jsonl").write_text(samples)  # one sweep's shared pairs
        (run / "generations.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        return run

    a, b, c = run_evaluated_on("a", [first]), run_evaluated_on("b", [first]), run_evaluated_on("c", [second])
    curves, _ = best_of_n_baselines(load_runs([a, b, c]).runs)
    assert [curve.run for curve in curves] == ["a", "c"]  # b's curve is a's; c was evaluated on another prompt
    assert [curve.table["reward"].iloc[0] for curve in curves] == [0.5, 5.0]


def test_a_run_whose_files_cannot_be_read_is_listed_as_incomplete_naming_the_file(tmp_path):
    write_run(tmp_path / "good", params("good", 0.1), metrics(1.0, 0.5))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"run": "broken", "stat')  # cut short by hand
    bad_params = write_run(tmp_path / "bad-params", None, metrics(1.0, 0.5))
    (bad_params / "params.yaml").write_text("dpo: [beta\n")
    report = load_runs([tmp_path])
    assert [run.name for run in report.runs] == ["good"]
    reasons = {run.name: run.incomplete for run in report.incomplete}
    assert f"{broken / 'manifest.json'} is not valid JSON" in reasons["broken"]
    assert f"{bad_params / 'params.yaml'} is not valid YAML" in reasons["bad-params"]


def test_runs_evaluated_on_other_prompts_are_set_against_their_own_reference():
    """Two seeds hold out other prompts, so their references generated other answers; the length and repetition
    table showed the first run's reference only, and the second run's policy read as beating a reference it was
    never compared with."""
    from dpo_kit.evaluation.report import overoptimization_table, plot_overoptimization

    def text(reference_score, reference_words, **extra):
        return {"judge/reference_score": reference_score, "text/reference_words": reference_words,
                "text/reference_distinct_2": 0.9, "text/reference_repeated_3grams": 0.0, "text/policy_words": 12.0,
                "text/policy_distinct_2": 1.0, "text/policy_repeated_3grams": 0.0, **extra}  # fmt: skip

    runs = [RunRecord("seed-42", Path("a"), params("seed-42", 0.1), metrics(0.65, 0.60, **text(0.51, 12.9))),
            RunRecord("beta-0.5", Path("b"), params("beta-0.5", 0.5), metrics(0.30, 0.55, beta=0.5, **text(0.51, 12.9))),
            RunRecord("seed-7", Path("c"), params("seed-7", 0.1), metrics(0.64, 0.76, **text(0.19, 12.6)))]  # fmt: skip
    table = overoptimization_table(runs)
    assert table.index.tolist() == ["reference (seed-42's generations)", "reference (seed-7's generations)",
                                    "seed-42", "beta-0.5", "seed-7"]  # fmt: skip
    assert table["judged reward"].tolist()[:2] == [0.51, 0.19]
    assert table["label"].tolist()[:2] == ["reference of seed-42, beta-0.5", "reference of seed-7"]
    legend = [text.get_text() for text in plot_overoptimization(runs).axes[0].get_legend().get_texts()]
    # Each point named once, in a legend: names written beside tied points (no repeated 3-grams) overlapped.
    assert legend == ["reference of seed-42, beta-0.5", "reference of seed-7", "seed-42", "β=0.5 sigmoid", "seed-7"]
    # Runs sharing their prompts share one reference, shown as before.
    shared = overoptimization_table(runs[:2])
    assert shared.index.tolist()[0] == "reference (seed-42's generations)" and shared["label"].iloc[0] == "reference"
    assert len(shared) == 3
