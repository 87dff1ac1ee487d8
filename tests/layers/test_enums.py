"""String options as enums: members are their strings, and one lookup names the option in its error."""

from __future__ import annotations

import pytest
import torch

from layers.enums import Backend, Coupling, Guard
from layers.laplacian import system_structure
from layers.losses import regularity_guard


def test_members_are_their_strings():
    assert Coupling.FULL == "full" and str(Coupling.DIAGONAL) == "diagonal"
    assert f"{Backend.CUPY}" == "cupy"
    assert Coupling.lookup("diagonal") is Coupling.DIAGONAL
    assert Backend.lookup(Backend.TORCH) is Backend.TORCH


@pytest.mark.parametrize("enum,name", [(Coupling, "coupling"), (Backend, "backend")])
def test_lookup_names_the_option_and_its_choices(enum, name):
    with pytest.raises(ValueError, match=rf"^{name} must be one of \(.*'{next(iter(enum)).value}'.*\); got 'nope'"):
        enum.lookup("nope")
    with pytest.raises(ValueError, match=r"^solver\.coupling must be one of"):
        Coupling.lookup(3, "solver.coupling")


def test_system_structure_checks_the_coupling():
    with pytest.raises(ValueError, match="^coupling must be one of"):
        system_structure((3, 4), 2, "block")


def test_guard_lookup():
    u = torch.zeros(1, 2, 4, 4)
    assert float(regularity_guard(u, Guard.NONE)) == 0.0 and float(regularity_guard(u, "diffusion")) == 0.0
    message = r"^guard must be one of \('diffusion', 'negjac', 'sdlogj', 'none'\); got 'l2'"
    with pytest.raises(ValueError, match=message):
        regularity_guard(u, "l2")
