"""The format stage end to end: sources, the seeded split, the files written and the notebook helpers."""

import hashlib
import json
import random
from pathlib import Path

import pandas as pd
import pytest

from dpo_kit.data.audit import AuditResult, NoPairsLeftError
from dpo_kit.data.formats import rebuild_hh_transcript
from dpo_kit.data.pipeline import (
    dropped_summary_table,
    load_data_report,
    load_split,
    plot_token_lengths,
    prepare_data,
    raise_if_a_split_is_empty,
    split_rows,
)
from dpo_kit.data.sources import SourceError, read_rows
from dpo_kit.models.tiny import build_tiny_tokenizer
from dpo_kit.params import parse_params

FIXTURES = Path(__file__).parent / "fixtures"

ORCA_ROWS = [
    {"system": "", "question": f"What is {n} plus {n}?", "chosen": f"{n} plus {n} is {2 * n}.", "rejected": "No idea."}
    for n in range(1, 6)
] + [{"system": "You are a careful assistant.", "question": "Spell cat.", "chosen": "C-A-T.", "rejected": "K-A-T."}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def make_params(seed=42, **data):
    # data.max_length is set so the tests never need TRL's DPOConfig defaults.
    return parse_params(
        {"run": {"name": "test-run", "seed": seed}, "model": {"name_or_path": "unused"}, "data": {"max_length": 256, **data},
         "evaluate": {"judge": "unused/reward-model"}}
    )


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --- the bundled default, files and report --------------------------------------------------


def test_bundled_run_writes_files_and_a_consistent_report(tokenizer, tmp_path):
    report = prepare_data(make_params(), tokenizer, tmp_path)
    data_dir = tmp_path / "data"
    train, eval_ = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "eval.jsonl")
    assert report.rows_read == 400 and report.rows_kept + report.rows_dropped == report.rows_read
    assert (report.n_train, report.n_eval) == (len(train), len(eval_)) == (360, 40)
    written = (data_dir / "train.jsonl").read_bytes() + (data_dir / "eval.jsonl").read_bytes()
    assert report.fingerprint == hashlib.sha256(written).hexdigest()
    stored = json.loads((data_dir / "report.json").read_text())
    assert stored["pair_token_lengths"]["prompt_lengths"] == report.prompt_lengths
    assert {k: v for k, v in stored.items() if k != "pair_token_lengths"} == json.loads(json.dumps(report.to_dict()))
    assert load_data_report(tmp_path) == report, "the stored report reads back whole"
    assert "prompt_lengths" not in report.to_dict() and report.to_dict()["token_lengths"]["prompt"]["count"] == 400
    assert len(report.prompt_lengths) == len(report.prompt_chosen_lengths) == 400
    assert read_jsonl(data_dir / "dropped.jsonl") == []
    assert set(train[0]) == {"prompt", "chosen", "rejected"} and train[0]["chosen"][0]["role"] == "assistant"


def test_a_report_written_before_held_out_from_existed_reads_back(tokenizer, tmp_path):
    report = prepare_data(make_params(), tokenizer, tmp_path)
    stored = json.loads((tmp_path / "data" / "report.json").read_text())
    assert stored.pop("held_out_from") is None, "a seeded split holds out no other run's prompts"
    (tmp_path / "data" / "report.json").write_text(json.dumps(stored))
    assert load_data_report(tmp_path) == report


def test_same_seed_same_split_and_another_seed_another(tokenizer, tmp_path):
    first = prepare_data(make_params(seed=7), tokenizer, tmp_path / "a")
    again = prepare_data(make_params(seed=7), tokenizer, tmp_path / "b")
    other = prepare_data(make_params(seed=8), tokenizer, tmp_path / "c")
    assert first.fingerprint == again.fingerprint
    assert read_jsonl(tmp_path / "a/data/eval.jsonl") == read_jsonl(tmp_path / "b/data/eval.jsonl")
    assert first.fingerprint != other.fingerprint
    assert read_jsonl(tmp_path / "a/data/eval.jsonl") != read_jsonl(tmp_path / "c/data/eval.jsonl")


def test_text_holding_unicode_line_breaks_reads_back_one_row_per_line(tokenizer, tmp_path):
    # json writes U+2028, U+2029 and U+0085 raw; str.splitlines() breaks there, so load_split (the train stage) and
    # the other readers of these files failed with JSONDecodeError on a pair of web text that held one.
    rows = [{"prompt": f"Line one\u2028line two {n}?", "chosen": "Yes\x85indeed.", "rejected": "No\u2029."} for n in range(5)]
    write_source(rows, tmp_path / "pairs.jsonl")
    prepare_data(make_params(source="pairs.jsonl", format="standard"), tokenizer, tmp_path / "run", project_dir=tmp_path)
    for split in ("train", "eval"):
        text = (tmp_path / "run" / "data" / f"{split}.jsonl").read_text(encoding="utf-8")
        assert all(json.loads(line) for line in text.splitlines()), "every line, as any reader splits them, is a row"
        assert len(load_split(tmp_path / "run", split)) == len(text.splitlines())
    pairs = [*load_split(tmp_path / "run", "train"), *load_split(tmp_path / "run", "eval")]
    assert sorted(pair["prompt"][0]["content"] for pair in pairs) == [row["prompt"] for row in rows], "text kept exactly"
    assert {pair["chosen"][0]["content"] for pair in pairs} == {"Yes\x85indeed."}


def test_split_sizes_and_that_no_pair_is_lost_or_shared():
    kept = [(i, {"prompt": f"p{i}", "id": i}) for i in range(10)]
    train, eval_ = split_rows(kept, 0.2, seed=0)
    assert (len(train), len(eval_)) == (8, 2)
    assert sorted(r["id"] for r in train + eval_) == list(range(10))
    assert split_rows(kept[:1], 0.2, seed=0) == ([{"prompt": "p0", "id": 0}], [])
    assert len(split_rows(kept[:2], 0.01, seed=0)[1]) == 1  # at least one held out


