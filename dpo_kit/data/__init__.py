"""The format stage: read a preference source, convert it to TRL's format, audit it, split it and write it.

- `pipeline`: `prepare_data` (what notebook 01 calls), `load_split` (what the train stage reads back).
- `sources`: reading bundled, local and hub data as plain rows; `on_policy`: pairs sampled and judged.
- `formats`: per-format converters to TRL's conversational shape; `audit`: every row kept or dropped.
- `drops`: the stable drop reason codes and `DropRow`, shared by the converters and the audit.

Imports the floor, `models` and `judges`. Import the modules by their full path.
"""
