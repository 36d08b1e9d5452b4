"""Helpers shared by tests: run directories holding what later stages read."""

from __future__ import annotations

import json
import shutil

import torch


def make_run_dir(path, base_dir, noise: float, rows):
    """A run directory with held-out pairs and merged/ = the base with seeded Gaussian noise on every weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (path / "data").mkdir(parents=True)
    (path / "data" / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if noise == 0.0:
        shutil.copytree(base_dir, path / "merged")
        return path
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(noise * torch.randn(weight.shape, generator=generator))
    model.save_pretrained(path / "merged")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(path / "merged")
    return path


def logged_losses(run_dir) -> dict[int, float]:
    """The training loss of every logged step, from a run's train_log.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}
