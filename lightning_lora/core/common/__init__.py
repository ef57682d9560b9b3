"""Helpers every subsystem uses, importing no other module of the core: argument checks, ``torch.distributed``
and DTensor helpers, atomic file writes, and dense views of base weights in any storage."""
