"""Train state, step, loop, checkpoints, logging and configs, on a toy regression model."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from train_toys import ToyLoader, ToyModel, toy_loss

from rlhf_jax.train import (
    CheckpointConfig,
    Checkpointer,
    ConfigError,
    LoggingConfig,
    NonFiniteError,
    OptimizerConfig,
    PreemptionGuard,
    TrainConfig,
    config_from_yaml,
    create_train_state,
    fit,
    jit_train_step,
    load_config,
    make_optimizer,
    make_schedule,
    make_train_step,
    read_metrics,
    save_config,
)
from rlhf_jax.train.loop import WALL_CLOCK_METRICS
from rlhf_jax.train.online import own_train_state
from rlhf_jax.train.optimizer import clip_by_global_norm


def _setup(config: TrainConfig, *, mesh_shape=(8,), accum: int = 1):
    model = ToyModel()
    tx, schedule = make_optimizer(config.optimizer, config.num_steps)
    graphdef, state = create_train_state(model, tx, seed=config.seed)
    mesh = jax.make_mesh(mesh_shape, ("data",) if len(mesh_shape) == 1 else ("data", "fsdp"))
    replicated = NamedSharding(mesh, P())
    state_sharding = jax.tree.map(lambda _: replicated, state)
    state = jax.device_put(state, state_sharding)
    batch_sharding = NamedSharding(mesh, P(mesh.axis_names))
    step = jit_train_step(
        make_train_step(toy_loss, tx, graphdef=graphdef, schedule=schedule,
                        grad_accum_steps=accum),
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
    )
    return step, state, lambda b: jax.device_put(b, batch_sharding)


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / "run"),
        num_steps=8,
        optimizer=OptimizerConfig(learning_rate=0.05, schedule="cosine", warmup_steps=2),
        logging=LoggingConfig(every_steps=1, tensorboard=True, progress="none"),
        checkpoint=CheckpointConfig(every_steps=4, keep_last=2),
    )
    base.update(kw)
    return TrainConfig(**base)


def _exact(records):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_METRICS} for r in records]


class TestTrainStep:
    def test_grad_accumulation_matches_full_batch(self):
        config = TrainConfig(optimizer=OptimizerConfig(learning_rate=0.1, max_grad_norm=None))
        tx, _ = make_optimizer(config.optimizer, 10)
        batch = next(ToyLoader())
        # A loss without the rng term, so micro-batch keys do not matter.
        loss_fn = lambda m, b, r: (jnp.mean((m(b["x"]) - b["y"]) ** 2), {})
        graphdef, s1 = create_train_state(ToyModel(), tx, seed=0)
        _, s4 = create_train_state(ToyModel(), tx, seed=0)
        full = jax.jit(make_train_step(loss_fn, tx, graphdef=graphdef))
        micro = jax.jit(make_train_step(loss_fn, tx, graphdef=graphdef, grad_accum_steps=4))
        s1, m1 = full(s1, batch)
        s4, m4 = micro(s4, batch)
        np.testing.assert_allclose(m1["train/grad_norm"], m4["train/grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    def test_accumulation_rejects_indivisible_batch(self):
        tx, _ = make_optimizer(OptimizerConfig(), 10)
        graphdef, state = create_train_state(ToyModel(), tx, seed=0)
        step = make_train_step(toy_loss, tx, graphdef=graphdef, grad_accum_steps=3)
        with pytest.raises(ValueError, match="grad_accum_steps=3"):
            step(state, next(ToyLoader()))

    def test_nonfinite_update_is_skipped(self):
        tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1), 10)
        graphdef, state = create_train_state(ToyModel(), tx, seed=0)
        step = jax.jit(make_train_step(toy_loss, tx, graphdef=graphdef))
        before = jax.tree.map(np.asarray, state)
        batch = next(ToyLoader())
        batch["y"] = batch["y"].copy()
        batch["y"][0, 0] = np.nan
        state, metrics = step(state, batch)
        assert float(metrics["train/nonfinite"]) == 1.0
        for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(state.params)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(state.opt_state)):
            np.testing.assert_array_equal(a, b)
        assert int(state.step) == 1  # the step counter still advances
        # The next finite batch updates normally.
        state, metrics = step(state, next(ToyLoader(seed=1)))
        assert float(metrics["train/nonfinite"]) == 0.0
        assert not np.array_equal(
            jax.tree.leaves(before.params)[0], jax.tree.leaves(state.params)[0]
        )

    def test_donated_step_keeps_no_copy_of_the_optimizer_state(self):
        # The non-finite guard must not hold the old and the new moments at once: the step's
        # temporaries are the gradient (and its clipped copy), not copies of the moments.
        tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1), 10)
        graphdef, state = create_train_state(ToyModel(din=512, dout=512), tx, seed=0)
        batch = {"x": np.ones((4, 512), np.float32), "y": np.zeros((4, 512), np.float32)}
        step = jax.jit(make_train_step(toy_loss, tx, graphdef=graphdef), donate_argnums=0)
        memory = step.lower(state, batch).compile().memory_analysis()
        kernel_bytes = 512 * 512 * 4
        assert memory.temp_size_in_bytes < 2.5 * kernel_bytes, memory.temp_size_in_bytes

    def test_weight_decay_only_on_matrices(self):
        cfg = OptimizerConfig(learning_rate=0.5, weight_decay=0.1, schedule="constant")
        tx, _ = make_optimizer(cfg, 10)
        graphdef, state = create_train_state(ToyModel(), tx, seed=0)
        state = state._replace(params=jax.tree.map(lambda x: x + 1.0, state.params))
        before = jax.tree.map(np.asarray, state.params)
        zero_loss = lambda m, b, r: (0.0 * jnp.sum(m(b["x"])), {})
        state, _ = jax.jit(make_train_step(zero_loss, tx, graphdef=graphdef))(
            state, next(ToyLoader()))
        # AdamW with a zero gradient: W <- W - lr * wd * W for matrices, biases untouched.
        np.testing.assert_allclose(state.params["linear"]["kernel"][...],
                                   before["linear"]["kernel"][...] * (1 - 0.5 * 0.1), rtol=1e-6)
        np.testing.assert_array_equal(state.params["linear"]["bias"][...],
                                      before["linear"]["bias"][...])

    def test_frozen_variables_are_not_trained(self):
        tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1), 10)
        graphdef, state = create_train_state(ToyModel(), tx, seed=0)
        assert "scale" not in state.params and "scale" in state.frozen
        step = jax.jit(make_train_step(toy_loss, tx, graphdef=graphdef))
        state, _ = step(state, next(ToyLoader()))
        np.testing.assert_array_equal(state.frozen["scale"][...], 1.0)


class TestClipByGlobalNorm:
    @pytest.mark.parametrize("max_norm", [0.5, 100.0])
    def test_matches_optax(self, max_norm):
        grads = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([-4.0, 0.5])}
        ours, theirs = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
        got, state = ours.update(grads, ours.init(grads))
        want, _ = theirs.update(grads, theirs.init(grads))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-6)
        assert jax.tree.structure(state) == jax.tree.structure(theirs.init(grads))

    def test_rejects_a_non_positive_norm(self):
        with pytest.raises(ValueError, match="max_grad_norm"):
            clip_by_global_norm(0.0)


class TestSchedule:
    def test_warmup_then_cosine(self):
        cfg = OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=4,
                              end_learning_rate=0.1)
        sched = make_schedule(cfg, 14)
        np.testing.assert_allclose(sched(0), 0.0)
        np.testing.assert_allclose(sched(2), 0.5)
        np.testing.assert_allclose(sched(4), 1.0)
        # cosine from 1.0 to 0.1 over 10 steps: halfway = 0.1 + 0.9 * 0.5
        np.testing.assert_allclose(sched(9), 0.55, rtol=1e-6)
        np.testing.assert_allclose(sched(14), 0.1, rtol=1e-6)

    def test_linear_and_constant(self):
        lin = make_schedule(OptimizerConfig(learning_rate=2.0, schedule="linear"), 4)
        np.testing.assert_allclose([lin(i) for i in range(5)], [2.0, 1.5, 1.0, 0.5, 0.0])
        const = make_schedule(OptimizerConfig(learning_rate=3.0, schedule="constant"), 4)
        np.testing.assert_allclose([const(i) for i in range(5)], [3.0] * 5)


class TestFit:
    def test_loss_falls_and_files_written(self, tmp_path):
        config = _config(tmp_path, num_steps=30, optimizer=OptimizerConfig(learning_rate=0.1))
        step, state, put = _setup(config)
        result = fit(config, step_fn=step, state=state, train_batches=ToyLoader(), put_batch=put)
        records = read_metrics(config.output_dir)
        assert [r["step"] for r in records] == list(range(1, 31))
        assert records[-1]["toy/loss"] < 0.2 * records[0]["toy/loss"]
        assert result.step == 30 and result.skipped_steps == 0 and not result.preempted
        out = config.output_dir
        assert os.path.exists(os.path.join(out, "config.yaml"))
        assert config_from_yaml(TrainConfig, os.path.join(out, "config.yaml")) == config
        assert any(f.startswith("events") for f in os.listdir(os.path.join(out, "tensorboard")))
        assert sorted(Checkpointer(os.path.join(out, "checkpoints")).all_steps()) == [28, 30]

    def test_resume_is_bit_exact(self, tmp_path):
        config_a = _config(tmp_path / "a")
        step, state, put = _setup(config_a)
        fit(config_a, step_fn=step, state=state, train_batches=ToyLoader(), put_batch=put)
        uninterrupted = _exact(read_metrics(config_a.output_dir))

        config_b = _config(tmp_path / "b")
        guard = PreemptionGuard(enabled=False)

        class Interrupting(ToyLoader):
            def __next__(self):
                if self.index == 5:  # preempted after 5 steps: the checkpoint at 4 + SIGTERM save
                    guard.request()
                return super().__next__()

        step, state, put = _setup(config_b)
        first = fit(config_b, step_fn=step, state=state, train_batches=Interrupting(),
                    put_batch=put, guard=guard)
        assert first.preempted and first.step == 6
        # A fresh process would rebuild everything and resume from the newest checkpoint.
        step, state, put = _setup(config_b)
        second = fit(config_b, step_fn=step, state=state, train_batches=ToyLoader(),
                     put_batch=put)
        assert second.step == 8
        assert _exact(read_metrics(config_b.output_dir)) == uninterrupted

    def test_sigterm_saves_before_exit(self, tmp_path):
        config = _config(tmp_path, checkpoint=CheckpointConfig(every_steps=0))

        class Terminating(ToyLoader):
            def __next__(self):
                if self.index == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                return super().__next__()

        step, state, put = _setup(config)
        previous = signal.getsignal(signal.SIGTERM)
        result = fit(config, step_fn=step, state=state, train_batches=Terminating(),
                     put_batch=put)
        assert signal.getsignal(signal.SIGTERM) is previous
        assert result.preempted
        ckpt = Checkpointer(os.path.join(config.output_dir, "checkpoints"))
        assert ckpt.all_steps() == [result.step]
        restored = ckpt.restore(result.state)
        assert restored.data_state["loader"] == {"index": result.step}

    def test_nan_policy_stop_raises_before_checkpoint(self, tmp_path):
        config = _config(tmp_path, nan_policy="stop",
                         checkpoint=CheckpointConfig(every_steps=2))

        class Poisoned(ToyLoader):
            def __next__(self):
                batch = super().__next__()
                if self.index == 3:
                    batch["x"][0, 0] = np.inf
                return batch

        step, state, put = _setup(config)
        with pytest.raises(NonFiniteError, match="step 3"):
            fit(config, step_fn=step, state=state, train_batches=Poisoned(), put_batch=put)
        steps = Checkpointer(os.path.join(config.output_dir, "checkpoints")).all_steps()
        assert steps == [2]

    def test_nan_policy_skip_counts(self, tmp_path):
        config = _config(tmp_path, num_steps=5)

        class Poisoned(ToyLoader):
            def __next__(self):
                batch = super().__next__()
                if self.index in (2, 4):
                    batch["y"][0, 0] = np.nan
                return batch

        step, state, put = _setup(config)
        result = fit(config, step_fn=step, state=state, train_batches=Poisoned(), put_batch=put)
        records = read_metrics(config.output_dir)
        assert result.skipped_steps == 2
        assert [r["train/skipped_steps"] for r in records] == [0, 1, 1, 2, 2]
        assert all(np.isfinite(r["toy/pred_mean"]) for r in records)

    def test_eight_devices_match_one(self, tmp_path):
        config = _config(tmp_path, num_steps=4, checkpoint=CheckpointConfig(every_steps=0))
        runs = []
        for name, shape in (("one", (1,)), ("eight", (8,)), ("mesh", (2, 4))):
            cfg = dataclasses.replace(config, output_dir=str(tmp_path / name))
            step, state, put = _setup(cfg, mesh_shape=shape)
            fit(cfg, step_fn=step, state=state, train_batches=ToyLoader(), put_batch=put)
            runs.append(read_metrics(cfg.output_dir))
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                for key in ("toy/loss", "train/grad_norm"):
                    np.testing.assert_allclose(a[key], b[key], rtol=1e-5)


class TestCheckpointer:
    def test_restore_onto_other_meshes_and_keep_last(self, tmp_path):
        tx, _ = make_optimizer(OptimizerConfig(), 10)
        model = ToyModel(din=8, dout=4)
        _, state = create_train_state(model, tx, seed=3)
        mesh8 = jax.make_mesh((8,), ("data",))
        # Shard the kernel's first axis over 8 devices.
        shard = lambda x: jax.device_put(
            x, NamedSharding(mesh8, P("data") if x.ndim == 2 and x.shape[0] == 8 else P())
        )
        state = jax.tree.map(shard, state)
        ckpt = Checkpointer(tmp_path / "ckpt", keep_last=2)
        for s in (1, 2, 3):
            ckpt.save(s, state, data_state={"index": s}, config={"seed": 3})
        assert ckpt.all_steps() == [2, 3]

        mesh24 = jax.make_mesh((2, 4), ("data", "fsdp"))
        target = jax.tree.map(
            lambda x: jax.device_put(
                np.zeros(x.shape, x.dtype),
                NamedSharding(mesh24, P(("data", "fsdp")) if x.ndim == 2 else P()),
            ),
            state,
        )
        restored = ckpt.restore(target)
        assert restored.step == 3 and restored.data_state == {"index": 3}
        assert restored.config == {"seed": 3}
        kernel = restored.state.params["linear"]["kernel"][...]
        assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4}
        single = jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype),
                                                       jax.devices()[0]), state)
        restored1 = ckpt.restore(single, step=2)
        for a, b, c in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state),
                           jax.tree.leaves(restored1.state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        with pytest.raises(FileNotFoundError, match="available steps"):
            ckpt.restore(target, step=1)


@dataclasses.dataclass(frozen=True)
class _Cfg(TrainConfig):
    """A config for parsing tests."""

    beta: float = 0.1
    """A trainer hyper-parameter."""


class TestConfig:
    def test_yaml_then_overrides(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("beta: 0.5\nseed: 3\noptimizer:\n  learning_rate: 0.01\n  schedule: linear\n")
        cfg = load_config(_Cfg, ["--config", str(path), "--seed", "7",
                                 "--optimizer.warmup-steps", "5"])
        assert cfg.beta == 0.5 and cfg.seed == 7
        assert cfg.optimizer == OptimizerConfig(learning_rate=0.01, schedule="linear",
                                                warmup_steps=5)
        save_config(cfg, tmp_path / "out.yaml")
        assert config_from_yaml(_Cfg, tmp_path / "out.yaml") == cfg

    def test_tuple_fields_roundtrip(self, tmp_path):
        cfg = _Cfg(data=dataclasses.replace(_Cfg().data, buckets=(16, 32)))
        save_config(cfg, tmp_path / "c.yaml")
        assert config_from_yaml(_Cfg, tmp_path / "c.yaml").data.buckets == (16, 32)

    @pytest.mark.parametrize(
        "text, match",
        [
            ("seed: 1\nbetta: 0.2\n", r"c\.yaml, line 2: config: unknown field\(s\) \['betta'\]"),
            ("optimizer:\n  schedule: cosinus\n",
             r"line 2: config.optimizer.schedule: 'cosinus' is not one of"),
            ("num_steps: ten\n", r"line 1: config.num_steps: expected an integer"),
            ("logging: 3\n", r"config.logging: expected a mapping"),
        ],
    )
    def test_bad_yaml_names_file_line_and_field(self, tmp_path, text, match):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            config_from_yaml(_Cfg, path)

    def test_help_lists_every_option(self, capsys):
        with pytest.raises(SystemExit):
            load_config(_Cfg, ["--help"])
        out = capsys.readouterr().out
        for option in ("--beta", "--seed", "--optimizer.learning-rate", "--model.lora-rank",
                       "--data.batch-size", "--checkpoint.every-steps", "--logging.wandb",
                       "--mesh.fsdp", "--nan-policy"):
            assert option in out, option


def test_metrics_jsonl_values_are_exact_floats(tmp_path):
    from rlhf_jax.train import MetricsLogger

    value = jnp.float32(1.0) / 3
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, progress="none")) as log:
        log.log(1, {"x/a": value})
    (record,) = read_metrics(tmp_path)
    assert np.float32(record["x/a"]) == value
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1


def test_train_state_is_a_pytree_of_arrays():
    tx, _ = make_optimizer(OptimizerConfig(), 10)
    _, state = create_train_state(ToyModel(), tx, seed=nnx.Rngs(0)())
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    assert state.rng.dtype == jnp.uint32


def test_own_train_state_copies_what_may_be_shared_and_not_fresh_moments():
    """The online trainers' train state is donated to the update: parameters (which a cloned
    model shares) and any optimizer array that aliases them get fresh buffers; the moments the
    optimizer just created are kept as they are (no second copy of each while building)."""
    def pointers(x):
        return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]

    model = ToyModel()
    twin = nnx.clone(model)  # shares its arrays with `model`
    # An optimizer whose state holds the parameters themselves, and Adam's fresh moments.
    keep_params = optax.GradientTransformation(lambda params: params,
                                               lambda u, state, params=None: (u, state))
    _, state = create_train_state(model, optax.adam(1e-3), seed=0)
    _, kept = create_train_state(twin, optax.chain(optax.adam(1e-3), keep_params), seed=0)
    kept_pointers = [p for x in jax.tree.leaves(kept) for p in pointers(x)]
    assert len(kept_pointers) > len(set(kept_pointers))  # aliased as built
    for original in (state, kept):
        owned = own_train_state(original)
        twin_params = {p for x in jax.tree.leaves(nnx.state(twin)) for p in pointers(x)}
        for x in jax.tree.leaves(owned.params):
            assert not set(pointers(x)) & twin_params
        # Every buffer of the owned state is distinct, so the whole state can be donated.
        all_pointers = [p for x in jax.tree.leaves(owned) for p in pointers(x)]
        assert len(all_pointers) == len(set(all_pointers))
        jax.tree.map(np.testing.assert_array_equal, owned, original)
    # Adam's moments were not copied.
    mu = jax.tree.leaves(state.opt_state[0].mu)[0]
    assert pointers(jax.tree.leaves(own_train_state(state).opt_state[0].mu)[0]) == pointers(mu)
