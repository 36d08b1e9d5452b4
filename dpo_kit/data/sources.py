"""Reading a preference data source into plain row dicts, values exactly as stored.

Rows are not type-coerced: the audit must see a null, a number or a missing key where the file has one,
so JSON is read with `json`, Parquet with pyarrow and CSV with pandas as text. Hub datasets go through
`datasets.load_dataset`, which needs a network unless the dataset is already in the local cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_kit.params import LOCAL_DATA_SUFFIXES, DataParams, is_local_path

NETWORK_ERROR_NAMES = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ReadTimeout"}


class SourceError(ValueError):
    """The data source cannot be read; the message names it and what would work instead."""


def describe_source(data: DataParams) -> str:
    if data.source == "generate":
        return f"on-policy samples for the prompts '{data.generate.prompts}'"
    if data.source == "bundled" or is_local_path(data.source):
        return f"'{data.source}'"
    revision = f", revision {data.revision}" if data.revision else ""
    return f"hub dataset '{data.source}' (split {data.split}{revision})"


def read_rows(data: DataParams, project_dir: str | Path = ".") -> list[dict[str, Any]]:
    """At most `data.max_rows` rows of `data.source`; a relative local path resolves against `project_dir`."""
    if data.source == "bundled":
        from dpo_kit.bundled import bundled_preference_rows

        rows = bundled_preference_rows()
    elif is_local_path(data.source):
        rows = read_local_file(Path(project_dir) / data.source, data.max_rows)
    else:
        rows = read_hub_dataset(data.source, data.split, data.revision, data.max_rows)
    return rows[: data.max_rows] if data.max_rows else rows


def read_local_file(path: Path, max_rows: int | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SourceError(f"data.source: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, max_rows)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return (table.slice(0, max_rows) if max_rows else table).to_pylist()
    if suffix == ".csv":
        import pandas as pd

        # Every cell as text, empty cells as "", so the audit sees what the file holds rather than NaN.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=max_rows)
        return frame.to_dict(orient="records")
    raise SourceError(f"data.source '{path}': unsupported file type '{suffix}'; use one of {', '.join(LOCAL_DATA_SUFFIXES)}")


def _read_jsonl(path: Path, max_rows: int | None) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if max_rows and len(rows) >= max_rows:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SourceError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}, line {number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SourceError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if isinstance(content, list) and all(isinstance(row, dict) for row in content):
        return content
    if isinstance(content, dict) and content and all(isinstance(column, list) for column in content.values()):
        lengths = {len(column) for column in content.values()}
        if len(lengths) == 1:
            return [dict(zip(content, values, strict=True)) for values in zip(*content.values(), strict=True)]
    raise SourceError(f"{path}: expected a list of row objects, or an object of equal-length column lists")


def read_hub_dataset(source: str, split: str, revision: str | None, max_rows: int | None) -> list[dict[str, Any]]:
    import datasets

    where = f"hub dataset '{source}' (split '{split}'{f', revision {revision}' if revision else ''})"
    try:
        dataset = datasets.load_dataset(source, split=split, revision=revision)
    except Exception as error:  # noqa: BLE001 - datasets and huggingface_hub raise many types; all are reported
        if _is_network_error(error):
            raise SourceError(
                f"data.source: cannot load {where}: the Hugging Face Hub could not be reached (offline, or no"
                " network) and the dataset is not in the local cache. Use a local .jsonl/.json/.parquet/.csv"
                f" file or 'bundled' as data.source. ({type(error).__name__}: {error})"
            ) from error
        raise SourceError(
            f"data.source: cannot load {where}: {type(error).__name__}: {error}. Check the dataset id, split and"
            " revision, or use a local .jsonl/.json/.parquet/.csv file or 'bundled'."
        ) from error
    if max_rows:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset.to_list()


def _is_network_error(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, ConnectionError) or type(error).__name__ in NETWORK_ERROR_NAMES:
            return True
        error = error.__cause__ or error.__context__
    return False
