"""Command-line errors a user can fix are one ``error:`` line on stderr, a non-zero exit and no traceback.

The cases named in the issue run the real entry point in a subprocess, as a user would, started
together (most of each run is importing torch/transformers/TRL, ~9 s of CPU for train/sft.py); the
other ``train/sft.py`` cases go through the same ``run_cli(main)`` in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moderator.cli import USER_ERROR_EXIT_CODE, InputError, MissingInputError, UsageError, run_cli
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.taxonomy import load_taxonomy
from tests.conftest import REPO_ROOT, SAMPLE_DIR, copy_sample_with_images

SFT = str(REPO_ROOT / "train" / "sft.py")
TINY_RECIPE = str(REPO_ROOT / "configs" / "sft" / "tiny_cpu.yaml")
# Libraries still emit FutureWarnings on stderr (PEFT asks for transformers' deprecated
# `is_gradient_checkpointing`); those warnings are not what these tests are about.
# Progress bars (eval's per-defence bars) also go to stderr before a late error; they are not it either.
QUIET = {"PYTHONWARNINGS": "ignore::FutureWarning", "TQDM_DISABLE": "1"}


def _stats(taxonomy_ids: list[str]) -> dict:
    taxonomy = load_taxonomy()
    return {
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "taxonomy": {**taxonomy.provenance(), "taxonomy_ids": taxonomy_ids},
    }


def _dataset_with_an_empty_train_split(folder: Path) -> Path:
    """A prepared-dataset folder whose stats fit this code but whose splits hold no rows."""
    import datasets

    folder.mkdir()
    (folder / "stats.json").write_text(json.dumps(_stats(load_taxonomy().ids)))
    features = datasets.Features({"id": datasets.Value("string"), "images": datasets.List(datasets.Value("string"))})
    empty = datasets.Dataset.from_dict({"id": [], "images": []}, features=features)
    # One (empty) shard a split: datasets cannot load a split saved with no shard at all.
    datasets.DatasetDict(train=empty, validation=empty).save_to_disk(
        str(folder / "dataset"), num_shards={"train": 1, "validation": 1}
    )
    return folder


def _cases(tmp: Path) -> dict[str, tuple[list[str], Path, str]]:
    """name -> (argv after the interpreter, working directory, the expected stderr line)."""
    other_taxonomy = tmp / "other-taxonomy"
    other_taxonomy.mkdir()
    (other_taxonomy / "stats.json").write_text(json.dumps(_stats(["scams", *load_taxonomy().ids[1:]])))
    empty = _dataset_with_an_empty_train_split(tmp / "empty")
    misspelt_config = tmp / "misspelt.yaml"
    misspelt_config.write_text(Path(TINY_RECIPE).read_text() + "\nlearnig_rate: 1.0e-4\n")
    fresh_clone = tmp / "clone"
    fresh_clone.mkdir()
    eval_config, broken_cache = _eval_inputs(tmp)
    return {
        # The documented first command, run before `make demo` (no runs/ yet).
        "sft_before_make_demo": (
            [SFT, "--config", TINY_RECIPE],
            fresh_clone,
            "error: runs/demo/data not found: run `make demo` or "
            "`python -m data_prep.build --config configs/data/demo.yaml` first",
        ),
        "sft_missing_dataset": (
            [SFT, "--config", TINY_RECIPE, "--dataset_path", str(tmp / "nope")],
            REPO_ROOT,
            f"error: {tmp / 'nope'} not found: build it first with "
            f"`python -m data_prep.build --config configs/data/<recipe>.yaml --out {tmp / 'nope'}`",
        ),
        "sft_taxonomy_mismatch": (
            [SFT, "--config", TINY_RECIPE, "--dataset_path", str(other_taxonomy)],
            REPO_ROOT,
            f"error: {other_taxonomy / 'stats.json'}: data built with other taxonomy categories than "
            f"{REPO_ROOT / 'configs/policies/safemt.yaml'}; rebuild the dataset or pass --taxonomy_path",
        ),
        "sft_misspelt_flag": (
            [SFT, "--config", TINY_RECIPE, "--learnig_rate", "1e-4"],
            REPO_ROOT,
            "error: unrecognized arguments: --learnig_rate 1e-4; did you mean --learning_rate? "
            "(see train/sft.py --help)",
        ),
        "sft_misspelt_config_field": (
            [SFT, "--config", str(misspelt_config)],
            REPO_ROOT,
            f"error: {misspelt_config}: unknown key 'learnig_rate'; did you mean 'learning_rate'? "
            "(see train/sft.py --help)",
        ),
        # TRL used to fail on this with a bare StopIteration.
        "sft_empty_training_split": (
            [SFT, "--config", TINY_RECIPE, "--dataset_path", str(empty)],
            REPO_ROOT,
            f"error: {empty}: split 'train' has no rows (see its stats.json and quarantine.jsonl)",
        ),
        "export_unknown_flag": (
            ["-m", "export", "--checkpoint", str(tmp), "--out", str(tmp / "out"), "--bogus"],
            REPO_ROOT,
            "error: unrecognized arguments: --bogus (see python -m export --help)",
        ),
        "export_missing_required_flag": (
            ["-m", "export", "--out", str(tmp / "out")],
            REPO_ROOT,
            "error: the following arguments are required: --checkpoint (see python -m export --help)",
        ),
        "eval_missing_model": (
            ["-m", "eval.run", "--config", str(eval_config)],
            REPO_ROOT,
            f"error: {tmp / 'no-such-model'}: model directory not found",
        ),
        "eval_broken_cache_line": (
            ["-m", "eval.run", "--config", str(eval_config), "--out_dir", str(broken_cache.parent.parent)],
            REPO_ROOT,
            f"error: {broken_cache}:1: unreadable cache line (Expecting value: line 1 column 1 (char 0))",
        ),
        "data_prep_missing_processor": (
            [
                "-m",
                "data_prep.build",
                "--config",
                str(REPO_ROOT / "configs/data/demo.yaml"),
                "--processor",
                str(tmp / "no-such-processor"),
                "--out",
                str(tmp / "data"),
            ],
            REPO_ROOT,
            f"error: processor {str(tmp / 'no-such-processor')!r}: no such model directory",
        ),
        "inference_missing_model": (
            [
                "-m",
                "moderator.inference",
                "--model",
                str(tmp / "no-such-moderator"),
                "--safemt-file",
                str(SAMPLE_DIR / "1_turn.json"),
            ],
            REPO_ROOT,
            f"error: {tmp / 'no-such-moderator'}: moderator directory not found",
        ),
        # Used to print "0 placeholder images" and exit 0.
        "images_copy_from_missing": (
            ["-m", "tiny_models.images", str(tmp / "images"), "--copy-from", str(tmp / "nope")],
            REPO_ROOT,
            f"error: --copy-from {tmp / 'nope'}: no <k>_turn.json files there (is it a SafeMT Data folder?) "
            "(see python -m tiny_models.images --help)",
        ),
    }


def _eval_inputs(tmp: Path) -> tuple[Path, Path]:
    """An eval config over the SafeMT sample whose target model does not exist, and a damaged cache file."""
    safemt = copy_sample_with_images(tmp / "safemt")
    config = tmp / "eval.yaml"
    config.write_text(
        f"safemt_dir: {safemt}\nturns: [1]\nlimit: 1\nout_dir: {tmp / 'eval'}\n"
        f"targets: [{{model: {tmp / 'no-such-model'}}}]\ndefences: [{{kind: none}}]\n"
        "judge: {kind: refusal_match, refusal_check: heuristic}\n"
    )
    # A cache line that is not JSON, before a good one: not a torn last write, so it must not be skipped.
    broken = tmp / "eval-broken" / "cache" / "decisions.jsonl"
    broken.parent.mkdir(parents=True)
    broken.write_text('not json\n{"defence": "none", "sig": "x", "id": "a", "k": 1, "benign": false}\n')
    return config, broken


def _run(argv: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **QUIET}
    env.pop("SAFEMT_DEBUG", None)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    tmp = tmp_path_factory.mktemp("cli-errors")
    cases = _cases(tmp)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, *cases[name][:2]) for name in SUBPROCESS_CASES}
        return {name: (future.result(), cases[name][2]) for name, future in futures.items()}


SUBPROCESS_CASES = [
    "sft_before_make_demo",
    "sft_misspelt_flag",
    "sft_empty_training_split",
    "export_unknown_flag",
    "export_missing_required_flag",
    "eval_missing_model",
    "eval_broken_cache_line",
    "images_copy_from_missing",
    "inference_missing_model",
    "data_prep_missing_processor",
]
IN_PROCESS_CASES = ["sft_missing_dataset", "sft_taxonomy_mismatch", "sft_misspelt_config_field"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_user_error_is_one_line_without_a_traceback(cli_runs, case):
    result, expected = cli_runs[case]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines() == [expected], result.stderr[-3000:]
    assert result.returncode == USER_ERROR_EXIT_CODE


@pytest.mark.parametrize("case", IN_PROCESS_CASES)
def test_sft_user_error_is_one_line(case, tmp_path, capsys, monkeypatch):
    from train.sft import main

    monkeypatch.delenv("SAFEMT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["train/sft.py"])
    argv, cwd, expected = _cases(tmp_path)[case]
    monkeypatch.chdir(cwd)
    capsys.readouterr()  # datasets' progress bars while the cases were written
    assert run_cli(main, argv[1:]) == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err.splitlines() == [expected]


def test_safemt_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = _run(["-m", "export", "--out", str(tmp_path), "--bogus"], REPO_ROOT, {"SAFEMT_DEBUG": "1"})
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert "Traceback" in result.stderr and "UsageError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: the following arguments are required: --checkpoint")


def test_run_cli_keeps_tracebacks_for_bugs_and_catches_only_user_errors(capsys, monkeypatch):
    monkeypatch.delenv("SAFEMT_DEBUG", raising=False)

    def fails_with(error: BaseException):
        def main(argv: list[str]) -> int:
            raise error

        return main

    for error in (UsageError("bad flag"), InputError("bad\ninput"), MissingInputError("x not found")):
        assert run_cli(fails_with(error), []) == USER_ERROR_EXIT_CODE
        assert capsys.readouterr().err.splitlines() == [f"error: {'; '.join(str(error).splitlines())}"]
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback is kept
        run_cli(fails_with(KeyError("oops")), [])
    with pytest.raises(ValueError):  # a plain ValueError from deep inside a library is not either
        run_cli(fails_with(ValueError("tensor shapes")), [])
    assert run_cli(fails_with(LookupError("listed")), [], user_errors=(LookupError,)) == USER_ERROR_EXIT_CODE
    assert run_cli(lambda argv: 3, ["a"]) == 3 and run_cli(lambda argv: None, []) == 0


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            None,
            "error: runs/demo/base not found: run `make demo` or `python -m tiny_models.moderator runs/demo/base` first",
        ),
        ("/nonexistent/model", "error: /nonexistent/model not found (no such folder, and not a Hugging Face Hub id)"),
    ],
)
def test_sft_with_a_missing_model_says_what_to_run(prepared_data_dir, tmp_path, capsys, monkeypatch, model, expected):
    from train.sft import main

    monkeypatch.delenv("SAFEMT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["train/sft.py"])
    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/demo/base (the tiny recipe's model)
    argv = ["--config", TINY_RECIPE, "--dataset_path", str(prepared_data_dir), "--output_dir", str(tmp_path / "out")]
    argv += ["--model_name_or_path", model] if model else []
    assert run_cli(main, argv) == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err.splitlines() == [expected]
