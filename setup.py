"""Packaging that pyproject.toml cannot declare: notebooks/ and params/ shipped inside the wheel.

They stay at the repository root, where people and tests expect them, and are mapped into the package as
dpo_kit/template/notebooks and dpo_kit/template/params, so that an installed wheel runs `dpo-kit run` and
`dpo-kit init` outside a checkout (dpo_kit/run/init_project.py finds them). pyproject.toml's `packages.find`
cannot add a package that lives outside dpo_kit/, hence this file; everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

TEMPLATE = {"dpo_kit.template.notebooks": "notebooks", "dpo_kit.template.params": "params"}

setup(
    # Namespace discovery, as pyproject's packages.find did: data-only folders such as
    # dpo_kit/training/accelerate_configs are packages too (setuptools warns about them otherwise).
    packages=find_namespace_packages(include=["dpo_kit", "dpo_kit.*"], exclude=["*.__pycache__"]) + list(TEMPLATE),
    package_dir=TEMPLATE,  # their files are package data, listed in pyproject.toml (which overrides package_data here)
)
