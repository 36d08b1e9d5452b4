"""The train stage under `accelerate launch`: DDP, DeepSpeed ZeRO-2/3 or FSDP2, from the same params file.

With `launch.num_processes` > 1 (or a `launch.config_file`), the notebook does not train in its own kernel:
it starts `accelerate launch ... -m dpo_kit.training.worker`, prints the workers' lines as they come, and
reads the result back from the run directory. GPUs are then never forked from a kernel, and an interrupt in
the notebook stops the launcher and every worker. Nothing changes for a run without `launch`.

Before starting, the combination is checked, and the ones that cannot work are refused with a message that
says what to change: ZeRO/FSDP without GPUs, DeepSpeed not installed, more processes than GPUs, QLoRA under
ZeRO-3/FSDP, the Trainer's checkpointing under an FSDP config that checkpoints activations itself. Each
worker then checks that accelerate set up the sharding its config asked for: on CPU it runs an FSDP config as
plain DDP without a word. TRL 1.x itself wraps a full fine-tuning reference model for ZeRO-3
and FSDP and runs `precompute_ref_log_probs` through a DeepSpeed engine (the traps of trl#1117 and #1497); the
kit's part is to load the models without a device_map under both, so that ZeRO-3 and FSDP can place the shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from dpo_kit.params import SHIPPED_ACCELERATE_CONFIGS, Params

CONFIGS_DIR = Path(__file__).resolve().parent / "accelerate_configs"
WORKER_ENV = "DPO_KIT_LAUNCHED"  # set in the workers: train there, never launch again
RESULT_FILE = "train_result.json"  # what the main worker hands back to the notebook
SHARDED_KINDS = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}  # accelerate's distributed types that shard the model
# accelerate's distributed types that it launches as one process whatever --num_processes says (its simple launcher;
# MULTI_CPU starts more only through an mpirun hostfile): what `accelerate config` writes for "no distributed training".
ONE_PROCESS_KINDS = ("NO", "MULTI_CPU")


class LaunchError(RuntimeError):
    """The launch cannot start or a worker failed: the message says which and what to change."""


def in_launched_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def sharding_strategy() -> str | None:
    """'deepspeed' or 'fsdp' inside a worker that accelerate launched with one, else None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return None


def check_strategy_set_up(distributed_type: str) -> None:
    """Inside a worker: accelerate set up the sharding its config asked for, or training stops here.

    accelerate 1.x sets up FSDP and DeepSpeed only over accelerators. Launched on CPU with the fsdp2 config, both
    workers trained as plain DDP (distributed type MULTI_CPU) without a word, each holding the whole model
    (measured with accelerate 1.15; tests/test_launch.py checks it). check_launch refuses that case before
    launching; this catches any other way of arriving there, e.g. a launcher started by hand."""
    asked = sharding_strategy()
    if asked is not None and distributed_type != asked.upper():
        name = SHARDED_KINDS[asked.upper()]
        raise LaunchError(
            f"the accelerate config asks for {name}, and accelerate set up {distributed_type} instead, which would"
            f" train without sharding the model. {name} needs GPUs that accelerate can see; on CPU, leave"
            " launch.config_file empty (launch.num_processes > 1 runs DDP over gloo)."
        )


def resolve_config_file(params: Params, project_dir: str | Path) -> Path | None:
    """The accelerate config the params name: a shipped one by name, or a file relative to the project."""
    name = params.launch.config_file
    if name is None:
        return None
    if name in SHIPPED_ACCELERATE_CONFIGS:
        return CONFIGS_DIR / f"{name}.yaml"
    path = Path(project_dir) / name
    if not path.is_file():
        raise LaunchError(
            f"launch.config_file: {path} not found; name one shipped with dpo-kit"
            f" ({', '.join(SHIPPED_ACCELERATE_CONFIGS)}) or a YAML file written by `accelerate config`"
        )
    return path


