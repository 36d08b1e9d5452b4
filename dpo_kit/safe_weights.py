"""Safetensors only, for models a run did not write: the kit loads no pickle (pytorch_model.bin, or a file that
config.json's `transformers_weights` names) that the run did not write itself, since unpickling a file can run code.
Shared by the model loaders (models.loading) and the reward-model judge (judges)."""

from __future__ import annotations

import json
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
SAFETENSORS_INDEX = "model.safetensors.index.json"


def refuse_weights_named_by_config(source: str, **kwargs) -> None:
    """transformers loads the file that config.json's `transformers_weights` names ahead of use_safetensors, and
    accepts `adapter_model.bin` there: a pickle. Read config.json alone (no model code) and refuse that, and a
    safetensors index (the one named there, else model.safetensors.index.json) naming shards that are not
    safetensors (refuse_pickled_shards)."""
    from transformers import PretrainedConfig

    download = {key: value for key, value in kwargs.items() if key in ("revision", "token")}
    named = PretrainedConfig.get_config_dict(source, **download)[0].get("transformers_weights")
    if named is not None and not str(named).endswith(SAFETENSORS_WEIGHTS):
        raise PickledWeightsRefused(
            f"'{source}': its config.json names '{named}' as the weights (transformers_weights), which is not a"
            " safetensors file; the kit loads no pickle that the run did not write itself, since unpickling a file"
            " can run code."
        )
    index = str(named) if named is not None and str(named).endswith(".safetensors.index.json") else SAFETENSORS_INDEX
    refuse_pickled_shards(source, index, **kwargs)


def refuse_pickled_shards(source: str, index_name: str = SAFETENSORS_INDEX, **kwargs) -> None:
    """With use_safetensors=True transformers still loads whatever shard files a safetensors index's weight_map names,
    and reads one not ending in .safetensors with torch.load: an index naming pytorch_model.bin unpickles it. Read
    the index alone (a local file, or the hub's as transformers would fetch it) and refuse that."""
    from transformers.utils import cached_file

    download = {key: value for key, value in kwargs.items() if key in ("revision", "token")}
    index = cached_file(source, index_name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False, **download)  # fmt: skip
    if index is None:
        return  # no index here: transformers loads model.safetensors, or finds no weights and says so
    try:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"'{source}': its {index_name} cannot be read as a safetensors index ({type(error).__name__}: {error}):"
            " it must be JSON with a weight_map from parameter names to .safetensors shard files"
        ) from error
    pickled = [shard for shard in shards if not str(shard).endswith(".safetensors")]
    if pickled:
        raise PickledWeightsRefused(
            f"'{source}': its {index_name} names {pickled[:3]} as weight shards, which are not safetensors files;"
            " the kit loads no pickle that the run did not write itself, since unpickling a file can run code. Its"
            " weight_map must name .safetensors shards only."
        )


def from_pretrained_safetensors(loader, source: str, **kwargs):
    """`loader.from_pretrained(source, use_safetensors=True)`, refusing a config.json or a safetensors index that
    names pickled weights, and a model whose weights are only pickled (PickledWeightsRefused, with what to do). A
    local directory with no weights at all gets transformers' own message, which says so."""
    refuse_weights_named_by_config(source, **kwargs)
    try:
        return loader.from_pretrained(source, use_safetensors=True, **kwargs)
    except OSError as error:
        if not isinstance(error, PickledWeightsRefused) and no_safetensors_weights(error):
            local = Path(source)
            if not local.is_dir() or any(local.glob("pytorch_model*.bin")):
                raise pickled_weights_refused(source) from error
        raise
