"""Hugging Face checkpoint interop without torch: `from_pretrained` and `save_pretrained`.

Supported architectures (`config.json` `architectures` / `model_type`): `GPT2LMHeadModel`
(`gpt2`), `LlamaForCausalLM` (`llama`), `Qwen2ForCausalLM` (`qwen2`). Weights are read from
`model.safetensors` or a sharded `model.safetensors.index.json` (float32, bfloat16 or float16)
and converted to the parameter dtype.

Layouts: GPT-2 `Conv1D` weights are stored `[in, out]` (fused `c_attn` = q | k | v along `out`);
Llama/Qwen2 `nn.Linear` weights are stored `[out, in]`. Here every projection kernel is
`[*in, *out]` (q: `[E, H, D]`, o: `[H, D, E]`), stacked over layers on a leading axis.

Every tensor the architecture needs must be present with its exact shape; a missing,
unexpected or mis-shaped tensor raises `CheckpointError` naming the tensor and the expected
shape. Known non-parameter buffers (`attn.bias`/`attn.masked_bias` of old GPT-2 files,
`rotary_emb.inv_freq`) and a redundant `lm_head.weight` of a tied model are skipped, and
counted in an INFO log message.

`save_pretrained(model, path)` writes `config.json` and `model.safetensors` (adapters merged
into a copy first) that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads to the
same logits; `from_pretrained(save_pretrained(m))` gives back identical parameters.

Every path is an `etils.epath.Path`: a local directory or a `gs://` URI alike. safetensors and
transformers' tokenizers read only local files, so a remote directory is staged: its weight files
(or its tokenizer files) are copied into a temporary local directory (under `TMPDIR`), read from
there with the same memory-mapped reader as a local directory, and the copy is removed once
loaded. A remote save writes into a temporary local directory and copies each file up. Staging
needs local disk for one copy of the weights, but never holds more of them in memory than a
local load does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rlhf_jax.models.config import ModelConfig, RopeScaling
from rlhf_jax.models.lora import has_lora, merge_lora
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.sharding import gather_to_host, variable_sharding

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCH_CLASS = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_IGNORED = (
    re.compile(r"^transformer\.h\.\d+\.attn\.(masked_)?bias$"),
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
)
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ROPE_KEYS = {"factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "truncate"}


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".npz",
                    ".gguf")


class CheckpointError(ValueError):
    """A checkpoint directory does not match what the architecture needs."""


# --------------------------------------------------------------------------- paths
def _is_local(path: epath.Path) -> bool:
    """Whether `path` is on the local file system (not a `gs://`-style URI)."""
    return "://" not in os.fspath(path)


@contextlib.contextmanager
def _staged(path: epath.Path, names: Sequence[str]) -> Iterator[epath.Path]:
    """A local directory holding the files `names` of the directory `path`: `path` itself when
    it is local, else a temporary copy that is removed on exit."""
    if _is_local(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_hf_") as tmp:
        local = epath.Path(tmp)
        for name in names:
            (path / name).copy(local / name)
        yield local


# --------------------------------------------------------------------------- config mapping
def _rope_from_hf(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and not all(isinstance(v, dict)
                                                       for v in params.values()):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    partial = scaling.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor={partial} is not supported (1.0)")
    unknown = set(scaling) - _ROPE_KEYS
    if unknown:
        raise CheckpointError(f"{where}: unsupported RoPE parameters {sorted(unknown)} for "
                              f"rope_type={rope_type!r}; known: {sorted(_ROPE_KEYS)}")
    if rope_type == "default":
        return float(theta), None
    try:
        return float(theta), RopeScaling(rope_type=rope_type, **scaling)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad RoPE scaling {scaling}: {e}") from e


def config_from_hf(hf: dict[str, Any], *, dtype: str = "float32",
                   param_dtype: str = "float32", where: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    supported = sorted(SUPPORTED_ARCHITECTURES)
    for a in archs:
        if a not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{where}: architecture {a!r} is not supported; supported: "
                                  f"{supported}")
    if model_type not in _ARCH_CLASS:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; supported: "
                              f"{sorted(_ARCH_CLASS)}")
    common = dict(dtype=dtype, param_dtype=param_dtype,
                  initializer_range=hf.get("initializer_range", 0.02),
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  pad_token_id=hf.get("pad_token_id"))
    if isinstance(common["eos_token_id"], list):
        common["eos_token_id"] = common["eos_token_id"][0]
    if model_type == "gpt2":
        if not hf.get("scale_attn_weights", True):
            raise CheckpointError(f"{where}: scale_attn_weights=false is not supported")
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            raise CheckpointError(f"{where}: scale_attn_by_inverse_layer_idx=true is not "
                                  "supported")
        act = hf.get("activation_function", "gelu_new")
        if act not in _ACTIVATIONS:
            raise CheckpointError(f"{where}: activation_function={act!r} is not supported; "
                                  f"allowed: {sorted(_ACTIVATIONS)}")
        e = hf["n_embd"]
        return ModelConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], hidden_size=e, num_layers=hf["n_layer"],
            num_heads=hf["n_head"], num_kv_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * e,
            max_position_embeddings=hf["n_positions"], norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
            activation=_ACTIVATIONS[act], position_embedding="learned", qkv_bias=True,
            o_bias=True, mlp_bias=True, tie_word_embeddings=hf.get("tie_word_embeddings", True),
            **common)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (silu)")
    if model_type == "qwen2" and hf.get("use_sliding_window", False):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
    theta, scaling = _rope_from_hf(hf, where)
    heads = hf["num_attention_heads"]
    attention_bias = hf.get("attention_bias", False)
    return ModelConfig(
        arch=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", activation="silu",
        position_embedding="rope", rope_theta=theta, rope_scaling=scaling,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=False if model_type == "qwen2" else hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), **common)


def config_to_hf(config: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """The Hugging Face `config.json` dict for `config` (raises if HF cannot express it)."""
    c = config
    dtype = dtype or c.param_dtype
    ids = dict(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
               pad_token_id=c.pad_token_id)
    if c.arch == "gpt2":
        if (c.norm, c.mlp, c.position_embedding) != ("layernorm", "gelu", "learned") or \
                not (c.qkv_bias and c.o_bias and c.mlp_bias) or c.num_kv_heads != c.num_heads \
                or c.resolved_head_dim * c.num_heads != c.hidden_size:
            raise CheckpointError(f"config {c} cannot be written as GPT2LMHeadModel")
        if not c.tie_word_embeddings:
            raise CheckpointError("GPT2LMHeadModel needs tie_word_embeddings=True")
        act = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                    vocab_size=c.vocab_size, n_positions=c.max_position_embeddings,
                    n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
                    n_inner=c.intermediate_size, activation_function=act[c.activation],
                    layer_norm_epsilon=c.norm_eps, initializer_range=c.initializer_range,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, tie_word_embeddings=True, dtype=dtype, **ids)
    if (c.norm, c.mlp, c.position_embedding, c.activation) != \
            ("rmsnorm", "swiglu", "rope", "silu"):
        raise CheckpointError(f"config {c} cannot be written as {_ARCH_CLASS[c.arch]}")
    if c.arch == "qwen2" and not (c.qkv_bias and not c.o_bias and not c.mlp_bias):
        raise CheckpointError("Qwen2ForCausalLM needs qkv_bias=True, o_bias=mlp_bias=False")
    if c.arch == "llama" and c.qkv_bias != c.o_bias:
        raise CheckpointError("LlamaForCausalLM has one attention_bias flag: qkv_bias must "
                              "equal o_bias")
    rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope_parameters.update(c.rope_scaling.to_hf())
    out = dict(architectures=[_ARCH_CLASS[c.arch]], model_type=c.arch,
               vocab_size=c.vocab_size, hidden_size=c.hidden_size,
               intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
               num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
               head_dim=c.resolved_head_dim, max_position_embeddings=c.max_position_embeddings,
               rms_norm_eps=c.norm_eps, hidden_act="silu", initializer_range=c.initializer_range,
               rope_parameters=rope_parameters, rope_theta=c.rope_theta,
               tie_word_embeddings=c.tie_word_embeddings, attention_dropout=0.0, dtype=dtype,
               **ids)
    if c.rope_scaling is not None:
        out["rope_scaling"] = c.rope_scaling.to_hf()
    if c.arch == "llama":
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=c.num_layers)
    return out


# --------------------------------------------------------------------------- tensor mapping
class Link(NamedTuple):
    """HF tensors `hf` (names, `{i}` = layer) <-> model parameters `ours` (state paths)."""

    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    ours: tuple[tuple[str, ...], ...]
    load: Callable[[list[np.ndarray]], list[np.ndarray]]
    save: Callable[[list[np.ndarray]], list[np.ndarray]]
    layered: bool


def _p(s: str) -> tuple[str, ...]:
    return tuple(s.split("/"))


def _same(hf, ours, shape, layered=False):
    return Link((hf,), (tuple(shape),), (_p(ours),), lambda a: a, lambda a: a, layered)


def _reshaped(hf, ours, hf_shape, our_shape, layered=True):
    return Link((hf,), (tuple(hf_shape),), (_p(ours),),
                lambda a: [a[0].reshape(our_shape)], lambda a: [a[0].reshape(hf_shape)], layered)


def _linear(hf, ours, in_shape, out_shape, layered=True):
    """nn.Linear weight [out, in] <-> kernel [*in, *out]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return Link((hf,), ((n_out, n_in),), (_p(ours),),
                lambda a: [a[0].T.reshape(tuple(in_shape) + tuple(out_shape))],
                lambda a: [a[0].reshape(n_in, n_out).T], layered)


