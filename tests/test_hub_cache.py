"""Offline (HF_HUB_OFFLINE), a hub id the params name that is not in the local cache is refused by `dpo-kit validate`
and by `dpo-kit run` before its first stage: validate said "valid", and the format stage failed half a minute in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpo_kit.models.hub_cache import check_offline_cache, datasets_offline_variable, models_offline_variable
from dpo_kit.params import ParamsError, load_params
from dpo_kit.run.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME, offline; the caches inside it are where huggingface_hub and datasets would look."""
    home = tmp_path / "hf"
    home.mkdir()
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", *OFFLINE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def cache_model(home: Path, repo_id: str, *files: str, branch: str | None = "main") -> Path:
    """The snapshot layout huggingface_hub writes: refs/<branch> holds the commit, snapshots/<commit>/ the files."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")
    if branch:
        (repo / "refs").mkdir()
        (repo / "refs" / branch).write_text(COMMIT)
    return snapshot


def validate(capsys, *overrides: str) -> tuple[int, str]:
    code = main(["validate", str(TINY), *[a for o in overrides for a in ("--set", o)]])
    return code, capsys.readouterr().err


def test_validate_offline_refuses_a_hub_model_that_is_not_cached_and_passes_one_that_is(hf_home, capsys):
    code, error = validate(capsys, "model.name_or_path=someone/model")
    assert code == 1
    assert "model.name_or_path: 'someone/model' at revision main: no config.json for it in the Hugging Face cache" \
        f" {hf_home / 'hub'} (HF_HUB_OFFLINE is set)" in error
    assert "`hf download someone/model`" in error and "or unset HF_HUB_OFFLINE" in error

    cache_model(hf_home, "someone/model", "config.json")
    assert validate(capsys, "model.name_or_path=someone/model") == (0, "")
    from huggingface_hub import hf_hub_download  # the layout made by hand is one huggingface_hub reads offline

    assert hf_hub_download("someone/model", "config.json", cache_dir=hf_home / "hub", local_files_only=True).endswith(
        f"{COMMIT}/config.json")
    # a revision is looked up as huggingface_hub looks it up: a branch by its ref, a commit by its snapshot
    code, error = validate(capsys, "model.name_or_path=someone/model", "model.revision=v2")
    assert code == 1 and "'someone/model' at revision v2: no config.json" in error
    assert "`hf download someone/model --revision v2`" in error
    assert validate(capsys, "model.name_or_path=someone/model", f"model.revision={COMMIT}") == (0, "")


def test_online_nothing_is_looked_up(hf_home, capsys, monkeypatch):
    import huggingface_hub

    def asked(*args, **kwargs):
        raise AssertionError("the cache was looked in without an offline variable set")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", asked)
    for value in ("0", "false", ""):  # values huggingface_hub reads as online
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert validate(capsys, "model.name_or_path=someone/model", "evaluate.judge=someone/reward-model") == (0, "")


def test_the_offline_variables_are_read_as_the_libraries_read_them(monkeypatch):
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert models_offline_variable() is None and datasets_offline_variable() is None
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert models_offline_variable() == "TRANSFORMERS_OFFLINE" == datasets_offline_variable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # set, so huggingface_hub reads it and not TRANSFORMERS_OFFLINE
    assert models_offline_variable() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # datasets: its own variable, when set, wins
    assert models_offline_variable() == "HF_HUB_OFFLINE" and datasets_offline_variable() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert models_offline_variable() is None and datasets_offline_variable() == "HF_DATASETS_OFFLINE"


def test_judges_a_sampler_and_a_hub_gguf_are_looked_up_for_the_stages_that_load_them(hf_home):
    params = load_params(TINY, ["evaluate.judge=someone/reward-model"])
    with pytest.raises(ParamsError, match="evaluate.judge: 'someone/reward-model' at revision main: no config.json"):
        check_offline_cache(params, REPO)
    check_offline_cache(params, REPO, ["format", "train", "merge"])  # only generate and evaluate judge
    check_offline_cache(load_params(TINY, ["model.name_or_path=someone/model"]), REPO, [])  # nothing left to run

    params = load_params(REPO / "params" / "smollm2-135m-sentiment.yaml", [
        "data.generate.judge=someone/reward-model", "data.generate.sampler=someone/sampler"])
    with pytest.raises(ParamsError) as caught:
        check_offline_cache(params, REPO)
    assert "\n- data.generate.sampler: 'someone/sampler' at revision main" in str(caught.value)
    assert "\n- data.generate.judge: 'someone/reward-model' at revision main" in str(caught.value)
    check_offline_cache(params, REPO, ["train", "merge", "generate", "evaluate"])  # only the format stage samples
    cache_model(hf_home, "someone/sampler", "config.json")
    cache_model(hf_home, "someone/reward-model", "config.json")
    check_offline_cache(params, REPO)

    params = load_params(TINY, ["model.name_or_path=someone/gguf-repo", "model.gguf_file=model.Q4.gguf",
                                "model.build_tiny_model=false"])
    with pytest.raises(ParamsError, match=r"model.gguf_file: 'someone/gguf-repo' at revision main: no model.Q4.gguf"
                                          r"(.|\n)*`hf download someone/gguf-repo model.Q4.gguf`"):
        check_offline_cache(params, REPO)
    cache_model(hf_home, "someone/gguf-repo", "model.Q4.gguf")
    check_offline_cache(params, REPO)


def test_a_hub_dataset_is_looked_up_where_datasets_itself_looks_offline(hf_home, monkeypatch):
    from datasets.load import CachedDatasetModuleFactory

    params = load_params(TINY, ["data.source=someone/MyPrefs", "data.format=orca", "evaluate.judge=sentiment",
                                "data.revision=v1"])  # fmt: skip
    cache = hf_home / "datasets"
    with pytest.raises(ParamsError, match=rf"data.source: the hub dataset 'someone/MyPrefs', data.revision v1: nothing"
                                          rf" prepared for it, at any revision, in the datasets cache {cache}"):
        check_offline_cache(params, REPO)
    with pytest.raises(FileNotFoundError):  # datasets, offline, would not find it either
        CachedDatasetModuleFactory("someone/MyPrefs", cache_dir=str(cache)).get_module()
    check_offline_cache(params, REPO, ["train"])  # only the format stage reads the dataset

    (cache / "someone___my_prefs" / "default" / "0.0.0" / COMMIT).mkdir(parents=True)  # load_dataset's Arrow cache
    CachedDatasetModuleFactory("someone/MyPrefs", cache_dir=str(cache)).get_module()
    # a copy is there, but offline datasets cannot tell which revision v1 is (the test below: the revision is checked)
    with pytest.raises(ParamsError, match="data.revision 'v1' is no full 40-hex commit"):
        check_offline_cache(params, REPO)
    params.data.revision = None
    check_offline_cache(params, REPO)

    (cache / "someone___my_prefs").rename(cache / "elsewhere")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # datasets online, whatever HF_HUB_OFFLINE says
    check_offline_cache(params, REPO)


def test_run_refuses_before_its_first_stage_and_skips_the_stages_it_will_not_run(hf_home, tmp_path, monkeypatch):
    import papermill

    from dpo_kit.run.runner import RunError, run_pipeline

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(Path(args[0]).name))
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "run.name=offline", "model.name_or_path=someone/model"]
    with pytest.raises(RunError, match=r"model.name_or_path: 'someone/model' at revision main: no config.json(.|\n)*"
                                       r"Nothing was run"):
        run_pipeline(TINY, overrides, project_dir=REPO, progress=False, isolate_stages=True)
    assert started == [] and not (tmp_path / "runs").exists()

    # a resumed run whose format stage is done loads no dataset: a hub dataset missing from the cache is no reason
    cache_model(hf_home, "someone/model", "config.json")
    overrides += ["data.source=someone/prefs", "data.format=orca", "evaluate.judge=sentiment"]
    with pytest.raises(RunError, match="data.source: the hub dataset 'someone/prefs'"):
        run_pipeline(TINY, overrides, project_dir=REPO, progress=False, isolate_stages=True)
    from dpo_kit import manifest as mf
    from dpo_kit.params import params_to_dict, save_params
    from dpo_kit.run.stage import params_fingerprint

    run_dir = tmp_path / "runs" / "offline"
    resolved = params_to_dict(load_params(TINY, overrides))
    run_dir.mkdir(parents=True)
    save_params(resolved, run_dir / "params.yaml")
    mf.write_manifest(run_dir, {"status": "partial", "stages": {
        "format": {"status": "completed", "params_fingerprint": params_fingerprint(resolved, "format")}}})
    run_pipeline(TINY, overrides, project_dir=REPO, progress=False, isolate_stages=True, resume=True)
    assert started == ["02_train_dpo.ipynb", "03_merge.ipynb", "04_generate.ipynb", "05_evaluate.ipynb"]


def test_a_push_to_the_hub_offline_is_refused_before_the_first_stage_not_after_training(tmp_path, monkeypatch):
    """merge.push_to_hub with HF_HUB_OFFLINE set: the push at the end of the merge stage failed (OfflineModeIsEnabled)
    after format and train had run, though the runner asks for HF_TOKEN before the first stage for that reason."""
    import papermill

    from dpo_kit.run.runner import RunError, run_pipeline

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(Path(args[0]).name))
    monkeypatch.setenv("HF_TOKEN", "hf-token-for-the-test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "merge.push_to_hub=true", "merge.hub_model_id=someone/tiny-dpo"]
    with pytest.raises(RunError, match=r"merge.push_to_hub is true, and TRANSFORMERS_OFFLINE is set.*someone/tiny-dpo"
                                       r".*Nothing was run: the merge stage pushes after training"):
        run_pipeline(TINY, overrides, project_dir=REPO, progress=False, isolate_stages=True)
    assert started == [] and not (tmp_path / "runs").exists()
    run_pipeline(TINY, overrides, ["format", "train"], project_dir=REPO, progress=False, isolate_stages=True)
    assert started == ["01_format_data.ipynb", "02_train_dpo.ipynb"]  # no merge stage, no push


def test_a_sweep_offline_with_a_hub_model_not_cached_is_refused_before_its_first_trial(hf_home, tmp_path):
    """Each trial's `dpo-kit run` refuses it before its first stage, so the sweep started trial after trial (a kernel
    each) only to record each as failed. It is refused before any trial, naming the point."""
    from dpo_kit.run.sweep import SweepError, run_sweep

    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(SweepError, match=r"model.name_or_path: 'someone/model' at revision main: no config.json"
                                         r"(.|\n)*The sweep's trial beta=0.1 would refuse it before its first"
                                         r" stage, so nothing was run"):
        run_sweep(TINY, grid=["dpo.beta=0.1,0.2"], overrides=["model.name_or_path=someone/model"], project_dir=project,
                  progress=False)  # fmt: skip
    assert not list(project.iterdir())


OLDER, NEWER = "a" * 40, "b" * 40


def cache_dataset_copy(home: Path, commit: str, question: str, mtime: int, rows: int = 1) -> Path:
    """A prepared copy of the fake hub dataset someone/prefs at `commit`, as datasets writes it: datasets' own json
    builder prepares a one-row file, moved to <HF_DATASETS_CACHE>/someone___prefs/default/0.0.0/<commit>/ with the
    Arrow file under the dataset's name; `mtime` orders the copies as an earlier and a later download would."""
    import datasets

    source = home / f"{commit[:8]}.jsonl"
    source.write_text("".join(f'{{"question": "{question}{f" {n}" if n else ""}", "chosen": "yes", "rejected": "no"}}\n'
                              for n in range(rows)))
    builder = datasets.load_dataset_builder("json", data_files={"train": str(source)}, cache_dir=str(home / "build"))
    builder.download_and_prepare()
    copy = home / "datasets" / "someone___prefs" / "default" / "0.0.0" / commit
    copy.parent.mkdir(parents=True, exist_ok=True)
    Path(builder.cache_dir).rename(copy)
    (copy / "json-train.arrow").rename(copy / "prefs-train.arrow")
    os.utime(copy, (mtime, mtime))
    return copy