def read_config(path: Path):
    """The config as accelerate's own parser reads it (unknown keys are refused there)."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        return load_config_from_file(str(path))
    except Exception as error:  # noqa: BLE001 - bad YAML, unknown keys, a value accelerate does not know: all unusable
        # Otherwise a traceback from `dpo-kit validate` and `dpo-kit run` (ParamsError and LaunchError are what they say).
        raise LaunchError(
            f"launch.config_file {path}: accelerate cannot read it ({type(error).__name__}: {error}). Write it with"
            " `accelerate config --config_file PATH`, or name a shipped one (" + ", ".join(SHIPPED_ACCELERATE_CONFIGS) + ")"
        ) from None


def refuse_settings_params_override(config, params: Params, hardware) -> None:
    """A setting that the config file gives a value of its own (not accelerate's default, as the shipped files leave
    them) and that params decide otherwise. The launch command carries params' values, which accelerate takes over the
    file's: a config from `accelerate config` for 8 GPUs, with launch.num_processes left at 1, trained in one process
    without a word; a DeepSpeed gradient_accumulation_steps other than dpo's failed only once the workers had loaded the
    model (transformers' "DeepSpeed config values that mismatch TrainingArguments values")."""
    from dpo_kit.training.train import mixed_precision

    launch, name = params.launch, params.launch.config_file
    conflicts = []
    for key in ("num_processes", "num_machines"):
        theirs, ours = getattr(config, key, None), getattr(launch, key)
        if isinstance(theirs, int) and theirs > 1 and theirs != ours:
            conflicts.append(f"{key}: {theirs} in the file, launch.{key} {ours} in params: set launch.{key}: {theirs}")
    # Where machine 0 listens: `accelerate config` writes both for a multi-machine run, and params' port (29500 unless
    # set) replaced the file's without a word, so a firewall opened for the file's port held the other machines back
    # and the rendezvous timed out naming no setting.
    for key, theirs in (("main_process_ip", getattr(config, "main_process_ip", None)),
                        ("main_process_port", getattr(config, "main_process_port", None))):  # fmt: skip
        ours = getattr(launch, key)
        if theirs not in (None, "") and ours is not None and str(theirs) != str(ours):
            conflicts.append(f"{key}: {theirs} in the file, launch.{key} {ours} in params: set launch.{key}: {theirs}")
    theirs = str(getattr(config, "mixed_precision", None) or "no").rsplit(".", 1)[-1].lower()
    ours = mixed_precision(params, hardware)
    if theirs != "no" and theirs != ours:
        fix = f"set dpo.{theirs}: true" if theirs in ("bf16", "fp16") else "dpo-kit trains in bf16, fp16 or fp32 (no)"
        conflicts.append(f"mixed_precision: {theirs} in the file, {ours} for the train stage (dpo.bf16 and dpo.fp16 choose,"
                         f" else the hardware): {fix}")  # fmt: skip
    theirs = (getattr(config, "deepspeed_config", None) or {}).get("gradient_accumulation_steps")
    ours = params.dpo.get("gradient_accumulation_steps", 1)
    if theirs not in (None, "auto") and str(theirs) != str(ours):
        conflicts.append(f"deepspeed_config gradient_accumulation_steps: {theirs} in the file, dpo.gradient_accumulation_steps"
                         f" {ours} in params: set dpo.gradient_accumulation_steps: {theirs}")  # fmt: skip
    if conflicts:
        raise LaunchError(
            f"launch.config_file {name} disagrees with params, which decide the launch: " + "; ".join(conflicts)
            + " (or change the file to agree)."
        )


def check_launch(params: Params, hardware, project_dir: str | Path) -> dict[str, Any]:
    """Refuse the combinations that cannot work, before any process starts; returns what will be launched."""
    launch = params.launch
    config_path = resolve_config_file(params, project_dir)
    kind = "DDP"
    if config_path is not None:
        config = read_config(config_path)
        refuse_settings_params_override(config, params, hardware)
        distributed_type = str(config.distributed_type).rsplit(".", 1)[-1]
        kind = SHARDED_KINDS.get(distributed_type, "DDP")
        if distributed_type in ONE_PROCESS_KINDS and (launch.num_processes > 1 or launch.num_machines > 1):
            raise LaunchError(
                f"launch.config_file {launch.config_file} has distributed_type {distributed_type}, for which accelerate"
                f" starts one process, not the {launch.num_processes} of launch.num_processes: set distributed_type:"
                " MULTI_GPU in it (DDP, over gloo on a CPU), or leave launch.config_file empty for DDP"
            )
        if kind == "DeepSpeed":
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise LaunchError(
                    f"launch.config_file {launch.config_file} uses DeepSpeed, which is not installed: `pip install"
                    " deepspeed` on every machine, or use ddp or fsdp2"
                )
        if kind != "DDP" and hardware.device != "cuda":
            raise LaunchError(
                f"launch.config_file {launch.config_file} shards the model over GPUs ({kind}), and this machine has"
                " none (accelerate would run it as plain DDP here, every process holding the whole model). On CPU,"
                " leave launch.config_file empty: launch.num_processes > 1 then runs DDP over gloo."
            )
        checkpointing = [key for key in ("gradient_checkpointing", "activation_checkpointing") if params.dpo.get(key)]
        fsdp_checkpoints = str((getattr(config, "fsdp_config", None) or {}).get("fsdp_activation_checkpointing")).lower()
        if kind == "FSDP" and checkpointing and fsdp_checkpoints == "true":
            # transformers' Trainer refuses the two at once, but only in the workers, once each has loaded the model
            # (after the format stage): the kit turns the Trainer's off under FSDP unless params set it.
            raise LaunchError(
                f"dpo.{checkpointing[0]}: true under launch.config_file {launch.config_file}, whose"
                " fsdp_activation_checkpointing is true: transformers refuses both at once (FSDP checkpoints the"
                f" activations itself). Leave dpo.{checkpointing[0]} out, or use a config of your own with"
                " fsdp_activation_checkpointing: false"
            )
        if kind != "DDP" and params.quantization.bits:
            raise LaunchError(
                f"quantization.bits {params.quantization.bits} (QLoRA) under {kind} is refused: sharding 4/8-bit"
                " weights needs bnb_4bit_quant_storage matched to the shard dtype, which dpo-kit does not set."
                " Use launch.config_file ddp (each GPU holds the quantized base), or turn quantization off."
            )
    if hardware.device == "cuda":
        import torch

        per_machine = launch.num_processes // launch.num_machines
        if per_machine > torch.cuda.device_count():
            raise LaunchError(
                f"launch.num_processes {launch.num_processes} over {launch.num_machines} machine(s) is"
                f" {per_machine} per machine, but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    return {"kind": kind, "config_file": str(config_path) if config_path else None,
            "num_processes": launch.num_processes, "num_machines": launch.num_machines}  # fmt: skip


def check_launch_when_read(params: Params, project_dir: str | Path, hardware=None) -> None:
    """check_launch's refusals, made when the params are read (`dpo-kit validate`, the start of `dpo-kit run`) as a
    ParamsError: made only by the train stage, they came after the format stage had run (minutes of sampling with
    data.source generate), and `dpo-kit validate` called such params valid. Training in process launches nothing."""
    if not params.launch.launched:
        return
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.params import ParamsError

    try:
        refuse_joining_rank(params)
        check_launch(params, hardware or choose_hardware(), project_dir)
    except LaunchError as error:
        raise ParamsError(str(error)) from None


def refuse_joining_rank(params: Params) -> None:
    """The train stage launches machine 0's share (it opens the stage, holds the rendezvous and writes the results);
    the other machines join with `dpo-kit join`, which sets their rank. With launch.machine_rank 1 in params,
    `dpo-kit run` on machine 1 ran the format stage of a run of its own, then launched rank 1 of it, and on machine 0
    it launched a rank 1 that waited for a rank 0 no machine would start."""
    rank = params.launch.machine_rank
    if rank != 0:
        raise LaunchError(
            f"launch.machine_rank {rank}: the train stage starts machine 0 (leave launch.machine_rank at 0 there);"
            f" machine {rank} joins the run once machine 0 has started it: `dpo-kit join RUN_DIR --machine-rank {rank}`"
        )


def refuse_busy_port(port: int) -> None:
    """The rendezvous port must be free on machine 0: a second launched run on the machine (or workers of an
    earlier one still alive) holds 29500, and torch.distributed then fails in every worker with a TCPStore error
    that names no setting. Refused here with a free port to use instead (the user's choice: never swapped in)."""
    import errno
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous binds: TIME_WAIT is no owner
        try:
            probe.bind(("", port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
        else:
            return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as spare:
        spare.bind(("", 0))
        free = spare.getsockname()[1]
    raise LaunchError(
        f"launch.main_process_port {port} is in use on this machine (another launched run, or the workers of an"
        f" earlier one): the processes could not meet there. Choose a free port, e.g. --set launch.main_process_port={free}"
    )


def launch_command(stage, config_path: Path | None) -> list[str]:
    """`python -m accelerate.commands.launch ...` for this stage: every value explicit, so accelerate warns of no
    missing value, and params (not a config file left on the machine) decide the shape of the launch."""
    from dpo_kit.training.train import mixed_precision

    launch = stage.params.launch
    precision = mixed_precision(stage.params, stage.hardware)  # dpo.bf16/fp16 win, as in the workers' DPOConfig
    # Without launch.config_file, the shipped ddp.yaml: torch.distributed.run, and on a CPU the workers choose gloo
    # (DPOConfig use_cpu). Named rather than `--multi_gpu`, since accelerate reads its default config
    # (~/.cache/huggingface/accelerate/default_config.yaml, from an earlier `accelerate config`) whenever no config
    # file is given, and took gpu_ids, use_cpu and debug from it: gpu_ids '0' refused to launch two processes.
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(config_path or CONFIGS_DIR / "ddp.yaml")]  # fmt: skip
    command += [
        "--num_processes", str(launch.num_processes), "--num_machines", str(launch.num_machines),
        "--machine_rank", str(launch.machine_rank), "--main_process_port", str(launch.main_process_port),
        "--mixed_precision", precision, "--dynamo_backend", "no",
    ]  # fmt: skip
    if launch.main_process_ip:
        command += ["--main_process_ip", launch.main_process_ip]
    command += ["--module", "dpo_kit.training.worker", str(stage.run_dir), str(stage.project_dir)]
    if stage.resume_from is not None:
        command += ["--resume-from", str(stage.resume_from)]
    return command


def worker_environment() -> dict[str, str]:
    env = dict(os.environ)
    env[WORKER_ENV] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the notebook as they are printed
    env.setdefault("OMP_NUM_THREADS", "1")  # accelerate sets it anyway; said here so it does not warn
    return env


def run_launched(stage) -> dict[str, Any]:
    """Start the launcher, show its output line by line, and return what the main worker wrote back."""
    refuse_joining_rank(stage.params)
    launched = check_launch(stage.params, stage.hardware, stage.project_dir)
    refuse_busy_port(stage.params.launch.main_process_port)  # this is machine 0: it holds the rendezvous
    config_path = Path(launched["config_file"]) if launched["config_file"] else None
    command = launch_command(stage, config_path)
    result_path = stage.run_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    print(f"launching {launched['kind']} training: {launched['num_processes']} process(es) on"
          f" {launched['num_machines']} machine(s)", flush=True)  # fmt: skip
    tail: deque[str] = deque(maxlen=30)
    process = subprocess.Popen(
        command, cwd=stage.project_dir, env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, start_new_session=True,  # a group of its own, which stop_process_group signals
        preexec_fn=_end_with_parent if sys.platform.startswith("linux") else None,
    )  # fmt: skip
    try:
        for line in process.stdout:
            tail.append(line.rstrip("\n"))
            print(line, end="", flush=True)
        returncode = process.wait()
    except BaseException:  # KeyboardInterrupt, SIGTERM turned into an exception: stop the workers, then re-raise
        stop_process_group(process)
        raise
    if returncode != 0:
        # torch's summary of the failure ends with the first failed worker's exception (worker.main is @record), or
        # with the signal that ended it: said first, so a one-line report of the stage names the cause.
        said = [line.strip() for line in tail if line.strip() and set(line.strip()) != {"="}]
        raise LaunchError(
            f"accelerate launch exited with {returncode}" + (f" ({said[-1]})" if said else "")
            + "; its last lines:\n" + "\n".join(tail)
            # The whole command, to run by hand: the tail holds 30 lines of what may be thousands.
            + f"\nThe command (run in {stage.project_dir}, with {WORKER_ENV}=1): {shlex.join(command)}"
        )
    if not result_path.is_file():
        raise LaunchError(f"the launched training ended without writing {result_path}")
    handed_back = json.loads(result_path.read_text())
    seen = {k: v for k, v in handed_back.get("launch", {}).items() if k != "process_index"}  # world size, DDP type
    return {**handed_back, "launch": {**launched, **seen, "command": command}}


def _end_with_parent() -> None:
    """In the launcher, before it starts: SIGTERM it when the process that launched it dies (a kernel killed by
    `dpo-kit run` on Ctrl-C, or by kill -9), so that no worker trains on unseen; it forwards SIGTERM to them."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the launcher's process group (torch.distributed.run forwards it to the workers), and SIGKILL after
    `grace` seconds the launcher and every process it started. torch starts each worker in a session of its own, so
    SIGKILL to the launcher's group alone left workers that outlived the grace (ones that catch SIGTERM, as
    dpo.enable_jit_checkpoint does, or wait in a collective) running with no parent, holding memory and the port."""
    import psutil

    def descendants() -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(process.pid).children(recursive=True)
        return []

    started = descendants()  # taken while the launcher lives: once it is gone, its workers are nobody's children
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        started += descendants()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
    for child in started:
        with contextlib.suppress(psutil.Error):  # gone already; psutil refuses a pid that another process now holds
            child.kill()


class Terminated(BaseException):
    """SIGTERM in `dpo-kit join`, raised where it waits for its launcher, so that it stops the launcher and workers."""


def run_joined(command: list[str], project_dir: str | Path) -> int:
    """`dpo-kit join`'s launcher, run to its end and stopped as the train stage's is: with subprocess.run, SIGTERM
    (or kill -9) on `dpo-kit join` left the launcher and its workers training on unseen, and Ctrl-C SIGKILLed the
    launcher a quarter of a second later, leaving the workers that had not stopped by then without a parent."""
    import threading

    def on_sigterm(signum, frame):
        raise Terminated

    process = subprocess.Popen(command, cwd=project_dir, env=worker_environment(), start_new_session=True,
                               preexec_fn=_end_with_parent if sys.platform.startswith("linux") else None)  # fmt: skip
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        return process.wait()
    except BaseException:
        stop_process_group(process)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def join_command(run_dir: str | Path, project_dir: str | Path, machine_rank: int) -> list[str]:
    """The launch command for machine `machine_rank` of a multi-machine train stage that machine 0 has started
    (`dpo-kit run` there opened the stage): the same params set, checkpoint and address, this machine's rank."""
    from dpo_kit import manifest as mf
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.params import load_params
    from dpo_kit.training.worker import WorkerStage

    run_dir, project_dir = Path(run_dir).resolve(), Path(project_dir).resolve()
    entry = mf.read_manifest(run_dir).get("stages", {}).get("train", {})
    if entry.get("status") != "running":
        raise LaunchError(
            f"no train stage is running in {run_dir} (status {entry.get('status')!r}): start it on machine 0 with"
            " `dpo-kit run` first; the other machines join the stage that machine 0 opened"
        )
    params = load_params(run_dir / entry["params_file"])
    if not 0 < machine_rank < params.launch.num_machines:
        raise LaunchError(
            f"--machine-rank {machine_rank}: machines 1 to {params.launch.num_machines - 1} join this run"
            f" (launch.num_machines is {params.launch.num_machines}; machine 0 is the one that ran `dpo-kit run`)"
        )
    params.launch.machine_rank = machine_rank
    resume_from = run_dir / "checkpoints" / entry["resumed_from"] if entry.get("resumed_from") else None
    stage = WorkerStage(params=params, run_dir=run_dir, project_dir=project_dir, hardware=choose_hardware(),
                        resume_from=resume_from)  # fmt: skip
    check_launch(params, stage.hardware, project_dir)
    return launch_command(stage, resolve_config_file(params, project_dir))
