"""Which modules, attention sites, token rows and parameters a config adapts."""
