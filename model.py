"""
The base model of the paper: a decoder-only Chameleon transformer (Sec. 3 of arXiv 2506.06006, which builds on
Chameleon-7B / Anole-7B), written from scratch in the style of nanoGPT.

Chameleon is a plain Llama-style decoder over ONE vocabulary that holds both BPE text tokens and the discrete codes of
a VQ image tokenizer (ids image_token_start..image_token_end-1). Its differences from Llama:
  - QK-norm: a LayerNorm over head_dim on queries and keys, with a per-head weight AND bias (stabilises training);
  - an optional "swin_norm" ordering (norm after attention/MLP instead of before);
  - the VQ image encoder lives inside the checkpoint as `model.vqmodel` (see tokenizer.py);
  - the released checkpoint cannot draw images: HF sets the logits of all image ids to the dtype min. We keep that
    as the default (`mask_image_logits=True`) for parity, and generate_image() always lifts it (Anole's recipe).

State-dict keys are exactly those of transformers' ChameleonForConditionalGeneration (checked against 5.24.0, which
still uses `model.layers.{i}...`, the same layout as the published Chameleon/Anole safetensors, so no key mapping is
needed), so `Chameleon.from_pretrained` reads HF checkpoint directories directly, and `save_pretrained` writes ones HF
can read back.

The same decoder runs Gemma, the base of Liquid (the paper's second base model, a GemmaForCausalLM whose vocabulary
ends with the VQ codes), through five config switches: RMSNorm x * (1 + w) in fp32, embeddings scaled by
sqrt(n_embd), a GeGLU MLP (tanh GELU), no QK-norm, lm_head tied to the embeddings; and a head width apart from
n_embd / n_head. config.json's model_type chooses the family (tests/test_parity_gemma.py: parity with transformers).

Contents: ChameleonConfig, RMSNorm, QKNorm, Attention, MLP, TiedHead, Block, KVCache, Chameleon (+ from_pretrained /
save_pretrained), and the pure functions sample(), token_logprobs(), generate_text(), generate_image().
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import CheckpointError, UserError, check_keys, read_json, safetensors_files
from tokenizer import ImageTokenizer, TextTokenizer, VQConfig

# -----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class ChameleonConfig:
    vocab_size: int = 0  # text + special + image ids (tiny: filled in by the caller from the text tokenizer)
    n_layer: int = 4  # number of transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 4  # key/value heads (< n_head = grouped-query attention; must divide n_head)
    n_embd: int = 256  # model width
    head_size: int = 0  # width of one head; 0 = n_embd // n_head (Gemma-7B: 256, so 16 heads make 4,096, not 3,072)
    n_inner: int = 688  # SwiGLU hidden width (Llama's ~8/3 * n_embd)
    max_seq_len: int = 256  # longest sequence (size of the RoPE tables and of a default KV cache)
    rope_theta: float = 10000.0  # RoPE base, applied to all head dims
    norm_eps: float = 1e-5  # RMSNorm epsilon (the QK LayerNorm eps is hard-coded 1e-5 like HF)
    swin_norm: bool = False  # Chameleon's swin-norm variant: x + norm(attn(x)) instead of x + attn(norm(x))
    image_token_start: int = 0  # first image id (Chameleon: 4)
    image_token_end: int = 0  # one past the last image id (Chameleon: 8196); start == end means no image ids
    mask_image_logits: bool = True  # HF behaviour: image-id logits set to the dtype min on every forward
    vq: Any = None  # tokenizer.VQConfig or None; when set the model owns `model.vqmodel` (the frozen VQ encoder)
    gradient_checkpointing: bool = False  # recompute each block in backward (training mode only) to save memory
    init_std: float = 0.02  # std of the normal init of Linear/Embedding weights (HF initializer_range)
    # --- the Gemma family (Liquid): the same decoder with these five switches
    qk_norm: bool = True  # Chameleon's QK-norm; Gemma has none
    gemma_norm: bool = False  # Gemma's RMSNorm: x * (1 + w) with the scaling in fp32 too (w is stored, starting at 0)
    embed_scale: bool = False  # Gemma: token embeddings times sqrt(n_embd), rounded to the weights' dtype as in HF
    mlp_act: str = "silu"  # the MLP gate: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU, tanh-approximate GELU)
    tie_embeddings: bool = False  # lm_head reads embed_tokens' weight (Gemma; checkpoints hold no lm_head.weight)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> ChameleonConfig:
        if name == "tiny":
            # CPU-trainable; the caller sets vocab_size / image range from its TextTokenizer
            cfg = dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=256, n_inner=688, max_seq_len=256)
        elif name == "chameleon-7b":
            cfg = dict(vocab_size=65536, n_layer=32, n_head=32, n_kv_head=32, n_embd=4096, n_inner=11008,
                       max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5, image_token_start=4,
                       image_token_end=8196, vq=VQConfig.chameleon())
        else:
            raise ValueError(f"unknown preset {name!r}; expected 'tiny' or 'chameleon-7b'")
        if name == "tiny" and "n_embd" in overrides and "n_inner" not in overrides:
            # keep the SwiGLU width at Llama's ~8/3 of the model width (rounded up to a multiple of 16)
            cfg["n_inner"] = -(-8 * overrides["n_embd"] // 3 // 16) * 16
        cfg.update(overrides)
        return cls(**cfg)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vq"] = None if self.vq is None else dataclasses.asdict(self.vq)
        return json.loads(json.dumps(d))  # JSON-able (tuples become lists)

    @classmethod
    def from_dict(cls, d: dict) -> ChameleonConfig:
        d = dict(d)
        if d.get("vq") is not None:
            d["vq"] = _vq_config_from_dict(d["vq"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_hf(cls, hf: dict, path: str = "") -> ChameleonConfig:
        """Map an HF ChameleonConfig or GemmaConfig JSON (`path`/config.json) onto our field names, refusing what we
        don't implement. Gemma (Liquid): the image ids follow the text vocabulary of `path`/tokenizer.json."""
        gemma = hf.get("model_type") == "gemma"
        unsupported = {"attention_bias": False, "mlp_bias": False}
        if not gemma:  # Gemma's MLP is GeGLU with the tanh GELU whatever hidden_act says (as transformers runs it)
            unsupported.update(hidden_act="silu", tie_word_embeddings=False)
        for k, want in unsupported.items():
            if hf.get(k, want) != want:
                raise NotImplementedError(f"config.json has {k}={hf[k]!r}; only {want!r} is implemented")
        # rope: transformers <5 writes rope_theta/rope_scaling, 5.x writes rope_parameters={rope_type, rope_theta}
        rope = hf.get("rope_parameters") or {}
        if (rope.get("rope_type") or "default") != "default" or hf.get("rope_scaling"):
            raise NotImplementedError("only plain RoPE is implemented (no rope scaling)")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        # image ids = every vocabulary_map entry named IMGIMG... (what HF masks); we need them contiguous
        vmap = hf.get("vocabulary_map") or {}
        img = sorted(v for k, v in vmap.items() if k.startswith("IMGIMG"))
        start, end = (img[0], img[-1] + 1) if img else (0, 0)
        if len(img) != end - start:
            raise NotImplementedError("image ids in vocabulary_map are not one contiguous range")
        n_head = hf.get("num_attention_heads", 32)
        family = {}
        if gemma:  # the VQ encoder is not in Liquid's checkpoint: the tokenizer folder carries it (tokenizer.py)
            start = TextTokenizer.from_file(os.path.join(path, "tokenizer.json")).image_offset
            end = hf.get("vocab_size", 256000)
            if end <= start:
                raise CheckpointError(f"{path}/config.json: vocab_size {end} leaves no image ids after the {start} "
                                      f"text ids of {path}/tokenizer.json")
            family = dict(head_size=hf.get("head_dim", 256), qk_norm=False, gemma_norm=True, embed_scale=True,
                          mlp_act="gelu_tanh", tie_embeddings=hf.get("tie_word_embeddings", True))
        return cls(
            vocab_size=hf.get("vocab_size", 65536),
            n_layer=hf.get("num_hidden_layers", 32),
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=hf.get("hidden_size", 4096),
            n_inner=hf.get("intermediate_size", 11008),
            max_seq_len=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            norm_eps=hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5),
            swin_norm=bool(hf.get("swin_norm", False)),
            image_token_start=start,
            image_token_end=end,
            vq=_vq_config_from_dict(hf["vq_config"]) if hf.get("vq_config") is not None and not gemma else None,
            **family,
        )

    def to_hf(self) -> dict:
        """The HF config.json for this config (so transformers can load what save_pretrained writes)."""
        # HF only knows the image ids through vocabulary_map names; code c is named IMGIMG + digits(c as A..J) + Z
        vmap = {"IMGIMG" + "".join(chr(ord("A") + int(ch)) for ch in str(i - self.image_token_start)) + "Z": i
                for i in range(self.image_token_start, self.image_token_end)}
        d = dict(model_type="chameleon", architectures=["ChameleonForConditionalGeneration"],
                 vocab_size=self.vocab_size, hidden_size=self.n_embd, intermediate_size=self.n_inner,
                 num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                 num_key_value_heads=self.n_kv_head, max_position_embeddings=self.max_seq_len,
                 rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                 swin_norm=self.swin_norm, tie_word_embeddings=False, vocabulary_map=vmap)
        if self.gemma_norm:  # the Gemma family (Liquid): its image ids are known from tokenizer.json, not the config
            d.update(model_type="gemma", architectures=["GemmaForCausalLM"], head_dim=self.head_dim,
                     hidden_act="gelu_pytorch_tanh", tie_word_embeddings=self.tie_embeddings)
            del d["swin_norm"], d["vocabulary_map"]
        if self.vq is not None:
            d["vq_config"] = dataclasses.asdict(self.vq)
        return json.loads(json.dumps(d))


