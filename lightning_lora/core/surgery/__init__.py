"""Model surgery: adding adapters to a model (with rollback), taking them off, merging them into the base."""
