"""A persistent on-disk cache of the reference log-probs that `dpo.precompute_ref_log_probs` computes.

TRL recomputes them in every run (trl#3985) and its own datasets cache file is keyed by a hash that, with
LoRA, includes the randomly initialised adapter, and lives in a temporary directory for in-memory datasets.
A sweep over beta or the learning rate uses the same reference on the same pairs every time, so the kit keeps
them in `$DPO_KIT_CACHE/ref-logps/<key>.safetensors` (default ~/.cache/dpo-kit) and hands them to TRL
through TRL's own precompute path: the `ref_chosen_logps` / `ref_rejected_logps` columns that
`DPOTrainer._precompute_ref_logps` returns and `_compute_loss` reads. On a hit the reference never runs; on
a miss TRL's per-batch `compute_ref_log_probs` runs as in TRL's pass, without TRL's datasets cache file.

The key is the sha256 of every input the numbers depend on (`key_fields`): the reference weights as loaded
(names, dtypes and bytes of the base model's state dict, LoRA adapters excluded, quantization state
included) and its config; the token ids TRL feeds it (prompt/chosen/rejected ids, which carry the chat
template, and the row order); the collator's max_length, truncation_mode, padding; the precompute batch
size, mixed precision, device, attention implementation, ld_alpha; and the torch/transformers/trl/peft/bitsandbytes
versions.
Loss settings (beta, loss_type, learning rate) are not in it: they do not change the reference.

An entry is one safetensors file (never pickle), written to a temporary name, synced and renamed into place.
Its metadata holds the key, the key fields, the row count and the sha256 of the two tensors. On read every one
is checked (key fields hash to the key, rows and shapes match the dataset, the data hashes to the recorded
sha256); an entry that fails any check, or cannot be read, is deleted (where the cache can be written) and
recomputed, and the manifest says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from dpo_kit.models.gguf import cache_root

FORMAT = 1
SUBDIR = "ref-logps"
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # what DataCollatorForPreference reads
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # what TRL's precompute adds and _compute_loss reads


def cache_dir() -> Path:
    return cache_root() / SUBDIR


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# What the numbers depend on


class Unhashable(Exception):
    """The reference weights cannot be read whole in this process (sharded by ZeRO-3 or FSDP, on the meta device)."""


def _tensor_bytes(tensor) -> bytes:
    import torch

    if getattr(tensor, "ds_id", None) is not None or type(tensor).__name__ == "DTensor":
        raise Unhashable("the weights are sharded (ZeRO-3 or FSDP)")
    if tensor.device.type == "meta":
        raise Unhashable("weights on the meta device (offloaded)")
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def reference_state_items(model, adapter_prefix: str | None = None):
    """(name, tensor) of the reference's state dict, sorted. With `adapter_prefix` (a peft model whose reference is
    the base with the adapters disabled) the adapter tensors are left out and peft's wrapping is taken off the
    names, so the same base gives the same names whatever the LoRA rank or target modules."""
    for name, tensor in sorted(model.state_dict().items()):
        if adapter_prefix is not None:
            parts = name.split(".")
            if any(part.startswith(adapter_prefix) for part in parts) or "modules_to_save" in parts:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        yield name, tensor


def weights_sha256(model, adapter_prefix: str | None = None) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the reference's weights as loaded (quantized ones too)."""
    digest = hashlib.sha256()
    for name, tensor in reference_state_items(model, adapter_prefix):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def config_sha256(config) -> str:
    """sha256 of the model config (rope, norms, quantization compute dtype...), less names and versions."""
    values = json.loads(config.to_json_string(use_diff=False))
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        values.pop(volatile, None)
    return cache_key(values)


