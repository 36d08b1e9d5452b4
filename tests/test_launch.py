"""The train stage under `accelerate launch` (issue 9 §2): configs parsed by accelerate, refusals, and a real
2-process DDP run over gloo that matches the single-process run."""

from __future__ import annotations

import contextlib
import queue
import shlex
import socket
import threading
from pathlib import Path

import nbformat
import pytest
from run_dirs import logged_losses
from safetensors.torch import load_file

from dpo_kit.hardware import HardwareChoice, choose_hardware
from dpo_kit.params import SHIPPED_ACCELERATE_CONFIGS, ParamsError, load_params
from dpo_kit.training.launch import (
    CONFIGS_DIR,
    LaunchError,
    check_launch,
    check_launch_when_read,
    check_strategy_set_up,
    launch_command,
    read_config,
)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"


def gpu_hardware() -> HardwareChoice:
    """A CUDA machine as choose_hardware describes one: the checks below run before any GPU is touched."""
    return HardwareChoice(device="cuda", device_name="a test GPU", device_count=1, bf16_supported=True, bf16=True,
                          fp16=False, gradient_checkpointing=True, dtype="bfloat16", reason="a test GPU")  # fmt: skip


def deepspeed_installed(monkeypatch, installed: bool) -> None:
    """As if deepspeed were (not) installed. Only deepspeed: a lookup of any other package is left alone, since
    a transformers module imported for the first time inside the test asks for optional ones (mistral_common)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: (object() if installed else None) if name == "deepspeed" else real(name, *a)
    )


@pytest.mark.parametrize("name", SHIPPED_ACCELERATE_CONFIGS)
def test_every_shipped_config_is_read_by_accelerates_own_parser(name):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = CONFIGS_DIR / f"{name}.yaml"
    config = read_config(path)  # accelerate's ClusterConfig; unknown keys raise there
    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}[name]
    assert str(config.distributed_type).endswith(expected)
    # And as `accelerate launch --config_file` reads it: the config's sections become the launch arguments.
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "train.py"])
    _validate_launch_command(args)
    if name.startswith("zero"):
        assert args.use_deepspeed and args.zero_stage == int(name[-1])
    if name == "fsdp2":
        assert args.use_fsdp and str(args.fsdp_version) == "2" and args.fsdp_activation_checkpointing
    if name == "zero3":
        assert args.zero3_save_16bit_model in (True, "true")


def test_the_configs_ship_inside_the_package():
    shipped = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    assert shipped == sorted(SHIPPED_ACCELERATE_CONFIGS)
    assert "accelerate_configs/*.yaml" in (REPO / "pyproject.toml").read_text()  # package data: in the wheel too


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["launch.machine_rank=2"], "launch.machine_rank 2 must be below launch.num_machines 1"),
        (["launch.num_machines=2", "launch.num_processes=2"], "launch.main_process_ip is required"),
    ],
)
def test_launch_params_are_checked_at_load(overrides, message):
    with pytest.raises(ParamsError, match=message):
        load_params(TINY, overrides)


def test_a_machine_rank_other_than_0_is_refused_to_dpo_kit_run_and_given_to_join(tmp_path):
    """launch.machine_rank 1 in the params of `dpo-kit run` started a run of its own and launched rank 1 of it, which
    waited for a rank 0 that no machine would start; machines other than 0 join with `dpo-kit join`."""
    from types import SimpleNamespace

    from dpo_kit.training.launch import run_launched

    machine_1 = ["launch.num_machines=2", "launch.num_processes=2", "launch.main_process_ip=10.0.0.1",
                 "launch.machine_rank=1"]  # fmt: skip
    params = load_params(TINY, machine_1)
    joining = r"launch.machine_rank 1: the train stage starts machine 0 .* `dpo-kit join RUN_DIR --machine-rank 1`"
    with pytest.raises(ParamsError, match=joining):  # `dpo-kit validate`, and `dpo-kit run` before its first stage
        check_launch_when_read(params, REPO, choose_hardware())
    stage = SimpleNamespace(params=params, hardware=choose_hardware(), project_dir=REPO, run_dir=tmp_path,
                            resume_from=None)  # fmt: skip
    with pytest.raises(LaunchError, match=joining):  # notebook 02 run by hand
        run_launched(stage)
    assert not any(tmp_path.iterdir())
    check_launch_when_read(load_params(TINY, machine_1[:-1]), REPO, choose_hardware())  # machine 0: launched as before


def test_processes_must_split_evenly_over_machines():
    with pytest.raises(ParamsError, match="launch.num_processes 3 .* multiple of launch.num_machines 2"):
        load_params(TINY, ["launch.num_processes=3", "launch.num_machines=2", "launch.main_process_ip=10.0.0.1"])


def test_without_launch_params_nothing_is_launched():
    assert not load_params(TINY).launch.launched
    assert load_params(TINY, ["launch.num_processes=2"]).launch.launched
    assert load_params(TINY, ["launch.config_file=ddp"]).launch.launched


@pytest.mark.parametrize("config", ["zero2", "zero3", "fsdp2"])
def test_sharding_without_a_gpu_is_refused(config, monkeypatch):
    deepspeed_installed(monkeypatch, True)
    params = load_params(TINY, [f"launch.config_file={config}", "launch.num_processes=2"])
    cpu = choose_hardware()
    assert cpu.device == "cpu"
    with pytest.raises(LaunchError, match=rf"{config} shards the model over GPUs .* this machine has none.*DDP over gloo"):
        check_launch(params, cpu, REPO)


def test_a_rendezvous_port_in_use_is_refused_with_a_free_one_to_use(tmp_path):
    """A second launched run on one machine met the first one's rendezvous port: every worker failed with a TCPStore
    error naming no setting. Machine 0 refuses a port in use before it starts the launcher, and names a free one."""
    import re
    import socket
    from types import SimpleNamespace

    from dpo_kit.training.launch import run_launched

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        params = load_params(TINY, ["launch.num_processes=2", f"launch.main_process_port={port}"])
        stage = SimpleNamespace(params=params, hardware=choose_hardware(), project_dir=REPO, run_dir=tmp_path,
                                resume_from=None)  # fmt: skip
        with pytest.raises(LaunchError, match=rf"launch.main_process_port {port} is in use on this machine") as refused:
            run_launched(stage)
        free = int(re.search(r"--set launch.main_process_port=(\d+)", str(refused.value)).group(1))
        assert free != port
    assert not any(tmp_path.iterdir()), "refused before the launcher started"


def test_a_failed_worker_s_error_is_named_in_the_launch_error(tmp_path):
    """Both workers fail reading the stage's parameter set. The launcher's output ends with its own traceback and
    torch's failure summary (40 lines): without an error file from the workers, the error the train stage raised
    (and the manifest recorded) held only "exitcode: 1", never the workers' ParamsError."""
    import json
    from types import SimpleNamespace

    from dpo_kit.training.launch import run_launched

    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"train": {"params_file": "gone.yaml"}}}))
    params = load_params(TINY, ["launch.num_processes=2", f"launch.main_process_port={free_port()}"])
    stage = SimpleNamespace(params=params, hardware=choose_hardware(), project_dir=REPO, run_dir=tmp_path,
                            resume_from=None)  # fmt: skip
    with pytest.raises(LaunchError) as failed:
        run_launched(stage)
    first_line = str(failed.value).splitlines()[0]
    assert first_line.startswith("accelerate launch exited with 1 (")
    assert f"ParamsError: params file not found: {tmp_path / 'gone.yaml'})" in first_line
    # And the command that failed, whole, to run again by hand: the error said only its exit code and output.
    last_line = str(failed.value).splitlines()[-1]
    assert last_line.startswith(f"The command (run in {REPO}, with DPO_KIT_LAUNCHED=1): ")
    command = shlex.split(last_line.split(": ", 1)[1])
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-3:] == ["dpo_kit.training.worker", str(tmp_path), str(REPO)]


