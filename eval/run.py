"""Run the SafeMT evaluation: ``python -m eval.run --config configs/eval/demo.yaml [--key value ...]``.

Every config key can be overridden (``--limit 3``, ``--judge.kind local``, ``--targets.0.model DIR``);
see ``eval/config.py``. The loop itself lives in ``eval/loop.py``; results resume from
``<out_dir>/cache/`` and the report lands in ``<out_dir>/report.{json,md}`` and ``asr_vs_turns.png``.

Exit codes: 0 done; 2 bad config or input data; 3 more than ``max_judge_failure_share`` of the judge
calls gave no verdict (the report is still written; failed calls are asked again on the next run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eval.config import ConfigError, load_config
from eval.judge import JudgeFailureError
from eval.loop import EvalDataError, run_eval


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/eval/*.yaml)")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = None
    if config.wandb:
        import wandb

        run = wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=config.to_dict())
    try:
        report = run_eval(config)
    except EvalDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except JudgeFailureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        if run is not None:
            run.finish()
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
    raise SystemExit(main())