def test_pairs_that_share_a_prompt_stay_in_one_split():
    # hh-rlhf, UltraFeedback and orca ask one question more than once. A pair-level shuffle of 30 pairs over 10
    # prompts held out 6 pairs, 5 of whose prompts were trained on too: the eval pairs measured seen prompts.
    kept = [(i, {"prompt": [{"role": "user", "content": f"q{i % 10}"}], "id": i}) for i in range(30)]
    for seed in range(20):
        train, eval_ = split_rows(kept, 0.2, seed)
        assert sorted(r["id"] for r in train + eval_) == list(range(30))
        train_prompts = {r["prompt"][0]["content"] for r in train}
        eval_prompts = {r["prompt"][0]["content"] for r in eval_}
        assert not train_prompts & eval_prompts, f"seed {seed}: prompts in both splits"
        assert len(eval_) == 6 and len(eval_prompts) == 2, "whole prompts, 3 pairs each, fill the 20% held out"
        assert split_rows(kept, 0.2, seed) == (train, eval_), "the same seed gives the same split"
    # Every prompt has more pairs than the share held out: the smallest is held out rather than none.
    uneven = [(i, {"prompt": "big" if i < 8 else "small", "id": i}) for i in range(10)]
    assert [r["id"] for r in split_rows(uneven, 0.1, seed=0)[1]] == [8, 9]
    # With every prompt distinct it is the pair-level split it always was, so earlier runs' splits still hold.
    distinct = [(i, {"prompt": f"p{i}", "id": i}) for i in range(40)]
    order = list(range(40))
    random.Random(42).shuffle(order)
    assert [r["id"] for r in split_rows(distinct, 0.25, seed=42)[1]] == sorted(order[:10])


def test_pairs_that_all_share_one_prompt_are_refused_naming_why(tokenizer, tmp_path):
    rows = [{"prompt": "Hello", "chosen": f"Hi, how can I help? ({n})", "rejected": "Go away."} for n in range(5)]
    write_source(rows, tmp_path / "one-prompt.jsonl")
    with pytest.raises(NoPairsLeftError) as caught:
        prepare_data(make_params(source="one-prompt.jsonl", format="standard"), tokenizer, tmp_path / "run",
                     project_dir=tmp_path)
    message = str(caught.value)
    assert "The split gives train 5, held out 0" in message
    assert "at least 2 distinct prompts must be kept: the 5 pairs kept all have one prompt" in message


def test_load_split_gives_trl_ready_datasets(tokenizer, tmp_path):
    prepare_data(make_params(), tokenizer, tmp_path)
    train = load_split(tmp_path, "train")
    assert train.column_names == ["prompt", "chosen", "rejected"] and len(train) == 360
    assert train[0] == read_jsonl(tmp_path / "data/train.jsonl")[0]
    with pytest.raises(ValueError, match="valid splits: train, eval"):
        load_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="run the format stage"):
        load_split(tmp_path / "elsewhere", "train")


def test_standard_output_renders_prompts_with_the_chat_template(tokenizer, tmp_path):
    prepare_data(make_params(output_format="standard"), tokenizer, tmp_path)
    row = load_split(tmp_path, "train")[0]
    original = next(r for r in read_rows(make_params().data) if r["chosen"][0]["content"] == row["chosen"])
    assert row["prompt"] == tokenizer.apply_chat_template(original["prompt"], add_generation_prompt=True, tokenize=False)
    assert isinstance(row["rejected"], str)


# --- sources --------------------------------------------------------------------------------


def write_source(rows, path: Path) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_resolve_against_the_project_dir(tokenizer, tmp_path, suffix):
    (tmp_path / "data").mkdir()
    write_source(ORCA_ROWS, tmp_path / "data" / f"orca{suffix}")
    params = make_params(source=f"data/orca{suffix}", format="orca")
    assert read_rows(params.data, project_dir=tmp_path) == ORCA_ROWS
    report = prepare_data(params, tokenizer, tmp_path / "run", project_dir=tmp_path)
    assert (report.rows_read, report.rows_kept) == (6, 6)


def test_json_file_of_column_lists(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", "f"]}))
    rows = read_rows(make_params(source=str(path), format="standard").data)
    assert rows == [{"prompt": "a", "chosen": "c", "rejected": "e"}, {"prompt": "b", "chosen": "d", "rejected": "f"}]


def test_max_rows_reads_only_the_first_rows(tmp_path):
    write_source(ORCA_ROWS, tmp_path / "orca.parquet")
    assert read_rows(make_params(source="orca.parquet", format="orca", max_rows=2).data, tmp_path) == ORCA_ROWS[:2]


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(SourceError, match="file not found: .*missing.jsonl"):
        read_rows(make_params(source="missing.jsonl").data, tmp_path)
    (tmp_path / "pairs").mkdir()  # a folder of files: not "not found", and not read as any one of them
    with pytest.raises(SourceError, match=r"data.source: .*pairs is a folder; name one file in it \(.jsonl, .json"):
        read_rows(make_params(source="./pairs").data, tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}, "oops"],
         "element 1 \\(counting from 0\\) of the list is str 'oops', not a row object"),
        ({"prompt": ["a", "b"], "chosen": ["c"], "rejected": ["e", "f"]},
         "the column lists differ in length \\('prompt' 2, 'chosen' 1, 'rejected' 2\\)"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "the value of 'prompt' is not a list of column values"),
        ("just text", "the file holds str 'just text'"),
    ],
)
def test_a_json_file_of_the_wrong_shape_names_what_is_wrong(tmp_path, content, message):
    (tmp_path / "pairs.json").write_text(json.dumps(content))
    with pytest.raises(SourceError, match=message + ".*a .json file holds a list of row objects"):
        read_rows(make_params(source="pairs.json", format="standard").data, tmp_path)


def test_a_json_file_written_by_pandas_default_to_json_says_how_to_write_it(tmp_path):
    """DataFrame.to_json() writes each column as an object keyed by row index; the message says which orient reads."""
    import pandas as pd  # datasets depends on it
    pd.DataFrame({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}).to_json(tmp_path / "pairs.json")
    with pytest.raises(SourceError, match=r"DataFrame.to_json\(\) default .*orient='records'"):
        read_rows(make_params(source="pairs.json", format="standard").data, tmp_path)


def test_broken_jsonl_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    with pytest.raises(SourceError, match="bad.jsonl, line 2: not valid JSON"):
        read_rows(make_params(source="bad.jsonl").data, tmp_path)


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("pairs.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e", "chosen": "f",'
         ' "rejected": "g"}\n', "pairs.jsonl, line 2: "),
        ("pairs.json", '[{"prompt": [{"role": "user", "role": "system", "content": "a"}], "chosen": "b", "rejected": "c"}]',
         "pairs.json: "),
    ],
)
def test_a_key_named_twice_in_a_json_object_is_refused_not_read_as_its_last_value(tmp_path, name, text, where):
    # json keeps the last of two values without a word: the row trained on "f" and "e" was lost, or a user turn
    # became a system message.
    (tmp_path / name).write_text(text)
    with pytest.raises(SourceError, match=f"{where}an object names the key '(chosen|role)' more than once"):
        read_rows(make_params(source=name).data, tmp_path)


