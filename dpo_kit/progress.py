"""Progress bars: widgets where someone watches a notebook, plain text where a notebook runs in batch.

tqdm.auto draws a widget in any Jupyter kernel that has ipywidgets, and it cannot tell JupyterLab (where the
widget updates live) from papermill (where nobody renders it: the executed notebook keeps the widget's first
frame as its text, "0%| | 0/360", and `dpo-kit run`'s terminal line, fed from the kernel's stderr, sees
nothing). The kit's batch kernels therefore start with DPO_KIT_PROGRESS=text, and `import dpo_kit` then points
tqdm.auto at tqdm's text bar before datasets, transformers or huggingface_hub import it. An interactive kernel
is left alone, so JupyterLab and Colab get widgets.
"""

from __future__ import annotations

import os

PROGRESS_ENV = "DPO_KIT_PROGRESS"
# For a kernel the kit starts (dpo-kit run, sweep, report): text bars, redrawn at most once a second, so an
# executed notebook or a log keeps a few frames of a long bar rather than one per sequence. TQDM_MININTERVAL
# is tqdm's own setting (environment variables named TQDM_<argument> give its arguments' defaults).
BATCH_KERNEL_ENV = {PROGRESS_ENV: "text", "TQDM_MININTERVAL": "1"}


def text_progress_bars_requested() -> bool:
    return os.environ.get(PROGRESS_ENV, "").strip().lower() == "text"


def use_text_progress_bars() -> None:
    """Make tqdm.auto's bar the plain-text one in this process, for every library that asks tqdm.auto for
    its bar from now on. tqdm.auto is only a chooser between these two classes, and this is its choice made
    for it; the bars themselves, and anything written to them, are unchanged."""
    import tqdm.auto
    import tqdm.std

    tqdm.auto.tqdm, tqdm.auto.trange = tqdm.std.tqdm, tqdm.std.trange
