"""Several adapters at once: weighted combination, mixed-adapter batches, X-LoRA, AM-LoRA, O-LoRA."""
