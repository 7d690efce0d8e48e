"""Export stage: a trained checkpoint -> a verified, self-contained serving directory (``python -m export``)."""
