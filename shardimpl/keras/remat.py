"""Keras' rematerialization (``keras.RematScope``) with memory freed when it is no longer used.

Keras' torch ``remat`` is ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``
with torch's default early stop: the backward's recomputation raises an internal
exception once the tensors it needs are back, and that exception's traceback keeps
the recomputing frames, with their tensors (recomputed activations, bf16 weight
casts), in a reference cycle until Python's garbage collector happens to run.
Measured (16 MiB Llama-shaped transformer, AdamW, mixed_bfloat16, seq 64, batch 4,
1 rank): the step's peak varied from 76.0 to 81.5 MB between identical runs and
reached 114.8 MB with the collector off. Without early stop the recomputation runs
the block to its end (for a whole-block remat almost all of it is needed anyway),
nothing is left in a cycle, and the peak is the same in every run (81.4 MB), the
figure ``bench plan`` predicts.
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import set_checkpoint_early_stop

__all__ = ["wrap_remat"]


def wrap_remat(original):
    """Keras' ``core.remat`` whose checkpoints run without early stop (see the module docstring)."""

    @functools.wraps(original)
    def remat(f):
        checkpointed = original(f)

        @functools.wraps(checkpointed)
        def run(*args, **kwargs):
            with set_checkpoint_early_stop(False):
                return checkpointed(*args, **kwargs)

        return run

    return remat
