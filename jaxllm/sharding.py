"""Device mesh, logical-to-mesh axis rules, and shardings for states and batches.

The model names axes logically ("embed", "mlp", "batch", ...). `LOGICAL_RULES` decides which mesh
axis each logical name is split over; adding a parallelism style is a change of these rules.

- fsdp   shards parameters and optimizer state along their "embed" dimension (ZeRO-3 style) and
         splits the batch;
- tensor shards heads, the MLP hidden dimension and the vocabulary (Megatron style);
- expert shards the expert dimension of MoE weights and splits the batch everywhere else;
- data   splits the batch only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxllm.config import Config, ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical names of activations (parameter names are "vocab", "embed", "heads", "kv_heads",
# "head_dim", "mlp", "norm", "layers", "expert"). Kept distinct so a rule can shard a weight without
# sharding the activation dimension of the same size, and vice versa.
BATCH, LENGTH, ACT_EMBED = "batch", "act_length", "act_embed"
ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = "act_heads", "act_kv_heads", "act_mlp", "act_vocab"
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("expert", "expert"),
)


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    sizes = [getattr(mesh_cfg, axis) for axis in MESH_AXES]
    described = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {described}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1, got {described}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"{described} cannot fill {num_devices} devices: the fixed axes multiply to "
                f"{known}, which does not divide {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"{described} uses {known} devices but {num_devices} are available; make the "
            f"product equal {num_devices} or set one axis to -1"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    """The mesh over `devices` (default: every device of the job). `devices` may be those of a
    TPU topology that this host only compiles for (jaxllm.plan)."""
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if mesh_cfg.num_slices == 1:
        return jax.make_mesh(mesh_shape(mesh_cfg, len(devices)), MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_device_grid(mesh_cfg, devices), MESH_AXES, axis_types=axis_types)


def hybrid_device_grid(mesh_cfg: MeshConfig, devices) -> np.ndarray:
    """Devices arranged for a multi-slice mesh: each slice holds one contiguous block of every
    axis, so only the dcn_* factor of an axis crosses slices. Slices are the devices' slice_index
    (TPU), or else equal runs of the device list (fake CPU devices, in tests)."""
    num_slices = mesh_cfg.num_slices
    dcn = tuple(getattr(mesh_cfg, f"dcn_{a}", 1) for a in MESH_AXES)
    if any(d < 1 for d in dcn):
        raise ConfigError(f"mesh.dcn_data and mesh.dcn_fsdp must be positive, got {mesh_cfg.dcn_data}, {mesh_cfg.dcn_fsdp}")
    if hasattr(devices[0], "slice_index"):
        slices = sorted({d.slice_index for d in devices})
        if len(slices) != num_slices:
            raise ConfigError(
                f"mesh.dcn_data * mesh.dcn_fsdp = {num_slices} slices, but the devices form {len(slices)}; "
                f"set them to multiply to {len(slices)}")
        per_slice = [[d for d in devices if d.slice_index == k] for k in slices]
    else:
        if len(devices) % num_slices:
            raise ConfigError(f"{len(devices)} devices cannot form {num_slices} equal slices "
                              "(mesh.dcn_data * mesh.dcn_fsdp); change those sizes")
        n = len(devices) // num_slices
        per_slice = [devices[k * n:(k + 1) * n] for k in range(num_slices)]
    ici = mesh_shape(mesh_cfg, len(per_slice[0]))
    if hasattr(devices[0], "slice_index"):
        # The torus-aware order inside each slice that jax.make_mesh would choose.
        grids = [mesh_utils.create_device_mesh(ici, s, allow_split_physical_axes=True) for s in per_slice]
    else:
        grids = [np.asarray(s, dtype=object).reshape(ici) for s in per_slice]
    # [dcn..., ici...] -> interleave each axis's (dcn, ici) factors -> [dcn*ici...]
    stacked = np.stack(grids).reshape(dcn + ici)
    order = [i for axis in range(len(MESH_AXES)) for i in (axis, axis + len(MESH_AXES))]
    return stacked.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])


def params_mesh_config(model_cfg, tensor: int = 1, num_devices: int | None = None) -> MeshConfig:
    """A mesh for loading a trained model's params onto the local devices (sampling, evaluation,
    pruning, quantization): fsdp over the largest number of devices that divides d_model, the
    rest as data, so any run that trained can be loaded whatever the device count."""
    n = num_devices or jax.local_device_count()
    if n % tensor:
        return MeshConfig(data=1, fsdp=-1, tensor=tensor, expert=1)  # make_mesh names the problem
    fsdp = max(f for f in range(1, n // tensor + 1) if (n // tensor) % f == 0 and model_cfg.d_model % f == 0)
    return MeshConfig(data=n // tensor // fsdp, fsdp=fsdp, tensor=tensor, expert=1)


def axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def check_divisibility(cfg: Config, mesh: Mesh, vision: bool = False) -> None:
    """Every dimension that a rule shards must divide by that mesh axis; say which one does not.
    `vision`: the model has the vision tower of config `vision` too (restore.check_mesh knows)."""
    m, t = cfg.model, cfg.train
    tensor, fsdp, expert = mesh.shape["tensor"], mesh.shape["fsdp"], mesh.shape["expert"]
    checks = [
        ("model.num_heads", m.num_heads, "tensor", tensor),
        ("model.num_kv_heads (or num_heads)", m.kv_heads, "tensor", tensor),
        ("model.mlp_dim", m.mlp_dim, "tensor", tensor),
        ("model.vocab_size", m.vocab_size, "tensor", tensor),
        ("model.d_model", m.d_model, "fsdp", fsdp),
    ]
    moe = getattr(m, "moe", None)
    if moe is not None and getattr(moe, "num_experts", 0):
        expert_dim = moe.expert_dim or m.mlp_dim
        checks.append(("model.moe.num_experts", moe.num_experts, "expert", expert))
        checks.append(("model.moe.expert_dim (or mlp_dim)", expert_dim, "tensor", tensor))
        if moe.num_shared:
            checks.append(("model.moe.num_shared * shared_dim", moe.num_shared * (moe.shared_dim or expert_dim),
                           "tensor", tensor))
    if vision:
        checks += [("vision.num_heads", cfg.vision.num_heads, "tensor", tensor),
                   ("vision.mlp_dim", cfg.vision.mlp_dim, "tensor", tensor),
                   ("vision.d_model", cfg.vision.d_model, "fsdp", fsdp)]
    batch_shards = axis_size(mesh, BATCH_AXES)
    micro_batch = t.batch_size // t.grad_accum
    checks.append(("train.batch_size / train.grad_accum", micro_batch, "data*fsdp*expert", batch_shards))
    for name, value, axis, size in checks:
        if value % size:
            raise ConfigError(
                f"{name}={value} is not divisible by the {axis} mesh axis ({size}); change "
                f"{name} or the mesh"
            )
    check_attention_backend(m, mesh)


def check_attention_backend(model_cfg, mesh: Mesh) -> None:
    """cuDNN attention runs only on NVIDIA GPUs, splash only on TPUs; say so before anything
    compiles."""
    platform = mesh_platform(mesh)
    needs = {"cudnn": ("gpu", "NVIDIA GPUs"), "splash": ("tpu", "TPUs")}.get(model_cfg.attention_impl)
    if needs and platform != needs[0]:
        raise ConfigError(
            f"model.attention_impl={model_cfg.attention_impl} needs {needs[1]}, but the mesh's devices are "
            f"{platform}; set model.attention_impl=auto or xla"
        )


def logical_to_sharding(logical_specs, mesh: Mesh):
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`. Only PartitionSpecs
    are leaves: optax's empty MaskedNode (a frozen param's optimizer state) is a tuple too, and
    would otherwise be taken for a spec."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, LOGICAL_RULES)),
                        logical_specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(abstract_state, mesh: Mesh):
    """Shardings for a pytree whose leaves may be `nn.Partitioned` boxes (from eval_shape). A box
    around no array (optax's MaskedNode: a frozen param's optimizer state) is unwrapped first."""
    unbox_empty = lambda x: x.unbox() if isinstance(x, nn.meta.AxisMetadata) and not jax.tree.leaves(x.unbox()) else x  # noqa: E731
    abstract_state = jax.tree.map(unbox_empty, abstract_state, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return logical_to_sharding(nn.get_partition_spec(abstract_state), mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the batch axes; any further axes whole (token rows [B, L], labels [B], ...)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@functools.lru_cache(maxsize=None)  # asked once per batch, with the same mesh all run long
def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """(lo, hi): the rows of a global batch that this process's devices hold under
    `batch_sharding`. Processes along the batch axes hold different rows; processes along an axis
    that copies the batch (tensor, when it spans processes) hold the same ones."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1))
    spans = sorted({rows.indices(batch_size)[:2] for rows, _ in index_map.values()})
    lo, hi = spans[0]
    for start, stop in spans[1:]:
        if start > hi:
            raise ConfigError(
                f"this process's devices hold rows {spans} of the batch, not one contiguous block; "
                "order the mesh so that each process's devices are neighbours along the batch axes"
            )
        hi = max(hi, stop)
    return lo, hi


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh, batch_size: int | None = None) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's rows (each process passes the rows that
    `process_rows` names). `batch_size`, the global batch, lets JAX check the parts fit."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), None if batch_size is None else (batch_size, *np.shape(v)[1:]))
        for k, v in batch.items()
    }


_TARGET_PLATFORM = contextvars.ContextVar("jaxllm_target_platform", default=None)


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform of the active mesh's devices (those of a TPU topology
    when this host only compiles for it), else this host's default backend. The ops choose their
    fast paths by it."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


def mesh_platform(mesh: Mesh) -> str:
    platform = mesh.devices.flat[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Makes `mesh` and LOGICAL_RULES current, so logical constraints inside the model resolve,
    and the mesh's platform the one the ops build for."""
    token = _TARGET_PLATFORM.set(mesh_platform(mesh))
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            yield
    finally:
        _TARGET_PLATFORM.reset(token)
