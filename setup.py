"""Packaging that pyproject.toml cannot declare: notebooks/ and params/ shipped inside the wheel.

They stay at the repository root, where people and tests expect them, and are mapped into the package as
dpo_kit/template/notebooks and dpo_kit/template/params, so that an installed wheel runs `dpo-kit run` and
`dpo-kit init` outside a checkout (dpo_kit/run/init_project.py finds them). pyproject.toml's `packages.find`
cannot add a package that lives outside dpo_kit/, hence this file; everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

TEMPLATE = {"dpo_kit.template.notebooks": "notebooks", "dpo_kit.template.params": "params"}

setup(
    packages=find_packages(include=["dpo_kit*"]) + list(TEMPLATE),
    package_dir=TEMPLATE,  # their files are package data, listed in pyproject.toml (which overrides package_data here)
)
