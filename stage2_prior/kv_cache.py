"""Incremental decoding of a `GPTPrior` with a static, preallocated key/value cache.

x-transformers' own cache concatenates every layer's keys and values each step and walks its
general-purpose forward (dozens of feature checks per layer), which dominates a step of a small
prior on a CPU. `StaticKVDecoder` runs the same modules' weights (the norms, the feed-forwards and
the attention projections are x-transformers' own) through a lean loop: keys and values are
written in place, with one copy per layer, into one (layers, 2, B, H, L, Dh) buffer; rotary is one
small matmul by a per-position rotation matrix computed once; q/k/v come from one fused matmul; and
each norm is one `F.layer_norm` call. It covers exactly the decoder `GPTPrior` builds (pre-norm, rotary or learned
positions, plain attention and GELU feed-forward); anything else is refused at construction so a
different layer layout cannot silently decode wrong. Tests check its logits against the full
forward pass.

`weights_dtype=torch.bfloat16` keeps bf16 copies of the matmul weights: sampling reads every
weight once per token, so on a CPU it is memory-bound and half the bytes is nearly twice the speed.
Norms, rotary, softmax and logits stay fp32. On a CPU the matmul weights are also packed once into
a kernel's own layout (`packed_linear.PackedLinear`; `pack_weights=False` turns it off). Where the
package's native kernels build (`native_kernels`: x86-64 with AVX-512), a one-token step runs the
matmuls and the attention through them; the same step otherwise runs on torch operators.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage2_prior import native_kernels
from stage2_prior.model import GPTPrior
from stage2_prior.packed_linear import PackedLinear


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


def _layer_norm_weight(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """x-transformers' bias-free LayerNorm as (weight, eps) for one `F.layer_norm` call."""
    ln, gamma = getattr(norm, "ln", None), getattr(norm, "gamma", None)
    if not isinstance(ln, nn.LayerNorm) or ln.elementwise_affine or not isinstance(gamma, torch.Tensor) \
            or getattr(norm, "beta", None) is not None:
        raise NotImplementedError(f"StaticKVDecoder does not support this LayerNorm layout: {norm}")
    return (gamma + float(getattr(norm, "unit_offset", 0))).detach(), ln.eps


