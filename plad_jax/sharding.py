"""Device mesh and logical-axis sharding rules.

The mesh has three axes, in this order: `data` (pure data parallel), `fsdp` (data parallel with
parameters sharded), `tensor` (tensor/model parallel). One axis may be -1: it takes whatever the
device count leaves. Models name the logical axes of their parameters (`embed`, `mlp`, `heads`,
`kv`, `vocab`, `norm`, ...); `LOGICAL_RULES` maps those names to mesh axes. For each dimension, the
first rule for its name whose mesh axes are still unused by the tensor and whose size divides the
dimension is taken; otherwise that dimension is replicated. This is the MaxText convention; with
the default table:

    embedding [vocab, embed]  -> rows over fsdp, columns over tensor
    lm_head   [embed, vocab]  -> rows over fsdp, columns over tensor
    q/k/v     [embed, heads]  -> (fsdp, tensor);   o_proj [heads, embed] -> (tensor, fsdp)
    mlp up    [embed, mlp]    -> (fsdp, tensor);   down   [mlp, embed]   -> (tensor, fsdp)
    norms, relative-position tables: replicated

Batches are sharded over (data, fsdp) on their leading axis. `shard_batch` places a whole batch
that every process holds; `global_batch` builds the global batch from each process's own rows
(`process_batch_rows` says which), the multi-host input path. With one process they agree.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("embed", ("tensor",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv", ("tensor",)),
    ("kv_heads", ("tensor",)),
)

# Activations: batch over (data, fsdp), feature axes that a tensor-parallel matmul produces over
# `tensor`, the residual stream (`embed`) replicated. Models pin their activations to these
# layouts (`plad_jax.models.layers.constrain`) so the partitioner never invents a layout that
# shards the residual stream over fsdp while the batch is on fsdp too (which costs collectives
# and, on XLA:CPU, has produced rows in the wrong order).
ACTIVATION_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("heads", ("tensor",)),
    ("kv", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
)


@dataclasses.dataclass
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; one may be -1 (fill with what is left)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {tuple(sizes)}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {tuple(sizes)}: axis sizes must be positive or -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {tuple(sizes)}: {num_devices} devices are not divisible by {known}"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {tuple(sizes)} needs {math.prod(sizes)} devices but {num_devices} are "
                "available; make data*fsdp*tensor equal the device count or set one axis to -1"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig | tuple = MeshConfig(), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    if isinstance(config, tuple):
        config = MeshConfig(*config)
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(
            shape
        )  # CPU or unusual topologies: plain row-major order
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes, shape, mesh: Mesh, rules=LOGICAL_RULES) -> P:
    """PartitionSpec for a tensor of `shape` whose dimensions carry logical names `axes`."""
    used, spec = set(), []
    for name, dim in zip(axes, shape):
        choice = None
        for rule_name, mesh_axes in rules:
            if rule_name != name or used.intersection(mesh_axes):
                continue
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if dim % size == 0:
                choice = mesh_axes
                break
        if choice is not None and math.prod(mesh.shape[a] for a in choice) > 1:
            used.update(choice)
            spec.append(choice[0] if len(choice) == 1 else choice)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.State:
    """The NamedSharding of every parameter in `state`, from its `axes` metadata."""

    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(mesh: Mesh | None, *arrays):
    """Place whole-batch host arrays on the mesh: batch-sharded when the batch divides data*fsdp,
    else replicated.

    Every process passes the same, global arrays (the eager path, e.g. `LanguageModel.logits`);
    each process copies only the rows its own devices hold. A multi-host input pipeline, where
    each host loads only its own rows, uses `global_batch` instead.
    """
    if mesh is None:
        return arrays
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    out = []
    for a in arrays:
        sharding = (
            batch_sharding(mesh, a.ndim) if a.shape[0] % split == 0 else NamedSharding(mesh, P())
        )
        if jax.process_count() == 1:
            out.append(jax.device_put(a, sharding))
        else:  # only the addressable shards are read; the others live on other hosts
            host = np.asarray(a)
            out.append(
                jax.make_array_from_callback(
                    host.shape, sharding, lambda index, host=host: host[index]
                )
            )
    return tuple(out)


def local_batch_shards(mesh: Mesh) -> range:
    """The batch shards (of data*fsdp, in batch order) that this process's devices hold."""
    fsdp, me = mesh.shape["fsdp"], jax.process_index()
    shards = sorted(
        {
            d * fsdp + f
            for (d, f, _), device in np.ndenumerate(mesh.devices)
            if device.process_index == me
        }
    )
    if not shards:
        raise ValueError(f"process {me} has no device in the mesh {dict(mesh.shape)}")
    if shards != list(range(shards[0], shards[-1] + 1)):
        raise ValueError(
            f"process {me} holds batch shards {shards} of the mesh {dict(mesh.shape)}, which are "
            "not contiguous; build the mesh so that each process's devices are adjacent along "
            "data/fsdp"
        )
    return range(shards[0], shards[-1] + 1)


