"""The on-disk cache of reference log-probs (dpo_kit.training.ref_cache): the store, the key, and training with it.

The unit tests take a second or so; the training ones run the tiny model on fp32 CPU for a few steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpo_kit.training.ref_cache import COLUMNS, RefLogpsStore, cache_key, data_sha256, weights_sha256

# TRL 1.16 reads transformers' deprecated `is_gradient_checkpointing` inside the DPOTrainer calls these tests make
# directly (the kit's own calls hide that one message with models.loading.deprecated_checkpointing_alias_quiet);
# only that message is filtered, so any other warning still reaches the summary.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "params" / "tiny.yaml")
FIELDS = {"reference": {"weights_sha256": "abc"}, "max_length": 256}
KEY = cache_key(FIELDS)


def values(rows=5):
    return torch.linspace(-40, -1, rows), torch.linspace(-50, -2, rows)


# --- the store -------------------------------------------------------------------------------------------------


def test_a_stored_entry_reads_back_exactly(tmp_path):
    store = RefLogpsStore(tmp_path)
    chosen, rejected = values()
    path = store.save(KEY, FIELDS, chosen, rejected)
    assert path == tmp_path / f"{KEY}.safetensors" and [p.name for p in tmp_path.iterdir()] == [path.name]
    read, status = store.load(KEY, 5)
    assert status == "hit" and torch.equal(read[0], chosen) and torch.equal(read[1], rejected)
    assert store.load(cache_key({**FIELDS, "max_length": 128}), 5) == (None, "miss")


def test_a_write_that_fails_leaves_neither_an_entry_nor_a_temporary_file(tmp_path, monkeypatch):
    store = RefLogpsStore(tmp_path)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        store.save(KEY, FIELDS, *values())
    assert list(tmp_path.iterdir()) == []
    assert store.load(KEY, 5) == (None, "miss")


def flip_byte(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: flip_byte(p, -3), "sha256 mismatch"),  # a bit of the last log-prob
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), "unreadable"),  # truncated inside the data
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "unreadable"),  # truncated inside the header
        (lambda p: p.write_bytes(b""), "unreadable"),
    ],
    ids=["flipped-bit", "truncated-data", "truncated-header", "empty"],
)
def test_a_damaged_entry_is_detected_and_deleted(tmp_path, damage, reason):
    store = RefLogpsStore(tmp_path)
    damage(store.save(KEY, FIELDS, *values()))
    read, status = store.load(KEY, 5)
    assert read is None and status.startswith("corrupt: ") and reason in status
    assert not store.path(KEY).exists(), "deleted, so the recomputed values replace it"


def test_a_damaged_or_unreadable_entry_in_a_cache_that_cannot_be_written_is_recomputed_not_fatal(tmp_path, monkeypatch):
    """A cache on a read-only mount (shared, filled by someone else): deleting a damaged entry fails with EROFS, and
    an entry the run may not read fails on the read. Both are recomputed, as a cache that cannot store is; the train
    stage failed instead, on the deletion's OSError out of DPOTrainer's __init__."""
    store = RefLogpsStore(tmp_path)
    store.save(KEY, FIELDS, *values())
    flip_byte(store.path(KEY), -3)

    def read_only(self, missing_ok=False):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    read, status = store.load(KEY, 5)
    assert read is None and status.startswith("corrupt: sha256 mismatch") and "not deleted" in status
    assert "Read-only file system" in status and store.path(KEY).exists()

    def not_permitted(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", not_permitted)
    read, status = store.load(KEY, 5)
    assert read is None and status.startswith("corrupt: unreadable (PermissionError") and "not deleted" in status


def test_every_byte_of_the_header_is_checked(tmp_path):
    """A flipped bit anywhere in the header is either unreadable or changes something the reader checks."""
    store = RefLogpsStore(tmp_path)
    reference = store.save(KEY, FIELDS, *values()).read_bytes()
    header_end = 8 + int.from_bytes(reference[:8], "little")
    served = []
    for offset in range(header_end):
        store.path(KEY).write_bytes(reference)
        flip_byte(store.path(KEY), offset)
        read, status = store.load(KEY, 5)
        if read is not None and not (torch.equal(read[0], values()[0]) and torch.equal(read[1], values()[1])):
            served.append(offset)
    assert not served, f"different values served after flipping header bytes {served}"


def test_an_entry_under_another_name_or_with_other_rows_is_refused(tmp_path):
    store = RefLogpsStore(tmp_path)
    store.save(KEY, FIELDS, *values())
    other = cache_key({**FIELDS, "max_length": 128})
    shutil.copy(store.path(KEY), store.path(other))
    assert store.load(other, 5) == (None, "corrupt: the key or key fields do not match the file name")
    assert store.load(KEY, 6) == (None, "corrupt: 5 rows recorded, the dataset has 6")


# --- the key ---------------------------------------------------------------------------------------------------


def test_the_key_names_the_versions_of_every_package_that_computes_the_reference():
    """A QLoRA reference is de-quantized by bitsandbytes and a LoRA one is the base with peft's adapters disabled: an
    entry computed under other versions of either was a hit."""
    from importlib.metadata import version

    from dpo_kit.training.ref_cache import versions

    found = versions()
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= set(found)
    assert (found["peft"], found["bitsandbytes"]) == (version("peft"), version("bitsandbytes"))


def test_the_data_hash_follows_the_token_ids_and_their_order():
    from datasets import Dataset

    rows = {"prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5, 6]], "rejected_ids": [[7], [8]]}
    base = data_sha256(Dataset.from_dict(rows))
    assert data_sha256(Dataset.from_dict({**rows, "prompt": ["a", "b"]})) == base, "only the ids count"
    assert data_sha256(Dataset.from_dict({**rows, "chosen_ids": [[4], [5]]})) != base
    assert data_sha256(Dataset.from_dict({**rows, "prompt_ids": [[1], [2, 3]]})) != base, "same tokens, other split"
    assert data_sha256(Dataset.from_dict(rows).select([1, 0])) != base
    filtered = Dataset.from_dict({k: v + [[9]] for k, v in rows.items()}).filter(lambda row: row["prompt_ids"] != [9])
    assert data_sha256(filtered) == base, "the rows TRL keeps, not the table under an indices mapping"


def test_the_weights_hash_leaves_out_lora_and_sees_the_base(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = weights_sha256(plain)
    torch.manual_seed(1)
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))  # fmt: skip
    assert weights_sha256(wrapped, "lora_") == base, "LoRA's random init and rank do not change the reference"
    assert weights_sha256(wrapped) != base
    with torch.no_grad():
        plain.model.norm.weight[0] += 1e-3
    changed = weights_sha256(plain)
    assert changed != base
    assert weights_sha256(plain.to(torch.bfloat16)) != changed, "the dtype as loaded"  # .to() casts in place


# --- training with the cache (tiny model, fp32 CPU) -------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_KIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ref-logps"


@pytest.fixture
def reference_forwards(monkeypatch):
    """How many batches the reference model ran on (TRL's per-batch reference forward of the precompute pass)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    calls = []
    original = DPOTrainer.compute_ref_log_probs

    def counted(self, model, inputs):
        calls.append(len(inputs["input_ids"]) // 2)
        return original(self, model, inputs)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counted)
    return calls


def train(tmp_path, name, *extra, model):
    """Format, then train the tiny model for 3 steps with an eval at step 3, in the run directory tmp_path/name."""
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer
    from dpo_kit.run.stage import open_stage
    from dpo_kit.training.train import train_dpo

    overrides = [f"run.output_dir={tmp_path / name}", f"model.name_or_path={model}", "dpo.max_steps=3",
                 "dpo.logging_steps=1", "dpo.save_steps=3", "dpo.eval_strategy=steps", "dpo.eval_steps=3",
                 "dpo.precompute_ref_log_probs=true", *extra]  # fmt: skip
    stage = open_stage("format", TINY, overrides, str(REPO))
    prepare_data(stage.params, load_tokenizer(str(model), stage.params), stage.run_dir, stage.project_dir)
    stage.complete()
    stage = open_stage("train", TINY, overrides, str(REPO))
    result = train_dpo(stage)
    stage.complete(**result.summary())
    return result


def metric_rows(result):
    return [{k: v for k, v in row.items() if "runtime" not in k and "per_second" not in k}
            for row in result.log_history if "loss" in row or "eval_loss" in row]  # fmt: skip


def assert_same_metrics(a, b, tolerance=1e-5):
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    assert [sorted(r) for r in rows_a] == [sorted(r) for r in rows_b] and len(rows_a) == 4  # 3 steps + 1 eval
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        for key, value in row_a.items():
            assert abs(value - row_b[key]) <= tolerance, (key, row_a["step"], value, row_b[key])


def test_cold_warm_and_no_cache_train_the_same_and_a_warm_run_runs_no_reference(
    tmp_path, tiny_model_dir, cache, reference_forwards
):
    cold = train(tmp_path, "cold", model=tiny_model_dir)
    cold_batches = len(reference_forwards)
    assert cold_batches > 0 and sum(reference_forwards) > 0
    record = cold.ref_logps_cache
    assert {split: entry["status"] for split, entry in record["splits"].items()} == {"train": "miss", "eval": "miss"}
    assert sorted(p.name for p in cache.iterdir()) == sorted(e["key"] + ".safetensors" for e in record["splits"].values())
    assert record["key_fields"]["collator"]["max_length"] == 256 and record["model"]["name_or_path"] == str(tiny_model_dir)

    # A second trial reads the cache; so does a sweep over beta, the learning rate and the LoRA rank (another init).
    warm = train(tmp_path, "warm", model=tiny_model_dir)
    assert len(reference_forwards) == cold_batches, "the warm run ran the reference"
    assert {split: entry["status"] for split, entry in warm.ref_logps_cache["splits"].items()} == {
        "train": "hit", "eval": "hit"}  # fmt: skip
    assert warm.ref_logps_cache["splits"] == {s: {**e, "status": "hit"} for s, e in record["splits"].items()}
    assert_same_metrics(warm, cold)
    manifest = json.loads((tmp_path / "warm" / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["ref_logps_cache"]["splits"]["train"]["status"] == "hit"

    sweep = train(tmp_path, "sweep", "dpo.beta=0.5", "dpo.learning_rate=1e-3", "lora.r=4",
                  model=tiny_model_dir)  # fmt: skip
    assert len(reference_forwards) == cold_batches
    assert {e["status"] for e in sweep.ref_logps_cache["splits"].values()} == {"hit"}

    inline = train(tmp_path, "inline", "dpo.precompute_ref_log_probs=false", model=tiny_model_dir)
    assert inline.ref_logps_cache is None
    assert_same_metrics(inline, cold)


def test_handing_the_log_probs_to_trl_draws_no_bookkeeping_bars(tmp_path, tiny_model_dir, cache, capfd):
    """Joining the log-prob columns to TRL's filtered dataset made datasets flatten its indices mapping with a bar of
    its own, twice per split: a reader of notebook 02 saw "Flattening the indices" under every cached run."""
    train(tmp_path, "bars", "dpo.eval_strategy=no", model=tiny_model_dir)
    err = capfd.readouterr().err
    assert "Computing reference log probs for train dataset" in err, "the precompute pass still shows its progress"
    assert "Flattening the indices" not in err
    import datasets

    assert not datasets.are_progress_bars_disabled(), "datasets' bars are on again for everything else"


def noisy_copy(model_dir, path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(1e-3 * torch.randn(weight.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return path


def test_another_max_length_or_another_model_misses(tmp_path, tiny_model_dir, cache, reference_forwards):
    first = train(tmp_path, "first", model=tiny_model_dir)
    keys = {e["key"] for e in first.ref_logps_cache["splits"].values()}

    shorter = train(tmp_path, "shorter", "dpo.max_length=64", model=tiny_model_dir)
    assert {e["status"] for e in shorter.ref_logps_cache["splits"].values()} == {"miss"}
    assert not keys & {e["key"] for e in shorter.ref_logps_cache["splits"].values()}

    other = noisy_copy(tiny_model_dir, tmp_path / "other-model")  # same tokenizer and data, other weights
    calls = len(reference_forwards)
    another = train(tmp_path, "another", model=other)
    assert {e["status"] for e in another.ref_logps_cache["splits"].values()} == {"miss"}
    assert len(reference_forwards) > calls
    fields = another.ref_logps_cache["key_fields"]["reference"]
    assert fields["weights_sha256"] != first.ref_logps_cache["key_fields"]["reference"]["weights_sha256"]
    assert another.ref_logps_cache["splits"]["train"]["data_sha256"] == first.ref_logps_cache["splits"]["train"][
        "data_sha256"], "only the model changed"
    assert len(list(cache.iterdir())) == 6


def test_a_damaged_cache_file_is_recomputed_never_used(tmp_path, tiny_model_dir, cache, reference_forwards):
    from safetensors.torch import load

    fresh = train(tmp_path, "fresh", model=tiny_model_dir)
    splits = fresh.ref_logps_cache["splits"]
    entries = {split: cache / f"{splits[split]['key']}.safetensors" for split in ("train", "eval")}
    good = {split: entry.read_bytes() for split, entry in entries.items()}
    flip_byte(entries["train"], len(good["train"]) - 2)  # inside the last rejected log-prob: still a valid file
    entries["eval"].write_bytes(good["eval"][: len(good["eval"]) // 2])  # truncated, as by a full disk or a kill
    calls = len(reference_forwards)

    again = train(tmp_path, "again", model=tiny_model_dir)
    status = {split: entry["status"] for split, entry in again.ref_logps_cache["splits"].items()}
    assert status["train"].startswith("recomputed (corrupt: sha256 mismatch"), status
    assert status["eval"].startswith("recomputed (corrupt: unreadable"), status
    assert len(reference_forwards) - calls == calls, "both splits recomputed"
    for split, entry in entries.items():
        stored, state = RefLogpsStore(cache).load(entry.stem, splits[split]["rows"])
        first = load(good[split])
        assert state == "hit" and all(torch.equal(a, first[name]) for a, name in zip(stored, COLUMNS, strict=True)), (
            "the recomputed entry replaces the damaged one, with the values of the first computation")
    assert_same_metrics(again, fresh, tolerance=0.0)


def test_two_processes_share_the_cache_written_by_the_main_one(tmp_path, tiny_model_dir, cache):
    """Under `accelerate launch` (DDP over gloo), the main process reads and writes; the others get its answer.
    TRL's own precompute fails there for an in-memory dataset (each process names its cache file at random)."""
    import socket

    from run_dirs import logged_losses

    from dpo_kit import manifest as mf
    from dpo_kit.run.runner import run_pipeline

    def run(name):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        overrides = [f"run.output_dir={tmp_path}", f"run.name={name}", f"model.name_or_path={tiny_model_dir}",
                     "dpo.max_steps=2", "dpo.logging_steps=1", "dpo.save_steps=2", "dpo.precompute_ref_log_probs=true",
                     "launch.num_processes=2", "dpo.per_device_train_batch_size=4", f"launch.main_process_port={port}"]
        run_dir = run_pipeline(TINY, overrides, ["format", "train"], project_dir=REPO, progress=False)  # fmt: skip
        return run_dir, mf.read_manifest(run_dir)["stages"]["train"]["ref_logps_cache"]["splits"]["train"]

    first_dir, first = run("first")
    second_dir, second = run("second")
    assert (first["status"], second["status"]) == ("miss", "hit") and first["key"] == second["key"]
    assert [p.name for p in cache.iterdir()] == [f"{first['key']}.safetensors"], "one entry, no temporary file left"
    assert logged_losses(first_dir) == logged_losses(second_dir)


def test_full_fine_tuning_with_precomputed_log_probs_holds_no_reference_model_and_trains_the_same(
    tmp_path, tiny_model_dir, cache, monkeypatch
):
    """With precompute_ref_log_probs TRL needs no reference while training: the kit's frozen copy for full fine-tuning
    stayed loaded (on a GPU: on the GPU) for the whole run all the same. The log-probs TRL then takes from the policy
    before its first step train as the copy's do."""
    import dpo_kit.training.train as train_module

    built = {}
    build_trainer = train_module.build_trainer

    def recorded(params, *args, **kwargs):
        trainer = build_trainer(params, *args, **kwargs)
        built[params.run.output_dir] = trainer.ref_model
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", recorded)
    precomputed = train(tmp_path, "precomputed", "lora.enabled=false", model=tiny_model_dir)
    inline = train(tmp_path, "inline", "lora.enabled=false", "dpo.precompute_ref_log_probs=false", model=tiny_model_dir)
    assert built[str(tmp_path / "precomputed")] is None, "no reference model held while training"
    assert built[str(tmp_path / "inline")] is not None, "computed each step, from the frozen copy"
    assert {e["status"] for e in precomputed.ref_logps_cache["splits"].values()} == {"miss"}
    assert_same_metrics(precomputed, inline)
