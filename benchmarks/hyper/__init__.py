"""Benchmarks of the learned hyper-parameters (docs/design.md §5) on synthetic 2D data.

Subcommands (each writes ``benchmarks/results/hyper_<name>.json`` and figures; ``report`` assembles
``benchmarks/results/hyper.md`` from the JSON files):

* ``schedule``  — meta-learn the AdamIO learning-rate schedule (:class:`ScheduleMetaLearner`) and compare it
  on held-out pairs with the piecewise schedule and a grid of constant learning rates at the same step count;
* ``bilevel``   — bilevel λ for LearnGN (:class:`BilevelLearnGN`) at three noise levels, the 20-point λ grid
  check, and the runs without / with the regularity guard (σ = 0.15);
* ``guard``     — the guard runs again at low noise (σ = 0.02), longer;
* ``amortised`` — the λ-conditioned hypernetwork (:class:`HyperLearnGN`): smoothness along a λ sweep, Dice
  against LearnGN models trained at fixed λ, and λ selection (gradient descent vs sweep);
* ``linesearch`` — the exact full-batch meta-gradient of the schedule at the best training constant and the
  training TRE along the descent direction (is the meta-gradient useful, and how far?);
* ``confirm``   — the learned schedule of a ``schedule`` run against the references on fresh pairs (data seed 1);
* ``report``    — write ``hyper.md`` (recomputes the hypergradient check and the schedule cliff table).

The runs behind ``benchmarks/results/hyper.md`` (from the repository root, with ``.venv/bin/python``)::

  python -m benchmarks.hyper bilevel
  python -m benchmarks.hyper guard
  python -m benchmarks.hyper amortised
  # the learned schedules (T = 10, 20, 30, 270): Adam's first step stays at the baseline (--frozen-steps 1)
  for T in 10 20 30; do python -m benchmarks.hyper schedule --steps $T --epochs 40 --lr 0.003 \
      --max-log-delta 1.0 --n-freq 2 --train-pairs 64 --val-pairs 64 --test-pairs 256 --select-on-val \
      --baseline-best --batch-size 64 --frozen-steps 1; done
  python -m benchmarks.hyper schedule --steps 270 --epochs 20 --lr 0.003 --max-log-delta 1.0 --n-freq 2 \
      --train-pairs 64 --val-pairs 64 --test-pairs 256 --select-on-val --baseline-best --batch-size 64 \
      --frozen-steps 1
  for T in 10 20 30 270; do python -m benchmarks.hyper confirm --steps $T --test-pairs 256; done
  # variants in the "other meta-training variants" table: the commands recorded in their JSON files (the
  # smoothed-objective ones, tagged smooth/es/esf, need commit 05772aa, which still has their options and
  # ran them as ``python benchmarks/hyper.py``)
  python -m benchmarks.hyper linesearch --steps 10
  python -m benchmarks.hyper linesearch --steps 20 --magnitude 0.25
  python -m benchmarks.hyper report

``--quick`` gives tiny smoke budgets. Each run takes minutes to tens of minutes on 2 CPU cores (one torch
thread each by default, ``--threads``): run them in the background with ``nohup``.
"""
