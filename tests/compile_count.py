"""Counting XLA compilations: what a test asserts to show a step compiles nothing it did not have to."""
import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
  """Yields a list that gets one entry (the seconds) per XLA compilation inside the block."""
  compiles = []

  def listener(event, duration_s, **_):
    if event == BACKEND_COMPILE:
      compiles.append(duration_s)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
