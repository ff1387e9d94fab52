"""RL post-training: task, GRPO loss, micro-batch packing."""
