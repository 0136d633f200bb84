"""Smoke test: the public API imports."""

import importlib

import pytest

PUBLIC_MODULES = ["rlhf_jax"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_imports(name):
    module = importlib.import_module(name)
    for attr in getattr(module, "__all__", []):
        assert hasattr(module, attr), f"{name}.__all__ lists {attr!r}, which is missing"
