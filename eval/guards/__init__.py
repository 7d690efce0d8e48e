"""Baseline guards for the evaluation: each reads a dialogue (and its image) and flags it or not.

guard = load_guard("llama_guard_3_vision", "meta-llama/Llama-Guard-3-11B-Vision")
[result] = guard.classify_batch([dialogue], [[image]])   # GuardResult(flagged, categories, score, ...)
"""

from eval.guards.base import (
    GUARD_KINDS,
    DialogueError,
    GenerativeGuard,
    Guard,
    GuardPrompt,
    GuardResult,
    load_guard,
    validate_dialogue,
)

__all__ = [
    "GUARD_KINDS",
    "DialogueError",
    "GenerativeGuard",
    "Guard",
    "GuardPrompt",
    "GuardResult",
    "load_guard",
    "validate_dialogue",
]
