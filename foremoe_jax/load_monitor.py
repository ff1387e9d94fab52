"""Expert-load monitoring per RL step: tokens per (layer, expert) and per (micro-step, device) per policy.

- `expert_tokens` (pure numpy, run on the planner's worker, off the trainer's thread): the rollout's real
  tokens (prompt + response, padding excluded) per (MoE layer, expert) from the captured routes.
- `load_record`: what goes into the step's log record: the full arrays (lists: metrics.jsonl only) and
  per-layer expert imbalance (max / mean tokens over experts) and per-policy device imbalance (scalars:
  TensorBoard `rl/load/...` too). The device loads per micro-step (the (token, expert) pairs each device
  computes, summed over the MoE layers; padding rows included, since the devices compute them) are the
  ones the step's imbalance report is made of (`rl/report.py`): the running policy and static, or every
  policy with `rl.report_policies`.
- `plot_load`: a heat-map PNG of a run: layer x expert tokens, and device load / mean per micro-step
  (all steps end to end) for every policy reported.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def expert_tokens(routes_BxTxLxK, lengths_B, num_experts: int) -> np.ndarray:
  """int64 `[L, E]`: positions `< lengths[b]` of every row routed to each expert of each MoE layer."""
  routes_BxTxLxK, lengths_B = np.asarray(routes_BxTxLxK), np.asarray(lengths_B)
  b, t, num_layers, _ = routes_BxTxLxK.shape
  real_BxT = np.arange(t)[None, :] < lengths_B[:, None]
  routes_NxLxK = routes_BxTxLxK[real_BxT]
  flat = np.arange(num_layers)[None, :, None] * num_experts + routes_NxLxK
  return np.bincount(flat.reshape(-1), minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def _max_over_mean(x: np.ndarray) -> np.ndarray:
  return x.max(axis=-1) / np.maximum(x.mean(axis=-1), 1e-9)


def load_record(expert_LxE: np.ndarray, devices: dict[str, np.ndarray]) -> dict:
  """The `load` entry of an RL step's record."""
  return {"expert_imbalance": {f"layer{l}": float(v) for l, v in enumerate(_max_over_mean(expert_LxE))},
          "device_imbalance": {p: float(_max_over_mean(d).mean()) for p, d in devices.items()},
          "expert_tokens_LxE": expert_LxE.tolist(),
          "device_tokens_MxD": {p: d.tolist() for p, d in devices.items()}}


def plot_load(records: list[dict], path_png: str | os.PathLike) -> str:
  """Heat maps of the run's `load` entries: tokens per (layer, expert) summed over the steps, and for each
  policy device load / mean load per micro-step (columns: all steps' micro-steps in order). Returns the path."""
  loads = [r["load"] for r in records if r.get("load")]
  if not loads:
    raise ValueError("plot_load: no record has a 'load' entry")
  expert_LxE = np.sum([np.asarray(x["expert_tokens_LxE"], np.float64) for x in loads], axis=0)
  policies = list(loads[0]["device_tokens_MxD"])
  rel = {}
  for policy in policies:  # device load / mean load of its micro-step, [D, all micro-steps]
    load_MxD = np.concatenate([np.asarray(x["device_tokens_MxD"][policy], np.float64) for x in loads])
    rel[policy] = (load_MxD / np.maximum(load_MxD.mean(axis=1, keepdims=True), 1e-9)).T
  vmax = max(r.max() for r in rel.values())  # one color scale: the policies compare at a glance
  cols = 3
  rows = -(-(1 + len(policies)) // cols)
  fig = Figure(figsize=(5 * cols, 3.4 * rows), layout="constrained")  # no pyplot: no display needed
  axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
  im = axes[0].imshow(expert_LxE, aspect="auto", cmap="viridis", interpolation="nearest")
  axes[0].set(title=f"tokens per expert ({len(loads)} steps)", xlabel="expert", ylabel="MoE layer")
  axes[0].set_yticks(range(expert_LxE.shape[0]))
  fig.colorbar(im, ax=axes[0])
  for ax, policy in zip(axes[1:], policies):
    im = ax.imshow(rel[policy], aspect="auto", cmap="magma", interpolation="nearest", vmin=0.0, vmax=vmax)
    ax.set(title=f"{policy}: device load / mean (max {rel[policy].max():.2f})", xlabel="micro-step (all steps)",
           ylabel="device")
    fig.colorbar(im, ax=ax)
  for ax in axes[:1 + len(policies)]:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax is not axes[0]:
      ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  for ax in axes[1 + len(policies):]:
    ax.set_axis_off()
  os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
  fig.savefig(path_png, dpi=100)
  return os.fspath(path_png)
