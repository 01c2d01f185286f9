"""Sharded training for any registered model family: state creation, the jitted train/eval
steps, and the training loop.

Data flow: Config -> mesh -> init_state (params born sharded) -> loop: batch(step) placed with the
batch sharding -> train_step (state donated) -> metrics -> logs; checkpoint every N steps. What is
specific to a kind of model (module, loss, metrics, batches) comes from `models.MODELS`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm import config as config_lib
from jaxllm import data, restore, sharding, validation
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.compression import pruning
from jaxllm.config import Config
from jaxllm.layers import moe
from jaxllm.models import MODELS, ModelFamily, count_params
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import ema as ema_lib
from jaxllm.training import finetune, flops, optim, workdir_lock
from jaxllm.training.logger import MetricsLogger


class TrainingError(RuntimeError):
    """Training cannot continue (for example a NaN loss); the message says what to do."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """The state of a run with train.ema_decay > 0: also the params' moving average
    (training/ema.py). A class of its own, so runs without one keep their checkpoint layout."""

    ema: Any = None


def with_ema(state: TrainState, ema) -> TrainState:
    return state if ema is None else EmaTrainState(step=state.step, params=state.params, opt_state=state.opt_state, ema=ema)


@dataclasses.dataclass
class Setup:
    """Everything derived from a Config that the steps need."""

    cfg: Config
    mesh: jax.sharding.Mesh
    family: ModelFamily
    model: nn.Module
    tx: optax.GradientTransformation
    state_shardings: Any  # pytree of NamedSharding matching TrainState
    abstract_state: Any  # pytree of ShapeDtypeStruct with shardings (for restore)
    plan: finetune.Plan  # what trains; state.params is its trainable part
    frozen_abstract: Any = None  # the frozen part (probe and lora runs), read from init_from


def _boxed_init(cfg: Config, family: ModelFamily, model: nn.Module, tx: optax.GradientTransformation,
                plan: finetune.Plan):
    def init(rng):
        params, _ = plan.split(model.init(rng, *family.init_inputs(cfg))["params"], jax.random.fold_in(rng, 1))
        return with_ema(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)),
                        ema_lib.init(params, cfg.train.ema_decay))

    return init


def setup(cfg: Config, mesh: jax.sharding.Mesh | None = None, model: nn.Module | None = None) -> Setup:
    """`model` replaces the family's own module (a trainer that adds params, e.g. distillation's
    hidden-state projection)."""
    validation.validate(cfg)
    mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
    restore.check_mesh(cfg, mesh)
    family = MODELS.get(cfg.family)
    model = model if model is not None else family.build(cfg)
    plan = finetune.plan(cfg, family)
    tx = pruning.maybe_wrap(optim.make_optimizer(cfg.opt, cfg.train.steps), cfg.prune)
    boxed = jax.eval_shape(_boxed_init(cfg, family, model, tx, plan), jax.random.key(0))
    optim.check_patterns(nn.meta.unbox(boxed.params), cfg.opt.freeze, "opt.freeze")
    shardings = sharding.state_shardings(boxed, mesh)
    abstract = ckpt.abstract_like(nn.meta.unbox(boxed), shardings)
    frozen = restore.abstract_params(cfg, mesh, model, part="frozen") if plan.freezes else None
    return Setup(cfg, mesh, family, model, tx, shardings, abstract, plan, frozen)


def place_rows(batches: data.Batches, step: int, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Batch `step` on `mesh`, each process reading only the rows its devices hold."""
    lo, hi = sharding.process_rows(mesh, batches.batch_size)
    return sharding.place_batch(batches.batch_rows(step, lo, hi), mesh, batches.batch_size)


def state_initializer(s: Setup) -> Callable[[jax.Array], TrainState]:
    """The jitted init: params and optimizer state come out already sharded (call it, or
    eval_shape it, under `sharding.activate(s.mesh)`)."""
    boxed_init = _boxed_init(s.cfg, s.family, s.model, s.tx, s.plan)
    return jax.jit(lambda rng: nn.meta.unbox(boxed_init(rng)), out_shardings=s.state_shardings)


