"""Issue #21, the eval's and provenance's part: where the judge's API key may go (7), one-line errors
for malformed YAML in overrides (17), dash-spelled secret flags (18), and export pinning in eval configs.

Pure config parsing and monkeypatched loaders: no model is loaded, no request leaves the process.
"""

from __future__ import annotations

import pytest
import yaml

from eval.config import ConfigError, DefenceConfig, JudgeConfig, load_config
from tests.test_eval_config import DEMO
from train.provenance import REDACTED, redact, redact_argv

SHA = "ab" * 32


def _config_with(tmp_path, judge=None, defences=None):
    """The demo config with its judge (or defence list) replaced, written to a YAML file."""
    data = yaml.safe_load(DEMO.read_text())
    if judge is not None:
        data["judge"] = judge
    if defences is not None:
        data["defences"] = defences
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- 7: the judge's API key goes only to hosts the config allows, never over plain http ---------------


@pytest.mark.parametrize(
    "judge, field, reason",
    [
        # a key sent over plain http to a host on the network
        ({"base_url": "http://judge.example.com/v1"}, "judge.base_url", "plain http"),
        ({"base_url": "http://10.0.0.7:8000/v1"}, "judge.base_url", "plain http"),
        # the default key (OPENAI_API_KEY) to a host nobody listed
        ({"base_url": "https://collector.example.net/v1"}, "judge.base_url", "api_key_hosts"),
        # a look-alike of an allowed host
        ({"base_url": "https://api.openai.com.example.net/v1"}, "judge.base_url", "api_key_hosts"),
        # any environment variable as the bearer token
        ({"api_key_env": "AWS_SECRET_ACCESS"}, "judge.api_key_env", "_API_KEY"),
        ({"api_key_env": "HOME"}, "judge.api_key_env", "_API_KEY"),
        ({"api_key_env": "PATH; rm"}, "judge.api_key_env", "_API_KEY"),
        # credentials in the URL itself would land in config dumps and cache keys
        ({"base_url": "https://user:pw@api.openai.com/v1"}, "judge.base_url", "credentials"),
        ({"base_url": "ftp://api.openai.com/v1"}, "judge.base_url", "http"),
        ({"base_url": "api.openai.com/v1"}, "judge.base_url", "http"),
        ({"api_key_hosts": ["https://api.openai.com"]}, "judge.api_key_hosts", "host name"),
    ],
)
def test_the_judge_key_goes_only_to_allowed_hosts_over_https(tmp_path, judge, field, reason):
    path = _config_with(tmp_path, judge={"kind": "openai", "model": "gpt-4o-mini", **judge})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and f"{field}:" in message and reason in message, message


@pytest.mark.parametrize(
    "judge",
    [
        {},  # the hosted API with OPENAI_API_KEY
        {"base_url": "https://api.openai.com/v1"},
        {"base_url": "http://127.0.0.1:8000/v1"},  # a local vLLM server: plain http on loopback is fine
        {"base_url": "http://localhost:8000/v1"},
        {"base_url": "http://[::1]:8000/v1"},
        {"base_url": "https://judge.internal.example/v1", "api_key_hosts": ["judge.internal.example"]},
        {"base_url": "https://judge.internal.example/v1", "api_key_env": None},  # no key sent at all
        {"api_key_env": "MY_JUDGE_TOKEN"},
        {"api_key_env": "AZURE_OPENAI_KEY"},
    ],
)
def test_allowed_judge_endpoints_load(tmp_path, judge):
    config = load_config(_config_with(tmp_path, judge={"kind": "openai", "model": "gpt-4o-mini", **judge}))
    assert config.judge.kind == "openai"


def test_the_endpoint_rules_apply_to_overrides_and_only_to_the_openai_judge(tmp_path):
    with pytest.raises(ConfigError, match=r"judge\.base_url: .*plain http"):
        load_config(DEMO, ["--judge.kind", "openai", "--judge.base_url", "http://judge.example.com/v1"])
    # A local or keyword judge sends nothing anywhere: its (unused) base_url is not checked.
    assert load_config(DEMO, ["--judge.base_url", "http://judge.example.com/v1"]).judge.kind == "refusal_match"


