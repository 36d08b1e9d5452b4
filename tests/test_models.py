"""Model and tokenizer loading shared by every stage: chat-template presets and hub arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_kit.data.formats import from_hh_rlhf
from dpo_kit.models.loading import hub_kwargs, load_tokenizer
from dpo_kit.params import ParamsError, load_params

TINY = Path(__file__).resolve().parent.parent / "params" / "tiny.yaml"


def test_human_assistant_preset_renders_hh_rows_back_into_their_transcript(tiny_model_dir):
    params = load_params(TINY, ["model.chat_template=human-assistant"])
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    transcript = "\n\nHuman: Is tea healthy?\n\nAssistant: In moderation, yes.\n\nHuman: How much?\n\nAssistant: Up to four cups a day."
    row = from_hh_rlhf({"chosen": transcript, "rejected": transcript.replace("Up to four cups a day.", "Whatever.")})
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    # Every assistant turn ends in eos (as ChatML's turns end in <|im_end|>); without them it is the transcript.
    eos = tokenizer.eos_token
    assert prompt.replace(eos, "") == transcript[: transcript.rindex("\n\nAssistant:") + len("\n\nAssistant:")]
    assert full.replace(eos, "") == transcript and full.endswith(eos)
    assert full.startswith(prompt)


def test_instruct_output_preset_and_unknown_preset(tiny_model_dir):
    params = load_params(TINY, ["model.chat_template=instruct-output"])
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text == "Instruct: 2+2?\nOutput:"
    with pytest.raises(ParamsError, match="model.chat_template.*chatml, human-assistant, instruct-output"):
        load_params(TINY, ["model.chat_template=alpaca"])


def test_remote_code_is_off_and_the_token_comes_from_the_environment_only(monkeypatch):
    params = load_params(TINY)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hub_kwargs(params) == {"trust_remote_code": False}
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub_kwargs(load_params(TINY, ["model.trust_remote_code=true"])) == {
        "trust_remote_code": True, "token": "hf_from_env"}


def pickled_copy(model_dir: Path, target: Path) -> Path:
    """`model_dir` with its weights as pytorch_model.bin (a pickle), as older hub repos hold them."""
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(model_dir, target)
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def test_a_model_the_run_did_not_write_is_loaded_from_safetensors_only(tiny_model_dir, tmp_path, monkeypatch):
    """A pytorch_model.bin is a pickle: transformers would read it (with torch.load(weights_only=True)), the kit
    refuses it, for every model it loads (policy, reference, sampler), and says what to do."""
    import torch

    from dpo_kit.models.loading import PickledWeightsRefused, load_causal_lm

    pickled = pickled_copy(tiny_model_dir, tmp_path / "pickled")
    params = load_params(TINY, [f"model.name_or_path={pickled}", "model.build_tiny_model=false"])
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: unpickled.append(args[0]) or real_load(*args, **kwargs))
    with pytest.raises(PickledWeightsRefused, match=r"holds no safetensors weights.*pytorch_model.bin.*refs/pr/N"):
        load_causal_lm(str(pickled), params)
    # config.json may name the weights file, and transformers loads that one ahead of use_safetensors (it accepts
    # adapter_model.bin there): refused as well.
    import json

    named = tmp_path / "named"
    pickled_copy(tiny_model_dir, named)
    (named / "pytorch_model.bin").rename(named / "adapter_model.bin")
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(PickledWeightsRefused, match=r"names 'adapter_model.bin' as the weights"):
        load_causal_lm(str(named), params)
    assert unpickled == []
    assert load_causal_lm(str(tiny_model_dir), params) is not None  # safetensors: loaded as before


def test_a_safetensors_index_naming_pickled_shards_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """use_safetensors=True makes transformers read model.safetensors.index.json, but it loads the shards its
    weight_map names whatever they are, a .bin with torch.load: the kit reads the index first and refuses that, also
    an index that config.json's transformers_weights names; sharded safetensors load as before."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dpo_kit.models.loading import PickledWeightsRefused, load_causal_lm

    params = load_params(TINY)
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: unpickled.append(args[0]) or real_load(*args, **kwargs))
    for index_name, named in (("model.safetensors.index.json", None), ("weights.safetensors.index.json", True)):
        model = pickled_copy(tiny_model_dir, tmp_path / index_name)
        keys = load_file(tiny_model_dir / "model.safetensors")
        (model / index_name).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, "pytorch_model.bin")}))
        if named:
            config = json.loads((model / "config.json").read_text())
            (model / "config.json").write_text(json.dumps({**config, "transformers_weights": index_name}))
        with pytest.raises(PickledWeightsRefused, match=rf"its {index_name} names \['pytorch_model.bin'\] as weight shards"):
            load_causal_lm(str(model), params)
    assert unpickled == []
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert load_causal_lm(str(sharded), params) is not None and unpickled == []


# No silent substitution: a named model is loaded or the run fails; the random tiny model is built only at the
# kit's own tiny-model path, whatever build_tiny_model says.

def test_a_hub_id_on_the_tiny_params_is_not_replaced_by_a_random_model(tmp_path):
    from dpo_kit.models.loading import model_source

    params = load_params(TINY, ["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"])  # tiny.yaml: build_tiny_model true
    assert params.model.build_tiny_model and not params.model.builds_tiny_model
    assert model_source(params, tmp_path) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert list(tmp_path.iterdir()) == [], "nothing was built in the named model's place"


def test_the_tiny_model_is_built_only_at_the_kits_tiny_model_path(tmp_path):
    from dpo_kit.models.loading import model_source
    from dpo_kit.params import check_local_files

    params = load_params(TINY, [f"model.name_or_path={tmp_path}/runs/_tiny-chat-model"])
    assert Path(model_source(params, tmp_path), "config.json").exists()
    named = load_params(TINY, [f"model.name_or_path={tmp_path}/my-model"])
    with pytest.raises(ParamsError, match="model.name_or_path: directory not found: .*my-model"):
        check_local_files(named, tmp_path)
    with pytest.raises(FileNotFoundError, match="my-model"):
        model_source(named, tmp_path)
    assert not (tmp_path / "my-model").exists()


def test_an_unreachable_hub_id_fails_naming_the_id_and_why(monkeypatch):
    from dpo_kit.models.loading import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = load_params(TINY, ["model.name_or_path=dpo-kit-tests/no-such-model"])
    with pytest.raises(ModelNotAvailableError) as caught:
        load_tokenizer("dpo-kit-tests/no-such-model", params)
    message = str(caught.value)
    assert "'dpo-kit-tests/no-such-model'" in message and "HF_HUB_OFFLINE is set" in message
    assert "not in the Hugging Face cache" in message and "hf download dpo-kit-tests/no-such-model" in message

    # TRANSFORMERS_OFFLINE alone makes huggingface_hub offline too: the message said the hub could not be reached
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="TRANSFORMERS_OFFLINE is set, so the hub was not asked"):
        load_tokenizer("dpo-kit-tests/no-such-model", params)
