"""The public API of `rlhf_jax.data` and `rlhf_jax.data.synthetic` imports."""

import importlib

import pytest


@pytest.mark.parametrize("name", ["rlhf_jax.data", "rlhf_jax.data.synthetic"])
def test_public_names_exist(name):
    module = importlib.import_module(name)
    assert module.__all__
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ lists {attr!r}, which is missing"


def test_data_does_not_import_tensorflow_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, rlhf_jax.data, rlhf_jax.data.synthetic\n"
        "bad = [m for m in ('tensorflow', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
