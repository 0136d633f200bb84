"""What the online trainers (PPO, GRPO/RLOO, rejection sampling) share: the `OnlineTrainer` base
with its one set-up sequence, the frozen `Reference` policy, the mesh and train-state plumbing,
the ``<algo>/kl_ref`` metric, and the command-line path (`train_online`).

One iteration of every online trainer follows the data's path:

    prompts (PromptLoader / build_data)  ->  sample   (OnlineTrainer.rollout: rollout.py)
      ->  reward  (OnlineTrainer.scores: rlhf_jax.generation reward source, missing-EOS penalty)
      ->  advantages and loss (the algorithm's jitted score / update functions, built from
          rlhf_jax.losses)  ->  update (rlhf_jax.train.state.make_train_step, in a lax.scan)

`OnlineTrainer.setup` is the one set-up sequence: check the shared config fields, resolve the
mesh, check that an update's rows split over it, build the reference, build the optimizer, place
the policy's train state on the mesh, and commit the whole initial state to the mesh (so the
first jitted call sees the shardings of every later one). A trainer adds only what is its own:
PPO's value model (`trained_policy` and `initial_state` hooks), GRPO's groups, rejection
sampling's SFT rounds.

The KL to the reference reported by every online trainer (``"<algo>/kl_ref"``) is
`sequence_kl_to_reference`: the k1 estimate ``sum_t (log pi(y_t) - log pi_ref(y_t))`` over the
response tokens, averaged over rows, so the curves of PPO, GRPO, RLOO and rejection sampling
compare directly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import losses, sharding
from rlhf_jax.data.synthetic import get_task
from rlhf_jax.generation import RewardSource, place_reward_source, score_samples
from rlhf_jax.models import has_lora, lora_disabled
from rlhf_jax.train.builders import (
    build_model,
    check_vocab,
    count_trainable,
    freeze_filter,
    load_tokenizer_for,
    report_trainable,
    shard_train_state,
    trainable_filter,
)
from rlhf_jax.train.config import DataSpec
from rlhf_jax.train.data import build_data
from rlhf_jax.train.logprobs import policy_response_logps
from rlhf_jax.train.loop import fit
from rlhf_jax.train.online_eval import evaluate_held_out
from rlhf_jax.train.optimizer import cached_optimizer
from rlhf_jax.train.preflight import check_run_config
from rlhf_jax.train.rewards import RewardContext, build_reward_source, gold_reward_metric
from rlhf_jax.train.rollout import Rollout, sample_rollout
from rlhf_jax.train.run import run_summary
from rlhf_jax.train.state import TrainState, create_train_state
from rlhf_jax.train.value import unwrap_policy

ONLINE_DATA = DataSpec(synthetic="topic", batch_size=8, max_length=16, max_prompt_length=16)
"""Default prompts of the online trainers: the synthetic topic task, 8 prompts per iteration,
left-padded to 16 tokens."""

MetricFn = Callable[[Any, Mapping[str, np.ndarray]], Mapping[str, float]]
"""``fn(experience, prompts) -> {name: value}``: extra per-iteration metrics computed on the
rollout (e.g. the gold reward of the sampled responses, for over-optimisation curves). The
experience has at least ``rollout`` and ``scores``."""


def sequence_kl_to_reference(
    logps: jax.Array, ref_logps: jax.Array, response_mask: jax.Array
) -> jax.Array:
    """``[B]`` sequence KL to the reference: ``sum_t m_t (log pi(y_t) - log pi_ref(y_t))`` (k1).

    The shared ``"<algo>/kl_ref"`` metric of every online trainer is the mean of this over rows.
    """
    return losses.masked_sum(losses.kl_k1(logps, ref_logps), response_mask, axis=-1)


@functools.lru_cache(maxsize=16)
def jit_mean_kl_to_reference(policy_graphdef: Any, reference: Reference, temperature: float):
    """Jitted ``fn(policy_state, ref_state, rollout) -> scalar``: the ``"<algo>/kl_ref"`` metric,
    the mean over rows of `sequence_kl_to_reference` for a rollout sampled at ``temperature``
    (one compile per policy graph, reference and temperature)."""

    def kl(policy_state: TrainState, ref_state: Any, rollout: Rollout) -> jax.Array:
        mask = rollout.response_mask.astype(jnp.float32)
        policy = nnx.merge(policy_graphdef, policy_state.params, policy_state.frozen)
        logps, _ = policy_response_logps(policy, rollout, temperature=temperature)
        ref_model = reference.model(policy_graphdef, policy_state, ref_state)
        ref_logps, _ = policy_response_logps(ref_model, rollout, temperature=temperature)
        return jnp.mean(sequence_kl_to_reference(logps, ref_logps, mask))

    return jax.jit(losses.unchecked(kl))


# ---------------------------------------------------------------------------------------------
# Mesh and train-state plumbing
# ---------------------------------------------------------------------------------------------


def resolve_mesh(mesh_config: Any, mesh: Any = None) -> Any:
    """``mesh`` if given, else the ``("data", "fsdp", "tensor")`` mesh of ``mesh_config``."""
    if mesh is not None:
        return mesh
    return sharding.make_mesh(
        sharding.MeshConfig(data=mesh_config.data, fsdp=mesh_config.fsdp, tensor=mesh_config.tensor)
    )


def check_rows_divide_mesh(rows: int, mesh: Any, *, what: str) -> None:
    """Raises unless ``rows`` splits evenly over the mesh's ``("data", "fsdp")`` batch shards."""
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))
    if rows % shards:
        raise ValueError(
            f"{what} has {rows} rows, not divisible by the {shards} batch shards of the mesh "
            "(data x fsdp); change the batch size or the mesh"
        )