def cache_dataset_ref(home: Path, revision: str, commit: str) -> None:
    """refs/<revision> of the dataset repo in huggingface_hub's cache, as datasets' online load leaves it."""
    ref = home / "hub" / "datasets--someone--prefs" / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


@pytest.fixture
def two_cached_revisions(hf_home, monkeypatch):
    """someone/prefs cached at an older and a newer commit; datasets' import-time constants made offline to match."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")
    older = cache_dataset_copy(hf_home, OLDER, "older", 1_000_000_000)
    newer = cache_dataset_copy(hf_home, NEWER, "newer", 1_000_000_100)
    return older, newer


def test_offline_a_pinned_data_revision_that_datasets_would_not_load_is_refused(hf_home, two_cached_revisions):
    """Offline, datasets ignores `revision` and loads the newest cached copy: data.revision pinned to the older commit
    trained on the newer one without a word. It is refused unless the copy datasets loads is data.revision's."""
    import datasets

    older, newer = two_cached_revisions
    # what is refused: datasets itself, asked for the older commit, loads the newer copy
    loaded = datasets.load_dataset("someone/prefs", split="train", revision=OLDER)
    assert loaded.to_list()[0]["question"] == "newer" and NEWER in loaded.cache_files[0]["filename"]

    def check(*overrides: str) -> None:
        check_offline_cache(load_params(TINY, ["data.source=someone/prefs", "data.format=standard",
                                               "evaluate.judge=sentiment", *overrides]), REPO)  # fmt: skip

    with pytest.raises(ParamsError) as caught:
        check(f"data.revision={OLDER}")
    message = str(caught.value)
    assert message.startswith("data.revision: offline (HF_HUB_OFFLINE is set), datasets ignores the revision of the"
                              f" hub dataset 'someone/prefs': datasets loads the newest cached copy, of commit {NEWER}"
                              f" ({newer}); data.revision is commit {OLDER}.")
    assert f"Commits cached in {newer.parents[2]}: {OLDER}, {NEWER}." in message
    assert "Run once with a network (unset HF_HUB_OFFLINE)" in message
    assert "set data.revision to the commit datasets loads from its cache" in message and "leave data.revision empty" in message

    check(f"data.revision={NEWER}")
    check()  # no revision named: the newest cached copy, as the README says
    with pytest.raises(ParamsError, match=r"data.revision 'bbbbbbb' is no full 40-hex commit, and the Hugging Face"
                                          rf" cache {hf_home / 'hub'} records no branch or tag of that name"):
        check("data.revision=bbbbbbb")  # a prefix could as well be a branch's name
    with pytest.raises(ParamsError, match="data.revision 'v1' is no full 40-hex commit"):
        check("data.revision=v1")
    cache_dataset_ref(hf_home, "v1", OLDER)  # a tag is the commit huggingface_hub recorded for it
    with pytest.raises(ParamsError, match=f"data.revision is 'v1', commit {OLDER}"):
        check("data.revision=v1")
    cache_dataset_ref(hf_home, "v1", NEWER)
    check("data.revision=v1")
    with pytest.raises(ParamsError, match=r"datasets loads no copy of it: Couldn't find cache for someone/prefs for"
                                          r" config 'beta'"):
        check(f"data.revision={NEWER}", "data.config=beta")


