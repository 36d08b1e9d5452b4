"""Whether the hub ids a params file names are in the local caches, asked only when the hub is not to be asked.

With HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, huggingface_hub serves every model file from its cache, and with
HF_DATASETS_OFFLINE (by default the same as HF_HUB_OFFLINE) datasets serves a hub dataset from its own. A hub id
missing there was found missing by the first stage that loaded it, the format stage half a minute in, after
`dpo-kit validate` had said "valid". Offline, what each library will find is on disk, so `dpo-kit validate` and
`dpo-kit run` (before its first stage) look there. Online nothing is looked up: the hub may have what the cache lacks.
Online without a network datasets falls back to its cache as offline, which cannot be foreseen; the format stage
checks the copy it loaded against data.revision whatever the variables say (cached_revision_problem).

The variables are read from the environment at the call, not from the libraries' constants (fixed at their import):
the stage kernels start from this process's environment, so that is what their loads will see.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from pathlib import Path

from dpo_kit.params import (
    JUDGE_NAMES,
    DataParams,
    Params,
    ParamsError,
    gguf_candidates,
    is_hub_dataset,
    is_local_path,
    sampler_is_local,
)

# huggingface_hub.constants' and datasets.config's ENV_VARS_TRUE_VALUES: "2" or "y" leave both libraries online.
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
# The stages that load each kind of hub id: the model in every stage (the format stage takes its tokenizer).
FORMAT_STAGE = "format"
FULL_COMMIT = re.compile(r"[0-9a-f]{40}")
JUDGE_STAGES = ("generate", "evaluate")


def models_offline_variable() -> str | None:
    """The variable that makes huggingface_hub (and so transformers) offline, or None: HF_HUB_OFFLINE, or
    TRANSFORMERS_OFFLINE when HF_HUB_OFFLINE is unset or empty, as huggingface_hub.constants reads them."""
    name = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return name if os.environ.get(name, "").upper() in TRUE_VALUES else None


def datasets_offline_variable() -> str | None:
    """The variable that makes datasets offline, or None: HF_DATASETS_OFFLINE when set (even to a false value, which
    keeps datasets online whatever HF_HUB_OFFLINE says), else as for models (datasets.config)."""
    if "HF_DATASETS_OFFLINE" in os.environ:
        return "HF_DATASETS_OFFLINE" if os.environ["HF_DATASETS_OFFLINE"].upper() in TRUE_VALUES else None
    return models_offline_variable()


def _hf_home() -> str:
    default = os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return os.path.expandvars(os.path.expanduser(os.getenv("HF_HOME", default)))


def hub_cache_dir() -> str:
    """huggingface_hub's cache, as its constants compute HF_HUB_CACHE."""
    legacy = os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(_hf_home(), "hub"))
    return os.path.expandvars(os.path.expanduser(os.getenv("HF_HUB_CACHE", legacy)))


def datasets_cache_dir() -> str:
    """datasets' cache of prepared (Arrow) datasets, as datasets.config computes HF_DATASETS_CACHE."""
    return os.path.expanduser(os.getenv("HF_DATASETS_CACHE", os.path.join(_hf_home(), "datasets")))


def hub_file_cached(repo_id: str, filename: str, revision: str | None, cache_dir: str) -> bool:
    """Whether huggingface_hub, offline, finds `filename` of the model repo at `revision` (None: main): the lookup
    hf_hub_download makes without a network (refs/<revision>, or a commit's snapshots/<hash>/<filename>)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision), str)
    except ValueError:  # an id huggingface_hub refuses (HFValidationError) is in no cache either
        return False


def dataset_cached(dataset_id: str, cache_dir: str) -> bool:
    """Whether datasets, offline, has any prepared copy of the hub dataset: offline, load_dataset never reads the hub
    cache of the dataset repo, only <HF_DATASETS_CACHE>/<owner>___<name>/<config>/<version>/<commit>/
    (datasets.load.CachedDatasetModuleFactory), and with none there it fails. Which configuration and data_dir it then
    takes is its own choice, reported by the format stage; a data.revision it ignores is offline_revision_problem's."""
    root = _dataset_root(dataset_id, cache_dir)
    return any(os.path.isdir(path) for path in glob.glob(os.path.join(glob.escape(root), "*", "*", "*")))


def _dataset_root(dataset_id: str, cache_dir: str) -> str:
    from datasets.naming import camelcase_to_snakecase

    parts = dataset_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return os.path.join(cache_dir, "___".join(parts))