def test_a_worker_refuses_to_train_unsharded_when_its_config_asks_for_sharding(monkeypatch):
    check_strategy_set_up("MULTI_CPU")  # no sharding asked: DDP or one process, nothing to check
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets in the workers for an FSDP config
    check_strategy_set_up("FSDP")
    with pytest.raises(LaunchError, match="asks for FSDP, and accelerate set up MULTI_CPU instead.*needs GPUs"):
        check_strategy_set_up("MULTI_CPU")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(LaunchError, match="asks for DeepSpeed, and accelerate set up MULTI_GPU instead"):
        check_strategy_set_up("MULTI_GPU")


def test_accelerate_runs_the_fsdp2_config_as_plain_ddp_on_cpu_and_the_worker_check_stops_it(tmp_path):
    """The premise of both refusals, against the installed accelerate: launched on CPU with the shipped fsdp2
    config, accelerate sets up MULTI_CPU (DDP, whole model in every process), not FSDP, and says nothing."""
    import subprocess
    import sys

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\n"
        "from transformers import TrainingArguments\n"
        "from dpo_kit.training.launch import check_strategy_set_up\n"
        "TrainingArguments(output_dir=sys.argv[1], report_to=[], use_cpu=True).device\n"  # as the kit's workers do
        "from accelerate import Accelerator\n"
        "kind = str(Accelerator().distributed_type).rsplit('.', 1)[-1]\n"
        "import os; os.write(1, f'distributed type {kind}\\n'.encode())  # one write: the ranks' lines cannot interleave\n"
        "check_strategy_set_up(kind)\n"
    )
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS_DIR / "fsdp2.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(probe), str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    # Each process prints its type; the first to fail may stop the other before it prints.
    assert "distributed type MULTI_CPU" in output and "distributed type FSDP" not in output, output[-3000:]
    assert done.returncode != 0 and "asks for FSDP, and accelerate set up MULTI_CPU instead" in output


