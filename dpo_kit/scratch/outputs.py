"""Where notebook 00 writes, and what happens when it runs again.

The notebook is deterministic, so running it again with the same settings rewrites the same files. Run with
other settings (another β, loss or seed), it first moves the earlier files to <out_dir>/previous/<time>/,
settings.json included: an earlier result is never overwritten by a different one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dpo_kit.manifest import new_previous_dir

SETTINGS_FILE = "settings.json"
# What notebook 00 writes: only these move, so a shared folder's other files stay where they are.
OUTPUTS = ("curves.json", "scratch_vs_trl.png", "beta_effect.png", "trl", SETTINGS_FILE)


def keep_earlier_outputs(out_dir: str | Path, settings: dict[str, Any]) -> str:
    """Create `out_dir`; move outputs that other settings made to previous/. Returns what was moved, or ''."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(settings, default=str))  # as it will read back
    path = out_dir / SETTINGS_FILE
    earlier = json.loads(path.read_text()) if path.exists() else None
    outputs = [out_dir / name for name in OUTPUTS if (out_dir / name).exists()]
    note = ""
    if outputs and earlier != settings:
        target = new_previous_dir(out_dir)
        for output in outputs:
            shutil.move(str(output), target / output.name)
        changed = sorted(k for k in set(settings) | set(earlier or {}) if settings.get(k) != (earlier or {}).get(k))
        note = f"moved the outputs of earlier settings (other {', '.join(changed)}) to {target}"
    path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return note