def init_state(s: Setup, rng: jax.Array) -> TrainState:
    """Initialises the state directly into its shardings: no device ever holds all of it."""
    with sharding.activate(s.mesh):
        return state_initializer(s)(rng)


def make_train_step(s: Setup, loss_fn: Callable | None = None, frozen: Any = None) -> Callable:
    """The jitted train step `run(state, batch)`. `frozen` is an optional pytree of sharded arrays
    (a distillation teacher's params, say) that `loss_fn` receives as a third argument: they enter
    the jitted computation as arguments, not closure constants (which would be embedded in the
    program), are not donated, and get no gradient."""
    cfg = s.cfg
    accum = cfg.train.grad_accum
    if loss_fn is None and s.plan.freezes:
        # The optimizer's params are the trainable part; the frozen part comes in as `frozen`.
        model_loss = s.family.loss_fn(s.model, cfg)
        loss_fn = lambda params, batch, frozen: model_loss(  # noqa: E731
            s.plan.compose(params, jax.lax.stop_gradient(frozen), merged=False), batch)
        if frozen is None:
            raise ValueError(f"finetune.mode={s.plan.mode} trains with frozen params: pass frozen=")
    loss_fn = loss_fn or s.family.loss_fn(s.model, cfg)
    objective = loss_fn if frozen is not None else (lambda params, batch, _: loss_fn(params, batch))
    if cfg.opt.freeze:
        # Params frozen by opt.freeze take no update: stopping their gradient lets XLA drop their
        # backward pass (a frozen vision tower's, say) instead of computing it to throw it away.
        unfrozen_objective = objective

        def objective(params, batch, frozen):
            stopped = jax.tree.map(lambda p, is_frozen: jax.lax.stop_gradient(p) if is_frozen else p,
                                   params, optim.path_mask(params, cfg.opt.freeze))
            return unfrozen_objective(stopped, batch, frozen)
    grad_fn = jax.grad(objective, has_aux=True)  # with respect to the params only

    def step_fn(state: TrainState, batch, frozen):
        # Randomness in the model (MoE router jitter) is a function of (seed, step, micro-batch), so
        # a resumed run draws the same noise.
        rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        if accum == 1:
            grads, (loss_sum, weight_sum, extras) = grad_fn(state.params, {**batch, "rng": rng}, frozen)
        else:
            # Micro-batch k takes rows k, k+accum, ...: every device's shard of the batch feeds
            # every micro-batch, so no rows move between devices.
            micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
            micro["rng"] = jax.random.split(rng, accum)

            def body(carry, micro_batch):
                return jax.tree.map(jnp.add, carry, grad_fn(state.params, micro_batch, frozen)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first, frozen)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            (grads, (loss_sum, weight_sum, extras)), _ = jax.lax.scan(body, zeros, micro)
        # Gradients of token sums divided once by the global token count: identical whether the
        # batch was split into micro-batches or over devices.
        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # MoE router biases (moe.router_bias) move with the step's expert load, not a gradient.
        extras = dict(extras)
        load_LE = extras.pop("moe/expert_load", None)
        if load_LE is not None:
            params = moe.update_router_biases(state.params, params, load_LE / denom, cfg.model.moe.bias_update_rate)
        loss = loss_sum / denom
        metrics = {
            "loss": loss,
            **s.family.loss_metrics(loss, cfg),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "tokens": weight_sum,
            **{name: value / denom for name, value in extras.items()},
            **pruning.train_metrics(opt_state, params),  # empty unless pruning
        }
        ema = ema_lib.update(getattr(state, "ema", None), params, cfg.train.ema_decay)
        return with_ema(TrainState(step=state.step + 1, params=params, opt_state=opt_state), ema), metrics

    batch_sharding = sharding.batch_sharding(s.mesh)
    # Without frozen arrays the jitted step keeps its (state, batch) signature.
    extra_args = () if frozen is None else (frozen,)
    jitted = jax.jit(
        step_fn if frozen is not None else (lambda state, batch: step_fn(state, batch, None)),
        in_shardings=(s.state_shardings, batch_sharding)
        + tuple(jax.tree.map(lambda x: x.sharding, a) for a in extra_args),
        out_shardings=(s.state_shardings, sharding.replicated(s.mesh)),
        donate_argnums=(0,),
    )

    def run(state, batch):
        with sharding.activate(s.mesh):
            return jitted(state, batch, *extra_args)

    run.jitted = jitted
    return run


