"""The export's model card (``README.md``): Hub front matter, output format, usage, limits, provenance, eval tables."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from export.manifest import MANIFEST_SHA256_PLACEHOLDER, TAXONOMY_FILE, ExportError
from moderator.contract import render_target
from moderator.taxonomy import Taxonomy

SAFEMT_LICENCE = "CC BY-NC 4.0"


def hub_id(name: str | None) -> str | None:
    """A Hub repo id, or None for a local path (a card must not advertise a path on the training machine)."""
    if not name or Path(name).exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return None
    return name


def _cell(value: Any) -> str:
    """Text safe inside a markdown table cell (a ``|`` in a LoRA target regex would split the row)."""
    return str(value).replace("|", "\\|")


def _demote_headings(markdown: str, levels: int = 2) -> str:
    return "\n".join(("#" * levels + line) if line.startswith("#") else line for line in markdown.splitlines())


def measured_at_sentence(report: Mapping[str, Any], shipped: float) -> str:
    """What threshold the report's tables were measured at; refuses tables of another threshold than ``shipped``."""
    thresholds = report.get("thresholds") or {}
    if not thresholds:
        return (
            "The evaluation ran no moderator defence: its tables show the targets without defence and with "
            "the baseline guards only."
        )
    values = {name: float(choice["threshold"]) for name, choice in thresholds.items()}
    other = {name: value for name, value in values.items() if not math.isclose(value, shipped, abs_tol=1e-9)}
    if other:
        raise ExportError(
            f"the eval report's tables were measured at thresholds {other}, but the card describes threshold {shipped}"
        )
    name = "moderator" if "moderator" in thresholds else sorted(thresholds)[0]
    choice = thresholds[name]
    return (
        f"Every table below was measured with the moderator flagging at P(unsafe) >= **{shipped:.6g}**, the "
        f"threshold this export ships (report field `thresholds.{name}`, source `{choice.get('source')}`: "
        f"{choice.get('detail')})."
    )