def data_sha256(dataset, columns=TOKEN_COLUMNS) -> str:
    """sha256 over the token ids TRL feeds the reference, row by row in dataset order (filters applied)."""
    import numpy as np
    import pyarrow as pa

    table = dataset.with_format("arrow")[:] if len(dataset) else None
    digest = hashlib.sha256(f"rows={len(dataset)}\n".encode())
    for column in columns:
        digest.update(f"{column}\n".encode())
        if table is None:
            continue
        array = table.column(column).combine_chunks()
        if isinstance(array, pa.ChunkedArray):  # an empty chunked array stays chunked
            array = pa.concat_arrays(array.chunks) if array.num_chunks else pa.array([], pa.list_(pa.int64()))
        digest.update(np.asarray(array.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
        digest.update(np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """The packages whose code computes the reference log-probs: peft disables the adapters for a LoRA run's
    reference, and bitsandbytes de-quantizes a QLoRA run's weights (read from the metadata: importing it here would
    load its CUDA probe)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers
    import trl

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    for package in ("peft", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


# ---------------------------------------------------------------------------------------------------------------
# The store


class CorruptEntry(Exception):
    """An entry failed a check; the message says which."""


def tensors_sha256(chosen, rejected) -> str:
    digest = hashlib.sha256()
    for tensor in (chosen, rejected):
        digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


class RefLogpsStore:
    """Entries `<directory>/<key>.safetensors`: float32 tensors ref_chosen_logps and ref_rejected_logps, one value
    per pair in dataset order, with the key, its fields, the row count and the data's sha256 in the metadata."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, rows: int):
        """((chosen, rejected), "hit"); (None, "miss") when there is no entry; (None, "corrupt: why") when the
        entry fails a check or cannot be read: it is then deleted, so the caller recomputes and stores a good one.
        In a cache that cannot be written (a read-only mount shared by a team) the entry stays, and the status
        says so: the run recomputes, as it does when it cannot store, rather than failing on the deletion."""
        path = self.path(key)
        if not path.is_file():
            return None, "miss"
        try:
            return self._read(path, key, rows), "hit"
        except CorruptEntry as error:
            status = f"corrupt: {error}"
        except OSError as error:  # a read error, or a file the run may not read
            status = f"corrupt: unreadable ({type(error).__name__}: {error})"
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            status += f"; not deleted ({type(error).__name__}: {error})"
        return None, status

    def _read(self, path: Path, key: str, rows: int):
        import torch
        from safetensors.torch import load

        blob = path.read_bytes()
        try:
            header_size = int.from_bytes(blob[:8], "little")
            metadata = json.loads(blob[8 : 8 + header_size]).get("__metadata__") or {}
            tensors = load(blob)
            fields = json.loads(metadata.get("key_fields", "null"))
        except Exception as error:  # noqa: BLE001 - truncated, garbled header, bad offsets: all corrupt
            raise CorruptEntry(f"unreadable ({type(error).__name__}: {error})") from None
        if metadata.get("format") != str(FORMAT):
            raise CorruptEntry(f"format {metadata.get('format')!r}, expected {FORMAT}")
        if metadata.get("key") != key or cache_key(fields) != key:
            raise CorruptEntry("the key or key fields do not match the file name")
        if metadata.get("rows") != str(rows):
            raise CorruptEntry(f"{metadata.get('rows')} rows recorded, the dataset has {rows}")
        if set(tensors) != set(COLUMNS):
            raise CorruptEntry(f"tensors {sorted(tensors)}, expected {list(COLUMNS)}")
        chosen, rejected = (tensors[name] for name in COLUMNS)
        for tensor in (chosen, rejected):
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != (rows,):
                raise CorruptEntry(f"a tensor of {tensor.dtype} {tuple(tensor.shape)}, expected float32 ({rows},)")
        if tensors_sha256(chosen, rejected) != metadata.get("sha256"):
            raise CorruptEntry("sha256 mismatch: the log-probs are not the ones written")
        return chosen, rejected

    def save(self, key: str, fields: dict[str, Any], chosen, rejected) -> Path:
        """Write atomically: a temporary file in the same directory, synced, then renamed over the entry."""
        import torch
        from safetensors.torch import save

        chosen = chosen.detach().to(torch.float32).cpu().contiguous()
        rejected = rejected.detach().to(torch.float32).cpu().contiguous()
        if chosen.shape != rejected.shape or chosen.dim() != 1:
            raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)}: expected (rows,)")
        metadata = {"format": str(FORMAT), "key": key, "key_fields": canonical_json(fields),
                    "rows": str(len(chosen)), "sha256": tensors_sha256(chosen, rejected)}  # fmt: skip
        blob = save(dict(zip(COLUMNS, (chosen, rejected), strict=True)), metadata=metadata)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "wb") as stream:
                stream.write(blob)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path


