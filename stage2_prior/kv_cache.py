"""Incremental decoding of a `GPTPrior` with a static, preallocated key/value cache.

x-transformers' own cache concatenates every layer's keys and values each step and walks its
general-purpose forward (dozens of feature checks per layer), which dominates a step of a small
prior on a CPU. `StaticKVDecoder` runs the same modules' weights (the norms, the feed-forwards and
the attention projections are x-transformers' own) through a lean loop: keys and values are
written in place into (B, H, L, Dh) buffers, rotary tables are computed once, and q/k/v come from
one fused matmul. It covers exactly the decoder `GPTPrior` builds (pre-norm, rotary or learned
positions, plain attention and GELU feed-forward); anything else is refused at construction so a
different layer layout cannot silently decode wrong. Tests check its logits against the full
forward pass.

`weights_dtype=torch.bfloat16` keeps bf16 copies of the matmul weights: sampling reads every
weight once per token, so on a CPU it is memory-bound and half the bytes is nearly twice the speed.
Norms, rotary, softmax and logits stay fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage2_prior.model import GPTPrior


def _check_supported(prior: GPTPrior) -> None:
    """Refuse any x-transformers layer layout this decoder does not reproduce exactly."""
    from x_transformers.x_transformers import Attention, FeedForward, LayerNorm, Residual

    wrapper, layers = prior.transformer, prior.transformer.attn_layers
    problems = []
    if type(wrapper.post_emb_norm).__name__ != "Identity" or type(wrapper.project_emb).__name__ != "Identity":
        problems.append("embedding norm/projection")
    if getattr(wrapper, "num_memory_tokens", 0):
        problems.append("memory tokens")
    if not isinstance(layers.final_norm, LayerNorm):
        problems.append(f"final norm {type(layers.final_norm).__name__}")
    for i, (norms, block, residual) in enumerate(layers.layers):
        pre, post_branch, post_main = norms
        if not isinstance(pre, LayerNorm) or post_branch is not None or post_main is not None:
            problems.append(f"layer {i}: norms other than one pre-LayerNorm")
        if type(residual) is not Residual or getattr(residual, "residual_scale", None) is not None \
                or getattr(residual, "scale_residual_constant", 1) != 1:
            problems.append(f"layer {i}: residual {type(residual).__name__}")
        if isinstance(block, Attention):
            opt = lambda name, default=None: getattr(block, name, default)  # noqa: E731 (older versions lack some)
            plain = (opt("kv_heads", block.heads) == block.heads and not opt("num_mem_kv", 0)
                     and not opt("qk_norm", False) and opt("to_v_gate") is None and opt("to_output_gate") is None
                     and not opt("head_scale", False) and opt("rotate_num_heads") in (None, block.heads)
                     and not opt("use_latent_q", False) and not opt("use_latent_kv", False)
                     and block.to_q.bias is None and block.to_out.bias is None)
            if not plain:
                problems.append(f"layer {i}: attention options beyond plain multi-head attention")
        elif not isinstance(block, FeedForward):
            problems.append(f"layer {i}: block {type(block).__name__}")
        else:
            ff = block.ff  # Sequential(Sequential(Linear, GELU), Dropout, Linear): no GLU, no post-act norm
            if not (len(ff) == 3 and isinstance(ff[0], nn.Sequential) and len(ff[0]) == 2
                    and isinstance(ff[0][0], nn.Linear) and isinstance(ff[0][1], nn.GELU)
                    and ff[0][1].approximate == "none" and isinstance(ff[2], nn.Linear)):
                problems.append(f"layer {i}: feed-forward other than Linear-GELU-Linear")
    if problems:
        raise NotImplementedError("StaticKVDecoder does not support this x-transformers layout: " + "; ".join(problems))


class StaticKVDecoder:
    """Decode `batch_size` sequences of up to `prior.seq_len` tokens, one `step` call at a time.

    `step(tokens (B, n))` feeds the next n input tokens (the condition token first) and returns the
    logits (B, V) of the last of them, in the model's own dtype. The first call may feed a prefix; later calls usually
    feed one token. `reset()` starts new sequences without reallocating.
    """

    @torch.no_grad()
    def __init__(self, prior: GPTPrior, batch_size: int, weights_dtype: torch.dtype | None = None):
        _check_supported(prior)
        config, wrapper = prior.config, prior.transformer
        layers = wrapper.attn_layers
        device = prior.level_offsets.device
        self.stream_dtype = wrapper.token_emb.emb.weight.dtype  # residual stream, norms, logits
        self.dtype = weights_dtype or self.stream_dtype          # matmul weights and the cache
        self.batch_size, self.max_len = batch_size, config.seq_len
        self.heads, self.dim_head = config.heads, config.dim // config.heads
        self.token_emb = wrapper.token_emb.emb.weight
        self.pos_emb = None
        if getattr(wrapper.pos_emb, "emb", None) is not None:   # learned absolute positions
            self.pos_emb = wrapper.pos_emb.emb.weight * wrapper.pos_emb.scale  # (L, dim), scaled once
        cast = lambda w: w.detach().to(self.dtype)  # noqa: E731
        self.blocks: list[tuple[str, nn.Module, tuple]] = []
        for norms, block, _ in layers.layers:
            if isinstance(block, nn.Module) and hasattr(block, "to_q"):
                qkv = cast(torch.cat([block.to_q.weight, block.to_k.weight, block.to_v.weight]))
                self.blocks.append(("attn", norms[0], (qkv, cast(block.to_out.weight))))
            else:
                (up, _act), _drop, down = block.ff
                self.blocks.append(("ff", norms[0], (cast(up.weight), None if up.bias is None else cast(up.bias),
                                                     cast(down.weight), None if down.bias is None else cast(down.bias))))
        self.final_norm, self.to_logits = layers.final_norm, cast(wrapper.to_logits.weight)
        n_attn = sum(kind == "attn" for kind, _, _ in self.blocks)
        shape = (n_attn, batch_size, self.heads, self.max_len, self.dim_head)
        self.keys = torch.empty(shape, dtype=self.dtype, device=device)
        self.values = torch.empty(shape, dtype=self.dtype, device=device)
        self.cos = self.sin = None
        if layers.rotary_pos_emb is not None:
            freqs, _ = layers.rotary_pos_emb(torch.arange(self.max_len, device=device))  # (1, L, rot_dim)
            freqs = freqs[0].to(torch.promote_types(freqs.dtype, self.stream_dtype))      # fp64 models stay fp64
            self.cos, self.sin = freqs.cos(), freqs.sin()                                # (L, rot_dim)
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def _rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary on the first rot_dim features of t (B, H, n, Dh); pairs are interleaved (x-transformers)."""
        rot_dim = cos.shape[-1]
        rot, rest = t[..., :rot_dim].to(cos.dtype), t[..., rot_dim:]
        pairs = rot.unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat(((rot * cos + rotated_half * sin).to(t.dtype), rest), dim=-1)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B, n = tokens.shape
        start, end = self.length, self.length + n
        if B != self.batch_size:
            raise ValueError(f"this decoder was built for batch size {self.batch_size}, got {B}")
        if end > self.max_len:
            raise ValueError(f"sequence would reach {end} tokens; the prior's maximum is {self.max_len}")
        x = F.embedding(tokens, self.token_emb)                          # (B, n, dim)
        if self.pos_emb is not None:
            x = x + self.pos_emb[start:end]
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[start:end], self.sin[start:end]
        # one query attends to every cached key; a prefix needs the causal mask within itself
        mask = None
        if n > 1:
            mask = torch.arange(end, device=x.device) <= torch.arange(start, end, device=x.device)[:, None]
        H, Dh, a = self.heads, self.dim_head, 0
        for kind, norm, weights in self.blocks:
            h = norm(x).to(self.dtype)
            if kind == "attn":
                qkv_w, out_w = weights
                q, k, v = F.linear(h, qkv_w).view(B, n, 3, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, n, Dh)
                if cos is not None:
                    q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
                self.keys[a, :, :, start:end] = k
                self.values[a, :, :, start:end] = v
                attended = F.scaled_dot_product_attention(q, self.keys[a, :, :, :end], self.values[a, :, :, :end],
                                                          attn_mask=mask)
                h = F.linear(attended.transpose(1, 2).reshape(B, n, H * Dh), out_w)
                a += 1
            else:
                up_w, up_b, down_w, down_b = weights
                h = F.linear(F.gelu(F.linear(h, up_w, up_b)), down_w, down_b)
            x = x + h.to(self.stream_dtype)
        self.length = end
        return F.linear(self.final_norm(x[:, -1]).to(self.dtype), self.to_logits).to(self.stream_dtype)
