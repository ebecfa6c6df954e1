"""The optimizer: decay mask, schedules, frozen leaves, layer-wise learning-rate decay, LAMB."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from bertjax import config as config_lib
from bertjax import models
from bertjax.train import optim


@pytest.fixture(scope="module")
def params():
    cfg = config_lib.model_config("tiny")
    cfg.update(num_layers=2, hidden_size=16, num_heads=2, intermediate_size=32, vocab_size=64)
    model = models.BertForPreTraining(models.BertConfig.from_config(cfg))
    ids = jnp.zeros((1, 8), jnp.int32)
    return nn.meta.unbox(model.init(jax.random.key(0), ids, ids, jnp.ones_like(ids))["params"])


def optim_config(**overrides):
    config = config_lib.optim_config()
    config.update(dict(warmup_steps=0, schedule="constant", grad_clip=0.0, lr=0.1))
    config.update(overrides)
    return config


def flat(tree):
    return {"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()}


def test_weight_decay_spares_biases_and_layer_norms(params):
    mask = flat(optim.weight_decay_mask(params))
    assert mask["encoder/layer_0/mlp/intermediate/kernel"]
    assert mask["encoder/embeddings/word_embeddings/embedding"]
    assert not mask["encoder/layer_0/mlp/intermediate/bias"]
    assert not mask["encoder/embeddings/LayerNorm/scale"]
    assert not mask["encoder/layer_1/attention_layer_norm/scale"]
    assert not mask["mlm/LayerNorm/scale"]
    # With zero gradients AdamW moves only the decayed leaves: p <- p - lr * wd * p.
    tx = optim.create(optim_config(weight_decay=0.5), 10, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = flat(optax.apply_updates(params, updates))
    old = flat(params)
    for name, decayed in mask.items():
        expected = old[name] * (1 - 0.1 * 0.5) if decayed else old[name]
        np.testing.assert_allclose(new[name], expected, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("schedule", ["linear", "polynomial", "cosine", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    config = optim_config(schedule=schedule, lr=1.0, warmup_steps=10, end_lr_fraction=0.1, power=2.0)
    lr = optim.learning_rate_schedule(config, total_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    progress = 0.5  # step 60: half-way through the 100 decay steps
    expected = {
        "linear": 1.0 - 0.9 * progress,
        "polynomial": 0.1 + 0.9 * (1 - progress) ** 2,
        "cosine": 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)),
        "constant": 1.0,
    }[schedule]
    assert float(lr(60)) == pytest.approx(expected, rel=1e-5)
    assert float(lr(110)) == pytest.approx(1.0 if schedule == "constant" else 0.1, rel=1e-5)


def test_frozen_leaves_get_no_update_and_no_state(params):
    frozen = jax.tree_util.tree_map_with_path(lambda path, _: models.encoder_layer_index(path) in (-1, 0), params)
    tx = optim.create(optim_config(name="adamw", weight_decay=0.1, grad_clip=1.0), 10, params, frozen=frozen)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    current = params
    for _ in range(2):
        updates, opt_state = tx.update(grads, opt_state, current)
        current = optax.apply_updates(current, updates)
    for (name, before), after, is_frozen in zip(flat(params).items(), flat(current).values(), flat(frozen).values()):
        if is_frozen:
            np.testing.assert_array_equal(after, before, err_msg=name)
        else:
            assert not np.allclose(after, before), name
    # The Adam moments exist only for the trained leaves.
    frozen_count = sum(np.size(leaf) for leaf, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)) if f)
    trained_count = sum(np.size(leaf) for leaf, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)) if not f)
    state_count = sum(np.size(leaf) for leaf in jax.tree.leaves(opt_state) if np.ndim(leaf) > 0)
    assert frozen_count > 0
    assert state_count == 2 * trained_count  # mu and nu


def test_frozen_must_match_params(params):
    with pytest.raises(ValueError, match="structure of `params`"):
        optim.create(optim_config(), 10, params, frozen={"encoder": True})


def test_layerwise_lr_decay_scales_updates_by_depth(params):
    decay = 0.5
    tx = optim.create(optim_config(name="adamw", weight_decay=0.0, layerwise_lr_decay=decay, eps=1e-12), 10, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    size = flat(jax.tree.map(lambda u: float(jnp.max(jnp.abs(u))), updates))
    # Adam's first step moves every coordinate by lr; the layer factor scales it.
    num_layers = 2
    assert size["mlm/bias"] == pytest.approx(0.1, rel=1e-4)
    assert size["encoder/layer_1/mlp/output/kernel"] == pytest.approx(0.1 * decay ** (num_layers - 1), rel=1e-4)
    assert size["encoder/layer_0/mlp/output/kernel"] == pytest.approx(0.1 * decay**num_layers, rel=1e-4)
    assert size["encoder/embeddings/word_embeddings/embedding"] == pytest.approx(0.1 * decay ** (num_layers + 1), rel=1e-4)


def test_gradient_clipping_bounds_the_global_norm(params):
    # eps=1 makes Adam's first step depend on the gradient's scale: update = lr * g / (|g| + 1).
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    clipped_value = 100.0 / float(optax.tree.norm(grads))  # every coordinate after clipping to norm 1
    for grad_clip, g in ((0.0, 100.0), (1.0, clipped_value)):
        tx = optim.create(optim_config(weight_decay=0.0, eps=1.0, grad_clip=grad_clip), 10, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["mlm"]["bias"], -0.1 * g / (g + 1.0), rtol=1e-5)


def test_lamb_scales_each_update_by_the_trust_ratio(params):
    tx = optim.create(optim_config(name="lamb", weight_decay=0.0, eps=1e-12), 10, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # First step: Adam direction is all ones; LAMB rescales it to lr * ||p|| / ||u|| per leaf.
    kernel = params["encoder"]["layer_0"]["mlp"]["intermediate"]["kernel"]
    expected = -0.1 * float(jnp.linalg.norm(kernel)) / np.sqrt(kernel.size)
    np.testing.assert_allclose(updates["encoder"]["layer_0"]["mlp"]["intermediate"]["kernel"], expected, rtol=1e-4)
