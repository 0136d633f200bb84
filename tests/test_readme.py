"""The README's Python examples run as written (from the repository root)."""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    code = BLOCKS[index].replace("/tmp/", f"{tmp_path}{os.sep}")
    namespace: dict = {"__name__": f"readme_example_{index}"}
    exec(compile(code, f"README.md[python block {index}]", "exec"), namespace)
    if "dpo_grads" in namespace:  # the losses example: gradients exist and are finite
        import jax.numpy as jnp

        assert bool(jnp.all(jnp.isfinite(namespace["dpo_grads"])))
        assert bool(jnp.all(jnp.isfinite(namespace["ppo_grads"])))
        assert float(jnp.abs(namespace["dpo_grads"]).sum()) > 0
    if "logits" in namespace:  # the models example: a sharded forward and an HF export
        assert namespace["logits"].shape[:2] == (8, 16)
        assert (tmp_path / "llama-lora-merged" / "config.json").exists()
