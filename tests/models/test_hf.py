"""Hugging Face interop: parity with transformers' logits, exact export round trip, errors."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from rlhf_jax.models import (
    CausalLM,
    CheckpointError,
    ModelConfig,
    RopeScaling,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)
from rlhf_jax.models.hf import expected_tensors
from rlhf_jax.sharding import MeshConfig, make_mesh

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
ARCHS = ("gpt2", "llama", "qwen2")
# config.json fields that define the architecture (HF names) and must survive export.
CONFIG_FIELDS = {
    "gpt2": ["model_type", "architectures", "vocab_size", "n_positions", "n_embd", "n_layer",
             "n_head", "activation_function", "layer_norm_epsilon", "tie_word_embeddings",
             "bos_token_id", "eos_token_id"],
    "llama": ["model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "rms_norm_eps", "rope_parameters", "attention_bias",
              "mlp_bias", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id"],
    "qwen2": ["model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "rope_parameters",
              "tie_word_embeddings", "use_sliding_window", "hidden_act", "bos_token_id",
              "eos_token_id"],
}


def _tensor_shapes(directory: pathlib.Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request):
    """(arch, model loaded from the fixture, the fixture's reference batch and logits)."""
    arch = request.param
    return arch, from_pretrained(FIXTURES / arch), np.load(FIXTURES / arch / "reference.npz")


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    arch, model, _ = loaded
    return save_pretrained(model, tmp_path_factory.mktemp(f"export_{arch}"))


class TestParity:
    def test_logits_match_transformers(self, loaded, run):
        _, model, ref = loaded
        logits = run(model, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]),
                     jnp.asarray(ref["position_ids"]))
        real = ref["attention_mask"][..., None] > 0
        assert float(np.abs(ref["logits"]).std()) > 0.1  # a meaningful comparison
        np.testing.assert_allclose(np.where(real, logits, 0), np.where(real, ref["logits"], 0),
                                   atol=1e-4, rtol=0)

    def test_default_positions_are_the_reference_positions(self, loaded, run):
        _, model, ref = loaded
        logits = run(model, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]))
        real = ref["attention_mask"][..., None] > 0
        np.testing.assert_allclose(np.where(real, logits, 0), np.where(real, ref["logits"], 0),
                                   atol=1e-4, rtol=0)

    def test_config_mapping(self, loaded):
        arch, model, _ = loaded
        c = model.config
        assert c.arch == arch and c.num_layers == 2 and c.vocab_size == 128
        if arch == "llama":
            assert c.num_kv_heads == 2 and not c.tie_word_embeddings
            assert c.rope_scaling == RopeScaling("llama3", factor=4.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0,
                                                 original_max_position_embeddings=16)
        if arch == "qwen2":
            assert c.qkv_bias and c.tie_word_embeddings and c.rope_theta == 1e6


