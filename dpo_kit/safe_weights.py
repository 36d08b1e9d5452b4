"""Safetensors only, for models a run did not write: the kit loads no pickle (pytorch_model.bin, or a file that
config.json's `transformers_weights` names) that the run did not write itself, since unpickling a file can run code.
Shared by the model loaders (models.loading) and the reward-model judge (judges)."""

from __future__ import annotations

from pathlib import Path


class PickledWeightsRefused(OSError):
    """A model that the run did not write holds its weights only as a pickle (pytorch_model.bin), which the kit
    does not load: the message names the model and how to get safetensors weights."""


def no_safetensors_weights(error: OSError) -> bool:
    """transformers' OSError for use_safetensors=True and no safetensors weights: 'no file named model.safetensors
    found in directory' (local) or 'does not appear to have a file named model.safetensors' (hub)."""
    text = str(error)
    return "safetensors" in text and ("no file named" in text or "does not appear to have a file named" in text)


def pickled_weights_refused(source: str) -> PickledWeightsRefused:
    where = "" if Path(source).exists() else " (or, offline, only those are in the Hugging Face cache)"
    return PickledWeightsRefused(
        f"'{source}' holds no safetensors weights (model.safetensors, or its sharded index){where}, only pickled"
        " ones (pytorch_model.bin); the kit loads no pickle that the run did not write itself, since unpickling a"
        " file can run code. Use a revision of the repo with safetensors weights (the hub's conversion bot opens"
        " them as a pull request, refs/pr/N), or convert it once where you trust the file and point the params at"
        " the converted directory."
    )


SAFETENSORS_WEIGHTS = (".safetensors", ".safetensors.index.json")


def refuse_weights_named_by_config(source: str, **kwargs) -> None:
    """transformers loads the file that config.json's `transformers_weights` names ahead of use_safetensors, and
    accepts `adapter_model.bin` there: a pickle. Read config.json alone (no model code) and refuse that."""
    from transformers import PretrainedConfig

    download = {key: value for key, value in kwargs.items() if key in ("revision", "token")}
    named = PretrainedConfig.get_config_dict(source, **download)[0].get("transformers_weights")
    if named is not None and not str(named).endswith(SAFETENSORS_WEIGHTS):
        raise PickledWeightsRefused(
            f"'{source}': its config.json names '{named}' as the weights (transformers_weights), which is not a"
            " safetensors file; the kit loads no pickle that the run did not write itself, since unpickling a file"
            " can run code."
        )


def from_pretrained_safetensors(loader, source: str, **kwargs):
    """`loader.from_pretrained(source, use_safetensors=True)`, refusing a config.json that names pickled weights,
    and a model whose weights are only pickled (PickledWeightsRefused, with what to do). A local directory with no
    weights at all gets transformers' own message, which says so."""
    refuse_weights_named_by_config(source, **kwargs)
    try:
        return loader.from_pretrained(source, use_safetensors=True, **kwargs)
    except OSError as error:
        if not isinstance(error, PickledWeightsRefused) and no_safetensors_weights(error):
            local = Path(source)
            if not local.is_dir() or any(local.glob("pytorch_model*.bin")):
                raise pickled_weights_refused(source) from error
        raise
