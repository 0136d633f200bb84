"""Smoke test: the public API imports."""

import importlib

import pytest

PUBLIC_MODULES = [
    "rlhf_jax",
    "rlhf_jax.losses",
    "rlhf_jax.models",
    "rlhf_jax.sharding",
    "rlhf_jax.generation",
    "rlhf_jax.data",
    "rlhf_jax.data.synthetic",
    "rlhf_jax.train",
    "rlhf_jax.rlaif",
    "rlhf_jax.cli",
    "rlhf_jax.bench",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_imports(name):
    module = importlib.import_module(name)
    for attr in getattr(module, "__all__", []):
        assert hasattr(module, attr), f"{name}.__all__ lists {attr!r}, which is missing"


def test_losses_import_no_model_or_training_code():
    """`rlhf_jax.losses` depends only on jax, chex and numpy (docs/ARCHITECTURE.md)."""
    import subprocess
    import sys

    code = (
        "import sys, rlhf_jax.losses; "
        "bad = [m for m in ('flax', 'optax', 'rlhf_jax.models', 'rlhf_jax.train', 'torch') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
