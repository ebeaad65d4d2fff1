"""A LLaMA-family decoder in one file: GQA attention with RoPE, RMSNorm, SwiGLU, and a KV cache.

The same code runs LLaMA 1-3, Mistral (sliding-window attention) and Qwen2 (a bias on q, k and v only);
the differences are `Config` fields.

Weights follow Lit-GPT's names (see `lit_gpt/convert.py` for the HF mapping). The fused `attn.attn`
projection stores its rows grouped per query group: the q heads of group 0, then k0, v0, then the
q heads of group 1, and so on, so one view splits q, k and v without copying.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropbp.layer import DropBP
from lit_gpt.config import Config


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=build_norm(config),
            )
        )
        # Tied models (SmolLM2) have no head weight of their own: logits use the embedding matrix.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init for from-scratch tests and benchmarks (HF's LLaMA init: N(0, 0.02), norms at 1)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits for token ids `idx` of shape (B, T), or with `return_hidden` the final normed hidden states.

        Training's loss applies the head to the hidden states itself, a chunk of tokens at a time (lit_gpt/loss.py).

        Without `input_pos` the whole sequence is processed causally. With `input_pos` (T positions),
        keys and values are written to the KV cache set up by `set_kv_cache`, for generation.
        """
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        cos, sin = self.rope_cache(idx.device)
        window = self.config.sliding_window
        if input_pos is None:
            cos, sin, mask = cos[:T], sin[:T], None
            if window is not None and T > window:  # shorter sequences: plain causal, SDPA's fast path
                mask = attention_mask(torch.arange(T, device=idx.device), T, window)
        else:
            cos, sin = cos[input_pos], sin[input_pos]
            mask = attention_mask(input_pos, self.kv_cache_length, window)
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            if block.keep:  # Progressive Layer Dropping skips whole blocks in training (lit_gpt/methods/pld.py)
                x = block(x, cos, sin, mask, input_pos)
        x = self.transformer.ln_f(x)
        if return_hidden:
            return x
        if self.lm_head is None:
            return F.linear(x, self.transformer.wte.weight)
        return self.lm_head(x)

    # ------------------------------------------------------------------ caches
    def rope_cache(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Kept out of the buffers so that `.to(dtype)`, meta-device init and FSDP never touch it.
        if self._rope is None or self._rope[0].device != device:
            c = self.config
            self._rope = build_rope_cache(c.block_size, c.head_size, c.rope_base, device, c.rope_scaling)
        return self._rope

    @property
    def kv_cache_length(self) -> int:
        cache = self.transformer.h[0].attn.kv_cache
        if cache is None:
            raise RuntimeError("call `model.set_kv_cache(batch_size)` before passing `input_pos`")
        return cache.k.size(2)

    def set_kv_cache(
        self, batch_size: int, max_seq_length: int | None = None, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds block_size {self.config.block_size}")
        weight = self.transformer.wte.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, max_seq_length, self.config, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None


class Block(nn.Module):
    """One transformer layer made of two residual branches: norm + attention, and norm + MLP.

    Each branch runs through a DropBP layer, which may skip the branch's backward pass in training.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = build_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = build_norm(config)
        self.mlp = build_mlp(config)
        self.parallel_residual = config.parallel_residual
        # Their backward FLOPs, which allocation weighs, come from the cost model (lit_gpt/flops.py) at training time.
        self.dropbp_attn = DropBP(self.attention_branch, modules=(self.norm_1, self.attn), kind="attention")
        self.dropbp_mlp = DropBP(self.mlp_branch, modules=(self.norm_2, self.mlp), kind="mlp")
        self.keep, self.branch_scale = True, 1.0  # set per micro-batch by Progressive Layer Dropping

    def attention_branch(self, x, cos, sin, mask=None, input_pos=None) -> torch.Tensor:
        return self.attn(self.norm_1(x), cos, sin, mask, input_pos)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm_2(x))

    def forward(self, x, cos, sin, mask=None, input_pos=None) -> torch.Tensor:
        s = self.branch_scale  # x.add(y, alpha=s) is x + s * y in one kernel, and exactly x + y when s == 1
        if self.parallel_residual:
            return x.add(self.dropbp_attn(x, cos, sin, mask, input_pos), alpha=s).add(self.dropbp_mlp(x), alpha=s)
        x = x.add(self.dropbp_attn(x, cos, sin, mask, input_pos), alpha=s)
        return x.add(self.dropbp_mlp(x), alpha=s)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.attn = nn.Linear(config.n_embd, config.qkv_size, bias=config.bias or config.attn_bias)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, input_pos=None) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        # (B, T, groups, q_per_kv + 2, hs) -> (B, groups, q_per_kv + 2, T, hs)
        qkv = self.attn(x).view(B, T, c.n_query_groups, c.q_per_kv + 2, c.head_size).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((c.q_per_kv, 1, 1), dim=2)
        q = q.reshape(B, c.n_head, T, c.head_size)
        k = k.reshape(B, c.n_query_groups, T, c.head_size)
        v = v.reshape(B, c.n_query_groups, T, c.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache(input_pos, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=c.n_query_groups != c.n_head
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size))


class LLaMAMLP(nn.Module):
    """SwiGLU: proj(silu(fc_1 x) * fc_2 x), with fc_1 the gate and fc_2 the up projection."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class GptNeoxMLP(nn.Module):
    """The plain GELU MLP of GPT-NeoX-style parallel-residual models."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back, as HF's LlamaRMSNorm does."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_length: int, config: Config, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, config.n_query_groups, max_seq_length, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = self.k.to(k.dtype).index_copy_(2, input_pos, k)
        self.v = self.v.to(v.dtype).index_copy_(2, input_pos, v)
        return self.k, self.v


def build_norm(config: Config) -> nn.Module:
    if config.norm_class_name == "RMSNorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def build_mlp(config: Config) -> nn.Module:
    return {"LLaMAMLP": LLaMAMLP, "GptNeoxMLP": GptNeoxMLP}[config.mlp_class_name](config)


def attention_mask(query_pos: torch.Tensor, kv_length: int, window: int | None = None) -> torch.Tensor:
    """Which of `kv_length` cached positions each query position may attend to: (T, kv_length), True = attend.

    Causal, and with a sliding window only the last `window` positions, the query's own included (as HF's
    Mistral counts them). Built per call, so a 128k-token block size never needs a 128k x 128k table.
    """
    distance = query_pos[:, None] - torch.arange(kv_length, device=query_pos.device)[None, :]
    mask = distance >= 0
    return mask if window is None else mask & (distance < window)


def rope_frequencies(head_size: int, base: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """RoPE's head_size / 2 angular frequencies, with Llama 3's scaling when `scaling` holds its parameters."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    # Llama 3 slows the frequencies whose wavelength exceeds context / low by `factor` (longer contexts),
    # keeps those shorter than context / high (local detail), and blends the two linearly in between.
    wavelength = 2 * math.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def build_rope_cache(seq_len: int, head_size: int, base: float, device=None,
                     scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_size) in the rotate-half layout HF uses."""
    inv_freq = rope_frequencies(head_size, base, scaling, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