class StaticKVDecoder:
    """Decode `batch_size` sequences of up to `prior.seq_len` tokens, one `step` call at a time.

    `step(tokens (B, n))` feeds the next n input tokens (the condition token first) and returns the
    logits (B, V) of the last of them, in the model's own dtype. The first call may feed a prefix; later calls usually
    feed one token. `reset()` starts new sequences without reallocating.
    """

    @torch.no_grad()
    def __init__(self, prior: GPTPrior, batch_size: int, weights_dtype: torch.dtype | None = None,
                 pack_weights: bool = True):
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
        cast = lambda w: None if w is None else w.detach().to(self.dtype)  # noqa: E731
        linear = lambda w, b=None, act=None: PackedLinear(cast(w), cast(b), act, batch_size, pack_weights)  # noqa: E731
        self.blocks: list[tuple[str, tuple, tuple]] = []  # (kind, (norm weight, eps), linears)
        for norms, block, _ in layers.layers:
            if isinstance(block, nn.Module) and hasattr(block, "to_q"):
                qkv = torch.cat([block.to_q.weight, block.to_k.weight, block.to_v.weight])
                linears = (linear(qkv), linear(block.to_out.weight))
                self.blocks.append(("attn", _layer_norm_weight(norms[0]), linears))
            else:
                (up, _act), _drop, down = block.ff
                linears = (linear(up.weight, up.bias, "gelu"), linear(down.weight, down.bias))
                self.blocks.append(("ff", _layer_norm_weight(norms[0]), linears))
        self.final_norm, self.to_logits = _layer_norm_weight(layers.final_norm), linear(wrapper.to_logits.weight)
        n_attn = sum(kind == "attn" for kind, _, _ in self.blocks)
        # keys and values of a layer side by side, so one copy stores both
        self.cache = torch.zeros(n_attn, 2, batch_size, self.heads, self.max_len, self.dim_head,
                                 dtype=self.dtype, device=device)
        self.rotation = None
        if layers.rotary_pos_emb is not None:
            freqs, _ = layers.rotary_pos_emb(torch.arange(self.max_len, device=device))  # (1, L, rot_dim)
            freqs = freqs[0].to(torch.promote_types(freqs.dtype, self.stream_dtype))      # fp64 models stay fp64
            # x-transformers rotates interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) (each
            # angle repeated for both members): a row vector times a block-diagonal 2x2 rotation per pair,
            # one (rot_dim, rot_dim) matrix per position, so queries and keys rotate in one matmul
            cos, sin = freqs[:, ::2].cos(), freqs[:, ::2].sin()                      # (L, rot_dim / 2)
            even = torch.arange(0, freqs.shape[-1], 2, device=device)
            self.rotation = freqs.new_zeros(self.max_len, freqs.shape[-1], freqs.shape[-1])
            self.rotation[:, even, even], self.rotation[:, even + 1, even] = cos, -sin
            self.rotation[:, even, even + 1], self.rotation[:, even + 1, even + 1] = sin, cos
            self.rotary_cos, self.rotary_sin = cos.float().contiguous(), sin.float().contiguous()
        # one-token steps run on the native kernels when every matmul is packed for them and the
        # head size suits the attention kernel
        all_linears = [lin for _, _, linears in self.blocks for lin in linears] + [self.to_logits]
        self.native = (all(lin.backend == "native" for lin in all_linears)  # CPU, kernels built
                       and self.stream_dtype == torch.float32
                       and self.dim_head % 16 == 0 and self.dim_head <= 256)
        if self.native:  # activations between a layer's two matmuls, reused by every layer and step
            self.buffers = {(kind, first.out_features): torch.empty(
                                batch_size, first.out_features, dtype=torch.float32 if kind == "attn" else self.dtype)
                            for kind, _, (first, _second) in self.blocks}  # fused q, k, v; the GELU output
            self.attended = torch.empty(batch_size, self.heads * self.dim_head, dtype=self.dtype)
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B, n = tokens.shape
        start, end = self.length, self.length + n
        if B != self.batch_size:
            raise ValueError(f"this decoder was built for batch size {self.batch_size}, got {B}")
        if end > self.max_len:
            raise ValueError(f"sequence would reach {end} tokens; the prior's maximum is {self.max_len}")
        if n == 1 and self.native:
            return self._native_step(tokens[:, 0])
        x = F.embedding(tokens, self.token_emb)                          # (B, n, dim)
        if self.pos_emb is not None:
            x += self.pos_emb[start:end]
        rotation = None if self.rotation is None else self.rotation[start:end]   # (n, rot_dim, rot_dim)
        # one query attends to every cached key; a prefix needs the causal mask within itself
        mask = None
        if n > 1:
            mask = torch.arange(end, device=x.device) <= torch.arange(start, end, device=x.device)[:, None]
        H, Dh, dim, a = self.heads, self.dim_head, x.shape[-1], 0
        for kind, (norm_weight, eps), linears in self.blocks:
            h = F.layer_norm(x, (dim,), norm_weight, None, eps).to(self.dtype)
            if kind == "attn":
                to_qkv, to_out = linears
                qkv = to_qkv(h).view(B, n, 3, H, Dh)
                if rotation is not None:  # in place on the first rot_dim features of queries and keys
                    qk = qkv[:, :, :2, :, :rotation.shape[-1]]
                    if n == 1:  # the decode step: one small matmul
                        rotated = torch.mm(qk.to(rotation.dtype).reshape(-1, rotation.shape[-1]), rotation[0])
                        qk.copy_(rotated.view(qk.shape))
                    else:
                        qk.copy_(torch.einsum("bntHr,nrs->bntHs", qk.to(rotation.dtype), rotation))
                layer_cache = self.cache[a]                                  # (2, B, H, L, Dh)
                layer_cache[:, :, :, start:end] = qkv[:, :, 1:].permute(2, 0, 3, 1, 4)
                q = qkv[:, :, 0].transpose(1, 2)                             # (B, H, n, Dh)
                attended = F.scaled_dot_product_attention(q, layer_cache[0, :, :, :end], layer_cache[1, :, :, :end],
                                                          attn_mask=mask)
                h = to_out(attended.transpose(1, 2).reshape(B, n, H * Dh))
                a += 1
            else:
                up_gelu, down = linears
                h = down(up_gelu(h))
            x += h.to(self.stream_dtype)
        self.length = end
        norm_weight, eps = self.final_norm
        return self.to_logits(F.layer_norm(x[:, -1], (dim,), norm_weight, None, eps).to(self.dtype)).to(self.stream_dtype)

    def _native_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """`step` for one token per sequence on the native kernels. The fp32 residual stream `x` is
        layer-normed inside the next matmul's call and takes each branch's output as an in-place add;
        the intermediate activations live in buffers reused every step."""
        B, position = tokens.shape[0], self.length
        H, Dh, a = self.heads, self.dim_head, 0
        x = F.embedding(tokens, self.token_emb)                           # (B, dim), a new tensor
        if self.pos_emb is not None:
            x += self.pos_emb[position]
        cos = sin = None
        if self.rotation is not None:
            cos, sin = self.rotary_cos[position], self.rotary_sin[position]
        run = native_kernels.linear
        for kind, norm, (first, second) in self.blocks:
            middle = self.buffers[kind, first.out_features]
            if kind == "attn":
                run(x, first.packed, first.out_features, None, False, middle, norm=norm)        # fused q, k, v
                native_kernels.attention(middle.view(B, 3, H, Dh), cos, sin, self.cache[a], position, self.attended)
                run(self.attended, second.packed, second.out_features, None, False, x, accumulate=True)
                a += 1
            else:
                run(x, first.packed, first.out_features, first.bias_fp32, True, middle, norm=norm)  # GELU fused
                run(middle, second.packed, second.out_features, second.bias_fp32, False, x, accumulate=True)
        self.length = position + 1
        logits = x.new_empty(B, self.to_logits.out_features)
        return run(x, self.to_logits.packed, self.to_logits.out_features, None, False, logits, norm=self.final_norm)
