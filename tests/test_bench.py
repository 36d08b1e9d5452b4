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


# --- bench/pipeline.py, bench/sweep.py ----------------------------------------------------------------------------


def test_pipeline_measures_a_process_trees_peak_memory_and_names_a_failed_side():
    bench = load_bench("pipeline")
    child = "import time; x = b'x' * (300 * 2**20); time.sleep(1)"  # 0.3 GiB, in a child of the measured process
    seconds, peak = bench.run_measured([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"])
    assert seconds >= 1 and peak >= 0.29
    with pytest.raises(SystemExit, match="(?s)failed:\n.*ZeroDivisionError"):
        bench.run_measured([sys.executable, "-c", "1 / 0"])


def test_sweep_bench_counts_a_copied_format_stage_as_nothing(tmp_path):
    bench = load_bench("sweep")
    stages = {"format": {"seconds": 5.0}, "train": {"seconds": 2.0}, "merge": {"seconds": 0.5},
              "generate": {"seconds": 1.0}, "evaluate": {"seconds": 1.5}}  # fmt: skip
    for name, format_entry in (("a", stages["format"]), ("b", {"seconds": 5.0, "reused_from": "a"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"stages": {**stages, "format": format_entry}}))
    assert bench.stage_seconds([tmp_path / "a", tmp_path / "b"]) == {
        "format": 5.0, "train": 4.0, "merge": 1.0, "generate": 2.0, "evaluate": 3.0}


# --- bench/train_throughput.py ------------------------------------------------------------------------------------


def test_train_throughput_times_the_kit_from_the_cache_and_bare_trl_on_the_same_pairs(tiny_model_dir, tmp_path, monkeypatch):
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    bench = load_bench("train_throughput")
    monkeypatch.setitem(os.environ, "DPO_KIT_CACHE", str(tmp_path / "cache"))
    args = SimpleNamespace(params="params/tiny.yaml", data_from=None, train_set=[],
                           set=[f"model.name_or_path={tiny_model_dir}", "data.max_rows=40"])  # fmt: skip
    pairs = bench.prepare_pairs(args, tmp_path)
    assert len((pairs / "data" / "train.jsonl").read_text().splitlines()) == 36
    args.data_from = str(pairs)
    assert bench.prepare_pairs(args, tmp_path) == pairs, "--data-from takes a run made with the same data params"
    with pytest.raises(SystemExit, match="cannot stand for these params: .*max_rows"):
        bench.prepare_pairs(SimpleNamespace(**{**vars(args), "set": args.set[:1]}), tmp_path)

    args.train_set = ["dpo.max_steps=3", "dpo.logging_steps=3", "dpo.save_steps=3", "dpo.precompute_ref_log_probs=true"]
    times = bench.StepTimes()
    import transformers

    monkeypatch.setattr(transformers.trainer, "DEFAULT_CALLBACKS", [*transformers.trainer.DEFAULT_CALLBACKS, bench.step_timer(times)])
    bench.kit_side(args, pairs, tmp_path, "kit-warm-up", times)
    assert bench.kit_side(args, pairs, tmp_path, "kit-0", times) > 0 and len(times.ends) == 3
    assert "{'train': 'hit'}" in bench.SETTINGS["kit"], "the second kit run reads the reference log-probs from the cache"
    assert bench.trl_side(args, pairs, tmp_path, True, 3, times) > 0 and len(times.ends) == 3
    assert "'bf16': False" in bench.SETTINGS["TRL tuned"] and "'gradient_checkpointing': False" in bench.SETTINGS["TRL tuned"]
    times.ends[:] = times.ends[:1]
    with pytest.raises(SystemExit, match="fewer than 2 steps"):
        times.seconds_per_step()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert 10 < bench.real_tokens_per_pair(pairs, tokenizer, 256) <= 2 * 256
    assert bench.real_tokens_per_pair(pairs, tokenizer, 8) == 2 * 8, "cut at max_length as TRL cuts"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.lm_head.weight.numel() < bench.linear_weights(model) < 2 * sum(p.numel() for p in model.parameters())
    assert bench.matmul_peak(size=64, repeats=2) > 0


# --- the sentiment benches ------------------------------------------------------------------------------------------


def sample_row(index: int, scores: list[float]) -> dict:
    prompt = [{"role": "user", "content": f"Review film {index}."}, {"role": "assistant", "content": "The film"}]
    samples = [f"sample {index}.{k} " + "word " * (k + 1) for k in range(len(scores))]
    return {"prompt": prompt, "samples": samples, "scores": scores, "cut": [k % 2 == 0 for k in range(len(scores))]}


def fake_seed_run(run: Path, rows: list[dict], min_score_gap: float = 0.3, held_out: int = 2) -> None:
    """A format stage of the sentiment recipe as far as the benches read it: samples.jsonl, and train/eval.jsonl
    with each kept row's best/worst pair on its prompt 'rendered' (here: the prompt's text with a marker)."""
    from dpo_kit.data.drops import DropRow
    from dpo_kit.data.on_policy import ranked_pair

    write_jsonl(run / "data" / "samples.jsonl", rows)
    pairs = []
    for row in rows:
        try:
            pair = ranked_pair(min_score_gap)(row)
        except DropRow:
            continue
        pairs.append({"prompt": "<rendered>" + row["prompt"][0]["content"], "chosen": pair["chosen"][0]["content"],
                      "rejected": pair["rejected"][0]["content"]})  # fmt: skip
    write_jsonl(run / "data" / "train.jsonl", pairs[held_out:])
    write_jsonl(run / "data" / "eval.jsonl", pairs[:held_out])


def test_sentiment_more_pairs_takes_other_seeds_pairs_for_seed_0s_training_prompts_only(tmp_path, monkeypatch):
    from dpo_kit.data.on_policy import ranked_pair

    bench = load_bench("sentiment_more_pairs")
    seeds = [tmp_path / f"seed{seed}" for seed in range(3)]
    fake_seed_run(seeds[0], [sample_row(i, [0.9, 0.1, -0.5, 0.2]) for i in range(5)] + [sample_row(5, [0.1, 0.1, 0.2, 0.1])])
    fake_seed_run(seeds[1], [sample_row(i, [0.0, 0.95, -0.9, 0.3]) for i in range(6)])
    fake_seed_run(seeds[2], [sample_row(i, [0.0, 0.0, 0.0, 0.0]) for i in range(6)])  # no gap: no pairs
    monkeypatch.setattr(bench, "SEED_RUNS", seeds)
    convert = ranked_pair(0.3)
    train_prompts, eval_prompts = bench.seed0_prompts(convert)
    assert sorted(eval_prompts.values()) == ["<rendered>Review film 0.", "<rendered>Review film 1."]
    assert sorted(train_prompts.values()) == [f"<rendered>Review film {i}." for i in (2, 3, 4)], "film 5: dropped"

    pairs = bench.training_pairs(3, train_prompts, convert)
    assert len(pairs) == 3 + 3, "seed 0's own 3, seed 1's for the same 3 prompts, none of seed 2 (no score gap)"
    assert pairs[3] == {"prompt": "<rendered>Review film 2.", "chosen": "sample 2.1 word word ", "rejected": "sample 2.2 word word word "}
    pooled = bench.pooled_pairs(2, train_prompts, convert)
    assert [(p["chosen"], p["rejected"]) for p in pooled][0] == ("sample 2.1 word word ", "sample 2.2 word word word ")
    every = bench.all_pairs(train_prompts, 0.3)
    assert len(every) == 3 * 5, "of scores 0.9, 0.1, -0.5, 0.2 five pairs differ by 0.3 or more"
    assert [len(split) for split in bench.round_two_pairs(seeds[1], eval_prompts)] == [4, 2]
    with pytest.raises(SystemExit, match="trains on 1 of seed 0's held-out prompts"):
        bench.round_two_pairs(seeds[1], {"key": "<rendered>Review film 2."})
    assert bench.curve_cells({"11": 0.5, "22": 0.75, "34": 0.625}) == ("0.50, 0.75, 0.62", "0.62", "0.75")


def test_sentiment_more_pairs_trains_one_epoch_and_reads_trls_held_out_accuracy(tiny_model_dir, tmp_path):
    from dpo_kit.params import load_params

    bench = load_bench("sentiment_more_pairs")
    params = load_params(REPO / "params" / "smollm2-135m-sentiment.yaml", [f"model.name_or_path={tiny_model_dir}"])
    rows = [{"prompt": f"Review {i}: The film", "chosen": " was a joy.", "rejected": " was dull."} for i in range(10)]
    result = bench.train("one", rows, {"recipe": rows[:4], "second": rows[4:]}, params, out=tmp_path, note="kept")
    assert (result["pairs"], result["steps"], result["eval_pairs"], result["note"]) == (10, 2, {"recipe": 4, "second": 6}, "kept")
    assert set(result["accuracy_by_step"]) == {"recipe", "second"}
    assert all(list(curve) == [2] and 0 <= curve[2] <= 1 for curve in result["accuracy_by_step"].values())
    assert bench.existing_result("one", tmp_path)["pairs"] == 10
    (tmp_path / "half").mkdir()
    with pytest.raises(SystemExit, match="unfinished attempt"):
        bench.existing_result("half", tmp_path)


def test_sentiment_length_rescores_with_a_lower_floor_and_splits_as_the_format_stage(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from dpo_kit.chat_templates import render_prompt
    from dpo_kit.params import load_params

    bench = load_bench("sentiment_length")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = lambda i: [{"role": "user", "content": f"Review film {i}."}, {"role": "assistant", "content": "The film"}]  # noqa: E731
    # VADER with the floor at 3 words: +0.82 (10 words), -0.15, -0.82, 0.0 (all under the recipe's floor of 8)
    samples = ["was a wonderful joy to watch from start to end", "was truly bad", "was a terrible awful mess", "was a film"]
    rows = [{"prompt": prompt(i), "samples": samples} for i in range(8)]
    rows.append({"prompt": prompt(8), "samples": ["was a film"] * 4})  # a score gap of 0: dropped
    write_jsonl(tmp_path / "data" / "samples.jsonl", rows)
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": render_prompt(tokenizer, rows[0]["prompt"])}])
    write_jsonl(tmp_path / "data" / "eval.jsonl", [])
    params = load_params(REPO / "params" / "smollm2-135m-sentiment.yaml")
    train, held_out, counts = bench.rescored_pairs(tmp_path, params, 3, tokenizer)
    assert len(train) + len(held_out) == 8 and len(held_out) == 2 and counts == {"dropped": 1, "floor_of_8_would_decide": 8}
    assert {(p["chosen"], p["rejected"]) for p in train + held_out} == {(samples[0], samples[2])}
    assert {p["prompt"] for p in train + held_out} == {render_prompt(tokenizer, prompt(i)) for i in range(8)}
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": "rendered by another template"}])
    with pytest.raises(SystemExit, match="no prompt renders as its format stage rendered it"):
        bench.rescored_pairs(tmp_path, params, 3, tokenizer)


def test_sentiment_cut_eos_flags_cut_responses_and_its_trainer_drops_only_their_eos(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from dpo_kit.hardware import choose_hardware
    from dpo_kit.params import load_params
    from dpo_kit.training.train import build_dpo_config, build_trainer

    bench = load_bench("sentiment_cut_eos")
    assert bench.recorded_cut([{"samples": ["a b"], "scores": [0.1]}]) is None, "a run sampled before `cut` existed"
    recorded = bench.recorded_cut([{"samples": ["x", "y", "z"], "cut": [True, False, True]},
                                   {"samples": ["x", "z"], "cut": [True, False]}])  # fmt: skip
    assert recorded == {"x": True, "y": False}, "a text flagged both ways is left to its length"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "Review: The film", "chosen": "x", "rejected": "y"},
            {"prompt": "Review: The film", "chosen": " was " * 20, "rejected": "z"}]  # fmt: skip
    marked, lengths = bench.mark_cut(rows, tokenizer, 16, recorded)
    assert [(r["chosen_cut"], r["rejected_cut"]) for r in marked] == [(True, False), (True, False)]
    assert sum(lengths.values()) == 4

    params = load_params(REPO / "params" / "smollm2-135m-sentiment.yaml", [f"model.name_or_path={tiny_model_dir}"])
    hardware = choose_hardware()
    trainer = build_trainer(params, str(tiny_model_dir), hardware, build_dpo_config(params, tmp_path, hardware), tokenizer,
                            Dataset.from_list(marked), {"trl": Dataset.from_list(rows), "cut": Dataset.from_list(marked)},
                            trainer_class=bench.without_cut_eos_trainer(tokenizer.eos_token_id))  # fmt: skip
    eos = tokenizer.eos_token_id
    for dataset in (trainer.train_dataset, trainer.eval_dataset["cut"]):
        assert [(row["chosen_ids"][-1] == eos, row["rejected_ids"][-1] == eos) for row in dataset] == [(False, True)] * 2
    assert all(row["chosen_ids"][-1] == eos for row in trainer.eval_dataset["trl"]), "rows without flags: TRL's eos"


def test_sentiment_judge_agreement_groups_held_out_pairs_by_the_other_lexicons(tmp_path, monkeypatch, capsys):
    bench = load_bench("sentiment_judge_agreement")
    held_out = [{"prompt": "p", "chosen": "a great film", "rejected": "a bad film"},
                {"prompt": "p", "chosen": "fine", "rejected": "awful"},
                {"prompt": "p", "chosen": "good", "rejected": "great"}]  # fmt: skip
    write_jsonl(tmp_path / "data" / "eval.jsonl", held_out)
    write_jsonl(tmp_path / "data" / "train.jsonl", held_out[:2])
    (tmp_path / "metrics.json").write_text(json.dumps({"num_pairs_dropped": 0, "rewards/accuracies": 2 / 3,
                                                       "per_pair": {"reward_margins": [0.5, -0.1, 0.2]}}))  # fmt: skip
    assert bench.agreement([1.0, 0.0, -2.0, 3.0]) == "0.50 (ties 0.25)"
    words = {"great": 2, "good": 1, "fine": 0.5, "bad": -1, "awful": -2}
    lexicon = lambda text: sum(words.get(w, 0) for w in text.split())  # noqa: E731
    monkeypatch.setattr(bench, "other_lexicons", lambda: {"AFINN": lexicon, "TextBlob": lambda text: -lexicon(text)})
    monkeypatch.setattr(sys, "argv", ["sentiment_judge_agreement.py", str(tmp_path)])
    bench.main()
    out = capsys.readouterr().out
    assert "| AFINN | 1.00 (ties 0.00) | 0.67 (ties 0.00) |" in out and "| TextBlob | 0.00 (ties 0.00) | 0.33 (ties 0.00) |" in out
    assert "| one agrees | 3 | 0.67 |" in out and "| both agree | 0 | - |" in out


def test_sentiment_reward_model_trains_a_score_head_and_scores_the_held_out_pairs(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from dpo_kit.params import load_params

    bench = load_bench("sentiment_reward_model")
    monkeypatch.setattr(bench, "EPOCHS", 1)
    params = load_params(REPO / "params" / "smollm2-135m-sentiment.yaml", [f"model.name_or_path={tiny_model_dir}"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = [{"prompt": f"Review {i}: The film", "chosen": " was a joy.", "rejected": " was dull.", "extra": 1} for i in range(12)]
    result = bench.train_reward_model(params, str(tiny_model_dir), tokenizer, rows, rows[:5], 1e-3, 0, tmp_path)
    assert (result["steps"], result["epochs"], [point["step"] for point in result["held_out"]]) == (2, 1, [2])
    assert 0 <= result["held_out"][0]["accuracy"] <= 1 and result["train_log"]


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
