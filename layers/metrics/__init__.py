"""Registration metrics of a field, pure torch (docs/design.md §7).

* :mod:`layers.metrics.functional`: Dice per label, Dice30, TRE, the Jacobian statistics (SDlogJ, folding);
* :mod:`layers.metrics.hausdorff`: HD95 per label (the values of MONAI's Hausdorff distance, all labels at once);
* :mod:`layers.metrics.labels`: label-map and spacing checks, the label-id list they share and
  :func:`~layers.metrics.labels.batch_label_ids`, the one reading of which labels a batch evaluates.

The metrics of a whole batch in one call, and their accumulation over a run: :mod:`data.evaluation.metrics`.
"""

from .functional import dice30, dice_per_label, jacobian_stats, tre
from .hausdorff import hd95_per_label
from .labels import label_id_list

__all__ = ["dice30", "dice_per_label", "hd95_per_label", "jacobian_stats", "label_id_list", "tre"]