def process_batch_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows of a global batch of `global_rows` that this process feeds to `global_batch`.

    The batch is split into data*fsdp equal shards, shard k going to the devices at mesh position
    (k // fsdp, k % fsdp, any tensor index); a process feeds the shards its devices hold, which
    are contiguous for meshes from `make_mesh`. With 2 processes of 4 devices on (2, 2, 2) or
    (8, 1, 1), process 0 feeds rows [0, B/2) and process 1 rows [B/2, B); on (1, 1, 8) both feed
    all rows. One process feeds everything.
    """
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_rows % split:
        raise ValueError(
            f"global batch of {global_rows} rows cannot be split over data*fsdp = {split} "
            f"devices; make the batch size a multiple of {split}"
        )
    shards, per_shard = local_batch_shards(mesh), global_rows // split
    return slice(shards.start * per_shard, shards.stop * per_shard)


def global_batch(mesh: Mesh | None, local_arrays):
    """Assemble a global, batch-sharded jax.Array from each process's own rows (any pytree).

    Every leaf is this process's slice of the global batch along axis 0: exactly the rows
    `process_batch_rows(mesh, B)` of the global batch of B rows (the shards its devices hold;
    processes whose devices hold the same shards pass the same rows). The global batch has
    `rows * data*fsdp / len(local_batch_shards(mesh))` rows, sharded over (data, fsdp). With one
    process the local batch is the global batch, and this equals `shard_batch` on a batch that
    divides data*fsdp.
    """
    if mesh is None:
        return local_arrays
    split, shards = mesh.shape["data"] * mesh.shape["fsdp"], len(local_batch_shards(mesh))

    def place(a):
        rows = a.shape[0]
        if rows % shards:
            raise ValueError(
                f"process {jax.process_index()} passed {rows} rows, which cannot be split over the "
                f"{shards} batch shards its devices hold; make the per-process batch a multiple "
                f"of {shards}"
            )
        sharding = batch_sharding(mesh, a.ndim)
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        global_shape = (rows // shards * split,) + tuple(a.shape[1:])
        return jax.make_array_from_process_local_data(sharding, np.asarray(a), global_shape)

    return jax.tree.map(place, local_arrays)


def place_batch(mesh: Mesh | None, batch, *, local: bool = False):
    """A host batch (a `plad_jax.data` batch, or any pytree of arrays sharing their leading axis)
    as device arrays, batch-sharded over (data, fsdp): the one placement every training step's
    input goes through. The tree keeps its type; only its arrays move.

    `local=False`: every process passes the whole global batch and copies only the rows its
    devices hold (`shard_batch`; a batch that does not divide data*fsdp is replicated).
    `local=True`: each process passes its own rows (`local_rows`), as after per-process sampling,
    and the global batch is assembled from them (`global_batch`). On one process both are the
    same.
    """
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    if local and jax.process_count() > 1:
        return global_batch(mesh, batch)
    leaves, tree = jax.tree.flatten(batch)
    return jax.tree.unflatten(tree, shard_batch(mesh, *leaves))


def local_rows(mesh: Mesh | None, batch):
    """This process's rows (`process_batch_rows`) of a global host batch (any pytree of arrays
    sharing their leading axis); all of them on one process."""
    if mesh is None or jax.process_count() == 1:
        return batch
    rows = process_batch_rows(mesh, len(jax.tree.leaves(batch)[0]))
    return jax.tree.map(lambda v: v[rows], batch)
