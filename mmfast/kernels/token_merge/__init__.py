"""Bipartite token merging (ToMe / Turbo). Torch only for now (:mod:`.reference`); a Triton kernel would be
dispatched here like the other ops."""

from mmfast.kernels.token_merge.reference import Merged, bipartite_merge, fold_merge, layer_schedule

__all__ = ["Merged", "bipartite_merge", "fold_merge", "layer_schedule"]
