import os
import sys

# Tests see 8 CPU devices even when run without the README's test script.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false")
sys.path.insert(0, os.path.dirname(__file__))
