"""Loading models and tokenizers the same way for a hub id and for the local tiny model.

Every stage goes through these functions, so a recipe naming a 7B hub model exercises exactly the
calls the tiny CI run exercises: only the name_or_path string differs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import warnings
from pathlib import Path

from dpo_kit.chat_templates import resolve_chat_template
from dpo_kit.hardware import HardwareChoice, choose_hardware, resolve_dtype
from dpo_kit.models.gguf import OFFLINE_GGUF_MODELS
from dpo_kit.models.hub_cache import models_offline_variable
from dpo_kit.params import Params, is_local_path
from dpo_kit.safe_weights import PickledWeightsRefused, from_pretrained_safetensors


def uses_gguf(params: Params) -> bool:
    return bool(params.model.gguf_file) or params.model.name_or_path in OFFLINE_GGUF_MODELS


def converted_gguf_model(params: Params, project_dir: str | Path = "."):
    """The GGUF that params name, located and converted to a safetensors checkpoint (once; then cached)."""
    from dpo_kit.models.gguf import converted_gguf, locate_gguf

    hub = {key: value for key, value in hub_kwargs(params).items() if key in ("revision", "token")}
    return converted_gguf(locate_gguf(params.model.name_or_path, params.model.gguf_file, project_dir, **hub))


def model_source(params: Params, project_dir: str | Path = ".") -> str:
    """The string handed to from_pretrained: a local directory (building the tiny model if asked, converting a
    GGUF file once) or a hub id. Never anything but the model that params name: a missing one is an error."""
    name = params.model.name_or_path
    local = Path(project_dir) / name
    if uses_gguf(params):
        return str(converted_gguf_model(params, project_dir).directory)
    if params.model.builds_tiny_model:  # only at the kit's own tiny-model path, never in place of a named model
        from dpo_kit.models.tiny import ensure_tiny_model

        # Seed 0, not run.seed: the tiny model lives at a shared path and must be the same for every run.
        return str(ensure_tiny_model(local, seed=0))
    if local.exists():
        return str(local)
    if is_local_path(name):
        raise FileNotFoundError(f"model.name_or_path: directory not found: {local}")
    return name


def model_record(params: Params, project_dir: str | Path = ".") -> dict:
    """The model's identity for the manifest: what params name, and for a GGUF the file and its sha256."""
    record = {"name_or_path": params.model.name_or_path, "revision": params.model.revision}
    if uses_gguf(params):
        record.update(converted_gguf_model(params, project_dir).record())
    return record


class ModelNotAvailableError(OSError):
    """The model that params name is not on disk, and the hub (or its local cache) could not provide it."""


def from_pretrained(loader, source: str, **kwargs):
    """`loader.from_pretrained(source)`; a hub id that cannot be loaded raises ModelNotAvailableError, which names
    the id, says whether the hub was offline or unreachable, and what to do instead. With `use_safetensors=True`
    a model whose weights are only pickled raises PickledWeightsRefused."""
    try:
        if kwargs.pop("use_safetensors", False):
            return from_pretrained_safetensors(loader, source, **kwargs)
        return loader.from_pretrained(source, **kwargs)
    except OSError as error:
        if isinstance(error, PickledWeightsRefused):
            raise
        if Path(source).exists():
            raise  # a local model that fails to load: transformers' own message is the right one
        from huggingface_hub.constants import HF_HUB_CACHE

        # read as huggingface_hub reads it: TRANSFORMERS_OFFLINE counts, HF_HUB_OFFLINE=2 does not
        offline = models_offline_variable()
        why = (
            f"{offline} is set, so the hub was not asked" if offline
            else "the hub could not be reached (no network?) or does not hold it"
        )
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotAvailableError(
            f"model.name_or_path '{source}' is not a local directory, so it was loaded as a hub id, and {why};"
            f" it is not in the Hugging Face cache ({HF_HUB_CACHE}) either. transformers said: {detail}"
            f" Download it where there is a network (`hf download {source}`) into that cache, or set"
            " model.name_or_path to a local directory, or to a GGUF file with model.gguf_file."
        ) from error


