"""Progress bars: widgets where someone watches a notebook, plain text where a notebook runs in batch.

tqdm.auto draws a widget in any Jupyter kernel that has ipywidgets, and it cannot tell JupyterLab (where the
widget updates live) from papermill (where nobody renders it: the executed notebook keeps the widget's first
frame as its text, "0%| | 0/360", and `dpo-kit run`'s terminal line, fed from the kernel's stderr, sees
nothing). The kit's batch kernels therefore start with DPO_KIT_PROGRESS=text, and `import dpo_kit` then points
tqdm.auto at tqdm's text bar before datasets, transformers or huggingface_hub import it. A kernel that the
`papermill` command started gets the same without the variable. An interactive kernel is left alone, so
JupyterLab and Colab get widgets; DPO_KIT_PROGRESS set to anything but "text" (e.g. "widgets") keeps them under
papermill too.
"""

from __future__ import annotations

import os

PROGRESS_ENV = "DPO_KIT_PROGRESS"
# For a kernel the kit starts (dpo-kit run, sweep, report): text bars, redrawn at most once a second, so an
# executed notebook or a log keeps a few frames of a long bar rather than one per sequence. TQDM_MININTERVAL
# is tqdm's own setting (environment variables named TQDM_<argument> give its arguments' defaults).
BATCH_KERNEL_ENV = {PROGRESS_ENV: "text", "TQDM_MININTERVAL": "1"}


def text_progress_bars_requested() -> bool:
    """DPO_KIT_PROGRESS=text, or no DPO_KIT_PROGRESS in a kernel that the papermill command started."""
    requested = os.environ.get(PROGRESS_ENV, "").strip().lower()
    return requested == "text" or (not requested and started_by_papermill_command())


def started_by_papermill_command() -> bool:
    """Whether this process is a kernel that `papermill IN OUT` (or `python -m papermill`) started. jupyter_client
    gives every kernel its launcher's pid in JPY_PARENT_PID; nothing in the kernel's messages names papermill.
    papermill's Python API, called from a script of one's own, cannot be told from any other launcher."""
    launcher = os.environ.get("JPY_PARENT_PID", "")
    if not launcher.isdigit():
        return False
    import psutil

    try:
        command = psutil.Process(int(launcher)).cmdline()
    except psutil.Error:
        return False
    return any(os.path.basename(arg) == "papermill" for arg in command[:2]) or command[1:3] == ["-m", "papermill"]


def use_text_progress_bars() -> None:
    """Make tqdm.auto's bar the plain-text one in this process, for every library that asks tqdm.auto for
    its bar from now on. tqdm.auto is only a chooser between these two classes, and this is its choice made
    for it; the bars themselves, and anything written to them, are unchanged."""
    # tqdm reads TQDM_MININTERVAL when it is first imported: where that is still to come (the kit imported first, as
    # in its notebooks), a batch run's once-a-second redraw; a batch kernel the kit started has it already.
    for key, value in BATCH_KERNEL_ENV.items():
        os.environ.setdefault(key, value)
    import tqdm.auto
    import tqdm.std

    tqdm.auto.tqdm, tqdm.auto.trange = tqdm.std.tqdm, tqdm.std.trange
