"""Evaluation config: a YAML file parsed into dataclasses, with command-line overrides of every field.

    python -m eval.run --config configs/eval/demo.yaml --limit 2 --turns 1 2 --judge.kind local --targets.0.model DIR

One convention with training and data prep: ``--config FILE.yaml`` sets the defaults and ``--field value``
overrides a top-level field, parsed with its type by ``trl.TrlParser`` (``python -m eval.run --help`` lists
them with their help). The nested parts (``targets`` and ``defences``, lists; ``judge``) take dotted keys,
``--defences.0.threshold 0.4``, whose values are read as YAML (``--defences.1.options "{a: 1}"``). Values
written as in YAML still parse for top-level fields too: ``null`` unsets a field that may be null, and
``--turns "[1, 2]"`` equals ``--turns 1 2``. A field the config does not have, in the YAML or on the
command line, is an error naming the file and field, so a typo cannot silently fall back to a default;
abbreviated flags are refused for the same reason; a value that is not valid YAML is an error naming its
flag. API keys never appear here: the judge names the environment variable that holds one
(``api_key_env``), so a dumped config is safe to share, and the key goes only to the hosts in
``api_key_hosts`` (default ``api.openai.com``) or loopback, never over plain http (``eval/endpoints.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eval.defences import DEFENCES
from eval.endpoints import DEFAULT_KEY_HOSTS, EndpointError, check_endpoint
from eval.judge import JUDGES
from eval.targets import TARGETS
from moderator.artefacts import ModeratorConfigError, check_threshold
from moderator.cli import UsageError, one_line, parse_config
from moderator.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from moderator.schema import TURN_COUNTS

# The kinds a config may name are the registered ones: a new kind is added to its registry only.
DEFENCE_KINDS = tuple(DEFENCES)  # none, guard, moderator
MODERATOR_MODES = ("policy", "block")
JUDGE_KINDS = tuple(JUDGES)  # openai, local, refusal_match
REFUSAL_CHECKS = ("judge", "heuristic")
TARGET_BACKENDS = tuple(TARGETS)  # hf, vllm
TARGET_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class ConfigError(UsageError):
    """The eval config is invalid; the message names the file and key (a ValueError, one line in CLIs)."""


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
    # Whether the target receives the dialogue's images; false for a text-only chat model, which then sees
    # the text only (the moderator and guards still see the images). Part of the reply cache key.
    images: bool = True
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
    # moderator: None reads the export's serving config (else the default); guard: its score decides against it
    # (None: the guard's own text verdict decides)
    threshold: float | None = None
    mode: str = "policy"  # moderator: policy (inject the category's policy) | block (fixed refusal)
    max_new_tokens: int = 64  # moderator/guard verdict length
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for load_guard
    # moderator only: pin the export. The sha256 (64 hex) of its manifest.json, as `python -m export` prints
    # and the model card records: any other export at `model` is refused at load (eval exits 2).
    expect_manifest_sha256: str | None = None
    # moderator only: false loads a checkpoint without verifying it against a manifest (an unexported
    # adapter or training checkpoint, for development); it cannot be combined with expect_manifest_sha256.
    verify: bool = True

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
    # null: the openai client's ($OPENAI_BASE_URL, else https://api.openai.com/v1). https, or plain http only
    # to a loopback host, e.g. http://127.0.0.1:8000/v1 for a local vLLM / transformers serve (eval/endpoints.py)
    base_url: str | None = None
    # name of the environment variable holding the key (ending in _API_KEY, _KEY or _TOKEN); null: send none
    api_key_env: str | None = "OPENAI_API_KEY"
    # the only hosts (exact names) the key is sent to, besides loopback; another base_url host is an error
    api_key_hosts: list[str] = field(default_factory=lambda: list(DEFAULT_KEY_HOSTS))
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
    """The whole eval run. Top-level fields are ``--field value`` flags (``python -m eval.run --help``);
    the nested parts (``targets``, ``defences``, ``judge``) take dotted overrides (``--judge.kind local``)."""

    safemt_dir: str = field(
        metadata={
            "help": "SafeMT, read by data_prep's reader: a GitHub-layout folder (<k>_turn.json + images/), a local "
            "hub-layout file or folder (parquet/json/jsonl) or a hub dataset name"
        }
    )
    targets: list[TargetConfig] = field(metadata={"help": "chat models under attack (--targets.I.FIELD)"})
    defences: list[DefenceConfig] = field(metadata={"help": "defences in front of each target (--defences.I.FIELD)"})
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "labels replies (--judge.FIELD)"})
    safemt_images_root: str | None = field(
        default=None,
        metadata={
            "help": "folder SafeMT image paths are relative to (and must stay inside); null: the GitHub folder, "
            "the local file's folder, or a snapshot of the hub repository (as in data prep)"
        },
    )
    benign: str | None = field(
        default=None,
        metadata={
            "help": "benign dialogues, read by data_prep's benign reader in file order: a JSONL of {id, messages, "
            "image?} (data prep's benign_eval.jsonl; images resolve inside its folder) or another source it reads"
        },
    )
    benign_limit: int | None = field(default=None, metadata={"help": "first N benign dialogues; null: same as limit"})
    detection_split: str | None = field(
        default=None,
        metadata={
            "help": "a data_prep.build output: its test split scores the moderator, its validation split sets the "
            "decision threshold (target_fpr) recorded in the report for export"
        },
    )
    restrict_to_split: bool | None = field(
        default=None,
        metadata={
            "help": "evaluate only SafeMT ids in detection_split's test split (held out); null: true when "
            "detection_split is set, so the moderator is never attacked with dialogues it trained on"
        },
    )
    target_fpr: float = field(
        default=0.05, metadata={"help": "FPR on benign validation rows that the recorded threshold allows"}
    )
    max_judge_failure_share: float = field(
        default=0.05,
        metadata={
            "help": "share of judge calls (attack labels and benign refusal checks) that may give no verdict "
            "(error, content_filter, unparsed) before eval.run exits 3; the report is still written"
        },
    )
    turns: list[int] = field(
        default_factory=lambda: list(TURN_COUNTS),
        metadata={
            "help": f"dialogue lengths to evaluate, a subset of {list(TURN_COUNTS)} (--turns 1 2 4 or '[1, 2, 4]')"
        },
    )
    limit: int | None = field(default=None, metadata={"help": "first N valid records of each length; null: all"})
    strict: bool = field(
        default=False,
        metadata={
            "help": "stop at the first quarantined input record, naming file, record and field (default: quarantine "
            "it to <out_dir>/quarantine.jsonl, count it in <out_dir>/inputs.json and go on)"
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "target reply length in tokens"})
    batch_size: int = field(
        default=8, metadata={"help": "batch of defences and HF targets (a target's own batch_size wins)"}
    )
    workload_chunk: int = field(
        default=1024,
        metadata={
            "help": "requests per call to a target that schedules its own batches (vLLM): replies are cached per "
            "call, so a larger chunk feeds the engine more at once and a smaller one loses less on a kill"
        },
    )
    out_dir: str = field(default="runs/eval", metadata={"help": "cache, report.{json,md} and plots go here"})
    refusal_text: str = field(default=DEFAULT_REFUSAL, metadata={"help": "the reply of a blocking defence"})
    wandb: bool = field(default=False, metadata={"help": "log the config and report to Weights & Biases"})
    wandb_project: str = field(default="safemt-moderator", metadata={"help": "W&B project"})
    wandb_run_name: str | None = field(default=None, metadata={"help": "W&B run name; null: W&B picks one"})
    title: str = field(default="SafeMT evaluation", metadata={"help": "title of report.md and the plots"})
    turns_to_detection: bool = field(
        default=True,
        metadata={
            "help": "for each SafeMT dialogue, moderate every prefix and report the first user turn each defence flags"
        },
    )

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
            if defence.kind == "moderator" and defence.threshold is not None:
                # The moderator refuses 0 and 1 at load (0 flags everything, 1 nothing): say so before any work.
                try:
                    check_threshold(defence.threshold, f"defences.{i}.threshold")
                except ModeratorConfigError:
                    fail(f"defences.{i}.threshold", f"a moderator threshold must be in (0, 1), got {defence.threshold}")
            _validate_pinning(defence, f"defences.{i}", fail)
        names = [d.label for d in self.defences]
        if len(set(names)) != len(names):
            fail("defences", f"defence names must be unique, got {names} (set name: on repeats)")
        if self.judge.kind not in JUDGE_KINDS:
            fail("judge.kind", f"{self.judge.kind!r} is not one of {JUDGE_KINDS}")
        if self.judge.refusal_check not in REFUSAL_CHECKS:
            fail("judge.refusal_check", f"{self.judge.refusal_check!r} is not one of {REFUSAL_CHECKS}")
        if self.judge.max_attempts < 1:
            fail("judge.max_attempts", "must be >= 1")
        if self.judge.kind == "openai":  # the only judge that sends anything (and a key) over the network
            try:
                check_endpoint(self.judge.base_url, self.judge.api_key_env, self.judge.api_key_hosts)
            except EndpointError as error:
                fail(error.field, error.reason)
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


def _validate_pinning(defence: DefenceConfig, where: str, fail: Callable[[str, str], None]) -> None:
    """``expect_manifest_sha256`` (64 hex, stored lower-case) and ``verify`` (a bool): a moderator's only."""
    pin = defence.expect_manifest_sha256
    if pin is not None:
        if not isinstance(pin, str) or not _SHA256_HEX.fullmatch(pin):
            # YAML reads an all-digit digest as an int: quote it.
            fail(f"{where}.expect_manifest_sha256", f"must be 64 hex characters (a quoted sha256) or null, got {pin!r}")
        if defence.kind != "moderator":
            fail(f"{where}.expect_manifest_sha256", f"pins a moderator export; a {defence.kind} defence has none")
        defence.expect_manifest_sha256 = pin.lower()
    if not isinstance(defence.verify, bool):  # a quoted "false" would otherwise count as true
        fail(f"{where}.verify", f"must be true or false, got {defence.verify!r}")
    if not defence.verify:
        if defence.kind != "moderator":
            fail(f"{where}.verify", f"only a moderator defence verifies an export; remove it from this {defence.kind}")
        if pin is not None:
            fail(f"{where}.expect_manifest_sha256", "a pinned export is verified: remove verify: false")


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
    if not isinstance(target.images, bool):  # a quoted "false" would otherwise count as true
        fail(f"{where}.images", f"must be true or false, got {target.images!r}")
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
    """Set ``a.b.0.c`` in nested dicts/lists; the value is parsed as YAML (invalid YAML: a ConfigError naming it)."""
    try:
        value = yaml.safe_load(raw_value) if raw_value != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{source}: --{dotted_key}: {raw_value!r} is not valid YAML ({_yaml_problem(exc)}); quote a string "
            "that starts with [ or {"
        ) from None
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


