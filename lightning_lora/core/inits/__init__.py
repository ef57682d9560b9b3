"""How adapters start: the initialiser registry, SVD inits (PiSSA, MiLoRA, OLoRA), LoftQ, and the data-driven
inits (CorDA, EVA), which register a calibration hook. Importing the package registers every built-in init: a new
init is one module with its ``register_initializer`` (and ``register_calibration`` if it reads data) and one line
here."""

from lightning_lora.core.inits import corda, eva, loftq, svd_init  # noqa: F401
