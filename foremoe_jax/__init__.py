"""foremoe_jax: micro-step expert load balancing with foresight for RL post-training of MoE models."""
from foremoe_jax.moe import ExpertsConfig, MoE, MoEConfig, MoEOutput
from foremoe_jax.placement import Tables, make_tables

__all__ = ["ExpertsConfig", "MoE", "MoEConfig", "MoEOutput", "Tables", "make_tables"]
