"""The params schema: every file in params/ loads, and bad input names the key and what is valid."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dpo_kit.params import ParamsError, check_local_files, load_params, parse_params, read_yaml, save_params

REPO = Path(__file__).resolve().parent.parent
PARAMS_FILES = sorted((REPO / "params").glob("*.yaml"))
KEYS_RELIED_ON = [
    ("run", "name"), ("run", "output_dir"), ("run", "seed"), ("data", "source"), ("data", "format"),
    ("data", "eval_fraction"), ("dpo", "beta"), ("dpo", "loss_type"), ("dpo", "max_steps"), ("tracking", "report_to"),
]  # fmt: skip


def test_params_dir_has_the_tiny_default_and_the_article_recipes():
    names = {p.stem for p in PARAMS_FILES}
    assert "tiny" in names
    assert {"stablelm-2-1_6b-hh-rlhf-lora-8bit", "phi-2-truthy-dpo-full",
            "openhermes-2.5-mistral-7b-orca-dpo-qlora-4bit", "qwen2.5-0.5b-instruct-ultrafeedback-lora"} <= names


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_every_params_file_validates_and_builds_a_dpo_config(path, tmp_path):
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.training.train import build_dpo_config

    params = load_params(path)
    assert params.run.name == path.stem, "params files are named after their run"
    config = build_dpo_config(params, tmp_path, choose_hardware())  # TRL's own cross-field checks run here
    assert config.beta == params.dpo.get("beta", 0.1)
    for section, key in KEYS_RELIED_ON:
        raw = yaml.safe_load(path.read_text())
        value = params.dpo.get(key, getattr(config, key)) if section == "dpo" else getattr(getattr(params, section), key)
        assert value is not None or key in raw.get(section, {}), f"{section}.{key} unresolved in {path.name}"


def a_gpu(bf16: bool):
    from dpo_kit.hardware import HardwareChoice

    return HardwareChoice(device="cuda", device_name="A100" if bf16 else "T4", device_count=1, bf16_supported=bf16,
                          bf16=bf16, fp16=not bf16, gradient_checkpointing=True,
                          dtype="bfloat16" if bf16 else "float16", reason="a test GPU")  # fmt: skip


@pytest.mark.parametrize(
    ("gpu_bf16", "override", "expected"),
    [(True, "dpo.fp16=true", "fp16"), (False, "dpo.bf16=true", "bf16"), (True, "dpo.bf16=false", "no"),
     (False, "dpo.fp16=false", "no"), (True, "dpo.beta=0.1", "bf16"), (False, "dpo.beta=0.1", "fp16")],
)
def test_a_precision_set_in_params_wins_over_the_gpus_in_process_and_launched(gpu_bf16, override, expected, tmp_path,
                                                                               monkeypatch):
    # dpo.fp16 on a bf16 GPU kept the hardware's bf16 on as well (TrainingArguments refuses both), and a launched
    # run's --mixed_precision followed the hardware alone: launched with bf16, the Trainer keeps it when DPOConfig
    # has neither flag on, so dpo.bf16: false trained in bf16 while the manifest said fp32.
    from trl import DPOConfig

    from dpo_kit.training.launch import launch_command
    from dpo_kit.training.train import dpo_config_kwargs, precision_record
    from dpo_kit.training.worker import WorkerStage

    params = load_params(REPO / "params/tiny.yaml", [override, "launch.num_processes=2"])
    kwargs = dpo_config_kwargs(params, tmp_path, a_gpu(gpu_bf16))
    assert (kwargs["bf16"], kwargs["fp16"]) == (expected == "bf16", expected == "fp16")
    stage = WorkerStage(params=params, run_dir=tmp_path, project_dir=REPO, hardware=a_gpu(gpu_bf16), resume_from=None)
    command = launch_command(stage, None)
    assert command[command.index("--mixed_precision") + 1] == expected
    if expected == "no":  # what a launched worker's Trainer then trains with (its DPOConfig, built here on the CPU)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", expected)
        config = DPOConfig(output_dir=str(tmp_path), bf16=False, fp16=False, use_cpu=True, activation_checkpointing=False)
        record = precision_record(config)
        assert config.mixed_precision == "no" and not record["bf16"] and not record["fp16"]


def test_fp16_on_a_cpu_is_refused_when_the_params_are_read(tmp_path):
    # accelerate turns fp16 autocast on only off the CPU (Accelerator.native_amp), so dpo.fp16: true on a CPU trained in
    # fp32 while the manifest's precision said fp16. The premise, against the installed accelerate, in a process of its
    # own (an Accelerator sets process-wide state):
    import subprocess
    import sys

    from dpo_kit.hardware import HardwareChoice
    from dpo_kit.run.runner import resolve_run
    from dpo_kit.training.train import dpo_config_kwargs

    probe = ("import torch\nfrom accelerate import Accelerator\na = Accelerator(mixed_precision='fp16', cpu=True)\n"
             "with a.autocast():\n    out = torch.nn.Linear(4, 4)(torch.randn(2, 4))\n"
             "print(a.mixed_precision, a.native_amp, out.dtype)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-3:] == ["fp16", "False", "torch.float32"], done.stdout + done.stderr
    cpu = HardwareChoice("cpu", "x86_64", 2, False, False, False, False, "float32", "test")
    fp16 = load_params(REPO / "params/tiny.yaml", ["dpo.fp16=true"])
    with pytest.raises(ParamsError, match="dpo.fp16: true on a machine without a GPU would have no effect.*dpo.bf16"):
        dpo_config_kwargs(fp16, tmp_path, cpu)
    assert dpo_config_kwargs(fp16, tmp_path, a_gpu(False))["fp16"] is True  # a GPU applies it
    assert dpo_config_kwargs(load_params(REPO / "params/tiny.yaml", ["dpo.bf16=true"]), tmp_path, cpu)["bf16"] is True
    import torch

    if not torch.cuda.is_available():  # the start of `dpo-kit run`, before any stage; not when train is not run
        with pytest.raises(ParamsError, match="dpo.fp16: true on a machine without a GPU"):
            resolve_run(REPO / "params/tiny.yaml", ["dpo.fp16=true"], REPO)
        assert resolve_run(REPO / "params/tiny.yaml", ["dpo.fp16=true"], REPO, ["generate"])["params"]["dpo"]["fp16"]
        from dpo_kit.run.cli import main

        assert main(["validate", str(REPO / "params/tiny.yaml"), "--set", "dpo.fp16=true"]) == 1


def trainer_on_four_pairs(params, tmp_path):
    """The train stage's DPOTrainer for params, on four bundled pairs; built, not trained."""
    from datasets import Dataset

    from dpo_kit.bundled import bundled_preference_rows
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.models.loading import load_tokenizer, model_source
    from dpo_kit.training.train import build_dpo_config, build_trainer

    hardware, source = choose_hardware(), model_source(params, REPO)
    return build_trainer(params, source, hardware, build_dpo_config(params, tmp_path, hardware),
                         load_tokenizer(source, params), Dataset.from_list(bundled_preference_rows()[:4]))  # fmt: skip


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_every_params_file_builds_trls_trainer(path, tiny_model_dir, tmp_path):
    """TRL checks the model, its LoRA and the DPOConfig together only when DPOTrainer is built, after the data
    stage; the article recipes need a GPU and a network, so nothing else would build theirs before a user does.
    The tiny model stands in for the recipe's (the module names of the Llama/Qwen/Mistral families), with the
    recipe's LoRA, quantization and dpo section: a setting TRL refuses fails here, not on a rented GPU."""
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {**raw["model"], "name_or_path": str(tiny_model_dir), "build_tiny_model": False}
    params = parse_params(raw, source=str(path))
    trainer = trainer_on_four_pairs(params, tmp_path)
    adapted = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert adapted, f"{path.name}: no trainable parameters"
    if params.lora.enabled:
        assert all("lora_" in name for name in adapted), adapted[:5]
        if isinstance(params.lora.target_modules, list):
            assert {name.split(".")[-4] for name in adapted} == set(params.lora.target_modules)


def test_lora_on_the_output_layer_is_refused_before_the_run():
    raw = raw_tiny()
    raw["lora"]["target_modules"] = ["q_proj", "lm_head"]
    message = error_for(raw)
    assert "lora.target_modules" in message and "lm_head" in message and "lora.enabled: false" in message
    raw["lora"]["target_modules"] = ["query_key_value", "embed_out"]  # GPT-NeoX / Pythia, the DPO paper's models
    assert "'embed_out', the output layer" in error_for(raw)
    raw["lora"]["enabled"] = False  # full fine-tuning trains the output layer itself; target_modules is unused
    parse_params(raw, source="x.yaml")


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # peft, on the tied lm_head
def test_trl_refuses_lora_on_the_output_layer(tiny_model_dir, tmp_path):
    """The premise of the refusal above: when TRL lets an adapter on lm_head train, the kit should too."""
    params = load_params(REPO / "params/tiny.yaml", [f"model.name_or_path={tiny_model_dir}", "model.build_tiny_model=false"])
    # model_copy does not validate: the params the kit would refuse, to see what TRL itself does with them.
    params = params.model_copy(update={"lora": params.lora.model_copy(update={"target_modules": ["q_proj", "lm_head"]})})
    with pytest.raises(ValueError, match="lm_head"):
        trainer_on_four_pairs(params, tmp_path)


