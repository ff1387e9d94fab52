"""The one place that picks which implementation runs each kernel.

Order: the `backend=` argument, else the `PALLAS_KERNELS_BACKEND` environment variable, else the
platform default. A backend that was asked for (argument or variable) either runs or raises: it never
falls back silently.
"""
import logging
import os

import jax

BACKENDS = ("mosaic_gpu", "triton", "xla", "interpret")
ENV_VAR = "PALLAS_KERNELS_BACKEND"
# Backends each op has an implementation for (defaults per platform: GPU_DEFAULT below).
SUPPORTED = {
    "gmm": ("mosaic_gpu", "xla", "interpret"),
    "tgmm": ("mosaic_gpu", "xla", "interpret"),
    "permute": ("triton", "xla", "interpret"),
    "combine": ("triton", "xla", "interpret"),
}
# Platform defaults, chosen by measurement on Hopper (BENCHMARKS.md, numbers behind choices): the Triton
# permute outruns XLA's gather; XLA's combine alone is faster, but inside the MoE step XLA fuses its k-row
# gather into the ops around it, and the MoE step ran faster with the Triton combine under every policy.
GPU_DEFAULT = {"gmm": "mosaic_gpu", "tgmm": "mosaic_gpu", "permute": "triton", "combine": "triton"}

_log = logging.getLogger("pallas_kernels")
_logged: set[tuple[str, str]] = set()


def is_hopper() -> bool:
  """True when the default device is an NVIDIA GPU of compute capability 9.x (wgmma, TMA)."""
  if jax.default_backend() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "")
  return str(capability).startswith("9")


def card_table(by_card: dict[str, dict]) -> dict:
  """The entry of `by_card` ({card name fragment: table}) for the default device, matched against its
  device_kind (e.g. "NVIDIA H100 80GB HBM3" -> "H100"); the first entry where no name matches."""
  kind = jax.devices()[0].device_kind
  return next((table for name, table in by_card.items() if name in kind), next(iter(by_card.values())))


def default_backend(op: str) -> str:
  return GPU_DEFAULT[op] if is_hopper() else "xla"


def resolve(op: str, backend: str | None = None) -> str:
  """Returns the backend that runs `op`; raises ValueError/RuntimeError for an impossible request."""
  if op not in SUPPORTED:
    raise ValueError(f"unknown kernel op {op!r}; known: {sorted(SUPPORTED)}")
  asked = backend or os.environ.get(ENV_VAR) or None
  name = asked or default_backend(op)
  if name not in BACKENDS:
    raise ValueError(f"unknown backend {name!r} for {op}; choose one of {BACKENDS}")
  if name not in SUPPORTED[op]:
    raise ValueError(f"backend {name!r} has no {op} kernel; {op} supports {SUPPORTED[op]}")
  if name in ("mosaic_gpu", "triton") and jax.default_backend() != "gpu":
    raise RuntimeError(
        f"backend {name!r} was asked for {op} but the default JAX platform is "
        f"{jax.default_backend()!r}; use backend='interpret' to run the Pallas kernel on CPU")
  if name == "mosaic_gpu" and not is_hopper():
    raise RuntimeError(f"backend 'mosaic_gpu' for {op} needs a Hopper GPU (sm_90); "
                       f"found {jax.devices()[0].device_kind}")
  if (op, name) not in _logged:
    _logged.add((op, name))
    _log.info("pallas_kernels.%s runs on backend %r (%s)", op, name,
              "requested" if asked else f"default for platform {jax.default_backend()}")
  return name


def fallback(op: str, backend: str | None, reason: str) -> str:
  """The chosen kernel cannot take these inputs: raise if it was asked for, else use XLA (logged)."""
  if backend or os.environ.get(ENV_VAR):
    raise ValueError(f"pallas_kernels.{op}: the requested backend cannot run these inputs: {reason}")
  if (op, reason) not in _logged:
    _logged.add((op, reason))
    _log.warning("pallas_kernels.%s falls back to 'xla' for these inputs: %s", op, reason)
  return "xla"