def _vq_config_from_dict(d: dict):
    """tokenizer.VQConfig from a dict (ours, or HF's vq_config); fields VQConfig doesn't have are dropped."""
    known = {f.name for f in dataclasses.fields(VQConfig)}
    return VQConfig(**{k: v for k, v in d.items() if k in known})  # (HF's initializer_range etc. are dropped)


# -----------------------------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))  # Gemma scales by 1 + weight

    def forward(self, x):
        if self.gemma:  # Gemma (HF's GemmaRMSNorm): the scaling in fp32 too, then cast back
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # nothing to cast: the fused kernel does the same arithmetic in one op (fewer launches, cheaper backward)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in fp32 (bf16 sums of squares are too coarse), cast back, THEN scale: the order HF uses
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class QKNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm over head_dim only, then a separate weight and bias for every head."""

    def __init__(self, n_head: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_head, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_head, head_dim))

    def forward(self, x):  # x: (B, T, n_head, head_dim)
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-5)  # statistics per head (not over all heads)
        return torch.addcmul(self.bias, x, self.weight)  # x * weight + bias in one op


def apply_rope(x, cos, sin):  # x: (B, n_head, T, head_dim); cos/sin: (T, head_dim)
    """x * cos + rotate_half(x) * sin, where rotate_half (x1, x2) -> (-x2, x1) on the two halves of the last dim
    (the HF/Meta convention; weights pre-permuted). `sin` comes with its first half negated (Chameleon.rope_sin), so
    rotate_half is a plain roll by head_dim/2: 3 ops instead of chunk + neg + cat + 3 (exact: negation is exact)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    def __init__(self, config: ChameleonConfig, layer_idx: int):
        super().__init__()
        assert config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C = config.n_embd
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.q_norm = QKNorm(self.n_head, self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = QKNorm(self.n_kv_head, self.head_dim) if config.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None):
        B, T, C = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim))  # (B, T, n_head, head_dim)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim))  # (B, T, n_kv_head, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, n_kv_head, head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # RoPE after QK-norm, as in HF
        rep = self.n_head // self.n_kv_head  # GQA: each kv head serves `rep` consecutive query heads
        if kv_cache is None:  # the plain algorithm: causal attention over the whole sequence
            k, v = repeat_kv(k, v, rep)  # (B, n_head, T, head_dim) each
            y = causal_attention(q, k, v)  # SDPA(q, k, v, is_causal=True) (B, n_head, T, head_dim); speed-ups below
        else:  # prefill or decode step through the KV cache (speed-ups section at the end of this file)
            y = cached_attention(q, k, v, kv_cache, self.layer_idx, rep)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.n_inner, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.n_inner, bias=False)
        self.down_proj = nn.Linear(config.n_inner, config.n_embd, bias=False)
        self.act = F.silu if config.mlp_act == "silu" else functools.partial(F.gelu, approximate="tanh")

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (Gemma: GeGLU)