def render_model_card(
    manifest: Mapping[str, Any], taxonomy: Taxonomy, report: Mapping[str, Any] | None, serve_name: str
) -> str:
    """The HF model card: YAML front matter, what the moderator does, how to run it, limits, provenance, eval."""
    from huggingface_hub import ModelCardData

    from eval.report import render_markdown

    export_type = manifest["export_type"]
    base_id = manifest.get("base_model_id")
    card_data = ModelCardData(
        license=manifest["license"],
        base_model=base_id,
        base_model_relation={"adapter": "adapter", "merged": "finetune", "full": "finetune"}[export_type],
        library_name="peft" if export_type == "adapter" else "transformers",
        pipeline_tag="image-text-to-text",
        datasets=["HappyCorpse/SafeMT"],
        language=["en"],
        tags=["safety", "content-moderation", "guardrail", "multimodal", "multi-turn", "safemt"]
        + (["lora", "peft"] if manifest.get("adapter_config") else []),
    )
    threshold = manifest["decision_threshold"]
    equivalence = manifest.get("equivalence") or {}
    base_text = f"`{base_id}`" if base_id else f"a local base checkpoint (`{Path(manifest['base_model']).name}`)"
    categories = "\n".join(f"| `{s.id}` | {s.label} | {s.action} |" for s in taxonomy.scenarios)
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        "# SafeMT multi-turn multimodal dialogue moderator",
        "",
        f"A vision-language safety moderator fine-tuned from {base_text}"
        f"{' with LoRA' if manifest.get('adapter_config') else ''} on the SafeMT benchmark. It reads a whole multi-turn conversation, "
        "including the image attached to a user turn, and decides whether the user is building towards "
        "a harmful request, even when the request is spread over several innocent-looking turns.",
        "",
        {
            "merged": "This export holds the LoRA adapter **merged** into the base weights (safetensors): it loads "
            "with plain `transformers` and serves with vLLM, no PEFT needed.",
            "adapter": "This export holds the **LoRA adapter only**: the base model is loaded separately "
            f"({base_text}) and the adapter applied with PEFT.",
            "full": "This export holds the fully fine-tuned weights (safetensors).",
        }[export_type],
        "",
        "## Output format",
        "",
        "The moderator answers in exactly one of two forms (prompt format version "
        f"`{manifest['prompt_format_version']}`, defined in `moderator/contract.py`):",
        "",
        "```text",
        render_target("safe"),
        "```",
        "",
        "```text",
        render_target("unsafe", "<category id>", "<one sentence: the request the conversation is building towards>"),
        "```",
        "",
        "The verdict comes first, so **P(unsafe)** is read from the logits of the `safe` / `unsafe` token "
        f"after `verdict: `. The dialogue is flagged when P(unsafe) >= **{threshold:g}** (decision threshold; "
        f"source: {manifest['decision_threshold_source']}; recorded in `manifest.json`). An answer that does not "
        "parse is treated as unsafe with category `unknown` (fail-closed).",
        "",
        f"Categories (taxonomy version `{taxonomy.version}`, shipped as `{TAXONOMY_FILE}`; `refuse` = clearly "
        "harmful, `caution` = sensitive advice to answer carefully with a referral):",
        "",
        "| id | SafeMT scenario | action |",
        "|---|---|---|",
        categories,
        "",
        "## How to use",
        "",
        "With this repository's inference code (renders the prompt, reads P(unsafe), parses the verdict, "
        "and takes the threshold from `manifest.json`):",
        "",
        "```python",
        "from PIL import Image",
        "from moderator.inference import Moderator",
        "",
        f'moderator = Moderator.from_pretrained("{serve_name}", expect_manifest_sha256="{MANIFEST_SHA256_PLACEHOLDER}")',
        'dialogue = [{"role": "user", "content": "What is in this picture?"}]',
        'verdict = moderator.moderate(dialogue, [Image.open("photo.jpg")])',
        "print(verdict.verdict, verdict.category, verdict.intent, verdict.p_unsafe, verdict.policy)",
        "```",
        "",
    ]
    if export_type == "adapter":
        lines += [
            "With PEFT directly: load the base with `AutoModelForImageTextToText.from_pretrained(<base>)`, then "
            f'`PeftModel.from_pretrained(base, "{serve_name}")`, and `AutoProcessor.from_pretrained("{serve_name}")`. '
            "For vLLM, export the merged model (vLLM's LoRA support may not load a trained `lm_head` "
            "kept in `modules_to_save`).",
            "",
        ]
    else:
        lines += [
            "With plain `transformers` (build the prompt with `moderator.contract.render_moderator_messages`):",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            f'model = AutoModelForImageTextToText.from_pretrained("{serve_name}")',
            f'processor = AutoProcessor.from_pretrained("{serve_name}")',
            "```",
            "",
            "With vLLM (OpenAI-compatible server; not tested by this repository's CI):",
            "",
            "```bash",
            f"vllm serve {serve_name} --served-model-name safemt-moderator --dtype bfloat16 \\",
            "    --max-model-len 8192 --limit-mm-per-prompt '{\"image\": 4}'",
            "```",
            "",
            "Send the two messages rendered by `render_moderator_messages` (system prompt + transcript) with "
            "`temperature: 0`; for P(unsafe), ask for `logprobs` and read the `safe` / `unsafe` tokens after "
            "`verdict: `.",
            "",
        ]
    lines += [
        "## Intended use and limits",
        "",
        "- Intended: screening user conversations with a vision-language assistant (before the assistant "
        "answers, or on its replies), research on multi-turn jailbreaks, and as a defence in SafeMT evaluations.",
        "- Scope: the categories above, English dialogues, images attached to user turns, as in SafeMT. It "
        "was not trained for other harms, languages or modalities and may miss them.",
        "- It makes mistakes both ways. Pick the threshold from validation data for your own false-positive "
        "budget (`eval.metrics.threshold_for_fpr`), review high-stakes decisions with people, and do not use it as "
        "the only safeguard.",
        "- The `caution` categories (political, legal, financial, health) are about *how* to answer, not "
        "whether: a flag there should lead to a careful answer, not necessarily a refusal.",
        "- The `intent` line is a model guess at the underlying request; treat it as an explanation, not evidence.",
        "",
        "## Training data and licence",
        "",
        "Fine-tuned on dialogues from the SafeMT benchmark (Happy-Corpse/SafeMT, "
        f"[{SAFEMT_LICENCE}](https://creativecommons.org/licenses/by-nc/4.0/)) mixed with benign dialogues. "
        f"SafeMT is licensed for **non-commercial use only**, so this model is released under `{manifest['license']}`; "
        "credit the SafeMT authors. The base model's own licence also applies. SafeMT content is harmful on "
        "purpose (jailbreak prompts, hate speech, violence).",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| export type | {export_type} |",
        f"| base model | {_cell(base_id or Path(manifest['base_model']).name)} |",
        f"| taxonomy | version `{_cell(taxonomy.version)}`, sha256 `{taxonomy.sha256}` |",
        f"| prompt format version | `{_cell(manifest['prompt_format_version'])}` |",
        f"| training commit | `{_cell(((manifest.get('git') or {}).get('training') or {}).get('commit'))}` |",
        f"| data fingerprint | `{_cell(json.dumps(manifest.get('data_fingerprint'), sort_keys=True))}` |",
    ]
    adapter = manifest.get("adapter_config")
    if adapter:
        lines.append(
            f"| LoRA | r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, "
            f"targets `{_cell(adapter.get('target_modules'))}`, modules_to_save {_cell(adapter.get('modules_to_save'))} |"
        )
    if equivalence.get("skipped"):
        lines.append("| export check | skipped (`--equivalence-samples 0`) |")
    elif equivalence:
        lines.append(
            f"| export check | {equivalence['n']} dialogues ({_cell(equivalence['samples'])}): max P(unsafe) difference "
            f"{equivalence['max_abs_diff_p_unsafe']:.2e} (tolerance {equivalence['tolerance']:g}), identical "
            "generated verdicts, export loaded in a fresh process |"
        )
    lines += [
        "",
        "Every file's sha256 is in `manifest.json`; check a copy with `python -m export verify <dir>`.",
        "",
        "## Pinning this export",
        "",
        f"`manifest.json` sha256: `{MANIFEST_SHA256_PLACEHOLDER}`",
        "",
        "Whoever can replace a file of an export can rewrite its manifest too, so a copy that verifies is only "
        "consistent with itself. This digest (printed by `python -m export`; keep it where the copy cannot "
        "change it: your deployment config, a registry, this card on the Hub) names this export and no other. "
        "Refuse any other with `Moderator.from_pretrained(path, "
        f'expect_manifest_sha256="{MANIFEST_SHA256_PLACEHOLDER}")`, '
        f"`python -m serve <dir> --expect-manifest-sha256 {MANIFEST_SHA256_PLACEHOLDER}`, the "
        "`expect_manifest_sha256` field of a moderator defence in an eval config, or "
        f"`python -m export verify <dir> --expect-manifest-sha256 {MANIFEST_SHA256_PLACEHOLDER}`.",
        "",
    ]
    if report is not None:
        lines += [
            "## Evaluation",
            "",
            "From the evaluation report shipped as `eval_report.json` (SafeMT attack success rate per "
            "dialogue length, Safety Index, detection metrics and over-refusal on benign dialogues).",
            "",
            measured_at_sentence(report, threshold),
            "",
            _demote_headings(render_markdown(report)),
            "",
        ]
    return "\n".join(lines)
