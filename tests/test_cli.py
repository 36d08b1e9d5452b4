"""The `dpo-kit` command's refusals of bad input, before any stage runs: each names what is wrong and what works."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_kit.params import ParamsError, load_params
from dpo_kit.run.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"


@pytest.mark.parametrize(
    ("override", "key", "problem", "quoted"),
    [
        ("model.chat_template={% for m in messages %}", "model.chat_template", "found character '%'",
         "--set \"model.chat_template='{% for m in messages %}'\""),
        ("run.name=@home", "run.name", "found character '@'", "--set \"run.name='@home'\""),
        ("model.chat_template={{ it's }}", "model.chat_template", "not valid YAML",
         "--set \"model.chat_template='{{ it''s }}'\""),  # a quote inside single quotes is doubled
    ],
)
def test_a_set_value_that_is_not_yaml_names_the_key_the_problem_and_how_to_quote_it(override, key, problem, quoted,
                                                                                     capsys):
    assert main(["validate", str(TINY), "--set", override]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"the value of {key} is not valid YAML" in err and problem in err, err
    assert quoted in err, err
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(TINY, [override])


def test_the_quoted_form_the_error_suggests_is_accepted():
    assert load_params(TINY, ["run.name='@home'"]).run.name == "@home"
    template = load_params(TINY, ["model.chat_template='{% for m in messages %}{{ m.content }}{% endfor %}'"])
    assert template.model.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_resume_of_a_run_that_does_not_exist_is_refused_and_starts_nothing(tmp_path, capsys):
    args = ["run", str(TINY), "--set", f"run.output_dir={tmp_path}", "--set", "run.name=nope", "--resume", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"nothing to resume at {tmp_path / 'nope'}" in err and "Run without --resume to start it" in err, err
    assert not any(tmp_path.iterdir()), "no run was started"


def test_stages_whose_prerequisites_never_ran_are_refused_before_anything_runs(tmp_path, capsys):
    common = ["run", str(TINY), "--set", f"run.output_dir={tmp_path}", "--set", "run.name=new", "--quiet"]
    assert main([*common, "--stages", "generate"]) == 1
    err = capsys.readouterr().err
    assert "stage 'generate' needs stage 'merge', which has not run" in err and "hf download" not in err, err
    assert "--stages format,train,merge,generate" in err
    # Format would run first and evaluate then fail: neither runs.
    assert main([*common, "--stages", "evaluate,format"]) == 1
    err = capsys.readouterr().err
    assert "stage 'evaluate' needs stage 'merge'" in err and "--stages format,train,merge,evaluate" in err, err
    assert not any(tmp_path.iterdir()), "nothing was run"


def test_ctrl_c_outside_a_stage_ends_the_run_command_with_what_to_do(monkeypatch, capsys):
    """Ctrl-C while the kernel starts or between two stages reached the terminal as a traceback."""
    import dpo_kit.run.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_pipeline", interrupted)
    assert main(["run", str(Path(__file__).resolve().parent.parent / "params" / "tiny.yaml")]) == 130
    err = capsys.readouterr().err
    assert "interrupted outside a stage" in err and "--resume" in err and "Traceback" not in err


def test_a_launch_this_machine_cannot_make_is_refused_when_the_params_are_read(tmp_path, capsys):
    """FSDP on a machine without GPUs was refused by the train stage only, after the format stage had run (minutes of
    sampling with data.source generate), and `dpo-kit validate` called the params valid."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is of sharding on a machine without GPUs")
    fsdp = ["--set", "launch.config_file=fsdp2", "--set", "launch.num_processes=2"]
    assert main(["validate", str(TINY), *fsdp]) == 1
    err = capsys.readouterr().err
    assert "launch.config_file fsdp2 shards the model over GPUs (FSDP), and this machine has none" in err, err
    assert main(["validate", str(TINY), "--set", "launch.num_processes=2"]) == 0  # DDP over gloo works on a CPU
    capsys.readouterr()
    run = ["run", str(TINY), "--set", f"run.output_dir={tmp_path}", "--set", "run.name=fsdp", "--quiet", *fsdp]
    assert main(run) == 1
    err = capsys.readouterr().err
    assert "shards the model over GPUs (FSDP)" in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir()), "no stage ran"


CANARY = "canary-secret-value-for-the-test-0123"  # an HF_TOKEN that no message may show
PUSH = ["merge.push_to_hub=true", "merge.hub_model_id=someone/tiny-dpo"]


@pytest.mark.parametrize(("overrides", "environment", "problem"), [
    (PUSH, {"WANDB_API_KEY": CANARY}, "merge.push_to_hub is true but HF_TOKEN is not set in the environment"),
    (PUSH, {"HF_TOKEN": CANARY, "HF_HUB_OFFLINE": "1"},
     "merge.push_to_hub is true, and HF_HUB_OFFLINE is set, so the push to someone/tiny-dpo would fail"),
    (["tracking.report_to=wandb"], {"HF_TOKEN": CANARY},
     "tracking.report_to names wandb, which logs online (WANDB_MODE unset: wandb's default), but WANDB_API_KEY is not"
     " set"),
    (["model.name_or_path=someone/model", "model.build_tiny_model=false"], {"HF_TOKEN": CANARY, "HF_HUB_OFFLINE": "1"},
     "model.name_or_path: 'someone/model' at revision main: no config.json for it in the Hugging Face cache"),
])  # fmt: skip
def test_validate_refuses_what_run_refuses_before_its_first_stage(overrides, environment, problem, tmp_path, monkeypatch,
                                                                  capsys):
    """`dpo-kit validate` called params valid that `dpo-kit run` refused at once, before its first stage, for what the
    environment lacks: HF_TOKEN (or a hub not offline) for merge.push_to_hub, WANDB_API_KEY for wandb online. Both
    now make the same checks (validate for a fresh run of every stage), and neither shows a secret's value."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "WANDB_MODE", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, and no stored login
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    runs = tmp_path / "runs"
    sets = [a for o in [f"run.output_dir={runs}", *overrides] for a in ("--set", o)]
    assert main(["validate", str(TINY), *sets]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dpo-kit validate: ") and problem in err, err
    assert "`dpo-kit run` would refuse it before its first stage" in err, err
    assert CANARY not in err and "Traceback" not in err
    assert main(["run", str(TINY), *sets, "--quiet", "--isolate-stages"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dpo-kit run: ") and problem in err and "Nothing was run" in err and CANARY not in err, err
    assert not runs.exists(), "no stage ran"


def test_validate_passes_what_the_environment_gives(tmp_path, monkeypatch, capsys):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb kept local needs no key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sets = [a for o in [*PUSH, "tracking.report_to=wandb"] for a in ("--set", o)]
    assert main(["validate", str(TINY), *sets]) == 0
    out, err = capsys.readouterr()
    assert "valid" in out and err == "" and CANARY not in out