def make_eval_step(s: Setup, param_shardings=None, frozen=None) -> Callable:
    """The family's evaluation sums of one batch. `param_shardings` defaults to the float params';
    an int8-quantized tree (compression.quantize) has its own. In probe and lora runs `params` is
    the trainable part and `frozen` the frozen one."""
    model_eval = s.family.eval_fn(s.model, s.cfg)
    if frozen is None:
        eval_fn, extra = model_eval, ()
    else:
        eval_fn, extra = (lambda params, batch, frozen: model_eval(s.plan.compose(params, frozen, merged=False), batch)), (frozen,)
    jitted = jax.jit(
        eval_fn,
        in_shardings=(
            s.state_shardings.params if param_shardings is None else param_shardings,
            sharding.batch_sharding(s.mesh),
            *(jax.tree.map(lambda x: x.sharding, e) for e in extra),
        ),
        out_shardings=sharding.replicated(s.mesh),
    )

    def run(params, batch):
        with sharding.activate(s.mesh):
            return jitted(params, batch, *extra)

    return run


def evaluate(s: Setup, eval_step, params, batches: data.Batches, num_batches: int) -> dict:
    """The family's metrics over the first `num_batches` validation batches (same rows every
    time), from the per-batch sums added up."""
    totals: dict[str, Any] = {}
    for k in range(num_batches):
        sums = jax.device_get(eval_step(params, place_rows(batches, k, s.mesh)))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
    return {name: float(value) if np.ndim(value) == 0 else value
            for name, value in s.family.eval_metrics(totals).items()}


@functools.lru_cache(maxsize=None)
def peak_flops_total() -> float:
    """Peak FLOP/s of all devices in the run: on CPU the host's measured matmul rate (the fake
    devices share its cores), elsewhere the rated per-chip peak times the chip count."""
    if jax.default_backend() == "cpu":
        # A quick estimate (well under a second) for the logged MFU; benchmarks/train_throughput.py
        # measures the peak thoroughly.
        return flops.measure_matmul_flops(shapes=((1024, 1024, 1024),), repeats=3)
    return flops.peak_flops_per_device() * jax.device_count()


def restore_or_init(s: Setup, checkpointer: ckpt.Checkpointer | None) -> tuple[TrainState, int]:
    """The latest checkpoint if there is one (resume), else a fresh state; and its step."""
    if checkpointer is not None and checkpointer.latest_step() is not None:
        try:
            with sharding.activate(s.mesh):
                state, meta = checkpointer.restore(s.abstract_state)
        except ckpt.CheckpointReadError:
            raise  # a truncated or corrupted checkpoint: its message says how to resume
        except ValueError as e:  # orbax: tree structure or shapes differ from the saved state
            raise config_lib.ConfigError(
                f"the checkpoint in {checkpointer.directory} does not match this config's model or "
                f"optimizer ({str(e).splitlines()[0][:200]}); use a new workdir, or the config the "
                "checkpoint was written with"
            ) from e
        return state, int(meta["data_step"])
    if s.cfg.init_from and not s.plan.freezes:
        return state_from_params(s, initial_params(s)), 0
    return init_state(s, jax.random.key(s.cfg.seed)), 0


