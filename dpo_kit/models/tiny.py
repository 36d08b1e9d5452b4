"""A tiny, deterministic chat model built offline, so the whole pipeline runs with no hub and no GPU.

It is saved with `save_pretrained` and used only through `AutoModelForCausalLM.from_pretrained` /
`AutoTokenizer.from_pretrained`: the tiny run exercises exactly the code path of a hub model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dpo_kit.chat_templates import CHAT_TEMPLATE_PRESETS

# ChatML, as Qwen2 / OpenHermes use it. A rendered assistant turn ends in <|im_end|>, which is also
# the eos token, so TRL must not append a second eos (trl#1073, #2054, #4481): our tests check that.
CHATML_TEMPLATE = CHAT_TEMPLATE_PRESETS["chatml"]
PAD_TOKEN, BOS_OF_TURN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 1024):
    """Byte-level BPE trained on the bundled corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dpo_kit.bundled import bundled_corpus

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_OF_TURN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Role names and template newlines are in the corpus so they get merged tokens of their own.
    corpus = bundled_corpus(seed) + ["system\n", "user\n", "assistant\n"]
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=512
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    output_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    overwrite: bool = False,
) -> Path:
    """Build the tiny Qwen2-shaped chat model and its tokenizer into `output_dir`; returns the path.

    The same seed gives the same bytes on the same torch build: weights come from a seeded CPU
    generator and the tokenizer from a deterministic BPE trainer. A directory that already holds files (a
    run's merged model, say) is refused before anything is built, unless `overwrite`.
    """
    output_dir = Path(output_dir)
    refuse_occupied(output_dir, overwrite)
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # safetensors: transformers 5 writes nothing else
    tokenizer.save_pretrained(output_dir)
    return output_dir


def refuse_occupied(output_dir: Path, overwrite: bool = False) -> None:
    """Raise FileExistsError, naming the files, when `output_dir` is a file, or a directory that holds files and
    `overwrite` is not given."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file, not a directory: name a new or empty directory")
    held = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise FileExistsError(
            f"{output_dir} exists and is not empty (it holds {shown}): its files are never overwritten without"
            " asking. Name a new or empty directory, or pass --overwrite (overwrite=True) to replace them"
        )


# What a complete build leaves; save_pretrained writes config.json before the weights, so it alone proves nothing.
TINY_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json")  # fmt: skip


def ensure_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model at `path` unless a complete one is already saved there. The path is the kit's own (e.g.
    model.build_tiny_model's `_tiny-chat-model`), shared by every run of a project.

    The model is built beside it and renamed into place, so `path` never holds a half-written model: a build killed
    after save_pretrained wrote config.json but not the weights left a directory that every later run loaded and
    failed on. Processes that build at once (the ranks of a launched training, parallel sweep trials) each build their
    own copy; the first rename wins and the others, the same bytes for the same seed, are removed. What an older
    build cut short left at `path` is built over."""
    path = Path(path)
    if all((path / name).is_file() for name in TINY_MODEL_FILES):
        return path
    staging = path.with_name(f".{path.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build_tiny_model(staging, seed=seed)
        if path.exists() and not all((path / name).is_file() for name in TINY_MODEL_FILES):
            shutil.rmtree(path)  # cut short by a kit that built in place
        try:
            os.rename(staging, path)
        except OSError:
            if not all((path / name).is_file() for name in TINY_MODEL_FILES):
                raise
            # Another process renamed its build into place first.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# Real models' shapes, for checks of memory and speed where their weights cannot travel (a GPU machine with no
# network): the architecture and every weight matrix at full size, random init, and the tiny tokenizer (its ids
# are a subset of the vocabulary, so the embedding keeps the real model's rows). Outputs are gibberish by design.
RANDOM_MODEL_SHAPES: dict[str, dict] = {
    # SmolLM2-135M-Instruct (the sentiment recipe's model; its GGUF's config).
    "smollm2-135m": dict(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    # Qwen2.5-0.5B-Instruct (params/qwen2.5-0.5b-instruct-ultrafeedback-lora.yaml's model), ~0.49 B parameters.
    "qwen2.5-0.5b": dict(
        architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=32768,
    ),
}


def random_model_config(shape: str, tokenizer):
    """The transformers config of RANDOM_MODEL_SHAPES[shape], with the tokenizer's special token ids."""
    from transformers import LlamaConfig, Qwen2Config

    if shape not in RANDOM_MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {', '.join(RANDOM_MODEL_SHAPES)}")
    settings = dict(RANDOM_MODEL_SHAPES[shape])
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[settings.pop("architecture")]
    return config_class(
        **settings, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def build_random_model(output_dir: str | Path, shape: str, seed: int = 0) -> Path:
    """Build a random model of a real model's shape (RANDOM_MODEL_SHAPES) with the tiny tokenizer into
    `output_dir`, in safetensors; returns the path. Refuses a directory that already holds a model."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists():
        raise FileExistsError(f"{output_dir} already holds a model; name a new directory")
    tokenizer = build_tiny_tokenizer(seed)
    config = random_model_config(shape, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # safetensors: transformers 5 writes nothing else
    tokenizer.save_pretrained(output_dir)
    return output_dir