@pytest.mark.parametrize("distributed_type", ["'NO'", "MULTI_CPU"])
def test_a_config_that_accelerate_runs_as_one_process_is_refused_for_more(distributed_type, tmp_path):
    """A config from `accelerate config` answered "no distributed training" (or multi-CPU, which accelerate spreads
    only through mpirun) with launch.num_processes 2: accelerate started one process and said nothing, so the run
    trained with half the global batch while its manifest said 2 processes."""
    import subprocess
    import sys

    mine = tmp_path / "mine.yaml"
    mine.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: {distributed_type}\nmixed_precision: 'no'\n"
                    "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n")  # fmt: skip
    # The premise, against the installed accelerate: one process, no world.
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nprint('world size', os.environ.get('WORLD_SIZE'))\n")
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(mine), "--num_processes", "2",
         "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", str(probe)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.count("world size None") == 1, done.stdout + done.stderr[-2000:]

    name = distributed_type.strip("'")
    params = load_params(TINY, ["launch.config_file=mine.yaml", "launch.num_processes=2"])
    with pytest.raises(LaunchError, match=rf"mine.yaml has distributed_type {name}, for which accelerate starts one"
                                          r" process, not the 2 of launch.num_processes: set distributed_type: MULTI_GPU"):
        check_launch(params, choose_hardware(), tmp_path)
    with pytest.raises(ParamsError, match=f"distributed_type {name}"):  # `dpo-kit validate`, and `dpo-kit run` at once
        check_launch_when_read(params, tmp_path)
    assert check_launch(load_params(TINY, ["launch.config_file=mine.yaml"]), choose_hardware(), tmp_path)["kind"] == "DDP"