def test_csv_row_with_more_fields_than_the_header_is_refused_not_shifted(tmp_path):
    # Unquoted commas: pandas took "Hi 0" as the row index and trained on " how are you?" as the prompt.
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nHello,Fine thanks,No\nHi 0, how are you?,I am well thank you,Go away\n")
    with pytest.raises(SourceError) as caught:
        read_rows(make_params(source="pairs.csv", format="standard").data, tmp_path)
    message = str(caught.value)
    assert message.startswith(f"data.source: {path}, line 3: 4 fields, but the header has 3 columns (prompt, chosen, rejected)")
    assert "'Hi 0', ' how are you?'" in message, "the fields as split are shown, so the stray comma is visible"
    assert "must be enclosed in double quotes" in message


def test_csv_first_row_with_extra_fields_is_not_read_as_an_index_column(tmp_path):
    # The bug's own repro: when the first data row is the long one, pandas infers an index column silently.
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\nHi 0, how are you?,I am well thank you,Go away\n")
    with pytest.raises(SourceError, match=r"pairs.csv, line 2: 4 fields, but the header has 3 columns"):
        read_rows(make_params(source="pairs.csv", format="standard").data, tmp_path)


def test_csv_row_with_fewer_fields_than_the_header_is_refused_not_padded(tmp_path):
    # pandas padded the missing rejected with "", so the row was dropped as empty_response instead of reported.
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\nHello,Fine thanks\n")
    with pytest.raises(SourceError, match=r"line 2: 2 fields, but the header has 3 columns \(prompt, chosen, rejected\)"):
        read_rows(make_params(source="pairs.csv", format="standard").data, tmp_path)


def test_csv_quoted_fields_are_read_exactly(tmp_path):
    # Quoted commas, doubled quotes, line breaks, a UTF-8 BOM (Excel), blank lines and a field longer than the
    # csv module's default limit all read back as written; a bad row after a multi-line one names its own line.
    long_reply = "x" * 200_000
    path = tmp_path / "pairs.csv"
    path.write_text(
        '\ufeffprompt,chosen,rejected\n"Hi, how are you?","She said ""fine"".",No\n\n'
        f'"Two\nlines",{long_reply},""\n',
        encoding="utf-8",
    )
    assert read_rows(make_params(source="pairs.csv", format="standard").data, tmp_path) == [
        {"prompt": "Hi, how are you?", "chosen": 'She said "fine".', "rejected": "No"},
        {"prompt": "Two\nlines", "chosen": long_reply, "rejected": ""},
    ]
    with path.open("a") as out:
        out.write("a,b,c,d\n")
    with pytest.raises(SourceError, match="pairs.csv, line 6: 4 fields"):
        read_rows(make_params(source="pairs.csv", format="standard").data, tmp_path)


UNREADABLE_FILES = {
    # name: (file bytes, what the message must say besides data.source and the path)
    "empty.csv": (b"", "the CSV file is empty; its first line must be a header"),
    "open_quote.csv": (
        b'prompt,chosen,rejected\n"Hi,Fine,No\nHello,Ok,No\n',
        "line 2: cannot be parsed as CSV (a quoted field opened on line 2 is never closed)",
    ),
    "latin1.csv": ("prompt,chosen,rejected\nHello,Fine,No\nCafé,Oui,Non\n".encode("latin-1"), "line 3: not UTF-8 text (byte 0xe9"),
    "latin1.jsonl": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "é"}\n'.encode("latin-1"), "line 2: not UTF-8 text"),
    "latin1.json": ('[{"prompt": "é"}]'.encode("latin-1"), "line 1: not UTF-8 text"),
    # pandas renamed the second one 'chosen.1', so a column map could silently pick the wrong one.
    "repeated_column.csv": (b"prompt,chosen,chosen\na,b,c\n", "line 1: the header names a column more than once: 'chosen'"),
    "corrupt.parquet": (b"PAR1 not really parquet", "not a readable Parquet file (ArrowInvalid"),
    "broken.json": (b'[{"prompt": "a",\n "chosen": }]', "line 2: not valid JSON (Expecting value, column 12)"),
    "broken.jsonl": (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"\n', "line 2: not valid JSON"),
    # JSON Lines under a .json name (pandas' to_json(lines=True), many hub exports) said only "Extra data".
    "lines.json": (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e", "rejected": "f"}\n',
                   "line 2: not valid JSON (Extra data, column 1). The file holds one JSON object per line (JSON Lines),"
                   " which is read from a .jsonl file: rename it to lines.jsonl, or make it one list of row objects"),
}


@pytest.mark.parametrize("name", UNREADABLE_FILES)
def test_unreadable_files_name_data_source_the_file_and_the_problem(tmp_path, name):
    # Raw pandas/pyarrow/codec errors named neither the key nor the file; each becomes a SourceError that does.
    content, expected = UNREADABLE_FILES[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SourceError) as caught:
        read_rows(make_params(source=name, format="standard").data, tmp_path)
    message = str(caught.value)
    assert message.startswith(f"data.source: {tmp_path / name}") and expected in message
    if "UTF-8" in expected:
        assert "Data files must be UTF-8" in message