def initial_params(s: Setup, frozen_only: bool = False):
    """The params of the run `init_from` names, on this run's mesh: for a full fine-tune the
    model's params with the pre-trained part (all, or the family's backbone) filled from it; with
    `frozen_only` just that part (probe and lora runs)."""
    source = s.cfg.init_from
    _check_same_backbone(s.cfg, source)
    backbone = s.family.backbone
    if frozen_only:
        target = s.frozen_abstract
    else:
        target = s.abstract_state.params if backbone is None else s.abstract_state.params[backbone]
    try:
        params, _ = restore.restore_tree(ckpt.checkpoint_dir(source), target, s.mesh)
    except FileNotFoundError as e:
        raise config_lib.ConfigError(f"init_from={source}: {e}") from None
    except ValueError as e:
        if isinstance(e, config_lib.ConfigError):
            raise config_lib.ConfigError(f"init_from={source}: {e}") from None
        raise config_lib.ConfigError(
            f"init_from={source} holds a different model ({str(e).splitlines()[0][:200]}); give model.* "
            f"the architecture of {source}/config.json") from None
    if frozen_only or backbone is None:
        return params
    # A new head around the pre-trained backbone: the rest of the model's params initialised.
    fresh = init_state(s, jax.random.key(s.cfg.seed)).params
    return {**fresh, backbone: params}


def _check_same_backbone(cfg: Config, source: str) -> None:
    """The run `init_from` names must have this run's architecture and tokenizer (layout and
    kernel choices aside), or its params would not mean what this model expects."""
    try:
        saved = config_lib.from_dict(Config, config_lib.read_config_json(source)).model
    except FileNotFoundError as e:
        raise config_lib.ConfigError(f"init_from={source}: {e}") from None
    # The attention kind changes no params: a causal LM may start a prefix-LM or a classifier.
    layout = dict(scan_layers=cfg.model.scan_layers, remat=cfg.model.remat, dtype=cfg.model.dtype,
                  attention_impl=cfg.model.attention_impl, param_dtype=cfg.model.param_dtype,
                  attention_kind=cfg.model.attention_kind)
    theirs, ours = dataclasses.asdict(dataclasses.replace(saved, **layout)), dataclasses.asdict(cfg.model)
    diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    if "tokenizer" in diff and tokenizer_lib.fingerprint(saved.tokenizer) == tokenizer_lib.fingerprint(cfg.model.tokenizer):
        del diff["tokenizer"]  # the same tokenizer.json in two places
    if diff:
        names = ", ".join(f"model.{k} (theirs {a!r}, ours {b!r})" for k, (a, b) in sorted(diff.items()))
        raise config_lib.ConfigError(f"init_from={source} was trained with a different model: {names}; "
                                     "set these to the source run's values")


def state_from_params(s: Setup, params) -> TrainState:
    """A step-0 state around given (sharded) params, with a fresh optimizer state."""
    params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, s.abstract_state.params)
    with sharding.activate(s.mesh):
        opt_state = jax.jit(s.tx.init, out_shardings=s.state_shardings.opt_state)(params)
    return with_ema(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state),
                    ema_lib.init(params, s.cfg.train.ema_decay))


def train(
    cfg: Config,
    log: Callable[[dict], None] | None = None,
    mesh=None,
    make_step: Callable[[Setup], Callable] | None = None,
    model: nn.Module | None = None,
) -> TrainState:
    """The training loop. `log` receives every metrics dict (used by tests and main); `make_step`
    builds the train step from the Setup (default `make_train_step`; distillation passes its own,
    and with `model` its own module). Holds the workdir's lock throughout (training/workdir_lock.py)."""
    cfg = MODELS.get(cfg.family).finalize(cfg)
    with workdir_lock.hold(cfg.workdir) as lock:
        return _train_holding(cfg, lock, log, mesh, make_step, model)


