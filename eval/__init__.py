"""Evaluation: ASR per dialogue length, the SafeMT Safety Index, detection metrics and reports."""