def cached_dataset_commits(dataset_id: str, cache_dir: str) -> list[str]:
    """The commits of the dataset repo of which datasets' cache holds a prepared copy (any configuration)."""
    root = _dataset_root(dataset_id, cache_dir)
    return sorted({os.path.basename(path) for path in glob.glob(os.path.join(glob.escape(root), "*", "*", "*"))
                   if os.path.isdir(path)})


def dataset_revision_commit(dataset_id: str, revision: str, hub_cache: str) -> str | None:
    """The commit that data.revision names, found without the hub: a full commit hash is itself; a branch or tag is
    the commit huggingface_hub recorded for it (refs/<revision> of the dataset repo in its cache, written when datasets
    last loaded that revision online), as huggingface_hub resolves a revision offline. None when neither says. A
    shorter hex string is not taken as a commit prefix: it may as well be a branch or tag, which offline cannot be told."""
    if FULL_COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(hub_cache) / repo_folder_name(repo_id=dataset_id, repo_type="dataset") / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return commit if FULL_COMMIT.fullmatch(commit) else None


def dataset_copy_loaded_offline(data: DataParams, cache_dir: str) -> str:
    """The folder of the prepared copy that datasets.load_dataset loads offline for data.source, data.config and
    data.data_dir: offline it never resolves the revision, and its cache builder takes the newest (by mtime) copy of
    that configuration, whatever the revision. Asked of the function that builder calls, so the answer is the one the
    load will reach; its ValueError (no copy of that configuration, or several configurations and none named) passes."""
    from datasets.packaged_modules.cache.cache import _find_hash_in_cache

    logger = logging.getLogger(_find_hash_in_cache.__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "Found the latest cached dataset" warning is the load's to show, not validate's
    try:
        config_id, version, commit = _find_hash_in_cache(
            dataset_name=data.source, config_name=data.config, cache_dir=cache_dir,
            config_kwargs={} if data.data_dir is None else {"data_dir": data.data_dir}, custom_features=None)
    finally:
        logger.setLevel(level)
    return os.path.join(_dataset_root(data.source, cache_dir), config_id, version, commit)


def offline_revision_problem(data: DataParams, variable: str, loaded: str | None = None) -> str | None:
    """Why, offline, the copy of the hub dataset that datasets loads (`loaded`, its folder, "" for none; None: the one
    it will load) is not data.revision's, or None when it is or data.revision is unset (the newest cached copy, knowingly)."""
    return cached_revision_problem(data, f"offline ({variable} is set), datasets ignores the revision of", f"unset {variable}",
                                   loaded)


def cached_revision_problem(data: DataParams, why: str, fill: str, loaded: str | None = None) -> str | None:
    """Why the copy of the hub dataset that datasets loads from its cache (`loaded`, its folder, "" for none; None: the
    one it will load) is not data.revision's, or None when it is or data.revision is unset. `why` says why datasets took
    that copy without the hub (offline, or the hub not reached), ending before the dataset's id; `fill` what to do to
    let it ask the hub."""
    if data.revision is None:
        return None
    cache, hub_cache = datasets_cache_dir(), hub_cache_dir()
    commit = dataset_revision_commit(data.source, data.revision, hub_cache)
    try:
        loaded = dataset_copy_loaded_offline(data, cache) if loaded is None else loaded
    except (ValueError, OSError) as error:  # OSError: a copy without its dataset_info.json, which the load fails on too
        took = f"datasets loads no copy of it: {error}"
    else:
        if commit is not None and os.path.basename(loaded) == commit:
            return None
        took = (f"datasets loads the newest cached copy, of commit {os.path.basename(loaded)} ({loaded})" if loaded
                else "datasets loaded it from no cached file, so which commit it is cannot be told")
    if commit is None:
        named = (f"data.revision {data.revision!r} is no full 40-hex commit, and the Hugging Face cache {hub_cache}"
                 f" records no branch or tag of that name for the dataset")
    else:
        named = f"data.revision is {'' if commit == data.revision else f'{data.revision!r}, '}commit {commit}"
    chosen = "".join(f", data.{key} {value!r}" for key in ("config", "data_dir") if (value := getattr(data, key)))
    cached = ", ".join(cached_dataset_commits(data.source, cache)) or "none"
    return (f"data.revision: {why} the hub dataset '{data.source}'{chosen}: {took}; {named}. Commits cached in"
            f" {_dataset_root(data.source, cache)}: {cached}. Run once with a network ({fill}), where datasets"
            " loads data.revision itself; or set data.revision to the commit datasets loads from its cache; or leave"
            " data.revision empty to take the newest cached copy knowingly")


def _hub_model(name: str | None, project_dir: Path) -> bool:
    """A name the kit loads from the hub (or its cache): not a path, and nothing of that name in the project."""
    return bool(name) and not is_local_path(name) and not (project_dir / name).exists()


def hub_ids_to_load(params: Params, project_dir: str | Path = ".", stages=None) -> list[tuple[str, str, str, str | None]]:
    """(params key, hub id, file that stands for it, revision) for each hub model the given stages (None: all) load."""
    from dpo_kit.models.gguf import OFFLINE_GGUF_MODELS

    project = Path(project_dir)
    if stages is not None and not stages:  # a resumed run with nothing left to do loads nothing
        return []

    def runs(names) -> bool:
        return stages is None or any(stage in stages for stage in names)

    model = params.model
    found = []
    if _hub_model(model.name_or_path, project) and model.name_or_path not in OFFLINE_GGUF_MODELS \
            and not model.builds_tiny_model:
        if not model.gguf_file:
            found.append(("model.name_or_path", model.name_or_path, "config.json", model.revision))
        elif not any(path.is_file() for path in gguf_candidates(model.name_or_path, model.gguf_file, project)):
            found.append(("model.gguf_file", model.name_or_path, model.gguf_file, model.revision))
    generate = params.data.generate
    if generate is not None and runs([FORMAT_STAGE]):
        sampler = generate.sampler
        if sampler and not sampler_is_local(params, project) and sampler != model.name_or_path:
            # on_policy.sampler_load_params: another repo than the policy's is read at its default branch
            found.append(("data.generate.sampler", sampler, "config.json", None))
        if generate.judge not in JUDGE_NAMES and _hub_model(generate.judge, project):
            found.append(("data.generate.judge", generate.judge, "config.json", None))
    if runs(JUDGE_STAGES) and params.evaluate.judge not in JUDGE_NAMES \
            and _hub_model(params.evaluate.judge, project):
        found.append(("evaluate.judge", params.evaluate.judge, "config.json", None))
    return found


def check_offline_cache(params: Params, project_dir: str | Path = ".", stages=None) -> None:
    """Refuse, naming each params key, id, revision and the cache looked in, a hub model or dataset that the given
    stages (None: all) load and that, offline, is not in the local cache. Online it does nothing."""
    missing, fills, variables = [], [], []
    revision_problem = None
    variable = models_offline_variable()
    if variable:
        cache = hub_cache_dir()
        for key, repo_id, filename, revision in hub_ids_to_load(params, project_dir, stages):
            if not hub_file_cached(repo_id, filename, revision, cache):
                missing.append(f"{key}: '{repo_id}' at revision {revision or 'main'}: no {filename} for it in the"
                               f" Hugging Face cache {cache} ({variable} is set)")
                pinned = f" --revision {revision}" if revision else ""
                fills.append(f"`hf download {repo_id}{f' {filename}' if key == 'model.gguf_file' else ''}{pinned}`")
                variables.append(variable)
    source = params.data.source
    variable = datasets_offline_variable()
    if variable and is_hub_dataset(source) and not (Path(project_dir) / source).exists() and (
            stages is None or FORMAT_STAGE in stages):
        cache = datasets_cache_dir()
        if not dataset_cached(source, cache):
            asked = "".join(f", data.{key} {value}" for key in ("revision", "config", "data_dir")
                            if (value := getattr(params.data, key)) is not None)
            missing.append(f"data.source: the hub dataset '{source}'{asked}: nothing prepared for it, at any revision,"
                           f" in the datasets cache {cache} ({variable} is set)")
            fills.append(f"a run's format stage (or datasets.load_dataset('{source}'))")
            variables.append(variable)
        else:
            revision_problem = offline_revision_problem(params.data, variable)
    if missing:
        unset = " and ".join(dict.fromkeys(variables))
        raise ParamsError(
            "offline, so the hub will not be asked, and the local cache lacks what the run would load:\n- "
            + "\n- ".join(missing)
            + f"\nRun once with a network to fill the cache ({'; '.join(fills)}), or unset {unset}, or name a local"
            " model directory or data file instead"
        )
    if revision_problem:
        raise ParamsError(revision_problem)
