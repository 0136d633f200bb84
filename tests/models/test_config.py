"""ModelConfig validation, presets, and abstract construction of every preset."""

import jax
import pytest
from flax import nnx

from rlhf_jax.models import CausalLM, ModelConfig, RopeScaling, count_params

# Published parameter counts of the Hugging Face checkpoints these presets describe.
PUBLISHED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2_medium": 354_823_168,
    "gpt2_large": 774_030_080,
    "gpt2_xl": 1_557_611_200,
    "llama_3_2_1b": 1_235_814_400,
    "llama_3_2_3b": 3_212_749_824,
    "llama_3_1_8b": 8_030_261_248,
    "qwen2_0_5b": 494_032_768,
    "qwen2_1_5b": 1_543_714_304,
}


class TestPresets:
    @pytest.mark.parametrize("name", ModelConfig.preset_names())
    def test_eval_shape_builds_without_allocating(self, name):
        config = ModelConfig.preset(name)
        model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
        leaves = jax.tree.leaves(nnx.state(model))
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
        kernel = model.backbone.layers.attn.q.kernel
        assert kernel.shape == (config.num_layers, config.hidden_size, config.num_heads,
                                config.resolved_head_dim)
        if name in PUBLISHED_PARAMS:
            assert count_params(model) == PUBLISHED_PARAMS[name]

    def test_preset_lookup_accepts_hub_style_names(self):
        assert ModelConfig.preset("llama-3.2-1b") == ModelConfig.llama_3_2_1b()
        assert ModelConfig.preset("gpt2-medium", remat="full").remat == "full"

    def test_unknown_preset_names_the_allowed_values(self):
        with pytest.raises(ValueError, match="tiny_gpt2"):
            ModelConfig.preset("gpt5")

    def test_families(self):
        g, l_, q = ModelConfig.tiny_gpt2(), ModelConfig.tiny_llama(), ModelConfig.tiny_qwen2()
        assert (g.position_embedding, g.norm, g.mlp, g.tie_word_embeddings) == (
            "learned", "layernorm", "gelu", True)
        assert (l_.position_embedding, l_.norm, l_.mlp, l_.num_kv_heads < l_.num_heads) == (
            "rope", "rmsnorm", "swiglu", True)
        assert q.qkv_bias and not q.o_bias and q.arch == "qwen2"
        assert g.dtype == g.param_dtype == "float32"

    def test_config_is_frozen_and_hashable(self):
        config = ModelConfig.tiny_llama()
        with pytest.raises(AttributeError):
            config.hidden_size = 3
        assert hash(config) == hash(ModelConfig.tiny_llama())


class TestValidation:
    @pytest.mark.parametrize(
        "changes, match",
        [
            (dict(arch="gpt3"), "arch"),
            (dict(norm="batchnorm"), "norm"),
            (dict(num_kv_heads=3), "num_kv_heads"),
            (dict(dtype="int8"), "dtype"),
            (dict(remat="sometimes"), "remat"),
            (dict(hidden_size=0), "hidden_size"),
            (dict(hidden_size=66, num_heads=4), "head_dim"),
        ],
    )
    def test_bad_fields_are_named(self, changes, match):
        with pytest.raises(ValueError, match=match):
            ModelConfig.tiny_llama(**changes)

    def test_rope_scaling_validation(self):
        with pytest.raises(ValueError, match="rope_type"):
            RopeScaling("longrope")
        with pytest.raises(ValueError, match="factor"):
            RopeScaling("linear")
        with pytest.raises(ValueError, match="low_freq_factor"):
            RopeScaling("llama3", factor=8.0)

    def test_rope_scaling_from_dict(self):
        config = ModelConfig.tiny_llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
        assert config.rope_scaling == RopeScaling("linear", factor=2.0)
