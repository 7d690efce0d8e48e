"""Defences, judges, targets and guards are built from one registry per family, and the config accepts its names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from eval import config as eval_config
from eval.defences import DEFENCES, DefenceKind, NoDefence, defence_settings, load_defence
from eval.guards import GUARD_KINDS, load_guard
from eval.judge import JUDGES, OpenAIJudge, RefusalMatchJudge, judge_settings, load_judge
from eval.stages.generation import workload_chunk
from eval.targets import TARGETS, HFChatModel, VLLMChatModel, load_target


def test_the_config_accepts_exactly_the_registered_kinds():
    assert eval_config.DEFENCE_KINDS == tuple(DEFENCES) == ("none", "guard", "moderator")
    assert eval_config.JUDGE_KINDS == tuple(JUDGES) == ("openai", "local", "refusal_match")
    assert eval_config.TARGET_BACKENDS == tuple(TARGETS) == ("hf", "vllm")


def test_an_unknown_kind_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"defence kind 'shield' is not one of none, guard, moderator$"):
        load_defence(SimpleNamespace(kind="shield", label="shield"))
    with pytest.raises(ValueError, match=r"judge.kind 'oracle' is not one of openai, local, refusal_match$"):
        load_judge(SimpleNamespace(kind="oracle"))
    with pytest.raises(ValueError, match=r"target backend 'tgi' is not one of hf, vllm$"):
        load_target(SimpleNamespace(backend="tgi"))
    with pytest.raises(ValueError, match="unknown guard kind 'nemo'; known kinds: " + ", ".join(sorted(GUARD_KINDS))):
        load_guard("nemo", "unused")


def test_a_registered_defence_kind_is_built_and_keyed_through_its_entry(monkeypatch):
    built = []

    def build(config, taxonomy):
        built.append(config.label)
        return NoDefence(config.label)

    monkeypatch.setitem(DEFENCES, "echo", DefenceKind(build, lambda config, threshold: {"model": config.model}))
    config = SimpleNamespace(kind="echo", label="echo", model="m")
    assert isinstance(load_defence(config), NoDefence) and built == ["echo"]
    assert defence_settings(config) == {"kind": "echo", "model": "m"}


def test_the_registries_hold_the_classes_the_stages_ask():
    assert JUDGES["openai"].judge_class is OpenAIJudge and JUDGES["openai"].judge_class.streams_answers
    assert JUDGES["refusal_match"].judge_class is RefusalMatchJudge and not RefusalMatchJudge.streams_answers
    assert judge_settings(SimpleNamespace(kind="refusal_match")) == {"kind": "refusal_match", "prompt_version": "2"}
    assert (TARGETS["hf"].model_class, TARGETS["vllm"].model_class) == (HFChatModel, VLLMChatModel)
    # A vLLM target gets workload_chunk requests per call, an HF one batch_size (also through a stub loader).
    config = SimpleNamespace(workload_chunk=1024, batch_size=4)
    assert workload_chunk(config, SimpleNamespace(backend="vllm"), object()) == 1024
    assert workload_chunk(config, SimpleNamespace(backend="hf"), object()) == 4
    assert workload_chunk(config, SimpleNamespace(backend="hf"), SimpleNamespace(batches_internally=True)) == 1024
