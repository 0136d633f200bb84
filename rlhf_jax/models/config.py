"""Model configuration: one frozen dataclass for the GPT-2, Llama and Qwen2 decoder families.

`ModelConfig` describes a decoder-only transformer. The three families differ only in data:

| field                 | GPT-2            | Llama               | Qwen2               |
|-----------------------|------------------|---------------------|---------------------|
| `position_embedding`  | `"learned"`      | `"rope"`            | `"rope"`            |
| `norm`                | `"layernorm"`    | `"rmsnorm"`         | `"rmsnorm"`         |
| `mlp`                 | `"gelu"` (fc)    | `"swiglu"` (gated)  | `"swiglu"`          |
| `activation`          | `"gelu_new"`     | `"silu"`            | `"silu"`            |
| `qkv_bias`            | True             | False               | True                |
| `num_kv_heads`        | = heads          | <= heads (GQA)      | <= heads (GQA)      |

Presets are class methods (`ModelConfig.tiny_gpt2()`, `ModelConfig.llama_3_2_1b()`, ...) and
`ModelConfig.preset(name)` looks one up by name (`ModelConfig.preset_names()` lists them).

Dtypes are strings (`"float32"`, `"bfloat16"`) so that configs stay hashable and serialise to
YAML. `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters; both
default to float32 (bfloat16 is emulated on CPU and slow there). Logits are always float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.models.blockwise_attention import SAVED_NAMES as BLOCKWISE_SAVED_NAMES

_ARCHS = ("gpt2", "llama", "qwen2")
_NORMS = ("layernorm", "rmsnorm")
_MLPS = ("gelu", "swiglu")
_ACTIVATIONS = ("gelu_new", "gelu", "silu", "relu")
_POSITIONS = ("learned", "rope")
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_REMAT = ("none", "full", "dots", "dots_no_batch", "nothing_saveable")
_ATTENTION = ("auto", "dense", "blockwise")
_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, with the parameters and defaults Hugging Face uses.

    Attributes:
      rope_type: one of `"default"`, `"linear"`, `"dynamic"` (dynamic NTK), `"llama3"`, `"yarn"`.
      factor: the context extension factor (all types but `"default"`).
      low_freq_factor, high_freq_factor: `"llama3"` smoothing band.
      original_max_position_embeddings: pre-training context (`"llama3"`, `"yarn"`); `None`
        means the model's `max_position_embeddings`.
      beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate: `"yarn"`.
    """

    rope_type: str = "default"
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r} is not supported; "
                f"allowed: {_ROPE_TYPES}"
            )
        if self.rope_type in ("linear", "dynamic", "llama3") and self.factor is None:
            raise ValueError(f"RopeScaling.factor is required for rope_type={self.rope_type!r}")
        if self.rope_type == "llama3" and (
            self.low_freq_factor is None or self.high_freq_factor is None
        ):
            raise ValueError(
                "RopeScaling.low_freq_factor and high_freq_factor are required for 'llama3'"
            )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `rope_scaling` dict (None fields left out)."""
        out: dict[str, Any] = {"rope_type": self.rope_type}
        for field in dataclasses.fields(self):
            if field.name in ("rope_type", "truncate"):
                continue
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = value
        if self.rope_type == "yarn" and not self.truncate:
            out["truncate"] = False
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (GPT-2, Llama or Qwen2 family).

    Attributes:
      arch: `"gpt2"`, `"llama"` or `"qwen2"` (names the Hugging Face layout used on export).
      vocab_size: V.
      hidden_size: E, the residual width.
      num_layers: L.
      num_heads: H, query heads.
      num_kv_heads: key/value heads (H for multi-head attention, fewer for GQA); must divide H.
      head_dim: D per head; `None` means `hidden_size // num_heads`.
      intermediate_size: F, the MLP width.
      max_position_embeddings: learned-position table size (GPT-2) / RoPE context (Llama).
      norm, norm_eps: `"layernorm"` (GPT-2) or `"rmsnorm"` (Llama, Qwen2) and its epsilon.
      mlp, activation: `"gelu"` (up -> act -> down) or `"swiglu"` (act(gate) * up -> down).
      position_embedding: `"learned"` or `"rope"`.
      rope_theta, rope_scaling: RoPE base and optional frequency scaling.
      qkv_bias, o_bias, mlp_bias: biases on the q/k/v, output and MLP projections.
      tie_word_embeddings: the LM head reuses the token embedding.
      initializer_range: standard deviation of the normal initialiser.
      dtype, param_dtype: compute and parameter dtypes (strings).
      remat: rematerialisation policy for each layer: `"none"` (save every intermediate),
        `"full"` (save nothing but the layer input), `"dots"` (the default: save the matmul
        outputs and recompute the elementwise ops in the backward pass; less memory than
        `"none"`, and on CPU about 18% faster for a whole forward + backward, because the
        layer scan stacks fewer residuals), `"dots_no_batch"`, `"nothing_saveable"`.
      scan_layers: run the stacked layers with `jax.lax.scan` (compile time independent of
        depth); `False` unrolls a Python loop at trace time (same parameters).
      logits_chunk_size: positions per chunk of the fused LM head + log-probs
        (`CausalLM.token_logps`, `rlhf_jax.losses.fused_token_logps`): forward and backward
        hold one `[B, chunk, V]` block of float32 logits instead of `[B, T, V]`, at the cost of
        recomputing the head's logits in the backward pass. `0` materialises the full logits
        instead (plain autodiff, no recomputation: faster when `B * T * V` fits easily).
        Never changes the values beyond float32 rounding.
      logits_keep_bytes: byte budget of the fused head's kept logits (0, the default: never
        keep them). When a `token_logps` call's float32 logits (`B * T' * V * 4` bytes, `T'`
        the scored positions, global shapes) fit in it, the fused head keeps its logits for the
        backward pass instead of recomputing them (`fused_token_logps(keep_logits=True)`): one
        LM-head product per token less, for the memory of the unfused head. It runs the scored
        positions as one chunk (larger products), or in `logits_chunk_size` chunks when the
        call names the tokens to score (`where`: the trainers' loss masks), so that the
        chunks without any still cost nothing. Never changes the values.
      logits_vocab_blocks: strided vocabulary blocks of the fused head
        (`fused_token_logps(vocab_blocks=...)`): 0 (the default) lets the head choose (16 at
        Qwen2's and Llama 3's vocabularies, 1 at GPT-2's odd one), 1 runs each chunk over the
        whole vocabulary, ``n > 1`` (a divisor of `vocab_size`) cuts it into ``n`` blocks. Blocks
        hold one `[V, E]` float32 gradient buffer where a single pass holds two (0.51 GiB less
        at Qwen2-0.5B), at some speed when a chunk holds many rows (the backward's products are
        narrower: about +25% for the head's backward at 1,024 rows per chunk on CPU); never
        changes the values beyond float32 rounding.
      attention_impl: the attention of the no-cache path (training, scoring, reward and value
        models): `"dense"` (one `[B, H, T, T]` float32 score tensor per layer, which
        `remat="dots"` keeps for the backward pass), `"blockwise"`
        (`rlhf_jax.models.blockwise_attention`: flash-style tiles with an online softmax and a
        custom VJP that stores only the output and the per-row log-sum-exp, so neither pass
        holds more than one `[B, H, block_q, block_k]` tile of scores; causal tiles above the
        diagonal are skipped), or `"auto"` (the default: on CPU, blockwise when T is longer
        than one query tile, dense otherwise, where a single tile saves nothing and compiles
        more; blockwise took less CPU time and memory than dense for GPT-2 124M steps at
        T = 512 and 2,048, docs/benchmarks.md; on GPU and TPU, not measured yet, dense). Same values to float32 rounding on every real
        token (a query that sees no key gets 0 from blockwise, the mean of v from dense).
        Decoding with a KV cache always uses the dense path.
      attention_block_q, attention_block_k: the blockwise tile sizes along queries and keys
        (clipped to the sequence length).
      bos_token_id, eos_token_id, pad_token_id: written to `config.json` on export.
    """

    arch: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None
    intermediate_size: int = 128
    max_position_embeddings: int = 128
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    activation: str = "silu"
    position_embedding: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "dots"
    scan_layers: bool = True
    logits_chunk_size: int = 128
    logits_keep_bytes: int = 0
    logits_vocab_blocks: int = 0
    attention_impl: str = "auto"
    attention_block_q: int = 128
    attention_block_k: int = 128
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        def check(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"ModelConfig.{name}={value!r} is not supported; allowed: {allowed}")

        check("arch", _ARCHS)
        check("norm", _NORMS)
        check("mlp", _MLPS)
        check("activation", _ACTIVATIONS)
        check("position_embedding", _POSITIONS)
        check("remat", _REMAT)
        check("attention_impl", _ATTENTION)
        check("dtype", _DTYPES)
        check("param_dtype", _DTYPES)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings", "attention_block_q",
                     "attention_block_k"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if isinstance(self.logits_chunk_size, bool) or not isinstance(self.logits_chunk_size, int) \
                or self.logits_chunk_size < 0:
            raise ValueError(f"ModelConfig.logits_chunk_size must be an int >= 0 (0: unfused), "
                             f"got {self.logits_chunk_size!r}")
        if isinstance(self.logits_keep_bytes, bool) or not isinstance(self.logits_keep_bytes, int) \
                or self.logits_keep_bytes < 0:
            raise ValueError(f"ModelConfig.logits_keep_bytes must be an int >= 0 (0: never keep "
                             f"the logits), got {self.logits_keep_bytes!r}")
        blocks = self.logits_vocab_blocks
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0 \
                or (blocks and self.vocab_size % blocks):
            raise ValueError(f"ModelConfig.logits_vocab_blocks must be 0 (automatic) or a positive "
                             f"int that divides vocab_size={self.vocab_size}, got {blocks!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; set head_dim explicitly"
            )
        if self.position_embedding == "rope" and self.resolved_head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    # ----------------------------------------------------------------------------- derived
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def remat_policy(self):
        """The `jax.checkpoint` policy for `remat`, or None when `remat == "none"`."""
        policies = jax.checkpoint_policies
        policy = {
            "none": None,
            "full": policies.nothing_saveable,
            "nothing_saveable": policies.nothing_saveable,
            "dots": policies.checkpoint_dots,
            "dots_no_batch": policies.checkpoint_dots_with_no_batch_dims,
        }[self.remat]
        if self.remat in ("dots", "dots_no_batch") and self.attention_impl != "dense":
            # The blockwise attention's output and log-sum-exp count as the "dots" of its
            # custom VJP: keeping them (O(T) per head, no scores) spares re-running its loop.
            policy = policies.save_from_both_policies(
                policy, policies.save_only_these_names(*BLOCKWISE_SAVED_NAMES))
        return policy

    def uses_blockwise_attention(self, seq_len: int, backend: str | None = None) -> bool:
        """Whether the no-cache attention over `seq_len` tokens runs blockwise on `backend`
        (default: JAX's default backend). `"auto"` picks it on CPU for rows longer than one
        query tile, where it was measured faster; on GPU and TPU it stays dense until measured
        there (set `"blockwise"` for its memory)."""
        if self.attention_impl == "auto":
            backend = backend or jax.default_backend()
            return backend == "cpu" and seq_len > self.attention_block_q
        return self.attention_impl == "blockwise"

    def replace(self, **changes) -> ModelConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def gpt2_family(cls, *, vocab_size, hidden_size, num_layers, num_heads,
                    max_position_embeddings=1024, **kw) -> ModelConfig:
        """A GPT-2 style config (learned positions, LayerNorm, gelu_new, tied head)."""
        base = dict(arch="gpt2", vocab_size=vocab_size, hidden_size=hidden_size,
                    num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_heads,
                    intermediate_size=4 * hidden_size,
                    max_position_embeddings=max_position_embeddings, norm="layernorm",
                    norm_eps=1e-5, mlp="gelu", activation="gelu_new",
                    position_embedding="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
                    tie_word_embeddings=True, bos_token_id=vocab_size - 1,
                    eos_token_id=vocab_size - 1)
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny_gpt2(cls, **kw) -> ModelConfig:
        """2 layers, width 64, 4 heads, vocab 256, 128 positions: for tests."""
        base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                    max_position_embeddings=128)
        base.update(kw)
        return cls.gpt2_family(**base)

    @classmethod
    def gpt2(cls, **kw) -> ModelConfig:
        """GPT-2 small (124M)."""
        return cls.gpt2_family(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                               bos_token_id=50256, eos_token_id=50256, **kw)

    @classmethod
    def gpt2_medium(cls, **kw) -> ModelConfig:
        """GPT-2 medium (355M)."""
        return cls.gpt2_family(vocab_size=50257, hidden_size=1024, num_layers=24, num_heads=16,
                               bos_token_id=50256, eos_token_id=50256, **kw)

    @classmethod
    def gpt2_large(cls, **kw) -> ModelConfig:
        """GPT-2 large (774M)."""
        return cls.gpt2_family(vocab_size=50257, hidden_size=1280, num_layers=36, num_heads=20,
                               bos_token_id=50256, eos_token_id=50256, **kw)

    @classmethod
    def gpt2_xl(cls, **kw) -> ModelConfig:
        """GPT-2 XL (1.5B)."""
        return cls.gpt2_family(vocab_size=50257, hidden_size=1600, num_layers=48, num_heads=25,
                               bos_token_id=50256, eos_token_id=50256, **kw)

    @classmethod
    def llama_family(cls, **kw) -> ModelConfig:
        """A Llama style config (RoPE, RMSNorm, SwiGLU, GQA)."""
        base = dict(arch="llama", norm="rmsnorm", mlp="swiglu", activation="silu",
                    position_embedding="rope")
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny_llama(cls, **kw) -> ModelConfig:
        """2 layers, width 64, 4 query heads over 2 KV heads (GQA), vocab 256: for tests."""
        base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, max_position_embeddings=128, norm_eps=1e-6,
                    rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
        base.update(kw)
        return cls.llama_family(**base)

    @classmethod
    def tiny_qwen2(cls, **kw) -> ModelConfig:
        """2 layers, width 64, GQA 4/2, qkv biases, tied head, vocab 256: for tests."""
        base = dict(arch="qwen2", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, intermediate_size=128, max_position_embeddings=128,
                    norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        base.update(kw)
        return cls.llama_family(**base)

    @classmethod
    def llama_3_2_1b(cls, **kw) -> ModelConfig:
        """Llama 3.2 1B (tied head, llama3 RoPE scaling)."""
        base = dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, intermediate_size=8192,
                    max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0,
                                             original_max_position_embeddings=8192),
                    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
        base.update(kw)
        return cls.llama_family(**base)

    @classmethod
    def llama_3_2_3b(cls, **kw) -> ModelConfig:
        """Llama 3.2 3B (tied head, llama3 RoPE scaling)."""
        base = dict(vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24,
                    num_kv_heads=8, head_dim=128, intermediate_size=8192,
                    max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0,
                                             original_max_position_embeddings=8192),
                    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
        base.update(kw)
        return cls.llama_family(**base)

    @classmethod
    def llama_3_1_8b(cls, **kw) -> ModelConfig:
        """Llama 3.1 8B (untied head, llama3 RoPE scaling)."""
        base = dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                    num_kv_heads=8, head_dim=128, intermediate_size=14336,
                    max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0,
                                             original_max_position_embeddings=8192),
                    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
        base.update(kw)
        return cls.llama_family(**base)

    @classmethod
    def qwen2_0_5b(cls, **kw) -> ModelConfig:
        """Qwen2 0.5B (qkv biases, tied head)."""
        base = dict(arch="qwen2", vocab_size=151936, hidden_size=896, num_layers=24,
                    num_heads=14, num_kv_heads=2, intermediate_size=4864,
                    max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1000000.0,
                    qkv_bias=True, tie_word_embeddings=True, bos_token_id=151643,
                    eos_token_id=151643)
        base.update(kw)
        return cls.llama_family(**base)

    @classmethod
    def qwen2_1_5b(cls, **kw) -> ModelConfig:
        """Qwen2 1.5B (qkv biases, tied head)."""
        base = dict(arch="qwen2", vocab_size=151936, hidden_size=1536, num_layers=28,
                    num_heads=12, num_kv_heads=2, intermediate_size=8960,
                    max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1000000.0,
                    qkv_bias=True, tie_word_embeddings=True, bos_token_id=151643,
                    eos_token_id=151643)
        base.update(kw)
        return cls.llama_family(**base)

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **kw) -> ModelConfig:
        """The preset called `name` (`-` and `_` are interchangeable), with overrides `kw`."""
        key = name.replace("-", "_").replace(".", "_").lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown model preset {name!r}; allowed: {tuple(_PRESETS)}")
        return getattr(cls, _PRESETS[key])(**kw)


_PRESETS = {
    "tiny_gpt2": "tiny_gpt2",
    "tiny_llama": "tiny_llama",
    "tiny_qwen2": "tiny_qwen2",
    "gpt2": "gpt2",
    "gpt2_medium": "gpt2_medium",
    "gpt2_large": "gpt2_large",
    "gpt2_xl": "gpt2_xl",
    "llama_3_2_1b": "llama_3_2_1b",
    "llama_3_2_3b": "llama_3_2_3b",
    "llama_3_1_8b": "llama_3_1_8b",
    "qwen2_0_5b": "qwen2_0_5b",
    "qwen2_1_5b": "qwen2_1_5b",
}
