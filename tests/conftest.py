"""Test harness: 8 fake CPU devices, set before JAX is imported anywhere.

Accelerator numerics check (opt-in, never in CI): `RLHF_JAX_TEST_PLATFORM=cuda` (or `tpu`) makes
that platform JAX's default backend while the 8 fake CPU devices stay available, e.g.
`RLHF_JAX_TEST_PLATFORM=cuda pytest tests/losses tests/models tests/generation`. Tests that
build a mesh of 8 devices from `jax.devices()` then fail by design. Run it a second time with
`JAX_DEFAULT_MATMUL_PRECISION=highest`: float32 matmuls on a GPU default to TF32, which the
float32-tolerance parity tests do not allow for (docs/benchmarks.md, GPU section).
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# The suite's time is mostly XLA compiles of tiny programs: skip the CPU backend's LLVM
# optimisation passes (about a fifth less time; the suite passes either way).
# Benchmarks never run under this harness.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
_accelerator = os.environ.get("RLHF_JAX_TEST_PLATFORM", "").strip().lower()
if _accelerator:
    os.environ["JAX_PLATFORMS"] = f"{_accelerator},cpu"
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Persistent compilation cache in the ignored .venv: a rerun of the suite reuses every XLA compile
# instead of redoing it. The thresholds are zeroed so CPU compiles (mostly well under a second) are
# cached too. Any of these can be overridden from the environment.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "jax-cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from rlhf_jax import cli  # noqa: E402

settings.register_profile(
    "rlhf_jax",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("rlhf_jax")

_cpu_devices = len(jax.devices("cpu")) if _accelerator else jax.device_count()
assert _cpu_devices == 8, (
    "tests expect 8 fake CPU devices; XLA_FLAGS was set too late "
    f"(device_count={jax.device_count()})"
)

# The Cloud Storage emulator's fixtures (`gcs_emulator`, `gcs_bucket`).
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: E402, F401

# One tiny two-head reward-model run from the command line, shared by the tests that read a
# trained reward model (loading, reward sources, `reward.source=model` runs); they only read it.
TINY_RM_ARGS = ("--model.hidden-size", "32", "--model.num-layers", "1", "--model.num-heads", "2",
                "--logging.progress", "none", "--logging.no-tensorboard",
                "--logging.every-steps", "1", "--num-steps", "3",
                "--head-names", "helpful", "harmless")


@pytest.fixture(scope="session")
def two_head_rm_run(tmp_path_factory):
    """The output directory (a `pathlib.Path`) of `rlhf-jax rm` on a tiny model, 3 steps, heads
    "helpful" and "harmless"."""
    out = tmp_path_factory.mktemp("two_head_rm") / "rm"
    assert cli.main(["rm", "--output-dir", str(out), *TINY_RM_ARGS]) == 0
    return out
