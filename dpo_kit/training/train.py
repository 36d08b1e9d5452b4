"""The train stage: TRL's DPOTrainer with a DPOConfig built from params and the hardware found.

LoRA (peft) is the default, with the reference implicit: TRL disables the adapter to get reference
log-probs, so no second model is loaded. QLoRA loads the base in 4/8-bit with bitsandbytes. With
LoRA off (full fine-tuning), a frozen reference copy is loaded from the same source.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_kit import manifest as mf
from dpo_kit.hardware import HardwareChoice
from dpo_kit.models.loading import deprecated_checkpointing_alias_quiet
from dpo_kit.params import Params, ParamsError
from dpo_kit.tracking import (
    finish_trackers,
    offline_wandb_run_hidden,
    params_callback,
    pin_wandb_mode,
    purge_tensorboard_after,
    rewind_trackio_after,
    tracker_environment,
    trackers,
    wandb_key_for_online,
)
from dpo_kit.training.checkpoints import RECORD_FILE, checkpoint_step, recorded_checkpoints

# The metrics the train notebook plots; names are TRL's, unchanged.
PLOTTED_METRICS = ("loss", "rewards/margins", "rewards/accuracies")


def dpo_config_kwargs(params: Params, run_dir: str | Path, hardware: HardwareChoice) -> dict[str, Any]:
    """DPOConfig arguments: params.dpo plus the keys the kit owns (paths, seed, tracking, precision).

    Precision and checkpointing follow the hardware unless params.dpo sets them explicitly: TRL's
    defaults (bf16 + checkpointing) are right for a GPU and were ~27x too slow for a small model on a CPU.
    """
    from trl import DPOConfig

    from dpo_kit.training.launch import in_launched_worker, sharding_strategy

    refuse_precision_the_hardware_lacks(params, hardware)
    fields = DPOConfig.__dataclass_fields__
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; set whichever is current.
    checkpointing_key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    settings: dict[str, Any] = {
        **precision_defaults(params, hardware),
        checkpointing_key: hardware.gradient_checkpointing,
        "dataloader_num_workers": 0,
        # Pinned host memory only speeds copies to a GPU; elsewhere torch warns that it is unused.
        "dataloader_pin_memory": hardware.device == "cuda",
    }
    if "include_num_input_tokens_seen" in fields:
        # The Trainer sums each batch's attention mask (one number per step), so the manifest can give tokens/s.
        settings["include_num_input_tokens_seen"] = "non_padding"
    if hardware.device == "cpu":
        # Without it transformers refuses bf16 on a machine without a GPU ("doesn't support bf16/gpu"), even where
        # params ask for it on a CPU that multiplies in bf16 natively; launched, it makes accelerate choose DDP
        # over gloo.
        settings["use_cpu"] = True
    if in_launched_worker():
        # One line per logged step stands in for the bar, whose carriage returns garble lines piped from workers.
        settings["disable_tqdm"] = True
        # LoRA and full fine-tuning use every trainable weight in each forward: DDP's search for unused ones only
        # costs a graph traversal per step (and torch warns about it).
        settings["ddp_find_unused_parameters"] = False
        if sharding_strategy() == "fsdp":
            settings[checkpointing_key] = False  # FSDP checkpoints activations itself (fsdp_activation_checkpointing)
    if "gradient_checkpointing" in params.dpo:  # the old name in a params file still wins
        settings.pop(checkpointing_key)
    settings.update(params.dpo)  # explicit params win over the hardware choice
    settings.update(
        output_dir=str(Path(run_dir) / "checkpoints"),
        run_name=params.run.name,
        seed=params.run.seed,
        data_seed=params.run.seed,
        report_to=trackers(params) or "none",
    )
    if "project" in fields:  # trackio's project (wandb's comes from WANDB_PROJECT); TrainingArguments has it since 5.x
        settings["project"] = params.tracking.project
    return settings


def refuse_precision_the_hardware_lacks(params: Params, hardware: HardwareChoice) -> None:
    """dpo.fp16 on a CPU: accelerate turns fp16 autocast on only on an accelerator (Accelerator.native_amp), so the
    run trained in fp32 while its manifest recorded fp16. Refused, here and when the params are read."""
    if hardware.device == "cpu" and params.dpo.get("fp16"):
        raise ParamsError(
            "dpo.fp16: true on a machine without a GPU would have no effect: accelerate applies fp16 autocast only on"
            " a GPU, so training would run in fp32 while the manifest said fp16. Leave dpo.fp16 out (fp32, the kit's"
            " choice on a CPU), or set dpo.bf16: true for bf16 autocast on the CPU"
        )


def refuse_training_this_machine_cannot_do(params: Params, project_dir: str | Path, hardware: HardwareChoice) -> None:
    """When the params are read (`dpo-kit validate`, the start of `dpo-kit run`): a precision or a launch this machine
    cannot give is refused before any stage, not by the train stage after the format stage has run."""
    from dpo_kit.training.launch import check_launch_when_read

    refuse_precision_the_hardware_lacks(params, hardware)
    check_launch_when_read(params, project_dir, hardware)
    # DPOConfig's and TrainingArguments' own checks across keys (loss_weights against loss_type, load_best_model_at_end
    # against the save and eval strategies, a negative warmup_steps, ...) run when the config is built: at the train
    # stage, after the format stage had sampled or downloaded the pairs. Built here too, into a folder it never writes.
    with tempfile.TemporaryDirectory() as folder:
        try:
            build_dpo_config(params, folder, hardware)
        except ValueError as error:
            if isinstance(error, ParamsError):
                raise
            raise ParamsError(f"dpo: trl.DPOConfig refuses these settings (TRL checks them only when the train stage"
                              f" builds its config, after the format stage): {error}") from None


def precision_defaults(params: Params, hardware: HardwareChoice) -> dict[str, bool]:
    """bf16 and fp16 as they stand before params.dpo is applied: the hardware's choice, or both off where params
    name either. A precision named in params replaces the hardware's whole: dpo.fp16 on a bf16 GPU (or dpo.bf16 on
    a T4) kept the hardware's other flag on, and TrainingArguments refused "fp16 and bf16" at the train stage."""
    if {"bf16", "fp16"} & set(params.dpo):
        return {"bf16": False, "fp16": False}
    return {"bf16": hardware.bf16, "fp16": hardware.fp16}


