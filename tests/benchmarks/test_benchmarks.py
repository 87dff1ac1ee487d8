"""The benchmark package's helpers and the hyper report's sections rebuilt from the stored JSON results (no run,
no recomputation: the sections that need none must equal the committed page)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.common import RESULTS, paired_difference, render
from benchmarks.hyper import cli
from benchmarks.hyper.shared import load_json


def test_render_blocks(tmp_path: Path) -> None:
    path = tmp_path / "t.md"
    path.write_text("a comment\n<!-- block: one -->\nx $v\n\n<!-- block: two -->\ninline $v\n")
    assert render(path, "one", v=1) == ["x 1", ""]
    assert render(path, "two", v="y") == ["inline y"]
    with pytest.raises(KeyError):
        render(path, "one")


def test_paired_difference_ignores_nan() -> None:
    out = paired_difference([1.0, 2.0, float("nan"), 4.0], [2.0, 2.0, 1.0, 3.0])
    assert out["pairs"] == 3
    assert out["mean"] == pytest.approx(0.0)
    assert out["wins"] == pytest.approx(1 / 3) and out["ties"] == pytest.approx(1 / 3)
    assert out["se"] == pytest.approx(1 / math.sqrt(3))


def test_current_command() -> None:
    assert cli.current_command("python benchmarks/hyper.py confirm --steps 10 --test-pairs 256") == (
        "python -m benchmarks.hyper confirm --steps 10 --test-pairs 256")
    removed = "python benchmarks/hyper.py schedule --steps 20 --perturb 0.2 --tag es"
    assert cli.current_command(removed) == removed  # its options left the parser: runs from its own commit
    assert cli.current_command("python -m benchmarks.hyper guard") == "python -m benchmarks.hyper guard"


def test_help_lists_every_subcommand() -> None:
    text = cli.build_parser().format_help()
    assert all(name in text for name in cli.SUBCOMMANDS)


@pytest.mark.skipif(not (RESULTS / "hyper_bilevel.json").is_file(), reason="no stored hyper results")
def test_hyper_sections_match_the_committed_page() -> None:
    from benchmarks.hyper import report, report_schedule
    from benchmarks.hyper.summary import summary_lines

    page = (RESULTS / "hyper.md").read_text()
    sections = [summary_lines(), report.bilevel_lines(load_json("bilevel")), report.guard_lines(load_json("guard")),
                report.amortised_lines(load_json("amortised")), report_schedule.run_lines(load_json("schedule_T20")),
                report_schedule.linesearch_lines(load_json("linesearch_T10"))]
    for lines in sections:
        assert "\n".join(lines) in page


def test_hippocampus_learned_hyper_rows_and_baseline_schedule(tmp_path: Path) -> None:
    """The learned-hyper-parameter rows of benchmarks/hippocampus.py: one per given file (and the hypernetwork's
    two), the baseline schedule written from the learned file's own baseline values and step unit."""
    import argparse

    import torch

    from benchmarks.hippocampus import learned_hyper
    from lightning_modules.hyper.schedule import ScheduleMetaLearner, load_schedule, save_schedule

    module = ScheduleMetaLearner(preset="piecewise", steps=12, baseline="piecewise")
    with torch.no_grad():  # a "learned" schedule that differs from its baseline
        module.schedule.mlp[-1].bias.fill_(0.3)
    learned = save_schedule(module, tmp_path / "learned.pt")
    args = argparse.Namespace(bilevel_ckpt=None, hyper_ckpt="h.ckpt", schedule=str(learned))
    rows = learned_hyper(args, tmp_path / "out")
    assert [k for k, _, _ in rows] == ["hyper_default", "hyper_auto", "adam_schedule_base", "adam_schedule_learned"]
    assert "--lam-split" in rows[1][2] and rows[1][2][rows[1][2].index("--lam-split") + 1] == "train"
    base = Path(rows[2][2][-1])
    expected = [float(v) for v in module.schedule.base]
    assert list(load_schedule(base).values) == expected
    assert list(load_schedule(learned).values) != expected
    assert torch.load(base, weights_only=True)["step_unit"] == module.step_unit


def test_hippocampus_choose_takes_the_best_training_dice_within_the_regularity_target() -> None:
    """benchmarks/hippocampus.py's one selection rule: the best Dice on the training pairs among the candidates
    with SDlogJ ≤ 0.2, the best Dice when none meets it; every candidate scored on 20 training pairs."""
    from benchmarks.hippocampus import choose

    results = {"c0": (0.80, 0.15), "c1": (0.83, 0.25), "c2": (0.81, 0.19)}
    calls = []

    def get(key, args, split):
        calls.append((key, args, split))
        dice, sdlogj = results[args[0]]
        return {"metrics": {"dice": dice, "sdlogj": sdlogj}}

    k, scored = choose(get, "select_x", [(name, [name]) for name in results])
    assert k == 2 and [c[1] for c in scored] == [0, 1, 2]
    assert calls[0] == ("select_x0", ["c0", "--data-arg", "max_pairs=20"], "train")
    results.update(c0=(0.80, 0.3), c2=(0.81, 0.4))
    assert choose(get, "select_x", [(name, [name]) for name in results])[0] == 1