def hub_kwargs(params: Params) -> dict:
    """Arguments shared by every from_pretrained call; the token is read from the environment only."""
    kwargs = {"trust_remote_code": params.model.trust_remote_code}
    if params.model.revision:
        kwargs["revision"] = params.model.revision
    if os.environ.get("HF_TOKEN"):
        kwargs["token"] = os.environ["HF_TOKEN"]
    return kwargs


def load_tokenizer(source: str, params: Params):
    """Tokenizer with a pad token and params.model.chat_template applied when set.

    The pad token is chosen as TRL's DPOTrainer chooses it, so every stage pads with the one training used:
    dpo.pad_token, else the tokenizer's own, else its eos. A tokenizer with none of them is refused here, naming
    the model, rather than left to fail later in TRL or generate (a GGUF that declares no eos never gets here: its
    conversion is refused, see dpo_kit.models.gguf._no_eos_error)."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, source, **hub_kwargs(params))
    chosen = params.dpo.get("pad_token")
    if chosen is not None:
        if chosen not in tokenizer.get_vocab():
            raise ValueError(f"dpo.pad_token '{chosen}' is not a token of the tokenizer of {_described(source)}:"
                             " name one of its tokens, or leave dpo.pad_token out to pad with its pad or eos token")
        tokenizer.pad_token = chosen
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {_described(source)} has neither a pad token nor an eos token, and DPO pads every"
                " batch. Set dpo.pad_token to one of its tokens (its unk token, say; padding is masked out, so any"
                " token does), or train a model whose tokenizer declares an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if params.model.chat_template:
        tokenizer.chat_template = resolve_chat_template(params.model.chat_template)
    return tokenizer


def _described(source: str) -> str:
    """A model source as the user named it: a GGUF's cached conversion is named by its GGUF file."""
    from dpo_kit.models.gguf import CONVERTED_MARKER

    try:
        return f"the GGUF file {json.loads((Path(source) / CONVERTED_MARKER).read_text())['gguf_file']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"'{source}'"


def quantization_config(params: Params, hardware: HardwareChoice):
    """BitsAndBytesConfig for QLoRA, or None when quantization is off."""
    bits = params.quantization.bits
    if not bits:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=params.quantization.quant_type,
        bnb_4bit_use_double_quant=params.quantization.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(params.quantization.compute_dtype, hardware),
    )


def load_causal_lm(
    source: str,
    params: Params,
    dtype: str | None = None,
    quantized: bool = False,
    hardware: HardwareChoice | None = None,
):
    """AutoModelForCausalLM.from_pretrained with the run's dtype; `quantized` applies params.quantization."""
    from transformers import AutoModelForCausalLM

    hardware = hardware or choose_hardware()
    # safetensors only: a pytorch_model.bin is a pickle, and this loads models the run did not write (the hub's,
    # another run's merged/ as the sampler); transformers' weights_only unpickler is not the kit's rule.
    kwargs = {**hub_kwargs(params), "use_safetensors": True}
    kwargs["dtype"] = resolve_dtype(dtype or params.model.dtype, hardware)
    if params.model.attn_implementation:
        kwargs["attn_implementation"] = params.model.attn_implementation
    if quantized and params.quantization.bits:
        kwargs["quantization_config"] = quantization_config(params, hardware)
    # Under DeepSpeed or FSDP (set by accelerate launch) the strategy places the shards: no device_map there.
    sharded = any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true" for name in ("DEEPSPEED", "FSDP"))
    if hardware.device == "cuda" and not sharded:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return from_pretrained(AutoModelForCausalLM, source, **kwargs)


def lora_config(params: Params):
    """peft LoraConfig from params.lora, or None for full fine-tuning."""
    if not params.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
        bias=params.lora.bias,
        task_type="CAUSAL_LM",
    )


def device_of(model):
    return next(model.parameters()).device


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def deprecated_checkpointing_alias_quiet():
    """transformers 5 renamed `is_gradient_checkpointing` to `is_activation_checkpointing` and warns on the old
    name; peft 0.21 (PeftModel.__init__, so also PeftModel.from_pretrained) and TRL 1.16
    (disable_gradient_checkpointing, every DPO step) still read the old one, and a notebook showed the
    FutureWarning again and again. The kit reads neither name. This hides that one message, around those calls,
    until peft and TRL move to the new name; every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
