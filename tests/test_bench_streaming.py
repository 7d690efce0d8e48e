"""``python -m bench.streaming --quick`` (issue 14, item 6) runs end to end on the tiny model."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("uvicorn")


def test_quick_streaming_benchmark_prints_both_ratios_and_loses_no_request(tiny_model_dir, capsys):
    # Bugs caught: the benchmark broken by an API change (moderate_turns, the serve app, export), a
    # request lost or refused under concurrent load, a one pass that still runs the scoring forward
    # (falls back: two prefills), reuse that prefills as much as recomputing, or the last line
    # not printed last.
    from bench.streaming import main

    assert main(["--quick", "--model", str(tiny_model_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    speed_up = re.fullmatch(r"one-pass speed-up = ([0-9.]+)×", lines[-2])
    cost_ratio = re.fullmatch(r"per-turn cost ratio at 8 turns = ([0-9.]+)", lines[-1])
    assert speed_up and cost_ratio, lines[-2:]
    assert float(speed_up[1]) > 0 and float(cost_ratio[1]) > 0
    assert "service requests lost = 0 of 6" in lines

    table = {row.split("|")[1].strip(): row.split("|")[2:4] for row in lines if row.startswith("| (")}
    one_pass = next(v for k, v in table.items() if k.startswith("(b) one pass"))
    two_pass = next(v for k, v in table.items() if k.startswith("(b) two passes"))
    assert one_pass[1].strip() == "1 prefill(s)/batch" and two_pass[1].strip() == "2 prefill(s)/batch"
    assert "verdict prefix generated: yes" in next(v for k, v in table.items() if "speed-up" in k)[1]
    reuse, recompute = (
        int(re.match(r"\s*(\d+) tokens prefilled", v[1])[1])
        for k, v in table.items()
        if k.startswith(("(a) reuse", "(a) recompute"))
    )
    assert 0 < reuse < recompute / 2  # 8 turns: the transcript prefix is not prefilled again


def test_the_benchmark_dialogue_is_a_valid_safemt_dialogue_at_every_service_prefix():
    # Bug caught: repeating the 4-turn sample put two user turns together; the service refused those
    # prefixes with 422 and the full load lost half its requests (the quick load never reached them).
    from bench.streaming import long_dialogue
    from moderator.schema import validate_dialogue

    dialogue = long_dialogue(8)
    assert sum(m["role"] == "user" for m in dialogue) == 8
    for end, message in enumerate(dialogue):
        if message["role"] == "user":
            validate_dialogue(dialogue[: end + 1], None)
