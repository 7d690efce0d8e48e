"""Training throughput, ours vs stock TRL VLM SFT: ``python -m bench.train_throughput``.

Same data (the prepared SafeMT-format dataset), same model (the tiny Qwen2.5-VL on CPU; on a GPU a
real-size architecture with random weights from config), same steps, in one process, alternating:

- baseline: TRL's stock VLM SFT settings as in its ``sft_vlm`` example (TRL's padding collator, random
  sampling, no length grouping, no packing/padding-free, no fused kernels);
- ours: the settings our recipes use (length-grouped batches from data prep's token lengths, loss on
  the verdict only).

Prints samples/s, real (non-pad) tokens/s, pad fraction and peak RSS per run, and a last line with
the ratio ours/baseline for real-token throughput. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_PAD_FRACTION, TARGET_RATIO = 0.10, 1.3


@dataclass
class RunResult:
    name: str
    seconds: float
    samples: int
    real_tokens: int
    padded_tokens: int
    peak_rss_gb: float

    @property
    def pad_fraction(self) -> float:
        return 1 - self.real_tokens / self.padded_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


class CountingCollator:
    """Counts real and padded tokens of every batch the trainer consumes."""

    def __init__(self, inner):
        self.inner = inner
        self.samples = self.real = self.padded = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch["attention_mask"]
        self.samples += mask.shape[0]
        self.real += int(mask.sum())
        self.padded += mask.numel()
        return batch


class PeakRSS:
    """Samples this process's RSS in a thread (CPU peak per run; ru_maxrss only ever grows)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def recipe_args(setting: str, model: str, data: str, out: Path, steps: int, batch: int) -> list[str]:
    common = [
        "--config", str(REPO_ROOT / "configs/sft/tiny_cpu.yaml"), "--model_name_or_path", model,
        "--dataset_path", data, "--output_dir", str(out), "--max_steps", str(steps),
        "--per_device_train_batch_size", str(batch), "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--report_to", "none", "--logging_steps", str(steps),
        "--fresh_start", "true", "--seed", "0",
    ]  # fmt: skip
    if setting == "baseline":
        # TRL's sft_vlm example: plain collator over randomly sampled examples.
        return [*common, "--train_sampling_strategy", "random"]
    return [*common, "--train_sampling_strategy", "group_by_length"]


def run_once(setting: str, model: str, data: str, work: Path, steps: int, batch: int) -> RunResult:
    from trl import ModelConfig, SFTConfig, TrlParser

    from train.config import ModeratorScriptArguments
    from train.run import build_trainer

    argv = recipe_args(setting, model, data, work / setting, steps, batch)
    parsed = TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(args=argv)
    trainer, _ = build_trainer(*parsed)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    with PeakRSS() as rss:
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return RunResult(setting, seconds, counter.samples, counter.real, counter.padded, rss.peak / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo/base", help="model dir (python -m tiny_models.moderator DIR)")
    parser.add_argument("--data", default="runs/demo/data", help="prepared dataset (python -m data_prep.build)")
    parser.add_argument("--work", default="runs/bench/train", help="scratch output dir")
    parser.add_argument("--steps", type=int, default=50, help="50 x 8 = one mega-batch of the length-grouped sampler")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per setting")
    args = parser.parse_args()

    results: dict[str, list[RunResult]] = {"baseline": [], "ours": []}
    for _ in range(args.repeats):
        for setting in ("baseline", "ours"):
            results[setting].append(run_once(setting, args.model, args.data, Path(args.work), args.steps, args.batch))

    print(f"\n{'setting':<10}{'samples/s':>11}{'real tok/s':>12}{'pad frac':>10}{'peak RSS GB':>13}{'runs':>6}")
    medians = {}
    for setting, runs in results.items():
        med = {
            "samples_per_s": statistics.median(r.samples_per_s for r in runs),
            "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
            "pad_fraction": statistics.median(r.pad_fraction for r in runs),
            "peak_rss_gb": max(r.peak_rss_gb for r in runs),
        }
        medians[setting] = med
        print(
            f"{setting:<10}{med['samples_per_s']:>11.2f}{med['tokens_per_s']:>12.0f}{med['pad_fraction']:>10.3f}"
            f"{med['peak_rss_gb']:>13.2f}{len(runs):>6}"
        )
    ratio = medians["ours"]["tokens_per_s"] / medians["baseline"]["tokens_per_s"]
    pad = medians["ours"]["pad_fraction"]
    print(
        f"real-token throughput ours/baseline = {ratio:.2f}x (target >= {TARGET_RATIO}x); "
        f"ours pad fraction = {pad:.3f} (target <= {TARGET_PAD_FRACTION})"
    )


if __name__ == "__main__":
    main()
