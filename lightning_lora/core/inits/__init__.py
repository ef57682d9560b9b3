"""How adapters start: the initialiser registry, SVD inits (PiSSA, MiLoRA, OLoRA), LoftQ, and the data-driven
inits (CorDA, EVA) with the calibration run that feeds them."""