class TiedHead(nn.Module):
    """The output layer of a model with tied embeddings: logits = x @ embed_tokens.weight^T. It owns no parameter, so
    state dicts and checkpoints hold the matrix once (as model.embed_tokens.weight, like HF's tied checkpoints)."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self._embed = [embed]  # in a list: not a submodule, so not a second state-dict entry

    @property
    def weight(self):
        return self._embed[0].weight

    def forward(self, x):
        return F.linear(x, self.weight)


class Block(nn.Module):
    def __init__(self, config: ChameleonConfig, layer_idx: int):
        super().__init__()
        self.swin_norm = config.swin_norm
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps, config.gemma_norm)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps, config.gemma_norm)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None):
        if self.swin_norm:  # norms on the branch outputs (same parameter names, different place)
            x = x + self.input_layernorm(self.self_attn(x, cos, sin, kv_cache))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------------------------------------------
# the model


class Chameleon(nn.Module):
    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.config = config
        # `model.` prefix and names exactly as HF's ChameleonModel, so state-dict keys match HF checkpoints
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.norm_eps, config.gemma_norm),
        ))
        if config.vq is not None:
            # the VQ encoder ships inside Chameleon checkpoints; it is frozen (never trained with the LM)
            self.model.vqmodel = ImageTokenizer(config.vq, with_decoder=False)
            self.model.vqmodel.requires_grad_(False)
        # untied from embed_tokens (Chameleon), or tied: Gemma's output layer is its embedding matrix
        self.lm_head = TiedHead(self.model.embed_tokens) if config.tie_embeddings else \
            nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_rope()
        for m in (self.model.embed_tokens, self.model.layers, self.lm_head):  # the VQ model keeps its own init
            m.apply(self._init_weights)
        use_in_major_weights(self)  # memory order only (speed-ups section at the end of this file)

    def _init_rope(self):
        """(Re)build the cos/sin tables. Non-persistent buffers: not in checkpoints, so rebuilt after a meta load."""
        c = self.config
        device = self.model.embed_tokens.weight.device  # meta while from_pretrained builds the skeleton
        # same arithmetic as HF (fp32 inv_freq, fp32 outer product) so fp32 parity is exact
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float, device=device)
                                           / c.head_dim))
        t = torch.arange(c.max_seq_len, dtype=torch.float, device=device)
        freqs = t[:, None] * inv_freq[None, :]  # (max_seq_len, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim): rotate_half layout
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        # sin with its first half negated: folds rotate_half's sign flip into the table (see apply_rope)
        self.register_buffer("rope_sin", torch.cat((-freqs.sin(), freqs.sin()), dim=-1), persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_params(self, exclude_vq: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_vq and "vqmodel" in self.model:
            n -= sum(p.numel() for p in self.model.vqmodel.parameters())
        return n

    def forward(self, idx, kv_cache: KVCache | None = None, last_only: bool = False,
                mask_image_logits: bool | None = None, rows=None):
        """idx (B, T) -> fp32 logits (B, T, vocab) (or (B, 1, vocab) with last_only, for decoding).

        With kv_cache, idx continues the cached sequence: positions start at kv_cache.pos, which advances by T.
        mask_image_logits None follows config.mask_image_logits (HF: image ids get the dtype min).
        rows: bool (B, T) -> logits (N, vocab) of those positions only, in row-major order (train.sequence_nll: a
        loss reads few of the 2,100 x 65,536 logits of a Chameleon sequence).
        """
        x = self.hidden(idx, kv_cache)  # (B, T, n_embd)
        if last_only:
            x = x[:, -1:]  # (B, 1, n_embd)
        elif rows is not None:
            x = x[rows]  # (N, n_embd)
        logits = self.lm_head(x).float()  # (B, T, vocab), fp32 for stable softmax/sampling
        mask = self.config.mask_image_logits if mask_image_logits is None else mask_image_logits
        if mask and self.config.image_token_end > self.config.image_token_start:
            logits[..., self.config.image_token_start:self.config.image_token_end] = torch.finfo(logits.dtype).min
        return logits

    def hidden(self, idx, kv_cache: KVCache | None = None):
        """idx (B, T) -> the final-normed hidden states (B, T, n_embd) that lm_head reads (forward without lm_head:
        generate_image applies only the image rows of lm_head to them)."""
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {pos + T} > max_seq_len {self.config.max_seq_len}")
        if kv_cache is not None and T == 1 and idx.device.type == "cpu" and not torch.is_grad_enabled():
            return decode_step(self, idx[:, 0], kv_cache)[:, None]  # same bits, fewer ops (end of this file)
        x = self.embed(idx)  # (B, T, n_embd)
        cos = self.rope_cos[pos:pos + T].to(x.dtype)  # (T, head_dim)
        sin = self.rope_sin[pos:pos + T].to(x.dtype)  # (T, head_dim)
        ckpt = self.config.gradient_checkpointing and self.training and kv_cache is None and torch.is_grad_enabled()
        for block in self.model.layers:
            if ckpt:  # keep only each block's input; recompute its activations in backward
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.model.norm(x)

    def embed(self, idx):
        """Token embeddings (..., n_embd); Gemma scales them by sqrt(n_embd) in the weights' dtype (55.5 in bf16)."""
        x = self.model.embed_tokens(idx)
        return x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype) if self.config.embed_scale else x

    # ------------------------------------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", strict: bool = True) -> Chameleon:
        """Load an HF-layout directory: config.json + model.safetensors (or model.safetensors.index.json shards).

        The model is built on the meta device (no memory, no init) and each tensor is read from its shard and assigned
        directly, so peak RAM is about one copy of the weights (a 7B bf16 load needs ~14 GB, not 2x that).
        dtype None keeps the dtype stored in the file. Key names and shapes are checked BEFORE any tensor is read.
        """
        from safetensors import safe_open

        hf = read_json(os.path.join(path, "config.json"), "HF config")
        if not isinstance(hf, dict):
            raise CheckpointError(f"{os.path.join(path, 'config.json')}: expected a JSON object")
        # our own save_pretrained stores the exact ChameleonConfig next to the HF fields
        config = ChameleonConfig.from_dict(hf["worldboot"]) if "worldboot" in hf else ChameleonConfig.from_hf(hf, path)

        files, _ = safetensors_files(path)

        # 1) read only the headers: which key lives in which file, with which shape
        found = {}  # key -> (file, shape)
        for fname in files:
            fpath = os.path.join(path, fname)
            try:
                with safe_open(fpath, framework="pt") as f:
                    for k in f.keys():
                        found[k] = (fname, tuple(f.get_slice(k).get_shape()))
            except Exception as e:  # truncated / corrupt / missing file
                raise CheckpointError(f"cannot read checkpoint file {fpath}: {type(e).__name__}: {e}") from e

        if config.tie_embeddings:  # a tied checkpoint may still store the output layer: it is the embedding
            found.pop("lm_head.weight", None)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(expected, found, path, strict)

        # 2) load shard by shard, tensor by tensor, straight into the (meta) parameters
        for fname in files:
            fpath = os.path.join(path, fname)
            try:
                with safe_open(fpath, framework="pt") as f:  # memory-mapped: one tensor in RAM at a time
                    sd = {}
                    for k in f.keys():
                        if k not in expected:
                            continue
                        t = f.get_tensor(k)
                        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                        sd[k] = t.to(device)
                    model.load_state_dict(sd, strict=False, assign=True)
                    del sd
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"cannot read checkpoint file {fpath}: {type(e).__name__}: {e}") from e
        model._init_rope()  # non-persistent buffers are still on meta
        use_in_major_weights(model)  # the loaded tensors replaced the parameters (assign=True): re-lay them out
        if config.vq is not None:
            model.model.vqmodel.requires_grad_(False)
        return model.to(device).eval()

    def save_pretrained(self, path):
        """Write config.json (HF fields + our exact config under "worldboot") and model.safetensors."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        hf = self.config.to_hf()
        hf["worldboot"] = self.config.to_dict()
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=1)
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# -----------------------------------------------------------------------------------------------------------------
# LoRA (paper App. H: r=16, alpha=32, dropout 0.05 on the linear layers)


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x); W frozen, B starts at zero so the wrapped model starts unchanged."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: str) -> int:
    """Wrap the named linear layers (by attribute name, e.g. q_proj) with adapters and freeze everything else.

    Returns the number of wrapped layers. Only adapters train: the paper fine-tunes Anole-7B this way.
    """
    names = {t.strip() for t in targets.split(",") if t.strip()}
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in names and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha, dropout))
                wrapped += 1
    if wrapped == 0:
        raise UserError(f"--lora_targets={targets!r} matched no nn.Linear in the model")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B A) and restore plain nn.Linear: export format."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += (child.lora_B @ child.lora_A * child.scale).to(child.base.weight.dtype)
                child.base.weight.requires_grad_(True)
                setattr(module, name, child.base)
    return model


# -----------------------------------------------------------------------------------------------------------------
# sampling and generation


def sample(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None):
    """logits (B, V) -> token ids (B,). temperature 0 (or top_k 1) = argmax; top-k then top-p (nucleus) filtering.

    Pass a generator for reproducible draws; a CPU one also serves logits on a GPU (inverse_cdf_draw).
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold >= top_p of the mass (the top one always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return inverse_cdf_draw(logits.softmax(dim=-1), generator)  # = torch.multinomial(probs, 1), faster (see there)


def token_logprobs(logits, idx):
    """log p(idx[:, t+1] | idx[:, :t+1]) for t < T-1: logits (B, T, V), idx (B, T) -> (B, T-1) fp32."""
    B, T, V = logits.shape
    # cross_entropy avoids materialising a second (B, T, V) log-softmax tensor
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), idx[:, 1:].reshape(-1), reduction="none")
    return -nll.view(B, T - 1)


