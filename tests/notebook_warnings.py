"""What counts as a warning in a notebook's outputs, for the notebook tier (conftest.py) and the runner's tests.

A reader of a kit notebook should meet no warning the kit could have prevented. Python warnings
("...: FutureWarning: ..."), logging at WARNING or above ("WARNING", "[W ...]", "wandb: WARNING") and
"Failed to ..." notices are caught in stdout and stderr. A line the kit cannot prevent would be listed in
CANNOT_PREVENT with the reason; today there is none.
"""

from __future__ import annotations

import re

WARNING_LINE = re.compile(
    r"\b[A-Z]\w*Warning\b"  # Python's warnings module: UserWarning, FutureWarning, TqdmWarning, ...
    r"|(^|[\s:\]|])(WARNING|ERROR|CRITICAL)\b"  # logging levels, as libraries print them
    r"|^\s*Failed to\b"
)
CANNOT_PREVENT: dict[str, str] = {}  # a regex on the line -> why the kit cannot prevent it


def _texts(output) -> list[str]:
    if output.get("output_type") == "stream":
        return [output.get("text", "")]
    data = output.get("data", {})
    return [data["text/plain"]] if "text/plain" in data else []


def warning_lines(outputs) -> list[str]:
    """The lines of a cell's outputs that read as warnings (ANSI colours removed), less CANNOT_PREVENT."""
    found = []
    for output in outputs or []:
        for text in _texts(output):
            for line in re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\r", "\n").splitlines():
                if WARNING_LINE.search(line) and not any(re.search(p, line) for p in CANNOT_PREVENT):
                    found.append(line.strip())
    return found