# ---------------------------------------------------------------------------------------------------------------
# The trainer


@contextlib.contextmanager
def datasets_bars_off():
    """No datasets progress bar inside the block, and afterwards as before. Joining the log-prob columns to TRL's
    dataset (filtered, so it holds an indices mapping) makes datasets flatten both with a bar each, "Flattening the
    indices", in memory and in no time: bookkeeping a reader of notebook 02 need not watch."""
    import datasets

    were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not were_off:
            datasets.enable_progress_bars()


def cached_dpo_trainer_class():
    """DPOTrainer whose `_precompute_ref_logps` reads and fills the cache; built on demand (TRL is heavy)."""
    from trl import DPOTrainer

    return _trainer_class(DPOTrainer)


_CLASSES: dict[type, type] = {}


def _trainer_class(base: type) -> type:  # noqa: C901 - one class, kept together
    if base in _CLASSES:
        return _CLASSES[base]

    class CachedRefLogpsDPOTrainer(base):
        """TRL's DPOTrainer with the reference log-probs of `precompute_ref_log_probs` kept on disk across runs.

        `ref_logps_store`: a RefLogpsStore (None: TRL's behaviour, no cache). `model_record`: the model's source
        (name, revision, GGUF sha256) for the manifest. After __init__, `ref_logps_cache` says what happened."""

        def __init__(self, *args, ref_logps_store: RefLogpsStore | None = None, model_record=None, **kwargs):
            self._ref_logps_store = ref_logps_store
            self._ref_common_fields: dict[str, Any] | None = None
            self._ref_unhashable: str | None = None
            self.ref_logps_cache: dict[str, Any] = {}
            if ref_logps_store is not None:
                self.ref_logps_cache = {"dir": str(ref_logps_store.directory), "model": model_record or {}, "splits": {}}
            super().__init__(*args, **kwargs)

        def _reference_fields(self) -> dict[str, Any]:
            """The key fields shared by every split: the reference, the collator and the compute settings."""
            import torch
            from peft import PeftModel

            if self._ref_common_fields is not None:
                return self._ref_common_fields
            reference = self.accelerator.unwrap_model(self.ref_model or self.model)
            adapter_prefix = None
            if self.ref_model is None and isinstance(reference, PeftModel):
                # TRL's reference is the base with the adapter disabled, unless an adapter named "ref" exists:
                # then that adapter is the reference, and every adapter stays in the hash.
                if "ref" not in reference.peft_config:
                    adapter_prefix = getattr(reference.base_model, "prefix", "lora_")
                base = reference.get_base_model()
            else:
                base = reference
            collator = self.data_collator
            collator_fields = {
                name: getattr(collator, name, None) for name in ("pad_token_id", "max_length", "truncation_mode",
                                                                 "pad_to_multiple_of")
            }  # fmt: skip
            device = self.accelerator.device
            template = getattr(self.processing_class, "chat_template", None)
            fields = {
                "format": FORMAT,
                "reference": {
                    "weights_sha256": weights_sha256(reference, adapter_prefix),
                    "config_sha256": config_sha256(base.config),
                    "class": type(base).__name__,
                    "dtype": str(base.dtype),
                    "attn_implementation": getattr(base.config, "_attn_implementation", None),
                },
                "collator": {"class": type(collator).__name__, **collator_fields},
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
                "mixed_precision": str(self.accelerator.mixed_precision),
                "device": device.type + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
                "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None,
                "ld_alpha": self.ld_alpha,
                "use_liger_kernel": bool(getattr(self.args, "use_liger_kernel", False)),
                "versions": versions(),
            }
            self._ref_common_fields = fields
            return fields

        def _lookup(self, dataset, batch_size: int):
            """On the main process: (key, fields, cached values or None, status)."""
            if self._ref_unhashable is not None:
                return None, None, None, self._ref_unhashable
            try:
                common = self._reference_fields()
            except Unhashable as error:
                self._ref_unhashable = f"off: {error}"
                return None, None, None, self._ref_unhashable
            fields = {**common, "data_sha256": data_sha256(dataset), "rows": len(dataset), "batch_size": batch_size}
            key = cache_key(fields)
            values, status = self._ref_logps_store.load(key, len(dataset))
            return key, fields, values, status

        def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
            from datasets import Dataset, Features, IterableDataset, Value, concatenate_datasets

            store = self._ref_logps_store
            if store is None or isinstance(dataset, IterableDataset) or not set(TOKEN_COLUMNS) <= set(dataset.column_names):
                return super()._precompute_ref_logps(dataset, name, batch_size)
            # The main process decides and reads; the others get its answer (their filesystem may differ), so every
            # process takes the same path through TRL's collective calls.
            answer = [self._lookup(dataset, batch_size) if self.accelerator.is_main_process else None]
            if self.accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(answer, from_process=0)
            key, fields, values, status = answer[0]
            record = {"key": key, "rows": len(dataset), "status": status}
            if fields is not None:
                record["data_sha256"] = fields["data_sha256"]
                self.ref_logps_cache["key_fields"] = {k: v for k, v in fields.items() if k not in ("data_sha256", "rows")}
            self.ref_logps_cache["splits"][name] = record
            if values is None:
                values = self._compute_ref_logps(dataset, name, batch_size)
                if key is not None:
                    record["status"] = "miss" if status == "miss" else f"recomputed ({status})"
                if key is not None and self.accelerator.is_main_process:
                    try:
                        store.save(key, fields, *values)
                    except OSError as error:  # a full disk or read-only cache: the next run recomputes, nothing more
                        record["status"] += f", not stored ({type(error).__name__}: {error})"
            chosen, rejected = values
            columns = Dataset.from_dict(
                {COLUMNS[0]: chosen.tolist(), COLUMNS[1]: rejected.tolist()},
                features=Features({column: Value("float32") for column in COLUMNS}),
            )
            with datasets_bars_off():
                return concatenate_datasets([dataset, columns], axis=1)  # what TRL's _precompute_ref_logps returns

        def _compute_ref_logps(self, dataset, name: str, batch_size: int):
            """TRL's precompute pass (DPOTrainer._precompute_ref_logps of TRL 1.16) without its datasets cache file:
            for an in-memory dataset that file gets a random name in each process, so under `accelerate launch` the
            other processes look for a file that only the main process wrote. Every process gets all the values."""
            import torch
            from accelerate.utils import tqdm
            from torch.utils.data import DataLoader
            from trl.models import prepare_deepspeed

            loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory, shuffle=False)  # fmt: skip
            loader = self.accelerator.prepare(loader)
            if self.ref_model is None and self.is_deepspeed_enabled:  # as TRL: one inference engine, reused
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            else:
                model = self.ref_model or self.model
            chosen, rejected = [], []
            for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset",
                              disable=bool(os.environ.get("TQDM_DISABLE", ""))):  # fmt: skip
                pair = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
                chosen.append(pair[0].float().cpu())
                rejected.append(pair[1].float().cpu())
            if not chosen:
                return torch.zeros(0), torch.zeros(0)
            return torch.cat(chosen), torch.cat(rejected)

    _CLASSES[base] = CachedRefLogpsDPOTrainer
    return CachedRefLogpsDPOTrainer
