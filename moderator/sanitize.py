"""Dialogue text cannot forge a prompt: no control token, no image placeholder, no turn boundary.

Processors and tokenizers turn every substring equal to one of their added tokens into that token
(``<|im_start|>``, ``<|image_pad|>``, ``<|eot_id|>``, ``<image>``, ``<start_of_image>`` ...), so text
pasted into a prompt as-is can end a message, forge an earlier answer, or add image placeholders
with no image behind them. Data prep renders without a model, so the rule cannot ask a tokenizer
which strings are special: it breaks every token-like opener instead, which covers all the
families the project loads (Qwen2/2.5-VL and LLaVA-OneVision ``<|...|>``/``<image>``, Llama 3/4
``<|...|>``, Gemma ``<...>``/``[multimodal]``) and the usual others (``</s>``, ``<tool_call>``,
``[INST]``, ``<｜begin▁of▁sentence｜>``).

The rewrite inserts one plain space, which keeps the text readable and survives every normaliser
(a zero-width space would not: NFKC-style normalisers may delete it after special tokens are split,
and a human reading a log could not tell a neutralised tag from a live one).
"""

from __future__ import annotations

import re

# Openers of angle-bracket tokens, and their NFKC equivalents (a normalising tokenizer folds them to "<").
_ANGLE = "<\uff1c\ufe64"
# "<" followed by what starts a token name: a letter or "_", "|" (or its full-width form), "/", "!", "@", "?".
_ANGLE_TOKEN = re.compile(rf"([{_ANGLE}])(?=[|\uff5c\uff0f/!@?]|[^\W\d])")
# "[" opening a one-word bracket token: [INST], [/INST], [IMG_BREAK], [@BOS@], [multimodal].
_BRACKET_TOKEN = re.compile(r"([\[\uff3b])(?=[@/]?[^\W\d][^\s\[\]\uff3b\uff3d]{0,63}[\]\uff3d])")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# What starts each continuation line of a turn, so only a real turn's first line begins at column 0.
CONTINUATION_INDENT = "  "


def neutralize_control_tokens(text: str) -> str:
    """``text`` with every substring a tokenizer could read as a special or added token broken up.

    A space goes after each ``<`` that starts a token name and after each ``[`` that opens a
    one-word bracket token: ``<|im_end|>`` becomes ``< |im_end|>``, ``</conversation>`` becomes
    ``< /conversation>``. Afterwards no ``<`` is followed by a name character, so no such token can
    remain or be formed (the rule only inserts spaces). Lone surrogates, which tokenizers refuse
    with an exception, become U+FFFD.
    """
    text = _LONE_SURROGATE.sub("\ufffd", text)
    text = _ANGLE_TOKEN.sub(r"\1 ", text)
    return _BRACKET_TOKEN.sub(r"\1 ", text)


def transcript_text(text: str, indent: str = CONTINUATION_INDENT) -> str:
    """One turn's text for a ``Role: text`` transcript: neutralised, stripped, continuation lines indented.

    Every line break (``\\r``, ``\\u2028``, form feed ...) becomes ``\\n`` + ``indent``, so a line of the
    text that reads ``Assistant: ...`` or ``User: ...`` cannot pass for a turn of its own.
    """
    lines = neutralize_control_tokens(text).strip().splitlines()
    return ("\n" + indent).join(lines)
