"""Models: every model and tokenizer is loaded here, and sampled from here.

- `loading`: `model_source`, `load_tokenizer`, `load_causal_lm`, `lora_config`: the same calls for a hub id,
  a local directory, a GGUF file and the tiny model.
- `sampling`: `prompt_token_ids` and `sample_continuations`, shared by on-policy data and the evaluation.
- `gguf`: locating a GGUF file and converting it once to a cached safetensors checkpoint.
- `tiny`: the tiny offline chat model, built from the bundled corpus.

Imports only the floor (params, hardware, chat_templates, bundled). Import the modules by their full path.
"""
