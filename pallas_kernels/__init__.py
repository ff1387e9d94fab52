"""Grouped-matmul and dispatch kernels for MoE expert parallelism.

`gmm(lhs_MxK, rhs_GxKxN, group_sizes_G)`: rows of `lhs` are grouped consecutively, group g owning
`group_sizes[g]` rows; rows past `sum(group_sizes)` produce zeros. `tgmm` is its weight gradient;
`permute`/`combine` move tokens into expert-sorted order and back (weighted). All differentiable.
Backends (`backend.py`): Pallas Mosaic GPU on Hopper, XLA elsewhere, "interpret" for CPU tests;
permute/combine also have Pallas Triton kernels (backend "triton").
"""
from pallas_kernels.backend import BACKENDS, resolve
from pallas_kernels.dispatch import combine, permute
from pallas_kernels.gmm import gmm, tgmm

__all__ = ["BACKENDS", "combine", "gmm", "permute", "resolve", "tgmm"]
