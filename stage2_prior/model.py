"""The stage-2 prior: a decoder-only GPT over the tokenizer's integer codes (LlamaGen-style c2i).

The GPT never sees images or the tokenizer, only codes. A code grid (B, h, w) or (B, h, w, D) is
flattened position-major, depth-minor into L = h*w*D tokens; a code c at depth d becomes token
`offset[d] + c`. Class k is token `vocab_size + k` and the null (unconditional) class is
`vocab_size + num_classes`; the condition token starts the sequence:

    input   [cond, t_0, ..., t_{L-2}]  ->  targets [t_0, ..., t_{L-1}]

Public API: `PriorConfig`, `CodePrior` (what every prior type shares: the token layout,
`flatten_codes` / `unflatten_tokens`, `cond_tokens`, `save_pretrained` / `from_pretrained`,
`estimate_mfu`), `GPTPrior` (the autoregressive one), `PriorLoadError`, `PRIOR_SIZES`. The masked
(MaskGIT) prior is `stage2_prior.masked.MaskedPrior`; `stage2_prior.load_prior` loads either type.
Sampling lives in `stage2_prior.sample.generate`.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file

from common import ConfigError, atomic_dir, config_from_dict, config_to_dict
from common.pretrained import load_strict_state, read_pretrained_config

with warnings.catch_warnings():  # x-transformers' attend.py uses the deprecated torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from x_transformers import Decoder, TransformerWrapper

MODEL_TYPE = "vqgan-prior"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PRIOR_TYPES = ("ar", "masked")  # autoregressive GPT | MaskGIT-style masked-token prior
MASK_SCHEDULES = ("cosine", "linear", "square")
POSITIONS = ("rotary", "learned")

# LlamaGen's GPT sizes (autoregressive/models/gpt.py), for `PriorConfig(**PRIOR_SIZES["GPT-B"], ...)`
PRIOR_SIZES = {
    "GPT-B": dict(dim=768, depth=12, heads=12),
    "GPT-L": dict(dim=1024, depth=24, heads=16),
    "GPT-XL": dict(dim=1280, depth=36, heads=20),
}


@dataclass
class PriorConfig:
    prior_type: str = "ar"                  # "ar" (GPTPrior) | "masked" (MaskedPrior, MaskGIT)
    vocab_sizes: tuple[int, ...] = (1024,)  # vocabulary of each code level (from the tokenizer)
    code_shape: tuple[int, ...] = (16, 16)  # (h, w) or (h, w, D): D codes per position
    num_classes: int = 0                    # 0 = unconditional
    class_dropout: float = 0.1              # label dropout for classifier-free guidance (LlamaGen)
    dim: int = 512
    depth: int = 8
    heads: int = 8
    dropout: float = 0.0
    positions: str | None = None            # "rotary" | "learned"; None: rotary for ar, learned for masked
    mask_schedule: str = "cosine"           # masked prior: fraction still masked, in training and decoding

    def __post_init__(self) -> None:
        self.vocab_sizes = tuple(self.vocab_sizes)
        self.code_shape = tuple(self.code_shape)
        if self.prior_type not in PRIOR_TYPES:
            raise ValueError(f"prior_type={self.prior_type!r} is not supported; expected one of {list(PRIOR_TYPES)}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule={self.mask_schedule!r} is not supported; "
                             f"expected one of {list(MASK_SCHEDULES)}")
        if self.positions is None:
            # a bidirectional model needs to know where each [MASK] is: with rotary positions alone the
            # masked prior learns several times slower (MaskGIT uses learned absolute positions)
            self.positions = "learned" if self.prior_type == "masked" else "rotary"
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r} is not supported; expected one of {list(POSITIONS)}")
        if len(self.code_shape) not in (2, 3) or any(int(s) < 1 for s in self.code_shape):
            raise ValueError(f"code_shape={list(self.code_shape)} must be (h, w) or (h, w, D) with positive sizes")
        if not self.vocab_sizes or any(int(v) < 1 for v in self.vocab_sizes):
            raise ValueError(f"vocab_sizes={list(self.vocab_sizes)} must be one or more positive sizes")
        if len(self.vocab_sizes) not in (1, self.code_depth):
            raise ValueError(f"vocab_sizes={list(self.vocab_sizes)} must have 1 entry (shared) or one per code "
                             f"level (D={self.code_depth} from code_shape={list(self.code_shape)})")
        if self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout={self.class_dropout} must lie in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.depth < 1 or self.heads < 1 or self.dim < 1:
            raise ValueError(f"dim={self.dim}, depth={self.depth}, heads={self.heads} must all be positive")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")

    @property
    def code_depth(self) -> int:
        """D: codes per grid position (1 for (h, w))."""
        return self.code_shape[2] if len(self.code_shape) == 3 else 1

    @property
    def seq_len(self) -> int:
        """L = h * w * D."""
        return math.prod(self.code_shape)

    @property
    def vocab_size(self) -> int:
        """Total code tokens: the sum over levels (levels share one vocabulary when len(vocab_sizes) == 1)."""
        return sum(self.vocab_sizes)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Vocabulary of each depth 0..D-1."""
        return self.vocab_sizes if len(self.vocab_sizes) > 1 else self.vocab_sizes * self.code_depth

    @property
    def null_token(self) -> int:
        """The unconditional / start token, after the code and class tokens."""
        return self.vocab_size + self.num_classes