def mixed_precision(params: Params, hardware: HardwareChoice) -> str:
    """'bf16', 'fp16' or 'no': what the train stage's DPOConfig trains with (params' choice over the hardware's),
    as `accelerate launch --mixed_precision` says it. Launched, the Trainer keeps that value when DPOConfig has
    neither flag on, so the hardware's bf16 there would override a dpo.bf16: false."""
    settings = {**precision_defaults(params, hardware), **{k: v for k, v in params.dpo.items() if k in ("bf16", "fp16")}}
    bf16 = not settings["fp16"] if settings["bf16"] is None else settings["bf16"]  # TRL's None: bf16 unless fp16
    return "fp16" if settings["fp16"] else "bf16" if bf16 else "no"


def build_dpo_config(params: Params, run_dir: str | Path, hardware: HardwareChoice):
    from trl import DPOConfig

    return DPOConfig(**dpo_config_kwargs(params, run_dir, hardware))


def precision_record(config) -> dict[str, Any]:
    """What the run actually trained with (a DPOConfig or its kwargs), for the manifest."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    checkpointing = get("activation_checkpointing", None)
    return {
        "bf16": bool(get("bf16", False)),
        "fp16": bool(get("fp16", False)),
        "gradient_checkpointing": bool(get("gradient_checkpointing", False) if checkpointing is None else checkpointing),
    }


@dataclass
class TrainResult:
    log_history: list[dict[str, Any]]
    final_metrics: dict[str, float]
    model_dir: Path  # adapter/ for LoRA, trained/ for full fine-tuning
    precision: dict[str, Any]
    trainable_parameters: int
    total_parameters: int
    launch: dict[str, Any] | None = None  # processes and strategy, when trained under accelerate launch
    ref_logps_cache: dict[str, Any] | None = None  # the cache of reference log-probs: key and hit/miss per split
    cost: dict[str, Any] | None = None  # time, tokens/s and peak memory of the Trainer's train() call (training_cost)

    def summary(self) -> dict[str, Any]:
        return {
            "final_metrics": self.final_metrics,
            "model_dir": str(self.model_dir),
            "precision": self.precision,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            **({"launch": self.launch} if self.launch else {}),
            **({"ref_logps_cache": self.ref_logps_cache} if self.ref_logps_cache else {}),
            **({"cost": self.cost} if self.cost else {}),
        }


def log_line_callback():
    """A TrainerCallback that prints one plain line per logging step: in a notebook the Trainer shows an HTML
    progress table, which neither a log file nor `dpo-kit run`'s progress bar can show."""
    from transformers import TrainerCallback

    class LogLine(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                shown = ", ".join(f"{key} {logs[key]:.3g}" for key in PLOTTED_METRICS if key in logs)
                print(f"step {state.global_step}/{state.max_steps}: {shown}", flush=True)

    return LogLine()


def heartbeat_callback(run_dir: Path):
    """A TrainerCallback that refreshes the train stage's heartbeat in the manifest (at most every
    HEARTBEAT_SECONDS), so that a run resumed on another machine can tell a lost machine from a live one."""
    import time

    from transformers import TrainerCallback

    class Heartbeat(TrainerCallback):
        last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero and time.monotonic() - self.last >= mf.HEARTBEAT_SECONDS:
                self.last = time.monotonic()
                mf.update_stage(run_dir, "train", heartbeat=mf.now_iso())

    return Heartbeat()


@contextlib.contextmanager
def recording_interruptions(run_dir: Path):
    """Record the train stage as `interrupted` in the manifest on SIGINT (Ctrl-C, a notebook's interrupt) or
    SIGTERM (preemption, `kill`), then let the signal do what it would have done; `failed` on an error. The
    checkpoints saved so far stay, and the next start resumes from the newest. Recording is best effort: on a
    full disk the manifest cannot be written either, and that must not replace the error that says so (or stop
    the signal); the stage's entry then still says `running`, and the next start finds its process gone."""

    def record(**fields: Any) -> None:
        with contextlib.suppress(OSError):
            mf.update_stage(run_dir, "train", **fields)
            # The run's status too, as the runner records it: a notebook's failed training left the run `running`
            # with no stage running (manifest.json, and the report's list of incomplete runs, said so).
            mf.update_manifest(run_dir, status=fields["status"])

    def mark(signal_name: str) -> None:
        record(status="interrupted", interrupted=mf.now_iso(), reason=signal_name)

    def on_sigterm(signum, frame):
        mark("SIGTERM")
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)  # what SIGTERM does here without us (by default: end the process)

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        mark("SIGINT")
        raise
    except Exception as error:
        # Failed, not interrupted: recorded here too, so a notebook's kernel does not hold the stage as running.
        record(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


class CheckpointWriteError(OSError):
    """Training could not write its checkpoint or weights: the message names the path and what is intact."""


@contextlib.contextmanager
def clear_write_errors(checkpoints_dir: Path, writing: Path | None = None):
    """Turn a failed write (full disk, quota, read-only) into an error that names the folder, the space left and
    the checkpoints still intact, instead of a traceback from deep inside torch.save or safetensors (whose
    SafetensorError is no OSError: only its text says "(os error 28)"). `writing`: the folder being written, when
    it is not a checkpoint (the trained weights)."""
    try:
        yield
    except Exception as error:
        if not mf.is_write_failure(error):
            raise
        free = mf.free_space(checkpoints_dir.parent)
        steps = sorted((p for p in checkpoints_dir.glob("checkpoint-*") if checkpoint_step(p) >= 0), key=checkpoint_step)
        # Intact is what a resume would take: listed in the manifest, not only holding its record file (the disk
        # may fill between the record and the manifest, and a resume skips a checkpoint the manifest does not list).
        try:
            entry = mf.read_manifest(checkpoints_dir.parent).get("stages", {}).get("train", {})
        except (OSError, ValueError):
            entry = {}
        listed = recorded_checkpoints(entry)
        recorded = [p for p in steps if p.name in listed and (p / RECORD_FILE).is_file()]
        intact = [p.name for p in recorded]
        # The newest checkpoint the manifest does not list is the save that failed.
        failed = writing or next((p for p in reversed(steps) if p not in recorded), checkpoints_dir.parent)
        raise CheckpointWriteError(
            f"could not write {failed} ({free} on that filesystem): {error}. Checkpoints"
            f" recorded before are intact: {', '.join(intact) or 'none yet'}."
            " Free space (or fix the path), then resume: `dpo-kit run PARAMS --resume`, or run the notebook again."
        ) from error


def train_dpo(stage) -> TrainResult:
    """Run DPO for `stage` (a dpo_kit.run.stage.Stage) and save checkpoints, the adapter and the log: in this
    process, or under `accelerate launch` when params.launch asks for more processes or a config file."""
    from dpo_kit.training.launch import in_launched_worker, run_launched

    wandb_key_for_online(stage.params.tracking.report_to)  # before a worker is launched or a model loaded
    pin_wandb_mode(stage.params.tracking.report_to)  # launched workers run in the project folder, not this one
    with recording_interruptions(stage.run_dir):
        if stage.params.launch.launched and not in_launched_worker():
            handed_back = run_launched(stage)
            result = load_train_result(stage.run_dir, handed_back)
            result.launch = handed_back["launch"]
            return result
        return train_in_this_process(stage)


def train_in_this_process(stage) -> TrainResult:
    """Train in this process: the whole run, or one worker's share of a launched one. The trackers' environment
    (tracking.py) holds for the training only."""
    with tracker_environment(stage.params, stage.run_dir) as tracking:
        return _train(stage, tracking)


# peft and TRL read transformers' deprecated checkpointing alias while training (see the context manager).
@deprecated_checkpointing_alias_quiet()
def _train(stage, tracking: dict[str, Any]) -> TrainResult:
    from dpo_kit.data.pipeline import load_split
    from dpo_kit.models.loading import load_tokenizer, model_record, model_source
    from dpo_kit.training.checkpoints import RunIdentity, checkpoint_recorder
    from dpo_kit.training.launch import check_strategy_set_up, in_launched_worker
    from dpo_kit.training.ref_cache import RefLogpsStore

    params, run_dir = stage.params, stage.run_dir
    source = model_source(params, stage.project_dir)
    tokenizer = load_tokenizer(source, params)
    config = build_dpo_config(params, run_dir, stage.hardware)
    train_dataset = load_split(run_dir, "train")
    eval_dataset = load_split(run_dir, "eval") if config.eval_strategy != "no" else None

    # With precompute_ref_log_probs, the reference log-probs come from the on-disk cache when an earlier run
    # computed them for the same reference, data and settings (training/ref_cache.py); else TRL computes them.
    store = RefLogpsStore() if config.precompute_ref_log_probs else None
    trainer = build_trainer(
        params, source, stage.hardware, config, tokenizer, train_dataset, eval_dataset,
        ref_logps_store=store,
        model_record=model_record(params, stage.project_dir) if store is not None else None,
        callbacks=[log_line_callback(), checkpoint_recorder(run_dir, RunIdentity.of_run(run_dir)),
                   heartbeat_callback(run_dir)],
    )  # fmt: skip
    # After the Trainer's tracker callbacks: the run's params go to the tracker runs they start (tracking.py).
    trainer.add_callback(params_callback(params, trainer.callback_handler.callbacks))
    distributed_type = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]  # e.g. MULTI_CPU, FSDP
    if in_launched_worker():
        check_strategy_set_up(distributed_type)
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # without a bar the Trainer prints each log dict; LogLine says it
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    if trainable == 0:
        # A loss stuck at ln 2 with zero rewards is the symptom (trl#4023); fail before wasting the run.
        raise RuntimeError("no trainable parameters: check lora.target_modules against the model's module names")

    model_dir = run_dir / ("adapter" if params.lora.enabled else "trained")
    main_process = trainer.is_world_process_zero()
    if stage.resume_from and main_process:
        # The steps past the checkpoint, which the interrupted training may have logged, are to show once.
        resumed_step = checkpoint_step(Path(stage.resume_from))
        purge_tensorboard_after(trainer.callback_handler.callbacks, resumed_step)
        if "trackio" in trackers(params) and (rewound := rewind_trackio_after(params, config, resumed_step)):
            print(f"trackio: deleted the {rewound} rows run {params.run.name!r} logged after step {resumed_step}:"
                  " the resumed training logs those steps again", flush=True)  # fmt: skip
    processes = f"process {trainer.args.process_index} of {trainer.args.world_size}"
    with clear_write_errors(Path(config.output_dir)):
        # On resume the Trainer restores the weights, optimizer, scheduler, RNG states and step from the
        # checkpoint, and skips the batches already seen, so the rest of the run is the uninterrupted one's.
        reset_peak_memory()
        output = trainer.train(resume_from_checkpoint=str(stage.resume_from) if stage.resume_from else None)
    with clear_write_errors(Path(config.output_dir), writing=model_dir):
        trainer.save_model(str(model_dir))  # every process takes part (ZeRO-3/FSDP gather); the main one writes
        if main_process:
            tokenizer.save_pretrained(str(model_dir))
    history = trainer.state.log_history
    if main_process:
        (run_dir / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
        # Written even when empty: a training run again without trackers leaves no entry of the earlier one's.
        mf.update_manifest(run_dir, tracking=finish_trackers(tracking))
    if trainer.args.world_size > 1:
        print(f"{processes}: trained {trainer.state.global_step} steps" + (f", saved {model_dir}" if main_process else ""),
              flush=True)  # fmt: skip
    return TrainResult(
        log_history=history,
        final_metrics=final_train_metrics(history),
        model_dir=model_dir,
        precision=precision_record(config),
        trainable_parameters=trainable,
        total_parameters=total,
        launch={"process_index": trainer.args.process_index, "world_size": trainer.args.world_size,
                "distributed_type": distributed_type}
        if in_launched_worker() else None,
        ref_logps_cache=trainer.ref_logps_cache or None,
        cost=training_cost(output.metrics, trainer, getattr(trainer.model, "hf_device_map", None)),  # peft forwards it
    )  # fmt: skip


@deprecated_checkpointing_alias_quiet()  # peft reads the old name when it wraps the model
def build_trainer(params: Params, source, hardware: HardwareChoice, config, tokenizer, train_dataset,
                  eval_dataset=None, *, ref_logps_store=None, model_record=None, callbacks=None, trainer_class=None):
    """The train stage's DPOTrainer: the policy loaded (and quantized) as params say, a frozen reference copy
    for full fine-tuning, and params' LoRA. TRL checks the model, LoRA and DPOConfig together only here, so a
    test builds it for every params file (tests/test_params.py). `trainer_class`: a subclass of
    `kit_trainer_class()` for a bench's variant of the training (the train stage never passes one)."""
    from dpo_kit.models.loading import load_causal_lm, lora_config
    from dpo_kit.training.launch import sharding_strategy

    # Full fine-tuning keeps fp32 master weights (bf16/fp16 stay autocast only): AdamW steps of ~1e-6 vanish
    # in bf16 weights, and fp16 weights cannot be unscaled. LoRA's adapters are fp32 on any base dtype.
    dtype = "float32" if not params.lora.enabled and params.model.dtype == "auto" else None
    model = load_causal_lm(source, params, dtype=dtype, quantized=True, hardware=hardware)
    # Loaded here rather than by TRL, so it gets the same revision and trust_remote_code as the policy. It is
    # frozen, so it stays in the hardware's dtype (bf16 on a GPU): half the memory of an fp32 copy. With
    # precompute_ref_log_probs there is none: TRL takes the reference log-probs from the policy before its first
    # step and needs no reference while training, but a copy passed in stayed loaded (on the GPU) the whole run,
    # the memory precompute is there to save. Sharded (ZeRO, FSDP) the copy is passed still: under FSDP the policy
    # is not sharded before train(), so TRL would load a reference itself, by name only, and the copy is sharded
    # like the policy under ZeRO-3; the policy's own precompute there is a path this kit has not run.
    precomputed = config.precompute_ref_log_probs and sharding_strategy() is None
    reference = None if params.lora.enabled or precomputed else load_causal_lm(source, params, hardware=hardware)
    return (trainer_class or kit_trainer_class())(
        ref_logps_store=ref_logps_store,
        model_record=model_record,
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(params),
        callbacks=callbacks,
    )


# TRL 1.16's card template links its base model and the quick start's model unconditionally: a base model that is no
# hub id (a local folder, a converted GGUF: TRL passes None) and a model not pushed (no hub_model_id) are rendered
# as these, a link to huggingface.co/None and a pipeline that loads "None".
TRL_CARD_NO_BASE_MODEL = "[None](https://huggingface.co/None)"
TRL_CARD_NO_HUB_MODEL = 'generator = pipeline("text-generation", model="None",'


def keep_model_card_links_true(directory: str | Path) -> None:
    """Rewrite the README.md model card TRL or peft wrote into `directory` so it links nothing that is not there
    and names no local path: TRL's sentence on a base model that is no hub id says "a local model" instead of
    linking huggingface.co/None, its quick start loads the run's merged/ rather than "None", and peft's
    `base_model` (with its `base_model:adapter:` tag), the absolute path of a local or converted base model, which
    the hub would take for a model id and which names the user's folders, is left out. A hub id stays as it is,
    linked; adapter_config.json keeps the path, which loading the adapter reads."""
    from huggingface_hub import ModelCard

    readme = Path(directory) / "README.md"
    if not readme.is_file():
        return
    card = ModelCard.load(readme)
    base = card.data.get("base_model")
    if isinstance(base, str) and (os.path.isabs(base) or os.path.exists(base)):
        card.data.base_model = None
        if card.data.tags:
            card.data.tags = [tag for tag in card.data.tags if tag != f"base_model:adapter:{base}"]
    card.text = card.text.replace(TRL_CARD_NO_BASE_MODEL, "a local model (not on the Hugging Face Hub)").replace(
        TRL_CARD_NO_HUB_MODEL,
        "# the merged model this run's merge stage writes, from the run directory\n"
        'generator = pipeline("text-generation", model="merged",',
    )
    if str(card) != readme.read_text(encoding="utf-8"):
        card.save(readme)


@functools.cache
def kit_trainer_class() -> type:
    """The DPOTrainer the train stage builds: training/ref_cache.py's (reference log-probs cached on disk), with
    TRL's per-checkpoint model card written without asking an offline wandb run for the URL it does not have
    (tracking.offline_wandb_run_hidden), and its cards and peft's kept free of broken links and local paths
    (keep_model_card_links_true)."""
    from dpo_kit.training.ref_cache import cached_dpo_trainer_class

    class KitDPOTrainer(cached_dpo_trainer_class()):
        def create_model_card(self, *args, **kwargs):
            with offline_wandb_run_hidden():
                super().create_model_card(*args, **kwargs)
            if self.is_world_process_zero():
                keep_model_card_links_true(self.args.output_dir)

        def _save(self, output_dir=None, state_dict=None):
            # Every save of the weights (each checkpoint-N, the final adapter/) goes through here, and peft writes
            # its own card beside them; tidied before the checkpoint recorder hashes the files (on_save comes after).
            super()._save(output_dir, state_dict)
            if self.args.should_save:
                keep_model_card_links_true(output_dir if output_dir is not None else self.args.output_dir)

        def _save_checkpoint(self, model, trial):
            # transformers deletes the checkpoints beyond save_total_limit here, right after writing the new one and
            # before on_save records it (checkpoints.checkpoint_recorder, which deletes them once it has): with
            # save_total_limit 1, a process killed in between (the record hashes every file: seconds for a large
            # model) left nothing to resume from, the recorded checkpoint deleted and the new one not trusted.
            if not any(getattr(callback, "rotates_checkpoints", False) for callback in self.callback_handler.callbacks):
                return super()._save_checkpoint(model, trial)  # no recorder (a bench's training): the Trainer's way
            limit, self.args.save_total_limit = self.args.save_total_limit, None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit

        def _run_epoch(self, *args, **kwargs):
            # Resumed from the checkpoint of the last step (the run stopped while saving the trained weights, or
            # after): the Trainer asks whether max_steps is reached only after a step, so it trained one more
            # (measured with transformers 5.25: step 41 of 40, and a checkpoint-41). Nothing is left to train.
            if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
                self.control.should_training_stop = True
                return None
            self._resume_trl_token_count()
            return super()._run_epoch(*args, **kwargs)

        def _resume_trl_token_count(self):
            """TRL counts its `num_tokens` metric in the trainer (`_total_train_tokens`), which no checkpoint keeps: a
            resumed run logged it from 0 again (measured with TRL 1.16: 2793 at step 4, 690 at step 5 after resuming
            from checkpoint-4), in train_log.jsonl and the manifest's final_metrics. It continues from the checkpoint's
            count: the value TRL logged at that step, or else the Trainer's, which counts the same attention masks
            (include_num_input_tokens_seen "non_padding", the kit's setting) and is kept in the checkpoint."""
            if self.state.global_step == 0 or self._total_train_tokens:  # a fresh run, or counting already
                return
            logged = [row["num_tokens"] for row in self.state.log_history
                      if row.get("step") == self.state.global_step and "loss" in row and "num_tokens" in row]  # fmt: skip
            if logged:
                self._total_train_tokens = int(logged[-1])
            elif self.args.include_num_input_tokens_seen == "non_padding":
                self._total_train_tokens = self.state.num_input_tokens_seen // self._tp_size

    return KitDPOTrainer


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def training_cost(train_metrics: dict[str, Any], trainer, device_map: dict | None = None) -> dict[str, Any]:
    """What this train() call cost, for the manifest: its wall time (the Trainer's train_runtime: the steps, and the
    checkpoints and evaluations between them), the unpadded tokens the policy trained on and their rate, and peak
    memory: the GPU's allocated peak during training, and the process's peak resident memory so far (on a CPU the
    only one; in a kernel shared by several stages it covers the stages before too). A resumed run counts its own
    share only. With a device_map (the kit gives one on a GPU) it names the devices the weights were placed on.
    Under a launcher the counts are all processes' and the memory the main process's."""
    import resource
    import sys

    import torch

    seconds = train_metrics.get("train_runtime")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes
    tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    cost: dict[str, Any] = {
        "train_runtime_s": seconds,
        "steps": trainer.state.global_step - getattr(trainer, "_initial_global_step", 0),
        "pairs_per_second": train_metrics.get("train_samples_per_second"),
        "tokens": tokens if trainer.args.include_num_input_tokens_seen != "no" else None,
        "process_peak_rss_gib": round(peak_rss / 2**30, 3),
    }
    if cost["tokens"] is not None and seconds:
        cost["tokens_per_second"] = round(tokens / seconds, 1)
    if device_map:
        cost["weights_on_devices"] = sorted({str(device) for device in device_map.values()})
    if torch.cuda.is_available():
        cost["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        cost["cuda_device"] = torch.cuda.get_device_name()
    return cost


def load_train_result(run_dir: str | Path, summary: dict[str, Any]) -> TrainResult:
    """The TrainResult of a completed train stage: its log from train_log.jsonl, the rest from its manifest
    entry (`summary`, what `TrainResult.summary()` recorded)."""
    log_path = Path(run_dir) / "train_log.jsonl"
    # The entry names the weights by the path they were saved to: read them from this run directory, where they are
    # now. A run moved or copied to another folder (or machine) otherwise read the weights of the run it was copied
    # from, or, that one gone, counted as unreadable and was trained again.
    model_dir = Path(run_dir) / Path(summary["model_dir"]).name
    if not model_dir.is_dir():
        raise FileNotFoundError(f"the trained weights {model_dir} are gone")
    history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return TrainResult(
        log_history=history,
        final_metrics=final_train_metrics(history),
        model_dir=model_dir,
        precision=summary["precision"],
        trainable_parameters=summary["trainable_parameters"],
        total_parameters=summary["total_parameters"],
        ref_logps_cache=summary.get("ref_logps_cache"),
        cost=summary.get("cost"),
    )


def final_train_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of each training metric (TRL names), ignoring eval rows and the summary row.

    The summary row is the one with train_loss (the Trainer's last, from _finalize_training): with the tokens
    counted (the kit's include_num_input_tokens_seen) every step's row carries a train_runtime too, and taking
    that for the mark of the summary row left the loss and rewards out of the manifest's final_metrics."""
    latest: dict[str, float] = {}
    for row in history:
        if "train_loss" in row:
            if "train_runtime" in row:
                latest["train_runtime"] = row["train_runtime"]
            continue
        for key, value in row.items():
            if not key.startswith("eval_") and isinstance(value, (int, float)):
                latest[key] = value
    return latest


def starts_at_ln2(params: Params) -> bool:
    """Whether the run's training loss is ln 2 where the policy equals the reference: DPO's sigmoid loss and robust
    DPO's, alone and unweighted. IPO starts at (1/(2 beta))^2, hinge at 1, a mixture elsewhere again."""
    losses, weights = params.loss_types, params.dpo.get("loss_weights")
    return len(losses) == 1 and losses[0] in ("sigmoid", "robust") and weights in (None, [1.0], [1])


def plot_training_curves(history: list[dict[str, Any]], path: str | Path | None = None, params: Params | None = None):
    """Loss, rewards/margins and rewards/accuracies against step; saved to `path` when given. With the run's
    `params`, the loss panel marks ln 2, where a loss that starts there and stays has learnt nothing."""
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot): nothing global to close, and it shows inline once, as a cell's value.
    figure = Figure(figsize=(4.2 * len(PLOTTED_METRICS), 3.2))
    axes = figure.subplots(1, len(PLOTTED_METRICS))
    for axis, metric in zip(axes, PLOTTED_METRICS, strict=True):
        for prefix, style in (("", "-o"), ("eval_", "--s")):
            rows = [row for row in history if prefix + metric in row]
            if rows:
                axis.plot([r["step"] for r in rows], [r[prefix + metric] for r in rows], style, ms=3,
                          label="train" if not prefix else "eval")
        axis.set_title(metric)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if params is not None and starts_at_ln2(params):
        axes[0].axhline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2 (no learning)")
    axes[0].legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