def inference(fn):
    """Run a generator under torch.inference_mode: no_grad without autograd's per-op bookkeeping (version counters,
    view tracking), same kernels and bits. The result is cloned outside the mode: a normal tensor, usable anywhere."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.clone()
    return run


@inference
def generate_text(model: Chameleon, idx, max_new_tokens: int, eos_id: int | None = None, allowed=None,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None, pad_id: int | None = None):
    """Continue idx (B, T) (prompts of equal length) with text: returns new tokens (B, n), n <= max_new_tokens.

    allowed: bool mask (V,) of permitted ids; default = every non-image id (whatever the model's
    mask_image_logits). After a row emits eos_id it is filled with pad_id (default eos_id); stops when all rows did.
    """
    cfg = model.config
    B, T = idx.shape
    V = cfg.vocab_size
    if allowed is None:
        keep = torch.ones(V, dtype=torch.bool, device=idx.device)
        keep[cfg.image_token_start:cfg.image_token_end] = False
    else:
        keep = allowed.to(device=idx.device, dtype=torch.bool)
    pad = eos_id if pad_id is None else pad_id
    cache = KVCache.for_model(model, B, T + max_new_tokens)
    logits = model(idx, kv_cache=cache, last_only=True)[:, -1]  # (B, V) prefill
    out, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        tok = sample(logits.masked_fill(~keep, float("-inf")), temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            done = done | (tok == eos_id)
        out.append(tok)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = model(tok[:, None], kv_cache=cache)[:, -1]  # (B, V)
    return torch.stack(out, dim=1) if out else idx.new_zeros(B, 0)


@inference
def generate_image(model: Chameleon, idx, n_tokens: int, boi_id: int, eoi_id: int | None = None,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, cfg_scale: float | None = None, uncond_idx=None,
                   image_idx=None, image_cfg_scale: float = 1.2):
    """Sample exactly n_tokens image ids after idx (B, T) (+ BOI if it doesn't end with boi_id): returns (B, n_tokens).

    Only ids in [image_token_start, image_token_end) can be drawn (the model's mask_image_logits is ignored here);
    EOI (eoi_id, unused) is implied after the last token. Classifier-free guidance when cfg_scale is set:
      2-way:  logits = uncond + cfg_scale * (cond - uncond)
      3-way (Anole, when image_idx = the prompt with only its image parts is given):
              logits = uncond + image_cfg_scale * (image - uncond) + cfg_scale * (cond - image)
    uncond_idx defaults to the first token of idx (BOS); batch-size-1 guide prompts are broadcast. Streams of equal
    prompt length run as one batch with one KV cache; otherwise each stream gets its own cache.
    """
    cfg = model.config
    B = idx.shape[0]

    def with_boi(p):
        p = p.expand(B, -1) if p.shape[0] == 1 else p
        if p.shape[1] == 0 or not bool((p[:, -1] == boi_id).all()):
            p = torch.cat([p, torch.full((B, 1), boi_id, dtype=p.dtype, device=p.device)], dim=1)
        return p

    streams = [with_boi(idx)]
    if cfg_scale is not None:
        streams.append(with_boi(uncond_idx if uncond_idx is not None else idx[:, :1]))
        if image_idx is not None:
            streams.append(with_boi(image_idx))
    # one batched pass when all prompts have the same length, else one cache per stream
    groups = [torch.cat(streams)] if len({s.shape[1] for s in streams}) == 1 else streams
    caches = [KVCache.for_model(model, g.shape[0], g.shape[1] + n_tokens) for g in groups]
    lo, hi = cfg.image_token_start, cfg.image_token_end
    # only image ids can be drawn, so only the image rows of lm_head are ever needed: (hi - lo) logits instead of the
    # whole vocabulary (8192 of 65536 for Chameleon). Sampling among them = sampling the full softmax with every
    # other id masked to -inf (same distribution; the random draws differ from a full-vocab sampler's).
    w_img = model.lm_head.weight[lo:hi]  # (n_codes, n_embd)

    def step(inputs):  # list of (b, t) per group -> list of (B, n_codes) last image logits per stream
        last = [F.linear(model.hidden(x, kv_cache=c)[:, -1], w_img).float() for x, c in zip(inputs, caches)]
        return (last[0] if len(last) == 1 else torch.cat(last)).split(B)

    logits = step(groups)
    out = []
    for i in range(n_tokens):
        if cfg_scale is None:
            lg = logits[0]
        elif image_idx is None:
            cond, uncond = logits
            lg = uncond + cfg_scale * (cond - uncond)
        else:
            cond, uncond, img = logits
            lg = uncond + image_cfg_scale * (img - uncond) + cfg_scale * (cond - img)
        tok = sample(lg, temperature, top_k, top_p, generator) + lo  # (B,) image ids
        out.append(tok)
        if i < n_tokens - 1:  # every stream of a group continues with the same token
            logits = step([tok[:, None] if g.shape[0] == B else tok[:, None].repeat(g.shape[0] // B, 1)
                           for g in groups])
    return torch.stack(out, dim=1)


# -----------------------------------------------------------------------------------------------------------------
# CPU speed-ups, fenced (measured effect in each comment). `causal_attention` is SDPA with is_causal=True, written
# out under bf16 on a CPU: there it rounds as transformers' eager attention does, not as SDPA's kernels. The decode
# ones change nothing computed, only how fast: generation is one token at a time, so a decode step is a handful of
# one-row matmuls, and these make it cheaper. The plain algorithm above reads without them: `use_in_major_weights`
# only changes memory order, `cached_attention` is attention over the cache, `inverse_cdf_draw` is
# torch.multinomial, `decode_step` is Chameleon.hidden for one token.
# (Also here, above: apply_rope's roll with a pre-negated sin table, 3 ops instead of 6; generate_image's lm_head
# restricted to the image rows; the generators under torch.inference_mode.)


class KVCache:
    """Preallocated keys/values for every layer, for batched prefill-then-decode.

    All sequences of a batch share one position counter, so prompts in a batch must have equal length (no padding
    support: it keeps RoPE positions and the causal mask trivial). `pos` = number of tokens already cached.
    Keys are stored transposed, (head_dim, position), so a decode step's q @ k^T reads them in the fast memory order.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device=None, dtype=None):
        # empty, not zeros: attention only ever reads positions < pos, which were written first
        self.kt = [torch.empty(batch_size, n_kv_head, head_dim, max_len, device=device, dtype=dtype)
                   for _ in range(n_layer)]
        self.v = [torch.empty(batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
                  for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(cls, model: Chameleon, batch_size: int, max_len: int | None = None) -> KVCache:
        c = model.config
        w = model.lm_head.weight
        return cls(c.n_layer, batch_size, c.n_kv_head, max_len or c.max_seq_len, c.head_dim, w.device, w.dtype)

    def update(self, layer: int, k, v):
        """Write k, v (B, n_kv_head, T, head_dim) at pos..pos+T; return all cached keys TRANSPOSED,
        (B, n_kv_head, head_dim, pos+T), and values (B, n_kv_head, pos+T, head_dim)."""
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {T} tokens > max_len {self.max_len}")
        self.kt[layer][..., self.pos:self.pos + T] = k.transpose(2, 3)
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.kt[layer][..., :self.pos + T], self.v[layer][:, :, :self.pos + T]


def repeat_kv(k, v, rep: int):
    """GQA's repeat of the key and value heads (HF's repeat_kv): (B, n_kv_head, T, head_dim) each -> (B, n_kv_head *
    rep, T, head_dim). Keys are repeated in the transposed (head_dim, T) layout the KV cache stores them in, then
    viewed back: the same memory order with and without the cache, so attention gives the same bits either way."""
    if rep == 1:
        return k, v
    return k.transpose(2, 3).repeat_interleave(rep, dim=1).transpose(2, 3), v.repeat_interleave(rep, dim=1)


def causal_attention(q, k, v):
    """F.scaled_dot_product_attention(q, k, v, is_causal=True) for q, k, v (B, n_head, T, head_dim). Under bf16 on a
    CPU it is written out as transformers' "eager" attention: scores as a bf16 matrix product, the causal mask,
    softmax, a bf16 product with the values. At the tiny model's shapes (4 heads of 32, ~150 tokens) SDPA's kernels
    are slow there: a WM training step took 1.36x longer with the math kernel (the flash kernel was slower still;
    bench.py --speed, "attention" row, on the 2-core AMD EPYC). Elsewhere (fp32, CUDA): the fused kernel."""
    bf16 = q.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                        and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    if q.device.type != "cpu" or not bf16:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[2]
    att = (q @ k.transpose(2, 3)) * q.shape[-1] ** -0.5 + causal_mask(T, q.device)  # (B, n_head, T, T) scores
    return att.softmax(dim=-1) @ v  # (B, n_head, T, head_dim)


@functools.lru_cache(maxsize=8)
def causal_mask(T: int, device) -> torch.Tensor:
    """(T, T) bf16: 0 on and below the diagonal, -inf above (position t attends to positions <= t)."""
    return torch.full((T, T), float("-inf"), device=device).triu(1).to(torch.bfloat16)


def cached_attention(q, k, v, kv_cache: KVCache, layer: int, rep: int):
    """Causal attention of q (B, n_head, T, head_dim) over the cache after appending k, v (B, n_kv_head, T,
    head_dim) to it; returns (B, n_head, T, head_dim)."""
    T = q.shape[2]
    kt, v = kv_cache.update(layer, k, v)  # (B, n_kv_head, head_dim, S), (B, n_kv_head, S, head_dim)
    if rep > 1:
        kt = kt.repeat_interleave(rep, dim=1)  # (B, n_head, head_dim, S)
        v = v.repeat_interleave(rep, dim=1)  # (B, n_head, S, head_dim)
    S = v.shape[2]  # past + T
    if S == T:  # no past (a prefill): plain causal attention, as the full forward computes it
        return causal_attention(q, kt.transpose(2, 3), v)
    if T == 1:  # decode step: one new token sees every cached one. Written out (2 matmuls and a softmax): faster
        # than the fused kernel at this shape on CPU (measured), with keys read in their stored order
        att = (q * q.shape[-1] ** -0.5) @ kt  # (B, n_head, 1, S)
        return att.softmax(dim=-1) @ v  # (B, n_head, 1, head_dim)
    # a chunk after a past: query t (absolute S-T+t) sees keys <= S-T+t (is_causal would align top-left)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, kt.transpose(2, 3), v, attn_mask=mask)


def decode_step(model: Chameleon, tok, cache: KVCache):
    """model.hidden(tok[:, None], cache)[:, 0], tok (B,) -> (B, n_embd): the same kernels on the same data, so the same
    bits (tests/test_model.py), in 3/4 of the ~1,000 aten calls, whose dispatch is most of a CPU decode step at batch
    1: (B, n_embd) rows without (B, 1, ...) reshapes, functions for modules, the fp32 RMSNorm as the ops of torch's CPU
    composite without its wrappers, RoPE's half swap as one flip (roll: narrow, narrow, cat), writes into the cache."""
    B, pos = tok.shape[0], cache.pos
    if pos >= cache.max_len:
        raise ValueError(f"KV cache is full: {pos} + 1 tokens > max_len {cache.max_len}")

    def lin(m, h):  # a LoRA-wrapped projection keeps its module
        return F.linear(h, m.weight) if type(m) is nn.Linear else m(h)

    def norm(m, h):
        if h.dtype == torch.float32 and m.weight.dtype == torch.float32 and not m.gemma:
            return h.mul(h.pow(2).mean(-1, keepdim=True).add_(m.eps).rsqrt()).mul(m.weight)
        return m(h)

    def rope(x):  # x (B, heads, head_dim); (x1, x2) -> (x2, x1) is roll(head_dim / 2): see apply_rope
        return torch.addcmul(x * cos, x.unflatten(-1, (2, -1)).flip(-2).flatten(-2), sin)  # (B, heads, 2, hd/2)

    x = model.embed(tok)  # (B, n_embd)
    cos, sin = model.rope_cos[pos].to(x.dtype), model.rope_sin[pos].to(x.dtype)  # (head_dim,)
    for i, blk in enumerate(model.model.layers):
        a, swin, S = blk.self_attn, blk.swin_norm, pos + 1
        H, Hk, hd = a.n_head, a.n_kv_head, a.head_dim
        h = x if swin else norm(blk.input_layernorm, x)
        q, k = lin(a.q_proj, h).view(B, H, hd), lin(a.k_proj, h).view(B, Hk, hd)  # (B, n_head or n_kv_head, hd)
        if isinstance(a.q_norm, QKNorm):  # QKNorm's ops, without its module call
            q = torch.addcmul(a.q_norm.bias, F.layer_norm(q, (hd,), eps=1e-5), a.q_norm.weight)
            k = torch.addcmul(a.k_norm.bias, F.layer_norm(k, (hd,), eps=1e-5), a.k_norm.weight)
        q, cache.kt[i][..., pos] = rope(q), rope(k)
        cache.v[i][:, :, pos] = lin(a.v_proj, h).view(B, Hk, hd)  # (B, n_kv_head, head_dim)
        kt, v = cache.kt[i][..., :S], cache.v[i][:, :, :S]  # (B, n_kv_head, head_dim, S), (B, n_kv_head, S, hd)
        if H != Hk:
            kt, v = kt.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)  # (B, n_head, ...)
        # cached_attention's decode step, its matmuls as the bmm they reduce to
        att = torch.bmm((q * hd ** -0.5).view(B * H, 1, hd), kt.reshape(B * H, hd, S))  # (B * n_head, 1, S)
        y = torch.bmm(att.softmax(-1), v.reshape(B * H, S, hd)).view(B, H * hd)  # (B, n_head * head_dim)
        y = lin(a.o_proj, y)
        x = x + (norm(blk.input_layernorm, y) if swin else y)
        h = x if swin else norm(blk.post_attention_layernorm, x)
        m = blk.mlp
        y = lin(m.down_proj, m.act(lin(m.gate_proj, h)) * lin(m.up_proj, h))
        x = x + (norm(blk.post_attention_layernorm, y) if swin else y)
    cache.pos += 1
    return norm(model.model.norm, x)


def use_in_major_weights(model: Chameleon):
    """Store each transformer Linear weight (out, in) as the transpose of a contiguous (in, out) tensor.

    Shape, values and state-dict are unchanged (and .to() / load_state_dict keep the layout); only the memory order
    differs. Why: decoding multiplies ONE row per sequence by each weight, and MKL's one-row matmul runs about 2x
    faster (CPU, measured) when the weight is stored input-major; large training matmuls run at the same speed.
    """
    for m in [*model.model.layers.modules(), model.lm_head]:
        if isinstance(m, nn.Linear) and m.weight.is_contiguous() and m.weight.device.type != "meta":
            m.weight.data = m.weight.data.t().contiguous().t()  # (out, in) view of an (in, out) tensor


def inverse_cdf_draw(probs, generator: torch.Generator | None = None):
    """probs (B, V) -> one id per row drawn from it: the first id whose cumulative probability exceeds u ~ U(0,
    total). The same distribution as torch.multinomial(probs, 1), but one random number per row instead of one per
    vocabulary entry (4x faster at batch 8). fp64 sums keep tiny probabilities' mass; an id of probability 0 never
    spans any u, so it is never drawn. u is drawn on the generator's device (a CPU one gives a GPU the CPU's draws)."""
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    dev = cdf.device if generator is None else generator.device
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=dev, dtype=cdf.dtype).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)  # (clamp: u rounded up)


__all__ = ["ChameleonConfig", "Chameleon", "KVCache", "CheckpointError", "sample", "token_logprobs",
           "generate_text", "generate_image"]
