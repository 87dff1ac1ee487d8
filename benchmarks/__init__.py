"""Benchmarks of the framework, one module per measurement, run from the repository root as
``python -m benchmarks.<name>`` (``--help`` for options); each writes its page under ``benchmarks/results/``.

Shared helpers (paths, data, machine info, timing, paired statistics, figures) live in
:mod:`benchmarks.common`; the learned hyper-parameter benchmarks (docs/design.md §5) are the package
:mod:`benchmarks.hyper`.
"""
