"""ALiBi pretraining: megatron-core model, DeepSpeed trainer."""