def _train_holding(cfg: Config, lock: workdir_lock.HeldLock, log, mesh, make_step, model) -> TrainState:
    s = setup(cfg, mesh, model)
    os.makedirs(cfg.workdir, exist_ok=True)
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir), cfg.checkpoint)
    try:
        state, start = restore_or_init(s, checkpointer)
    except BaseException:
        checkpointer.close()  # its threads would otherwise outlive the error and print tracebacks
        raise
    if jax.process_index() == 0:
        with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(cfg))

    logger = MetricsLogger(cfg, start_step=start, extra_sink=log)
    logger.info(
        f"{count_params(state.params) / 1e6:.2f}M {'trainable ' if s.plan.freezes else ''}params on mesh "
        f"{dict(s.mesh.shape)}; "
        + (f"resuming at step {start}" if start else
           f"starting from {cfg.init_from} ({s.plan.mode})" if cfg.init_from else "starting from scratch")
    )
    train_batches = s.family.batches(cfg, "train")
    evaluates = bool(cfg.data.eval_split)  # an empty split name turns evaluation off
    eval_batches = s.family.batches(cfg, "eval") if evaluates else None
    frozen = initial_params(s, frozen_only=True) if s.plan.freezes else None
    train_step = make_step(s) if make_step is not None else make_train_step(s, frozen=frozen)
    eval_step = make_eval_step(s, frozen=frozen)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    model_flops_per_step = flops.flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step
    peak = peak_flops_total()
    schedule = optim.learning_rate_schedule(cfg.opt, cfg.train.steps)

    def place(step):
        return place_rows(train_batches, step, s.mesh)

    try:
        window_start, window_steps = time.perf_counter(), 0
        batch = place(start) if start < cfg.train.steps else None
        for step in range(start, cfg.train.steps):
            state, metrics = train_step(state, batch)
            # Prepare the next batch while the device works on this step.
            batch = place(step + 1) if step + 1 < cfg.train.steps else None
            window_steps += 1
            done = step + 1
            is_log = done % cfg.train.log_every == 0 or done == cfg.train.steps or done == start + 1
            is_save = cfg.checkpoint.every > 0 and (
                done % cfg.checkpoint.every == 0 or done == cfg.train.steps
            )
            is_eval = evaluates and (done % cfg.train.eval_every == 0 or done == cfg.train.steps)
            if is_log or is_save or is_eval:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / window_steps
                # The loss was computed with the parameters before this step's update; the
                # norms check the update itself, so a non-finite state is never saved.
                if not np.isfinite(metrics["loss"]):
                    problem = f"loss is {metrics['loss']} at step {done}"
                elif not (np.isfinite(metrics["grad_norm"]) and np.isfinite(metrics["param_norm"])):
                    problem = (f"the update at step {done} made the parameters non-finite "
                               f"(grad_norm {metrics['grad_norm']}, param_norm {metrics['param_norm']})")
                else:
                    problem = None
                if problem:
                    raise TrainingError(
                        f"{problem}; stopping. The last good checkpoint is step "
                        f"{checkpointer.latest_step()} in {checkpointer.directory}. Lower "
                        "opt.learning_rate or raise opt.warmup_steps, then rerun to resume."
                    )
                record = {
                    "step": done,
                    "loss": float(metrics["loss"]),
                    "learning_rate": float(schedule(step)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "param_norm": float(metrics["param_norm"]),
                    "step_time_s": step_time,
                    "tokens_per_s": tokens_per_step / step_time,
                    "mfu": model_flops_per_step / step_time / peak,
                }
                # Metrics a loss function or optimizer adds (MoE balance, distillation, sparsity).
                for name, value in metrics.items():
                    record.setdefault(name, float(value) if np.ndim(value) == 0 else np.asarray(value).tolist())
                if is_eval:
                    record.update(evaluate(s, eval_step, ema_lib.eval_params(state), eval_batches, cfg.train.eval_batches))
                lock.check()  # a run that lost its lock (it stalled past the timeout) writes nothing more
                logger.write(record)
                if is_save:
                    checkpointer.save(done, state, {"data_step": done, "config": config_lib.to_dict(cfg)})
                window_start, window_steps = time.perf_counter(), 0
            logger.progress(done)
    finally:
        checkpointer.close()
        logger.close()
    return state

