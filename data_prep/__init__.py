"""SafeMT (+ benign dialogues) -> the moderator's training dataset. See ``data_prep/README.md``.

``python -m data_prep.build --config configs/data/safemt.yaml``; the trainer reads the result with
``data_prep.io.load_prepared(out)``.
"""
