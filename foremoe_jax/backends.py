"""Backend-specific choices, made in one place: the token exchange (`DISPATCH`, one table) and the
checks of the kernel backends a config may ask for."""
import logging
from typing import Callable, NamedTuple

import jax

from foremoe_jax import dispatch
from pallas_kernels.backend import SUPPORTED

log = logging.getLogger("foremoe_jax")


class Dispatch(NamedTuple):
  """One token exchange. `exchange(x_NxH, gate_NxK, routing, num_slots, capacity, expert_fn, kernel_backend,
  masked=False) -> (y_NxH, group_sizes_S, dropped)`: the same signature for every backend, `capacity`
  always the rows per (source, destination) pair the executor sizes from the planner's pair need; each
  backend's docstring says how it uses it. The planner's `CostModel(dispatch=name)` prices the exchange
  by the same name."""
  exchange: Callable
  collective: str  # the XLA collective that moves the rows
  platforms: tuple[str, ...] | None  # where XLA runs that collective; None: everywhere


DISPATCH = {
    "padded": Dispatch(dispatch.padded_exchange, "all_to_all", None),
    "ragged": Dispatch(dispatch.ragged_exchange, "ragged_all_to_all", ("gpu", "tpu")),
}
# `auto` is the padded all_to_all: with foresight its capacity is exact, and on H100s it ran much faster
# than ragged_all_to_all (BENCHMARKS.md, numbers behind choices).
AUTO = "padded"
DISPATCH_MODES = ("auto", *DISPATCH)
_logged: set[tuple[str, str]] = set()


def platform() -> str:
  return jax.devices()[0].platform


def check_backends(dispatch_mode: str, gmm_backend: str | None, dispatch_backend: str | None, where: str) -> None:
  """ValueError naming the field (`where`: e.g. "ModelConfig.") when a requested backend is unknown. Whether a
  known one runs on this platform is decided when it is resolved (`choose_dispatch`, `pallas_kernels.resolve`)."""
  if dispatch_mode not in DISPATCH_MODES:
    raise ValueError(f"{where}dispatch={dispatch_mode!r}: known token exchanges are {DISPATCH_MODES}")
  kernels = (("gmm_backend", gmm_backend, ("gmm", "tgmm")), ("dispatch_backend", dispatch_backend,
                                                             ("permute", "combine")))
  for name, value, ops in kernels:
    known = tuple(b for b in SUPPORTED[ops[0]] if all(b in SUPPORTED[op] for op in ops))
    if value is not None and value not in known:
      raise ValueError(f"{where}{name}={value!r}: known backends of {'/'.join(ops)} are {known} "
                       "(None picks by platform)")


def choose_dispatch(requested: str, plat: str | None = None) -> str:
  """The name (a key of `DISPATCH`) of the token exchange `requested` runs as on this platform."""
  plat = plat or platform()
  if requested not in DISPATCH_MODES:
    raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {requested!r}")
  chosen = AUTO if requested == "auto" else requested
  backend = DISPATCH[chosen]
  if backend.platforms is not None and plat not in backend.platforms:
    raise ValueError(f"dispatch={chosen!r} needs {backend.collective}, which XLA runs on {backend.platforms} "
                     f"only, not on {plat}; use 'padded' or 'auto'")
  if (requested, plat) not in _logged:
    _logged.add((requested, plat))
    log.info("MoE dispatch %r on %s runs as %r", requested, plat, chosen)
  return chosen
