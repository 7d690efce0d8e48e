"""Evaluation config: a YAML file parsed into dataclasses, with ``--dotted.key value`` CLI overrides.

    python -m eval.run --config configs/eval/demo.yaml --limit 2 --judge.kind local --targets.0.model DIR

An override's value is parsed as YAML (``--turns "[1, 2]"``, ``--wandb true``); a dotted key walks
into mappings and, with an integer part, into lists. Unknown keys are errors naming the file and key,
so a typo cannot silently fall back to a default. API keys never appear here: the judge names the
environment variable that holds one (``api_key_env``), so a dumped config is safe to share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moderator.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from moderator.schema import TURN_COUNTS

DEFENCE_KINDS = ("none", "guard", "moderator")
MODERATOR_MODES = ("policy", "block")
JUDGE_KINDS = ("openai", "local", "refusal_match")
REFUSAL_CHECKS = ("judge", "heuristic")
TARGET_BACKENDS = ("hf", "vllm")
TARGET_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


class ConfigError(ValueError):
    """The eval config is invalid; the message names the file and key."""


@dataclass
class TargetConfig:
    """A chat model under attack."""

    model: str
    name: str | None = None  # label in reports and cache keys; defaults to ``model``
    backend: str = "hf"  # hf | vllm
    system_prompt: str | None = None  # None: the chat template's default
    # null: float32 on CPU, bfloat16 on CUDA; "auto": the checkpoint's own; or float32/bfloat16/float16
    dtype: str | None = None
    device: str | None = None  # hf: null = CUDA when present, "auto" = spread over all GPUs, or e.g. cuda:1
    trust_remote_code: bool = False
    batch_size: int | None = None  # hf: requests per forward pass; null = the eval's batch_size
    # Image pixel bounds (processors with a pixel budget, e.g. Qwen2-VL; vLLM mm_processor_kwargs).
    # The defaults are the training recipes' (moderator.images); null keeps the processor's own bound.
    min_pixels: int | None = DEFAULT_MIN_PIXELS
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    # vLLM engine settings (backend vllm only)
    max_model_len: int | None = None  # null: the model's own context length
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 1})

    @property
    def label(self) -> str:
        return self.name or self.model


@dataclass
class DefenceConfig:
    """``none``; ``guard`` (a baseline guard via ``eval.guards.load_guard``); ``moderator`` (ours)."""

    kind: str
    name: str | None = None  # defaults: "none", the guard kind, "moderator" / "moderator-block"
    model: str | None = None
    guard_kind: str | None = None  # for kind=guard: the adapter name passed to load_guard
    # moderator: None reads the export's manifest (else 0.5); guard: flag when its score >= threshold
    # (None: the guard's own text verdict decides)
    threshold: float | None = None
    mode: str = "policy"  # moderator: policy (inject the category's policy) | block (fixed refusal)
    max_new_tokens: int = 64  # moderator/guard verdict length
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for load_guard

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "guard":
            return str(self.guard_kind)
        if self.kind == "moderator":
            return "moderator" if self.mode == "policy" else f"moderator-{self.mode}"
        return self.kind


@dataclass
class JudgeConfig:
    kind: str = "openai"  # openai (any OpenAI-compatible endpoint) | local (a HF model) | refusal_match (keywords)
    model: str = "gpt-4o-mini"
    name: str | None = None  # label in reports and cache keys; defaults to "<kind>:<model>"
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 for a local vLLM / transformers serve
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    temperature: float = 0.0
    max_tokens: int = 8
    timeout_s: float = 60.0
    max_attempts: int = 5  # attempts per request, retried by the openai client (Retry-After honoured)
    retry_wait_s: float = 1.0  # first backoff; doubles per attempt (capped at 30 s)
    concurrency: int = 8  # parallel requests to the endpoint
    refusal_check: str = "judge"  # judge (refusal prompt) | heuristic (refusal phrases, see judge.py)
    batch_size: int = 8  # local judge generation batch

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}:{self.model}"


@dataclass
class EvalConfig:
    # SafeMT, read by data_prep's reader: a GitHub-layout folder (<k>_turn.json + images/), a local
    # hub-layout file or folder (parquet/json/jsonl) or a hub dataset name.
    safemt_dir: str
    targets: list[TargetConfig]
    defences: list[DefenceConfig]
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # Folder SafeMT image paths are relative to (and must stay inside); None: the GitHub folder, the
    # local file's folder, or a snapshot of the hub repository (as in data prep).
    safemt_images_root: str | None = None
    # Benign dialogues, read by data_prep's benign reader in file order: a JSONL of {"id", "messages",
    # "image"?} (data prep's benign_eval.jsonl; images resolve inside its folder) or another source it reads.
    benign: str | None = None
    benign_limit: int | None = None  # None: same as limit
    # A data_prep.build output: its test split scores the moderator, its validation split sets the
    # decision threshold (target_fpr) recorded in the report for export.
    detection_split: str | None = None
    # Evaluate only SafeMT ids in detection_split's test split (held out). None: true when
    # detection_split is set, so the moderator is never attacked with dialogues it trained on.
    restrict_to_split: bool | None = None
    target_fpr: float = 0.05  # FPR on benign validation rows that the recorded threshold allows
    # Share of judge calls (attack safety labels and benign refusal checks) that may give no verdict
    # (error, content_filter, unparsed) before eval.run fails with exit code 3; the report is still written.
    max_judge_failure_share: float = 0.05
    turns: list[int] = field(default_factory=lambda: list(TURN_COUNTS))
    limit: int | None = None  # first N valid records of each length
    # Bad input records are quarantined (<out_dir>/quarantine.jsonl, counts in <out_dir>/inputs.json) and
    # the run goes on; strict: any quarantined record stops the run, naming file, record and field.
    strict: bool = False
    max_new_tokens: int = 256
    batch_size: int = 8  # defences and HF targets (a target's own batch_size wins)
    # Requests per call to a target that schedules its own batches (vLLM): its replies are cached per
    # call, so a larger chunk feeds the engine more at once and a smaller one loses less on a kill.
    workload_chunk: int = 1024
    out_dir: str = "runs/eval"
    refusal_text: str = DEFAULT_REFUSAL
    wandb: bool = False
    wandb_project: str = "safemt-moderator"
    wandb_run_name: str | None = None
    title: str = "SafeMT evaluation"
    # For each SafeMT dialogue, moderate every prefix and report the first user turn each defence flags.
    turns_to_detection: bool = True

    def validate(self, source: str = "<config>") -> EvalConfig:
        def fail(key: str, reason: str) -> None:
            raise ConfigError(f"{source}: {key}: {reason}")

        if not self.targets:
            fail("targets", "list at least one target model")
        if not self.defences:
            fail("defences", "list at least one defence (use kind: none for the undefended baseline)")
        for i, target in enumerate(self.targets):
            _validate_target(target, f"targets.{i}", fail)
        labels = [t.label for t in self.targets]
        if len(set(labels)) != len(labels):
            fail("targets", f"target names must be unique, got {labels}")
        for i, defence in enumerate(self.defences):
            if defence.kind not in DEFENCE_KINDS:
                fail(f"defences.{i}.kind", f"{defence.kind!r} is not one of {DEFENCE_KINDS}")
            if defence.kind != "none" and not defence.model:
                fail(f"defences.{i}.model", f"a {defence.kind} defence needs a model path or name")
            if defence.kind == "guard" and not defence.guard_kind:
                fail(f"defences.{i}.guard_kind", "a guard defence needs guard_kind (the eval.guards adapter)")
            if defence.mode not in MODERATOR_MODES:
                fail(f"defences.{i}.mode", f"{defence.mode!r} is not one of {MODERATOR_MODES}")
            if defence.threshold is not None and not 0.0 <= defence.threshold <= 1.0:
                fail(f"defences.{i}.threshold", f"must be in [0, 1], got {defence.threshold}")
            if defence.kind == "moderator" and defence.threshold is not None and defence.threshold in (0.0, 1.0):
                # The moderator refuses these at load (0 flags everything, 1 nothing): say so before any work.
                fail(f"defences.{i}.threshold", f"a moderator threshold must be in (0, 1), got {defence.threshold}")
        names = [d.label for d in self.defences]
        if len(set(names)) != len(names):
            fail("defences", f"defence names must be unique, got {names} (set name: on repeats)")
        if self.judge.kind not in JUDGE_KINDS:
            fail("judge.kind", f"{self.judge.kind!r} is not one of {JUDGE_KINDS}")
        if self.judge.refusal_check not in REFUSAL_CHECKS:
            fail("judge.refusal_check", f"{self.judge.refusal_check!r} is not one of {REFUSAL_CHECKS}")
        if self.judge.max_attempts < 1:
            fail("judge.max_attempts", "must be >= 1")
        if not self.turns or any(k not in TURN_COUNTS for k in self.turns):
            fail("turns", f"must be a non-empty subset of {list(TURN_COUNTS)}, got {self.turns}")
        if len(set(self.turns)) != len(self.turns):
            fail("turns", f"repeats a length: {self.turns}")
        if not 0.0 <= self.target_fpr <= 1.0:
            fail("target_fpr", f"must be in [0, 1], got {self.target_fpr}")
        if not 0.0 <= self.max_judge_failure_share <= 1.0:
            fail("max_judge_failure_share", f"must be in [0, 1], got {self.max_judge_failure_share}")
        if self.restrict_to_split and not self.detection_split:
            fail("restrict_to_split", "needs detection_split (the prepared dataset whose test ids to keep)")
        for key in ("limit", "benign_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                fail(key, f"must be >= 1 or null, got {value}")
        for key in ("max_new_tokens", "batch_size", "workload_chunk"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        for target in self.targets:
            if target.batch_size is None:  # resolved here: load_target sees only the target's config
                target.batch_size = self.batch_size
        return self

    @property
    def restricted_to_split(self) -> bool:
        """Whether only the test split's SafeMT ids are evaluated (``restrict_to_split`` resolved)."""
        if self.restrict_to_split is None:
            return bool(self.detection_split)
        return self.restrict_to_split

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a config dump or W&B (holds no secret: only the API key's variable name)."""
        return dataclasses.asdict(self)


VLLM_ONLY_DEFAULTS = {"max_model_len": None, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9}


def _validate_target(target: TargetConfig, where: str, fail: Callable[[str, str], None]) -> None:
    if target.backend not in TARGET_BACKENDS:
        fail(f"{where}.backend", f"{target.backend!r} is not one of {TARGET_BACKENDS}")
    if target.dtype is not None and target.dtype not in TARGET_DTYPES:
        fail(f"{where}.dtype", f"{target.dtype!r} is not null or one of {TARGET_DTYPES}")
    for key in ("batch_size", "min_pixels", "max_pixels", "max_model_len"):
        value = getattr(target, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            fail(f"{where}.{key}", f"must be a positive integer or null, got {value!r}")
    if target.min_pixels and target.max_pixels and target.min_pixels > target.max_pixels:
        fail(f"{where}.min_pixels", f"{target.min_pixels} exceeds max_pixels {target.max_pixels}")
    if isinstance(target.tensor_parallel_size, bool) or not isinstance(target.tensor_parallel_size, int):
        fail(f"{where}.tensor_parallel_size", f"must be an integer, got {target.tensor_parallel_size!r}")
    if target.tensor_parallel_size < 1:
        fail(f"{where}.tensor_parallel_size", f"must be >= 1, got {target.tensor_parallel_size}")
    if not isinstance(target.gpu_memory_utilization, int | float) or not 0.0 < target.gpu_memory_utilization <= 1.0:
        fail(f"{where}.gpu_memory_utilization", f"must be in (0, 1], got {target.gpu_memory_utilization!r}")
    limits = target.limit_mm_per_prompt
    if not isinstance(limits, dict) or any(
        not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0 for k, v in limits.items()
    ):
        fail(f"{where}.limit_mm_per_prompt", f"must map a modality to a count >= 0, got {limits!r}")
    if target.backend != "vllm":
        for key, default in VLLM_ONLY_DEFAULTS.items():
            if getattr(target, key) != default:
                fail(f"{where}.{key}", "is a vLLM engine setting; set backend: vllm or remove it")
    elif target.device is not None:
        fail(f"{where}.device", "backend vllm places the model itself (use tensor_parallel_size)")


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    """Instantiate a config dataclass from a mapping, rejecting unknown and missing keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{source}: unknown key(s) {[prefix + k for k in unknown]}; known: {sorted(fields)}")
    nested = {"targets": TargetConfig, "defences": DefenceConfig}
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if cls is EvalConfig and name in nested:
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__}")
            value = [_build(nested[name], item, f"{key}.{i}", source) for i, item in enumerate(value)]
        elif cls is EvalConfig and name == "judge":
            value = _build(JudgeConfig, value or {}, key, source)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{source}: {where or 'top level'}: {exc}") from None


def apply_override(data: dict[str, Any], dotted_key: str, raw_value: str, source: str = "<cli>") -> None:
    """Set ``a.b.0.c`` in nested dicts/lists; the value is parsed as YAML."""
    value = yaml.safe_load(raw_value) if raw_value != "" else ""
    parts = dotted_key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: --{dotted_key}: {here!r} is not an index of a {len(node)}-item list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{source}: --{dotted_key}: {here!r} goes into a {type(node).__name__}")


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """``--key value`` / ``--key=value`` pairs, in order."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"<cli>: expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"<cli>: {arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), value))
    return pairs


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read a YAML config, apply CLI overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in parse_overrides(list(overrides)):
        apply_override(data, key, value, source=str(path))
    return _build(EvalConfig, data, "", str(path)).validate(str(path))