def test_the_judge_itself_refuses_a_key_for_a_host_not_allowed(monkeypatch):
    # Built directly (not through a config), OpenAIJudge applies the same rule before any request.
    from eval.judge import OpenAIJudge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leave-0123456789")
    with pytest.raises(ValueError, match="api_key_hosts") as caught:
        OpenAIJudge(model="m", base_url="https://collector.example.net/v1")
    assert "sk-must-not-leave" not in str(caught.value)
    with pytest.raises(ValueError, match="plain http"):
        OpenAIJudge(model="m", base_url="http://judge.example.com/v1", api_key_hosts=["judge.example.com"])
    # The openai client's own OPENAI_BASE_URL is the endpoint when base_url is null: checked as well.
    monkeypatch.setenv("OPENAI_BASE_URL", "https://collector.example.net/v1")
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        OpenAIJudge(model="m")


def test_api_key_env_null_sends_no_key_even_when_openai_api_key_is_set(monkeypatch):
    from eval.judge import OpenAIJudge, load_judge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leave-0123456789")
    judge = OpenAIJudge(model="m", base_url="https://judge.internal.example/v1", api_key_env=None)
    assert judge.client.api_key == "EMPTY"  # the openai client would otherwise read OPENAI_API_KEY itself
    judge.close()
    # Loopback gets the key (a local server that checks one), and so does a host listed in api_key_hosts.
    judge = load_judge(JudgeConfig(kind="openai", model="m", base_url="http://127.0.0.1:9/v1"))
    assert judge.client.api_key == "sk-must-not-leave-0123456789"
    judge.close()
    listed = JudgeConfig(kind="openai", model="m", base_url="https://j.example/v1", api_key_hosts=["j.example"])
    judge = load_judge(listed)
    assert judge.client.api_key == "sk-must-not-leave-0123456789" and str(judge.client.base_url).startswith("https://j")
    judge.close()


def test_eval_run_names_a_disallowed_judge_endpoint_in_one_line_exit_2(capsys):
    from eval.run import USER_ERRORS, main
    from moderator.cli import run_cli

    argv = ["--config", str(DEMO), "--judge.kind", "openai", "--judge.base_url", "https://collector.example.net/v1"]
    assert run_cli(main, argv, user_errors=USER_ERRORS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "judge.base_url" in err


# -- 17: malformed YAML in an override is one line naming the flag, exit 2 ----------------------------


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--turns", "[1,"], "--turns"),
        (["--judge.model", "[unclosed"], "judge.model"),
        (["--defences.1.options", "{a: 1"], "defences.1.options"),
        (["--targets.0.model=[x"], "targets.0.model"),
    ],
)
def test_malformed_yaml_in_an_override_is_a_config_error_naming_the_flag(flags, named):
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, flags)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and named in message and "YAML" in message, message


@pytest.mark.parametrize("flags", [["--turns", "[1,"], ["--judge.model", "[unclosed"]])
def test_eval_run_reports_malformed_yaml_in_an_override_as_one_line_and_exit_2(capsys, flags):
    # As `python -m eval.run` runs main: through run_cli, which lets anything but a user error through.
    from eval.run import USER_ERRORS, main
    from moderator.cli import run_cli

    assert run_cli(main, ["--config", str(DEMO), *flags], user_errors=USER_ERRORS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and flags[0].lstrip("-") in err, err


# -- 18: dash-spelled secret flags are redacted too ---------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--hub-token", "plainvalue1"], ["--hub-token", REDACTED]),
        (["--hub-token=plainvalue1"], [f"--hub-token={REDACTED}"]),
        (["--api-key", "plainvalue2"], ["--api-key", REDACTED]),
        (["--api-key=plainvalue2"], [f"--api-key={REDACTED}"]),
        (["--wandb-api-key", "plainvalue3"], ["--wandb-api-key", REDACTED]),
        (["--wandb-api-key=plainvalue3"], [f"--wandb-api-key={REDACTED}"]),
        (["--hub_token", "plainvalue4"], ["--hub_token", REDACTED]),  # the underscore spelling still works
        (["--hub_token=plainvalue4"], [f"--hub_token={REDACTED}"]),
        (["--hub-access-token", "v"], ["--hub-access-token", REDACTED]),
        (["--HUB-TOKEN", "v"], ["--HUB-TOKEN", REDACTED]),
    ],
)
def test_redact_argv_redacts_dash_and_underscore_spellings(argv, expected):
    prefix, suffix = ["train/sft.py", "--config", "c.yaml"], ["--learning-rate", "1e-4", "--pad-token", "<pad>"]
    assert redact_argv([*prefix, *argv, *suffix]) == [*prefix, *expected, *suffix]


