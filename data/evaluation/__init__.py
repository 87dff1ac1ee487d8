"""What an evaluation produces (docs/design.md §7, §9): the metrics of a registered batch and their mean
(:mod:`data.evaluation.metrics`), the output folder that ``eval.py`` writes (:mod:`data.evaluation.writer`:
``summary.json``, ``pairs.csv``, ``summary.md``, displacement files; the comparison table; the CUDA-synchronised
time stamps of the evaluation stages) and the per-pair figures
(:mod:`data.evaluation.figures`).
"""