def test_a_config_whose_own_settings_params_would_override_is_refused(tmp_path, monkeypatch):
    """The launch command carries params' values, and accelerate takes them over the file's: a config written by
    `accelerate config` for 8 GPUs in bf16, with launch.num_processes left at 1 on a GPU the kit runs in fp16, launched
    one process in fp16 without a word."""
    import accelerate.commands.launch as accelerate_launch

    from dpo_kit.training.worker import WorkerStage

    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    fp16_gpu = HardwareChoice(device="cuda", device_name="a T4", device_count=8, bf16_supported=False, bf16=False,
                              fp16=True, gradient_checkpointing=True, dtype="float16", reason="a test GPU")  # fmt: skip
    mine = tmp_path / "mine.yaml"
    mine.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: bf16\n"
                    "num_machines: 1\nnum_processes: 8\ngpu_ids: all\n")  # fmt: skip
    params = load_params(TINY, ["launch.config_file=mine.yaml"])
    # The premise: what accelerate launch makes of the kit's command and that file.
    stage = WorkerStage(params=params, run_dir=tmp_path, project_dir=tmp_path, hardware=fp16_gpu, resume_from=None)
    command = launch_command(stage, mine)
    args = accelerate_launch.launch_command_parser().parse_args(command[command.index("accelerate.commands.launch") + 1 :])
    with pytest.MonkeyPatch.context() as bf16:
        bf16.setattr(accelerate_launch, "is_bf16_available", lambda *a: True)
        args, _, _ = accelerate_launch._validate_launch_command(args)
    assert (args.num_processes, args.mixed_precision) == (1, "fp16")

    with pytest.raises(LaunchError) as refused:
        check_launch(params, fp16_gpu, tmp_path)
    said = str(refused.value)
    assert said.startswith("launch.config_file mine.yaml disagrees with params, which decide the launch:")
    assert "num_processes: 8 in the file, launch.num_processes 1 in params: set launch.num_processes: 8" in said
    assert "mixed_precision: bf16 in the file, fp16 for the train stage" in said and "set dpo.bf16: true" in said
    # Agreeing, it launches; a file leaving them at accelerate's defaults (as the shipped ones do) agrees with anything.
    agreeing = load_params(TINY, ["launch.config_file=mine.yaml", "launch.num_processes=8", "dpo.bf16=true"])
    assert check_launch(agreeing, fp16_gpu, tmp_path)["num_processes"] == 8
    assert check_launch(load_params(TINY, ["launch.config_file=ddp", "launch.num_processes=4"]), fp16_gpu, tmp_path)

    deepspeed_installed(monkeypatch, True)
    mine.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 2\n"
                    "deepspeed_config:\n  gradient_accumulation_steps: 1\n  zero_stage: 2\n")  # fmt: skip
    params = load_params(TINY, ["launch.config_file=mine.yaml", "launch.num_processes=2",
                                "dpo.gradient_accumulation_steps=4"])  # fmt: skip
    with pytest.raises(ParamsError, match="deepspeed_config gradient_accumulation_steps: 1 in the file, dpo.gradient_accu"
                                          "mulation_steps 4 in params: set dpo.gradient_accumulation_steps: 1"):
        check_launch_when_read(params, tmp_path, fp16_gpu)


def test_a_config_whose_machine_0_address_params_would_override_is_refused(tmp_path):
    """`accelerate config` for two machines writes machine 0's address and port. The launch command carries params'
    (the port 29500 unless set), which accelerate takes over the file's: the rendezvous moved to a port the file's
    author never opened, without a word."""
    import accelerate.commands.launch as accelerate_launch

    from dpo_kit.training.worker import WorkerStage

    (tmp_path / "mine.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 2\n"
                                        "num_processes: 2\nmain_process_ip: 10.0.0.1\nmain_process_port: 29600\n")  # fmt: skip
    two = ["launch.config_file=mine.yaml", "launch.num_processes=2", "launch.num_machines=2"]
    params = load_params(TINY, [*two, "launch.main_process_ip=10.0.0.2"])
    # The premise: what accelerate launch makes of the kit's command and that file.
    stage = WorkerStage(params=params, run_dir=tmp_path, project_dir=tmp_path, hardware=choose_hardware(), resume_from=None)
    command = launch_command(stage, tmp_path / "mine.yaml")
    args = accelerate_launch.launch_command_parser().parse_args(command[command.index("accelerate.commands.launch") + 1 :])
    args, _, _ = accelerate_launch._validate_launch_command(args)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.2", 29500)

    with pytest.raises(ParamsError) as refused:
        check_launch_when_read(params, tmp_path)
    said = str(refused.value)
    assert "main_process_ip: 10.0.0.1 in the file, launch.main_process_ip 10.0.0.2 in params: set launch.main_process_ip: 10.0.0.1" in said
    assert "main_process_port: 29600 in the file, launch.main_process_port 29500 in params: set launch.main_process_port: 29600" in said
    check_launch_when_read(load_params(TINY, [*two, "launch.main_process_ip=10.0.0.1", "launch.main_process_port=29600"]), tmp_path)