def test_hub_dataset_offline_fails_with_a_clear_message(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time, so set it too
    with pytest.raises(SourceError) as caught:
        read_rows(make_params(source="Intel/orca_dpo_pairs", format="orca").data)
    message = str(caught.value)
    assert "'Intel/orca_dpo_pairs'" in message and "could not be reached" in message and "offline" in message
    assert "local .jsonl/.json/.parquet/.csv file or 'bundled'" in message


def test_hub_dataset_is_loaded_with_split_and_revision(monkeypatch, tmp_path):
    import datasets

    calls = []

    commit = "0123456789abcdef0123456789abcdef01234567"
    copy = tmp_path / "cache" / "jondurbin___truthy-dpo-v0.1" / "default" / "0.0.0" / commit
    copy.mkdir(parents=True)
    datasets.Dataset.from_list(ORCA_ROWS).save_to_disk(tmp_path / "saved")
    (tmp_path / "saved" / "data-00000-of-00001.arrow").rename(copy / "truthy-dpo-v0.1-train.arrow")

    def fake_load_dataset(source, name, data_dir, split, revision):
        calls.append((source, name, data_dir, split, revision))
        # as datasets loads one: from an Arrow file in the folder its cache names by the commit (the one pinned)
        return datasets.Dataset.from_file(str(copy / "truthy-dpo-v0.1-train.arrow"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # an online load: the copy loaded is checked against data.revision, online too (tests/test_hub_cache.py)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    params = make_params(source="jondurbin/truthy-dpo-v0.1", format="truthy", split="train[:10]", revision=commit, max_rows=3)
    assert read_rows(params.data) == ORCA_ROWS[:3]
    subset = make_params(source="Anthropic/hh-rlhf", format="hh-rlhf", data_dir="harmless-base", config="default").data
    read_rows(subset)
    assert calls == [("jondurbin/truthy-dpo-v0.1", None, None, "train[:10]", commit),
                     ("Anthropic/hh-rlhf", "default", "harmless-base", "train", None)]  # fmt: skip
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_list(ORCA_ROWS))
    with pytest.raises(SourceError, match="datasets loaded it from no cached file, so which commit it is cannot be told"):
        read_rows(params.data)  # a dataset from no cached file has no commit to check


def write_hub_dataset(root: Path) -> None:
    """A dataset folder as a hub repo holds one, read by datasets without a network: 'org/prefs' declares two
    configurations in its README's YAML header, 'org/hh' keeps its subsets in folders (as Anthropic/hh-rlhf does)."""
    prefs = root / "org" / "prefs"
    for config in ("alpha", "beta"):
        (prefs / config).mkdir(parents=True)
        rows = [{"prompt": f"{config} question {n}?", "chosen": "Yes.", "rejected": "No."} for n in range(3)]
        (prefs / config / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (prefs / "README.md").write_text(
        "---\nconfigs:\n" + "".join(
            f"- config_name: {config}\n  data_files:\n  - split: train\n    path: {config}/*.jsonl\n"
            for config in ("alpha", "beta")
        ) + "---\n"
    )
    for subset in ("harmless-base", "helpful-base"):
        (root / "org" / "hh" / subset).mkdir(parents=True)
        turn = f"\n\nHuman: {subset}?\n\nAssistant:"
        row = {"chosen": f"{turn} Sure.", "rejected": f"{turn} No."}
        (root / "org" / "hh" / subset / "train.jsonl").write_text(json.dumps(row) + "\n")


@pytest.fixture
def hub_datasets(tmp_path, monkeypatch):
    """Hub ids 'org/prefs' and 'org/hh' that load_dataset finds as folders of the working directory, offline."""
    import datasets

    write_hub_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return tmp_path


def test_data_config_and_data_dir_read_that_subset_of_a_hub_dataset(hub_datasets):
    """A hub dataset of several configurations (many multi-config preference sets) or of subsets in folders
    (Anthropic/hh-rlhf's harmless-base) could not be named in params; data.config and data.data_dir pick one."""
    beta = read_rows(make_params(source="org/prefs", format="standard", config="beta").data)
    assert [row["prompt"] for row in beta] == ["beta question 0?", "beta question 1?", "beta question 2?"]
    assert read_rows(make_params(source="org/prefs", format="standard", config="alpha", max_rows=1).data) == [
        {"prompt": "alpha question 0?", "chosen": "Yes.", "rejected": "No."}
    ]
    harmless = read_rows(make_params(source="org/hh", format="hh-rlhf", data_dir="harmless-base").data)
    assert [row["chosen"] for row in harmless] == ["\n\nHuman: harmless-base?\n\nAssistant: Sure."]
    assert len(read_rows(make_params(source="org/hh", format="hh-rlhf").data)) == 2  # no data_dir: every subset


def test_data_report_names_the_subset_of_the_hub_dataset_it_read(hub_datasets, tokenizer):
    """data.config and data.data_dir were in params.yaml and the fingerprint but not in data/report.json (the manifest's
    data block), which named the source alone: a report read on its own did not say which subset was trained on."""
    run_dir = hub_datasets / "run"
    for data, subset in (({"source": "org/prefs", "format": "standard", "config": "beta"}, {"config": "beta", "data_dir": None}),
                         ({"source": "org/hh", "format": "hh-rlhf"}, {"config": None, "data_dir": None}),
                         ({"source": "org/prefs", "format": "standard", "data_dir": "alpha"}, {"config": None, "data_dir": "alpha"})):
        report = prepare_data(make_params(**data), tokenizer, run_dir)
        stored = json.loads((run_dir / "data" / "report.json").read_text())
        assert {key: stored[key] for key in ("source", "config", "data_dir")} == {"source": data["source"], **subset}
        assert (report.config, report.data_dir) == (subset["config"], subset["data_dir"])
        assert load_data_report(run_dir) == report
    stored.pop("config"), stored.pop("data_dir")  # a report written before they were recorded reads back as unset
    (run_dir / "data" / "report.json").write_text(json.dumps(stored))
    assert (load_data_report(run_dir).config, load_data_report(run_dir).data_dir) == (None, None)
    bundled = prepare_data(make_params(), tokenizer, run_dir).to_dict()
    assert (bundled["config"], bundled["data_dir"]) == (None, None), "null, not absent, where the source has no subsets"


def write_split_dataset(root: Path) -> None:
    """'org/splits', a hub dataset of a train and a test split (as Anthropic/hh-rlhf's), read by datasets offline.

    train: three pairs kept, one with an empty response, one whose prompt is also a kept test pair's; test: three pairs
    kept, one with identical responses, one exact copy of an earlier test pair."""
    def pair(prompt, chosen="Yes.", rejected="No."):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    train = [pair("train question 0?"), pair("train question 1?", chosen=" "), pair("test question 1?"),
             pair("train question 2?"), pair("train question 3?")]
    test = [pair("test question 0?"), pair("test question 1?", chosen="Maybe."), pair("test question 2?", "Same.", "Same."),
            pair("test question 0?"), pair("test question 3?")]
    (root / "org" / "splits").mkdir(parents=True)
    for name, rows in (("train", train), ("test", test)):
        (root / "org" / "splits" / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_data_eval_split_holds_out_that_split_audited_and_recorded_as_the_train_splits_are(hub_datasets, tokenizer):
    """data.eval_split holds out a split of the same dataset (seed article 000 evaluated on hh-rlhf's test[:1000]), in
    place of data.eval_fraction of the train split: its rows are audited and their drops counted and recorded with
    their reason and split, and a train pair whose prompt is held out is dropped, so no held-out prompt is trained on."""
    write_split_dataset(hub_datasets)
    run_dir = hub_datasets / "run"
    params = make_params(source="org/splits", format="standard", eval_split="test")
    assert params.data.eval_fraction == 0.0, "left out beside data.eval_split, eval_fraction holds out nothing"
    report = prepare_data(params, tokenizer, run_dir)
    train, eval_ = read_jsonl(run_dir / "data" / "train.jsonl"), read_jsonl(run_dir / "data" / "eval.jsonl")
    assert [row["prompt"][0]["content"] for row in train] == ["train question 0?", "train question 2?", "train question 3?"]
    assert [row["prompt"][0]["content"] for row in eval_] == ["test question 0?", "test question 1?", "test question 3?"]
    dropped = [(row["split"], row["index"], row["reason"]) for row in read_jsonl(run_dir / "data" / "dropped.jsonl")]
    assert dropped == [("train", 1, "empty_response"), ("train", 2, "prompt_in_eval_split"),
                       ("test", 2, "identical_responses"), ("test", 3, "duplicate")]  # fmt: skip
    assert (report.rows_read, report.rows_kept, report.rows_dropped, report.n_train, report.n_eval) == (10, 6, 4, 3, 3)
    assert report.dropped_by_reason == {"empty_response": 1, "prompt_in_eval_split": 1, "identical_responses": 1, "duplicate": 1}
    assert report.by_split == {
        "train": {"split": "train", "rows_read": 5, "rows_kept": 3, "rows_dropped": 2,
                  "dropped_by_reason": {"empty_response": 1, "prompt_in_eval_split": 1}},
        "eval": {"split": "test", "rows_read": 5, "rows_kept": 3, "rows_dropped": 2,
                 "dropped_by_reason": {"identical_responses": 1, "duplicate": 1}},
    }  # fmt: skip
    assert (report.eval_split, report.eval_fraction) == ("test", None)
    assert len(report.prompt_lengths) == 4 + 3, "both splits' pairs that reached the length check (the leaked one too)"
    stored = json.loads((run_dir / "data" / "report.json").read_text())
    assert (stored["eval_split"], stored["by_split"]) == ("test", report.by_split)
    assert load_data_report(run_dir) == report
    assert "too_long" not in dropped_summary_table(report)["reason"].tolist()
    # a slice of the split, as the article's test[:1000]
    sliced = prepare_data(make_params(source="org/splits", format="standard", eval_split="test[:2]"), tokenizer, run_dir)
    assert (sliced.n_eval, sliced.by_split["eval"]["rows_read"], sliced.by_split["train"]["rows_dropped"]) == (2, 2, 2)
    # unset, the report and dropped.jsonl are as before: no split named
    plain = prepare_data(make_params(source="org/splits", format="standard"), tokenizer, run_dir)
    assert (plain.eval_split, plain.by_split, plain.eval_fraction) == (None, None, 0.1)
    assert all("split" not in row for row in read_jsonl(run_dir / "data" / "dropped.jsonl"))


def test_notebook_01_shows_each_splits_drops_and_counts_and_the_pairs_plotted_with_data_eval_split(hub_datasets, tokenizer):
    """With data.eval_split the drop table summed both splits' drops (the held-out split's identical_responses read as
    the train split's) and showed neither split's rows read or kept; the length plot counts data.split's pairs measured
    before their prompt was found held out, so its 7 pairs were 6 kept and 0 too_long without a word."""
    write_split_dataset(hub_datasets)
    report = prepare_data(make_params(source="org/splits", format="standard", eval_split="test"), tokenizer, hub_datasets / "run")
    table = dropped_summary_table(report)
    assert list(table.columns) == ["reason", "count", "data.split 'train'", "data.eval_split 'test'", "percent_of_read", "meaning"]
    by_reason = {row["reason"]: (row["count"], row["data.split 'train'"], row["data.eval_split 'test'"]) for _, row in table.iterrows()}
    assert by_reason == {"empty_response": (1, 1, 0), "prompt_in_eval_split": (1, 1, 0), "identical_responses": (1, 0, 1),
                         "duplicate": (1, 0, 1), "total": (4, 2, 2)}  # fmt: skip
    assert table.iloc[-1]["meaning"] == (
        "every dropped row is in data/dropped.jsonl, with its reason and split; data.split 'train': read 5, kept 3"
        " (train.jsonl), data.eval_split 'test': read 5, kept 3 (eval.jsonl)")
    assert "so that no held-out prompt is trained on" in table.set_index("reason").loc["prompt_in_eval_split", "meaning"]
    figure = plot_token_lengths(report)
    assert sum(patch.get_height() for patch in figure.axes[0].patches) == len(report.prompt_lengths) == 7
    assert figure._suptitle.get_text() == ("Token lengths of 7 pairs of data.split 'train' and data.eval_split 'test'"
                                           " (0 dropped as too_long, 1 as prompt_in_eval_split)")  # fmt: skip
    # unset, the table and title are as before (the tiny run's notebook output is unchanged)
    plain = prepare_data(make_params(source="org/splits", format="standard"), tokenizer, hub_datasets / "run")
    assert list(dropped_summary_table(plain).columns) == ["reason", "count", "percent_of_read", "meaning"]
    assert plot_token_lengths(plain)._suptitle.get_text() == f"Token lengths of {len(plain.prompt_lengths)} pairs (0 dropped as too_long)"


def test_the_origin_of_the_held_out_pairs_is_named_in_the_params_terms(hub_datasets, tokenizer):
    """What the evaluate stage records in metrics.json as held_out_pairs: data.eval_split, or data.eval_fraction by
    run.seed, or round 1's held-out prompts (round 2 of iterative DPO); nothing for a run without data/report.json."""
    from dpo_kit.data.pipeline import held_out_origin

    write_split_dataset(hub_datasets)
    run_dir = hub_datasets / "run"
    assert held_out_origin(run_dir) is None
    prepare_data(make_params(source="org/splits", format="standard", eval_split="test[:4]"), tokenizer, run_dir)
    assert held_out_origin(run_dir) == "data.eval_split 'test[:4]' of data.source 'org/splits'"
    prepare_data(make_params(source="org/splits", format="standard", seed=3), tokenizer, run_dir)
    assert held_out_origin(run_dir) == "data.eval_fraction 0.1 of the kept pairs of data.source 'org/splits', by run.seed 3"
    stored = json.loads((run_dir / "data" / "report.json").read_text())
    stored.update(held_out_from="runs/round-1/data/eval.jsonl", eval_fraction=None)
    (run_dir / "data" / "report.json").write_text(json.dumps(stored))
    assert held_out_origin(run_dir) == "the held-out prompts of runs/round-1/data/eval.jsonl"


def test_a_data_eval_split_that_leaves_nothing_held_out_or_is_missing_is_refused_naming_it(hub_datasets, tokenizer):
    write_split_dataset(hub_datasets)
    with pytest.raises(SourceError) as refused:
        prepare_data(make_params(source="org/splits", format="standard", eval_split="tset"), tokenizer, hub_datasets / "run")
    assert str(refused.value).startswith("data.eval_split 'tset': the hub dataset 'org/splits' has no such split; valid"
                                         " splits: 'train', 'test'")  # fmt: skip
    with pytest.raises(NoPairsLeftError) as refused:
        prepare_data(make_params(source="org/splits", format="standard", eval_split="test[2:3]"), tokenizer,
                     hub_datasets / "run")  # fmt: skip
    assert str(refused.value).startswith("all 1 rows read from hub dataset 'org/splits' (split 'test[2:3]') were dropped,"
                                         " so nothing is left to hold out. Top reasons:\n  identical_responses: 1 rows")  # fmt: skip
    assert read_jsonl(hub_datasets / "run" / "data" / "dropped.jsonl")[-1]["split"] == "test[2:3]"
    assert not (hub_datasets / "run" / "data" / "train.jsonl").exists()


@pytest.mark.parametrize(("data", "expected"), [
    ({"config": "gamma"}, "data.config 'gamma': the hub dataset 'org/prefs' has no configuration of that name; valid"
                          " names: 'alpha', 'beta'"),
    ({}, "data.config: the hub dataset 'org/prefs' has several configurations and data.config names none; set it to one"
         " of 'alpha', 'beta'"),
    ({"config": "alpha", "split": "tset"}, "data.split 'tset': the hub dataset 'org/prefs' (config 'alpha') has no such"
                                           " split; valid splits: 'train', or a slice"),
    ({"source": "org/hh", "data_dir": "harmless"}, "data.data_dir 'harmless': no data files were found in that folder"
                                                   " of the hub dataset 'org/hh'"),
])  # fmt: skip
def test_a_subset_a_hub_dataset_lacks_is_refused_naming_the_key_and_the_valid_names(hub_datasets, data, expected):
    with pytest.raises(SourceError) as refused:
        read_rows(make_params(**{"source": "org/prefs", "format": "standard", **data}).data)
    assert str(refused.value).startswith(expected)


@pytest.mark.parametrize(("source", "expected"), [
    ("https://huggingface.co/datasets/Anthropic/hh-rlhf", "data.source: Anthropic/hh-rlhf"),
    ("huggingface.co/datasets/jondurbin/truthy-dpo-v0.1/", "data.source: jondurbin/truthy-dpo-v0.1"),
    ("hf://datasets/Intel/orca_dpo_pairs", "data.source: Intel/orca_dpo_pairs"),
    ("https://huggingface.co/datasets/Anthropic/hh-rlhf/tree/main/harmless-base",
     "data.source: Anthropic/hh-rlhf, data.data_dir: harmless-base"),
    ("https://hf.co/datasets/org/prefs/tree/v1.0/a/b", "data.source: org/prefs, data.revision: v1.0, data.data_dir: a/b"),
])  # fmt: skip
def test_a_hub_datasets_address_as_data_source_is_refused_with_its_id(source, expected):
    """The address of a dataset's page (seed article 000 gives hh-rlhf's) was read as a local path and refused as
    "file not found: https:/huggingface.co/...": it now says which id, revision and data_dir to write."""
    from dpo_kit.params import ParamsError

    with pytest.raises(ParamsError) as refused:
        make_params(source=source, format="standard")
    assert str(refused.value).endswith(f"is the address of the hub dataset '{expected.split(', ')[0].split(': ')[1]}';"
                                       f" name it by its id: {expected}")
    assert make_params(source="https://example.com/pairs.jsonl").data.source == "https://example.com/pairs.jsonl"


def test_a_hub_id_that_names_a_folder_of_the_project_is_refused_before_the_hub_is_asked(tmp_path):
    """data.source 'data/prefs' has a hub id's shape: validate passed it, and the format stage (whose working directory
    is notebooks/) asked the hub for a dataset of that name, or said offline that the hub could not be reached, while
    the user meant the project's folder. Refused up front, naming a file in it as a local source is written."""
    from dpo_kit.params import ParamsError, check_local_files

    (tmp_path / "data" / "prefs").mkdir(parents=True)
    (tmp_path / "data" / "prefs" / "train.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    params = make_params(source="data/prefs", format="standard")
    with pytest.raises(ParamsError) as refused:
        check_local_files(params, tmp_path)
    assert str(refused.value).startswith(
        f"data.source 'data/prefs' is read as a hub dataset id (owner/name), but it names {tmp_path / 'data/prefs'} in"
        " the project. A local source is one .jsonl/.json/.parquet/.csv file, written with its suffix or a ./ prefix"
        " (e.g. ./data/prefs/train.jsonl)"
    )
    check_local_files(make_params(source="org/prefs", format="standard"), tmp_path)  # no such folder: a hub id


@pytest.mark.parametrize("source", ["bundled", "pairs.jsonl", "./pairs", "generate"])
@pytest.mark.parametrize("key", ["config", "data_dir", "eval_split"])
def test_data_config_and_data_dir_are_refused_where_no_hub_dataset_is_read(source, key):
    from dpo_kit.params import ParamsError

    raw = {"source": source, key: "harmless-base"}
    if source == "generate":
        raw["generate"] = {"prompts": "movie-review-openings", "judge": "sentiment"}
    with pytest.raises(ParamsError, match=f"data.{key} 'harmless-base' is only read from a hub dataset, and"
                                          f" data.source '{source}' is"):
        make_params(**raw)


def test_hub_errors_other_than_the_network_keep_their_cause(monkeypatch):
    import datasets

    def missing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(SourceError, match="nobody/nothing.*doesn't exist.*Check the dataset id"):
        read_rows(make_params(source="nobody/nothing").data)


# --- drops end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_dropped_row_names_its_line_in_the_file_as_an_editor_numbers_it(tokenizer, tmp_path, suffix):
    """dropped.jsonl's `index` counts rows from 0; a user opening the file sees lines from 1, past a CSV's header, a
    quoted field that spans lines and blank lines. Each dropped row records its line, and messages name both."""
    rows = [("Hi there", "Hello,\nfriend", "Go away"), ("What is 2+2?", "4", "5"), ("Hi there", "Hello,\nfriend", "Go away"),
            ("Empty", "", "no"), ("Q", "a", "b")]  # fmt: skip
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        records = [",".join(f'"{field}"' for field in row) for row in rows]  # quoted: "Hello,<line break>friend"
        path.write_text("prompt,chosen,rejected\n" + records[0] + "\n\n" + "\n".join(records[1:]) + "\n")
        lines = {2: 6, 3: 8}  # the header is line 1, row 0 spans lines 2-3, line 4 is blank
    else:
        records = [json.dumps(dict(zip(("prompt", "chosen", "rejected"), row, strict=True))) for row in rows]
        path.write_text(records[0] + "\n\n" + "\n".join(records[1:]) + "\n")
        lines = {2: 4, 3: 5}
    report = prepare_data(make_params(source=str(path), format="standard"), tokenizer, tmp_path / "run")
    dropped = read_jsonl(tmp_path / "run/data/dropped.jsonl")
    assert report.dropped_by_reason == {"duplicate": 1, "empty_response": 1}
    assert [(d["index"], d["line"], d["reason"]) for d in dropped] == [(2, lines[2], "duplicate"), (3, lines[3], "empty_response")]
    first = "line 2" if suffix == ".csv" else "line 1"
    assert dropped[0]["detail"] == f"same prompt, chosen and rejected as row 0 ({first})"
    assert path.read_text().splitlines()[lines[3] - 1].startswith(('"Empty"', '{"prompt": "Empty"'))

    # A source without lines (a .json list, Parquet, the hub) records none, and messages say the index counts from 0.
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps([dict(zip(("prompt", "chosen", "rejected"), row, strict=True)) for row in rows]))
    prepare_data(make_params(source=str(as_json), format="standard"), tokenizer, tmp_path / "json-run")
    dropped = read_jsonl(tmp_path / "json-run/data/dropped.jsonl")
    assert [(d["index"], d["line"]) for d in dropped] == [(2, None), (3, None)]
    assert dropped[0]["detail"] == "same prompt, chosen and rejected as row 0 (counting from 0)"


def test_hh_rlhf_file_end_to_end_with_dropped_rows_written(tokenizer, tmp_path):
    params = make_params(source=str(FIXTURES / "hh_rlhf_sample.jsonl"), format="hh-rlhf")
    report = prepare_data(params, tokenizer, tmp_path)
    assert (report.rows_read, report.rows_kept, report.rows_dropped) == (5, 2, 3)
    assert report.dropped_by_reason == {"unsplittable_transcript": 1, "empty_response": 1, "duplicate": 1}
    dropped = read_jsonl(tmp_path / "data/dropped.jsonl")
    source = read_jsonl(FIXTURES / "hh_rlhf_sample.jsonl")
    assert [(d["index"], d["reason"]) for d in dropped] == [(2, "unsplittable_transcript"), (3, "empty_response"), (4, "duplicate")]
    assert all(d["row"] == source[d["index"]] and d["detail"] for d in dropped)
    # The kept pairs, as written for TRL, still rebuild the exact source transcripts.
    written = read_jsonl(tmp_path / "data/train.jsonl") + read_jsonl(tmp_path / "data/eval.jsonl")
    assert sorted(rebuild_hh_transcript(row, "chosen") for row in written) == sorted(r["chosen"] for r in source[:2])
    assert sorted(rebuild_hh_transcript(row, "rejected") for row in written) == sorted(r["rejected"] for r in source[:2])

    table = dropped_summary_table(report)
    assert list(table.columns) == ["reason", "count", "percent_of_read", "meaning"]
    assert dict(zip(table["reason"][:-1], table["count"][:-1], strict=True)) == report.dropped_by_reason
    assert table["percent_of_read"][:-1].sum() == pytest.approx(60.0)
    assert table.iloc[-1].tolist() == ["total", 3, 60.0, "every dropped row is in data/dropped.jsonl, with its reason"]


@pytest.mark.parametrize("data_format", ["conversational", "standard"])
def test_message_lists_written_out_as_csv_text_are_refused_not_trained_on_as_text(tokenizer, tmp_path, data_format):
    # pandas' to_csv writes a column of message lists as their Python repr. Read as 'conversational' every row was
    # dropped with the hint to set data.format 'standard', which then trained on "[{'role': 'user', ...}]" as words.
    rows = [{"prompt": [{"role": "user", "content": f"Q{n}?"}], "chosen": [{"role": "assistant", "content": f"A{n}."}],
             "rejected": [{"role": "assistant", "content": "No."}]} for n in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(NoPairsLeftError) as caught:
        prepare_data(make_params(source="pairs.csv", format=data_format), tokenizer, tmp_path / "run", project_dir=tmp_path)
    message = str(caught.value)
    assert "malformed_messages: 3 rows" in message and "holds messages written out as text" in message
    assert "keep message lists in a .jsonl, .json or .parquet file" in message
    assert "but the rows have the shape of data.format" not in message
    # A text response that is a JSON list of messages (one was asked for) is text, and kept.
    asked = [{"prompt": f"Write a chat as JSON ({n}).", "chosen": '[{"role": "user", "content": "Hi"}]',
              "rejected": "No."} for n in range(3)]
    write_source(asked, tmp_path / "asked.jsonl")
    assert prepare_data(make_params(source="asked.jsonl", format="standard"), tokenizer, tmp_path / "asked",
                        project_dir=tmp_path).rows_kept == 3
    # The same rows in a file that keeps lists are read as they are.
    write_source(rows, tmp_path / "pairs.jsonl")
    assert prepare_data(make_params(source="pairs.jsonl"), tokenizer, tmp_path / "run", project_dir=tmp_path).rows_kept == 3


@pytest.mark.parametrize(
    "rows, data, hint",
    [
        # TRL standard rows under the default data.format (conversational): the error named only the message column.
        ([{"prompt": f"Q{n}?", "chosen": f"A{n}.", "rejected": "No."} for n in range(3)], {},
         "data.format is 'conversational', but the rows have the shape of data.format 'standard' or 'truthy'"),
        ([{"conversations": [{"from": "human", "value": f"Q{n}?"}], "chosen": {"from": "gpt", "value": "A."},
           "rejected": {"from": "gpt", "value": "B."}} for n in range(3)], {"format": "messages"},
         "the rows have the shape of data.format 'sharegpt'"),
        # The right format with an unusable value: the row's own detail says it, and no other format is offered.
        ([{"prompt": n, "chosen": "A.", "rejected": "B."} for n in range(3)], {"format": "standard"}, None),
    ],
)
def test_a_file_of_another_format_names_the_data_format_that_reads_it(tokenizer, tmp_path, rows, data, hint):
    write_source(rows, tmp_path / "pairs.jsonl")
    with pytest.raises(NoPairsLeftError) as caught:
        prepare_data(make_params(source="pairs.jsonl", **data), tokenizer, tmp_path / "run", project_dir=tmp_path)
    if hint:
        assert hint in str(caught.value)
    else:
        assert "data.format is" not in str(caught.value)


def test_everything_dropped_raises_with_reasons_and_keeps_dropped_jsonl(tokenizer, tmp_path):
    # Orca rows read as the standard format: every row lacks the prompt column that format needs.
    write_source(ORCA_ROWS, tmp_path / "orca.jsonl")
    params = make_params(source="orca.jsonl", format="standard")
    (tmp_path / "run/data").mkdir(parents=True)
    (tmp_path / "run/data/train.jsonl").write_text('{"stale": "from an earlier run"}\n')
    with pytest.raises(NoPairsLeftError) as caught:
        prepare_data(params, tokenizer, tmp_path / "run", project_dir=tmp_path)
    assert "all 6 rows read from 'orca.jsonl' were dropped" in str(caught.value)
    assert "missing_column: 6 rows" in str(caught.value) and "column 'prompt' is missing" in str(caught.value)
    assert "data.format is 'standard', but the rows have the shape of data.format 'orca'" in str(caught.value)
    assert len(read_jsonl(tmp_path / "run/data/dropped.jsonl")) == 6
    assert not (tmp_path / "run/data/train.jsonl").exists()


def test_a_single_kept_pair_is_refused_before_any_split_is_written(tokenizer, tmp_path):
    # 1 kept pair splits into 1 train / 0 eval: training and merging ran, then generate failed on the empty
    # eval.jsonl with KeyError: 'prompt'. The format stage must stop there, with the counts and the fix.
    rows = [
        {"prompt": "Hello", "chosen": "Hi, how can I help?", "rejected": "Go away."},
        {"prompt": "Hello", "chosen": "Hi, how can I help?", "rejected": "Go away."},
        {"prompt": "Spell cat.", "chosen": "", "rejected": "K-A-T."},
    ]
    write_source(rows, tmp_path / "few.jsonl")
    (tmp_path / "run/data").mkdir(parents=True)
    (tmp_path / "run/data/eval.jsonl").write_text('{"stale": "from an earlier run"}\n')
    with pytest.raises(NoPairsLeftError) as caught:
        prepare_data(make_params(source="few.jsonl", format="standard"), tokenizer, tmp_path / "run", project_dir=tmp_path)
    message = str(caught.value)
    assert "'few.jsonl': 3 rows read, 1 kept, 2 dropped (by reason: duplicate: 1, empty_response: 1" in message
    assert f"is in {tmp_path / 'run/data/dropped.jsonl'}" in message
    assert "The split gives train 1, held out 0" in message and "at least 2 pairs must be kept" in message
    assert "Add rows to data.source" in message and "data.eval_fraction (now 0.1)" in message
    assert len(read_jsonl(tmp_path / "run/data/dropped.jsonl")) == 2, "every drop is still recorded"
    assert not (tmp_path / "run/data/train.jsonl").exists() and not (tmp_path / "run/data/eval.jsonl").exists()


def test_an_empty_train_split_is_refused_too():
    # split_rows always keeps one pair to train on, so an empty train split comes only from another split
    # (iterative DPO holds out a sampler run's prompts): the same check covers it.
    result = AuditResult(rows_read=1, kept=[(0, {"prompt": "p"})])
    with pytest.raises(NoPairsLeftError, match="train 0, held out 1.*data.max_rows \\(now 5\\)"):
        raise_if_a_split_is_empty(result, [], [{"prompt": "p"}], make_params(max_rows=5), "dropped.jsonl")


def test_too_long_pairs_are_dropped_against_the_configured_limit(tokenizer, tmp_path):
    report = prepare_data(make_params(max_length=50), tokenizer, tmp_path)
    over = sum(length > 50 for length in report.sequence_lengths)
    assert over > 0 and report.dropped_by_reason == {"too_long": over}
    assert report.rows_kept == 400 - over and report.to_dict()["max_length"] == 50


def test_a_tokenizer_without_chat_template_is_refused(tokenizer, tmp_path):
    bare = build_tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="'unused' has no chat template"):
        prepare_data(make_params(), bare, tmp_path)


# --- notebook helpers -----------------------------------------------------------------------


def test_plot_shows_both_distributions_against_the_limit(tokenizer, tmp_path):
    report = prepare_data(make_params(max_length=50), tokenizer, tmp_path)
    figure = plot_token_lengths(report)
    prompt_axes, pair_axes = figure.axes
    for axes in (prompt_axes, pair_axes):
        limit_lines = [line for line in axes.lines if list(line.get_xdata()) == [50, 50]]
        assert len(limit_lines) == 1
    assert sum(patch.get_height() for patch in prompt_axes.patches) == len(report.prompt_lengths)
    assert "too_long" in figure._suptitle.get_text()


def test_sharegpt_file_end_to_end_keeps_text_and_turns_and_records_every_drop(tokenizer, tmp_path):
    source = read_jsonl(FIXTURES / "sharegpt_preference.jsonl")
    report = prepare_data(make_params(source=str(FIXTURES / "sharegpt_preference.jsonl"), format="sharegpt"), tokenizer, tmp_path)
    assert (report.rows_read, report.rows_kept, report.rows_dropped) == (7, 3, 4)
    dropped = {d["index"]: d for d in read_jsonl(tmp_path / "data/dropped.jsonl")}
    assert {i: d["reason"] for i, d in dropped.items()} == {
        3: "malformed_messages", 4: "malformed_messages", 5: "missing_column", 6: "non_string_value"}
    assert "'function_call'" in dropped[3]["detail"] and "'human', 'gpt', 'system'" in dropped[3]["detail"]
    assert "column 'conversations' is missing" in dropped[5]["detail"]
    assert all(d["row"] == source[i] for i, d in dropped.items())
    split = read_jsonl(tmp_path / "data/train.jsonl") + read_jsonl(tmp_path / "data/eval.jsonl")
    written = {row["prompt"][-1]["content"]: row for row in split}
    assert written["Name a prime number."]["prompt"][0] == {"role": "system", "content": "You are a terse assistant."}
    multi = written["Now one about snow."]
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user"]  # the whole conversation
    assert multi["prompt"][1]["content"] == "Soft rain on the roof\n\nthe gutters hum  "  # byte for byte
    assert multi["chosen"] == [{"role": "assistant", "content": "White hush on the field\n\n  footprints fill by dawn"}]
    assert written["Is tea healthy?"]["prompt"][0] == {"role": "system", "content": "Answer in one sentence."}


def test_messages_file_end_to_end(tokenizer, tmp_path):
    report = prepare_data(make_params(source=str(FIXTURES / "messages_preference.jsonl"), format="messages"), tokenizer, tmp_path)
    assert (report.rows_read, report.rows_kept, report.rows_dropped) == (5, 3, 2)
    dropped = {d["index"]: d for d in read_jsonl(tmp_path / "data/dropped.jsonl")}
    assert {i: d["reason"] for i, d in dropped.items()} == {3: "malformed_messages", 4: "malformed_messages"}
    assert "should hold one reply, got 2 messages" in dropped[3]["detail"]
    split = read_jsonl(tmp_path / "data/train.jsonl") + read_jsonl(tmp_path / "data/eval.jsonl")
    written = {row["prompt"][-1]["content"]: row for row in split}
    assert written["2 + 2?"]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert written["Again,\n\nlouder."]["prompt"][1] == {"role": "assistant", "content": "Hi!  "}
    assert written["Again,\n\nlouder."]["chosen"] == [{"role": "assistant", "content": "HI!\n"}]
    assert written["Capital of France?"]["rejected"] == [{"role": "assistant", "content": "Lyon."}]