class PriorLoadError(ValueError):
    """A pretrained prior directory is missing, malformed, or was trained on another tokenizer's codes."""


def _check_class_names(names: object, num_classes: int, error: type[Exception], where: str) -> None:
    """None, or one distinct non-empty string per class id."""
    if names is None:
        return
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names) or len(names) != num_classes:
        raise error(f"{where} must be null or a list of {num_classes} distinct non-empty strings "
                    f"(one per class id), got {names!r}")


class CodePrior(nn.Module):
    """What every prior type shares: the token layout (codes with level offsets, class tokens, the null
    token), level masking, the condition tokens, size/MFU estimates and the checkpoint format.
    Subclasses set PRIOR_TYPE, build `self.transformer` (an x-transformers `TransformerWrapper`) and
    define `forward(codes, labels) -> (logits, loss)`."""

    PRIOR_TYPE = ""

    def __init__(self, config: PriorConfig):
        super().__init__()
        if config.prior_type != self.PRIOR_TYPE:
            raise ValueError(f"{type(self).__name__} builds prior_type={self.PRIOR_TYPE!r} priors, got a config "
                             f"with prior_type={config.prior_type!r}; use stage2_prior.build_prior(config)")
        self.config = config
        self.tokenizer_hash: str = ""             # set by from_pretrained
        self.tokenizer_config: dict | None = None
        self.class_names: list[str] | None = None  # names of class ids 0..num_classes-1, when the data had them
        V, L, D = config.vocab_size, config.seq_len, config.code_depth
        # token id offset and allowed-token row of each depth; position p has depth p % D
        shared = len(config.vocab_sizes) == 1
        offsets = [0] * D if shared else [sum(config.vocab_sizes[:d]) for d in range(D)]
        allowed = torch.zeros(D, V, dtype=torch.bool)
        for d, (start, size) in enumerate(zip(offsets, config.level_sizes)):
            allowed[d, start:start + size] = True
        self.register_buffer("level_offsets", torch.tensor(offsets), persistent=False)          # (D,)
        self.register_buffer("level_sizes", torch.tensor(config.level_sizes), persistent=False)  # (D,)
        self.register_buffer("level_allowed", allowed, persistent=False)                        # (D, V)
        self.register_buffer("position_depth", torch.arange(L) % D, persistent=False)           # (L,)
        self.has_level_mask = not shared  # separate vocabularies: mask other levels' logits

    def _transformer(self, layers: type, num_tokens: int, max_seq_len: int) -> TransformerWrapper:
        """The x-transformers model of a subclass: `layers` (Decoder or Encoder) of the config's size;
        logits over the code tokens only (classes, null and [MASK] are never predicted)."""
        c = self.config
        rotary = c.positions == "rotary"
        return TransformerWrapper(
            num_tokens=num_tokens, max_seq_len=max_seq_len, logits_dim=c.vocab_size,
            use_abs_pos_emb=not rotary, emb_dropout=c.dropout,
            attn_layers=layers(dim=c.dim, depth=c.depth, heads=c.heads, attn_dim_head=c.dim // c.heads,
                               attn_flash=True, rotary_pos_emb=rotary, attn_dropout=c.dropout,
                               ff_dropout=c.dropout, verbose=False))

    def _init_transformer(self) -> None:
        """nanoGPT init for the transformer the subclass built."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("to_out.weight") or name.endswith("ff.2.weight"):
                # GPT-2 / nanoGPT: scale residual projections by 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.depth))

    def _init_weights(self, module: nn.Module) -> None:
        # nanoGPT init; x-transformers' defaults are PyTorch's kaiming-uniform Linear and a kaiming-normal
        # token embedding (std sqrt(2/dim), large for a GPT). The learned position embedding keeps its
        # own init: x-transformers multiplies it by dim ** -0.5.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and module is self.transformer.token_emb.emb:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def prior_type(self) -> str:
        return self.config.prior_type

    @property
    def code_shape(self) -> tuple[int, ...]:
        return self.config.code_shape

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ---- codes <-> tokens ---------------------------------------------------------------------
    def flatten_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *code_shape) or (B, L), without offsets -> token ids (B, L) with level offsets."""
        shape, L = self.config.code_shape, self.config.seq_len
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if tuple(codes.shape[1:]) == shape:
            codes = codes.reshape(codes.shape[0], L)   # raster over (h, w), then the D codes of each position
        elif codes.dim() != 2 or codes.shape[1] != L:
            raise ValueError(f"codes must have shape (B, {', '.join(map(str, shape))}) or (B, {L}), "
                             f"got {tuple(codes.shape)}")
        codes = codes.long()
        sizes = self.level_sizes[self.position_depth]  # (L,)
        bad = (codes < 0) | (codes >= sizes)
        if bad.any():
            b, p = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"code {int(codes[b, p])} at sequence position {p} (depth {p % self.config.code_depth}) "
                             f"is out of range [0, {int(sizes[p])}) for its level")
        return codes + self.level_offsets[self.position_depth]

    def unflatten_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids (B, L) with offsets -> codes (B, *code_shape) without offsets."""
        codes = tokens.long() - self.level_offsets[self.position_depth]
        return codes.reshape(tokens.shape[0], *self.config.code_shape)

    def cond_tokens(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Class ids (B,) or None -> condition tokens (B,); None = the null (unconditional) token."""
        config = self.config
        device = self.level_offsets.device
        if labels is None:
            return torch.full((batch_size,), config.null_token, dtype=torch.long, device=device)
        if config.num_classes == 0:
            raise ValueError("labels were given to an unconditional prior (num_classes=0); pass labels=None")
        labels = torch.as_tensor(labels, device=device)
        if labels.dim() != 1 or labels.shape[0] != batch_size or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be integer class ids of shape ({batch_size},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= config.num_classes):
            raise ValueError(f"class ids must lie in [0, {config.num_classes}), "
                             f"got range [{int(labels.min())}, {int(labels.max())}]")
        return labels.long() + config.vocab_size

    def drop_labels(self, cond: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Training-time label dropout (LlamaGen): condition tokens replaced by the null token with
        probability class_dropout, so the model also learns p(codes), which guidance needs."""
        if self.training and labels is not None and self.config.class_dropout > 0:
            drop = torch.rand(cond.shape[0], device=cond.device) < self.config.class_dropout
            cond = cond.masked_fill(drop, self.config.null_token)
        return cond

    def mask_logits(self, logits: torch.Tensor, positions: slice | int = slice(None)) -> torch.Tensor:
        """Set the logits of other levels' tokens to -inf; logits (B, n, V) for sequence `positions`."""
        if not self.has_level_mask:
            return logits
        allowed = self.level_allowed[self.position_depth[positions]]  # (n, V) or (V,)
        return logits.masked_fill(~allowed, float("-inf"))

    # ---- size and speed -----------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; `non_embedding` leaves out the learned position embedding (nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        pos_emb = getattr(self.transformer.pos_emb, "emb", None)
        if non_embedding and isinstance(pos_emb, nn.Embedding):
            n -= pos_emb.weight.numel()
        return n

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward: 6N + 12 * depth * dim * L (PaLM appendix B, nanoGPT)."""
        c = self.config
        return 6.0 * self.num_parameters(non_embedding=True) + 12.0 * c.depth * c.dim * c.seq_len

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the accelerator's peak FLOP/s."""
        return self.estimate_flops_per_token() * tokens_per_second / peak_flops

    # ---- save / load --------------------------------------------------------------------------
    def config_dict(self, tokenizer_hash: str, tokenizer_config: dict | None) -> dict:
        meta = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, "config": config_to_dict(self.config),
                "tokenizer_hash": tokenizer_hash, "tokenizer_config": tokenizer_config}
        if self.class_names is not None:  # optional: checkpoints without it load with class_names None
            meta["class_names"] = list(self.class_names)
        return meta

    def save_pretrained(self, directory: str | Path, *, tokenizer_hash: str,
                        tokenizer_config: dict | None = None) -> Path:
        """Write config.json (with the hash of the tokenizer whose codes it models, and `class_names` when
        set) + model.safetensors atomically."""
        if not isinstance(tokenizer_hash, str) or not tokenizer_hash:
            raise ValueError("save_pretrained needs tokenizer_hash: the content_hash() of the tokenizer "
                             "whose codes this prior was trained on")
        _check_class_names(self.class_names, self.config.num_classes, ValueError, "class_names")
        directory = Path(directory)
        meta = self.config_dict(tokenizer_hash, tokenizer_config)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(directory) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"model_type": MODEL_TYPE})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, tokenizer_hash: str | None = None,
                        device: str | torch.device = "cpu") -> "CodePrior":
        """Load a directory written by `save_pretrained`; every mismatch is a PriorLoadError.

        With `tokenizer_hash`, also check that the prior was trained on that tokenizer's codes."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        meta = read_pretrained_config(directory, CONFIG_NAME, MODEL_TYPE, PriorLoadError)
        known = {"model_type", "format_version", "config", "tokenizer_hash", "tokenizer_config", "class_names"}
        unknown = sorted(set(meta) - known)
        if unknown:
            raise PriorLoadError(f"{config_path}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise PriorLoadError(f"{config_path}: format_version {meta.get('format_version')!r} is not supported "
                                 f"(this code reads version {FORMAT_VERSION})")
        recorded = meta.get("tokenizer_hash")
        if not isinstance(recorded, str) or not recorded:
            raise PriorLoadError(f"{config_path}: 'tokenizer_hash' must be the non-empty content hash of the "
                                 f"tokenizer the prior was trained on, got {recorded!r}")
        tokenizer_config = meta.get("tokenizer_config")
        if tokenizer_config is not None and not isinstance(tokenizer_config, dict):
            raise PriorLoadError(f"{config_path}: 'tokenizer_config' must be an object or null")
        if tokenizer_hash is not None and tokenizer_hash != recorded:
            raise PriorLoadError(f"{config_path}: this prior was trained on codes of tokenizer {recorded}, "
                                 f"you passed {tokenizer_hash}")
        try:
            config = config_from_dict(PriorConfig, meta["config"], where=f"{config_path}:config")
        except ConfigError as e:
            raise PriorLoadError(str(e)) from e
        if config.prior_type != cls.PRIOR_TYPE:
            raise PriorLoadError(f"{config_path}: this is a prior_type={config.prior_type!r} prior, which "
                                 f"{cls.__name__} cannot load (it reads prior_type={cls.PRIOR_TYPE!r}); load it "
                                 f"with stage2_prior.load_prior, which picks the class from the checkpoint")
        class_names = meta.get("class_names")
        _check_class_names(class_names, config.num_classes, PriorLoadError, f"{config_path}: 'class_names'")
        model = cls(config)
        load_strict_state(model, weights_path, config_path, PriorLoadError)
        model.tokenizer_hash, model.tokenizer_config = recorded, tokenizer_config
        model.class_names = list(class_names) if class_names is not None else None
        return model.to(device).eval()


class GPTPrior(CodePrior):
    """The autoregressive prior: a causal x-transformers `Decoder`, condition token first."""

    PRIOR_TYPE = "ar"

    def __init__(self, config: PriorConfig):
        super().__init__(config)
        # codes, classes, null; the condition token replaces the last code at the input
        self.transformer = self._transformer(Decoder, config.vocab_size + config.num_classes + 1, config.seq_len)
        self._init_transformer()

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, *code_shape) or (B, L), labels (B,) or None -> (logits (B, L, V), mean cross-entropy)."""
        tokens = self.flatten_codes(codes)                           # (B, L)
        B = tokens.shape[0]
        cond = self.drop_labels(self.cond_tokens(labels, B), labels)  # (B,)
        inputs = torch.cat([cond[:, None], tokens[:, :-1]], dim=1)  # (B, L)
        logits = self.mask_logits(self.transformer(inputs))         # (B, L, V)
        loss = F.cross_entropy(rearrange(logits, "b l v -> (b l) v").float(), tokens.reshape(-1))
        return logits, loss

    def forward_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """Raw logits (B, n, V) for input token ids (B, n), condition token first; the full forward pass
        (the cached sampler is `kv_cache.StaticKVDecoder`)."""
        return self.transformer(inputs)
