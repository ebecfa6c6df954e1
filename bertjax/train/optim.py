"""The optimizer a config describes: AdamW or LAMB, a warm-up then decay schedule, gradient
clipping, no weight decay on biases and LayerNorm, layer-wise learning-rate decay, frozen leaves.

Pretraining and fine-tuning both build their optimizer here:

  tx = optim.create(config.optim, config.train.total_steps, params)                  # everything trains
  tx = optim.create(config.optim, total_steps, params, frozen=frozen)                # frozen: bools, True = frozen

Frozen leaves get a zero update and carry no optimizer state (`optax.multi_transform` with
`optax.set_to_zero()`), so freezing the bottom of a large encoder also saves the Adam moments.
"""

from __future__ import annotations

import jax
import optax

from bertjax import models

# Both decouple weight decay from the gradient statistics and take the same decay mask.
OPTIMIZERS = {"adamw": optax.adamw, "lamb": optax.lamb}


def path_names(path) -> tuple[str, ...]:
    """('encoder', 'layer_0', 'attention', 'query', 'kernel') from a jax key path."""
    return tuple(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def is_decayed(path) -> bool:
    """Weight decay applies to weight matrices and embeddings, not to biases or LayerNorm (BERT, AdamW paper)."""
    names = path_names(path)
    if names[-1] == "bias":
        return False
    return not any("layernorm" in name.lower() or "layer_norm" in name.lower() for name in names)


def weight_decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(path), params)


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over optim.warmup_steps, then optim.schedule down to lr * optim.end_lr_fraction."""
    peak = optim_config.lr
    end = peak * optim_config.end_lr_fraction
    warmup_steps = int(optim_config.warmup_steps)
    decay_steps = max(int(total_steps) - warmup_steps, 1)
    name = optim_config.schedule
    if name == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif name == "polynomial":
        decay = optax.polynomial_schedule(peak, end, optim_config.power, decay_steps)
    elif name == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_config.end_lr_fraction)
    elif name == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"config.optim.schedule={name!r}: choose linear, polynomial, cosine or constant")
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def layerwise_lr_factors(params, num_layers: int, decay: float):
    """decay ** (num_layers - layer index) per leaf: the embeddings (index -1) learn slowest, the
    heads (no layer index) at the full rate."""

    def factor(path, _):
        index = models.encoder_layer_index(path_names(path))
        return 1.0 if index is None else float(decay) ** (num_layers - index)

    return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_layer(num_layers: int, decay: float) -> optax.GradientTransformation:
    """Multiply each update (after the learning rate) by its layer's factor; stateless."""

    def update(updates, state, params=None):
        del params
        factors = layerwise_lr_factors(updates, num_layers, decay)
        return jax.tree.map(lambda factor, update: (factor * update).astype(update.dtype), factors, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _num_layers(params) -> int:
    indices = [models.encoder_layer_index(path_names(path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return max((index for index in indices if index is not None), default=-1) + 1


def create(optim_config, total_steps: int, params, frozen=None) -> optax.GradientTransformation:
    """The optimizer for `params` (arrays or their shapes: only the tree's paths are read).

    frozen: None, or a pytree of bools with the structure of params (True = frozen).
    """
    schedule = learning_rate_schedule(optim_config, total_steps)
    if optim_config.name not in OPTIMIZERS:
        raise ValueError(f"config.optim.name={optim_config.name!r}: choose one of {sorted(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[optim_config.name](
        schedule,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        weight_decay=optim_config.weight_decay,
        mask=weight_decay_mask,
    )
    parts = []
    if optim_config.grad_clip and optim_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
    parts.append(optimizer)
    if optim_config.layerwise_lr_decay != 1.0:
        parts.append(scale_by_layer(_num_layers(params), optim_config.layerwise_lr_decay))
    tx = optax.chain(*parts)
    if frozen is None:
        return tx
    if jax.tree.structure(frozen) != jax.tree.structure(params):
        raise ValueError("optim.create: `frozen` must have the structure of `params` (one bool per parameter)")
    labels = jax.tree.map(lambda is_frozen: "frozen" if is_frozen else "trained", frozen)
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)

