"""Every ```python block of docs/losses.md runs and yields finite losses and gradients."""

import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "losses.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path):
    return FENCE.findall(path.read_text())


BLOCKS = python_blocks(DOC)


def test_doc_has_examples():
    assert len(BLOCKS) >= 2


def test_first_example_is_the_readme_example():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Compose the losses in your own code", 1)[1]
    readme_block = FENCE.findall(section)[0]
    assert BLOCKS[0] == readme_block


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_block_runs_with_finite_losses_and_gradients(index):
    namespace = {"__name__": f"docs_losses_block_{index}"}
    exec(compile(BLOCKS[index], f"{DOC}:block{index}", "exec"), namespace)  # noqa: S102
    grads = {k: v for k, v in namespace.items() if k.endswith("_grads")}
    assert grads, "each example computes at least one gradient"
    for name, tree in grads.items():
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
        assert leaves and all(np.all(np.isfinite(x)) for x in leaves), name
        assert any(np.any(x != 0.0) for x in leaves), name
        loss_fn = namespace[name[: -len("_grads")]]
        value = np.asarray(loss_fn(namespace["w"]))
        assert value.shape == () and np.isfinite(value), name