def test_redact_treats_dash_spelled_keys_as_secret_names():
    assert redact({"hub-token": "plain", "wandb-api-key": "plain", "pad-token": "<pad>"}) == {
        "hub-token": REDACTED,
        "wandb-api-key": REDACTED,
        "pad-token": "<pad>",
    }


# -- export pinning: expect_manifest_sha256 / verify on a moderator defence ---------------------------


def _record_from_pretrained(monkeypatch):
    from moderator.inference import Moderator

    calls = []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        return object()

    monkeypatch.setattr(Moderator, "from_pretrained", staticmethod(fake))
    return calls


def test_a_pinned_manifest_digest_is_passed_to_the_moderator_load(monkeypatch):
    from eval.defences import load_defence

    calls = _record_from_pretrained(monkeypatch)
    config = load_config(DEMO, ["--defences.2.expect_manifest_sha256", SHA.upper()])
    defence = load_defence(config.defences[2])
    ((path, kwargs),) = calls
    assert path == "runs/demo/export" and defence.name == "moderator"
    assert kwargs["expect_manifest_sha256"] == SHA and kwargs["verify"] is True  # lower-cased hex
    # Unpinned: nothing changes (verify stays on, no pin asked for).
    calls.clear()
    load_defence(config.defences[3])
    assert calls[0][1]["verify"] is True and calls[0][1].get("expect_manifest_sha256") is None


def test_verify_false_is_explicit_and_passed_through(monkeypatch):
    from eval.defences import load_defence

    calls = _record_from_pretrained(monkeypatch)
    config = load_config(DEMO, ["--defences.2.verify", "false"])
    assert config.defences[2].verify is False and config.defences[3].verify is True
    load_defence(config.defences[2])
    assert calls[0][1]["verify"] is False


@pytest.mark.parametrize(
    "flags, field, reason",
    [
        (["--defences.2.expect_manifest_sha256", "abc"], "defences.2.expect_manifest_sha256", "64 hex"),
        (["--defences.2.expect_manifest_sha256", "g" * 64], "defences.2.expect_manifest_sha256", "64 hex"),
        (["--defences.2.expect_manifest_sha256", "12345"], "defences.2.expect_manifest_sha256", "64 hex"),
        (["--defences.1.expect_manifest_sha256", SHA], "defences.1.expect_manifest_sha256", "moderator"),
        (["--defences.2.verify", "'no'"], "defences.2.verify", "true or false"),
        (["--defences.0.verify", "false"], "defences.0.verify", "moderator"),
        (
            ["--defences.2.verify", "false", "--defences.2.expect_manifest_sha256", SHA],
            "defences.2.expect_manifest_sha256",
            "verify",
        ),
    ],
)
def test_pinning_fields_are_validated_at_load_naming_the_field(flags, field, reason):
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, flags)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and f"{field}:" in message and reason in message, message


def test_pinning_fields_have_safe_defaults():
    defence = DefenceConfig(kind="moderator", model="m")
    assert defence.expect_manifest_sha256 is None and defence.verify is True


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf")])
def test_a_guard_with_a_non_finite_score_flags_whatever_its_answer_says(score):
    # Issue 21, item 10 on the guard side: `NaN >= threshold` is False, so a broken score passed as "safe".
    from types import SimpleNamespace

    from eval.guards.base import GenerativeGuard, GuardResult

    said_safe = GuardResult(flagged=False, categories=(), score=None, parse_error=False, raw="safe")
    result = GenerativeGuard.apply_threshold(SimpleNamespace(threshold=0.5), said_safe, score)
    assert result.flagged is True
    assert GenerativeGuard.apply_threshold(SimpleNamespace(threshold=0.5), said_safe, 0.2).flagged is False