@pytest.mark.parametrize(
    ("text", "said"),
    [("distributed_type: MULTI_GPU\nnum_processes: 2\nfsdp_sharding: FULL\n", r"unknown keys \(\['fsdp_sharding'\]\)"),
     ("distributed_type: MULTI_GPU\n  num_processes: 2\n", "ScannerError: mapping values are not allowed here")],
    ids=["unknown key", "broken yaml"],
)
def test_a_config_accelerate_cannot_read_is_a_params_error_naming_the_file(text, said, tmp_path):
    """A key accelerate does not know, or broken YAML, in the user's own config: `dpo-kit validate` (and `dpo-kit run`)
    ended in a traceback from accelerate's parser instead of the refusal that names launch.config_file."""
    (tmp_path / "mine.yaml").write_text(text)
    params = load_params(TINY, ["launch.config_file=mine.yaml", "launch.num_processes=2"])
    with pytest.raises(ParamsError, match=rf"launch.config_file {tmp_path / 'mine.yaml'}: accelerate cannot read it \(.*{said}"):
        check_launch_when_read(params, tmp_path)


def test_deepspeed_configs_say_how_to_install_deepspeed(monkeypatch):
    deepspeed_installed(monkeypatch, False)
    params = load_params(TINY, ["launch.config_file=zero3", "launch.num_processes=2"])
    with pytest.raises(LaunchError, match="zero3 uses DeepSpeed, which is not installed: `pip install deepspeed`"):
        check_launch(params, gpu_hardware(), REPO)


def test_qlora_under_zero3_or_fsdp_is_refused_with_the_alternative(monkeypatch):
    deepspeed_installed(monkeypatch, True)
    for config in ("zero3", "fsdp2"):
        params = load_params(TINY, [f"launch.config_file={config}", "launch.num_processes=2", "quantization.bits=4"])
        with pytest.raises(LaunchError, match=r"quantization.bits 4 \(QLoRA\) under .* Use launch.config_file ddp"):
            check_launch(params, gpu_hardware(), REPO)


@pytest.mark.parametrize("key", ["gradient_checkpointing", "activation_checkpointing"])
def test_trainer_checkpointing_under_fsdp_that_checkpoints_itself_is_refused_when_read(key, monkeypatch):
    """fsdp2 checkpoints activations itself (fsdp_activation_checkpointing), and transformers' Trainer refuses its own
    checkpointing on top ("can't both be set to True"); with dpo.gradient_checkpointing: true in params that came in
    every worker, after the format stage and the model loads. The kit turns the Trainer's off only when params don't
    set it."""
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    params = load_params(TINY, ["launch.config_file=fsdp2", "launch.num_processes=2", f"dpo.{key}=true"])
    with pytest.raises(ParamsError, match=rf"dpo.{key}: true under launch.config_file fsdp2, whose"
                                          rf" fsdp_activation_checkpointing is true.* Leave dpo.{key} out"):  # fmt: skip
        check_launch_when_read(params, REPO, gpu_hardware())
    for fine in (["launch.config_file=fsdp2", f"dpo.{key}=false"], ["launch.config_file=ddp", f"dpo.{key}=true"]):
        check_launch_when_read(load_params(TINY, [*fine, "launch.num_processes=2"]), REPO, gpu_hardware())


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    params = load_params(TINY, ["launch.num_processes=8", "launch.config_file=ddp"])
    with pytest.raises(LaunchError, match="8 over 1 machine.* 8 per machine, but this machine has 2 GPU"):
        check_launch(params, gpu_hardware(), REPO)
    assert check_launch(load_params(TINY, ["launch.num_processes=2", "launch.config_file=ddp"]), gpu_hardware(), REPO)[
        "kind"
    ] == "DDP"


def test_an_unknown_config_file_names_the_path_and_the_shipped_ones():
    params = load_params(TINY, ["launch.config_file=configs/mine.yaml"])
    with pytest.raises(LaunchError, match=r"configs/mine.yaml not found; name one shipped with dpo-kit \(ddp, zero2"):
        check_launch(params, choose_hardware(), REPO)


