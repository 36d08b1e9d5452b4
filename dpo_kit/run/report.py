"""`dpo-kit report`: execute notebook 06 (the comparison of runs) into a directory, plus a static HTML copy.

The runs are checked here first (dpo_kit.evaluation.report.load_runs), so bad input fails in a second with the
path named, before a kernel starts. An earlier report in the directory is moved to <dir>/previous/<time>-report/,
never overwritten. The HTML is nbconvert's, with the figures embedded as PNG: one file to share.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dpo_kit import manifest as mf
from dpo_kit.evaluation.report import ReportError, load_runs
from dpo_kit.run.runner import SharedKernel, notebooks_dir

REPORT_NOTEBOOK = "06_compare_runs.ipynb"
REPORT_HTML = "06_compare_runs.html"
FRONTIER_PNG = "frontier.png"  # the notebook saves it next to itself
REPORT_FILES = (REPORT_NOTEBOOK, REPORT_HTML, FRONTIER_PNG)


def report_directory(paths: list[str], output_dir: str | None, project: Path) -> Path:
    """Where the report goes: --output-dir, else the one directory given (a sweep directory, a directory of runs)."""
    if output_dir:
        return (project / output_dir).resolve()
    if len(paths) != 1:
        raise ReportError(f"{len(paths)} directories given ({', '.join(paths)}): say where the report goes with"
                          " --output-dir DIR; with one directory it goes into that directory")  # fmt: skip
    return (project / paths[0]).resolve()


def move_earlier_report_aside(directory: Path) -> Path | None:
    """Move the files of an earlier report to <directory>/previous/<time>-report/; returns that folder, or None."""
    earlier = [directory / name for name in REPORT_FILES if (directory / name).exists()]
    if not earlier:
        return None
    target = mf.new_previous_dir(directory, "report")
    for path in earlier:
        shutil.move(str(path), target / path.name)
    return target


# nbconvert's lab template, less the scripts it loads from a CDN (require.js, MathJax, mermaid): the report has
# no widgets, formulas or diagrams, its figures are inline PNGs and its styles inline CSS, so it reads offline.
# Each figure gets an alt text (its section's heading), which the lab template has no place for.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block data_png scoped -%}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
 alt="{{ ((output | get_metadata('alt', 'image/png')) or 'a figure of the report') | escape_html }}">
</div>
{%- endblock data_png -%}
"""


def describe_figures(notebook) -> None:
    """Give each PNG output an alt text: the heading of the section it is in."""
    heading = "a figure of the report"
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            titles = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            heading = titles[-1] if titles else heading
            continue
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                output.setdefault("metadata", {}).setdefault("image/png", {}).setdefault("alt", f"figure: {heading}")


def export_html(notebook_path: Path, html_path: Path) -> Path:
    """A static HTML copy of the executed notebook: figures inline as PNG, no input prompts, nothing from a network."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})],
        template_file="offline.html.j2",
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    notebook = nbformat.read(notebook_path, as_version=4)
    describe_figures(notebook)
    body, _ = exporter.from_notebook_node(notebook)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def run_report(
    paths: list[str],
    output_dir: str | None = None,
    project_dir: str | Path = ".",
    progress: bool = True,
) -> dict[str, Path]:
    """Execute notebook 06 over the runs under `paths` into the report directory; returns the files written
    (notebook, html, frontier) and, under `previous`, where an earlier report went."""
    import papermill

    project = Path(project_dir).resolve()
    comparison = load_runs(paths, project)  # raises ReportError naming a bad path before any kernel starts
    directory = report_directory(paths, output_dir, project)
    try:
        mf.ensure_writable_dir(directory)
    except mf.OutputNotWritable as error:
        raise ReportError(str(error).replace("run directory", "report directory")) from None
    previous = move_earlier_report_aside(directory)
    source = notebooks_dir(project)
    executed = directory / REPORT_NOTEBOOK
    kernel = SharedKernel(source)  # its kernel starts without ipykernel's unencrypted-TCP notice
    started = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source / REPORT_NOTEBOOK),
            str(executed),
            parameters={
                "runs": [str(path) for path in comparison.searched],
                "project_dir": str(project),
                "output_dir": str(directory),
            },
            kernel_name="python3",
            cwd=str(source),
            progress_bar={"desc": "report cells", "leave": False} if progress else False,
            km=kernel.manager,
        )
    except Exception as error:  # papermill raises PapermillExecutionError, with the traceback in the notebook
        reason = f"{getattr(error, 'ename', type(error).__name__)}: {getattr(error, 'evalue', error)}"
        raise ReportError(f"the report notebook failed ({reason}); the traceback is in {executed}") from None
    finally:
        kernel.shutdown()
    written = {"notebook": executed, "html": export_html(executed, directory / REPORT_HTML),
               "frontier": directory / FRONTIER_PNG, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    if previous is not None:
        written["previous"] = previous
    return written
