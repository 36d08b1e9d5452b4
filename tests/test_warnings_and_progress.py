"""What a notebook reader sees besides results: progress bars of the right kind, and no library notice that the
kit can answer (the notebook tier itself fails a cell that prints a warning: see conftest.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from dpo_kit.library_notices import BITSANDBYTES_HUB_KERNEL, KERNELS_OFFLINE_TRUST_CHECK, DropMessage
from dpo_kit.progress import BATCH_KERNEL_ENV
from tests.notebook_warnings import warning_lines

REPO = Path(__file__).resolve().parent.parent
BNB_NOTICE = BITSANDBYTES_HUB_KERNEL[1]
KERNELS_NOTICE = KERNELS_OFFLINE_TRUST_CHECK[1]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=300)  # fmt: skip


def test_importing_the_kit_first_answers_bitsandbytes_hub_kernel_notice_and_only_it():
    done = python("import bitsandbytes.backends.cpu.ops as o, peft; print(bool(o.has_avx512bf16()))")
    assert done.returncode == 0, done.stderr
    # Without the kit, bitsandbytes prints the notice on every CPU with AVX512-BF16 (like this one, and CI's).
    assert (BNB_NOTICE in done.stderr) == (done.stdout.strip() == "True"), done.stderr
    avx512bf16 = done.stdout.strip() == "True"
    # Offline (as the tests run), `kernels` (a dependency of transformers) says it skips the hub's trust check first.
    done = python("import bitsandbytes, peft", HF_HUB_OFFLINE="1")
    assert (KERNELS_NOTICE in done.stderr) == avx512bf16 and (BNB_NOTICE in done.stderr) == avx512bf16, done.stderr
    done = python("import dpo_kit, bitsandbytes, peft", HF_HUB_OFFLINE="1")
    assert done.returncode == 0 and KERNELS_NOTICE not in done.stderr and BNB_NOTICE not in done.stderr, done.stderr
    done = python("import dpo_kit, logging; log = logging.getLogger('kernels._internals.hf_hub')\n"
                  f"log.warning({KERNELS_NOTICE + '.'!r}); log.warning({KERNELS_NOTICE.replace('bitsandbytes', 'other')!r})")
    assert KERNELS_NOTICE not in done.stderr and "quantization-other" in done.stderr, "only bitsandbytes' repository"
    # With the kit imported first: no notice, even logged on purpose (on a CPU without AVX512-BF16 bitsandbytes
    # never tries), while the logger's other warnings still show.
    done = python("import dpo_kit, peft, logging; log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
                  f"log.warning({BNB_NOTICE + ': No module named kernels'!r}); log.warning('other')")
    assert done.returncode == 0 and BNB_NOTICE not in done.stderr, done.stderr
    assert "other" in done.stderr
    drop = DropMessage(BNB_NOTICE)
    record = logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, "", 0, BNB_NOTICE + ": %s", ("x",), None)
    assert not drop.filter(record)


def test_the_kits_batch_kernels_draw_text_bars_and_an_interactive_kernel_widgets(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    from dpo_kit.run.runner import SharedKernel

    # Widgets or not: the bar tqdm.auto hands out, and the one datasets built its bar on (at its import, after
    # the kit's).
    probe = ("import sys, dpo_kit, datasets.utils.tqdm, tqdm.notebook\n"
             "widget = sys.modules['tqdm.notebook'].tqdm\n"
             "print(issubclass(sys.modules['tqdm.auto'].tqdm, widget), issubclass(sys.modules['datasets.utils.tqdm'].tqdm, widget))")
    kernel = SharedKernel(tmp_path)
    try:
        batch = kernel.run_cell(probe).outputs
    finally:
        kernel.shutdown()
    assert "".join(o.get("text", "") for o in batch).split() == ["False", "False"], batch
    monkeypatch.delenv("DPO_KIT_PROGRESS", raising=False)  # as a shell that set it for plain papermill would
    notebook = new_notebook(cells=[new_code_cell(probe)])  # a kernel as JupyterLab starts one
    NotebookClient(notebook, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    interactive = notebook.cells[0].outputs
    assert "".join(o.get("text", "") for o in interactive).split() == ["True", "True"], interactive
    assert not warning_lines(interactive), "no TqdmWarning: ipywidgets is installed"


def test_a_kernel_the_papermill_command_started_draws_text_bars(tmp_path):
    """Plain `papermill in.ipynb out.ipynb`, with no DPO_KIT_PROGRESS: a widget would be saved at its first frame."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    probe = ("import sys, dpo_kit, datasets.utils.tqdm, tqdm.notebook, tqdm.auto\n"
             "widget = sys.modules['tqdm.notebook'].tqdm\n"
             "print(issubclass(sys.modules['tqdm.auto'].tqdm, widget), issubclass(sys.modules['datasets.utils.tqdm'].tqdm, widget),"
             " tqdm.auto.tqdm(range(1), file=sys.stdout).mininterval)")  # fmt: skip
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(new_notebook(cells=[new_code_cell(probe)], metadata={"kernelspec": kernelspec}), tmp_path / "in.ipynb")
    env = {key: value for key, value in os.environ.items() if key not in ("DPO_KIT_PROGRESS", "TQDM_MININTERVAL")}
    done = subprocess.run([str(Path(sys.executable).parent / "papermill"), "in.ipynb", "out.ipynb"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    outputs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].outputs
    printed = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert printed.split()[-3:] == ["False", "False", "1.0"], outputs


def test_progress_env_other_than_text_keeps_widgets_under_papermill(monkeypatch):
    from dpo_kit import progress

    monkeypatch.setattr(progress, "started_by_papermill_command", lambda: True)
    monkeypatch.delenv("DPO_KIT_PROGRESS", raising=False)
    assert progress.text_progress_bars_requested()
    monkeypatch.setenv("DPO_KIT_PROGRESS", "widgets")
    assert not progress.text_progress_bars_requested()
    monkeypatch.setattr(progress, "started_by_papermill_command", lambda: False)
    monkeypatch.setenv("DPO_KIT_PROGRESS", " Text ")
    assert progress.text_progress_bars_requested()


def test_the_papermill_command_is_told_from_other_launchers(monkeypatch):
    from dpo_kit import progress

    monkeypatch.setenv("JPY_PARENT_PID", str(os.getpid()))  # pytest: not papermill
    assert not progress.started_by_papermill_command()
    monkeypatch.delenv("JPY_PARENT_PID")  # not a kernel
    assert not progress.started_by_papermill_command()
    monkeypatch.setenv("JPY_PARENT_PID", "not-a-pid")
    assert not progress.started_by_papermill_command()
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "papermill"])  # an argument, not the command
    try:
        monkeypatch.setenv("JPY_PARENT_PID", str(launcher.pid))
        assert not progress.started_by_papermill_command()
    finally:
        launcher.kill()
        launcher.wait()


def test_text_bars_are_redrawn_at_most_once_a_second_in_batch():
    done = python("import dpo_kit, tqdm.auto; print(tqdm.auto.tqdm(range(1)).mininterval)", **BATCH_KERNEL_ENV)
    assert done.stdout.strip().splitlines()[-1] == "1.0", done.stdout + done.stderr


def test_warning_lines_catch_python_and_logging_warnings_and_nothing_else():
    outputs = [
        {"output_type": "stream", "name": "stderr",
         "text": "x.py:3: FutureWarning: old name\n  warnings.warn(\n\x1b[34mwandb\x1b[0m: \x1b[33mWARNING\x1b[0m no URL\n"},
        {"output_type": "stream", "name": "stderr", "text": "Failed to load CPU kernel\r 50%|#####     | 1/2\n"},
        {"output_type": "execute_result", "data": {"text/plain": "{'warnings': [], 'dropped': 0}"}},
        {"output_type": "stream", "name": "stdout", "text": "step 5/40: loss 0.53, warmup done\n"},
    ]  # fmt: skip
    assert warning_lines(outputs) == ["x.py:3: FutureWarning: old name", "wandb: WARNING no URL", "Failed to load CPU kernel"]
