"""The comparison report (notebook 06, `dpo-kit report`): several runs of one experiment side by side.

Reads only what the runs wrote (manifest.json, params.yaml, metrics.json, train_log.jsonl, data/samples.jsonl,
reference_samples.jsonl);
loads no model. Its centre is the DPO paper's figure 2 in miniature: the judged reward of each run's policy
against its KL to the reference, one point per run, labelled by beta and loss type, with two reference curves:

- best-of-N from the reference: sample N responses, keep the one the judge scores best. Its KL to the reference
  is at most log N - (N-1)/N nats (Stiennon et al. 2020; Beirami et al. 2024 show it is an upper bound, exact
  when no two samples tie). Its expected reward is estimated without new sampling from the k judged reference
  samples per prompt that the format stage keeps in data/samples.jsonl (data.source 'generate'): for N <= k the
  mean, over all N-subsets of the k samples, of the best score, which is an unbiased estimate of E[max of N
  draws]. N > k cannot be estimated from k samples and is reported as missing with the k needed. Better still,
  generate.best_of_n draws N responses per prompt from the reference in the generate stage, with the
  evaluation's own decoding settings on exactly the evaluated prompts (reference_samples.jsonl); where a run has
  them they replace the format stage's samples. Runs with neither have no baseline.
- preferred-FT (TRL's loss_type "sft": supervised fine-tuning on the chosen answers), which is just another run
  (`--set dpo.loss_type=sft`); it is labelled as such.

Run directories are found one level deep: a path holding manifest.json is a run; any other directory is
searched for sub-directories holding one (a sweep directory holds one run per trial). A run without
metrics.json is listed as incomplete, with the reason, and left out of every table and figure; so is a sweep's
trial that failed before its run was made (it has no run directory: its error is read from the sweep's trial_notes/).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_kit.judges import judge_label
from dpo_kit.params import PLACE_ONLY_KEYS

METRICS_FILE = "metrics.json"  # as dpo_kit.evaluation.evaluate writes it (not imported: that pulls in TRL)
TRIAL_NOTES = "trial_notes"  # a sweep's failed trials' errors, where dpo_kit.run.sweep writes them (trial_note_path)
BEST_OF_N = (1, 2, 4, 8, 16)
# Params the params table leaves out: where a run happens (equal runs differ in them), and where its curves were
# logged (a run sent to wandb computes the same numbers as one that was not).
UNCOMPARED_KEYS = (*PLACE_ONLY_KEYS, "tracking.report_to", "tracking.project")
TRAINING_CURVES = ("loss", "rewards/margins", "rewards/accuracies")


class ReportError(ValueError):
    """The report's input is not usable; the message names the path and what would be valid."""


@dataclass
class RunRecord:
    """One run as the report reads it; `incomplete` says why it is left out (None: it is compared)."""

    name: str
    path: Path
    params: dict[str, Any] = field(default_factory=dict, repr=False)
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    incomplete: str | None = None

    @property
    def beta(self) -> float | None:
        return self.metrics.get("beta", lookup(self.params, "dpo.beta"))

    @property
    def loss_type(self) -> str:
        value = lookup(self.params, "dpo.loss_type")
        if isinstance(value, list):
            return "+".join(map(str, value))
        return str(value) if value is not None else "sigmoid"

    @property
    def label(self) -> str:
        """β and loss type; preferred-FT (loss_type sft, no β in its loss) is named so."""
        if self.loss_type == "sft":
            return "preferred-FT (sft)"
        return f"β={self.beta:g} {self.loss_type}" if self.beta is not None else self.loss_type


@dataclass
class Comparison:
    """The runs found: those compared (complete) and those left out (incomplete, with the reason)."""

    runs: list[RunRecord]
    incomplete: list[RunRecord]
    searched: list[Path]

    def summary(self) -> str:
        names = ", ".join(run.name for run in self.runs)
        left_out = f"; {len(self.incomplete)} incomplete, left out (see below)" if self.incomplete else ""
        runs = f"{len(self.runs)} run{'s' if len(self.runs) != 1 else ''}"
        return f"comparing {runs} from {', '.join(map(str, self.searched))}: {names}{left_out}"


# ---------------------------------------------------------------------------------------------
# Finding and reading runs


