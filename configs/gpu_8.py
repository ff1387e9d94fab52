"""8 H100(s): see configs/gpu.py."""
from configs.gpu import gpu_config


def get_config():
  return gpu_config(8)
