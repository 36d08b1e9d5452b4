"""The tiny offline model: deterministic bytes, a working chat template, loaded like a hub model."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_kit.models.tiny import build_tiny_model
from dpo_kit.run.cli import main


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    files = sorted(p.name for p in tiny_model_dir.iterdir())
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    for name in files:
        assert (tiny_model_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert (tiny_model_dir / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_loads_through_auto_classes_with_chatml_eos_and_pad(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips, special tokens included


def test_cli_builds_the_model(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "config.json").exists()
    assert "tiny model written" in capsys.readouterr().out
