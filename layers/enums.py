"""String options as enums, with one lookup (MONAI's ``StrEnum`` + ``look_up_option`` style).

An option that a user writes as a string (in a YAML file, on the command line, as a keyword argument) is a
:class:`StrEnum`: its members *are* strings (``Coupling.FULL == "full"``), so configurations and callers keep
passing plain strings, and every check of such an option goes through :meth:`StrEnum.lookup`, which raises
one clear ``ValueError`` that names the option and its choices.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Backend", "Coupling", "Guard", "LabelLoss", "LamKind", "Precision", "PresetName", "StrEnum", "Update"]


class StrEnum(str, Enum):
    """An enum whose members are strings; ``str(member)`` is its value."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def lookup(cls, value, name: str | None = None):
        """The member whose value is ``value`` (a member or its string).

        Args:
            value: a member of the enum or its string value.
            name: the option's name in the message (default: the enum's name in snake case).

        Raises:
            ValueError: ``"<name> must be one of ('a', 'b'); got 'c'"`` for anything else.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        choices = tuple(m.value for m in cls)
        raise ValueError(f"{name or cls.option_name()} must be one of {choices}; got {value!r}")

    @classmethod
    def option_name(cls) -> str:
        """The option's default name in messages: the class name in snake case (``"Coupling"`` -> ``"coupling"``)."""
        return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(cls.__name__))


class Coupling(StrEnum):
    """How the ``n`` displacement components of a node are coupled in the GN system (docs/design.md §3)."""

    FULL = "full"  #: the ``n×n`` blocks ``H(p)``
    DIAGONAL = "diagonal"  #: cross terms dropped: ``n`` independent scalar systems


class Update(StrEnum):
    """How a GN step updates the field (docs/design.md §3, :func:`layers.gn.gn_step`)."""

    ADD = "add"  #: ``u ← u + α δ`` with the regulariser on the whole field (the reference)
    COMPOSE = "compose"  #: ``u ← α δ + u ∘ (id + α δ)`` with the regulariser on the increment


class LabelLoss(StrEnum):
    """The label supervision of the learned models (docs/design.md §4)."""

    MSE = "mse"  #: class-weighted MSE of the warped one-hot labels
    DICE = "dice"  #: 1 − mean soft Dice over the foreground labels


class Backend(StrEnum):
    """Which CG backend solves the GN system (docs/design.md §3)."""

    AUTO = "auto"  #: graph for CUDA tensors, torch otherwise
    TORCH = "torch"  #: matrix-free batched PCG in torch (:func:`layers.cg.cg`), any device
    GRAPH = "graph"  #: the torch PCG replayed as CUDA graphs (:class:`layers.cg.GraphedCG`); eager off CUDA
    CUPY = "cupy"  #: CSR matrices and ``cupyx.scipy.sparse.linalg.cg`` (:mod:`layers.cupy_backend`)


class LamKind(StrEnum):
    """How a :class:`layers.lam_schedule.LambdaSchedule` holds λ per GN iteration (docs/design.md §5)."""

    FIXED = "fixed"  #: the reference schedule (geometric ``lam_start → lam_end``), not learned
    PER_ITERATION = "per_iteration"  #: K learned values ``log λ_t``
    SCALAR = "scalar"  #: one learned ``log λ`` scaling the reference's shape
    FOURIER = "fourier"  #: a learned :class:`layers.optim.FourierSchedule` of the iteration index
    CONDITIONED = "conditioned"  #: ``log λ`` set or given per call (a λ-conditioned model's input)


class Guard(StrEnum):
    """The regularity guard of the outer loss (:func:`layers.losses.regularity_guard`)."""

    DIFFUSION = "diffusion"  #: :func:`layers.losses.regularity_loss`
    NEGJAC = "negjac"  #: :func:`layers.losses.negative_jacobian_penalty`
    SDLOGJ = "sdlogj"  #: :func:`layers.losses.sdlogj_excess`
    NONE = "none"  #: no guard


class PresetName(StrEnum):
    """The named learning-rate presets of Adam instance optimisation (:data:`layers.optim.schedules.PRESETS`)."""

    PIECEWISE = "piecewise"  #: Vujovic et al.: 270 iterations of the piecewise schedule
    CONSTANT = "constant"  #: the ConvexAdam-style setting: learning rate 1, 100 iterations


class Precision(StrEnum):
    """Arithmetic of the semantic U-Net (:class:`layers.semantic.SemanticNet`; the GN layer always runs in the
    features' own float32 / float64)."""

    FLOAT32 = "float32"  #: the input's dtype (the reference)
    BF16 = "bf16"  #: bfloat16 autocast of the convolutions (fast on CPUs with AMX / AVX512-BF16)
