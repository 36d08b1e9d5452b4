"""The bench/ scripts, on tiny data: their own functions, CLIs and the kit functions they call, so that a refactor
of the kit that breaks a benchmark fails here (seconds each) instead of when the benchmark is next run. Their
numbers are never asserted: speed and memory targets are met in the benchmarks themselves, not in tests."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is no package); its main() is not run."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))  # sentiment_length imports a bench beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def split_kit_command(command: list[str]) -> tuple[str, str, list[str], list[str]]:
    """(subcommand, params file, flags, --set overrides) of a `python -m dpo_kit.run.cli` command a bench starts."""
    assert command[:3] == [sys.executable, "-m", "dpo_kit.run.cli"], f"not this interpreter's kit: {command[:3]}"
    subcommand, params, *rest = command[3:]
    overrides = [rest[i + 1] for i, arg in enumerate(rest) if arg == "--set"]
    flags = [arg for i, arg in enumerate(rest) if arg != "--set" and (i == 0 or rest[i - 1] != "--set")]
    return subcommand, params, flags, overrides


# --- bench/gpu_train.py ------------------------------------------------------------------------------------------


@pytest.fixture
def gpu_train(tiny_model_dir, monkeypatch):
    """bench/gpu_train.py with the random model's build replaced by a copy of the tiny model and `dpo-kit run` by
    `dpo-kit validate` of the same params and overrides, plus a manifest whose train entry the kit's own functions
    (precision_record, training_cost) fill: the table reads the keys the kit writes."""
    import dpo_kit.models.tiny
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.params import load_params
    from dpo_kit.run import cli
    from dpo_kit.training.train import build_dpo_config, precision_record, training_cost

    bench = load_bench("gpu_train")
    monkeypatch.setattr(dpo_kit.models.tiny, "build_random_model", lambda path, shape, seed=0: shutil.copytree(tiny_model_dir, path))
    monkeypatch.chdir(REPO)
    commands = []

    def run(command, cwd=None, **kwargs):
        subcommand, params_file, flags, overrides = split_kit_command(command)
        assert (subcommand, flags, Path(cwd)) == ("run", ["--stages", "format,train", "--quiet"], REPO)
        commands.append(overrides)
        code = cli.main(["validate", params_file, *[a for o in overrides for a in ("--set", o)]])
        params = load_params(params_file, overrides)
        run_dir = Path(params.run.output_dir) / params.run.name
        run_dir.mkdir(parents=True)
        hardware = choose_hardware()
        trainer = SimpleNamespace(state=SimpleNamespace(num_input_tokens_seen=1200, global_step=params.dpo["max_steps"]),
                                  args=SimpleNamespace(include_num_input_tokens_seen="non_padding"))  # fmt: skip
        train = {"precision": precision_record(build_dpo_config(params, run_dir, hardware)),
                 "cost": training_cost({"train_runtime": 4.0, "train_samples_per_second": 4.0}, trainer)}  # fmt: skip
        (run_dir / "manifest.json").write_text(json.dumps({"hardware": hardware.to_dict(), "stages": {"train": train}}))
        return subprocess.CompletedProcess(command, code)

    monkeypatch.setattr(bench, "subprocess", SimpleNamespace(run=run))
    return bench, commands


def test_gpu_train_runs_each_check_with_valid_params_and_keeps_every_invocations_results(gpu_train, tmp_path, capsys):
    """Its results file was <shape>-results.json, written once at the end: a second invocation overwrote the first's,
    and a command cut off by the lent GPU's time limit kept none. Now each invocation writes a new file after every
    check."""
    import torch

    from dpo_kit.hardware import choose_hardware

    bench, commands = gpu_train
    argv = ["--shape", "smollm2-135m", "--steps", "2", "--checks", "auto,qlora4", "--output-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert [dict(o.split("=", 1) for o in c)["run.name"] for c in commands] == ["smollm2-135m-auto-1", "smollm2-135m-qlora4-1"]
    assert "quantization.bits=4" in commands[1] and "quantization.bits=4" not in commands[0]
    assert {"dpo.max_steps=2", "model.build_tiny_model=false", f"run.output_dir={tmp_path}"} <= set(commands[0])
    rows = [line for line in out.splitlines() if line.startswith("| auto ") or line.startswith("| qlora4 ")]
    hardware = choose_hardware()
    device = "cpu" if hardware.device == "cpu" else torch.cuda.get_device_name()
    precision = ["bf16" if hardware.bf16 else "fp16" if hardware.fp16 else "fp32", str(hardware.gradient_checkpointing)]
    # check, exit, device, precision, checkpointing, steps, tokens/s (1200 tokens in 4 s), pairs/s
    assert [row.split(" | ")[:8] for row in rows] == [
        [f"| {check}", "0", device, *precision, "2", "300.0", "4.0"] for check in ("auto", "qlora4")]
    first = json.loads((tmp_path / "smollm2-135m-results-1.json").read_text())
    assert [r["check"] for r in first] == ["auto", "qlora4"] and f"results in {tmp_path / 'smollm2-135m-results-1.json'}" in out

    assert bench.main([*argv[:-4], "--checks", "auto", "--output-dir", str(tmp_path)]) == 0
    assert commands[-1][0] == "run.name=smollm2-135m-auto-2", "a new run directory, the first kept"
    assert json.loads((tmp_path / "smollm2-135m-results-1.json").read_text()) == first, "the first results kept"
    assert [r["check"] for r in json.loads((tmp_path / "smollm2-135m-results-2.json").read_text())] == ["auto"]


def test_gpu_train_refuses_an_unknown_check_or_shape_before_building_anything(tmp_path, capsys):
    bench = load_bench("gpu_train")
    with pytest.raises(SystemExit) as refused:
        bench.main(["--checks", "auto,qlora8", "--output-dir", str(tmp_path)])
    assert refused.value.code == 2 and "unknown check(s) qlora8; known: auto, qlora4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--shape", "llama-7b", "--output-dir", str(tmp_path)])
    assert "invalid choice: 'llama-7b'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- the sentiment benches ------------------------------------------------------------------------------------------


def test_sentiment_more_prompts_triples_the_bundled_prompts_and_runs_this_interpreters_kit(tmp_path, monkeypatch, capsys):
    from dpo_kit.bundled import movie_review_prompts
    from dpo_kit.params import load_params

    bench = load_bench("sentiment_more_prompts")
    rows = [json.loads(line) for line in bench.prompts_text().splitlines()]
    texts = {json.dumps(row["prompt"] if "prompt" in row else row, sort_keys=True) for row in rows}
    assert len(rows) == len(texts) == 1152
    bundled = movie_review_prompts(seed=0, prefill=True)
    assert {json.dumps(row.get("prompt", row), sort_keys=True) for row in bundled} <= texts

    monkeypatch.setattr(bench, "PROMPTS", tmp_path / "prompts" / "prompts.jsonl")
    monkeypatch.setattr(bench, "RUN", tmp_path / "run")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    commands = []

    def run(command, cwd=None, check=False):
        commands.append(command)
        write_jsonl(tmp_path / "run" / "train_log.jsonl", [{"step": 25, "eval_rewards/accuracies": 0.8}, {"step": 27, "loss": 0.5}])
        report = {"rows_read": 1152, "n_train": 800, "n_eval": 270, "rows_dropped": 82}
        (tmp_path / "run" / "data" / "report.json").parent.mkdir(parents=True)
        (tmp_path / "run" / "data" / "report.json").write_text(json.dumps(report))

    monkeypatch.setattr(bench, "subprocess", SimpleNamespace(run=run))
    monkeypatch.setattr(sys, "argv", ["sentiment_more_prompts.py"])
    assert bench.main() == 0
    subcommand, params_file, flags, overrides = split_kit_command(commands[0])
    assert (subcommand, params_file, flags) == ("run", "params/smollm2-135m-sentiment.yaml", ["--quiet", "--stages", "format,train"])
    params = load_params(REPO / params_file, overrides)  # every override names a key the params still have
    assert (params.data.max_rows, params.data.generate.prompts, params.dpo["eval_steps"]) == (1152, "prompts/prompts.jsonl", 25)
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "1152 prompts: 800 training pairs, 270 held-out pairs, 82 dropped (data/dropped.jsonl); one epoch of 27 steps",
        "held-out implicit-reward accuracy at steps 25: 0.80"]


def test_sentiment_seeds_runs_the_recipe_with_this_interpreters_kit_and_tables_the_runs(tmp_path, monkeypatch):
    """It ran <repo>/.venv/bin/dpo-kit, which a conda environment (or a checkout without .venv) does not have:
    FileNotFoundError before the first seed. It now runs `python -m dpo_kit.run.cli` with its own interpreter."""
    from dpo_kit.params import load_params

    bench = load_bench("sentiment_seeds")
    monkeypatch.setattr(bench, "run_dir", lambda seed: tmp_path / f"smollm2-135m-sentiment-seed{seed}")
    commands = []
    monkeypatch.setattr(bench, "subprocess", SimpleNamespace(run=lambda command, cwd=None, check=False: commands.append(command)))
    bench.run_seed(3)
    subcommand, params_file, flags, overrides = split_kit_command(commands[0])
    assert (subcommand, params_file, flags) == ("run", bench.RECIPE, [])
    params = load_params(REPO / params_file, overrides)
    assert (params.run.seed, params.run.name) == (3, "smollm2-135m-sentiment-seed3")

    metrics = {"judge/reference_score": 0.1, "judge/policy_score": 0.6, "win_rate": 0.8, "win_rate/ci_low": 0.7,
               "win_rate/ci_high": 0.9, "win_rate/n": 40, "kl": 1.5, "rewards/accuracies": 0.75,
               "text/reference_distinct_2": 0.9, "text/policy_distinct_2": 0.8,
               "per_pair": {"reward_margins": [1.0, -1.0, 2.0], "reference_chosen_logps": [-1.0, -5.0, -2.0],
                            "reference_rejected_logps": [-2.0, -4.0, -1.0]}}  # fmt: skip
    for seed in (3, 4):
        (tmp_path / f"smollm2-135m-sentiment-seed{seed}").mkdir()
        (tmp_path / f"smollm2-135m-sentiment-seed{seed}" / "metrics.json").write_text(json.dumps(metrics))
        (tmp_path / f"smollm2-135m-sentiment-seed{seed}" / "manifest.json").write_text(json.dumps(
            {"status": "completed", "created": "2026-01-01T10:00:00", "finished": "2026-01-01T10:09:00"}))
    bench.run_seed(3)
    assert len(commands) == 1, "a completed seed is not run again"
    table = bench.table([3, 4]).splitlines()
    assert table[2] == "| 3 | 0.10 | 0.60 | 0.80 [0.70, 0.90] | 1.50 | 0.75 | 0.90 | 0.80 | 40 | 9.0 min |"
    assert table[-1].startswith("| mean ± sd | 0.10 ± 0.00 |")
    split = bench.reference_split_table([3]).splitlines()
    assert split[2] == "| 3 | 1, 1.00 | 2, 0.50 | 0.33 |"