def _conv1d(hf, ours, in_shape, out_shape, layered=True):
    """GPT-2 Conv1D weight [in, out] <-> kernel [*in, *out]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return _reshaped(hf, ours, (n_in, n_out), tuple(in_shape) + tuple(out_shape), layered)


def tensor_links(config: ModelConfig) -> list[Link]:
    """The HF <-> model tensor correspondence for `config.arch`."""
    c = config
    e, h, k, d, f = (c.hidden_size, c.num_heads, c.num_kv_heads, c.resolved_head_dim,
                     c.intermediate_size)
    lay = "backbone/layers/"
    links: list[Link] = []
    if c.arch == "gpt2":
        p = "transformer.h.{i}."

        def split_w(a):
            w = a[0]
            return [w[:, j * e:(j + 1) * e].reshape(e, h, d) for j in range(3)]

        def split_b(a):
            b = a[0]
            return [b[j * e:(j + 1) * e].reshape(h, d) for j in range(3)]

        links += [
            _same("transformer.wte.weight", "backbone/embed/embedding", (c.vocab_size, e)),
            _same("transformer.wpe.weight", "backbone/pos_embed/embedding",
                  (c.max_position_embeddings, e)),
            _same(p + "ln_1.weight", lay + "attn_norm/scale", (e,), True),
            _same(p + "ln_1.bias", lay + "attn_norm/bias", (e,), True),
            Link((p + "attn.c_attn.weight",), ((e, 3 * e),),
                 tuple(_p(lay + f"attn/{n}/kernel") for n in "qkv"), split_w,
                 lambda a: [np.concatenate([x.reshape(e, e) for x in a], axis=1)], True),
            Link((p + "attn.c_attn.bias",), ((3 * e,),),
                 tuple(_p(lay + f"attn/{n}/bias") for n in "qkv"), split_b,
                 lambda a: [np.concatenate([x.reshape(e) for x in a])], True),
            _conv1d(p + "attn.c_proj.weight", lay + "attn/o/kernel", (h, d), (e,)),
            _same(p + "attn.c_proj.bias", lay + "attn/o/bias", (e,), True),
            _same(p + "ln_2.weight", lay + "mlp_norm/scale", (e,), True),
            _same(p + "ln_2.bias", lay + "mlp_norm/bias", (e,), True),
            _conv1d(p + "mlp.c_fc.weight", lay + "mlp/up/kernel", (e,), (f,)),
            _same(p + "mlp.c_fc.bias", lay + "mlp/up/bias", (f,), True),
            _conv1d(p + "mlp.c_proj.weight", lay + "mlp/down/kernel", (f,), (e,)),
            _same(p + "mlp.c_proj.bias", lay + "mlp/down/bias", (e,), True),
            _same("transformer.ln_f.weight", "backbone/final_norm/scale", (e,)),
            _same("transformer.ln_f.bias", "backbone/final_norm/bias", (e,)),
        ]
        return links
    p = "model.layers.{i}."
    links += [
        _same("model.embed_tokens.weight", "backbone/embed/embedding", (c.vocab_size, e)),
        _same(p + "input_layernorm.weight", lay + "attn_norm/scale", (e,), True),
        _linear(p + "self_attn.q_proj.weight", lay + "attn/q/kernel", (e,), (h, d)),
        _linear(p + "self_attn.k_proj.weight", lay + "attn/k/kernel", (e,), (k, d)),
        _linear(p + "self_attn.v_proj.weight", lay + "attn/v/kernel", (e,), (k, d)),
        _linear(p + "self_attn.o_proj.weight", lay + "attn/o/kernel", (h, d), (e,)),
        _same(p + "post_attention_layernorm.weight", lay + "mlp_norm/scale", (e,), True),
        _linear(p + "mlp.gate_proj.weight", lay + "mlp/gate/kernel", (e,), (f,)),
        _linear(p + "mlp.up_proj.weight", lay + "mlp/up/kernel", (e,), (f,)),
        _linear(p + "mlp.down_proj.weight", lay + "mlp/down/kernel", (f,), (e,)),
        _same("model.norm.weight", "backbone/final_norm/scale", (e,)),
    ]
    if c.qkv_bias:
        links += [
            _reshaped(p + "self_attn.q_proj.bias", lay + "attn/q/bias", (h * d,), (h, d)),
            _reshaped(p + "self_attn.k_proj.bias", lay + "attn/k/bias", (k * d,), (k, d)),
            _reshaped(p + "self_attn.v_proj.bias", lay + "attn/v/bias", (k * d,), (k, d)),
        ]
    if c.o_bias:
        links.append(_same(p + "self_attn.o_proj.bias", lay + "attn/o/bias", (e,), True))
    if c.mlp_bias:
        links += [_same(p + f"mlp.{n}_proj.bias", lay + f"mlp/{n}/bias", (sz,), True)
                  for n, sz in (("gate", f), ("up", f), ("down", e))]
    if not c.tie_word_embeddings:
        links.append(_linear("lm_head.weight", "lm_head/kernel", (e,), (c.vocab_size,),
                             layered=False))
    return links


def _expand(link: Link, num_layers: int) -> list[list[str]]:
    if not link.layered:
        return [list(link.hf)]
    return [[n.format(i=i) for n in link.hf] for i in range(num_layers)]


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the architecture needs, with its shape."""
    out = {}
    for link in tensor_links(config):
        for names in _expand(link, config.num_layers):
            out.update(zip(names, link.hf_shapes))
    return out