# Every number of the articles' recipes (/work/shared/notes/trl-dpo-facts.md, seeds 000, 001 and 004), by the
# params key or built DPOConfig field that carries it, so a recipe that drifts from its article fails here.
ARTICLE_NUMBERS = {
    "stablelm-2-1_6b-hh-rlhf-lora-8bit": {  # 000
        "model.name_or_path": "stabilityai/stablelm-2-1_6b", "data.source": "Anthropic/hh-rlhf", "data.format": "hh-rlhf",
        "data.split": "train", "data.config": None, "data.data_dir": None,  # the whole train split, every subset
        "data.eval_split": "test[:1000]", "data.eval_fraction": 0.0,  # held out: its test_dataset
        "quantization.bits": 8, "lora.r": 64, "lora.alpha": 16, "lora.dropout": 0.0, "lora.enabled": True,
        "learning_rate": 1e-5, "lr_scheduler_type": "constant", "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "max_steps": 64, "beta": 0.1, "max_length": 512, "loss_type": ["sigmoid"],
    },
    "phi-2-truthy-dpo-full": {  # 001
        "model.name_or_path": "microsoft/phi-2", "data.source": "jondurbin/truthy-dpo-v0.1", "data.format": "truthy",
        "data.split": "train", "data.config": None, "data.data_dir": None, "data.eval_split": None,
        "lora.enabled": False, "learning_rate": 1e-6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "num_train_epochs": 1, "max_steps": -1, "beta": 0.1, "max_length": 1024, "tracking.report_to": ["wandb"],
    },
    "openhermes-2.5-mistral-7b-orca-dpo-qlora-4bit": {  # 004
        "model.name_or_path": "teknium/OpenHermes-2.5-Mistral-7B", "data.source": "Intel/orca_dpo_pairs",
        "data.split": "train", "data.config": None, "data.data_dir": None, "data.eval_split": None,
        "data.format": "orca", "quantization.bits": 4, "lora.r": 16, "lora.alpha": 16, "lora.dropout": 0.05,
        "learning_rate": 5e-5, "lr_scheduler_type": "cosine", "warmup_steps": 100, "max_steps": 200,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "optim": "paged_adamw_32bit",
        "beta": 0.1, "max_length": 1536, "merge.dtype": "float16", "generate.temperature": 0.7, "generate.top_p": 0.9,
        "tracking.report_to": ["wandb"],
    },
}
ARTICLE_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The article's prompt limit, which TRL 1.x removed: the recipe must say what the kit does instead.
ARTICLE_PROMPT_LIMITS = {"stablelm-2-1_6b-hh-rlhf-lora-8bit": 128, "phi-2-truthy-dpo-full": 512,
                         "openhermes-2.5-mistral-7b-orca-dpo-qlora-4bit": 1024}  # fmt: skip


@pytest.mark.parametrize("name", ARTICLE_NUMBERS)
def test_article_recipes_keep_their_articles_numbers(name, tmp_path):
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.training.train import build_dpo_config

    path = REPO / f"params/{name}.yaml"
    params = load_params(path)
    config = build_dpo_config(params, tmp_path, choose_hardware())
    for key, expected in ARTICLE_NUMBERS[name].items():
        if "." in key:
            section, field = key.split(".")
            found = getattr(getattr(params, section), field)
        else:
            found = getattr(config, key)
            found = getattr(found, "value", found)  # enums: lr_scheduler_type, optim
        assert found == expected, f"{path.name}: {key} is {found!r}, the article's is {expected!r}"
    text = path.read_text()
    if params.lora.enabled:  # the article's projections; its lm_head (000) is refused by TRL 1.x, and the file says so
        assert params.lora.target_modules == ARTICLE_PROJECTIONS
        assert ("lm_head" in text) == (name.startswith("stablelm"))
    limit = ARTICLE_PROMPT_LIMITS[name]
    assert f"max_prompt_length {limit}" in text and "too_long" in text, f"{path.name} must say how it honours the prompt limit"


def test_data_eval_split_and_eval_fraction_are_one_choice_of_the_held_out_pairs(tmp_path):
    """data.eval_split holds out a split of the hub dataset; eval_fraction, which would hold out a share of data.split's
    pairs as well, is refused beside it naming both keys, and left out it is 0, which params.yaml records and reads back."""
    hh = REPO / "params/stablelm-2-1_6b-hh-rlhf-lora-8bit.yaml"
    base = {"run": {"name": "t"}, "model": {"name_or_path": "unused"}, "data": {"source": "org/prefs", "eval_split": "test"},
            "evaluate": {"judge": "unused/reward-model"}}
    params = parse_params(base)
    assert (params.data.eval_split, params.data.eval_fraction) == ("test", 0.0)
    saved = save_params(params, tmp_path / "params.yaml")
    assert load_params(saved).data == params.data, "params.yaml reads back as the same params"
    both = error_for({**base, "data": {**base["data"], "eval_fraction": 0.1}})
    assert "data.eval_split 'test' and data.eval_fraction 0.1 both choose the held-out pairs" in both
    assert "remove data.eval_fraction (or set it to 0) to hold out the split, or remove data.eval_split" in both
    with pytest.raises(ParamsError, match="data.eval_split 'test' and data.eval_fraction 0.05 both choose"):
        load_params(hh, ["data.eval_split=test", "data.eval_fraction=0.05"])
    assert load_params(hh, ["data.eval_split=null", "data.eval_fraction=0.05"]).data.eval_fraction == 0.05
    same = error_for({**base, "data": {**base["data"], "eval_split": "train"}})
    assert "data.eval_split 'train' is data.split as well, so the held-out pairs would be the pairs trained on" in same
    nothing = error_for({**base, "data": {"source": "org/prefs", "eval_fraction": 0}})
    assert "data.eval_fraction 0 holds out no pair" in nothing and "as data.eval_split" in nothing
    assert parse_params({**base, "data": {**base["data"], "eval_fraction": 0}}).data.eval_fraction == 0.0


@pytest.mark.parametrize("key", ["split", "eval_split"])
def test_a_split_or_slice_datasets_cannot_read_is_refused_when_params_are_read_naming_the_key(key):
    """'test[:abc]' passed validate and failed only when the format stage loaded the dataset, after the tokenizer, as
    "data.source: cannot load ...: Unrecognized instruction format", naming neither data.split nor data.eval_split."""
    base = {"run": {"name": "t"}, "model": {"name_or_path": "unused"}, "evaluate": {"judge": "unused/reward-model"}}
    other = {"split": "train"} if key == "eval_split" else {}
    message = error_for({**base, "data": {"source": "org/prefs", **other, key: "test[:abc]"}})
    assert f"x.yaml: data.{key} 'test[:abc]': it is no split or slice of one that datasets can read" in message
    assert "such as 'test[:1000]'" in message
    with pytest.raises(ParamsError, match=f"data.{key} 'train\\+test\\[:2': its part 'test\\[:2' is no split"):
        load_params(REPO / "params/stablelm-2-1_6b-hh-rlhf-lora-8bit.yaml", [f"data.{key}=train+test[:2"])
    # no other source reads a split: data.split is not checked there (data.eval_split is refused there anyway)
    assert parse_params({**base, "data": {"source": "bundled", "split": "test[:abc]"}}).data.split == "test[:abc]"


SPLIT_SPECS = ["train", "test[:1000]", "test[1000:]", "test[-5:]", "test[1_000:2_000]", "test[:10%]", "test[10%:20%](pct1_dropremainder)",
               "train+test[:5]", "train + test", "validation.clean", "test[:abc]", "test[:2", "test[0:1:2]", "test[]", "test [:5]",
               "my-split", "", "train+", " train", "test[:5%%]"]  # fmt: skip


@pytest.mark.parametrize("spec", SPLIT_SPECS)
def test_the_split_syntax_refused_is_what_datasets_refuses(spec):
    from datasets import ReadInstruction

    from dpo_kit.params import split_syntax_problem

    try:
        ReadInstruction.from_spec(spec)
        refused = False
    except ValueError as error:
        refused = "Unrecognized instruction format" in str(error)
    assert (split_syntax_problem(spec) is not None) == refused


def raw_tiny() -> dict:
    return yaml.safe_load((REPO / "params/tiny.yaml").read_text())


