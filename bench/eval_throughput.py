"""Eval throughput on CPU, one process vs shards run at once, and a GPU-hours projection (an estimate).

    python -m bench.eval_throughput [--limit 2] [--shards 2] [--work runs/bench/eval_throughput]

Measured (CPU, the tiny random-weight models): ``python -m eval.run`` on the demo config
(``configs/eval/demo.yaml``: its lengths, defences, judge, batch and token settings) over the SafeMT
sample with placeholder images (what ``make demo`` copies), first as one process, then as N shards
started together (``--shard I/N``), then the merge run that writes the report; each in a fresh
``out_dir``. Each process gets ``cores // processes`` torch threads, so the shards share the cores the
single process had. The moderator defences load the untrained tiny base (as ``tests/test_eval_shard.py``
does): no data prep or training is needed, so ``detection_split`` is off; the throughput is that of the
same architecture. Wall times include process start and model loading, as a user sees them.

An item is one dialogue (a SafeMT id at one length, or a benign dialogue) through one defence and one
target: one row of ``rows.jsonl``. The shard lines must add up to the single run's items.

Projected (NOT measured; nothing here ran on a GPU): GPU-hours of the full SafeMT eval (10,000
dialogues x the configured lengths x defences x targets, plus the benign dialogues) with the HF and the
vLLM target backends, from per-token cost assumptions printed with the figures (``--help`` lists them;
each can be changed). Not a test: ``tests/test_bench_eval_throughput.py`` checks its output's structure.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "configs/eval/demo.yaml"
FULL_CONFIG = "configs/eval/safemt_7b.yaml"
SAFEMT_SAMPLE = REPO_ROOT / "tests" / "data" / "safemt_sample"
SAFEMT_DIALOGUES = 10_000  # SafeMT's size, per the issue (#13) and the paper
SHARD_LINE = re.compile(r"^shard (\d+)/(\d+): (\d+) samples\b.*?\b(\d+) judgements\b")
# The tiny guard builder per guard adapter (tiny_models.guards); other guard kinds are skipped here.
TINY_GUARDS = {"llama_guard_3_vision": "build_tiny_mllama"}


@dataclass(frozen=True)
class GpuAssumptions:
    """Per-token GPU costs of a 7B-class VLM in bf16 on one 80 GB H100/A100-class GPU. Assumed, not measured."""

    hf_step_s: float = 0.030  # one decode step of a batch with transformers' generate (eager, no CUDA graphs)
    vllm_decode_tokens_per_s: float = 2500.0  # vLLM output tokens/s with continuous batching
    prefill_tokens_per_s: float = 25_000.0  # prompt tokens/s: 2 x 7.6e9 FLOP/token at ~40% of 989 TFLOP/s
    text_tokens_per_turn: int = 150  # a user turn and the assistant turn before it
    template_tokens: int = 200  # system prompt, chat template; the moderator's policy list

    def lines(self) -> list[str]:
        return [
            f"  HF generate: {self.hf_step_s * 1000:.0f} ms per decode step of a whole batch (a 7B in bf16 reads "
            "~15 GB of weights per step, ~6 ms at H100 bandwidth, plus eager per-step overhead; 25-35 ms/step "
            "is the usual range for transformers without torch.compile); a batch decodes until its longest reply "
            "ends, taken as max_new_tokens",
            f"  vLLM: {self.vllm_decode_tokens_per_s:,.0f} output tokens/s per GPU (continuous batching; vLLM's own "
            "throughput benchmarks put 7-8B models at 2,000-5,000 output tokens/s on one A100/H100); every reply "
            "taken as max_new_tokens long (an upper bound: replies stop at EOS)",
            f"  prefill: {self.prefill_tokens_per_s:,.0f} prompt tokens/s (2 x 7.6e9 FLOP per token at ~40% of an "
            "H100's 989 bf16 TFLOP/s); prompt = image tokens (max_pixels / 784, Qwen2.5-VL) + "
            f"{self.text_tokens_per_turn} text tokens per turn x k + {self.template_tokens} template tokens",
            "  defences (moderator, guards) run on the HF path at the config's batch_size; the moderator's policy "
            "and block modes share one decision (#13 item 2); guards counted at 7B cost (Llama Guard 3 is 11B)",
            "  not counted: the judge (an API), the detection split, turns-to-detection prefixes, model loading",
        ]


@dataclass
class Timed:
    label: str
    seconds: float
    items: int


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def prepare(work: Path, base: Path | None, skip_guards: bool) -> dict[str, Path]:
    """The tiny models and the SafeMT sample with placeholder images; reused when already in ``work``."""
    from tiny_models.images import write_placeholder_images

    paths = {"base": base or work / "models" / "base", "safemt": work / "safemt"}
    if not (paths["base"] / "config.json").is_file():
        from tiny_models.moderator import build_tiny_qwen2_5_vl

        build_tiny_qwen2_5_vl(paths["base"])
    if not skip_guards:
        import tiny_models.guards

        for kind, builder in TINY_GUARDS.items():
            paths[kind] = work / "models" / kind
            if not (paths[kind] / "config.json").is_file():
                getattr(tiny_models.guards, builder)(paths[kind])
    if not paths["safemt"].is_dir():  # as `make demo` does: python -m tiny_models.images DIR --copy-from sample
        paths["safemt"].mkdir(parents=True)
        for source in SAFEMT_SAMPLE.glob("*_turn.json"):
            shutil.copy(source, paths["safemt"] / source.name)
        write_placeholder_images(paths["safemt"])
    return paths


def demo_overrides(paths: dict[str, Path], limit: int, skip_guards: bool) -> tuple[list[str], int]:
    """``eval.run`` flags that point the demo config at the tiny models; and the number of defences kept."""
    import yaml

    demo = yaml.safe_load((REPO_ROOT / DEMO_CONFIG).read_text())
    flags = ["--safemt_dir", str(paths["safemt"]), "--detection_split", "null", "--restrict_to_split", "false"]
    flags += ["--limit", str(limit), "--benign_limit", str(limit), "--wandb", "false"]
    targets = [{**target, "model": str(paths["base"])} for target in demo["targets"]]
    flags += ["--targets", yaml.safe_dump(targets, default_flow_style=True, width=10**6).strip()]
    defences = []
    for defence in demo["defences"]:
        if defence["kind"] == "moderator":
            defence = {**defence, "model": str(paths["base"]), "verify": False}  # the tiny base: no export
        elif defence["kind"] == "guard":
            if skip_guards or defence.get("guard_kind") not in paths:
                continue
            defence = {**defence, "model": str(paths[defence["guard_kind"]])}
        defences.append(defence)
    flags += ["--defences", yaml.safe_dump(defences, default_flow_style=True, width=10**6).strip()]
    return flags, len(defences)


def _eval_command(flags: list[str], out_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "eval.run", "--config", DEMO_CONFIG, *flags, "--out_dir", str(out_dir), *extra]


def _run_together(commands: list[list[str]], threads: int, logs: list[Path]) -> tuple[float, list[str]]:
    """Start every command at once; wall seconds until the last ends, and each one's stdout."""
    start = time.perf_counter()
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as stderr:  # progress bars and warnings, kept for a failed run
            procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=_env(threads), stdout=subprocess.PIPE,
                                          stderr=stderr, text=True))  # fmt: skip
    outputs = [proc.communicate()[0] for proc in procs]
    seconds = time.perf_counter() - start
    for proc, command, log in zip(procs, commands, logs, strict=True):
        if proc.returncode != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            raise SystemExit(f"error: {' '.join(command[1:4])} ... exited {proc.returncode}: {' | '.join(tail)}")
    return seconds, outputs


