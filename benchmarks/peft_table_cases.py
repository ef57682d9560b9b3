"""PEFT's own test table (``TEST_CASES`` in its ``tests/test_custom_models.py``): the rows of the kinds lightning_lora
has, and our copies of the small models they run on.

Rows are ``(name, model id, PEFT config class, config kwargs)``, the data copied as it is, in PEFT's order, read at
huggingface/peft commit 5d602fdb (its ``__version__`` says 0.20.1.dev0). Kinds: LoRA (its 46 rows, DoRA and the LoRA
variants included), LoHa, LoKr, OFT, BOFT, VeRA, VB-LoRA and AdaLoRA. The models are our copies of PEFT's (same
layers, names and forward); ``benchmarks/peft_test_table.py`` builds them with ``torch.manual_seed(0)``.
"""

from __future__ import annotations

from typing import Any, Callable

import peft
import torch
from peft.tuners.lora.config import BdLoraConfig
from torch import nn
from transformers.pytorch_utils import Conv1D

PEFT_SOURCE = "huggingface/peft tests/test_custom_models.py TEST_CASES, commit 5d602fdb (0.20.1.dev0)"

CASES: list[tuple[str, str, type, dict[str, Any]]] = [
    ("Vanilla MLP 1 LoRA", "MLP", peft.LoraConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", peft.LoraConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", peft.LoraConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", peft.LoraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", peft.LoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", peft.LoraConfig, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", peft.LoraConfig, {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", peft.LoraConfig, {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    (
        "Vanilla MLP 1 LoRA with KaSA",
        "MLP",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "kasa_config": peft.KasaConfig(), "r": 4},
    ),
    (
        "Vanilla MLP 1 LoRA with MiCA",
        "MLP",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4},
    ),
    (
        "Vanilla MLP 9 LoRA with DoRA",
        "MLP",
        peft.LoraConfig,
        {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32},
    ),
    (
        "Vanilla MLP 10 LoRA with VeLoRA random",
        "MLP",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "velora_config": peft.VeloraConfig(num_groups=2, init_type="random")},
    ),
    (
        "Vanilla MLP 11 LoRA with VeLoRA batch_average",
        "MLP",
        peft.LoraConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "velora_config": peft.VeloraConfig(num_groups=2, init_type="batch_average"),
        },
    ),
    (
        "Vanilla MLP 12 LoRA with VeLoRA batch_average_once",
        "MLP",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "velora_config": peft.VeloraConfig(num_groups=2, init_type="batch_average_once")},
    ),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", peft.LoraConfig, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", peft.LoraConfig, {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", peft.LoraConfig, {"target_modules": ["emb", "conv1d"]}),
    (
        "Embedding + transformers Conv1D 1 DoRA",
        "EmbConv1D",
        peft.LoraConfig,
        {"target_modules": ["conv1d"], "use_dora": True},
    ),
    (
        "Embedding + transformers Conv1D 2 DoRA",
        "EmbConv1D",
        peft.LoraConfig,
        {"target_modules": ["emb"], "use_dora": True},
    ),
    (
        "Embedding + transformers Conv1D 3 DoRA",
        "EmbConv1D",
        peft.LoraConfig,
        {"target_modules": ["emb", "conv1d"], "use_dora": True},
    ),
    (
        "Embedding + transformers Conv1D 1 LoRA trainable_tokens",
        "EmbConv1D",
        peft.LoraConfig,
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    ("Conv1d LoRA", "Conv1d", peft.LoraConfig, {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", peft.LoraConfig, {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", peft.LoraConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", peft.LoraConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", peft.LoraConfig, {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", peft.LoraConfig, {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", peft.LoraConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", peft.LoraConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", peft.LoraConfig, {"target_modules": ["conv2d"], "use_dora": True}),
    (
        "Conv2d Groups2 LoRA with DoRA",
        "Conv2dGroups2",
        peft.LoraConfig,
        {"target_modules": ["conv2d"], "use_dora": True},
    ),
    ("Conv3d 1 LoRA", "Conv3d", peft.LoraConfig, {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", peft.LoraConfig, {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", peft.LoraConfig, {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", peft.LoraConfig, {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    (
        "Vanilla MLP 1 LoRA with lora_b bias",
        "MLP",
        peft.LoraConfig,
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    (
        "Conv2d 1 LoRA with lora_b bias",
        "Conv2d",
        peft.LoraConfig,
        {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
    ),
    (
        "Conv3d 1 LoRA with lora_b bias",
        "Conv3d",
        peft.LoraConfig,
        {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
    ),
    ("MHA 1 LoRA", "MHA", peft.LoraConfig, {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", peft.LoraConfig, {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", peft.LoraConfig, {"target_parameters": ["lin0.weight"]}),
    (
        "MLP 2 using nn.Parameter LoRA",
        "MLP",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
    ),
    (
        "Vanilla MLP 1 LoRA with Monteclora",
        "MLP",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "monteclora_config": peft.MontecloraConfig(num_samples=2)},
    ),
    (
        "BD-LoRA A only",
        "MLP",
        peft.LoraConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False),
        },
    ),
    (
        "BD-LoRA B only",
        "MLP",
        peft.LoraConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
        },
    ),
    (
        "BD-LoRA both A and B",
        "MLP",
        peft.LoraConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
        },
    ),
    ("Vanilla MLP 1 LOHA", "MLP", peft.LoHaConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LOHA", "MLP", peft.LoHaConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LOHA", "MLP", peft.LoHaConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LOHA", "MLP", peft.LoHaConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LOHA", "MLP", peft.LoHaConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 6 LOHA",
        "MLP",
        peft.LoHaConfig,
        {
            "target_modules": ["lin0"],
            "alpha": 4,
            "module_dropout": 0.1,
        },
    ),
    ("Vanilla MLP 7 LOHA", "MLP", peft.LoHaConfig, {"target_modules": "lin0", "rank_dropout": 0.5}),
    ("Conv2d 1 LOHA", "Conv2d", peft.LoHaConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOHA", "Conv2d", peft.LoHaConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOHA", "Conv2d", peft.LoHaConfig, {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOHA", "Conv2d", peft.LoHaConfig, {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv1d LOHA", "Conv1d", peft.LoHaConfig, {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 1", "Conv1d", peft.LoHaConfig, {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 2", "Conv1d", peft.LoHaConfig, {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOHA", "Conv1dGroups", peft.LoHaConfig, {"target_modules": ["conv1d"], "r": 4}),
    (
        "Conv1d LOHA 3",
        "Conv1dBigger",
        peft.LoHaConfig,
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True},
    ),
    (
        "Conv1d LOHA 4",
        "Conv1dBigger",
        peft.LoHaConfig,
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False},
    ),
    ("Conv2d 1x1 LOHA", "Conv2d1x1", peft.LoHaConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LOHA", "Conv2dGroups", peft.LoHaConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOHA", "Conv2dGroups2", peft.LoHaConfig, {"target_modules": ["conv2d"]}),
    ("Vanilla MLP 1 LOKR", "MLP", peft.LoKrConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LOKR", "MLP", peft.LoKrConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LOKR", "MLP", peft.LoKrConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LOKR", "MLP", peft.LoKrConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LOKR", "MLP", peft.LoKrConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 6 LOKR",
        "MLP",
        peft.LoKrConfig,
        {
            "target_modules": ["lin0"],
            "alpha": 4,
            "module_dropout": 0.1,
        },
    ),
    ("Vanilla MLP 7 LOKR", "MLP", peft.LoKrConfig, {"target_modules": "lin0", "rank_dropout": 0.5}),
    (
        "Vanilla MLP 8 LOKR",
        "MLP",
        peft.LoKrConfig,
        {"target_modules": "lin0", "decompose_both": True, "r": 1, "alpha": 1},
    ),
    ("Conv1d LOKR 1", "Conv1d", peft.LoKrConfig, {"target_modules": ["conv1d"]}),
    ("Conv1d LOKR 2", "Conv1d", peft.LoKrConfig, {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOKR", "Conv1dGroups", peft.LoKrConfig, {"target_modules": ["conv1d"], "r": 4}),
    (
        "Conv1d LOKR 3",
        "Conv1dBigger",
        peft.LoKrConfig,
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True},
    ),
    (
        "Conv1d LOKR 4",
        "Conv1dBigger",
        peft.LoKrConfig,
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False},
    ),
    ("Conv2d 1 LOKR", "Conv2d", peft.LoKrConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOKR", "Conv2d", peft.LoKrConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOKR", "Conv2d", peft.LoKrConfig, {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOKR", "Conv2d", peft.LoKrConfig, {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv2d 1x1 LOKR", "Conv2d1x1", peft.LoKrConfig, {"target_modules": ["conv2d"]}),
    (
        "Conv2d 5 LOKR",
        "Conv2d",
        peft.LoKrConfig,
        {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True},
    ),
    (
        "Conv2d 6 LOKR",
        "Conv2d",
        peft.LoKrConfig,
        {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_factor": 4},
    ),
    (
        "Conv2d 7 LOKR",
        "Conv2d",
        peft.LoKrConfig,
        {
            "target_modules": ["conv2d", "lin0"],
            "use_effective_conv2d": True,
            "decompose_both": True,
            "decompose_factor": 4,
        },
    ),
    ("Conv2d Groups LOKR", "Conv2dGroups", peft.LoKrConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOKR", "Conv2dGroups2", peft.LoKrConfig, {"target_modules": ["conv2d"]}),
    (
        "Vanilla MLP 1 OFT",
        "MLP",
        peft.OFTConfig,
        {"r": 2, "oft_block_size": 0, "target_modules": "lin0", "use_cayley_neumann": False},
    ),
    (
        "Vanilla MLP 2 OFT",
        "MLP",
        peft.OFTConfig,
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "use_cayley_neumann": False},
    ),
    (
        "Vanilla MLP 5 OFT",
        "MLP",
        peft.OFTConfig,
        {
            "r": 2,
            "oft_block_size": 0,
            "target_modules": ["lin0"],
            "modules_to_save": ["lin1"],
            "use_cayley_neumann": False,
        },
    ),
    (
        "Vanilla MLP 6 OFT",
        "MLP",
        peft.OFTConfig,
        {
            "r": 2,
            "oft_block_size": 0,
            "target_modules": ["lin0"],
            "module_dropout": 0.1,
            "use_cayley_neumann": False,
        },
    ),
    (
        "Vanilla MLP 7 OFT",
        "MLP",
        peft.OFTConfig,
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 1e-2},
    ),
    (
        "Vanilla MLP 8 OFT",
        "MLP",
        peft.OFTConfig,
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "block_share": True, "use_cayley_neumann": False},
    ),
    (
        "Vanilla MLP 9 OFT",
        "MLP",
        peft.OFTConfig,
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 1e-2, "block_share": True},
    ),
    (
        "Vanilla MLP 10 OFT",
        "MLP",
        peft.OFTConfig,
        {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": True},
    ),
    (
        "Vanilla MLP 11 OFT",
        "MLP",
        peft.OFTConfig,
        {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": False},
    ),
    (
        "Vanilla MLP 12 OFT",
        "MLP",
        peft.OFTConfig,
        {
            "r": 0,
            "oft_block_size": 2,
            "target_modules": ["lin0"],
            "coft": True,
            "eps": 1e-2,
            "block_share": True,
            "use_cayley_neumann": True,
        },
    ),
    (
        "Vanilla MLP 13 OFT",
        "MLP",
        peft.OFTConfig,
        {
            "r": 0,
            "oft_block_size": 2,
            "target_modules": ["lin0"],
            "coft": True,
            "eps": 1e-2,
            "block_share": True,
            "use_cayley_neumann": False,
        },
    ),
    (
        "Embedding + transformers Conv1D 1 OFT",
        "EmbConv1D",
        peft.OFTConfig,
        {"r": 1, "oft_block_size": 0, "target_modules": ["emb"]},
    ),
    (
        "Embedding + transformers Conv1D 2 OFT",
        "EmbConv1D",
        peft.OFTConfig,
        {"r": 1, "oft_block_size": 0, "target_modules": ["emb"], "block_share": True},
    ),
    ("Conv2d 1 OFT", "Conv2d", peft.OFTConfig, {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"]}),
    (
        "Conv2d 3 OFT",
        "Conv2d",
        peft.OFTConfig,
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True},
    ),
    (
        "Conv2d 4 OFT",
        "Conv2d",
        peft.OFTConfig,
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "block_share": True},
    ),
    (
        "Conv2d 5 OFT",
        "Conv2d",
        peft.OFTConfig,
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True, "block_share": True},
    ),
    ("Vanilla MLP 1 BOFT", "MLP", peft.BOFTConfig, {"target_modules": ["lin1"], "boft_block_size": 2}),
    (
        "Vanilla MLP 2 BOFT",
        "MLP",
        peft.BOFTConfig,
        {"target_modules": ["lin1"], "modules_to_save": ["lin0"], "boft_block_size": 2},
    ),
    (
        "Vanilla MLP 3 BOFT",
        "MLP",
        peft.BOFTConfig,
        {
            "target_modules": ["lin1"],
            "boft_block_size": 2,
            "boft_dropout": 0.1,
        },
    ),
    (
        "Vanilla MLP 4 BOFT",
        "MLP",
        peft.BOFTConfig,
        {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 1},
    ),
    (
        "Vanilla MLP 5 BOFT",
        "MLP",
        peft.BOFTConfig,
        {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 1},
    ),
    (
        "Vanilla MLP 6 BOFT",
        "MLP",
        peft.BOFTConfig,
        {"target_modules": ["lin1"], "boft_block_size": 10, "boft_block_num": 0, "boft_n_butterfly_factor": 2},
    ),
    (
        "Conv2d 1 BOFT",
        "Conv2d",
        peft.BOFTConfig,
        {"target_modules": ["conv2d"], "boft_block_size": 45, "boft_block_num": 0, "boft_n_butterfly_factor": 1},
    ),
    (
        "Conv2d 2 BOFT",
        "Conv2d",
        peft.BOFTConfig,
        {"target_modules": ["conv2d"], "boft_block_size": 0, "boft_block_num": 1, "boft_n_butterfly_factor": 1},
    ),
    (
        "MLP2 1 BOFT",
        "MLP2",
        peft.BOFTConfig,
        {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3},
    ),
    (
        "MLP2 2 BOFT",
        "MLP2",
        peft.BOFTConfig,
        {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3},
    ),
    (
        "Conv2d2 1 BOFT",
        "Conv2d2",
        peft.BOFTConfig,
        {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 2},
    ),
    (
        "Conv2d2 1 BOFT",
        "Conv2d2",
        peft.BOFTConfig,
        {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3},
    ),
    ("Vanilla MLP 1 VeRA", "MLP", peft.VeraConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 VeRA", "MLP", peft.VeraConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 VeRA", "MLP", peft.VeraConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 VeRA", "MLP", peft.VeraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 VeRA", "MLP", peft.VeraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Embedding + transformers Conv1D 1 VeRA", "EmbConv1D", peft.VeraConfig, {"target_modules": ["conv1d"]}),
    (
        "Vanilla MLP 1 VBLoRA",
        "MLP",
        peft.VBLoRAConfig,
        {"target_modules": "lin0", "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 2 VBLoRA",
        "MLP",
        peft.VBLoRAConfig,
        {"target_modules": ["lin0"], "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 3 VBLoRA",
        "MLP",
        peft.VBLoRAConfig,
        {"target_modules": ["lin1"], "vector_length": 2, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 4 VBLoRA",
        "MLP",
        peft.VBLoRAConfig,
        {"target_modules": ["lin0", "lin1"], "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 5 VBLoRA",
        "MLP",
        peft.VBLoRAConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Embedding + transformers Conv1D 1 VBLoRA",
        "EmbConv1D",
        peft.VBLoRAConfig,
        {"target_modules": ["conv1d"], "vector_length": 1, "num_vectors": 2},
    ),
    (
        "Vanilla MLP 1 AdaLoRA",
        "MLP",
        peft.AdaLoraConfig,
        {"target_modules": ["lin0"], "init_lora_weights": False, "total_step": 1, "orth_reg_weight": 0},
    ),
    (
        "Vanilla MLP 2 AdaLoRA",
        "MLP",
        peft.AdaLoraConfig,
        {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, "total_step": 1},
    ),
    (
        "Conv2d 1 AdaLoRA",
        "Conv2d",
        peft.AdaLoraConfig,
        {"target_modules": ["conv2d"], "init_lora_weights": False, "total_step": 1},
    ),
    (
        "Conv2d 2 AdaLoRA",
        "Conv2d",
        peft.AdaLoraConfig,
        {"target_modules": ["conv2d", "lin0"], "init_lora_weights": False, "total_step": 1},
    ),
]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class EmbConv1D(nn.Module):
    """An embedding and a Hugging Face ``Conv1D`` (a transposed linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(x))))))


class Conv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(x.float().reshape(-1, 1, 10))))))


class Conv2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(x.float().reshape(-1, 5, 3, 3))))))


class Conv2dGroups(nn.Module):
    """A grouped convolution (groups=8, so PEFT's default r=8 is divisible by it) between two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(h)))))


class Conv2dGroups2(nn.Module):
    """A grouped convolution (groups=2) with more output than input channels; as PEFT's, it ignores its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.arange(9 * 16 * 20 * 20, device=self.conv2d.weight.device).view(9, 16, 20, 20).float()
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(h)))))


class Conv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() == 2:  # a 2-D input becomes a 3-D volume
            x = torch.stack([x] * 3, dim=-1)
        return self.sm(self.lin0(self.flat(self.relu(self.conv3d(x.reshape(-1, 5, 3, 3, 3))))))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        h, _ = self.mha(x, x, x)
        return self.sm(self.lin0(h))


class LinearUsingParameter(nn.Module):
    """A linear layer that is not an ``nn.Linear``: only ``target_parameters`` can reach its weight."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearUsingParameter(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = LinearUsingParameter(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class MLP2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 32)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(32, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class Conv1dBigger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(64, 16, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(144, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.concat([x.float().reshape(-1, 1, 10)] * 64, dim=1)
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(x)))))


class Conv1dGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(8, 8, 3, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(64, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.concat([x.float().reshape(-1, 1, 10)] * 8, dim=1)
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(x)))))


class Conv2d2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 40)
        self.conv2d = nn.Conv2d(8, 32, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(32, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.lin0(x.float())).reshape(-1, 8, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(h)))))


class Conv2d1x1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(1, 10, kernel_size=(1, 1), padding=0)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10 * 3 * 3, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(x.float().reshape(-1, 1, 3, 3))))))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "EmbConv1D": EmbConv1D,
    "Conv1d": Conv1d,
    "Conv2d": Conv2d,
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2,
    "Conv3d": Conv3d,
    "MHA": MHA,
    "MlpUsingParameters": MlpUsingParameters,
    "MLP2": MLP2,
    "Conv1dBigger": Conv1dBigger,
    "Conv1dGroups": Conv1dGroups,
    "Conv2d2": Conv2d2,
    "Conv2d1x1": Conv2d1x1,
}
