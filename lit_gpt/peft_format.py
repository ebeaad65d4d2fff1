"""LoRA adapters in PEFT's format and back, through one name table (`LORA_MODULES`) used both ways.

PEFT names an adapter `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`; lit_gpt names it
`transformer.h.N.attn.attn.lora_A`, with q, k and v fused into one linear whose rows are grouped per query group
(the q heads of group 0, k0, v0, the q heads of group 1, ...).

- Export splits the fused `lora_B` by rows like the base weight and copies the shared `lora_A` to q, k and v
  (B_q A, B_k A, B_v A are the fused update's blocks).
- Import inverts that exactly when the three `lora_A` are equal (adapters this project exported). PEFT's own
  adapters have one `lora_A` per projection; the fused adapter then stacks them, A = [A_q; A_k; A_v], and puts
  B_q, B_k and B_v on their own rows and columns of B, so B A is the same update at rank 3r. Every other adapter
  is padded with zeros to that rank and alpha grows with it, so alpha / r and every B A stay as they were.
"""

from __future__ import annotations

import re
from dataclasses import asdict

import torch

from lit_gpt.config import Config
from lit_gpt.convert import fuse_qkv, split_qkv
from lit_gpt.lora import LoRAConfig
from lit_gpt.utils import UserError

# (LoRAConfig switch, lit linear, the PEFT modules it stands for). Layer modules sit under transformer.h.N. in lit
# and model.layers.N. in PEFT; lm_head is at the top level in both.
LORA_MODULES = (
    ("qkv", "attn.attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("projection", "attn.proj", ("self_attn.o_proj",)),
    ("mlp", "mlp.fc_1", ("mlp.gate_proj",)),
    ("mlp", "mlp.fc_2", ("mlp.up_proj",)),
    ("mlp", "mlp.proj", ("mlp.down_proj",)),
    ("head", "lm_head", ("lm_head",)),
)
LIT_TO_PEFT = {lit: peft for _, lit, peft in LORA_MODULES}
PEFT_TO_LIT = {peft: lit for _, lit, modules in LORA_MODULES for peft in modules}
SWITCHES = {lit: switch for switch, lit, _ in LORA_MODULES}
TOP_LEVEL = "lm_head"
PREFIX = "base_model.model."
_LIT_NAME = re.compile(r"(?:transformer\.h\.(\d+)\.)?(.+)\.(lora_A|lora_B)$")
_PEFT_NAME = re.compile(r"(?:model\.layers\.(\d+)\.)?(.+?)\.(lora_A|lora_B)\.weight$")
_QKV = LIT_TO_PEFT["attn.attn"]
SUPPORTED = ", ".join(PEFT_TO_LIT)


# ---------------------------------------------------------------------- lit -> PEFT
def to_peft(adapters: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Lit LoRA tensors (`transformer.h.0.attn.attn.lora_A`, ...) as PEFT ones (`...q_proj.lora_A.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in adapters.items():
        match = _LIT_NAME.fullmatch(name)
        if match is None or (match.group(1) is None) != (match.group(2) == TOP_LEVEL):
            raise UserError(f"unexpected tensor {name!r} in the LoRA checkpoint")
        index, module, kind = match.groups()
        if module not in LIT_TO_PEFT:
            raise UserError(f"LoRA on {module!r} has no PEFT counterpart")
        if module == "attn.attn":
            parts = split_qkv(value, config) if kind == "lora_B" else (value, value, value)
        elif module == TOP_LEVEL and kind == "lora_B":
            parts = (value[: config.vocab_size],)  # the HF head has no padding rows
        else:
            parts = (value,)
        where = "" if index is None else f"model.layers.{index}."
        for peft_module, part in zip(LIT_TO_PEFT[module], parts):
            out[f"{PREFIX}{where}{peft_module}.{kind}.weight"] = part
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# ---------------------------------------------------------------------- PEFT -> lit
def check_adapter_config(adapter_config: dict) -> tuple[int, float, float]:
    """(r, alpha, dropout) of a PEFT LoRA config that lit_gpt's LoRAConfig can hold; a one-line UserError if not."""
    if adapter_config.get("peft_type") != "LORA":
        raise UserError(f"the adapter is PEFT type {adapter_config.get('peft_type')!r}; only LORA adapters import")
    refused = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas", "use_dora": "DoRA",
               "use_rslora": "rank-stabilised scaling", "fan_in_fan_out": "fan_in_fan_out weights",
               "modules_to_save": "fully trained modules", "layer_replication": "replicated layers",
               "target_parameters": "LoRA on parameters", "trainable_token_indices": "trainable tokens"}
    for key, what in refused.items():
        if adapter_config.get(key):
            raise UserError(f"the adapter uses {what} ({key}), which lit_gpt's LoRA (one rank and alpha, "
                            "plain linears) cannot represent")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        raise UserError("the adapter trains biases (bias / lora_bias), which lit_gpt's LoRA cannot represent")
    r, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise UserError(f"adapter_config.json needs an integer r >= 1 and a number lora_alpha (got {r!r}, {alpha!r})")
    return r, float(alpha), float(adapter_config.get("lora_dropout") or 0.0)


def from_peft(tensors: dict[str, torch.Tensor], adapter_config: dict, config: Config,
              base_state: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """PEFT adapter tensors as lit LoRA tensors, and the LoRAConfig that builds the model they load into.

    `base_state` is the base checkpoint's lit state dict, against which saved copies of the base's embedding and
    head (PEFT saves them when lm_head is a target) are checked.
    """
    r, alpha, dropout = check_adapter_config(adapter_config)
    tensors = _without_base_copies(tensors, base_state or {}, config)
    pairs = _pairs(tensors, r)
    switches = {SWITCHES[PEFT_TO_LIT[module]] for _, module in pairs}
    if "head" in switches and config.tie_embeddings:
        raise UserError("the adapter has LoRA on lm_head, but this model ties lm_head to the embedding, where "
                        "lit_gpt has no LoRA")
    lit: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = sorted({index for index, _ in pairs}, key=lambda i: -1 if i is None else i)
    for index in layers:
        where = "" if index is None else f"transformer.h.{index}."
        for lit_module, peft_modules in LIT_TO_PEFT.items():
            present = {m: pairs[(index, m)] for m in peft_modules if (index, m) in pairs}
            if not present:
                continue
            if lit_module == "attn.attn":
                lit[f"{where}{lit_module}"] = _fused_qkv(present, config)
            elif lit_module == TOP_LEVEL:
                a, b = present[TOP_LEVEL]
                lit[f"{where}{lit_module}"] = (a, _pad_rows(b, config.padded_vocab_size))
            else:
                (lit[f"{where}{lit_module}"],) = present.values()
    rank = max(a.shape[0] for a, _ in lit.values())
    lora = LoRAConfig(r=rank, alpha=alpha * rank / r, dropout=dropout, **{s: s in switches for s in SWITCHES.values()})
    return _complete(lit, lora, config), lora


# Base weights PEFT may save beside the adapters (`save_embedding_layers`), as the lit weights they copy.
_BASE_COPIES = {"model.embed_tokens.base_layer.weight": "transformer.wte.weight",
                "lm_head.base_layer.weight": "lm_head.weight"}


def _without_base_copies(tensors: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor], config: Config,
                         ) -> dict[str, torch.Tensor]:
    """The adapter tensors without saved copies of base weights, each checked to equal the base's own."""
    kept = {}
    for name, value in tensors.items():
        lit_name = _BASE_COPIES.get(name.removeprefix(PREFIX))
        if lit_name is None:
            kept[name] = value
            continue
        if config.tie_embeddings:
            lit_name = "transformer.wte.weight"
        base = base_state.get(lit_name)
        if base is None or not torch.equal(base[: config.vocab_size].to(value.dtype), value):
            raise UserError(f"the adapter carries its own {name.removeprefix(PREFIX)}, which differs from the base "
                            "checkpoint's: lit_gpt's LoRA cannot hold changed base weights; pass the base it was "
                            "trained on")
    return kept


def _pairs(tensors: dict[str, torch.Tensor], r: int) -> dict[tuple[int | None, str], tuple[torch.Tensor, ...]]:
    """{(layer or None, PEFT module): (lora_A, lora_B)}, every name and rank checked."""
    found: dict[tuple[int | None, str], dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        match = _PEFT_NAME.fullmatch(name.removeprefix(PREFIX)) if name.startswith(PREFIX) else None
        if match is None:
            raise UserError(f"the adapter holds {name!r}, which is no LoRA A/B weight of a linear layer "
                            f"(lit_gpt's LoRA covers {SUPPORTED})")
        index, module, kind = match.groups()
        if module not in PEFT_TO_LIT or (index is None) != (module == TOP_LEVEL):
            raise UserError(f"the adapter has LoRA on {module!r}, which lit_gpt's LoRA cannot hold "
                            f"(it covers {SUPPORTED})")
        rank = value.shape[0] if kind == "lora_A" else value.shape[-1]
        if value.ndim != 2 or rank != r:
            raise UserError(f"{name} has rank {rank}, not the adapter's r = {r}: lit_gpt's LoRA uses one rank for "
                            "every module")
        found.setdefault((None if index is None else int(index), module), {})[kind] = value
    if not found:
        raise UserError("the adapter holds no LoRA weights")
    for (index, module), kinds in found.items():
        if len(kinds) != 2:
            raise UserError(f"the adapter has only {', '.join(kinds)} for {module} in layer {index}: it is "
                            "incomplete")
    return {key: (kinds["lora_A"], kinds["lora_B"]) for key, kinds in found.items()}


def _fused_qkv(present: dict[str, tuple[torch.Tensor, torch.Tensor]], config: Config,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused query/key/value adapter whose update is exactly the PEFT q, k and v updates (see the top)."""
    a_parts = [a for a, _ in present.values()]
    rows = dict(zip(_QKV, (config.n_head * config.head_size, config.n_query_groups * config.head_size,
                           config.n_query_groups * config.head_size)))
    for module, (a, b) in present.items():
        if a.shape[1] != config.n_embd or b.shape[0] != rows[module]:
            raise UserError(f"the adapter does not fit this base model ({module}: lora_A {tuple(a.shape)}, lora_B "
                            f"{tuple(b.shape)}); pass the checkpoint_dir of the model it was trained on")
    if len(present) == 3 and all(torch.equal(a_parts[0], a) for a in a_parts[1:]):
        return a_parts[0], fuse_qkv(*(present[m][1] for m in _QKV), config)  # one shared A: the exact inverse
    r = a_parts[0].shape[0]
    dtype = a_parts[0].dtype
    b_parts = []
    for module, out_rows in rows.items():
        b = torch.zeros(out_rows, r * len(present), dtype=dtype)
        if module in present:
            column = list(present).index(module) * r
            b[:, column : column + r] = present[module][1]
        b_parts.append(b)
    return torch.cat(a_parts), fuse_qkv(*b_parts, config)


def _pad_rows(b: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat((b, b.new_zeros(rows - b.shape[0], b.shape[1]))) if b.shape[0] < rows else b


def _complete(lit: dict[str, tuple[torch.Tensor, torch.Tensor]], lora: LoRAConfig, config: Config,
              ) -> dict[str, torch.Tensor]:
    """Every adapter `lora` gives the model, at rank `lora.r`: zeros where PEFT had none (B A = 0, exactly)."""
    from lit_gpt.lora import add_lora, lora_state_dict
    from lit_gpt.model import GPT

    with torch.device("meta"):
        expected = {k: v.shape for k, v in lora_state_dict(add_lora(GPT(config), lora)).items()}
    dtype = next(iter(lit.values()))[0].dtype
    padded = {}
    for module, (a, b) in lit.items():
        padded[f"{module}.lora_A"] = _pad_rows(a, lora.r)
        padded[f"{module}.lora_B"] = _pad_rows(b.T, lora.r).T.contiguous()
    unexpected = sorted(set(padded) - set(expected))
    wrong = [k for k in expected if k in padded and padded[k].shape != expected[k]]
    if unexpected or wrong:
        name = (unexpected or wrong)[0]
        detail = f"shape {tuple(padded[name].shape)} where the model has {tuple(expected[name])}" if wrong else \
            "a module the model does not have"
        raise UserError(f"the adapter does not fit this base model ({name}: {detail}); pass the checkpoint_dir of "
                        "the model it was trained on")
    return {k: padded.get(k, torch.zeros(shape, dtype=dtype)) for k, shape in expected.items()}


def lora_hyperparameters(lora: LoRAConfig, checkpoint_dir: str) -> dict:
    """The hyperparameters.yaml of an imported adapter: what load_finetuned and merge_lora read."""
    return {"finetuning": "lora", "checkpoint_dir": checkpoint_dir, "lora": asdict(lora)}
