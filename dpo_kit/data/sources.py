"""Reading a preference data source into plain row dicts, values exactly as stored.

Rows are not type-coerced: the audit must see a null, a number or a missing key where the file has one,
so JSON is read with `json`, Parquet with pyarrow and CSV with the `csv` module as text (no index column
inferred; a row whose field count differs from the header's is an error, not truncated or padded; a JSON
object that names a key twice is an error, not read as its last value). Local files must be UTF-8; a file
that cannot be read raises SourceError naming the setting (data.source, or data.generate.prompts), the file
and the line. Hub datasets go through `datasets.load_dataset`, which needs a
network unless the dataset is already in the local cache.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from dpo_kit.params import LOCAL_DATA_SUFFIXES, DataParams, is_local_path, missing_data_file

NETWORK_ERROR_NAMES = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ReadTimeout"}


class SourceError(ValueError):
    """The data source cannot be read; the message names it and what would work instead."""


def describe_source(data: DataParams) -> str:
    if data.source == "generate":
        return f"on-policy samples for the prompts '{data.generate.prompts}'"
    if data.source == "bundled" or is_local_path(data.source):
        return f"'{data.source}'"
    return f"hub dataset '{data.source}' ({_hub_selection(data)})"


def _hub_selection(data: DataParams) -> str:
    """The part of a hub dataset that is read, as the params name it: 'config alpha, split train'."""
    chosen = {"config": data.config, "data_dir": data.data_dir, "split": data.split, "revision": data.revision}
    return ", ".join(f"{key} {value!r}" for key, value in chosen.items() if value is not None)


def read_rows(data: DataParams, project_dir: str | Path = ".") -> list[dict[str, Any]]:
    """At most `data.max_rows` rows of `data.source`; a relative local path resolves against `project_dir`."""
    return read_rows_and_lines(data, project_dir)[0]


def read_rows_and_lines(data: DataParams, project_dir: str | Path = ".") -> tuple[list[dict[str, Any]], list[int] | None]:
    """read_rows, and the line of a .jsonl or .csv source where each row starts (None for other sources)."""
    return read_source(data, project_dir)[:2]


def read_source(data: DataParams, project_dir: str | Path = ".") -> tuple[list[dict[str, Any]], list[int] | None, HubCopy | None]:
    """read_rows_and_lines, and for a hub dataset which copy of it was read (HubCopy; None for other sources)."""
    lines = copy = None
    if data.source == "bundled":
        from dpo_kit.bundled import bundled_preference_rows

        rows = bundled_preference_rows()
    elif is_local_path(data.source):
        rows, lines = read_local_file_and_lines(Path(project_dir) / data.source, data.max_rows)
    else:
        rows, copy = read_hub_dataset_copy(data)
    if data.max_rows:
        rows, lines = rows[: data.max_rows], lines and lines[: data.max_rows]
    return rows, lines, copy


def read_local_file(path: Path, max_rows: int | None = None, key: str = "data.source") -> list[dict[str, Any]]:
    """The rows of a local file; `key` is the setting that names it, which every SourceError starts with."""
    return read_local_file_and_lines(path, max_rows, key)[0]


def read_local_file_and_lines(
    path: Path, max_rows: int | None = None, key: str = "data.source"
) -> tuple[list[dict[str, Any]], list[int] | None]:
    """read_local_file, and each row's line in a .jsonl or .csv file, counting from 1 as an editor does: a CSV's
    header and a JSONL's blank lines are lines too, so the row's position alone does not find it. None for a .json
    file (a row is an element of its list) or a Parquet file (no lines)."""
    if problem := missing_data_file(key, path):
        raise SourceError(problem)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, max_rows, key)
    if suffix == ".json":
        return _read_json(path, key), None
    if suffix == ".parquet":
        return _read_parquet(path, max_rows, key), None
    if suffix == ".csv":
        return _read_csv(path, max_rows, key)
    raise SourceError(f"{key} '{path}': unsupported file type '{suffix}'; use one of {', '.join(LOCAL_DATA_SUFFIXES)}")


def _read_text(path: Path, key: str) -> str:
    """The whole file as UTF-8 text (a leading byte-order mark dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        _raise_not_utf8(path, key)


def _raise_not_utf8(path: Path, key: str) -> NoReturn:
    """SourceError at the first byte of the file that is not UTF-8, with its line."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SourceError(
            f"{key}: {path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x} at offset"
            f" {error.start}: {error.reason}). Data files must be UTF-8: re-save the file as UTF-8, e.g."
            f" `iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}` for a Latin-1 (Windows-1252) file."
        ) from None
    raise AssertionError(f"{path} decoded as UTF-8 on a second read")  # the file changed while it was read


def _read_parquet(path: Path, max_rows: int | None, key: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:  # ArrowInvalid for a corrupt or non-Parquet file
        raise SourceError(
            f"{key}: {path}: not a readable Parquet file ({type(error).__name__}: {error}). Rewrite it,"
            " e.g. with pandas `DataFrame.to_parquet`, or use a .jsonl/.json/.csv file."
        ) from error
    return (table.slice(0, max_rows) if max_rows else table).to_pylist()


CSV_QUOTING_HINT = (
    "A field that holds a comma, a line break or a double quote must be enclosed in double quotes, with each"
    ' double quote inside it doubled, e.g. "Hi, how are you?" or "She said ""hi""."'
)


def _read_csv(path: Path, max_rows: int | None, key: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Every cell as text, empty cells as "", so the audit sees what the file holds; the first line is the header.

    Each row must have exactly as many fields as the header: pandas would take a longer row's first field as
    the row index (or cut its last fields) and pad a shorter one, shifting text into the wrong column.
    """
    # csv's default limit of 131072 characters per field would refuse long responses that pandas reads.
    field_limit = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        return _read_csv_records(path, max_rows, key)
    finally:
        csv.field_size_limit(field_limit)


def _read_csv_records(path: Path, max_rows: int | None, key: str) -> tuple[list[dict[str, Any]], list[int]]:
    with path.open(encoding="utf-8-sig", newline="") as text:
        # strict: a stray quote (an unclosed quoted field, text after a closing quote) is an error, not guessed at
        reader = csv.reader(text, strict=True)
        rows: list[dict[str, Any]] = []
        starts: list[int] = []  # the line each row starts on: a quoted field may span lines
        header: list[str] | None = None
        while not (max_rows and len(rows) >= max_rows):
            line = reader.line_num + 1  # where the next record starts: csv counts the lines it has consumed
            try:
                record = next(reader)
            except StopIteration:
                break
            except UnicodeDecodeError:
                _raise_not_utf8(path, key)
            except csv.Error as error:
                what = f"a quoted field opened on line {line} is never closed" if "end of data" in str(error) else str(error)
                raise SourceError(
                    f"{key}: {path}, line {line}: cannot be parsed as CSV ({what}). {CSV_QUOTING_HINT}"
                ) from None
            # An empty line holds no row, nor does a line of spaces where the header has several columns. In a file of
            # one column (a prompts file) a quoted "" or a line of spaces is a row with an empty value: the audit counts
            # and drops it (empty_prompt), where skipped here it vanished from the count of rows read.
            one_column = header is not None and len(header) == 1
            if not record or (len(record) == 1 and not record[0].strip() and not one_column):
                continue
            if header is None:
                header = record
                repeated = sorted({name for name in header if header.count(name) > 1})
                if repeated:
                    names = ", ".join(map(repr, repeated))
                    raise SourceError(f"{key}: {path}, line {line}: the header names a column more than once: {names}")
                continue
            if len(record) != len(header):
                shown = repr(record)
                shown = shown if len(shown) <= 300 else shown[:300] + "..."
                raise SourceError(
                    f"{key}: {path}, line {line}: {len(record)} fields, but the header has {len(header)} columns"
                    f" ({', '.join(header)}); the fields read: {shown}. {CSV_QUOTING_HINT}"
                )
            rows.append(dict(zip(header, record, strict=True)))
            starts.append(line)
    if header is None:
        raise SourceError(f"{key}: {path}: the CSV file is empty; its first line must be a header naming the columns")
    return rows, starts


class RepeatedKeyError(ValueError):
    """A JSON object names a key more than once."""


def _object_once_per_key(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a JSON object, refusing a key named twice, where `json` would keep the last value
    without a word (the CSV reader refuses a header that names a column twice, likewise)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [name for name, _ in pairs]
        raise RepeatedKeyError(next(name for name in keys if keys.count(name) > 1))
    return obj


def _repeated_key_message(key_name: str) -> str:
    return (
        f"an object names the key {key_name!r} more than once, and only one of its values could be used;"
        " give each key once"
    )


def _read_jsonl(path: Path, max_rows: int | None, key: str) -> tuple[list[dict[str, Any]], list[int]]:
    rows, numbers = [], []
    with path.open(encoding="utf-8-sig") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if max_rows and len(rows) >= max_rows:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line, object_pairs_hook=_object_once_per_key)
                except json.JSONDecodeError as error:
                    raise SourceError(
                        f"{key}: {path}, line {number}: not valid JSON ({error.msg}, column {error.colno});"
                        " a .jsonl file holds one JSON object per line"
                    ) from None
                except RepeatedKeyError as error:
                    raise SourceError(f"{key}: {path}, line {number}: {_repeated_key_message(str(error))}") from None
                if not isinstance(row, dict):
                    raise SourceError(
                        f"{key}: {path}, line {number}: expected a JSON object per line, got {type(row).__name__}"
                    )
                rows.append(row)
                numbers.append(number)
        except UnicodeDecodeError:
            _raise_not_utf8(path, key)
    return rows, numbers


def _read_json(path: Path, key: str) -> list[dict[str, Any]]:
    text = _read_text(path, key)
    try:
        content = json.loads(text, object_pairs_hook=_object_once_per_key)
    except json.JSONDecodeError as error:
        hint = ""
        if error.msg == "Extra data" and _holds_an_object(text[: error.pos]):
            # One object per line, as `to_json(orient="records", lines=True)` and many hub exports write under a
            # .json name: `json` reads the first one and stops at the second, which says nothing of what to do.
            hint = (
                ". The file holds one JSON object per line (JSON Lines), which is read from a .jsonl file: rename"
                f" it to {path.stem}.jsonl, or make it one list of row objects"
            )
        raise SourceError(
            f"{key}: {path}, line {error.lineno}: not valid JSON ({error.msg}, column {error.colno}){hint}"
        ) from None
    except RepeatedKeyError as error:
        raise SourceError(f"{key}: {path}: {_repeated_key_message(str(error))}") from None
    valid = "a .json file holds a list of row objects, or an object of equal-length column lists"
    if isinstance(content, list):
        stray = next((i for i, row in enumerate(content) if not isinstance(row, dict)), None)
        if stray is None:
            return content
        raise SourceError(
            f"{key}: {path}: element {stray} (counting from 0) of the list is {type(content[stray]).__name__} {content[stray]!r:.60},"
            f" not a row object; {valid}"
        )
    if isinstance(content, dict) and content:
        not_lists = [name for name, column in content.items() if not isinstance(column, list)]
        if not_lists:
            hint = ""
            if all(isinstance(column, dict) for column in content.values()):
                # pandas' DataFrame.to_json() writes orient="columns" by default: each column keyed by row index.
                hint = (". It looks like pandas' DataFrame.to_json() default (each column an object keyed by row"
                        " index): write it with to_json(orient='records'), or orient='records', lines=True into a .jsonl")
            raise SourceError(
                f"{key}: {path}: the value of {not_lists[0]!r} is not a list of column values; {valid}{hint}"
            )
        lengths = {name: len(column) for name, column in content.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name!r} {length}" for name, length in lengths.items())
            raise SourceError(f"{key}: {path}: the column lists differ in length ({shown}); {valid}")
        return [dict(zip(content, values, strict=True)) for values in zip(*content.values(), strict=True)]
    raise SourceError(f"{key}: {path}: the file holds {type(content).__name__} {content!r:.60}; {valid}")


def _holds_an_object(text: str) -> bool:
    """True when `text` is one JSON object: the first row of a JSON Lines file."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def read_hub_dataset(data: DataParams, split_key: str = "data.split") -> list[dict[str, Any]]:
    """At most data.max_rows rows of the hub dataset data.source: its data.config and data.data_dir, data.split at
    data.revision. A dataset that is already in the local cache loads without a network. `split_key` is the params key
    that named data.split, which a refused split is reported by (data.eval_split, read as a copy of data whose split
    it is)."""
    return read_hub_dataset_copy(data, split_key)[0]


@dataclass(frozen=True)
class HubCopy:
    """Which copy of a hub dataset load_dataset read: `commit`, the name of its folder in the datasets cache
    (<HF_DATASETS_CACHE>/<owner>___<name>/<config>/<version>/<commit>/, named by the commit datasets resolved, or by the
    commit of the cached copy it fell back to; None where it read no cached file); `from_cache`, why datasets took a
    cached copy without asking the hub (offline, or the hub not reached), None when it asked the hub."""

    commit: str | None
    from_cache: str | None

    def to_dict(self) -> dict[str, str | None]:
        return {"commit": self.commit, "from_cache": self.from_cache}


# What datasets logs (datasets.load.CachedDatasetModuleFactory) when it takes the newest cached copy because every
# attempt to ask the hub failed: with no offline variable set, the only sign that the hub was not reached.
CACHE_FALLBACK_LOGGER = "datasets.load"
CACHE_FALLBACK_MESSAGE = "Using the latest cached version of the dataset"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _cache_fallback_seen():
    """The messages datasets logs meanwhile on CACHE_FALLBACK_LOGGER. A user who silenced datasets' warnings keeps
    them silent (the logger stops passing them on), but the kit still sees them."""
    logger = logging.getLogger(CACHE_FALLBACK_LOGGER)
    handler, level, propagate = _Records(), logger.level, logger.propagate
    if not logger.isEnabledFor(logging.WARNING):
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def read_hub_dataset_copy(data: DataParams, split_key: str = "data.split") -> tuple[list[dict[str, Any]], HubCopy]:
    """read_hub_dataset, and which copy of the dataset it read (HubCopy)."""
    import datasets

    where = describe_source(data)
    try:
        with _cache_fallback_seen() as logged:
            dataset = datasets.load_dataset(
                data.source, name=data.config, data_dir=data.data_dir, split=data.split, revision=data.revision
            )
    except Exception as error:  # noqa: BLE001 - datasets and huggingface_hub raise many types; all are reported
        if _is_network_error(error):
            # the cache holds each configuration and data_dir apart: another subset of a cached dataset is not cached
            what = "that part of the dataset" if data.config or data.data_dir else "the dataset"
            raise SourceError(
                f"data.source: cannot load {where}: the Hugging Face Hub could not be reached (offline, or no"
                f" network) and {what} is not in the local cache. Use a local .jsonl/.json/.parquet/.csv"
                f" file or 'bundled' as data.source. ({type(error).__name__}: {error})"
            ) from error
        if problem := _selection_problem(data, error, split_key):
            raise SourceError(problem) from error
        raise SourceError(
            f"data.source: cannot load {where}: {type(error).__name__}: {error}. Check the dataset id, split,"
            " revision, config and data_dir, or use a local .jsonl/.json/.parquet/.csv file or 'bundled'."
        ) from error
    from dpo_kit.models.hub_cache import cached_revision_problem, datasets_offline_variable

    loaded = str(Path(dataset.cache_files[0]["filename"]).parent) if dataset.cache_files else ""
    from_cache, fill = None, f"{datasets.config.HF_ENDPOINT} reachable"  # the hub datasets asks, HF_ENDPOINT at its import
    if variable := datasets_offline_variable():
        from_cache, fill = f"offline ({variable} is set)", f"unset {variable}"
    elif any(message.startswith(CACHE_FALLBACK_MESSAGE) for message in logged):
        from_cache = "the Hugging Face Hub could not be reached (no offline variable is set)"
    # Offline, or online with the hub not reached, datasets ignores `revision` and loads the newest cached copy, and
    # says so only in a log line. Online it names the copy's folder by the commit it resolved, so whatever the offline
    # variables say, the copy loaded is checked: the cache may also have changed since validate looked, and a notebook
    # run by hand had no such look at all.
    why = f"{from_cache}, datasets ignores the revision of" if from_cache else "datasets loaded another copy than that of"
    if data.revision is not None and (problem := cached_revision_problem(data, why, fill, loaded)):
        raise SourceError(problem)
    copy = HubCopy(commit=Path(loaded).name if loaded else None, from_cache=from_cache)
    if data.max_rows:
        dataset = dataset.select(range(min(data.max_rows, len(dataset))))
    return dataset.to_list(), copy


def _selection_problem(data: DataParams, error: BaseException, split_key: str = "data.split") -> str | None:
    """What is wrong, naming the params key at fault, when datasets refuses the part of the dataset asked for; None
    for any other error. datasets lists the valid names in its own terms (`load_dataset('prefs', 'alpha')`), so the
    names are taken from its message and offered as the params key's values."""
    message = str(error)
    listed = _listed_names(message)
    if isinstance(error, ValueError) and "Config name is missing" in message:
        return (f"data.config: the hub dataset '{data.source}' has several configurations and data.config names none;"
                f" set it to one of {listed}")  # fmt: skip
    if isinstance(error, ValueError) and data.config is not None and "BuilderConfig" in message and "not found" in message:
        return (f"data.config {data.config!r}: the hub dataset '{data.source}' has no configuration of that name;"
                f" valid names: {listed}")  # fmt: skip
    if isinstance(error, ValueError) and "Unknown split" in message:
        config = f" (config {data.config!r})" if data.config else ""
        return (f"{split_key} {data.split!r}: the hub dataset '{data.source}'{config} has no such split; valid splits:"
                f" {listed}, or a slice of one such as 'train[:1000]'")  # fmt: skip
    if data.data_dir is not None and type(error).__name__ in {"EmptyDatasetError", "DataFilesNotFoundError", "FileNotFoundError"}:
        return (f"data.data_dir {data.data_dir!r}: no data files were found in that folder of the hub dataset"
                f" '{data.source}'; name a folder of its repository that holds them, as its Files page shows them"
                f" ({type(error).__name__}: {message})")  # fmt: skip
    return None


def _listed_names(message: str) -> str:
    """The names in the first Python list literal of datasets' message ("Available: ['alpha', 'beta']"), or the whole
    message where it holds none, so no valid name is lost to a changed wording."""
    found = re.search(r"\[(?:'[^'\]]*'(?:, )?)+\]", message)
    if found:
        return ", ".join(map(repr, ast.literal_eval(found.group())))
    return f"those datasets names: {message}"


def _is_network_error(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, ConnectionError) or type(error).__name__ in NETWORK_ERROR_NAMES:
            return True
        error = error.__cause__ or error.__context__
    return False