class TestExport:
    def test_round_trip_is_exact(self, loaded, exported):
        _, model, _ = loaded
        again = from_pretrained(exported)
        assert again.config == model.config
        for a, b in zip(_params(model), _params(again)):
            np.testing.assert_array_equal(a, b)

    def test_config_json_fields_match_transformers(self, loaded, exported):
        arch, _, _ = loaded
        ours = json.loads((exported / "config.json").read_text())
        theirs = json.loads((FIXTURES / arch / "config.json").read_text())
        for field in CONFIG_FIELDS[arch]:
            assert ours.get(field) == theirs.get(field), field

    def test_tensor_names_and_shapes_match_transformers(self, loaded, exported):
        arch, _, _ = loaded
        ours, theirs = _tensor_shapes(exported), _tensor_shapes(FIXTURES / arch)
        assert ours == theirs
        with safe_open(exported / "model.safetensors", framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}

    def test_tensors_equal_the_source_checkpoint(self, loaded, exported):
        arch, _, _ = loaded
        ours = {}
        theirs = {}
        for file in exported.glob("*.safetensors"):
            ours.update(load_file(file))
        for file in (FIXTURES / arch).glob("*.safetensors"):
            theirs.update(load_file(file))
        for name, value in theirs.items():
            np.testing.assert_array_equal(ours[name], value, err_msg=name)

    def test_bfloat16_and_sharded_export(self, tmp_path, run):
        model = from_pretrained(FIXTURES / "llama")
        out = save_pretrained(model, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=30_000)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        again = from_pretrained(out, param_dtype="bfloat16")
        for a, b in zip(_params(model), _params(again)):
            assert b.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
        ref = np.load(FIXTURES / "llama" / "reference.npz")
        lo = run(from_pretrained(out), jnp.asarray(ref["input_ids"]),
                 jnp.asarray(ref["attention_mask"]))
        real = ref["attention_mask"][..., None] > 0
        np.testing.assert_allclose(np.where(real, lo, 0), np.where(real, ref["logits"], 0),
                                   atol=0.1)

    def test_fp16_weights_load(self, tmp_path):
        src = FIXTURES / "gpt2"
        dst = tmp_path / "fp16"
        dst.mkdir()
        shutil.copy(src / "config.json", dst / "config.json")
        tensors = {k: v.astype(np.float16) for k, v in load_file(src / "model.safetensors").items()}
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        model = from_pretrained(dst)
        np.testing.assert_array_equal(
            np.asarray(model.backbone.embed.embedding[...]),
            tensors["transformer.wte.weight"].astype(np.float32))

    def test_from_pretrained_on_a_mesh(self, run):
        mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        model = from_pretrained(FIXTURES / "qwen2", mesh=mesh)
        kernel = model.backbone.layers.mlp.up.kernel[...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        ref = np.load(FIXTURES / "qwen2" / "reference.npz")
        lo = run(model, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]))
        real = ref["attention_mask"][..., None] > 0
        np.testing.assert_allclose(np.where(real, lo, 0), np.where(real, ref["logits"], 0),
                                   atol=1e-4)


