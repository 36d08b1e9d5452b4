"""dpo-kit: a Jupyter-first experiment kit for Direct Preference Optimization on TRL 1.x.

Modules follow the pipeline stages: data (format), train, merge, generate, evaluate; plus
params (the schema), runner (papermill), tiny_model and bundled (offline defaults) and scratch
(DPO from scratch). Heavy libraries are imported inside functions so `import dpo_kit` stays fast.
"""

__version__ = "0.1.0"
