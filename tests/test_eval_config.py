"""The eval's one config convention: ``--config FILE.yaml`` + ``--field value`` (TrlParser) + dotted nested keys.

Pure parsing: no model is loaded, so every test here takes milliseconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from eval.config import NESTED_FIELDS, ConfigError, EvalConfig, eval_arg_parser, load_config, parse_eval_args

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "configs" / "eval" / "demo.yaml"
SHIPPED = sorted((REPO_ROOT / "configs" / "eval").glob("*.yaml"))
TOP_LEVEL = [f for f in dataclasses.fields(EvalConfig) if f.name not in NESTED_FIELDS]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_with_its_yaml_values(path):
    data = yaml.safe_load(path.read_text())
    config = load_config(path)
    for key, value in data.items():
        if key not in NESTED_FIELDS:
            assert getattr(config, key) == value, key  # the YAML beats the dataclass default
    assert [t.model for t in config.targets] == [t["model"] for t in data["targets"]]
    assert [d.kind for d in config.defences] == [d["kind"] for d in data["defences"]]
    assert config.judge.kind == data["judge"]["kind"]


def test_flags_override_top_level_and_nested_fields_with_their_types():
    config = load_config(
        DEMO,
        ["--limit", "2", "--out_dir", "elsewhere", "--wandb", "--turns", "1", "2"]
        + ["--judge.kind=local", "--defences.2.threshold", "0.4", "--targets.0.dtype", "float32"],
    )
    assert config.limit == 2 and isinstance(config.limit, int)  # typed by the parser, not a string
    assert config.out_dir == "elsewhere" and config.wandb is True and config.turns == [1, 2]
    assert config.judge.kind == "local" and config.defences[2].threshold == 0.4
    assert config.targets[0].dtype == "float32" and config.targets[0].model == "runs/demo/base"
    assert config.benign_limit == 4  # untouched fields keep the YAML's value


def test_the_yaml_style_values_launchers_and_tests_pass_still_parse():
    # tests/test_judge.py passes --turns "[1, 2, 6]"; null unsets a field that may be null, as in YAML.
    config = load_config(DEMO, ["--turns", "[1, 2]", "--limit", "null", "--wandb", "false", "--no_turns_to_detection"])
    assert config.turns == [1, 2] and config.limit is None and config.wandb is False
    assert config.turns_to_detection is False


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--limt", "3"], "--limt"),  # misspelt top-level field
        (["--max_new", "5"], "--max_new"),  # an abbreviation must not silently pick --max_new_tokens
        (["--targets.0.modle", "x"], "targets.0.modle"),  # misspelt nested field
        (["--judge.temprature", "0.1"], "judge.temprature"),
        (["--limit", "abc"], "--limit"),  # a value of the wrong type (once a TypeError in validate)
    ],
)
def test_a_bad_flag_is_an_error_naming_it(flags, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(DEMO, flags)


@pytest.mark.parametrize(
    "typo, named",
    [
        ({"limt": 3}, r"unknown key 'limt'; did you mean 'limit'\?"),
        ({"judge": {"kind": "refusal_match", "modle": "x"}}, r"unknown key\(s\) \['judge.modle'\]"),
    ],
)
def test_a_yaml_typo_is_an_error_naming_file_and_field(tmp_path, typo, named):
    data = yaml.safe_load(DEMO.read_text())
    data.update(typo)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"{path}: {named}"):
        load_config(path)


def test_help_lists_every_top_level_field_with_its_help_and_the_nested_keys():
    text = " ".join(eval_arg_parser().format_help().split())  # unwrap argparse's line breaks
    for f in TOP_LEVEL:
        assert f"--{f.name}" in text, f.name
        assert f.metadata.get("help"), f"EvalConfig.{f.name} has no help text"
        assert " ".join(f.metadata["help"].split())[:40] in text, f.name
    for key in ("--targets.I.FIELD", "--defences.I.FIELD", "--judge.FIELD"):
        assert key in text


def test_eval_run_reports_a_misspelt_field_as_one_line_and_exit_2(capsys):
    from eval.run import main

    assert main(["--config", str(DEMO), "--judge.modle", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "judge.modle" in err and err.startswith("error: ")
    assert main(["--shard", "0/2", "--limit", "1"]) == 2  # no --config
    assert "--config FILE.yaml is required" in capsys.readouterr().err


def test_run_flags_come_back_beside_the_config():
    parser = eval_arg_parser()
    parser.add_argument("--shard")
    config, options = parse_eval_args(["--config", str(DEMO), "--shard", "1/2", "--limit", "1"], parser)
    assert options.shard == "1/2" and options.config == str(DEMO) and config.limit == 1