def test_offline_the_format_stage_refuses_a_loaded_copy_that_is_not_data_revisions(hf_home, two_cached_revisions):
    """The cache can change after validate looked, and a notebook run by hand is not looked at before: the copy that
    load_dataset did load is checked against data.revision too."""
    from dpo_kit.data.sources import SourceError, read_hub_dataset

    older, newer = two_cached_revisions
    params = load_params(TINY, ["data.source=someone/prefs", "data.format=standard", "evaluate.judge=sentiment",
                                f"data.revision={OLDER}"])  # fmt: skip
    with pytest.raises(SourceError, match=rf"datasets loads the newest cached copy, of commit {NEWER} \({newer}\);"
                                          rf" data.revision is commit {OLDER}"):
        read_hub_dataset(params.data)
    os.utime(older, (1_000_000_200, 1_000_000_200))  # the older commit's copy is now the newest: that is loaded
    assert read_hub_dataset(params.data)[0]["question"] == "older"


def test_a_sweep_offline_looks_for_the_models_its_trials_load_not_the_params_files(hf_home, tmp_path):
    """A grid over models: each trial loads its own grid value, never the params file's model, which need not be in
    the cache; a grid value that is not is refused before the first trial, naming the trial."""
    import yaml

    from dpo_kit.run.sweep import SearchSpace, SweepError, SweepSpec, refuse_what_the_trials_lack

    params = yaml.safe_load(TINY.read_text())
    params["model"]["name_or_path"] = "someone/not-cached"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cache_model(hf_home, "someone/a", "config.json")
    cache_model(hf_home, "someone/b", "config.json")

    def check(*grid):
        spec = SweepSpec(params=str(path), overrides=[], space={}, sampler="grid", samples=None, objective="x",
                         direction="maximize", seed=0)  # fmt: skip
        refuse_what_the_trials_lack(spec, SearchSpace.parse(list(grid), []), tmp_path)

    check("model.name_or_path=someone/a,someone/b", "dpo.beta=0.1,0.2")
    with pytest.raises(SweepError, match=r"model.name_or_path: 'someone/c' at revision main: no config.json(.|\n)*"
                                         r"The sweep's trial name_or_path=someone_c,beta=0.1 would refuse it"):
        check("model.name_or_path=someone/a,someone/c", "dpo.beta=0.1,0.2")