def test_the_launch_command_carries_every_value_from_params(tmp_path):
    from dpo_kit.training.worker import WorkerStage

    params = load_params(TINY, ["launch.num_processes=16", "launch.num_machines=2", "launch.machine_rank=1",
                                "launch.main_process_ip=10.0.0.1", "launch.main_process_port=29555"])  # fmt: skip
    stage = WorkerStage(params=params, run_dir=tmp_path, project_dir=REPO, hardware=gpu_hardware(), resume_from=None)
    command = launch_command(stage, CONFIGS_DIR / "zero3.yaml")
    text = " ".join(command)
    for part in ("--config_file", "zero3.yaml", "--num_processes 16", "--num_machines 2", "--machine_rank 1",
                 "--main_process_ip 10.0.0.1", "--main_process_port 29555", "--mixed_precision bf16",
                 f"--module dpo_kit.training.worker {tmp_path} {REPO}"):  # fmt: skip
        assert part in text, part
    assert "--multi_gpu" not in command  # the config file says the strategy
    stage.resume_from = tmp_path / "checkpoints" / "checkpoint-8"
    assert launch_command(stage, None)[-2:] == ["--resume-from", str(stage.resume_from)]


def test_a_default_accelerate_config_on_the_machine_does_not_shape_a_launch_without_config_file(tmp_path, monkeypatch):
    """accelerate reads ~/.cache/huggingface/accelerate/default_config.yaml whenever no --config_file is given: the
    plain DDP launch (launch.num_processes 2, no launch.config_file) took its gpu_ids, use_cpu and debug, and with the
    gpu_ids '0' of a one-GPU `accelerate config` it refused to start ("Less than two GPU ids were configured")."""
    import accelerate.commands.launch as accelerate_launch
    from accelerate.commands.config import config_args

    from dpo_kit.training.worker import WorkerStage

    left_on_the_machine = tmp_path / "default_config.yaml"
    left_on_the_machine.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\ngpu_ids: '0'\nuse_cpu: true\ndebug: true\n"
        "mixed_precision: fp16\nnum_machines: 1\nnum_processes: 1\nmachine_rank: 0\n"
    )
    for module in (accelerate_launch, config_args):  # where launch looks for it, and where it reads it from
        monkeypatch.setattr(module, "default_config_file", str(left_on_the_machine))
    params = load_params(TINY, ["launch.num_processes=2"])
    stage = WorkerStage(params=params, run_dir=tmp_path, project_dir=REPO, hardware=gpu_hardware(), resume_from=None)
    command = launch_command(stage, None)
    args = accelerate_launch.launch_command_parser().parse_args(command[command.index("accelerate.commands.launch") + 1 :])
    args, _, _ = accelerate_launch._validate_launch_command(args)
    assert args.multi_gpu and not args.use_deepspeed and not args.use_fsdp
    assert (args.gpu_ids, args.use_cpu, args.debug) == ("all", False, False)
    assert (args.num_processes, args.mixed_precision) == (2, "bf16")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.notebook
