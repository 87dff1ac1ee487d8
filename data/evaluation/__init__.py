"""What an evaluation produces (docs/design.md §7, §9): the metrics of a registered batch and their mean
(:mod:`data.evaluation.metrics`), the output folder that ``eval.py`` writes (:mod:`data.evaluation.writer`:
per-pair records, displacement files, ``metrics.json``, the comparison table) and the per-pair figures
(:mod:`data.evaluation.figures`).
"""
