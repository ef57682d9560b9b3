"""Training-time algorithms on adapted models: LoRA+ parameter groups, LoRA-FA, AdaLoRA rank allocation,
ReLoRA/Delta-LoRA base updates."""