class TestErrors:
    @pytest.fixture()
    def gpt2_copy(self, tmp_path):
        dst = tmp_path / "gpt2"
        shutil.copytree(FIXTURES / "gpt2", dst)
        return dst

    def _rewrite(self, directory, edit):
        tensors = load_file(directory / "model.safetensors")
        edit(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})

    def test_missing_tensor_names_tensor_and_shape(self, gpt2_copy):
        self._rewrite(gpt2_copy, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
        with pytest.raises(CheckpointError,
                           match=r"missing tensor 'transformer\.h\.1\.mlp\.c_fc\.weight' "
                                 r"\(expected shape \(32, 128\)\)"):
            from_pretrained(gpt2_copy)

    def test_misshaped_tensor(self, gpt2_copy):
        def edit(t):
            t["transformer.ln_f.bias"] = np.zeros((31,), np.float32)

        self._rewrite(gpt2_copy, edit)
        with pytest.raises(CheckpointError, match=r"'transformer\.ln_f\.bias' has shape "
                                                  r"\(31,\), expected \(32,\)"):
            from_pretrained(gpt2_copy)

    def test_unexpected_tensor(self, gpt2_copy):
        def edit(t):
            t["transformer.h.0.attn.q_norm.weight"] = np.zeros((8,), np.float32)

        self._rewrite(gpt2_copy, edit)
        with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.h.0.attn"):
            from_pretrained(gpt2_copy)

    def test_known_buffers_are_skipped(self, gpt2_copy):
        def edit(t):
            t["transformer.h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)

        self._rewrite(gpt2_copy, edit)
        assert isinstance(from_pretrained(gpt2_copy), CausalLM)

    def test_base_model_names_without_prefix(self, gpt2_copy):
        self._rewrite(gpt2_copy, lambda t: t.update(
            {k.removeprefix("transformer."): t.pop(k) for k in list(t)}))
        model = from_pretrained(gpt2_copy)
        reference = from_pretrained(FIXTURES / "gpt2")
        for a, b in zip(_params(model), _params(reference)):
            np.testing.assert_array_equal(a, b)

    def test_unsupported_architecture(self, gpt2_copy):
        config = json.loads((gpt2_copy / "config.json").read_text())
        config.update(architectures=["MistralForCausalLM"], model_type="mistral")
        (gpt2_copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match="MistralForCausalLM.*supported"):
            from_pretrained(gpt2_copy)

    def test_no_weights(self, tmp_path):
        (tmp_path / "config.json").write_text((FIXTURES / "gpt2" / "config.json").read_text())
        with pytest.raises(CheckpointError, match="model.safetensors"):
            from_pretrained(tmp_path)

    def test_unsupported_rope_parameters(self):
        hf = json.loads((FIXTURES / "llama" / "config.json").read_text())
        hf["rope_parameters"]["partial_rotary_factor"] = 0.5
        with pytest.raises(CheckpointError, match="partial_rotary_factor"):
            config_from_hf(hf)

    def test_config_hf_cannot_express(self):
        with pytest.raises(CheckpointError, match="tie_word_embeddings"):
            config_to_hf(ModelConfig.tiny_gpt2(tie_word_embeddings=False))


def test_expected_tensors_cover_every_parameter():
    for config in (ModelConfig.tiny_gpt2(), ModelConfig.tiny_llama(), ModelConfig.tiny_qwen2()):
        model = nnx.eval_shape(lambda c=config: CausalLM(c, rngs=nnx.Rngs(0)))
        n_ours = sum(int(np.prod(x.shape)) for x in _params(model))
        n_hf = sum(int(np.prod(s)) for s in expected_tensors(config).values())
        assert n_ours == n_hf


def test_legacy_rope_scaling_keys():
    hf = json.loads((FIXTURES / "llama" / "config.json").read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    assert config_from_hf(hf) == from_pretrained(FIXTURES / "llama").config


def test_load_tokenizer():
    tok = load_tokenizer(FIXTURES / "gpt2")
    ids = tok("hello world the reward")["input_ids"]
    assert tok.decode(ids) == "hello world the reward"
    assert tok.pad_token == "<pad>" and tok.eos_token_id == 2
    with pytest.raises(FileNotFoundError):
        load_tokenizer(FIXTURES / "missing")


class TestDamagedFiles:
    """A truncated or corrupt safetensors file is named, with the tensor when it is known."""

    @pytest.fixture()
    def gpt2_copy(self, tmp_path):
        dst = tmp_path / "gpt2"
        shutil.copytree(FIXTURES / "gpt2", dst)
        return dst

    def test_truncated_file(self, gpt2_copy):
        weights = gpt2_copy / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
        with pytest.raises(CheckpointError, match=rf"{weights}: cannot be read, the "
                                                  r"safetensors file is truncated or corrupt"):
            from_pretrained(gpt2_copy)

    @pytest.mark.parametrize("damage", ["garbage", "header"])
    def test_corrupt_header(self, gpt2_copy, damage):
        weights = gpt2_copy / "model.safetensors"
        data = bytearray(weights.read_bytes())
        if damage == "garbage":
            data = b"\x00" * 64
        else:
            data[8:40] = b"#" * 32  # the JSON header no longer parses
        weights.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rf"{weights}: .*truncated or corrupt"):
            from_pretrained(gpt2_copy)

    def test_shard_without_its_tensor_names_file_and_tensor(self, tmp_path):
        out = save_pretrained(from_pretrained(FIXTURES / "llama"), tmp_path / "llama",
                              max_shard_bytes=30_000)
        index_file = out / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        name = "model.norm.weight"
        wrong = next(f for f in sorted(set(index["weight_map"].values()))
                     if f != index["weight_map"][name])
        index["weight_map"][name] = wrong
        index_file.write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=rf"{out / wrong}, tensor '{name}'"):
            from_pretrained(out)