def rollout_batch_sharding(mesh: Any) -> Any:
    """Sharding of ``[B, ...]`` rollout arrays: leading axis over ``("data", "fsdp")``."""
    return sharding.batch_sharding(mesh)


def uses_lora(model: nnx.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return has_lora(model)


def own_buffers(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` copied into a fresh buffer (same sharding)."""
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def _buffer_pointers(x: jax.Array) -> list[int]:
    return [shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards]


def own_train_state(state: TrainState) -> TrainState:
    """``state`` in buffers of its own, so that it can be donated to the update: fresh copies
    of the parameters, frozen variables, step and key (a model built with ``nnx.clone`` shares
    its arrays with its source), and of the optimizer state only the arrays that hold one of
    those buffers or one seen before in it (an optimizer that keeps the parameters themselves,
    such as lookahead's slow weights). The moments the optimizer has just created are the
    state's own already: copying them would hold a second copy of each while building."""
    seen: set[int] = set()
    for leaf in jax.tree.leaves(state._replace(opt_state=None)):
        if isinstance(leaf, jax.Array):
            seen.update(_buffer_pointers(leaf))

    def copy_if_shared(x):
        if not isinstance(x, jax.Array):
            return x
        pointers = _buffer_pointers(x)
        shared = any(p in seen for p in pointers)
        seen.update(pointers)
        return x.copy() if shared else x

    owned = own_buffers(state._replace(opt_state=None))
    return owned._replace(opt_state=jax.tree.map(copy_if_shared, state.opt_state))


def create_sharded_state(
    model: nnx.Module, tx: Any, *, seed: int, mesh: Any, spec: Any = None
) -> tuple[nnx.GraphDef, Any]:
    """Splits ``model`` into a `rlhf_jax.train.state.TrainState` placed on ``mesh`` (parameters
    and optimizer moments by their logical axis names). The trainable variables are
    `rlhf_jax.train.builders.trainable_filter`'s: every parameter, or with LoRA the adapters (and
    a fresh value head), without the embeddings when the `ModelSpec` ``spec`` freezes them
    (`rlhf_jax.train.builders.freeze_filter`; its bottom layers are frozen by ``tx``)."""
    trainable = trainable_filter(model)
    if spec is not None:
        trainable = freeze_filter(trainable, spec)
    graphdef, state = create_train_state(model, tx, seed=seed, trainable=trainable)
    if spec is not None:
        report_trainable(count_trainable(state, freeze_layers=spec.freeze_layers),
                         what="the policy")
    # Own buffers: models built with nnx.clone share arrays with their source, and the state
    # is donated to the update.
    state, _ = shard_train_state(own_train_state(state), mesh)
    return graphdef, state


def commit_to_mesh(tree: Any, mesh: Any) -> Any:
    """Replicates over ``mesh`` every array of ``tree`` not yet placed with a mesh sharding (e.g.
    freshly created scalars), so that a jitted function sees the same input shardings on its
    first call as on later calls (no recompilation)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and not isinstance(x.sharding, NamedSharding):
            return jax.device_put(x, replicated)
        return x

    return jax.tree.map(place, tree)


def merged_state(train_state: Any) -> nnx.State:
    """One ``nnx.State`` of a train state's trainable and frozen variables (for generation)."""
    return nnx.merge_state(train_state.params, train_state.frozen)


def seed_key_data(seed: int) -> jax.Array:
    """uint32 raw key data of ``jax.random.key(seed)`` (what train states store)."""
    return jax.random.key_data(jax.random.key(seed))


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


class Reference:
    """The frozen reference policy of an online trainer.

    Either a separate frozen network (``graphdef``, ``state``; the state is passed to the jitted
    scoring function as an argument) or, for a LoRA policy, the policy itself with every adapter
    zeroed (``lora=True``): ``y = W x + s (x A) B`` with ``A = B = 0`` is the base model, so no
    second copy of the weights exists.
    """

    def __init__(self, *, graphdef: Any = None, state: Any = None, lora: bool = False,
                 policy_graphdef: Any = None):
        self.graphdef = graphdef
        self.state = state
        self.lora = lora
        self.policy_graphdef = policy_graphdef

    @classmethod
    def build(
        cls, policy: nnx.Module, reference: nnx.Module | None, *, lora: bool, mesh: Any
    ) -> Reference:
        """The reference for ``policy``: adapters off for LoRA, else ``reference`` (default: a
        copy of the policy taken now), placed on ``mesh``."""
        if lora:
            return cls(lora=True)
        ref = nnx.clone(policy) if reference is None else reference
        sharding.shard_model(ref, mesh)
        graphdef, state = nnx.split(ref)
        return cls(graphdef=graphdef, state=own_buffers(state))

    def _key(self) -> tuple:
        return (self.lora, self.graphdef)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and self._key() == other._key()

    def __hash__(self) -> int:
        # Jitted scoring functions are cached per (graphs, hyper-parameters, reference graph).
        return hash(self._key())

    def model(self, policy_graphdef: Any, policy_state: Any, ref_state: Any) -> Any:
        """The reference as a module, inside a traced function."""
        if self.lora:
            return nnx.merge(
                policy_graphdef, lora_disabled(policy_state.params), policy_state.frozen
            )
        return nnx.merge(self.graphdef, ref_state)


# ---------------------------------------------------------------------------------------------
# The trainer base
# ---------------------------------------------------------------------------------------------


class HeldOut(NamedTuple):
    """Held-out prompts of an online run's evaluation (`OnlineTrainer.set_held_out`).

    Attributes:
      prompt_batches: ``prompt_batches()`` -> a fresh iterator over the held-out prompt batches
        (`rlhf_jax.train.data.DataBundle.eval_batches`).
      gold_task: a synthetic task whose gold reward is reported (None: none).
      decode: token ids -> text for the table of sample responses (None: the ids).
    """

    prompt_batches: Callable[[], Any]
    gold_task: Any = None
    decode: Callable[[list[int]], str] | None = None


def check_online_config(config: Any) -> None:
    """Validates the fields every online trainer's config shares; errors name the field."""
    rollout = config.rollout
    if not isinstance(rollout.max_new_tokens, int) or rollout.max_new_tokens < 1:
        raise ValueError(f"rollout.max_new_tokens must be an int >= 1, got {rollout.max_new_tokens}")
    if not rollout.temperature > 0:
        raise ValueError(f"rollout.temperature must be > 0, got {rollout.temperature}")
    if config.data.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {config.data.batch_size}")
    if config.num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {config.num_steps}")


class OnlineTrainer:
    """The base of the online trainers (PPO, GRPO/RLOO, rejection sampling): one set-up
    sequence (`setup`), sampling (`rollout`) and scoring (`scores`) of a prompt batch, one
    iteration on host prompts (`iteration`), the run through `rlhf_jax.train.loop.fit`
    (`train`), and the current policy (`policy_model`).

    A subclass validates its own config fields, calls `setup` from its constructor, and defines
    `initial_state` (its state pytree around the policy's `TrainState`) and ``step(state,
    prompts) -> (state, metrics)``, the `fit` step function. Its state has ``policy`` (the
    policy's `TrainState`) and ``rng`` fields.

    Attributes (set by `setup`): ``config``, ``reward``, ``prompts``, ``eos_token_id``,
    ``pad_token_id``, ``metric_fns``, ``samples_per_prompt``, ``mesh``, ``batch_sharding``,
    ``reference`` (`Reference`), ``tx`` and ``schedule`` (the policy optimizer),
    ``policy_graphdef`` and ``state``.
    """

    algorithm: str = "online"
    """Metric namespace of the trainer (``ppo``, ``grpo``, ``rloo``, ``rs``)."""

    config: Any
    state: Any
    prompts: Any
    policy_graphdef: Any
    held_out: HeldOut | None = None
    """Held-out prompts evaluated every ``config.eval_every`` iterations (`set_held_out`)."""

    def setup(
        self,
        config: Any,
        *,
        policy: nnx.Module,
        reward: RewardSource,
        prompts: Iterator[Mapping[str, np.ndarray]],
        eos_token_id: int,
        pad_token_id: int,
        reference: nnx.Module | None,
        mesh: Any,
        metric_fns: Sequence[MetricFn],
        samples_per_prompt: int,
        update_rows: int,
        update_rows_name: str,
        num_updates: int,
    ) -> None:
        """The set-up every online trainer runs, in this order:

        1. `check_online_config` (the fields every online config shares);
        2. the mesh (`resolve_mesh`: ``mesh``, else ``config.mesh``) and the rollout sharding;
           the reward source's reward models placed on the mesh once (`place_reward_source`);
        3. `check_rows_divide_mesh` on the rows of one optimizer step (``update_rows``, named
           ``update_rows_name`` in the error);
        4. `Reference.build` (adapters off for a LoRA policy, else ``reference`` or a copy of
           the policy taken now);
        5. `trained_policy` (a subclass's hook: PPO's shared value head);
        6. the optimizer over ``num_updates`` steps (`cached_optimizer`; the bottom
           ``model.freeze_layers`` layers frozen);
        7. the policy's sharded `TrainState` (`create_sharded_state`; the embeddings frozen
           with ``model.freeze_embeddings``), and its trainable fraction printed;
        8. `initial_state` committed to the mesh (`commit_to_mesh`).

        The models passed in are placed on the mesh in place and must not be used afterwards.
        """
        check_online_config(config)
        self.config = config
        self.reward = reward
        self.prompts = prompts
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.metric_fns = tuple(metric_fns)
        self.samples_per_prompt = int(samples_per_prompt)
        self.mesh = resolve_mesh(config.mesh, mesh)
        self.batch_sharding = rollout_batch_sharding(self.mesh)
        place_reward_source(self.reward, self.mesh)
        check_rows_divide_mesh(update_rows, self.mesh, what=update_rows_name)
        self.reference = Reference.build(policy, reference, lora=uses_lora(policy),
                                         mesh=self.mesh)
        policy = self.trained_policy(policy)
        self.tx, self.schedule = cached_optimizer(config.optimizer, max(num_updates, 1),
                                                  freeze_layers=config.model.freeze_layers)
        self.policy_graphdef, policy_state = create_sharded_state(
            policy, self.tx, seed=config.seed, mesh=self.mesh, spec=config.model
        )
        self.state = commit_to_mesh(self.initial_state(policy_state), self.mesh)

    def trained_policy(self, policy: nnx.Module) -> nnx.Module:
        """The module whose parameters the policy optimizer trains (default: ``policy``)."""
        return policy

    def initial_state(self, policy_state: TrainState) -> Any:
        """The trainer's initial state around the policy's sharded `TrainState`."""
        raise NotImplementedError

    def step(self, state: Any, prompts: Mapping[str, np.ndarray]) -> tuple[Any, dict]:
        """One iteration from ``state`` on a host prompt batch (the `fit` step function)."""
        raise NotImplementedError

    def rollout(self, state: Any, prompts: Mapping[str, np.ndarray], rng: jax.Array) -> Rollout:
        """``samples_per_prompt`` responses per prompt from the current policy (one jitted
        generation; `rlhf_jax.train.rollout.sample_rollout` with ``config.rollout``)."""
        return sample_rollout(
            self.policy_graphdef,
            merged_state(state.policy),
            prompts["prompt_ids"],
            prompts["prompt_mask"],
            rng=rng,
            config=self.config.rollout,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            num_samples=self.samples_per_prompt,
            mesh=self.mesh,
        )

    def scores(self, rollout: Rollout, prompts: Mapping[str, np.ndarray]) -> jax.Array:
        """``[B]`` reward-source scores of a rollout, after ``rollout.missing_eos_penalty``
        (`rlhf_jax.generation.score_samples`), as a global array with the rollout's sharding
        (`batch_sharding`).

        On several processes every process scores the whole rollout (a host source gathers it:
        `rlhf_jax.sharding.gather_to_host`; a reward model scores the global arrays on the mesh
        and gathers its ``[B]`` scores) and so holds the scores of a single process; each
        places its own devices' rows of them (`rlhf_jax.sharding.global_from_host`)."""
        scores = score_samples(
            self.reward,
            rollout,
            prompts,
            num_samples=self.samples_per_prompt,
            missing_eos_penalty=self.config.rollout.missing_eos_penalty,
        )
        return sharding.global_from_host(scores, self.batch_sharding)

    def extra_metrics(self, experience: Any, prompts: Mapping[str, np.ndarray]
                      ) -> dict[str, float]:
        """The ``metric_fns``' values on this iteration's experience, as host floats."""
        extra: dict[str, float] = {}
        for fn in self.metric_fns:
            extra.update({k: float(v) for k, v in fn(experience, prompts).items()})
        return extra

    def iteration(self, prompts: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """One iteration on the next prompt batch (or ``prompts``); returns host metrics."""
        if prompts is None:
            prompts = next(self.prompts)
        self.state, metrics = self.step(self.state, prompts)
        return to_host(metrics)

    def set_held_out(self, held_out: HeldOut) -> None:
        """Evaluates the policy on ``held_out`` every ``config.eval_every`` iterations and at the
        end of `train` (`evaluate`)."""
        self.held_out = held_out

    def evaluate(self, state: Any = None) -> dict[str, Any]:
        """The held-out metrics of ``state`` (default: the current state), ``<algo>/eval/...``:
        proxy and gold reward, exact and k1 / k3 KL to the reference, response length, EOS rate
        and a table of sample responses (`rlhf_jax.train.online_eval.evaluate_held_out`, at most
        ``config.eval_batches`` batches)."""
        if self.held_out is None:
            raise ValueError("no held-out prompts: call set_held_out first")
        state = self.state if state is None else state
        return evaluate_held_out(
            policy_graphdef=self.policy_graphdef,
            policy_state=state.policy,
            reference=self.reference,
            ref_state=self.reference.state,
            reward=self.reward,
            prompt_batches=self.held_out.prompt_batches(),
            rollout_config=self.config.rollout,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            namespace=self.algorithm,
            seed=self.config.seed,
            max_batches=self.config.eval_batches,
            gold_task=self.held_out.gold_task,
            decode=self.held_out.decode,
            mesh=self.mesh,
        )

    def train(self, *, guard: Any = None) -> Any:
        """Runs ``config.num_steps`` iterations through `rlhf_jax.train.loop.fit` (config.yaml,
        metrics.jsonl / TensorBoard, checkpoints, exact resume, SIGTERM). Returns its
        `LoopResult`. ``guard``: a `rlhf_jax.train.loop.PreemptionGuard` (default: SIGTERM).
        With held-out prompts (`set_held_out`) and ``config.eval_every > 0``, `evaluate` runs
        every ``eval_every`` iterations and at the end."""
        eval_fn = None
        if self.held_out is not None and self.config.eval_every > 0:
            eval_fn = self.evaluate
        result = fit(self.config, step_fn=self.step, state=self.state, train_batches=self.prompts,
                     eval_fn=eval_fn, guard=guard)
        self.state = result.state
        return result

    def policy_model(self) -> nnx.Module:
        """The current policy as an NNX ``CausalLM`` (for evaluation or export)."""
        model = nnx.merge(self.policy_graphdef, self.state.policy.params, self.state.policy.frozen)
        return unwrap_policy(model)


# ---------------------------------------------------------------------------------------------
# Building a run from its config (the CLI path)
# ---------------------------------------------------------------------------------------------


class OnlineSetup(NamedTuple):
    """What `setup_from_config` builds for a command-line online run."""

    policy: nnx.Module
    reward: RewardSource
    prompts: Any
    eos_token_id: int
    pad_token_id: int
    metric_fns: tuple[MetricFn, ...]
    tokenizer: Any
    config: Any
    """The run's config with the model resolved (e.g. the vocabulary size taken from the
    tokenizer), as the trainer must write it so the checkpoint can be read back."""
    data: Any = None
    """The prompts' `rlhf_jax.train.data.DataBundle` (its load report goes into the run
    summary)."""
    task: Any = None
    """The synthetic task of the prompts (its gold reward), or None."""


def setup_from_config(config: Any, *, algorithm: str) -> OnlineSetup:
    """Policy, reward source, prompt loader and gold-reward metric of a command-line run.

    Prompts come from ``config.data`` (`rlhf_jax.train.data.build_data` with the ``"prompt"``
    format: a synthetic task or prompt files), left-padded to ``data.max_length``. A randomly
    initialised policy without ``model.vocab_size`` gets the tokenizer's vocabulary size. The
    reward source is `rlhf_jax.train.rewards.build_reward_source` of ``config.reward``. With a
    synthetic task its gold reward of the sampled responses is logged every iteration as
    ``"<algorithm>/gold_reward"`` (beside the proxy score when the reward is a reward model).
    """
    check_run_config(config)
    tokenizer = load_tokenizer_for(config.data, config.model)
    # Every process reads the whole prompt batch (not a share of it): on several processes each
    # one samples, scores and evaluates the batch of a one-process run (`OnlineTrainer.scores`).
    data = build_data(config.data, format="prompt", tokenizer=tokenizer, seed=config.seed,
                      per_process=False)
    spec = config.model
    if spec.path is None and spec.vocab_size is None:
        # A randomly initialised policy gets exactly the tokenizer's vocabulary, so it never
        # samples ids a reward function cannot read.
        spec = dataclasses.replace(spec, vocab_size=len(tokenizer))
    policy = build_model(spec, seed=config.seed)
    check_vocab(policy, tokenizer)
    mesh = resolve_mesh(config.mesh)
    task = None
    metric_fns: tuple = ()
    if config.data.path is None and config.data.synthetic is not None:
        task = get_task(config.data.synthetic)
        metric_fns = (gold_reward_metric(task, f"{algorithm}/gold_reward"),)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; online trainers need one to stop")
    return OnlineSetup(
        policy=policy,
        reward=build_reward_source(config.reward,
                                   RewardContext(task=task, tokenizer=tokenizer, mesh=mesh)),
        prompts=data.train,
        eos_token_id=int(eos),
        pad_token_id=int(data.pad_id),
        metric_fns=metric_fns,
        tokenizer=tokenizer,
        config=dataclasses.replace(config, model=spec),
        data=data,
        task=task,
    )


def train_online(trainer_cls: type, config: Any, *, algorithm: str) -> dict[str, Any]:
    """A command-line online run: `setup_from_config`, then ``trainer_cls(...).train()``;
    returns the run summary (output directory, iterations run, final metrics). With
    ``eval_every > 0`` the policy is evaluated on the held-out prompts of ``config.data``
    (`OnlineTrainer.evaluate`); a run without held-out prompts then stops with an error.

    On several processes (a multi-host slice) every process reads the whole prompt batch,
    gathers each rollout and scores it, so the run computes the numbers of one process (see
    `OnlineTrainer.scores`); process 0 writes the run files."""
    setup = setup_from_config(config, algorithm=algorithm)
    held_out = setup.data.eval_batches if setup.data is not None else None
    if config.eval_every > 0 and held_out is None:
        raise ValueError(f"eval_every={config.eval_every} needs held-out prompts: set "
                         "data.eval_path (or data.eval_split), or data.num_eval > 0 with "
                         "data.synthetic")
    if config.eval_every > 0:
        check_rows_divide_mesh(config.data.eval_batch_size or config.data.batch_size,
                               resolve_mesh(config.mesh),
                               what="a held-out prompt batch (data.eval_batch_size)")
    trainer = trainer_cls(
        setup.config,
        policy=setup.policy,
        reward=setup.reward,
        prompts=setup.prompts,
        eos_token_id=setup.eos_token_id,
        pad_token_id=setup.pad_token_id,
        metric_fns=setup.metric_fns,
    )
    if config.eval_every > 0:
        trainer.set_held_out(HeldOut(prompt_batches=held_out, gold_task=setup.task,
                                     decode=setup.tokenizer.decode))
    return run_summary(trainer.train(), setup.config, setup.data)


__all__ = [
    "ONLINE_DATA",
    "HeldOut",
    "MetricFn",
    "OnlineSetup",
    "OnlineTrainer",
    "Reference",
    "check_online_config",
    "check_rows_divide_mesh",
    "commit_to_mesh",
    "create_sharded_state",
    "merged_state",
    "own_buffers",
    "own_train_state",
    "resolve_mesh",
    "rollout_batch_sharding",
    "seed_key_data",
    "jit_mean_kl_to_reference",
    "sequence_kl_to_reference",
    "setup_from_config",
    "to_host",
    "train_online",
    "uses_lora",
]
