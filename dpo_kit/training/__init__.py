"""Training: `train` (TRL's DPOTrainer, with a DPOConfig from params and the hardware) and `merge` (the
adapter folded into an unquantized base, with its logits checked). Import the modules by their full path."""