NESTED_FIELDS: dict[str, type] = {"targets": TargetConfig, "defences": DefenceConfig, "judge": JudgeConfig}
NULL_WORDS = ("null", "~", "None")  # a flag value meaning "unset" for a field that may be null, as in YAML


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in each flag's help (HfArgumentParser's choice) and the nested-field table as written."""


def _top_level_arguments() -> type:
    """EvalConfig's top-level fields without the nested parts, as a dataclass ``HfArgumentParser`` can read.

    Derived, not a second declaration: a field added to EvalConfig becomes a flag with its help text.
    """
    hints = typing.get_type_hints(EvalConfig)
    specs = []
    for f in dataclasses.fields(EvalConfig):
        if f.name in NESTED_FIELDS:
            continue
        kwargs: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        specs.append((f.name, hints[f.name], field(**kwargs)))
    return dataclasses.make_dataclass("EvalArguments", specs)


def _yaml_compatible(convert: Callable[[str], Any], nullable: bool, is_list: bool) -> Callable[[str], Any]:
    """Wrap a flag's type so the values the YAML-parsed overrides took still parse: ``null`` for a field
    that may be null, and a flow list (``--turns "[1, 2]"``) as well as ``--turns 1 2``."""

    def parse(text: str) -> Any:
        if nullable and text.strip() in NULL_WORDS:
            return None
        if is_list and text.lstrip().startswith("["):
            try:
                items = yaml.safe_load(text)
            except yaml.YAMLError as exc:  # argparse names the flag: "argument --turns: <this>"
                raise argparse.ArgumentTypeError(f"{text!r} is not valid YAML ({_yaml_problem(exc)})") from None
            if not isinstance(items, list):
                raise ValueError(text)
            return [convert(item) for item in items]
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in "invalid int value: ..."
    return parse


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What a YAML parser error says, in a few words and one line (not its multi-line source excerpt)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    return one_line(problem) if problem else type(exc).__name__


def _nested_fields_help() -> str:
    lines = ["nested fields (dotted overrides; the value is read as YAML, e.g. --defences.0.options '{a: 1}'):"]
    for key, cls in (("--targets.I.", TargetConfig), ("--defences.I.", DefenceConfig), ("--judge.", JudgeConfig)):
        names = ", ".join(f.name for f in dataclasses.fields(cls))
        lines.append(f"  {key}FIELD: {names}")
    lines.append("  (I: the list position from 0; --targets / --defences / --judge replace the whole part)")
    lines.append("a field unknown to the config (in the YAML or on the command line) is an error naming it")
    return "\n".join(lines)


def eval_arg_parser(prog: str = "python -m eval.run", description: str | None = None) -> argparse.ArgumentParser:
    """The eval's command line: ``--config FILE.yaml`` sets the defaults, every ``--field value`` overrides one.

    A ``trl.TrlParser`` (an ``HfArgumentParser``, as ``train/sft.py`` and ``data_prep.build`` use) over
    EvalConfig's top-level fields; callers may add their own flags before :func:`parse_eval_args`.
    Abbreviated flags are refused, so a misspelt field cannot silently match another.
    """
    from trl import TrlParser

    parser = TrlParser(
        _top_level_arguments(),
        prog=prog,
        description=description,
        epilog=_nested_fields_help(),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="YAML config (configs/eval/*.yaml); flags override its values")
    hints = typing.get_type_hints(EvalConfig)
    for action in parser._actions:
        hint = hints.get(action.dest)
        if hint is None or action.type is None or action.dest in NESTED_FIELDS:
            continue
        nullable = type(None) in typing.get_args(hint)
        is_list = typing.get_origin(hint) is list
        if nullable or is_list:
            action.type = _yaml_compatible(action.type, nullable, is_list)

    def error(message: str) -> None:
        raise ConfigError(f"{message} (see {prog} --help)")

    parser.error = error  # type: ignore[method-assign]  # one line, as moderator.cli does for every entry point
    return parser


def parse_eval_args(
    argv: Sequence[str], parser: argparse.ArgumentParser | None = None
) -> tuple[EvalConfig, argparse.Namespace]:
    """``--config FILE.yaml [--field value ...] [--nested.dotted.key value ...]`` -> validated config.

    Precedence: a flag beats the YAML, the YAML beats the dataclass default. Top-level fields are parsed by
    ``parser`` (default :func:`eval_arg_parser`) with their types; the nested parts by dotted overrides.
    Returns the config and the namespace of the parser's other flags (``config`` and any the caller added).
    """
    parser = parser or eval_arg_parser()
    argv = list(argv)
    if not any(arg in ("-h", "--help") or arg.split("=")[0] == "--config" for arg in argv):
        raise ConfigError(f"--config FILE.yaml is required (see {parser.prog} --help)")
    try:
        # The project's one convention (moderator.cli.parse_config): YAML sets the top-level fields, a flag
        # overrides one; what is no top-level field comes back for the nested parts (targets, defences, judge).
        arguments, rest = parse_config((), argv, parser=parser, nested=NESTED_FIELDS)
    except ConfigError:
        raise
    except UsageError as exc:
        raise ConfigError(str(exc)) from None
    source = rest.config
    values = {f.name: getattr(arguments, f.name) for f in dataclasses.fields(arguments)}
    for name, value in values.items():
        if isinstance(value, list):  # "--turns [1, 2]" parsed into one list item
            values[name] = [x for item in value for x in (item if isinstance(item, list) else [item])]
    data = {**values, **rest.keys}
    overrides = parse_overrides(rest.args)
    for key, value in overrides:
        apply_override(data, key, value, source=source)
    options = rest.options
    options.config = source
    return _build(EvalConfig, data, "", source).validate(source), options


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read a YAML config, apply command-line style overrides (``["--limit", "2", "--judge.kind", "local"]``)
    and validate it: :func:`parse_eval_args` with ``--config path``."""
    return parse_eval_args(["--config", str(path), *overrides])[0]
