import os
import shutil
import sys
import tempfile

# Tests see 8 CPU devices even when run without the README's test script.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false")

# One persistent compilation cache for the session, set before jax is imported so this process and every
# train.py it starts (the environment is inherited) load a program another test already compiled instead
# of compiling it again: tests rebuild the same models and steps under new jit objects. A cache dir set by
# the caller is kept (and reused across sessions); the session's own is removed at the end.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = tempfile.mkdtemp(prefix="foremoe_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
if "jax" in sys.modules:  # a plugin imported jax before this file: its config read the environment already
  import jax  # noqa: E402

  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
sys.path.insert(0, os.path.dirname(__file__))


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
