"""LoRA adapters (Hu et al., 2021) on any family: add them, train only them, merge them for export.

    lm = add_lora(from_pretrained(path), LoRAConfig(rank=8, alpha=32, dropout=0.1), seed=0)
    adapters, base = split_trainable(lm.params)
    loss_fn, frozen_fn = methods.get("plad_rank").objective(lm, combine=lora.objective_combine)
    state = TrainState.create(adapters, optimizer)         # optimizer moments exist for adapters
                                                           # only
    state, metrics = step(state, batch, {lora.FROZEN_KEY: base})
    trained = lm.with_params(combine(state.params, base))
    merge_lora(trained).save_pretrained(out)              # a plain HF directory
                                                          # (so does trained.save_pretrained)

What a LoRA model is. `add_lora` swaps each targeted `Linear` for a `LoRALinear`: the same `kernel`
(and `bias`) variables at the same paths, plus `lora_a` `[in, rank]` and `lora_b` `[rank, out]` as
`nnx.LoRAParam`, and

    y = x @ kernel + bias + dropout(x) @ lora_a @ lora_b * (alpha / rank)

`lora_a` is drawn like PEFT's default (kaiming-uniform with a = sqrt(5): U(+-1/sqrt(in))), `lora_b`
is zero, so a fresh adapter adds exact zeros and the model starts as the base model (compiled
programs may still differ in the last bit where XLA fuses the zero terms differently). The adapters'
type is the whole trainable/frozen split: `split_trainable` and `combine` are two `nnx.State`
filters, pure and free under jit. Adapters are fp32 master weights whatever the base dtype (the
model casts them to its compute dtype, like every parameter). Their logical axes are `(in_axis,
None)` and `(None, out_axis)`, so `plad_jax.sharding` shards them like the kernel they adapt; the
rank axis is replicated. On a model with a mesh, `add_lora` places them with those shardings.

Targets are groups (`attention`, `mlp`) or projection names of the family (`q_proj`, `wi_0`, ...);
T5's `attention` covers self- and cross-attention. Output layers (`lm_head`) are never adapted.

Dropout randomness. `LanguageModel.apply(..., rng=None)` takes an optional key and hands it to
`_module(params, rng)`, the one place the family module is rebuilt from params. `LoRAModel`
overrides that hook: after `nnx.merge` it gives every `LoRALinear` its own key,
`fold_in(rng, i)`, in a per-call attribute (`dropout_key`) that lives only on the throwaway module
of that call, never in params. So the family files (`score`, `prefill`, `decode`) know nothing of
LoRA or of randomness; `rng=None` (scoring, evaluation) and `prefill`/`decode` (sampling) are
deterministic; and params stay a pure tree of weights for optimizers and checkpoints. As in PEFT,
dropout acts on the adapter's input only, with an independent mask per adapted projection.

Export. `merge_lora` folds W' = W + (alpha / rank) * A @ B (fp32, highest matmul precision, cast
back to W's dtype) and returns a plain `LanguageModel` on the family's original graph, which
`save_pretrained` writes as a standard HF directory. `LoRAModel.save_pretrained` merges first, so a
LoRA model never silently writes its base weights.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from plad_jax import sharding as shd
from plad_jax.models.language_model import LanguageModel
from plad_jax.models.layers import Linear, activation_axes, after, constrain

_LLAMA = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# HF model_type -> target group -> projection (Linear attribute) names.
FAMILY_TARGETS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "t5": {"attention": ("q", "k", "v", "o"), "mlp": ("wi", "wi_0", "wi_1", "wo")},
    "gpt_neo": {"attention": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("c_fc", "c_proj")},
}
NEVER_ADAPTED = ("lm_head",)  # read through `Linear.logits`, which a LoRA path would bypass
FROZEN_KEY = "lora_base"  # where `objective_combine` finds the base weights in the step's `frozen`


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Paper setting (PLaD, Sec. 5.1): rank 8, alpha 32, dropout 0.1 on attention and MLP."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple = ("attention", "mlp")

    def __post_init__(self):
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(str(t).strip() for t in targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or "" in self.targets:
            raise ValueError(
                f"lora.targets must name at least one group or projection, got {self.targets!r}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(Linear):
    """A `Linear` with a low-rank update: x @ kernel (+ bias) + dropout(x) @ lora_a @ lora_b *
    scale."""

    def __init__(
        self,
        base: Linear,
        lora_a: nnx.LoRAParam,
        lora_b: nnx.LoRAParam,
        *,
        scale: float,
        dropout: float,
    ):
        self.kernel = base.kernel
        self.bias = base.bias
        self.out_axis = base.out_axis
        self.lora_a = lora_a  # [in, rank]
        self.lora_b = lora_b  # [rank, out]
        self.scale = scale
        self.dropout = dropout
        self.dropout_key = nnx.data(None)  # set per call by `LoRAModel._module`; None = no dropout

    def __call__(self, x):
        y = super().__call__(x)
        h = x
        if self.dropout_key is not None and self.dropout > 0:  # the mask drawn once x exists
            keep = jax.random.bernoulli(after(self.dropout_key, x), 1.0 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        low = constrain(h @ self.lora_a[...].astype(x.dtype), activation_axes(x))  # [..., rank]
        update = (low @ self.lora_b[...].astype(x.dtype)) * self.scale
        return constrain(y + update.astype(x.dtype), activation_axes(x, self.out_axis))


class LoRAModel(LanguageModel):
    """A `LanguageModel` whose graph carries adapters; the interface is unchanged.

    `apply(..., rng=key)` turns adapter dropout on; `save_pretrained` writes the merged model;
    `base_graphdef` is the family's graph without adapters (what `merge_lora` returns a model on).
    """

    def __init__(
        self,
        lora: LoRAConfig,
        base_graphdef,
        model_type,
        config,
        graphdef,
        params,
        hf_config,
        *,
        compute_dtype=jnp.float32,
        mesh=None,
        remat: str = "none",
    ):
        super().__init__(
            model_type,
            config,
            graphdef,
            params,
            hf_config,
            compute_dtype=compute_dtype,
            mesh=mesh,
            remat=remat,
        )
        self.lora = lora
        self.base_graphdef = base_graphdef

    def with_params(self, params) -> LoRAModel:
        return LoRAModel(
            self.lora,
            self.base_graphdef,
            self.model_type,
            self.config,
            self.graphdef,
            params,
            self.hf_config,
            compute_dtype=self.compute_dtype,
            mesh=self.mesh,
            remat=self.remat,
        )

    def _module(self, params, rng=None):
        module = super()._module(params)
        if rng is not None and self.lora.dropout > 0:
            for i, (_, layer) in enumerate(lora_layers(module)):
                layer.dropout_key = jax.random.fold_in(rng, i)
        return module

    def num_adapter_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(split_trainable(self.params)[0]))

    def merge(self) -> LanguageModel:
        return merge_lora(self)

    def save_pretrained(self, path: str, *, max_shard_bytes: int = 5 * 1024**3):
        """Write the merged model (W + scale * A @ B) as a standard HF directory."""
        merge_lora(self).save_pretrained(path, max_shard_bytes=max_shard_bytes)

    def save_gguf(self, path: str, dtype: str = "f16", tokenizer=None):
        """Write the merged model as one GGUF file (`LanguageModel.save_gguf`)."""
        merge_lora(self).save_gguf(path, dtype, tokenizer)

    def __repr__(self):
        return (
            f"LoRAModel({self.model_type}, params={self.num_params():,}, "
            f"adapters={self.num_adapter_params():,}, rank={self.lora.rank}, "
            f"alpha={self.lora.alpha}, dropout={self.lora.dropout}, "
            f"compute_dtype={self.compute_dtype.name}, "
            f"mesh={None if self.mesh is None else dict(self.mesh.shape)})"
        )


# -- trainable / frozen split (pure; use inside jit freely) -------------------------------------


def split_trainable(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, base): the `nnx.LoRAParam` leaves and everything else."""
    return nnx.split_state(params, nnx.LoRAParam, ...)