def error_for(raw: dict) -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(raw, source="x.yaml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "replacement"),
    [("max_prompt_length", 128, "dpo.max_length"), ("max_completion_length", 128, "dpo.max_length"),
     ("max_target_length", 128, "dpo.max_length"), ("rpo_alpha", 0.5, "loss_weights"),
     ("generate_during_eval", True, "generate stage")],
)
def test_a_dpo_key_trl_removed_says_what_replaced_it_not_a_lookalike(key, value, replacement):
    # The articles set max_prompt_length (000: 128, 001: 512, 004: 1024); it was refused with "did you mean
    # 'dpo.max_length'?", a different limit, and rpo_alpha with "did you mean 'dpo.ld_alpha'?", an unrelated loss.
    from trl import DPOConfig

    assert key not in {f.name for f in dataclasses.fields(DPOConfig)}, f"TRL has dpo.{key} again: accept it"
    raw = raw_tiny()
    raw["dpo"][key] = value
    message = error_for(raw)
    assert f"dpo.{key} was removed from TRL" in message and replacement in message, message
    assert "did you mean" not in message, message


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    raw = raw_tiny()
    raw["lora"]["alpah"] = 8
    message = error_for(raw)
    assert "lora.alpah" in message and "did you mean 'lora.alpha'" in message


def test_unknown_key_in_a_nested_section_is_matched_against_that_section():
    # data.generate.judgee suggested 'data.generate' and listed the keys of data, not of data.generate.
    raw = raw_tiny()
    raw["data"].update(source="generate", generate={"judgee": "sentiment"})
    message = error_for(raw)
    assert "unknown key 'data.generate.judgee'; did you mean 'data.generate.judge'?" in message
    assert "sentiment_min_words" in message and "eval_fraction" not in message
    raw = raw_tiny()
    raw["data"].update(format="columns", columns={"prompt": "p", "chosen": "c", "rejected": "r", "sytem": "s"})
    message = error_for(raw)
    assert "did you mean 'data.columns.system'?" in message and "(valid keys: prompt, chosen, rejected, system)" in message


def test_unknown_section_is_named():
    raw = raw_tiny()
    raw["trainig"] = {}
    assert "'trainig'" in error_for(raw)


def test_unknown_dpo_key_is_checked_against_trl():
    raw = raw_tiny()
    raw["dpo"]["bta"] = 0.2
    message = error_for(raw)
    assert "dpo.bta" in message and "dpo.beta" in message and "DPOConfig" in message


def test_wrong_type_names_the_key_and_the_expected_type():
    raw = raw_tiny()
    raw["dpo"]["beta"] = "high"
    message = error_for(raw)
    assert "dpo.beta" in message and "float" in message
    raw = raw_tiny()
    raw["run"]["seed"] = "abc"
    message = error_for(raw)
    assert "run.seed" in message and "integer" in message


def test_keys_owned_by_other_sections_and_secrets_are_refused():
    raw = raw_tiny()
    raw["dpo"]["hub_token"] = "hf_secret"
    assert "HF_TOKEN" in error_for(raw)
    raw = raw_tiny()
    raw["dpo"]["output_dir"] = "/tmp/x"
    assert "run.output_dir" in error_for(raw)


@pytest.mark.parametrize(
    ("key", "value", "owner"),
    [("project", "my-project", "tracking.project"), ("trust_remote_code", True, "model.trust_remote_code"),
     ("model_init_kwargs", {"attn_implementation": "eager"}, "model.attn_implementation"),
     ("resume_from_checkpoint", "runs/x/checkpoints/checkpoint-20", "--resume")],
)
def test_dpo_keys_the_kit_would_replace_or_never_read_are_refused(key, value, owner, tmp_path):
    # dpo.project was replaced by tracking.project after params.dpo; TRL reads trust_remote_code and
    # model_init_kwargs only when it loads a model by name (the kit hands it loaded ones); the train stage passes its
    # own checkpoint to trainer.train(). Each was accepted and had no effect.
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.training.train import dpo_config_kwargs

    assert dpo_config_kwargs(load_params(REPO / "params/tiny.yaml"), tmp_path, choose_hardware())["project"] == "dpo-kit"
    raw = raw_tiny()
    raw["dpo"][key] = value
    assert f"dpo.{key} is set by the kit from" in (message := error_for(raw)) and owner in message


def test_cross_section_check_runs_at_construction():
    raw = raw_tiny()
    raw["quantization"] = {"bits": 4}
    raw["lora"]["enabled"] = False
    assert "quantization.bits needs lora.enabled" in error_for(raw)


def test_missing_params_file_names_the_path(tmp_path):
    with pytest.raises(ParamsError, match="not found: .*nope.yaml"):
        load_params(tmp_path / "nope.yaml")
    # A folder, or a binary file named by mistake, is said to be one (a binary file ended in UnicodeDecodeError).
    with pytest.raises(ParamsError, match=f"{tmp_path} is a folder; name a params file in it"):
        load_params(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"GGUF\xb4\x00\xff")
    with pytest.raises(ParamsError, match=r"model.gguf: not a params file \(not UTF-8 text: byte 4\)"):
        load_params(tmp_path / "model.gguf")


def test_missing_data_file_names_the_path(tmp_path):
    from dpo_kit.params import check_local_files

    params = load_params(REPO / "params/tiny.yaml", ["data.source=./missing/pairs.jsonl"])
    with pytest.raises(ParamsError, match="data.source: file not found: .*missing/pairs.jsonl"):
        check_local_files(params, tmp_path)
    (tmp_path / "missing" / "pairs.jsonl").mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(ParamsError, match="data.source: .*missing/pairs.jsonl is a folder; name one file in it"):
        check_local_files(params, tmp_path)


def test_a_missing_data_file_says_where_it_was_looked_for_and_what_the_key_takes(tmp_path, monkeypatch):
    from dpo_kit.params import check_local_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prefs.jsonl").write_text("{}\n")
    params = load_params(REPO / "params/tiny.yaml", ["data.source=data/pref.jsonl"])
    with pytest.raises(ParamsError) as refused:
        check_local_files(params, ".")
    message = str(refused.value)
    assert f"data.source: file not found: data/pref.jsonl ({tmp_path / 'data' / 'pref.jsonl'})" in message
    assert "did you mean 'prefs.jsonl' in data?" in message
    assert "data.source takes 'bundled', 'generate', a local .jsonl, .json, .parquet or .csv file, or a hub" in message
    params = load_params(REPO / "params/smollm2-135m-sentiment.yaml", ["data.generate.prompts=prompts.csv"])
    with pytest.raises(ParamsError, match="data.generate.prompts takes 'movie-reviews', 'movie-review-openings'"):
        check_local_files(params, ".")


def test_an_override_without_its_section_names_the_sections_that_hold_the_key():
    with pytest.raises(ParamsError, match=r"'beta' is a key of dpo: dpo.beta=...$"):
        load_params(REPO / "params/tiny.yaml", ["beta=0.1"])
    # run.seed only: DPOConfig has a seed too, but the kit sets it from run.seed and refuses dpo.seed
    with pytest.raises(ParamsError, match=r"'seed' is a key of run: run.seed=...$"):
        load_params(REPO / "params/tiny.yaml", ["seed=3"])
    with pytest.raises(ParamsError, match=r"^override 'nonsense=1': expected section.key=value, e.g. dpo.beta=0.2$"):
        load_params(REPO / "params/tiny.yaml", ["nonsense=1"])


