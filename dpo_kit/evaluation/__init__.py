"""Evaluation: `generate` (reference and policy side by side on held-out prompts, judged) and `evaluate`
(implicit rewards, KL to the reference, judged reward and win-rate). Import the modules by their full path."""