def combine(adapters: nnx.State, base: nnx.State) -> nnx.State:
    """The full LoRA-model params from `split_trainable`'s two parts."""
    return nnx.merge_state(adapters, base)


def objective_combine(adapters, frozen) -> nnx.State:
    """`combine` for `Method.objective` (plad_jax.methods): adapters plus the base in
    `frozen[FROZEN_KEY]`."""
    return combine(adapters, frozen[FROZEN_KEY])


# -- adding and merging -------------------------------------------------------------------------


def lora_layers(module):
    """(path, LoRALinear) for every adapted projection, in graph order."""
    return [(path, node) for path, node in nnx.iter_graph(module) if isinstance(node, LoRALinear)]


def target_names(lm: LanguageModel, targets) -> tuple[str, ...]:
    """The projection names `targets` select in `lm`; an unknown name is a one-line ValueError."""
    module = nnx.merge(lm.graphdef, lm.params)
    present = sorted(
        {
            path[-1]
            for path, node in nnx.iter_graph(module)
            if type(node) is Linear and path and path[-1] not in NEVER_ADAPTED
        }
    )
    groups = {
        g: tuple(n for n in names if n in present)
        for g, names in FAMILY_TARGETS.get(lm.model_type, {}).items()
    }
    groups = {g: names for g, names in groups.items() if names}
    known = [
        n for names in FAMILY_TARGETS.get(lm.model_type, {}).values() for n in names if n in present
    ]
    valid = list(groups) + known + [n for n in present if n not in known]
    selected = []
    for target in targets:
        if target not in valid:
            raise ValueError(
                f"unknown LoRA target '{target}' for model_type '{lm.model_type}' "
                f"(valid: {', '.join(valid)})"
            )
        selected += groups.get(target, (target,))
    return tuple(dict.fromkeys(selected))


