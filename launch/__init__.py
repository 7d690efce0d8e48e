"""Cluster and sweep launchers; the command each node runs is built (and tested) in ``launch.commands``."""
