"""Every entry point parses its configuration one way (``moderator.cli.parse_config``) and fails the same way.

A misspelt flag, or a misspelt key in a ``--config`` YAML file, is one line on stderr,
``error: ... (see PROG --help)``, naming the flag (or the file and the key), and exit code 2. Each case
runs the real entry point in a subprocess, as a user would; the errors come before any model is loaded
(most of a run is importing the libraries: ~12 s of CPU for ``train/sft.py``, a few s for the rest).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moderator.cli import USER_ERROR_EXIT_CODE
from tests.conftest import REPO_ROOT

QUIET = {"PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
SFT = str(REPO_ROOT / "train" / "sft.py")
TINY_RECIPE = REPO_ROOT / "configs" / "sft" / "tiny_cpu.yaml"
DATA_RECIPE = REPO_ROOT / "configs" / "data" / "demo.yaml"
EVAL_CONFIG = REPO_ROOT / "configs" / "eval" / "demo.yaml"
# The shape every entry point's line has: "error: <what is wrong> (see <prog> --help)".
SHAPE = re.compile(r"error: \S.* \(see (?P<prog>\S+( \S+)*) --help\)")


def _flag_cases(tmp: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (argv after the interpreter, the misspelt flag, the prog its line sends to ``--help``)."""
    return {
        "train": ([SFT, "--config", str(TINY_RECIPE), "--learning_rat", "1"], "--learning_rat", "train/sft.py"),
        "data_prep": (
            ["-m", "data_prep.build", "--config", str(DATA_RECIPE), "--benign_rati", "1", "--out", str(tmp / "d")],
            "--benign_rati",
            "python -m data_prep.build",
        ),
        "eval": (["-m", "eval.run", "--config", str(EVAL_CONFIG), "--limt", "2"], "--limt", "python -m eval.run"),
        "export": (
            ["-m", "export", "--checkpoint", str(tmp), "--out", str(tmp / "out"), "--equivalence-sample", "0"],
            "--equivalence-sample",
            "python -m export",
        ),
        "export_verify": (
            ["-m", "export", "verify", str(tmp), "--expect-manifest-sha", "0" * 64],
            "--expect-manifest-sha",
            "python -m export verify",
        ),
        "serve": (
            ["-m", "serve", str(tmp), "--max-pixels-in-fligth", "3", "--port", "1"],
            "--max-pixels-in-fligth",
            "python -m serve",
        ),
    }


def _yaml_cases(tmp: Path) -> dict[str, tuple[list[str], Path, str]]:
    """name -> (argv, the config file, its misspelt key): a key that is no field of the entry point."""
    train = tmp / "train.yaml"
    train.write_text(TINY_RECIPE.read_text() + "\nlearnig_rate: 1.0e-4\n")
    data = tmp / "data.yaml"
    data.write_text(DATA_RECIPE.read_text() + "\nbenign_ration: 2\n")
    serve = tmp / "serve.yaml"
    serve.write_text(f"export_dir: {tmp}\nport: 1\nmax_pixels_in_fligth: 3\n")
    export = tmp / "export.yaml"
    export.write_text(f"checkpoint: {tmp}\nout: {tmp / 'out'}\nequivalence_sample: 0\n")
    return {
        "train_yaml": ([SFT, "--config", str(train)], train, "learnig_rate"),
        "data_prep_yaml": (["-m", "data_prep.build", "--config", str(data)], data, "benign_ration"),
        "serve_yaml": (["-m", "serve", "--config", str(serve)], serve, "max_pixels_in_fligth"),
        "export_yaml": (["-m", "export", "--config", str(export)], export, "equivalence_sample"),
    }


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **QUIET}
    env.pop("SAFEMT_DEBUG", None)
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("entry-points")
    argvs = {name: case[0] for name, case in {**_flag_cases(tmp), **_yaml_cases(tmp)}.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, argv) for name, argv in argvs.items()}
        return {name: future.result() for name, future in futures.items()}


def _the_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


FLAG_CASES = ["train", "data_prep", "eval", "export", "export_verify", "serve"]


@pytest.mark.parametrize("case", FLAG_CASES)
def test_a_misspelt_flag_is_one_line_naming_it_and_exit_2(runs, case, tmp_path):
    _, flag, _ = _flag_cases(tmp_path)[case]
    line = _the_line(runs[case])
    assert flag in line, line


@pytest.mark.parametrize("case", FLAG_CASES)
def test_every_entry_points_line_has_the_same_shape(runs, case, tmp_path):
    _, flag, prog = _flag_cases(tmp_path)[case]
    line = _the_line(runs[case])
    match = SHAPE.fullmatch(line)
    assert match and match["prog"] == prog, line
    assert line.startswith("error: unrecognized arguments: " + flag), line


def test_a_misspelt_flag_is_answered_with_the_closest_field(runs):
    line = _the_line(runs["serve"])
    assert "did you mean --max-pixels-in-flight?" in line, line
    line = _the_line(runs["train"])
    assert "did you mean --learning_rate?" in line, line


@pytest.mark.parametrize("case", ["train_yaml", "data_prep_yaml", "serve_yaml", "export_yaml"])
def test_a_misspelt_config_key_is_one_line_naming_the_file_and_the_key(runs, case, tmp_path):
    key = _yaml_cases(tmp_path)[case][2]
    line = _the_line(runs[case])
    assert SHAPE.fullmatch(line), line
    assert line.startswith(f"error: {runs[case].args[-1]}: unknown key {key!r}"), line