def add_lora(lm: LanguageModel, cfg: LoRAConfig = LoRAConfig(), seed: int = 0) -> LoRAModel:
    """`lm` with adapters on the projections `cfg.targets` names (B = 0: it computes what `lm`
    does).

    The base arrays are shared with `lm`, never copied (the Variables around them are new);
    adapters are placed sharded like their kernels when `lm` has a mesh. Each adapter's `lora_a`
    depends on `seed` and its path only, so adapting more or fewer projections never changes the
    others' initial values.
    """
    if isinstance(lm, LoRAModel):
        raise ValueError(
            "this model already has LoRA adapters; merge_lora(model) first to stack another set"
        )
    names = target_names(lm, cfg.targets)
    params = jax.tree.map(lambda x: x, lm.params)  # fresh Variables around the same arrays
    module = nnx.merge(lm.graphdef, params)
    found = [
        (path, node)
        for path, node in nnx.iter_graph(module)
        if type(node) is Linear and path and path[-1] in names
    ]
    for path, linear in found:
        lora_a, lora_b = _new_adapter(seed, path, linear, cfg.rank, lm.mesh)
        parent = module
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        setattr(
            parent,
            path[-1],
            LoRALinear(linear, lora_a, lora_b, scale=cfg.scale, dropout=cfg.dropout),
        )
    graphdef, params = nnx.split(module)
    return LoRAModel(
        cfg,
        lm.graphdef,
        lm.model_type,
        lm.config,
        graphdef,
        params,
        lm.hf_config,
        compute_dtype=lm.compute_dtype,
        mesh=lm.mesh,
        remat=lm.remat,
    )


def _new_adapter(seed: int, path, linear: Linear, rank: int, mesh):
    """(lora_a ~ U(+-1/sqrt(in)) [in, rank], lora_b = 0 [rank, out]), fp32, placed on `mesh`.

    Adapters are small (in * rank): drawn on the host from (seed, path), which compiles nothing,
    then placed with the shardings their logical axes give.
    """
    d_in, d_out = linear.kernel.shape
    in_axis, out_axis = linear.kernel.get_metadata().get("axes") or (None, None)
    axes_a, axes_b = (in_axis, None), (None, out_axis)
    bound = d_in**-0.5  # PEFT: kaiming_uniform_(a=sqrt(5)) on an [rank, in] weight
    rng = np.random.default_rng([seed, zlib.crc32("/".join(map(str, path)).encode())])
    a = rng.uniform(-bound, bound, (d_in, rank)).astype(np.float32)
    b = np.zeros((rank, d_out), np.float32)

    def place(x, axes):  # every process draws the same values and fills its own shards
        if mesh is None:
            return jnp.asarray(x)
        sharding = NamedSharding(mesh, shd.logical_to_spec(axes, x.shape, mesh))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return nnx.LoRAParam(place(a, axes_a), axes=axes_a), nnx.LoRAParam(
        place(b, axes_b), axes=axes_b
    )


@functools.partial(jax.jit, static_argnums=3)
def _fold(kernels, lora_a, lora_b, scale):
    """[W + scale * A @ B] in fp32 at highest matmul precision, each cast back to W's dtype."""
    out = []
    for w, a, b in zip(kernels, lora_a, lora_b):
        delta = jnp.matmul(
            a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        out.append((w.astype(jnp.float32) + scale * delta).astype(w.dtype))
    return out


def merged_params(params: nnx.State, scale: float) -> nnx.State:
    """Base-structured params with every adapted kernel replaced by W + scale * A @ B (pure).

    Only the adapted kernels are computed anew; every other leaf holds the same array as `params`.
    """
    adapters, base = split_trainable(params)
    flat = dict(nnx.to_flat_state(jax.tree.map(lambda x: x, base)))  # fresh Variables, same arrays
    lora = dict(nnx.to_flat_state(adapters))
    prefixes = [path[:-1] for path in lora if path[-1] == "lora_a"]
    kernels = [flat[p + ("kernel",)] for p in prefixes]
    merged = _fold(
        [k.get_value() for k in kernels],
        [lora[p + ("lora_a",)].get_value() for p in prefixes],
        [lora[p + ("lora_b",)].get_value() for p in prefixes],
        scale,
    )
    for p, kernel, value in zip(prefixes, kernels, merged):
        flat[p + ("kernel",)] = kernel.replace(value)
    return nnx.from_flat_state(flat)


def merge_lora(lm: LoRAModel) -> LanguageModel:
    """A plain `LanguageModel` (the family's own graph) with the adapters folded into its
    kernels."""
    if not isinstance(lm, LoRAModel):
        raise ValueError("merge_lora needs a model made by add_lora; this one has no adapters")
    params = merged_params(lm.params, lm.lora.scale)
    if lm.mesh is not None:  # keep every merged kernel on its kernel's layout (a no-op where it is)
        _, base = split_trainable(lm.params)
        params = jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), params, base)
    return LanguageModel(
        lm.model_type,
        lm.config,
        lm.base_graphdef,
        params,
        lm.hf_config,
        compute_dtype=lm.compute_dtype,
        mesh=lm.mesh,
        remat=lm.remat,
    )
