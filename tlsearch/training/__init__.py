"""Fine-tuning: one fold top to bottom (:mod:`~tlsearch.training.fold`), the folds of a trial
trained together (:mod:`~tlsearch.training.together`), and the optimizer step they share."""

from tlsearch.training.fold import (
    Monitor,
    block_outputs,
    channels_last,
    evaluate,
    finetune,
    minibatches,
    predictions,
    to_tensors,
)
from tlsearch.training.together import finetune_folds, fold_batchable

__all__ = [
    "Monitor",
    "block_outputs",
    "channels_last",
    "evaluate",
    "finetune",
    "finetune_folds",
    "fold_batchable",
    "minibatches",
    "predictions",
    "to_tensors",
]