@pytest.fixture
def hub_not_reached(hf_home, two_cached_revisions, monkeypatch):
    """someone/prefs cached at two commits, no offline variable set, and the hub at a closed local port: datasets asks
    the hub, fails to connect, and falls back to its cache, as on a machine without a network, here on any machine."""
    from types import SimpleNamespace

    import datasets
    import huggingface_hub
    from huggingface_hub.utils import _http

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")  # both read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))  # its 5 retries waited 23 s a load
    return two_cached_revisions


def test_without_a_network_a_pinned_data_revision_that_datasets_did_not_load_is_refused(hub_not_reached):
    """Online (no offline variable) but with the hub unreachable, datasets falls back to the newest cached copy as it
    does offline, ignoring `revision`: data.revision pinned to the older commit read the newer one, and the run recorded
    data.revision as read. The format stage checks the copy it loaded against data.revision whatever the variables say."""
    import datasets

    from dpo_kit.data.sources import SourceError, read_hub_dataset
    from dpo_kit.models.hub_cache import datasets_offline_variable

    older, newer = hub_not_reached
    assert datasets_offline_variable() is None
    # what is refused: datasets, online and asked for the older commit, loads the newer copy without an error
    loaded = datasets.load_dataset("someone/prefs", split="train", revision=OLDER)
    assert loaded.to_list()[0]["question"] == "newer" and NEWER in loaded.cache_files[0]["filename"]

    params = load_params(TINY, ["data.source=someone/prefs", "data.format=standard", "evaluate.judge=sentiment",
                                f"data.revision={OLDER}"])  # fmt: skip
    with pytest.raises(SourceError) as caught:
        read_hub_dataset(params.data)
    message = str(caught.value)
    assert message.startswith("data.revision: the Hugging Face Hub could not be reached (no offline variable is set),"
                              " datasets ignores the revision of the hub dataset 'someone/prefs': datasets loads the"
                              f" newest cached copy, of commit {NEWER} ({newer}); data.revision is commit {OLDER}.")
    assert f"Commits cached in {newer.parents[2]}: {OLDER}, {NEWER}." in message
    assert "Run once with a network (http://127.0.0.1:9 reachable)" in message and "leave data.revision empty" in message

    from dpo_kit.data.sources import read_hub_dataset_copy

    params.data.revision = NEWER  # the cached copy is the pinned commit's: read, and said to be read from the cache
    rows, copy = read_hub_dataset_copy(params.data)
    assert rows[0]["question"] == "newer"
    assert copy.to_dict() == {"commit": NEWER, "from_cache": "the Hugging Face Hub could not be reached (no offline"
                                                             " variable is set)"}
    # datasets' fallback is told by its warning; with datasets' warnings silenced the kit still sees it
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        assert read_hub_dataset_copy(params.data)[1] == copy
        params.data.revision = OLDER
        with pytest.raises(SourceError, match="the Hugging Face Hub could not be reached"):
            read_hub_dataset(params.data)
    finally:
        datasets.logging.set_verbosity(verbosity)


def test_without_a_network_and_no_data_revision_the_report_names_the_cached_commit_read(hf_home, hub_not_reached,
                                                                                         tmp_path):
    """No data.revision: datasets' newest cached copy is taken, as offline, but the report (and so the manifest) names
    the commit read and that the hub was not reached, where before it named none."""
    from dpo_kit.data.pipeline import load_data_report, prepare_data
    from dpo_kit.models.tiny import build_tiny_tokenizer

    newest = "c" * 40
    cache_dataset_copy(hf_home, newest, "newest", 1_000_000_200, rows=4)  # rows enough for a train and an eval split
    params = load_params(TINY, ["data.source=someone/prefs", "data.format=orca", "evaluate.judge=sentiment",
                                "data.eval_fraction=0.5"])  # fmt: skip
    report = prepare_data(params, build_tiny_tokenizer(), tmp_path / "run", REPO)
    assert report.rows_read == 4
    expected = {"commit": newest, "from_cache": "the Hugging Face Hub could not be reached (no offline variable is set)"}
    assert report.to_dict()["hub_copy"] == expected == load_data_report(tmp_path / "run").hub_copy
