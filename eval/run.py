"""Run the SafeMT evaluation: ``python -m eval.run --config configs/eval/demo.yaml [--key value ...]``.

Every config field can be overridden: top-level ones as flags (``--limit 3``, ``--turns 1 2``; listed
by ``--help``), the nested targets, defences and judge with dotted keys (``--judge.kind local``,
``--targets.0.model DIR``); a misspelt field is an error naming it (see ``eval/config.py``). The loop itself lives in ``eval/loop.py``; results resume from
``<out_dir>/cache/`` and the report lands in ``<out_dir>/report.{json,md}`` and ``asr_vs_turns.png``.

Sharded (e.g. one GPU each, see ``launch/eval_sharded.sh``): ``--shard I/N`` computes only shard I of
N (split by SafeMT id) into ``<out_dir>/cache/shard-I-of-N/`` and writes no report; the shards of a run
may run at once. Afterwards the same command without ``--shard`` reads every shard's cache, computes
only what is still missing (nothing, when every shard finished) and writes the report. With a
``detection_split``, run ``--thresholds-only`` once first: it scores the validation split and fixes
the moderator's threshold, which every shard needs (otherwise each shard scores all of it).

Exit codes: 0 done; 2 bad config or input data; 3 more than ``max_judge_failure_share`` of the judge
calls gave no verdict (the report is still written; failed calls are asked again on the next run);
4 another eval is writing the same ``out_dir`` (or the same shard of it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eval.cache import CacheError, OutDirLockedError
from eval.config import ConfigError, eval_arg_parser, parse_eval_args
from eval.judge import JudgeFailureError
from eval.loop import EvalRun, run_eval
from eval.samples import EvalDataError
from eval.shard import Shard
from moderator.cli import run_cli
from moderator.inference import ModeratorConfigError
from moderator.loading import ModelLoadError
from moderator.manifest import ManifestError

# Input problems the user fixes from the message alone: one line on stderr, exit 2 (traceback with SAFEMT_DEBUG=1).
USER_ERRORS = (EvalDataError, CacheError, ModelLoadError, ManifestError, ModeratorConfigError)


def _shard_flag(argv: Sequence[str]) -> str | None:
    locate = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    locate.add_argument("--shard")
    try:
        located, _ = locate.parse_known_args(list(argv))
    except argparse.ArgumentError:  # e.g. --shard without a value: the full parser names it
        return None
    return located.shard


def main(argv: Sequence[str] | None = None) -> int:
    parser = eval_arg_parser(prog="python -m eval.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="compute only shard I of N (0-based; split by SafeMT id) and write no report; "
        "run again without --shard to merge the shards' caches and write the report",
    )
    parser.add_argument(
        "--thresholds-only",
        action="store_true",
        help="only score the validation split and fix each moderator's decision threshold (run once before "
        "the shards, so each need not score all of it) and write no report",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # --shard is checked before the config, so a bad one is named even when the config has problems too.
        shard_flag = _shard_flag(argv)
        shard = Shard.parse(shard_flag) if shard_flag is not None else None
        config, args = parse_eval_args(argv, parser)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = None
    if config.wandb:
        import wandb

        run = wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=config.to_dict())
    if args.thresholds_only and shard is not None:
        print("error: --thresholds-only fixes the thresholds of the whole run: give no --shard", file=sys.stderr)
        return 2
    try:
        if args.thresholds_only:
            thresholds = EvalRun(config).fix_thresholds()
            for defence, choice in thresholds.items():
                print(f"{defence}: decision threshold {choice['threshold']:.6g} ({choice['source']})")
            print(f"thresholds fixed in {config.out_dir}/cache/ ({len(thresholds)} moderator defences); no report")
            return 0
        report = run_eval(config) if shard is None else run_eval(config, shard=shard)
    except OutDirLockedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 4
    except JudgeFailureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        if run is not None:
            run.finish()
    if shard is not None:
        computed = ", ".join(f"{n} {stage}" for stage, n in report["computed"].items())
        print(
            f"shard {report['shard']}: {report['samples']} samples, {report['test_split_rows']} test-split rows; "
            f"computed {computed} into {report['cache']}; no report written (run without --shard for it)"
        )
        return 0
    print(f"report: {config.out_dir}/report.md")
    for defence, choice in (report.get("thresholds") or {}).items():
        print(f"{defence}: decision threshold {choice['threshold']:.6g} ({choice['source']}: {choice['detail']})")
    for target, defences in report["results"].items():
        for defence, summary in defences.items():
            asr = {k: v for k, v in (summary["asr"] or {}).items() if summary["n_labelled"].get(k)}
            si = summary["si"] if summary["si"] is not None else f"n/a ({summary.get('si_reason')})"
            print(f"{target} / {defence}: SI={si} ASR (lengths with data)={asr}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, user_errors=USER_ERRORS))