def _rows(out_dir: Path) -> int:
    path = out_dir / "rows.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def measure(
    work: Path, flags: list[str], shards: int, cores: int, single_threads: int
) -> tuple[Timed, list[Timed], Timed, int]:
    """Single process, then ``shards`` shards at once, then the merge; each in a fresh out_dir under ``work``."""
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    # Untimed: the first process to import torch/transformers reads them from disk; the others find them cached.
    warm = [sys.executable, "-c", "import eval.run, eval.loop"]
    subprocess.run(warm, cwd=REPO_ROOT, env=_env(cores), check=True, capture_output=True)
    seconds, _ = _run_together([_eval_command(flags, runs / "single")], single_threads, [runs / "single.log"])
    single = Timed("single process", seconds, _rows(runs / "single"))

    sharded = runs / "sharded"
    commands = [_eval_command(flags, sharded, "--shard", f"{i}/{shards}") for i in range(shards)]
    logs = [runs / f"shard-{i}.log" for i in range(shards)]
    seconds, outputs = _run_together(commands, max(1, cores // shards), logs)
    shard_runs = []
    for index, output in enumerate(outputs):
        match = next((m for m in map(SHARD_LINE.match, output.splitlines()) if m), None)
        if match is None or int(match.group(1)) != index:
            raise SystemExit(f"error: shard {index}/{shards} printed no summary line: {output.strip()[-300:]!r}")
        shard_runs.append(Timed(f"shard {index}/{shards}", seconds, int(match.group(4))))
    seconds, _ = _run_together([_eval_command(flags, sharded)], cores, [runs / "merge.log"])
    merge = Timed("merge", seconds, _rows(sharded))
    return single, shard_runs, merge, _rows(sharded)


def _rate(items: int, seconds: float) -> str:
    return f"{items} items in {seconds:.1f} s = {items / seconds:.2f} items/s"


def projection(assume: GpuAssumptions, config_path: str, dialogues: int, gpus: int) -> list[str]:
    """GPU-hours of the full eval described by ``config_path``, per target backend (an estimate)."""
    from eval.config import load_config
    from moderator.images import PIXELS_PER_IMAGE_TOKEN

    config = load_config(REPO_ROOT / config_path)
    n_lengths, n_defences, n_targets = len(config.turns), len(config.defences), len(config.targets)
    benign = config.benign_limit or 0
    items = (dialogues * n_lengths + benign) * n_defences * n_targets
    # One decision per dialogue per decision model: modes of one moderator share it (#13 item 2).
    deciders = {(d.kind, d.model) for d in config.defences if d.kind != "none"}
    verdict_tokens = max((d.max_new_tokens for d in config.defences if d.kind != "none"), default=0)
    image_tokens = max(t.max_pixels or 0 for t in config.targets) // PIXELS_PER_IMAGE_TOKEN
    prompts = [image_tokens + assume.template_tokens + assume.text_tokens_per_turn * k for k in config.turns]
    mean_prompt = sum(prompts) / len(prompts)
    reply_tokens = config.max_new_tokens
    batch = config.batch_size
    replies = items  # an upper bound: a blocking defence's flagged items get no reply
    decisions = (dialogues * n_lengths + benign) * len(deciders)
    prefill_s = (replies + decisions) * mean_prompt / assume.prefill_tokens_per_s
    defence_decode_s = decisions * verdict_tokens * assume.hf_step_s / batch
    target_decode = {
        "hf": replies * reply_tokens * assume.hf_step_s / batch,
        "vllm": replies * reply_tokens / assume.vllm_decode_tokens_per_s,
    }
    lines = [
        "projection: ESTIMATE from the assumptions below, not a measurement (no GPU was used)",
        f"  workload ({config_path}): ({dialogues:,} dialogues x {n_lengths} lengths {config.turns} + {benign} benign)"
        f" x {n_defences} defences x {n_targets} target(s) = {items:,} items; {decisions:,} defence decisions "
        f"({len(deciders)} decision models); replies <= {reply_tokens} tokens, verdicts <= {verdict_tokens}, "
        f"batch {batch}, mean prompt {mean_prompt:,.0f} tokens",
        *assume.lines(),
    ]
    for backend, decode_s in target_decode.items():
        total_s = prefill_s + defence_decode_s + decode_s
        lines.append(
            f"projected {backend} target backend: {total_s / 3600:,.1f} GPU-hours ({total_s / items:.2f} GPU-s per item: "
            f"target decode {decode_s / 3600:,.1f} h, defence decode {defence_decode_s / 3600:,.1f} h, prefill "
            f"{prefill_s / 3600:,.1f} h); {total_s / 3600 / gpus:,.1f} h wall on {gpus} GPUs as {gpus} shards"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    defaults = GpuAssumptions()
    parser = argparse.ArgumentParser(prog="python -m bench.eval_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "bench" / "eval_throughput",
                        help="models, sample and runs go here (models are reused)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=3, help="SafeMT ids per length, and benign dialogues")
    parser.add_argument("--shards", type=int, default=2, help="shards run at once")
    parser.add_argument("--base", type=Path, help="an existing tiny moderator checkpoint (default: built in --work)")
    parser.add_argument("--skip-guards", action="store_true", help="leave out the demo config's guard defences")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores shared by the processes")
    parser.add_argument("--single-threads", type=int, help="torch threads of the single process (default: --cores)")
    parser.add_argument("--dialogues", type=int, default=SAFEMT_DIALOGUES, help="projection: SafeMT dialogues")
    parser.add_argument("--projection-config", default=FULL_CONFIG, help="projection: the full eval's config")
    parser.add_argument("--gpus", type=int, default=8, help="projection: GPUs (one shard each) for the wall time")
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help="projection")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.shards < 2 or args.cores < 1:
        parser.error("--limit and --cores must be >= 1, --shards >= 2")
    assume = GpuAssumptions(**{name: getattr(args, name) for name in vars(defaults)})

    work = args.work.resolve()
    paths = prepare(work, args.base, args.skip_guards)
    flags, n_defences = demo_overrides(paths, args.limit, args.skip_guards)
    load_before = os.getloadavg()[0]
    single_threads = args.single_threads or args.cores
    single, shard_runs, merge, merged_rows = measure(work, flags, args.shards, args.cores, single_threads)
    load_after = os.getloadavg()[0]
    shard_items = sum(run.items for run in shard_runs)
    shards_s = shard_runs[0].seconds
    import torch

    print(
        f"eval throughput on CPU: {args.cores} cores, torch {torch.__version__}, tiny random-weight models, "
        f"{DEMO_CONFIG} with {n_defences} defences, SafeMT sample --limit {args.limit} per length + {args.limit} benign"
        f"; load average {load_before:.1f} before, {load_after:.1f} after (other work on the machine skews the ratio)"
    )
    print(f"single process ({single_threads} thread(s)): {_rate(single.items, single.seconds)}")
    per_shard = " + ".join(str(run.items) for run in shard_runs)
    threads = max(1, args.cores // args.shards)
    print(f"{args.shards} shards at once ({threads} thread(s) each): {per_shard} = {_rate(shard_items, shards_s)}")
    print(f"merge run (report; computes nothing new): {merge.seconds:.1f} s")
    total = shards_s + merge.seconds
    print(
        f"sharded total: {_rate(shard_items, total)}; speed-up over one process {single.seconds / shards_s:.2f}x "
        f"for the shards, {single.seconds / total:.2f}x with the merge"
    )
    added_up = shard_items == single.items == merged_rows
    print(f"shard counts add up: {'yes' if added_up else 'NO'} ({per_shard} = {shard_items}; single process "
          f"{single.items}; merged report {merged_rows} rows)")  # fmt: skip
    for line in projection(assume, args.projection_config, args.dialogues, args.gpus):
        print(line)
    return 0 if added_up else 1


if __name__ == "__main__":
    raise SystemExit(main())
