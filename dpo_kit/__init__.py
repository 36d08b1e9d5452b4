"""dpo-kit: a Jupyter-first experiment kit for Direct Preference Optimization on TRL 1.x.

Sub-packages follow the pipeline stages, and every import points down this order (tests/test_layout.py):

    run         the runner (papermill), the stage helpers the notebooks open, the `dpo-kit` command
    training    train (TRL's DPOTrainer), merge            evaluation  generate, evaluate
    scratch     DPO from scratch (loss) and its figures (plots)
    data        the format stage: sources, formats, drops, audit, on_policy, pipeline
    models      loading, sampling, gguf, tiny               judges      rule, sentiment, reward-model judges
    the floor   params (the schema), hardware, manifest, chat_templates, bundled: no other kit imports

Heavy libraries are imported inside functions so `import dpo_kit` (and each sub-package) stays fast.
"""

__version__ = "0.1.0"

# Before any library is imported: library notices the kit answers (library_notices.py), and in a kernel the kit
# started for a batch run, text progress bars (progress.py).
from dpo_kit.library_notices import answer_library_notices  # noqa: E402
from dpo_kit.progress import text_progress_bars_requested, use_text_progress_bars  # noqa: E402

answer_library_notices()
if text_progress_bars_requested():
    use_text_progress_bars()