def test_two_process_ddp_on_cpu_matches_one_process(tmp_path, tiny_model_dir):
    """Same global batch (1 x 8 against 2 x 4), same seed: the loss of every step within 1e-4 (TRL's invariant
    tests use that tolerance), the adapter too, and the adapter written once, by the main process."""
    from dpo_kit import manifest as mf
    from dpo_kit.run.runner import run_pipeline

    common = [f"run.output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "dpo.max_steps=12",
              "dpo.logging_steps=1", "dpo.save_steps=6"]  # fmt: skip
    one = run_pipeline(TINY, [*common, "run.name=one"], ["format", "train"], project_dir=REPO, progress=False)
    two = run_pipeline(
        TINY,
        [*common, "run.name=two", "launch.num_processes=2", "dpo.per_device_train_batch_size=4",
         f"launch.main_process_port={free_port()}"],
        ["format", "train"], project_dir=REPO, progress=False,
    )  # fmt: skip
    launch = mf.read_manifest(two)["stages"]["train"]["launch"]
    assert launch["world_size"] == 2 and launch["distributed_type"] == "MULTI_CPU" and launch["kind"] == "DDP"
    assert "launch" not in mf.read_manifest(one)["stages"]["train"], "a run without launch params is unchanged"

    ours, theirs = logged_losses(two), logged_losses(one)
    assert sorted(ours) == sorted(theirs) == list(range(1, 13))
    assert max(abs(ours[step] - theirs[step]) for step in ours) <= 1e-4
    a, b = load_file(two / "adapter" / "adapter_model.safetensors"), load_file(one / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4

    # The workers' lines reach the executed notebook: both processes trained, only process 0 saved.
    notebook = nbformat.read(two / "notebooks" / "02_train_dpo.ipynb", as_version=4)
    text = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "stream")
    assert "launching DDP training: 2 process(es) on 1 machine(s)" in text
    assert "process 1 of 2: trained 12 steps\n" in text
    assert text.count(", saved ") == 1 and f"process 0 of 2: trained 12 steps, saved {two / 'adapter'}" in text
    assert "step 12/12: loss" in text and "{'loss'" not in text  # one line per step, not the Trainer's log dicts
    assert "find_unused_parameters=True" not in text and "is_gradient_checkpointing" not in text  # no warnings
    checkpoints = mf.read_manifest(two)["stages"]["train"]["checkpoints"]
    assert list(checkpoints) == ["checkpoint-6", "checkpoint-12"], "checkpoints recorded once, by the main process"