# --------------------------------------------------------------------------- reading
def _weight_files(path: epath.Path) -> tuple[list[str], dict[str, str] | None]:
    """`(file names, tensor -> file map)` of the weights in `path`: one `model.safetensors`
    (map None: read from the file) or the shards a `model.safetensors.index.json` names."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})"
                                  ) from e
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (path / file).exists():
                raise CheckpointError(f"{path}: shard {file} named by the index is missing")
        return files, weight_map
    if (path / SINGLE_FILE).exists():
        return [SINGLE_FILE], None
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors is read)")


class _TensorFiles:
    """Name -> tensor over one safetensors file or a sharded index (memory-light access).

    `local` is the directory read (a staged copy of a remote one); `where` is the directory the
    user named, used in every message."""

    def __init__(self, local: epath.Path, weight_map: dict[str, str] | None, where: epath.Path):
        self.local, self.where = local, where
        self._handles: dict[str, Any] = {}
        if weight_map is None:
            self.files = {n: SINGLE_FILE for n in self._handle(SINGLE_FILE).keys()}
        else:
            self.files = dict(weight_map)
        self.rename: dict[str, str] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def _damaged(self, file: str, error: Exception, name: str | None = None) -> CheckpointError:
        what = f", tensor {name!r}" if name is not None else ""
        return CheckpointError(f"{self.where / file}{what}: cannot be read, the safetensors file "
                               f"is truncated or corrupt ({type(error).__name__}: {error})")

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(os.fspath(self.local / file), framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise self._damaged(file, e) from e
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self.rename.get(name, name)
        try:
            return tuple(self._handle(self.files[name]).get_slice(stored).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise self._damaged(self.files[name], e, name) from e

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handle(self.files[name]).get_tensor(self.rename.get(name, name))
        except (SafetensorError, OSError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise self._damaged(self.files[name], e, name) from e


def _normalise_names(files: _TensorFiles, arch: str) -> None:
    """Base-model checkpoints (`GPT2Model`, `LlamaModel`) lack the `transformer.`/`model.`
    prefix of the LM class; map them."""
    prefix = "transformer." if arch == "gpt2" else "model."
    names = files.names()
    if names and not any(n.startswith(prefix) for n in names):
        files.files = {(n if n.startswith("lm_head.") else prefix + n): f
                       for n, f in files.files.items()}
        files.rename = {(n if n.startswith("lm_head.") else prefix + n): n for n in names}


def _load_arrays(files: _TensorFiles, config: ModelConfig, param_dtype) -> tuple[dict, int]:
    path = files.where
    _normalise_names(files, config.arch)
    expected = expected_tensors(config)
    present = set(files.names())

    shape_of = files.shape
    errors = []
    skipped = 0
    for name, shape in expected.items():
        if name not in present:
            errors.append(f"missing tensor {name!r} (expected shape {tuple(shape)})")
        elif shape_of(name) != tuple(shape):
            errors.append(f"tensor {name!r} has shape {shape_of(name)}, expected {tuple(shape)}")
    for name in sorted(present - set(expected)):
        if any(r.match(name) for r in _IGNORED) or (
                name == "lm_head.weight" and config.tie_word_embeddings):
            skipped += 1
            continue
        errors.append(f"unexpected tensor {name!r} with shape {shape_of(name)}")
    if errors:
        raise CheckpointError(f"{path}: checkpoint does not match {config.arch} config:\n  "
                              + "\n  ".join(errors))

    def read(name):
        raw = files.get(name)
        return raw.astype(np.float32) if raw.dtype != np.float32 else raw

    arrays: dict[tuple[str, ...], np.ndarray] = {}
    for link in tensor_links(config):
        per_layer = [link.load([read(n) for n in names])
                     for names in _expand(link, config.num_layers)]
        for j, our in enumerate(link.ours):
            if link.layered:
                value = np.stack([outs[j] for outs in per_layer])
            else:
                value = per_layer[0][j]
            arrays[our] = value.astype(param_dtype)
    return arrays, skipped


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    **config_overrides,
) -> CausalLM:
    """A `CausalLM` with the weights of the Hugging Face directory `path`.

    Args:
      path: a directory with `config.json` and safetensors weights (single or sharded): local
        or a `gs://` URI (staged through a temporary local copy, module docstring).
      dtype, param_dtype: compute and parameter dtypes (`"float32"`, `"bfloat16"`, ...).
      mesh: when given, every parameter is placed on the mesh by its logical axis names
        (`rlhf_jax.sharding.LOGICAL_AXIS_RULES`).
      config_overrides: other `ModelConfig` fields to change (e.g. `remat="full"`).
    """
    path = epath.Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    hf = json.loads(config_file.read_text())
    config = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, where=str(config_file))
    if config_overrides:
        config = config.replace(**config_overrides)
    names, weight_map = _weight_files(path)
    with _staged(path, names) as local:
        arrays, skipped = _load_arrays(_TensorFiles(local, weight_map, path), config,
                                       config.params_dtype)

    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    unset = [p for p, _ in flat if _path_key(p) not in arrays]
    if unset:
        raise CheckpointError(f"{path}: parameters not provided by the checkpoint: "
                              f"{['/'.join(map(str, p)) for p in unset]}")
    items = []
    for p, var in flat:
        value = arrays[_path_key(p)]
        if value.shape != tuple(var.shape):
            raise CheckpointError(f"{path}: parameter {'/'.join(map(str, p))} built with "
                                  f"shape {value.shape}, model expects {tuple(var.shape)}")
        if mesh is not None:
            value = jax.device_put(value, variable_sharding(var, mesh))
        else:
            value = jnp.asarray(value)
        items.append((p, var.replace(value)))
    state = nnx.from_flat_state(items)
    if skipped:
        logger.info("%s: skipped %d non-parameter tensors (buffers / tied lm_head)", path,
                    skipped)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------- writing
def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes `model` as a Hugging Face directory (`config.json` + safetensors), local or
    `gs://` (module docstring).

    LoRA adapters are merged into a copy first. `dtype` (default: the parameter dtype) is the
    stored dtype; `max_shard_bytes` splits the weights into shards with an index;
    `tokenizer` (a transformers tokenizer) is saved alongside. On multi-host runs every
    process gathers the weights and process 0 writes. Returns the directory.

    Only the files written here are replaced; of the files already in `path`, only the weights
    a previous save wrote (`model.safetensors`, the shards its index names, the index) are
    removed when this save does not rewrite them. Every other file (a user's
    `model_backup.safetensors`, notes) is kept.

    Raises:
      FileExistsError: `path` is a non-empty directory that is not a Hugging Face model
        directory (it has no `config.json`), unless `overwrite` is true.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_pretrained needs a CausalLM, got {type(model).__name__}")
    path = epath.Path(path)
    if not overwrite and path.is_dir() and not (path / "config.json").exists() and \
            any(True for _ in path.iterdir()):
        raise FileExistsError(f"{path} is not empty and is not a Hugging Face model directory "
                              "(no config.json); pick an empty or new directory, or pass "
                              "overwrite=True to write into it (its other files are kept)")
    if has_lora(model):
        model = merge_lora(nnx.clone(model))
    config = model.config
    dtype = dtype or config.param_dtype
    np_dtype = jnp.dtype(dtype)
    hf_config = config_to_hf(config, dtype=dtype)

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    ours = {_path_key(p): gather_to_host(v[...]) for p, v in flat}
    tensors: dict[str, np.ndarray] = {}
    for link in tensor_links(config):
        values = [ours.pop(o) for o in link.ours]
        if link.layered:
            for i, names in enumerate(_expand(link, config.num_layers)):
                outs = link.save([np.asarray(v[i], np.float32) for v in values])
                tensors.update(zip(names, outs))
        else:
            outs = link.save([np.asarray(v, np.float32) for v in values])
            tensors.update(zip(link.hf, outs))
    if ours:
        raise CheckpointError(f"parameters with no Hugging Face tensor: "
                              f"{['/'.join(p) for p in ours]}")
    tensors = {n: np.ascontiguousarray(t.astype(np_dtype)) for n, t in tensors.items()}

    if jax.process_index() != 0:
        return path
    previous = _previous_weight_files(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    with _writing(path) as out:
        (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if max_shard_bytes is None:
            save_file(tensors, os.fspath(out / SINGLE_FILE), metadata=meta)
        else:
            shards: list[dict[str, np.ndarray]] = [{}]
            size = 0
            for name in sorted(tensors):
                t = tensors[name]
                if shards[-1] and size + t.nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][name] = t
                size += t.nbytes
            weight_map = {}
            for j, shard in enumerate(shards):
                fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.fspath(out / fname), metadata=meta)
                weight_map.update({n: fname for n in shard})
            total = int(sum(t.nbytes for t in tensors.values()))
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(os.fspath(out))
        written = sorted(f.name for f in out.iterdir())
        _publish(out, path, written)
        for name in sorted(previous - set(written)):
            (path / name).unlink(missing_ok=True)
    return path


def _previous_weight_files(path: epath.Path) -> set[str]:
    """The weight files an earlier save left in `path`: `model.safetensors`, the index and the
    shards it names (an unreadable index names none)."""
    previous = {name for name in (SINGLE_FILE, INDEX_FILE) if (path / name).exists()}
    if INDEX_FILE in previous:
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            previous |= {f for f in weight_map.values()
                         if isinstance(f, str) and f == epath.Path(f).name}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            logger.warning("%s: unreadable %s (%s); the shards it named are left in place",
                           path, INDEX_FILE, e)
    return previous


@contextlib.contextmanager
def _writing(path: epath.Path) -> Iterator[epath.Path]:
    """A temporary local directory to write the files of `path` into before `_publish`: inside
    `path` when it is local (so that publishing is an atomic rename), else under `TMPDIR`."""
    local = _is_local(path)
    with tempfile.TemporaryDirectory(prefix=".rlhf_jax_hf_",
                                     dir=os.fspath(path) if local else None) as tmp:
        yield epath.Path(tmp)


def _publish(out: epath.Path, path: epath.Path, names: Sequence[str]) -> None:
    """Moves (local) or copies (remote) the files `names` from `out` into `path`."""
    for name in names:
        if _is_local(path):
            (out / name).replace(path / name)
        else:
            (out / name).copy(path / name, overwrite=True)


def load_tokenizer(path: str | os.PathLike, **kwargs):
    """The transformers tokenizer saved in the directory `path`, local or `gs://` (never
    downloads from a hub; a remote directory's files other than weights are staged locally)."""
    # Imported here: transformers takes ~2 s to import, and only tokenizer loading needs it.
    from transformers import AutoTokenizer

    path = epath.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    names = [f.name for f in path.iterdir()
             if f.suffix not in _WEIGHT_SUFFIXES and f.is_file()]
    with _staged(path, names) as local:
        return AutoTokenizer.from_pretrained(os.fspath(local), local_files_only=True, **kwargs)


__all__: Sequence[str] = [
    "CheckpointError",
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "expected_tensors",
    "from_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "tensor_links",
]