def lookup(params: dict, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def find_run_dirs(paths: list[str | Path] | str | Path, project_dir: str | Path = ".") -> tuple[list[Path], list[Path]]:
    """Run directories under `paths` (relative ones resolve from `project_dir`), and the resolved paths searched.

    A path holding manifest.json is a run; any other directory is searched one level deep for runs (a sweep
    directory). Runs archived by `--overwrite` (<name>.archived-<time>) are earlier runs, not compared.
    Raises ReportError for a path that does not exist or holds no run."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ReportError("no runs given: pass a sweep directory or one or more run directories (made by dpo-kit run)")
    found, searched = [], []
    for given in paths:
        path = Path(project_dir) / given if not Path(given).is_absolute() else Path(given)
        searched.append(path)
        if not path.exists():
            raise ReportError(f"{path}: no such directory; pass a sweep directory or run directories (each holding"
                              " the manifest.json that dpo-kit run writes)")  # fmt: skip
        if (path / "manifest.json").is_file():
            found.append(path)
            continue
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory; pass a sweep directory or run directories")
        runs = sorted(child for child in path.iterdir()
                      if (child / "manifest.json").is_file() and ".archived-" not in child.name)  # fmt: skip
        if not runs and not failed_trials(path):
            raise ReportError(
                f"{path}: no runs in it: neither it nor any directory directly under it holds a manifest.json. Pass a"
                " sweep directory (one run directory per trial), a directory of runs such as runs/, or run directories"
                " made by dpo-kit run."
            )
        found += runs
    # One run reached twice (a sweep directory and one of its runs, a path spelt two ways) is compared once.
    unique = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values()), searched


def failed_trials(directory: Path) -> list[RunRecord]:
    """The trials of the sweep in `directory` that failed before their run was made (a combination the params refuse,
    drawn by a random search; a run refused before its first stage), each as an incomplete run with its error. They
    have no run directory holding a manifest.json, so the report did not know of them: a sweep's table listed a trial
    that its report left out without a word. Read from <sweep>/trial_notes/<run dir>.trial-<number>.txt, the newest
    trial of each point; a point whose run directory holds a run is read from there."""
    notes = directory / TRIAL_NOTES
    if not notes.is_dir():
        return []
    newest: dict[str, tuple[int, Path]] = {}
    for path in notes.glob("*.txt"):
        name, separator, number = path.stem.rpartition(".trial-")
        if separator and number.isdigit() and int(number) >= newest.get(name, (-1, path))[0]:
            newest[name] = (int(number), path)
    records = []
    for name, (number, path) in sorted(newest.items()):
        if (directory / name / "manifest.json").is_file():
            continue
        note = path.read_text(encoding="utf-8", errors="replace").strip()
        records.append(RunRecord(name=name, path=directory / name, incomplete=(
            f"trial {number} of the sweep failed before its run was made (no run directory): {note} (in full: {path})")))
    return records


def distinct_names(records: list[RunRecord]) -> None:
    """Runs of the same name in different directories (two sweeps' `beta=0.1`) are named by as much of their path as
    tells them apart ('sweep-a/beta=0.1'): every table and figure keys its rows and labels by the name."""
    for _ in range(max((len(run.path.parts) for run in records), default=0)):
        counts = Counter(run.name for run in records)
        clashing = [run for run in records if counts[run.name] > 1]
        if not clashing:
            return
        for run in clashing:
            parts = len(Path(run.name).parts) + 1
            run.name = str(Path(*run.path.parts[-parts:])) if parts <= len(run.path.parts) else str(run.path)


def read_run(path: Path) -> RunRecord:
    """A run's files; `incomplete` names what is missing (metrics.json, unreadable files) and the run's status."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # the kit writes it whole; a hand edit may not
        return RunRecord(name=path.name, path=path, manifest={},
                         incomplete=f"{path / 'manifest.json'} is not valid JSON ({error})")
    record = RunRecord(name=path.name, path=path, manifest=manifest)  # the directory: what the reader sees and passes
    params_file, log = path / "params.yaml", path / "train_log.jsonl"
    try:
        if params_file.is_file():
            record.params = yaml.safe_load(params_file.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        record.incomplete = f"{params_file} is not valid YAML ({error})"
        return record
    try:
        if log.is_file():
            record.log_history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        record.incomplete = f"{log} is not valid JSON lines ({error})"
        return record
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        stages = manifest.get("stages", {})
        done = [stage for stage, entry in stages.items() if entry.get("status") == "completed"]
        unfinished = {stage: entry.get("status") for stage, entry in stages.items() if entry.get("status") != "completed"}
        state = ", ".join(f"{stage} {status}" for stage, status in unfinished.items()) or "evaluate never started"
        record.incomplete = (f"no {METRICS_FILE} (run status {manifest.get('status', 'unknown')}; completed stages:"
                             f" {', '.join(done) or 'none'}; {state})")  # fmt: skip
        return record
    try:
        record.metrics = json.loads(metrics.read_text())
    except json.JSONDecodeError as error:
        record.incomplete = f"{metrics} is not valid JSON ({error})"
        return record
    if not record.params:
        record.incomplete = f"no params.yaml in {path}: its params cannot be compared"
    return record


def load_runs(paths: list[str | Path] | str | Path, project_dir: str | Path = ".") -> Comparison:
    """Find and read the runs; raises ReportError when fewer than one run is complete or the judges differ."""
    run_dirs, searched = find_run_dirs(paths, project_dir)
    records = [read_run(path) for path in run_dirs]
    sweeps = {path.resolve(): path for path in searched if path.is_dir() and not (path / "manifest.json").is_file()}
    records += [record for path in sweeps.values() for record in failed_trials(path)]
    distinct_names(records)
    complete = [run for run in records if run.incomplete is None]
    incomplete = [run for run in records if run.incomplete is not None]
    if not complete:
        reasons = "; ".join(f"{run.path}: {run.incomplete}" for run in incomplete)
        raise ReportError(f"no complete run to compare (each needs the metrics.json of the evaluate stage): {reasons}."
                          " Finish them with `dpo-kit run <run dir>/params.yaml --resume`.")  # fmt: skip
    judges = {run.name: run.metrics.get("judge") for run in complete if run.metrics.get("judge")}
    if len(set(judges.values())) > 1:
        named = ", ".join(f"{name}: {judge}" for name, judge in judges.items())
        raise ReportError(f"the runs were judged by different judges ({named}); their rewards are not on one scale."
                          " Report runs with the same evaluate.judge together.")  # fmt: skip
    return Comparison(runs=complete, incomplete=incomplete, searched=searched)


GENERATION_SETTINGS = ("generate.max_new_tokens", "generate.do_sample", "generate.temperature", "generate.top_p",
                       "generate.top_k")  # fmt: skip


def _groups(runs: list[RunRecord], key) -> list[list[RunRecord]]:
    """Runs grouped by `key(run)` (runs whose key is None are left out), in the order first met."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        value = key(run)
        if value is not None:
            groups.setdefault(value, []).append(run)
    return list(groups.values())


def _described(groups: list[list[RunRecord]]) -> str:
    return "; ".join(f"{index}: {', '.join(run.name for run in group)}" for index, group in enumerate(groups, start=1))


def _params_but_the_seed(run: RunRecord) -> str:
    # A key left null reads as one the run's params.yaml has no line for, as differing_params reads it: a run made
    # before the kit had a key (data.eval_split) has no line, and a later one writes its default, null.
    flat = {k: v for k, v in flatten(run.params).items() if k not in UNCOMPARED_KEYS and k != "run.seed" and v is not None}
    return json.dumps(flat, sort_keys=True, default=str)


def _evaluated_prompts(run: RunRecord) -> str | None:
    prompts = _generation_prompts(run)
    return json.dumps(prompts, sort_keys=True) if prompts else None


def _held_out_pairs(run: RunRecord) -> str | None:
    """The held-out pairs the evaluate stage read: the first num_pairs + num_pairs_dropped rows of data/eval.jsonl."""
    path = run.path / "data" / "eval.jsonl"
    if not path.is_file() or "num_pairs" not in run.metrics:
        return None
    read = run.metrics["num_pairs"] + run.metrics.get("num_pairs_dropped", 0)
    return json.dumps([line for line in path.read_text().splitlines() if line.strip()][:read])


def comparability_notes(runs: list[RunRecord]) -> list[str]:
    """What makes the runs' numbers not like for like, one sentence each (empty when nothing does): generations on
    other prompts (another seed's held-out split or another data.eval_split, another generate.num_prompts or
    generate.prompts) or sampled with other settings, other held-out pairs for the implicit reward, another kind of
    win-rate interval. Each of these changes the numbers without any change in training; the report compares the
    runs all the same."""
    notes = []
    with_generations = [run for run in runs if "win_rate" in run.metrics]
    prompts = _groups(with_generations, _evaluated_prompts)
    if len(prompts) > 1:
        notes.append(f"the runs' generations were judged on {len(prompts)} different sets of prompts ({_described(prompts)}):"
                     " their judged rewards, win-rates, KLs and the reference's own reward differ with the prompts as"
                     " well as with the training (another run.seed, data.eval_fraction or data.eval_split holds out"
                     " other prompts), so compare them as estimates with their intervals, not prompt for prompt")  # fmt: skip
    kinds = _groups(with_generations, lambda run: run.metrics.get("generate/prompts", "held-out"))
    if len(kinds) > 1:
        notes.append(f"some runs were compared on held-out prompts and others on their own generate.prompts, which"
                     f" may have been trained on ({_described(kinds)})")  # fmt: skip
    settings = {key: {json.dumps(flatten(run.params).get(key)) for run in with_generations} for key in GENERATION_SETTINGS}
    differ = [key for key, values in settings.items() if len(values) > 1]
    if differ:
        notes.append(f"the runs' generations were sampled with different {', '.join(differ)} (see the params table):"
                     " the KL is in nats per response, so it grows with the response's length, and the judged reward"
                     " and win-rate change with the sampling too")  # fmt: skip
    pairs = _groups(runs, _held_out_pairs)
    if len(pairs) > 1:
        notes.append(f"the implicit-reward accuracy and margin were measured on {len(pairs)} different sets of held-out"
                     f" pairs ({_described(pairs)}): another run.seed, data.eval_fraction or data.eval_split holds out"
                     " other pairs (metrics.json's held_out_pairs says where each run's came from)")  # fmt: skip
    methods = _groups(with_generations, lambda run: run.metrics.get("win_rate/ci_method", "percentile bootstrap"))
    if len(methods) > 1:
        notes.append(f"the win-rate intervals were computed by different methods ({_described(methods)}; see CI method"
                     " in the win-rate table): evaluate the older runs again for one method")  # fmt: skip
    return notes


def left_out_notes(runs: list[RunRecord]) -> list[str]:
    """Which compared runs a table or figure leaves out, and why, one sentence each (empty when none is): a run
    evaluated without generations has no judged reward, KL or win-rate, and one evaluated before the kit measured
    length and repetition (text/*) has no row in the over-optimization table. They were left out without a word, so a
    figure with a point missing read as the whole comparison."""
    notes = []
    unplotted = [run.name for run in runs if "kl" not in run.metrics or "judge/policy_score" not in run.metrics]
    if unplotted:
        notes.append(f"{', '.join(unplotted)}: no judged reward or KL in metrics.json (evaluated without generations),"
                     " so not on the reward-against-KL figure")  # fmt: skip
    no_win_rate = [run.name for run in runs if "win_rate" not in run.metrics]
    if no_win_rate:
        notes.append(f"{', '.join(no_win_rate)}: no win_rate in metrics.json, so not in the win-rate table and figure")
    with_text = {run.name for run in runs_with_generations(runs)}
    no_text = [run.name for run in runs if run.name not in with_text and "win_rate" in run.metrics]
    if no_text:
        notes.append(f"{', '.join(no_text)}: no words per response, distinct-2 or repeated 3-grams (text/*) in"
                     " metrics.json (evaluated before the kit measured them), so not in the reward-next-to-length"
                     " table and figure; evaluate the run again to add them")  # fmt: skip
    return notes


def incomplete_table(comparison: Comparison):
    """The runs left out and why, each reason in full (a Styler: pandas would cut a long cell at 50 characters)."""
    import pandas as pd

    table = pd.DataFrame(
        [{"run": run.name, "directory": str(run.path), "left out because": run.incomplete} for run in comparison.incomplete],
        columns=["run", "directory", "left out because"],
    )
    return table.style.hide(axis="index")


# ---------------------------------------------------------------------------------------------
# Tables


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'dpo': {'beta': 0.1}} -> {'dpo.beta': 0.1}; a one-item list reads as its item (loss_type [sigmoid])."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value[0] if isinstance(value, list) and len(value) == 1 else value
    return flat


def differing_params(runs: list[RunRecord]) -> list[str]:
    """Dotted params keys whose value is not the same in every run (UNCOMPARED_KEYS such as run.name aside)."""
    flats = [flatten(run.params) for run in runs]
    keys = sorted({key for flat in flats for key in flat} - set(UNCOMPARED_KEYS))
    return [key for key in keys if len({json.dumps(flat.get(key), sort_keys=True, default=str) for flat in flats}) > 1]


HEADLINE_METRICS = {
    "judged reward": "judge/policy_score",
    "KL (nats)": "kl",
    "win-rate": "win_rate",
    "win-rate CI low": "win_rate/ci_low",
    "win-rate CI high": "win_rate/ci_high",
    "implicit-reward accuracy": "rewards/accuracies",
    "reward margin": "rewards/margins",
}


def params_table(runs: list[RunRecord]):
    """One row per run: the params that differ between the runs, then its headline metrics."""
    import pandas as pd

    keys = differing_params(runs)
    rows = {}
    for run in runs:
        flat = flatten(run.params)
        row = {key: flat.get(key) for key in keys}
        row.update({label: run.metrics.get(key) for label, key in HEADLINE_METRICS.items()})
        rows[run.name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    return table


def seed_summary_table(runs: list[RunRecord]):
    """Runs that differ in run.seed alone (UNCOMPARED_KEYS aside), one row per such group of two or more: how many
    seeds, and each headline metric's mean and sample standard deviation over them (as bench/sentiment_seeds.py
    gives its 'mean ± sd'), so that a difference between settings can be read against the spread between seeds.
    Empty when no two runs share their params but for the seed, or when such runs share the seed too (repeats)."""
    import statistics

    import pandas as pd

    rows = {}
    # Runs that share their seed too are repeats of one run, not a spread over seeds: a group needs two seeds.
    seeded = (group for group in _groups(runs, _params_but_the_seed)
              if len({json.dumps(lookup(run.params, "run.seed")) for run in group}) > 1)  # fmt: skip
    for members in seeded:
        row: dict[str, Any] = {"runs": len(members),
                               "seed values": ", ".join(str(lookup(run.params, "run.seed")) for run in members)}  # fmt: skip
        for label, key in HEADLINE_METRICS.items():
            if "CI" in label:  # an interval's bounds do not average into an interval
                continue
            values = [run.metrics[key] for run in members if isinstance(run.metrics.get(key), (int, float))]
            row[f"{label} mean"] = statistics.mean(values) if values else None
            row[f"{label} sd"] = statistics.stdev(values) if len(values) > 1 else None
        rows[", ".join(run.name for run in members)] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "runs (differing in run.seed only)"
    return table


def point_labels(runs: list[RunRecord]) -> dict[str, str]:
    """Run name -> the label its points and rows carry: β and loss type where that tells it from the other runs,
    else its name (runs that differ in something else, as rounds of iterative DPO or two learning rates do)."""
    counts = Counter(run.label for run in runs)
    return {run.name: run.label if counts[run.label] == 1 else run.name for run in runs}


def frontier_points(runs: list[RunRecord]):
    """Per run: label, β, loss type, KL to the reference and judged reward (with its standard error over prompts)."""
    import pandas as pd

    rows = []
    plotted = [run for run in runs if "kl" in run.metrics and "judge/policy_score" in run.metrics]
    labels = point_labels(plotted)  # evaluated without generations: no KL, no judged reward, no point
    for run in plotted:
        metrics = run.metrics
        scores = metrics.get("per_generation", {}).get("policy_score") or []
        rows.append({
            "run": run.name, "label": labels[run.name], "beta": run.beta, "loss_type": run.loss_type,
            "kl": metrics["kl"], "reward": metrics["judge/policy_score"], "reward_sem": standard_error(scores),
            "reference_reward": metrics.get("judge/reference_score"), "prompts": metrics.get("num_generations"),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["run", "label", "beta", "loss_type", "kl", "reward", "reward_sem",
                                       "reference_reward", "prompts"])  # fmt: skip


def standard_error(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def win_rate_table(runs: list[RunRecord]):
    """Win-rate of each policy over the reference with its confidence interval, wins/ties/losses and prompts."""
    import pandas as pd

    rows = {}
    labels = point_labels(runs)
    for run in runs:
        m = run.metrics
        if "win_rate" in m:
            rows[run.name] = {"label": labels[run.name], "win-rate": m["win_rate"], "CI low": m.get("win_rate/ci_low"),
                              "CI high": m.get("win_rate/ci_high"), "CI level": m.get("win_rate/ci_level"),
                              # Evaluations before win_rate/ci_method was recorded used a percentile bootstrap.
                              "CI method": m.get("win_rate/ci_method", "percentile bootstrap"),
                              "wins": m.get("win_rate/wins"), "ties": m.get("win_rate/ties"),
                              "losses": m.get("win_rate/losses"), "prompts": m.get("win_rate/n")}  # fmt: skip
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    return table


OVEROPTIMIZATION = {
    "judged reward": "judge/{}_score",
    "words per response": "text/{}_words",
    "distinct-2": "text/{}_distinct_2",
    "repeated 3-grams": "text/{}_repeated_3grams",
}


def runs_with_generations(runs: list[RunRecord]) -> list[RunRecord]:
    """The runs whose evaluate stage measured their generations' length and repetition (metrics text/*)."""
    return [run for run in runs if "text/policy_words" in run.metrics]


def overoptimization_references(runs: list[RunRecord]) -> list[tuple[list[str], dict[str, Any]]]:
    """The reference's own generations, once per distinct set (runs of one sweep share theirs; another run.seed
    holds out other prompts, so its reference generated other answers): the runs that share it, and its values."""
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for run in runs:
        values = {k: run.metrics.get(v.format("reference")) for k, v in OVEROPTIMIZATION.items()}
        groups.setdefault(json.dumps(values, sort_keys=True), ([], values))[0].append(run.name)
    return list(groups.values())


def overoptimization_table(runs: list[RunRecord]):
    """Judged reward next to length and repetition, per run and for the reference (its generations, one row per
    distinct set: runs evaluated on other prompts each have their own, labelled with the runs it belongs to): a
    reward bought with longer or repetitive answers shows here as rising words or repeated 3-grams, falling
    distinct-2."""
    import pandas as pd

    rows = {}
    with_text = runs_with_generations(runs)
    references = overoptimization_references(with_text)
    for names, values in references:
        # One reference: "reference", as before. Several: which runs each one goes with, as plot_frontier says it.
        label = f"reference of {', '.join(names)}" if len(references) > 1 else "reference"
        rows[f"reference ({names[0]}'s generations)"] = {"label": label, "KL (nats)": 0.0, **values}
    labels = point_labels(with_text)
    for run in with_text:
        rows[run.name] = {"label": labels[run.name], "KL (nats)": run.metrics.get("kl"),
                          **{k: run.metrics.get(v.format("policy")) for k, v in OVEROPTIMIZATION.items()}}  # fmt: skip
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    return table


# ---------------------------------------------------------------------------------------------
# Best-of-N from the reference


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N || reference) in nats, log N - (N-1)/N: 0 for N = 1 (an upper bound, exact without ties)."""
    if n < 1:
        raise ValueError(f"N must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def expected_best_of_n(scores: list[float], n: int) -> float:
    """Unbiased estimate of E[max of N draws] from k >= N i.i.d. scores: the mean over all N-subsets of the k of
    their best score. Sorted ascending, the i-th score (1-based) is the best of C(i-1, N-1) of the C(k, N) subsets."""
    k = len(scores)
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs at least {n} samples per prompt, got {k}")
    ordered = sorted(scores)
    return sum(math.comb(i - 1, n - 1) * score for i, score in enumerate(ordered, start=1)) / math.comb(k, n)


@dataclass
class BestOfN:
    """The best-of-N curve of one run's reference samples, or why there is none (`table` empty, `note` says)."""

    run: str
    table: Any  # pandas DataFrame: N, kl, reward, prompts, samples per prompt
    note: str


BEST_OF_N_COLUMNS = ["N", "kl", "reward", "prompts", "samples per prompt"]


def _best_of_n_table(rows: list[dict], ns: tuple[int, ...]):
    """The expected best score of N draws, for each N up to the fewest samples of a prompt, averaged over prompts."""
    import pandas as pd

    k = min(len(row["scores"]) for row in rows)
    return pd.DataFrame([
        {"N": n, "kl": best_of_n_kl(n), "prompts": len(rows), "samples per prompt": k,
         "reward": sum(expected_best_of_n(row["scores"], n) for row in rows) / len(rows)}
        for n in ns if n <= k
    ], columns=BEST_OF_N_COLUMNS)  # fmt: skip


def _missing_n_note(ns: tuple[int, ...], k: int, setting: str) -> list[str]:
    missing = [n for n in ns if n > k]
    return [f"N = {', '.join(map(str, missing))} not estimated: it needs at least {max(missing)} samples per prompt"
            f" ({setting}: {max(missing)}); this run has {k}"] if missing else []  # fmt: skip


def reference_samples_baseline(run: RunRecord, ns: tuple[int, ...] = BEST_OF_N) -> BestOfN | None:
    """Best-of-N from the run's reference_samples.jsonl (generate.best_of_n): responses of the reference drawn with
    the evaluation's own decoding settings on exactly the evaluated prompts. None when the run has no such file."""
    import pandas as pd

    path = run.path / "reference_samples.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("scores")]
    if not rows:
        return BestOfN(run.name, pd.DataFrame(columns=BEST_OF_N_COLUMNS), f"{run.name}: {path.name} holds no scored samples")
    judges = {row.get("judge") for row in rows}
    evaluated_by = run.metrics.get("judge")
    if evaluated_by and judges != {evaluated_by}:
        return BestOfN(run.name, pd.DataFrame(columns=BEST_OF_N_COLUMNS), f"{run.name}: {path.name} was scored by"
                       f" {', '.join(map(str, sorted(judges, key=str)))}, its generations by {evaluated_by}: not one"
                       " scale, so no best-of-N baseline")  # fmt: skip
    table = _best_of_n_table(rows, ns)
    k = int(table["samples per prompt"].iloc[0]) if len(table) else min(len(row["scores"]) for row in rows)
    notes = [f"best-of-N of the reference from {k} judged responses per prompt ({path.name} of {run.name}), drawn"
             f" with the evaluation's decoding settings on the {len(rows)} evaluated prompts"]  # fmt: skip
    return BestOfN(run.name, table, "; ".join(notes + _missing_n_note(ns, k, "generate.best_of_n")))


def best_of_n_baseline(run: RunRecord, ns: tuple[int, ...] = BEST_OF_N) -> BestOfN:
    """Best-of-N of the reference: from the run's reference_samples.jsonl where it has one (generate.best_of_n),
    else from its data/samples.jsonl, on the prompts it was evaluated on (those of generations.jsonl) where they
    are among the sampled ones, else on every sampled prompt. `note` says which samples and prompts, which N are
    missing and how the samples' decoding differs from the evaluation's."""
    import pandas as pd

    drawn_for_it = reference_samples_baseline(run, ns)
    if drawn_for_it is not None:
        return drawn_for_it
    columns = BEST_OF_N_COLUMNS
    empty = pd.DataFrame(columns=columns)
    samples_file = run.path / "data" / "samples.jsonl"
    settings = lookup(run.params, "data.generate") or {}
    if not samples_file.is_file():
        return BestOfN(run.name, empty, f"{run.name}: no data/samples.jsonl (data.source is"
                       f" '{lookup(run.params, 'data.source')}', not 'generate'): no reference samples for best-of-N")
    if settings.get("sampler"):
        return BestOfN(run.name, empty, f"{run.name}: its samples come from data.generate.sampler {settings['sampler']},"
                       " not the reference: no best-of-N baseline of the reference")  # fmt: skip
    evaluated_by = run.metrics.get("judge")
    # The judge with its length floor: a sentiment floor that differs scores the same samples otherwise.
    sampled_by = judge_label(settings["judge"], settings.get("sentiment_min_words")) if settings.get("judge") else None
    if evaluated_by and sampled_by and sampled_by != evaluated_by:
        return BestOfN(run.name, empty, f"{run.name}: its samples were scored by {sampled_by}, its generations"
                       f" by {evaluated_by}: not one scale, so no best-of-N baseline")  # fmt: skip
    rows = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("scores")]
    evaluated = {json.dumps(p, sort_keys=True) for p in _generation_prompts(run)}
    held_out = [row for row in rows if json.dumps(row.get("prompt"), sort_keys=True) in evaluated]
    where = "the held-out prompts the runs were evaluated on" if held_out else "every sampled prompt (train and held-out)"
    rows = held_out or rows
    if not rows:
        return BestOfN(run.name, empty, f"{run.name}: data/samples.jsonl holds no scored samples")
    k = min(len(row["scores"]) for row in rows)
    table = _best_of_n_table(rows, ns)
    notes = [f"best-of-N of the reference from {k} judged samples per prompt (data/samples.jsonl of {run.name}),"
             f" on {len(rows)} prompts: {where}"]  # fmt: skip
    notes += _missing_n_note(ns, k, "generate.best_of_n, or data.generate.num_samples")
    evaluation = run.params.get("generate") or {}
    decoding = {key: (settings.get(key), evaluation.get(key)) for key in ("temperature", "top_p", "top_k", "max_new_tokens")}
    differ = {key: pair for key, pair in decoding.items() if pair[0] != pair[1] and None not in pair}
    if evaluation.get("do_sample") is False:  # the format stage always samples
        differ["decoding"] = ("sampling", "greedy")
    if differ:
        notes.append("its samples were drawn with " + ", ".join(f"{k} {a}" for k, (a, _) in differ.items())
                     + ", the evaluated generations with " + ", ".join(f"{k} {b}" for k, (_, b) in differ.items())
                     + ": best-of-1 is the reference at the samples' settings, not at the evaluation's")
    return BestOfN(run.name, table, "; ".join(notes))


def _generation_prompts(run: RunRecord) -> list[Any]:
    path = run.path / "generations.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def best_of_n_baselines(runs: list[RunRecord], ns: tuple[int, ...] = BEST_OF_N) -> tuple[list[BestOfN], list[str]]:
    """One best-of-N curve per distinct curve (runs of one sweep share their samples and prompts), and the notes of
    the runs that have none. Responses drawn for the purpose (reference_samples.jsonl, at the evaluation's own
    settings and prompts) stand in for the format stage's samples wherever a run has them."""
    curves, notes, seen = [], [], set()
    drawn = [run for run in runs if (run.path / "reference_samples.jsonl").is_file()]
    for run in runs:
        own = run.path / "reference_samples.jsonl"
        if drawn and not own.is_file():
            continue
        baseline = best_of_n_baseline(run, ns)
        # One curve per distinct curve: runs that share their samples and were evaluated on the same prompts give
        # the same one, while runs sharing samples but evaluated on other prompts (generate.num_prompts) do not.
        key = baseline.table.to_csv()
        if baseline.table.empty:
            notes.append(baseline.note)
        elif key not in seen:
            seen.add(key)
            curves.append(baseline)
    if drawn and len(drawn) < len(runs):
        notes.append(f"best-of-N from the reference responses drawn for it by {', '.join(r.name for r in drawn)}"
                     " (generate.best_of_n); the format stage's samples of the other runs are not used")  # fmt: skip
    return curves, notes


def best_of_n_table(curves: list[BestOfN]):
    import pandas as pd

    if not curves:
        return pd.DataFrame(columns=["samples of", "N", "kl", "reward", "prompts", "samples per prompt"])
    return pd.concat([curve.table.assign(**{"samples of": curve.run}) for curve in curves], ignore_index=True)[
        ["samples of", "N", "kl", "reward", "prompts", "samples per prompt"]
    ]


# ---------------------------------------------------------------------------------------------
# Figures (bare matplotlib Figures: nothing global, each shown once where a cell returns it)


def plot_frontier(runs: list[RunRecord], curves: list[BestOfN] | None = None):
    """Judged reward against KL(policy || reference), one point per run labelled by β and loss type (by its name
    where other runs share those, see point_labels), the reference
    at KL 0 and the best-of-N curves of the reference: the DPO paper's figure 2 in miniature."""
    from matplotlib.figure import Figure

    points = frontier_points(runs)
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axis = figure.subplots()
    markers = {}
    for loss_type, group in points.groupby("loss_type", sort=True):
        marker = "s" if loss_type == "sft" else "o^Dvp"[len(markers) % 5]
        markers[loss_type] = marker
        name = "preferred-FT (sft)" if loss_type == "sft" else f"DPO, loss {loss_type}"
        axis.errorbar(group["kl"], group["reward"], yerr=group["reward_sem"].fillna(0), fmt=marker, ms=7, capsize=3,
                      label=name)  # fmt: skip
        for _, point in group.iterrows():
            axis.annotate(point["label"], (point["kl"], point["reward"]), textcoords="offset points", xytext=(6, 6),
                          fontsize=8)  # fmt: skip
    # The reference's own generations, at KL 0: one star per distinct value (runs of one sweep share theirs;
    # runs with other held-out prompts or decoding settings have their own).
    references = points.dropna(subset=["reference_reward"]).groupby("reference_reward", sort=True)["run"].apply(list)
    for index, (reward, names) in enumerate(references.items()):
        axis.plot([0.0], [reward], "*", color="black", ms=12,
                  label="reference (its evaluated generations)" if index == 0 else None)  # fmt: skip
        if len(references) > 1:
            axis.annotate(f"reference of {', '.join(names)}", (0.0, reward), textcoords="offset points",
                          xytext=(6, -10), fontsize=7)  # fmt: skip
    for curve in curves or []:
        table = curve.table
        axis.plot(table["kl"], table["reward"], "--", marker=".", color="gray",
                  label=f"best-of-N of the reference ({curve.run}'s samples)")  # fmt: skip
        for _, row in table.iterrows():
            axis.annotate(f"N={int(row['N'])}", (row["kl"], row["reward"]), textcoords="offset points",
                          xytext=(4, -11), fontsize=7, color="gray")  # fmt: skip
    judge = next((run.metrics.get("judge") for run in runs if run.metrics.get("judge")), "judge")
    axis.set(xlabel="KL(policy || reference), nats per response", ylabel=f"judged reward ({judge}), mean over prompts",
             title="Reward against KL to the reference")  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    return figure


def plot_win_rates(runs: list[RunRecord]):
    """Each run's win-rate over the reference with its confidence interval; 0.5 is a draw."""
    from matplotlib.figure import Figure

    table = win_rate_table(runs)
    figure = Figure(figsize=(7, 0.5 * max(len(table), 2) + 1.2), layout="constrained")
    axis = figure.subplots()
    if table.empty:
        axis.text(0.5, 0.5, "no win-rates: the runs were evaluated without generations", ha="center", va="center")
        axis.set_axis_off()
        return figure
    positions = range(len(table))
    low = (table["win-rate"] - table["CI low"]).clip(lower=0)
    high = (table["CI high"] - table["win-rate"]).clip(lower=0)
    axis.errorbar(table["win-rate"], list(positions), xerr=[low, high], fmt="o", capsize=4)
    # A run labelled by its name (other runs share its β and loss type, see point_labels) is named once, not twice.
    names = [run if label == run else f"{run}  ({label})" for run, label in zip(table.index, table["label"], strict=True)]
    axis.set_yticks(list(positions), names)
    axis.axvline(0.5, color="gray", lw=0.8, ls=":")
    level = table["CI level"].dropna()
    axis.set(xlim=(-0.02, 1.02), xlabel="win-rate over the reference" + (f" ({level.iloc[0]:.0%} interval)" if len(level) else ""),
             title="Win-rate of each policy over the reference")  # fmt: skip
    axis.invert_yaxis()
    axis.grid(alpha=0.3, axis="x")
    return figure


def plot_overoptimization(runs: list[RunRecord]):
    """Length and repetition of each run's generations against its KL, the reference at KL 0.

    Each run keeps one colour in every panel and is named once, in a legend: runs often tie on a panel (every short
    answer has no repeated 3-gram), and names written beside the points then lay one over another."""
    from matplotlib.figure import Figure

    table = overoptimization_table(runs)
    # overoptimization_table puts the reference rows first, one per distinct set of reference generations.
    references = len(overoptimization_references(runs_with_generations(runs)))
    panels = [key for key in OVEROPTIMIZATION if key != "judged reward"]
    figure = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels))
    for axis, key in zip(axes, panels, strict=True):
        for position, (_, row) in enumerate(table.iterrows()):
            if position < references:  # black, one marker per reference
                style = {"marker": "*PXDsv"[position % 6], "color": "black", "ms": 10 if position == 0 else 8}
            else:
                style = {"marker": "o", "color": f"C{(position - references) % 10}", "ms": 6}
            axis.plot(row["KL (nats)"], row[key], ls="none", label=row["label"], **style)
        axis.set(title=key, xlabel="KL (nats per response)")
        axis.grid(alpha=0.3)
    if len(table):
        axes[0].legend(fontsize=7)
    return figure


def plot_training_curves(runs: list[RunRecord], metrics: tuple[str, ...] = TRAINING_CURVES):
    """TRL's logged training metrics against step, one line per run (evaluation rows, when logged, dashed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.4 * len(metrics), 3.4), layout="constrained")
    axes = figure.subplots(1, len(metrics))
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        for axis, metric in zip(axes, metrics, strict=True):
            for prefix, style in (("", "-"), ("eval_", "--")):
                rows = [row for row in run.log_history if prefix + metric in row and "step" in row]
                if rows:
                    axis.plot([r["step"] for r in rows], [r[prefix + metric] for r in rows], style, color=color,
                              label=f"{run.name} ({run.label})" + (" eval" if prefix else ""))  # fmt: skip
    for axis, metric in zip(axes, metrics, strict=True):
        axis.set(title=metric, xlabel="step")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(fontsize=7)
    return figure
