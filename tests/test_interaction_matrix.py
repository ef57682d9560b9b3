"""Every method x every operation (``tests/interaction_matrix.py``): each cell works, checked by numbers, or is
refused by name with the model and the disk untouched. No cell is silently different.

Cells that work compare what the operation gives with what the trained model computes, to 1e-5 of the larger
magnitude (float32). The few cells that work approximately by design (merging into a quantised base re-quantises
it) must say so with a warning, and stay within the quantisation's rounding.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from interaction_matrix import METHODS, OPERATIONS, fit
from numerics import assert_parity

# Cells refused by name: (method, operation) -> what the error says.
REFUSED: dict[tuple[str, str], str] = {
    **{(method, operation): f"{method} changed the base weights of the adapted layers"
       for method in ("ReLoRA", "Delta-LoRA") for operation in ("PEFT export", "native export")},
    **{(method, "merge_on_fit_end"): "merged_weights_dir cannot be written from a quantised base"
       for method in ("QLoRA 8-bit", "LoftQ 8-bit")},
    **{(method, "save_merged_model"): r"hold quantised weights; a merged export needs plain floating weights"
       for method in ("QLoRA 8-bit", "LoftQ 8-bit")},
    ("LoftQ 8-bit", "PEFT export"): r"init='loftq', which rewrote the base weights, but .* keep no initial factors",
    **{("X-LoRA", operation): "computes through X-LoRA's gate, which decides per call how its adapters mix"
       for operation in ("merge_and_unload", "unmerge", "save_merged_model")},
    ("X-LoRA", "mixed batch"): "already computes through X-LoRA's gate; a mixed-adapter batch cannot take over",
    **{("AM-LoRA", operation): "computes through AM-LoRA's selector, which decides per call how its adapters mix"
       for operation in ("merge_and_unload", "unmerge", "save_merged_model", "merge_on_fit_end")},
    ("AM-LoRA", "mixed batch"): "already computes through AM-LoRA's selector; a mixed-adapter batch cannot take over",
    ("target_parameters", "mixed batch"): r"adapt parameters \(target_parameters\), whose update changes the weight",
}  # fmt: skip

# Cells that work approximately, saying so: (method, operation) -> the warning, and the bound on the difference
# relative to the outputs' largest magnitude.
WARNED: dict[tuple[str, str], tuple[str, float]] = {
    (method, operation): ("re-quantises it", 2e-2)
    for method in ("QLoRA 8-bit", "LoftQ 8-bit") for operation in ("merge_and_unload", "unmerge")
}

# Cells whose operation the method does not offer at all: (method, operation) -> why.
NOT_OFFERED: dict[tuple[str, str], str] = {
    ("X-LoRA", "merge_on_fit_end"): "XLoraCallback has no merge_on_fit_end (merging X-LoRA is refused above)",
}

CELLS = [
    pytest.param(method, operation, id=f"{method}|{operation}")
    for method in METHODS for operation in OPERATIONS if (method, operation) not in NOT_OFFERED
]


@functools.lru_cache(maxsize=None)
def _trained(method: str) -> L.LightningModule:
    return fit(METHODS[method])


def _snapshot(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


@pytest.mark.parametrize("method,operation", CELLS)
def test_cell(method: str, operation: str, tmp_path: Path) -> None:
    row, run = METHODS[method], OPERATIONS[operation]
    module = copy.deepcopy(_trained(method))
    cell = (method, operation)
    if cell in REFUSED:
        before = _snapshot(module)
        with pytest.raises(ValueError, match=REFUSED[cell]):
            run(row, module, tmp_path)
        after = _snapshot(module)
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        assert not any(path.is_file() for path in tmp_path.rglob("*") if path.suffix in (".safetensors", ".json"))
        return
    if cell in WARNED:
        message, bound = WARNED[cell]
        with pytest.warns(UserWarning, match=message):
            got, want = run(row, module, tmp_path)
        assert (got - want).abs().max() <= bound * want.abs().max()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LitLogger|litlogger).*")
        got, want = run(row, module, tmp_path)
    assert_parity(got, want)


def test_the_matrix_is_whole() -> None:
    """Every expectation names a real cell, and the table's size is what docs/interactions.md reports."""
    for table in (REFUSED, WARNED, NOT_OFFERED):
        assert all(method in METHODS and operation in OPERATIONS for method, operation in table)
    assert len(METHODS) * len(OPERATIONS) == len(CELLS) + len(NOT_OFFERED)


# ----- the page users read: docs/interactions.md holds this table, checked here -----
PAGE = Path(__file__).resolve().parents[1] / "docs" / "interactions.md"
REASONS = {
    "changed the base weights": "the base weights moved in training: the adapter alone is not the model",
    "cannot be written from a quantised base": "merging in place re-quantises: export with "
                                                "save_merged_model(dequantize=True)",
    "hold quantised weights": "pass dequantize=True",
    "keep no initial factors": "LoftQ's adapter belongs to its own quantised base: use the lightning_lora format",
    "X-LoRA's gate, which decides": "the gate mixes experts per token: no merged weight computes it",
    "AM-LoRA's selector, which decides": "the selector mixes tasks per token: no merged weight computes it",
    "a mixed-adapter batch cannot take over": "one plan per layer: take the gate off first",
    "whose update changes the weight": "a parameter's update changes the weight for the whole batch: serve such "
                                       "adapters one at a time",
}  # fmt: skip


def matrix_markdown() -> str:
    """The table of every cell: "yes" (works, checked by numbers), "refused" (by name; why below), "approx."
    (works with a warning that says it is approximate), "-" (the method does not offer it)."""

    def cell(method: str, operation: str) -> str:
        if (method, operation) in NOT_OFFERED:
            return "-"
        if (method, operation) in WARNED:
            return "approx."
        if (method, operation) in REFUSED:
            reason = next(i for i, key in enumerate(REASONS) if key in REFUSED[(method, operation)])
            return f"refused ({reason + 1})"
        return "yes"

    lines = ["| method | " + " | ".join(OPERATIONS) + " |", "| --- " * (len(OPERATIONS) + 1) + "|"]
    lines += [f"| {method} | " + " | ".join(cell(method, op) for op in OPERATIONS) + " |" for method in METHODS]
    lines += ["", *(f"{i + 1}. {reason}" for i, reason in enumerate(REASONS.values()))]
    lines += ["", "approx.: merging into a quantised base re-quantises it, with a warning (outputs move by the "
              "rounding).", *(f"-: {method} / {operation}: {why}" for (method, operation), why in NOT_OFFERED.items())]
    return "\n".join(lines)


def test_the_docs_table_is_the_matrix() -> None:
    text = PAGE.read_text()
    start, end = text.index("<!-- matrix -->\n") + len("<!-- matrix -->\n"), text.index("\n<!-- /matrix -->")
    assert text[start:end] == matrix_markdown(), "regenerate: cd tests && python test_interaction_matrix.py"


if __name__ == "__main__":
    print(matrix_markdown())