def test_a_params_file_yaml_cannot_read_is_named_at_the_line_not_as_a_unicode_string(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("dpo:\n  beta 0.1\n  loss_type: sigmoid\n")  # the colon after beta left out
    with pytest.raises(ParamsError) as refused:
        load_params(broken)
    assert f'in "{broken}", line 3, column 12' in str(refused.value)
    assert "<unicode string>" not in str(refused.value)


def test_a_missing_params_file_names_the_close_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").mkdir()
    for name in ("tiny.yaml", "smollm2-135m-sentiment.yaml"):
        (tmp_path / "params" / name).write_text((REPO / "params" / name).read_text())
    with pytest.raises(ParamsError, match=r"^params file not found: params/tiny.yml; did you mean params/tiny.yaml\?$"):
        load_params("params/tiny.yml")
    with pytest.raises(ParamsError, match=r"^params file not found: tiny.yaml; did you mean params/tiny.yaml\?$"):
        load_params("tiny.yaml")  # typed from the project root, without params/
    with pytest.raises(ParamsError, match=r"did you mean params/smollm2-135m-sentiment.yaml\?$"):
        load_params("params/smollm2-sentiment.yaml")
    with pytest.raises(ParamsError, match=r"^params file not found: params/other.yaml$"):
        load_params("params/other.yaml")  # nothing close: no guess


def test_a_refused_key_from_an_override_is_said_to_come_from_it_not_the_file(tmp_path):
    with pytest.raises(ParamsError) as refused:
        load_params(REPO / "params/tiny.yaml", ["dpo.betta=0.1"])
    assert str(refused.value) == (f"{REPO / 'params/tiny.yaml'}, in an override: unknown key 'dpo.betta', not a field"
                                  " of trl.DPOConfig; did you mean 'dpo.beta'?")
    with pytest.raises(ParamsError, match=r"tiny.yaml, override dpo.beta: expected a number"):
        load_params(REPO / "params/tiny.yaml", ["dpo.beta=true"])
    typo = tmp_path / "typo.yaml"
    typo.write_text((REPO / "params/tiny.yaml").read_text().replace("  beta: 0.1", "  betta: 0.1"))
    with pytest.raises(ParamsError) as refused:  # the key is the file's, though another one is overridden
        load_params(typo, ["dpo.beta=0.2"])
    assert str(refused.value).startswith(f"{typo}: unknown key 'dpo.betta'")


def test_overrides_set_any_key_with_yaml_typed_values():
    params = load_params(REPO / "params/tiny.yaml", ["dpo.beta=0.25", "lora.enabled=false", "tracking.report_to=[wandb]",
                                                     "dpo.loss_type=ipo", "data.columns=null"])
    assert params.dpo["beta"] == 0.25 and params.lora.enabled is False
    assert params.tracking.report_to == ["wandb"] and params.dpo["loss_type"] == ["ipo"]
    with pytest.raises(ParamsError, match="expected section.key=value"):
        load_params(REPO / "params/tiny.yaml", ["beta0.3"])


def test_resolved_params_round_trip(tmp_path):
    params = load_params(REPO / "params/tiny.yaml", ["dpo.beta=0.3"])
    saved = save_params(params, tmp_path / "params.yaml")
    assert load_params(saved) == params


def test_secrets_in_params_are_refused_naming_the_key(monkeypatch):
    raw = raw_tiny()
    raw["merge"]["hub_model_id"] = "hf_" + "a" * 34
    message = error_for(raw)
    assert "merge.hub_model_id holds a secret" in message and "HF_TOKEN" in message
    monkeypatch.setenv("WANDB_API_KEY", "my-wandb-key-from-env")
    raw = raw_tiny()
    raw["tracking"]["project"] = "my-wandb-key-from-env"
    assert "tracking.project holds a secret" in error_for(raw)
    # Inside a longer value too: the runner would find it in params.yaml and the manifest, after the stage ran.
    raw["tracking"]["project"] = "proj-my-wandb-key-from-env"
    assert "tracking.project holds a secret" in error_for(raw)
    raw = raw_tiny()
    raw["merge"]["hub_model_id"] = "me/model-hf_" + "a" * 34
    assert "merge.hub_model_id holds a secret" in error_for(raw)


@pytest.mark.parametrize(("section", "key"), [("tracking", "wandb_api_key"), ("model", "token"), ("dpo", "wandb_api_key"),
                                            (None, "hf_token")])
def test_a_key_named_like_a_secret_is_refused_saying_where_secrets_go(section, key):
    # A key that is not a secret's value here (a W&B key whose value is in no environment variable) was refused as
    # an unknown key only, `model.token` with "did you mean 'model.dtype'?": the message now says where it goes.
    raw = raw_tiny()
    (raw.setdefault(section, {}) if section else raw)[key] = "0123456789abcdef0123456789abcdef01234567"
    message = error_for(raw)
    assert f"unknown key '{section + '.' if section else ''}{key}'" in message
    assert "secrets never go in params" in message and "WANDB_API_KEY in the environment" in message
    assert "did you mean" not in message


def test_a_misspelled_key_that_only_ends_in_token_still_gets_the_closest_key():
    raw = raw_tiny()
    raw["generate"]["max_new_token"] = 32
    assert "did you mean 'generate.max_new_tokens'?" in (message := error_for(raw))
    assert "secrets never go" not in message


def test_the_password_of_a_url_in_params_is_refused_naming_the_key_not_quoting_it():
    # Accepted before: the format stage wrote it into params.yaml, the manifest and its notebook, and the runner's scan
    # (which looks for the environment's values) did not see it. The error message names the key and shows ***.
    raw = raw_tiny()
    raw["model"]["name_or_path"] = "https://user:s3cretpassw0rd@example.com/model"
    message = error_for(raw)
    assert "model.name_or_path holds a secret" in message and "s3cretpassw0rd" not in message
    raw = raw_tiny()
    raw["data"]["source"] = "https://me:s3cretpassw0rd@example.com/pairs.jsonl"
    assert "data.source holds a secret" in error_for(raw)
    raw = raw_tiny()
    raw["model"]["name_or_path"] = "https://example.com/model"  # a URL without credentials is not a secret
    assert parse_params(raw).model.name_or_path == "https://example.com/model"


def test_a_refusal_never_quotes_the_secret_it_refuses(tmp_path, monkeypatch):
    """The message reaches the terminal, logs and a notebook's saved outputs: a secret in an override that is not
    valid YAML, or on the line of a params file that YAML cannot read, is shown as ***."""
    monkeypatch.setenv("HF_TOKEN", "hf_FAKESECRET123456789")
    with pytest.raises(ParamsError, match=r"model.revision is not valid YAML") as refused:
        load_params(REPO / "params/tiny.yaml", ["model.revision=[hf_FAKESECRET123456789"])
    assert "hf_FAKESECRET123456789" not in str(refused.value) and "[***" in str(refused.value)
    pasted = tmp_path / "pasted.yaml"
    token = "hf_" + "b" * 34  # a token shaped like a Hugging Face one, in no environment variable
    tiny = (REPO / "params/tiny.yaml").read_text()
    pasted.write_text(tiny + f"  token: {token}: pasted\n")
    with pytest.raises(ParamsError, match="not valid YAML: mapping values are not allowed here") as refused:
        load_params(pasted)
    # YAML would quote the line cut to its width (the token's last 32 characters), out of reach of ***.
    assert "b" * 16 not in str(refused.value)
    assert f"line {len(tiny.splitlines()) + 1}, column" in str(refused.value)


def test_rule_judge_is_only_for_the_bundled_task_and_commit_revisions_are_not_secrets():
    raw = raw_tiny()
    raw["data"]["source"] = "Intel/orca_dpo_pairs"
    assert "evaluate.judge 'rule' only scores the bundled task" in error_for(raw)
    raw = raw_tiny()
    raw["model"]["revision"] = "0123456789abcdef0123456789abcdef01234567"
    assert parse_params(raw).model.revision.startswith("0123")


def test_a_misspelt_bundled_source_is_named_not_only_the_rule_judge():
    raw = raw_tiny()
    raw["data"]["source"] = "bundeld"
    error = error_for(raw)
    assert "data.source 'bundeld' is read as a hub dataset id (did you mean 'bundled'?)" in error
    assert "data.source takes 'bundled', 'generate', a local .jsonl" in error


def test_a_run_that_would_log_no_step_is_refused_with_the_limit():
    tiny = REPO / "params" / "tiny.yaml"  # logging_steps 5
    with pytest.raises(ParamsError, match="dpo.logging_steps 5 > dpo.max_steps 4.*at most 4"):
        load_params(tiny, ["dpo.max_steps=4"])
    assert load_params(tiny, ["dpo.max_steps=5"]).dpo["max_steps"] == 5
    assert load_params(tiny, ["dpo.max_steps=4", "dpo.logging_steps=0.5"]).dpo["logging_steps"] == 0.5  # a share


def test_lora_dropout_that_trl_would_zero_is_refused_unless_disable_dropout_is_explicit(tmp_path):
    tiny = REPO / "params" / "tiny.yaml"  # lora.dropout 0
    with pytest.raises(ParamsError, match="lora.dropout 0.1 would have no effect.*dpo.disable_dropout: false"):
        load_params(tiny, ["lora.dropout=0.1"])
    assert load_params(tiny, ["lora.dropout=0.1", "dpo.disable_dropout=false"]).dpo["disable_dropout"] is False
    assert load_params(tiny, ["lora.dropout=0.1", "dpo.disable_dropout=true"]).lora.dropout == 0.1
    assert load_params(tiny, ["lora.dropout=0.1", "lora.enabled=false"]).lora.enabled is False  # no LoRA path


def test_trl_zeroes_lora_dropout_unless_disable_dropout_is_false(tmp_path, tiny_model_dir):
    """The premise of the check above, against the installed TRL: its DPOTrainer sets LoRA's dropout to 0 unless
    dpo.disable_dropout is false."""
    from datasets import Dataset
    from trl import DPOTrainer

    from dpo_kit.hardware import choose_hardware
    from dpo_kit.models.loading import deprecated_checkpointing_alias_quiet, load_causal_lm, load_tokenizer, lora_config
    from dpo_kit.training.train import build_dpo_config

    pairs = Dataset.from_list([{"prompt": "Hello", "chosen": " thanks", "rejected": " go away"}])
    for disable, expected in ((True, 0.0), (False, 0.1)):
        params = load_params(REPO / "params" / "tiny.yaml", [f"model.name_or_path={tiny_model_dir}", "lora.dropout=0.1",
                                                             f"dpo.disable_dropout={str(disable).lower()}"])  # fmt: skip
        with deprecated_checkpointing_alias_quiet():  # peft reads transformers' deprecated alias, as in the kit
            trainer = DPOTrainer(model=load_causal_lm(str(tiny_model_dir), params),
                                 args=build_dpo_config(params, tmp_path, choose_hardware()), train_dataset=pairs,
                                 processing_class=load_tokenizer(str(tiny_model_dir), params),
                                 peft_config=lora_config(params))  # fmt: skip
        rates = {m.p for name, m in trainer.model.named_modules() if name.endswith("lora_dropout.default")}
        assert rates == {expected}, (disable, rates)


def test_label_smoothing_that_the_loss_ignores_is_refused():
    tiny = REPO / "params" / "tiny.yaml"  # loss_type sigmoid
    with pytest.raises(ParamsError, match=r"dpo.label_smoothing 0.1 would have no effect with dpo.loss_type \['sigmoid'\]"
                       r".*aot, aot_unpaired, exo_pair, robust"):  # fmt: skip
        load_params(tiny, ["dpo.label_smoothing=0.1"])
    assert load_params(tiny, ["dpo.label_smoothing=0.1", "dpo.loss_type=robust"]).dpo["label_smoothing"] == 0.1
    assert load_params(tiny, ["dpo.label_smoothing=0.1", "dpo.loss_type=[sigmoid,aot]"]).dpo["loss_type"] == ["sigmoid", "aot"]


def test_a_beta_not_above_zero_is_refused_where_trl_takes_it():
    """TRL's DPOConfig takes any float for beta: at 0 the loss stays at ln 2 without a gradient (trl#1627), and a
    negative beta trains towards the rejected responses; the kit refuses both when the params are read."""
    tiny = REPO / "params" / "tiny.yaml"
    for beta in ("0", "-0.1"):
        with pytest.raises(ParamsError, match=rf"dpo.beta {beta} must be above 0: at 0 the DPO loss stays at ln 2"):
            load_params(tiny, [f"dpo.beta={beta}"])
    assert load_params(tiny, ["dpo.beta=0.05"]).dpo["beta"] == 0.05


REFUSED_LOSS_SETTINGS = {  # dpo section -> what the kit says, and what TRL's DPOTrainer says when it is built
    "exo_pair without label smoothing": ({"loss_type": ["exo_pair"]}, r"dpo.loss_type exo_pair needs dpo.label_smoothing above 0",
                                         r"Label smoothing must be greater than 0.0 when using 'exo_pair'"),
    "f-divergence with apo_zero": ({"loss_type": ["apo_zero"], "f_divergence_type": "js_divergence"},
                                   r"dpo.f_divergence_type js_divergence works only with dpo.loss_type among",
                                   r"f_divergence_type='js_divergence'` is only supported"),
    "WPO weighting with aot": ({"loss_type": ["aot"], "use_weighting": True},
                               r"dpo.use_weighting \(WPO\) does not work with dpo.loss_type aot",
                               r"WPO-style weighting is not implemented"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED_LOSS_SETTINGS)
def test_loss_settings_that_trls_trainer_refuses_are_refused_when_params_are_read(case):
    dpo, message, _ = REFUSED_LOSS_SETTINGS[case]
    raw = raw_tiny()
    raw["dpo"] = {**raw.get("dpo", {}), **dpo}
    assert re.search(message, error_for(raw)), error_for(raw)


def test_loss_settings_next_to_the_refused_ones_are_accepted():
    tiny = REPO / "params" / "tiny.yaml"
    assert load_params(tiny, ["dpo.loss_type=exo_pair", "dpo.label_smoothing=0.001"]).dpo["loss_type"] == ["exo_pair"]
    assert load_params(tiny, ["dpo.f_divergence_type=js_divergence"]).dpo["f_divergence_type"] == "js_divergence"
    assert load_params(tiny, ["dpo.loss_type=[sigmoid,sft]", "dpo.f_divergence_type=forward_kl"]).dpo["loss_type"] == ["sigmoid", "sft"]
    assert load_params(tiny, ["dpo.use_weighting=true"]).dpo["use_weighting"] is True


@pytest.mark.parametrize("case", REFUSED_LOSS_SETTINGS)
def test_trls_trainer_refuses_the_loss_settings_the_kit_refuses(case, tiny_model_dir, tmp_path):
    """The premise of the checks above: the installed TRL refuses each of them when DPOTrainer is built."""
    dpo, _, trls_message = REFUSED_LOSS_SETTINGS[case]
    params = load_params(REPO / "params/tiny.yaml", [f"model.name_or_path={tiny_model_dir}", "model.build_tiny_model=false"])
    params = params.model_copy(update={"dpo": {**params.dpo, **dpo}})  # not validated: what TRL itself does
    with pytest.raises((ValueError, NotImplementedError), match=trls_message):
        trainer_on_four_pairs(params, tmp_path)


def test_a_misspelled_loss_or_divergence_is_refused_with_the_closest_valid_name():
    tiny = REPO / "params" / "tiny.yaml"
    with pytest.raises(ParamsError, match=r"dpo.loss_type: unknown value 'sigmoidd'; did you mean 'sigmoid'\?.*apo_zero"):
        load_params(tiny, ["dpo.loss_type=[sigmoidd,sft]"])
    with pytest.raises(ParamsError, match=r"dpo.f_divergence_type: unknown value 'js'.*js_divergence, reverse_kl"):
        load_params(tiny, ["dpo.f_divergence_type=js"])


def test_the_loss_and_divergence_names_are_the_ones_trls_trainer_dispatches_on():
    """The premise of the check above, against the installed TRL's source: it compares these names in its loss."""
    import inspect

    from trl import DPOTrainer

    from dpo_kit.params import DPO_LOSS_TYPES, F_DIVERGENCE_TYPES

    source = inspect.getsource(DPOTrainer)
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == DPO_LOSS_TYPES
    assert set(re.findall(r'f_divergence_type == "(\w+)"', source)) == F_DIVERGENCE_TYPES


def test_trl_reads_label_smoothing_only_in_the_losses_the_check_names():
    """The premise of the check above, against the installed TRL's loss code."""
    import inspect
    import re

    from trl import DPOTrainer

    from dpo_kit.params import LABEL_SMOOTHING_LOSSES

    source = inspect.getsource(DPOTrainer)
    branches = re.split(r'\n\s+(?:el)?if loss_type == "', source)[1:]
    reading = {branch.split('"', 1)[0] for branch in branches if "self.label_smoothing" in branch.split("\n            elif")[0]}
    assert reading == LABEL_SMOOTHING_LOSSES


def test_best_of_n_without_sampling_is_refused():
    with pytest.raises(ParamsError, match="generate.best_of_n 4 needs generate.do_sample: true"):
        load_params(REPO / "params/tiny.yaml", ["generate.best_of_n=4", "generate.do_sample=false"])
    assert load_params(REPO / "params/tiny.yaml", ["generate.best_of_n=4"]).generate.best_of_n == 4


def test_a_misspelled_judge_is_refused_when_the_params_are_read_not_after_training():
    raw = raw_tiny()
    raw["evaluate"]["judge"] = "rulee"
    message = error_for(raw)
    assert "evaluate.judge 'rulee' is no judge (did you mean 'rule'?)" in message and "'owner/name'" in message
    for reward_model in ("OpenAssistant/reward-model-deberta-v3-large-v2", "./my-reward-model", "/abs/reward-model"):
        raw["evaluate"]["judge"] = reward_model
        assert parse_params(raw).evaluate.judge == reward_model  # a hub id or a path: a reward model
    with pytest.raises(ParamsError, match="evaluate.judge: reward-model directory not found"):
        check_local_files(parse_params({**raw, "evaluate": {"judge": "./my-reward-model"}}))


def test_a_name_of_more_than_two_parts_is_a_path_not_a_hub_id(tmp_path):
    """A hub id is 'name' or 'owner/name'. A round-1 run's merged model named as README names it ('runs/<run>/merged',
    no './') was taken for a hub id when missing, and the stage failed saying the hub could not be reached."""
    raw = raw_tiny()
    raw["model"] = {**raw["model"], "name_or_path": "runs/round-1/merged", "build_tiny_model": False}
    with pytest.raises(ParamsError, match=f"model.name_or_path: directory not found: {tmp_path / 'runs/round-1/merged'}"):
        check_local_files(parse_params(raw), tmp_path)
    raw = raw_tiny()
    raw["evaluate"]["judge"] = "runs/reward/model"  # was refused as 'no judge', a local directory being valid
    with pytest.raises(ParamsError, match="evaluate.judge: reward-model directory not found"):
        check_local_files(parse_params(raw), tmp_path)
    raw["evaluate"]["judge"] = "OpenAssistant/reward-model-deberta-v3-large-v2"
    check_local_files(parse_params(raw), tmp_path)  # two parts: still a hub id


def test_a_reward_model_directory_without_a_config_is_refused(tmp_path):
    raw = raw_tiny()
    raw["evaluate"]["judge"] = str(tmp_path)
    with pytest.raises(ParamsError, match=f"evaluate.judge: {tmp_path} holds no config.json"):
        check_local_files(parse_params(raw))
    (tmp_path / "config.json").write_text("{}")
    check_local_files(parse_params(raw))


def test_data_max_length_above_the_length_trl_trains_with_is_refused():
    raw = raw_tiny()
    raw["data"]["max_length"], raw["dpo"]["max_length"] = 1000, 20
    assert "data.max_length 1000 is above dpo.max_length 20" in error_for(raw)
    raw["data"]["max_length"] = 20
    assert parse_params(raw).max_length == 20


def test_a_model_path_that_holds_no_model_is_refused_naming_it(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    for path, expected in ((weights, "is a file"), (tmp_path, "holds no config.json")):
        params = load_params(REPO / "params/tiny.yaml", [f"model.name_or_path={path}", "model.build_tiny_model=false"])
        with pytest.raises(ParamsError, match=f"model.name_or_path: {path} {expected}"):
            check_local_files(params)
    (tmp_path / "config.json").write_text("{}")
    check_local_files(load_params(REPO / "params/tiny.yaml", [f"model.name_or_path={tmp_path}",
                                                              "model.build_tiny_model=false"]))  # fmt: skip


def test_a_key_given_twice_in_a_params_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text((REPO / "params/tiny.yaml").read_text() + "\ndpo:\n  beta: 0.5\n")  # a second dpo section
    with pytest.raises(ParamsError, match=r"dup.yaml: not valid YAML(.|\n)*key 'dpo' is given twice(.|\n)*line"):
        load_params(path)
    # A mapping as a key (a stray '{' in a chat template, say) is YAML's own error, not a TypeError from the check.
    path.write_text("model:\n  {chat: template}: 1\n")
    with pytest.raises(ParamsError, match=r"dup.yaml: not valid YAML(.|\n)*found unhashable key"):
        load_params(path)


def test_a_launch_config_or_gguf_file_that_is_not_there_is_refused_before_any_stage(tmp_path):
    with pytest.raises(ParamsError, match=r"launch.config_file: .*zero4 not found; name one shipped .*\(ddp, zero2"):
        check_local_files(load_params(REPO / "params/tiny.yaml", ["launch.config_file=zero4"]))
    check_local_files(load_params(REPO / "params/tiny.yaml", ["launch.config_file=zero2"]))
    with pytest.raises(ParamsError, match=f"model.gguf_file: model.gguf is neither in {tmp_path} nor a file"):
        check_local_files(load_params(REPO / "params/tiny.yaml", [f"model.name_or_path={tmp_path}",
                                                                  "model.build_tiny_model=false",
                                                                  "model.gguf_file=model.gguf"]))  # fmt: skip


def test_a_strategy_of_no_is_text_not_false(tmp_path):
    """TrainingArguments' strategies take "no": YAML 1.1 read `no` as False, and `--set dpo.save_strategy=no` was refused
    as "expected IntervalStrategy | str, got False". Only true and false are booleans (yes/no in a bool field: the test
    below)."""
    params = load_params(REPO / "params/tiny.yaml", ["dpo.save_strategy=no", "dpo.eval_strategy=no", "lora.enabled=true",
                                                     "generate.do_sample=false", "run.name=no"])  # fmt: skip
    assert params.dpo["save_strategy"] == "no" and params.dpo["eval_strategy"] == "no"
    assert params.lora.enabled is True and params.generate.do_sample is False and params.run.name == "no"
    assert load_params(REPO / "params/tiny.yaml", ["lora.enabled=false", "dpo.bf16=true"]).dpo["bf16"] is True
    path = tmp_path / "unquoted.yaml"
    path.write_text((REPO / "params/tiny.yaml").read_text().replace('eval_strategy: "no"', "eval_strategy: no"))
    assert "eval_strategy: no\n" in path.read_text() and load_params(path).dpo["eval_strategy"] == "no"
    # What the run writes reads back the same (the dumper quotes 'no').
    save_params(params, tmp_path / "params.yaml")
    assert load_params(tmp_path / "params.yaml").dpo["save_strategy"] == "no"


@pytest.mark.parametrize("override, expected", [
    ("lora.enabled=1", "override lora.enabled: expected true or false, got 1"),
    ("lora.enabled=0", "override lora.enabled: expected true or false, got 0"),
    ("lora.enabled=yes", "override lora.enabled: expected true or false, got 'yes'"),
    ("generate.do_sample=off", "override generate.do_sample: expected true or false, got 'off'"),
    ("merge.private='true'", "override merge.private: expected true or false, got 'true'"),
    ("data.generate.judge_trust_remote_code=1", "data.generate.judge_trust_remote_code: expected true or false, got 1"),
    ("model.trust_remote_code=", "override model.trust_remote_code: expected true or false, got null"),
    ("dpo.bf16=1", "override dpo.bf16: expected true or false (bool | None, the type of DPOConfig.bf16), got 1"),
    ("dpo.gradient_checkpointing=no", "dpo.gradient_checkpointing: expected true or false (bool, the type of"),
    ("dpo.liger_kernel_config={rope: 1}", "dpo.liger_kernel_config: expected true or false"),
    ("lora.r=2.5", "override lora.r: Input should be a valid integer, got a number with a fractional part (got 2.5)"),
    ("dpo.max_steps=2.5", "override dpo.max_steps: expected int (the type of DPOConfig.max_steps), got 2.5"),
])  # fmt: skip
def test_only_true_and_false_set_a_boolean_and_only_whole_numbers_an_integer(override, expected):
    """pydantic's lax mode read 1, 0, yes, no, on, off and a quoted 'true' as booleans, so `lora.enabled: 0` switched
    LoRA off without a word; a bool key, the kit's or DPOConfig's, now refuses them naming the key and true/false."""
    with pytest.raises(ParamsError, match=re.escape(expected)):
        load_params(REPO / "params/tiny.yaml", [override])


def test_a_boolean_written_1_in_a_file_is_refused_and_true_false_still_read(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text((REPO / "params/tiny.yaml").read_text().replace("lora:\n", "lora:\n  enabled: 1\n"))
    with pytest.raises(ParamsError, match=f"{re.escape(str(path))}: lora.enabled: expected true or false, got 1: only"):
        load_params(path)
    params = load_params(REPO / "params/tiny.yaml", ["lora.enabled=false", "dpo.bf16=null", "data.deduplicate=false",
                                                     "dpo.include_num_input_tokens_seen=all", "dpo.beta=1"])  # fmt: skip
    assert params.lora.enabled is False and params.data.deduplicate is False and params.dpo["bf16"] is None
    assert params.dpo["include_num_input_tokens_seen"] == "all" and params.dpo["beta"] == 1.0
    with pytest.raises(ValidationError, match="lora.enabled|expected true or false"):
        params.lora.enabled = 1  # assignment is checked as loading is (validate_assignment)


def test_every_params_field_has_help_text():
    """As TRL's config dataclasses do: every key a user can set says what it is for, sections included."""
    from pydantic import BaseModel

    from dpo_kit.params import Params

    seen, missing, queue = set(), [], [("", Params)]
    while queue:
        prefix, model = queue.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(prefix + name)
            for hint in typing.get_args(field.annotation) or (field.annotation,):
                if isinstance(hint, type) and issubclass(hint, BaseModel):
                    queue.append((f"{prefix}{name}.", hint))
    assert len(seen) > 10 and not missing, missing


def test_anchors_and_merge_keys_read_as_yaml_means_and_a_key_given_twice_beside_them_is_still_refused(tmp_path):
    """The check for keys given twice constructed `<<` as a key, which has no constructor: every params file with a
    merge key failed with "could not determine a constructor for the tag 'tag:yaml.org,2002:merge'"."""
    path = tmp_path / "merge.yaml"
    head = (
        "run: {name: merge}\n"
        "model: {name_or_path: runs/_tiny-chat-model, build_tiny_model: true}\n"
        "generate: &sampling\n  temperature: 0.7\n  top_p: 0.9\n  max_new_tokens: &tokens 24\n"
        "evaluate: {judge: sentiment}\n"
        "data:\n  source: generate\n  generate:\n    <<: *sampling\n    temperature: 1.0\n    judge: sentiment\n"
    )
    path.write_text(head + "dpo: {max_length: 128, logging_steps: *tokens}\n")
    params = load_params(path)
    # Merged keys are read, the key written beside the merge wins, and a plain alias reads its anchor's value.
    assert (params.data.generate.top_p, params.data.generate.max_new_tokens) == (0.9, 24)
    assert (params.data.generate.temperature, params.generate.temperature) == (1.0, 0.7)
    assert params.dpo["logging_steps"] == 24
    path.write_text(head + "    judge: rule\n")
    with pytest.raises(ParamsError, match=r"merge.yaml: not valid YAML(.|\n)*key 'judge' is given twice"):
        load_params(path)


def test_a_path_written_with_a_tilde_is_in_the_home_directory_as_on_a_command_line(tmp_path, monkeypatch):
    """YAML keeps ~ as text: run.output_dir ~/runs made a folder named '~' in the project, model.name_or_path
    ~/models/m was taken for a hub id (valid until the train stage), and data.source ~/d.jsonl was not found."""
    from dpo_kit.run.stage import run_dir_for

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny.yaml").write_text((REPO / "params/tiny.yaml").read_text())
    params = load_params("~/tiny.yaml", ["run.output_dir=~/runs", "data.source=~/pairs.jsonl"])
    assert run_dir_for(params, REPO) == tmp_path / "runs" / "tiny"
    assert params.data.source == str(tmp_path / "pairs.jsonl")
    with pytest.raises(ParamsError, match=f"data.source: file not found: {tmp_path / 'pairs.jsonl'}"):
        check_local_files(params, REPO)
    params = load_params(REPO / "params/tiny.yaml", ["model.name_or_path=~/models/m", "model.build_tiny_model=false",
                                                     "evaluate.judge=~/judge"])  # fmt: skip
    assert (params.model.name_or_path, params.evaluate.judge) == (str(tmp_path / "models/m"), str(tmp_path / "judge"))
    with pytest.raises(ParamsError, match=f"model.name_or_path: directory not found: {tmp_path / 'models/m'}"):
        check_local_files(params, REPO)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.lr_scheduler_type=cosinee", r"dpo.lr_scheduler_type: unknown value 'cosinee'; did you mean 'cosine'\?"
                                          r" \(DPOConfig.lr_scheduler_type takes linear, cosine, "),
        ("dpo.optim=adamw_torh", r"dpo.optim: unknown value 'adamw_torh'; did you mean 'adamw_torch'\?"),
        ("dpo.eval_strategy=step", r"dpo.eval_strategy: unknown value 'step'; did you mean 'steps'\?.*takes no, steps"),
        ("dpo.save_strategy=epochs", r"dpo.save_strategy: unknown value 'epochs'; did you mean 'epoch'\?"),
    ],
)
def test_a_misspelled_scheduler_optimizer_or_strategy_is_refused_when_the_params_are_read(override, message, tmp_path):
    """Typed `SchedulerType | str` in DPOConfig, any string passed the check, and TrainingArguments refused it only
    when the train stage built DPOConfig, after the format stage; dpo-kit validate called the params valid."""
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.training.train import build_dpo_config

    with pytest.raises(ParamsError, match=message):
        load_params(REPO / "params/tiny.yaml", [override])
    # The values the installed transformers takes pass, and so does the DPOConfig the train stage builds from them.
    params = load_params(REPO / "params/tiny.yaml", ["dpo.lr_scheduler_type=cosine_with_min_lr", "dpo.optim=adamw_torch",
                                                     "dpo.save_strategy=no", "dpo.lr_scheduler_kwargs={min_lr: 0.0}"])
    config = build_dpo_config(params, tmp_path, choose_hardware())
    assert (config.lr_scheduler_type.value, config.optim.value) == ("cosine_with_min_lr", "adamw_torch")


def test_a_leading_zero_a_colon_or_a_date_is_read_as_written_not_as_yaml_1_1_numbers_and_dates(tmp_path):
    """YAML 1.1 read 0123 as octal 83 (`--set model.revision=0123` was refused as "got 83", `save_steps: 010` saved
    every 8 steps), 1:30 as 90 and 2024-12-07 as a date; YAML 1.2, and now the kit, read none of them so."""
    params = load_params(REPO / "params/tiny.yaml", ["model.revision=0123", "run.name=2024-12-07", "dpo.save_steps=010"])
    assert (params.model.revision, params.run.name, params.dpo["save_steps"]) == ("0123", "2024-12-07", 10)
    hub = REPO / "params/qwen2.5-0.5b-instruct-ultrafeedback-lora.yaml"  # data.revision is a hub dataset's
    assert load_params(hub, ["data.revision=1:30"]).data.revision == "1:30"  # (as data.split, no split datasets reads)
    path = tmp_path / "written.yaml"
    path.write_text((REPO / "params/tiny.yaml").read_text().replace("name: tiny", "name: 007"))
    assert load_params(path).run.name == "007"
    # The numbers YAML 1.2 keeps read as before.
    assert read_yaml("[0, 0x1f, 1_000, 1.5e-3, .inf, -5, 1e-3, true, no]") == [0, 31, 1000, 0.0015, float("inf"), -5,
                                                                               "1e-3", True, "no"]  # fmt: skip


def number_fields() -> list[str]:
    """The dotted keys of the kit's own sections whose type takes numbers but not booleans (int, float, int | None)."""
    from dpo_kit.params import OnPolicyParams, Params

    found = []
    for section, model in [*((name, f.annotation) for name, f in Params.model_fields.items() if name != "dpo"),
                           ("data.generate", OnPolicyParams)]:  # fmt: skip
        for key, field in model.model_fields.items():
            members = typing.get_args(field.annotation) or (field.annotation,)
            if bool not in members and ({int, float} & set(members)):
                found.append(f"{section}.{key}")
    return found


def test_the_number_fields_are_found():
    keys = number_fields()
    assert {"lora.r", "lora.dropout", "run.seed", "data.max_length", "data.generate.temperature",
            "launch.main_process_port", "merge.verify_atol"} <= set(keys)  # fmt: skip
    assert "lora.enabled" not in keys and "quantization.bits" not in keys  # a bool; a Literal of 4 and 8


@pytest.mark.parametrize("key", number_fields())
@pytest.mark.parametrize("value", ["true", "false"])
def test_a_boolean_is_refused_where_a_number_is_expected(key, value):
    """pydantic's lax mode read true as 1 and false as 0 in an int or float field: `--set lora.r=true` trained a rank-1
    adapter, `generate.temperature=true` sampled at 1.0, without a word."""
    path = REPO / ("params/smollm2-135m-sentiment.yaml" if key.startswith("data.generate.") else "params/tiny.yaml")
    with pytest.raises(ParamsError) as caught:
        load_params(path, [f"{key}={value}"])
    message = str(caught.value)
    assert f"{key}: expected " in message and f"got {value}" in message, message
    assert "an integer" in message or "a number" in message, message
    assert "boolean is not read as a number" in message, message


@pytest.mark.parametrize(("override", "expected"), [
    ("dpo.beta=true", "dpo.beta: expected a number (float, the type of DPOConfig.beta), got true"),
    ("dpo.max_steps=false", "dpo.max_steps: expected an integer (int, the type of DPOConfig.max_steps), got false"),
    ("dpo.max_length=true", "dpo.max_length: expected an integer (int | None"),
    ("dpo.learning_rate=true", "dpo.learning_rate: expected a number"),
    ("dpo.loss_weights=[true]", "dpo.loss_weights: expected a list of numbers"),
])  # fmt: skip
def test_a_boolean_is_refused_where_dpo_config_expects_a_number(override, expected):
    with pytest.raises(ParamsError, match=re.escape(expected)):
        load_params(REPO / "params/tiny.yaml", [override])


def test_numbers_still_read_where_booleans_are_refused(tmp_path):
    params = load_params(REPO / "params/tiny.yaml", ["lora.r=32", "lora.alpha='16'", "dpo.beta=1", "dpo.learning_rate=1e-4",
                                                     "dpo.max_steps=40.0", "generate.temperature=1", "data.max_length=null",
                                                     "dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1, 0.5]",
                                                     "lora.enabled=true", "dpo.bf16=false"])  # fmt: skip
    assert (params.lora.r, params.lora.alpha, params.generate.temperature, params.data.max_length) == (32, 16, 1.0, None)
    assert params.dpo["beta"] == 1.0 and params.dpo["learning_rate"] == 1e-4 and params.dpo["max_steps"] == 40
    assert params.dpo["loss_weights"] == [1.0, 0.5] and params.lora.enabled is True and params.dpo["bf16"] is False
    path = tmp_path / "yes.yaml"  # in a file too: `r: True` is a boolean, as true is
    path.write_text((REPO / "params/tiny.yaml").read_text().replace("  r: 8\n", "  r: True\n"))
    with pytest.raises(ParamsError, match=f"{re.escape(str(path))}: lora.r: expected an integer, got true"):
        load_params(path)


@pytest.mark.parametrize(("path", "override", "switch"), [
    ("phi-2-truthy-dpo-full", "lora.r=32", "lora.enabled=true"),
    ("phi-2-truthy-dpo-full", "lora.target_modules=[q_proj,v_proj]", "lora.enabled=true"),
    ("tiny", "quantization.quant_type=fp4", "quantization.bits=4"),
    ("stablelm-2-1_6b-hh-rlhf-lora-8bit", "quantization.double_quant=false", "quantization.bits=4"),  # 8-bit reads none
    ("smollm2-135m-sentiment", "generate.temperature=0.5", None),  # do_sample is on there: allowed
    ("tiny", "tracking.project=mine", "tracking.report_to=[wandb]"),
    ("phi-2-truthy-dpo-full", "tracking.project=mine", None),  # wandb: allowed
    ("tiny", "merge.hub_model_id=me/tiny", "merge.push_to_hub=true"),
    ("tiny", "data.split=train[:100]", "data.source=<a hub dataset id>"),  # bundled: no split read
    ("smollm2-135m-sentiment", "data.revision=main", "data.source=<a hub dataset id>"),  # sampled pairs
    ("qwen2.5-0.5b-instruct-ultrafeedback-lora", "data.split=train[:100]", None),  # a hub dataset: allowed
])  # fmt: skip
def test_a_set_key_of_a_switched_off_section_is_refused(path, override, switch):
    """`--set lora.r=32` on a full fine-tuning recipe was read, written into params.yaml and never used: the run looked
    like a rank-32 LoRA run. A key given with --set while its section is off in the file is refused, naming the switch."""
    file = REPO / "params" / f"{path}.yaml"
    if switch is None:
        load_params(file, [override])
        return
    key = override.split("=")[0]
    with pytest.raises(ParamsError, match=rf"override '{re.escape(override)}' would change nothing: .*"
                                          rf"{re.escape(key)} is not used. Set {re.escape(switch)}"):
        load_params(file, [override])


def test_generate_settings_are_refused_under_greedy_decoding(tmp_path):
    path = tmp_path / "greedy.yaml"
    path.write_text((REPO / "params/tiny.yaml").read_text().replace("  max_new_tokens: 32\n",
                                                                    "  max_new_tokens: 32\n  do_sample: false\n"))
    with pytest.raises(ParamsError, match=r"override 'generate.top_k=0' would change nothing: generate.do_sample is false"):
        load_params(path, ["generate.top_k=0"])


def test_a_switch_given_with_the_keys_keeps_them_unused_as_asked():
    """Switching a section off with --set keeps the file's (and the overrides') keys unused without refusing them: the
    README's `--set lora.enabled=false` on a LoRA recipe, a sweep over lora.enabled with lora.r fixed by --set. The run's
    own params.yaml, read back by the train stage, holds every key of a switched-off section and loads as well."""
    tiny = REPO / "params/tiny.yaml"
    assert load_params(tiny, ["lora.enabled=false"]).lora.r == 8
    assert load_params(tiny, ["lora.r=32", "lora.enabled=false"]).lora.enabled is False
    assert load_params(REPO / "params/phi-2-truthy-dpo-full.yaml", ["lora.enabled=true", "lora.r=32"]).lora.r == 32
    assert load_params(tiny, ["tracking.report_to=[trackio]", "tracking.project=mine"]).tracking.project == "mine"
    assert load_params(tiny, ["generate.do_sample=false", "generate.temperature=0.5"]).generate.temperature == 0.5


def test_a_full_fine_tuning_run_params_file_reads_back(tmp_path):
    params = load_params(REPO / "params/tiny.yaml", ["lora.enabled=false"])
    save_params(params, tmp_path / "params.yaml")
    assert "  r: 8\n" in (tmp_path / "params.yaml").read_text()
    assert load_params(tmp_path / "params.yaml") == params


@pytest.mark.parametrize(("overrides", "expected"), [
    (["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0]"], "`loss_weights` must have the same length as `loss_type`"),
    (["dpo.load_best_model_at_end=true"], "--load_best_model_at_end requires the save and eval strategy to match"),
    (["dpo.warmup_steps=-1"], "warmup_steps >= 0"),
])  # fmt: skip
def test_what_dpo_config_refuses_is_refused_when_the_params_are_read(overrides, expected, tmp_path, capsys):
    """DPOConfig's and TrainingArguments' own checks across keys ran only when the train stage built the config, after
    the format stage had sampled or downloaded the pairs; `dpo-kit validate` said the params were valid."""
    from dpo_kit.run.cli import main
    from dpo_kit.run.runner import resolve_run

    with pytest.raises(ParamsError, match=r"dpo: trl.DPOConfig refuses these settings .*" + re.escape(expected)):
        resolve_run(REPO / "params/tiny.yaml", overrides, tmp_path)
    assert main(["validate", str(REPO / "params/tiny.yaml"), *[a for o in overrides for a in ("--set", o)]]) == 1
    assert expected in capsys.readouterr().err
    assert resolve_run(REPO / "params/tiny.yaml", overrides, tmp_path, ["generate"])  # no train stage: not built
    assert not list(tmp_path.iterdir())


def test_a_section_left_empty_is_named_and_takes_an_override(tmp_path):
    """A section whose keys are all commented out is null in YAML: pydantic said "Input should be a valid dictionary or
    instance of QuantizationParams", and `--set quantization.bits=4` on it was refused as "'quantization' is not a
    section". An empty `lora:` is not read as the defaults, which train a LoRA: it may mean "no LoRA"."""
    text = (REPO / "params/tiny.yaml").read_text()
    path = tmp_path / "empty.yaml"
    path.write_text(text + "quantization:\n#  bits: 4\n")
    with pytest.raises(ParamsError, match=rf"{re.escape(str(path))}: section 'quantization' is empty .* remove the line"
                                          " 'quantization:' to take its defaults"):
        load_params(path)
    assert load_params(path, ["quantization.bits=4"]).quantization.bits == 4
    path.write_text(re.sub(r"lora:\n(  .*\n)+", "lora:\n", text))
    with pytest.raises(ParamsError, match=r"section 'lora' is empty .*lora: \{enabled: false\}"):
        load_params(path)
    assert load_params(path, ["lora.enabled=false"]).lora.enabled is False


def test_an_override_key_with_an_empty_part_is_refused():
    with pytest.raises(ParamsError, match=r"override 'dpo\.\.beta=1': the key 'dpo\.\.beta' has an empty part"):
        load_params(REPO / "params/tiny.yaml", ["dpo..beta=1"])


@pytest.mark.parametrize(("seed", "expected"), [("-1", "greater than or equal to 0"),
                                                ("4294967295", "less than or equal to 4294967294")])
def test_a_seed_numpy_cannot_take_is_refused_when_the_params_are_read(seed, expected):
    """transformers' set_seed (numpy) refused `run.seed: -1` only in the train stage, after the format stage."""
    from transformers import set_seed

    with pytest.raises(ValueError, match="Seed must be between 0 and 2\\*\\*32 - 1"):
        set_seed(int(seed) if seed == "-1" else int(seed) + 1)  # the premise; + 1: the generate stage's best-of-N seed
    with pytest.raises(ParamsError, match=f"run.seed: Input should be {expected} \\(got {seed}\\)"):
        load_params(REPO / "params/tiny.yaml", [f"run.seed={seed}"])
    assert load_params(REPO / "params/tiny.yaml", ["run.seed=4294967294"]).run.seed == 4294967294


@pytest.mark.parametrize("key", ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                                 "max_length"])  # fmt: skip
def test_a_dpo_count_below_one_is_refused_when_the_params_are_read(key):
    """DPOConfig takes 0 for these; the train stage then failed (a DataLoader refuses batch_size 0, the Trainer divides
    by the accumulation steps) or the audit dropped every pair, after the format stage."""
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError, match="batch_size should be a positive integer"):
        DataLoader([1, 2], batch_size=0)  # the premise, for the batch sizes
    for value in ("0", "-1"):
        with pytest.raises(ParamsError, match=rf"dpo.{key} {value} must be at least 1"):
            load_params(REPO / "params/tiny.yaml", [f"dpo.{key}={value}"])
    assert load_params(REPO / "params/tiny.yaml", [f"dpo.{key}=1"]).dpo[key] == 1


def test_a_revision_is_refused_for_a_local_model_directory(tmp_path):
    """transformers ignores `revision` for a local directory: the run recorded a pin it never read."""
    (tmp_path / "config.json").write_text("{}")
    overrides = [f"model.name_or_path={tmp_path}", "model.build_tiny_model=false"]
    params = load_params(REPO / "params/tiny.yaml", [*overrides, "model.revision=v1.0"])
    with pytest.raises(ParamsError, match=f"model.revision 'v1.0' pins a hub revision, but model.name_or_path {tmp_path}"):
        check_local_files(params)
    check_local_files(load_params(REPO / "params/tiny.yaml", overrides))  # no revision: loaded as it is
    check_local_files(load_params(REPO / "params/tiny.yaml", [*overrides[1:], "model.name_or_path=owner/name",
                                                              "model.revision=v1.0"]))  # fmt: skip
