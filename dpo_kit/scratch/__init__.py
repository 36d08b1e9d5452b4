"""DPO from scratch, for notebooks/00_dpo_from_scratch: `loss` (the loss, the batching and the training
loop in plain PyTorch, checked against TRL) and `plots` (its figures).

`loss` imports torch at module level, so it is not imported here: use `from dpo_kit.scratch import loss`."""
