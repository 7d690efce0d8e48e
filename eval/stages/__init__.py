"""The stages of an eval run, one module each, run in this order by :mod:`eval.loop`.

Each stage is a set of plain functions that take what they need explicitly (the shared
:class:`eval.stages.context.RunContext`, the loaded :class:`eval.stages.inputs.RunInputs`, a model loader)
and return data; every computed record goes to the stage's JSONL cache, so a rerun resumes.

- :mod:`~eval.stages.context`: what the stages share (config, out folder, caches, tally, thresholds, judge)
- :mod:`~eval.stages.keys`: the cache keys of every stage, and the lookup of a cached decision
- :mod:`~eval.stages.inputs`: the run's (or shard's) samples and prepared split rows; the input report
- :mod:`~eval.stages.decisions`: phases 0 and 1, each defence's threshold and decisions
- :mod:`~eval.stages.turn_flags`: turns to detection, each defence's flag after every user turn
- :mod:`~eval.stages.generation`: phase 2, the targets' replies
- :mod:`~eval.stages.judging`: phase 3, the judged report rows
- :mod:`~eval.stages.results`: ``rows.jsonl``, detection metrics and the report, or a shard's summary
"""