@pytest.mark.notebook
def test_two_machines_on_one_host_match_one_process(tmp_path, tiny_model_dir):
    """Multi-node as it is run: machine 0 runs `dpo-kit run` with launch.num_machines 2, machine 1 runs `dpo-kit
    join` on the same run directory. Here both "machines" are this host (127.0.0.1), one process each."""
    import subprocess
    import sys
    import time

    from dpo_kit import manifest as mf
    from dpo_kit.run.cli import main
    from dpo_kit.run.runner import run_pipeline

    common = [f"run.output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "dpo.max_steps=6",
              "dpo.logging_steps=1", "dpo.save_steps=3"]  # fmt: skip
    one = run_pipeline(TINY, [*common, "run.name=one"], ["format", "train"], project_dir=REPO, progress=False)
    machines = [*common, "run.name=two-machines", "launch.num_processes=2", "launch.num_machines=2",
                "launch.main_process_ip=127.0.0.1", f"launch.main_process_port={free_port()}",
                "dpo.per_device_train_batch_size=4"]  # fmt: skip
    run_dir = tmp_path / "two-machines"
    assert main(["join", str(run_dir), "--machine-rank", "1", "--project-dir", str(REPO)]) == 1  # nothing to join yet
    machine_0 = subprocess.Popen(
        [sys.executable, "-m", "dpo_kit.run.cli", "run", str(TINY), *[a for s in machines for a in ("--set", s)],
         "--stages", "format,train", "--quiet"], cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while mf.read_manifest(run_dir).get("stages", {}).get("train", {}).get("status") != "running":
        assert machine_0.poll() is None and time.monotonic() < deadline, "machine 0 never opened the train stage"
        time.sleep(0.2)
    assert main(["join", str(run_dir), "--machine-rank", "2", "--project-dir", str(REPO)]) == 1  # only rank 1 exists
    assert main(["join", str(run_dir), "--machine-rank", "1", "--project-dir", str(REPO)]) == 0
    assert machine_0.wait(timeout=300) == 0

    launch = mf.read_manifest(run_dir)["stages"]["train"]["launch"]
    assert launch["world_size"] == 2 and launch["num_machines"] == 2
    ours, theirs = logged_losses(run_dir), logged_losses(one)
    assert sorted(ours) == list(range(1, 7)) and max(abs(ours[s] - theirs[s]) for s in ours) <= 1e-4


def test_stopping_a_launch_leaves_no_worker_behind(tmp_path):
    """torch starts every worker in a session of its own, so SIGKILL to the launcher's process group, once the grace
    had passed, left the workers that had not stopped on SIGTERM (dpo.enable_jit_checkpoint catches it to save first;
    a worker waits in a collective) running without a parent. Here both workers ignore SIGTERM."""
    import os
    import subprocess
    import sys

    import psutil

    from dpo_kit.training.launch import stop_process_group, worker_environment

    probe = tmp_path / "probe.py"
    probe.write_text("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                     "os.write(1, f'worker {os.getpid()}\\n'.encode())\ntime.sleep(300)\n")  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS_DIR / "ddp.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(probe)]  # fmt: skip
    launcher = subprocess.Popen(command, env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # as run_launched starts it  # fmt: skip
    workers = []
    try:
        for line in launcher.stdout:
            if line.startswith("worker "):
                workers.append(psutil.Process(int(line.split()[1])))
                if len(workers) == 2:
                    break
        assert len(workers) == 2, "the workers never started"
        assert all(os.getpgid(w.pid) not in (os.getpgid(launcher.pid), os.getpgid(0)) for w in workers)  # the premise
        stop_process_group(launcher, grace=2)
        assert launcher.returncode is not None
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers left running after the launcher was stopped: {[w.pid for w in alive]}"
    finally:
        for process in [*workers, psutil.Process(launcher.pid) if launcher.poll() is None else None]:
            if process is not None and process.is_running():
                process.kill()


@pytest.mark.parametrize(("stop", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_stopping_dpo_kit_join_stops_its_launcher_and_workers(stop, code, tmp_path):
    """`dpo-kit join` ran its launcher with subprocess.run: SIGTERM on it (a scheduler, `kill`) ended join alone, and
    the launcher and workers of machine 1 kept training, then waited in a collective for a machine 0 that had stopped.
    Here join_command is swapped for a launch of two sleeping workers; the rest is `dpo-kit join` as it runs."""
    import signal
    import subprocess
    import sys

    import psutil

    probe = tmp_path / "probe.py"
    probe.write_text("import os, time\nos.write(1, f'worker {os.getpid()}\\n'.encode())\ntime.sleep(300)\n")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS_DIR / "ddp.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(probe)]  # fmt: skip
    join = tmp_path / "join.py"
    join.write_text(
        "import sys\nimport dpo_kit.training.launch as launch\n"
        f"launch.join_command = lambda *args: {command!r}\n"
        "from dpo_kit.run.cli import main\n"
        f"sys.exit(main(['join', {str(tmp_path)!r}, '--machine-rank', '1', '--project-dir', {str(tmp_path)!r}]))\n"
    )
    # Started as from a terminal, with SIGINT at its default: an ignored SIGINT is inherited through exec, and a test
    # process may hold one (a library of an earlier test in the same pytest-xdist worker set it), under which join,
    # as any Python program, rightly keeps ignoring Ctrl-C (nohup's way). That made this test fail at random.
    joined = subprocess.Popen([sys.executable, str(join)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    # Both pipes are read to their end on threads: the launcher and workers write to them too (torch's shutdown
    # messages), and a pipe nobody reads could stall them and the join that waits for them.
    stderr_lines, worker_lines = [], queue.Queue()

    def read_stdout():
        for line in joined.stdout:
            if line.startswith("worker "):
                worker_lines.put(int(line.split()[1]))

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: stderr_lines.extend(joined.stderr), daemon=True)]  # fmt: skip
    for reader in readers:
        reader.start()
    started = []
    try:
        with contextlib.suppress(queue.Empty):
            while len(started) < 2:
                started.append(psutil.Process(worker_lines.get(timeout=120)))
        assert len(started) == 2, "".join(stderr_lines)[-2000:]
        started += psutil.Process(joined.pid).children()  # the launcher
        joined.send_signal(getattr(signal, stop))
        try:
            returncode = joined.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`dpo-kit join` still running 120 s after {stop}:\n{''.join(stderr_lines)[-3000:]}") from None
        gone, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, f"left running after `dpo-kit join` was stopped: {[p.pid for p in alive]}"
        assert returncode == code
        for reader in readers:
            reader.join(timeout=30)
        stderr = "".join(stderr_lines)
        assert f"dpo-kit join: {stop}; this machine's launcher and workers are stopped" in stderr, stderr[-2000:]
    finally:
        for process in started:
            if process.is_running():
                process.kill()
        if joined.poll() is None:
            joined.kill()
