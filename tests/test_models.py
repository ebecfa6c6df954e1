"""The encoder and pretraining heads: contracts (outputs, parameter names, axes) and behaviour.

Numerical agreement with the PyTorch reference is in test_hf.py.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bertjax import config as config_lib
from bertjax import models
from bertjax.models import axes

BATCH, LENGTH, VOCAB = 2, 12, 67


def tiny_config(**overrides) -> models.BertConfig:
    model_config = config_lib.model_config("tiny")
    model_config.update(dict(vocab_size=VOCAB, hidden_size=32, num_heads=4, intermediate_size=48, max_position_embeddings=32))
    model_config.update(overrides)
    return models.BertConfig.from_config(model_config)


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    token_type_ids = np.zeros_like(input_ids)
    token_type_ids[:, LENGTH // 2 :] = 1
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, LENGTH - 4 :] = 0  # right padding in the second row
    input_ids[attention_mask == 0] = 0
    return jnp.asarray(input_ids), jnp.asarray(token_type_ids), jnp.asarray(attention_mask)


def init(cfg: models.BertConfig, seed: int = 0):
    model = models.BertForPreTraining(cfg)
    return model, model.init(jax.random.key(seed), *batch())


def flat_params(variables) -> dict:
    return flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")


def mlm_loss_fn(model, inputs, masked_positions, masked_ids):
    def loss(params):
        logits = model.apply({"params": params}, *inputs, masked_positions=masked_positions).mlm_logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, masked_ids).mean()

    return jax.jit(loss)


def sgd_step_lowers_mlm_loss(cfg: models.BertConfig) -> None:
    model, variables = init(cfg)
    params = nn.meta.unbox(variables["params"])
    inputs = batch()
    masked_positions = jnp.array([[1, 3, 5], [2, 4, 6]])
    masked_ids = jnp.array([[5, 6, 7], [8, 9, 10]])
    loss = mlm_loss_fn(model, inputs, masked_positions, masked_ids)
    before, grads = jax.value_and_grad(loss)(params)
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    after = loss(stepped)
    assert np.isfinite(before) and after < before - 1e-3, (before, after)


def test_outputs_have_the_documented_shapes():
    cfg = tiny_config()
    model, variables = init(cfg)
    out = model.apply(variables, *batch(), masked_positions=jnp.zeros((BATCH, 3), jnp.int32))
    assert out.sequence_output.shape == (BATCH, LENGTH, 32)
    assert out.pooled_output.shape == (BATCH, 32)
    assert len(out.hidden_states) == cfg.num_layers + 1
    assert all(h.shape == (BATCH, LENGTH, 32) for h in out.hidden_states)
    np.testing.assert_array_equal(out.hidden_states[-1], out.sequence_output)
    assert out.mlm_logits.shape == (BATCH, 3, VOCAB)
    assert out.sentence_logits.shape == (BATCH, 2)
    assert len(jax.tree.leaves(out)) == 4 + len(out.hidden_states)  # a pytree


def test_masked_position_logits_are_rows_of_all_position_logits():
    model, variables = init(tiny_config())
    masked_positions = jnp.array([[0, 5, 5, 11], [3, 1, 7, 2]])
    everywhere = model.apply(variables, *batch()).mlm_logits
    assert everywhere.shape == (BATCH, LENGTH, VOCAB)
    gathered = model.apply(variables, *batch(), masked_positions=masked_positions).mlm_logits
    expected = np.take_along_axis(np.asarray(everywhere), np.asarray(masked_positions)[..., None], axis=1)
    np.testing.assert_allclose(gathered, expected, atol=1e-6)


def test_mlm_decoder_is_tied_to_word_embeddings():
    """Scaling the word-embedding table changes the logits bilinearly: there is no separate decoder matrix."""
    model, variables = init(tiny_config())
    params = flat_params(variables)
    assert not any("decoder" in path for path in params)
    hidden = jnp.ones((1, 32))
    table = params["encoder/embeddings/word_embeddings/embedding"]
    logits = model.apply(variables, hidden, method=lambda m, h: m.encoder.attend(h))
    np.testing.assert_allclose(logits[0], table.sum(axis=1), rtol=1e-5, atol=1e-6)


def test_parameter_names_follow_the_contract():
    cfg = tiny_config(num_layers=3)
    params = flat_params(init(cfg)[1])
    embeddings = {"word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"}
    assert {path.split("/")[2] for path in params if path.startswith("encoder/embeddings/")} == embeddings
    assert {path.split("/")[1] for path in params if path.startswith("encoder/")} == {"embeddings", "layer_0", "layer_1", "layer_2"}
    assert {path.split("/")[0] for path in params} == {"encoder", "pooler", "mlm", "sentence"}
    for path in params:
        module, leaf = path.split("/")[-2], path.split("/")[-1]
        is_norm = "LayerNorm" in module or "layer_norm" in module
        # "no weight decay on biases and LayerNorm" is a rule on names.
        assert leaf in (("scale", "bias") if is_norm else ("kernel", "embedding", "bias")), path
    assert models.count_params(init(cfg)[1]["params"]) == sum(p.size for p in params.values())


def test_every_parameter_carries_logical_axis_names():
    _, variables = init(tiny_config(layer_norm="pre"))
    boxes = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    known = {value for name, value in vars(axes).items() if name.isupper()}
    assert boxes and all(isinstance(box, nn.Partitioned) for box in boxes)
    for box in boxes:
        assert len(box.names) == box.value.ndim and set(box.names) <= known, box.names
    kernels = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    assert kernels["encoder/layer_0/attention/query/kernel"].names == (axes.EMBED, axes.HEADS, axes.KV)
    assert kernels["encoder/layer_0/attention/output/kernel"].names == (axes.HEADS, axes.KV, axes.EMBED)
    assert kernels["encoder/layer_0/mlp/intermediate/kernel"].names == (axes.EMBED, axes.MLP)
    assert kernels["encoder/embeddings/word_embeddings/embedding"].names == (axes.VOCAB, axes.EMBED)


@pytest.mark.parametrize(
    "path, index",
    [
        (("encoder", "embeddings", "word_embeddings", "embedding"), -1),
        ("encoder/layer_11/attention/query/kernel", 11),
        ((jax.tree_util.DictKey("encoder"), jax.tree_util.DictKey("layer_2"), jax.tree_util.DictKey("mlp")), 2),
        (("encoder", "final_layer_norm", "scale"), None),
        (("mlm", "bias"), None),
        (("pooler", "dense", "kernel"), None),
    ],
)
def test_encoder_layer_index(path, index):
    assert models.encoder_layer_index(path) == index


def test_encoder_alone_runs_on_the_encoder_subtree():
    cfg = tiny_config()
    model, variables = init(cfg)
    full = model.apply(variables, *batch())
    sequence_output, hidden_states = models.Encoder(cfg).apply({"params": variables["params"]["encoder"]}, *batch())
    np.testing.assert_allclose(sequence_output, full.sequence_output, atol=1e-6)
    assert len(hidden_states) == cfg.num_layers + 1


@pytest.mark.parametrize("attention_dropout", [0.0, 0.5])
def test_padding_tokens_do_not_reach_real_tokens(attention_dropout):
    """The padding mask holds on the fused path and on the explicit-softmax path used for attention dropout."""
    cfg = tiny_config(hidden_dropout=0.0, attention_dropout=attention_dropout)
    model, variables = init(cfg)
    input_ids, token_type_ids, attention_mask = batch()
    other_padding = jnp.where(attention_mask == 0, 7, input_ids)
    run = jax.jit(
        lambda ids: model.apply(
            variables, ids, token_type_ids, attention_mask, deterministic=False, rngs={"dropout": jax.random.key(3)}
        ).sequence_output
    )
    real = np.asarray(attention_mask, bool)
    np.testing.assert_allclose(np.asarray(run(input_ids))[real], np.asarray(run(other_padding))[real], atol=1e-5)


def test_dropout_is_active_only_when_not_deterministic():
    cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.3)
    model, variables = init(cfg)

    def run(deterministic, seed=0):
        return model.apply(variables, *batch(), deterministic=deterministic, rngs={"dropout": jax.random.key(seed)}).sequence_output

    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    np.testing.assert_array_equal(run(False, 0), run(False, 0))
    assert not np.allclose(run(False, 0), run(True))
    assert not np.allclose(run(False, 0), run(False, 1))


def test_sinusoidal_positions_have_no_parameters_and_train():
    cfg = tiny_config(position_embedding="sinusoidal")
    model, variables = init(cfg)
    assert not any("position" in path for path in flat_params(variables))
    out = model.apply(variables, *batch())
    assert np.isfinite(out.mlm_logits).all() and np.isfinite(out.sentence_logits).all()
    learned = flat_params(init(tiny_config())[1])
    assert models.count_params(variables["params"]) == models.count_params(learned) - 32 * 32
    sgd_step_lowers_mlm_loss(cfg)
    longer = jnp.ones((1, 2 * cfg.max_position_embeddings), jnp.int32)
    assert np.isfinite(model.apply(variables, longer).sequence_output).all()
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        models.BertForPreTraining(tiny_config()).apply(init(tiny_config())[1], longer)


def test_sinusoidal_table_matches_the_formula():
    table = np.asarray(models.encoder.sinusoidal_positions(50, 8))
    position, pair = 37, 2
    angle = position / 10000 ** (2 * pair / 8)
    np.testing.assert_allclose(table[position, 2 * pair : 2 * pair + 2], [np.sin(angle), np.cos(angle)], rtol=1e-5)


def test_pre_layer_norm_differs_from_post_and_trains():
    # At BERT's init (std 0.02) every sublayer adds almost nothing to the residual stream and both placements
    # are near the identity on the embeddings; wider weights make the sublayers count.
    post_model, post_variables = init(tiny_config(initializer_range=0.5))
    pre_model, pre_variables = init(tiny_config(initializer_range=0.5, layer_norm="pre"))
    assert "encoder/final_layer_norm/scale" in flat_params(pre_variables)
    assert "encoder/final_layer_norm/scale" not in flat_params(post_variables)
    post = post_model.apply(post_variables, *batch()).sequence_output
    pre = pre_model.apply(pre_variables, *batch()).sequence_output
    assert np.abs(np.asarray(post) - np.asarray(pre)).max() > 1e-2
    sgd_step_lowers_mlm_loss(tiny_config(layer_norm="pre"))


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 compute with float32 parameters: every output within 3% of the largest float32 magnitude of that output.

    bf16 keeps 8 mantissa bits (0.4% relative rounding per op); measured here: ~1% for hidden states and logits.
    Weights are drawn wider than BERT's init (std 0.2) so the logits are O(1) and the bound means something.
    """
    model32, variables = init(tiny_config(initializer_range=0.2))
    model16 = models.BertForPreTraining(tiny_config(dtype="bfloat16", initializer_range=0.2))
    params16 = jax.tree.leaves(nn.meta.unbox(model16.init(jax.random.key(0), *batch())["params"]))
    assert all(leaf.dtype == jnp.float32 for leaf in params16)
    out32 = model32.apply(variables, *batch())
    out16 = model16.apply(variables, *batch())
    assert out16.sequence_output.dtype == jnp.bfloat16
    assert out16.mlm_logits.dtype == jnp.float32
    for name in ("sequence_output", "pooled_output", "mlm_logits", "sentence_logits"):
        expected = np.asarray(getattr(out32, name))
        actual = np.asarray(getattr(out16, name), np.float32)
        np.testing.assert_allclose(actual, expected, atol=0.03 * np.abs(expected).max(), err_msg=name)


def test_flops_per_token_counts_six_n_plus_attention():
    cfg = tiny_config()
    n = models.count_params(init(cfg)[1]["params"])
    assert models.flops_per_token(cfg, 16) == 6 * n + 12 * cfg.num_layers * cfg.hidden_size * 16


def test_config_from_pretrain_config():
    cfg = models.BertConfig.from_config(config_lib.pretrain_config("base").model)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.dtype) == (12, 768, 12, 3072, "bfloat16")
    with pytest.raises(KeyError, match="hidden_size"):
        models.BertConfig.from_config({"vocab_size": 10, "num_layers": 1, "num_heads": 1, "intermediate_size": 4})


def test_cudnn_attention_asks_for_bfloat16():
    model = models.BertForPreTraining(tiny_config(attention_implementation="cudnn"))
    with pytest.raises(ValueError, match="model.dtype='bfloat16'"):
        model.init(jax.random.key(0), *batch())


def test_dense_backward_transpose_gives_xla_s_gradients():
    """model.dense_backward='transpose' only rewrites how the dense kernels' gradient is multiplied:
    loss and every gradient equal XLA's own form ('xla', the default); forward-mode derivatives need 'xla'."""
    inputs = batch()
    masked_positions, masked_ids = jnp.array([[1, 3, 5], [2, 4, 6]]), jnp.array([[5, 6, 7], [8, 9, 10]])
    results, jaxprs = {}, {}
    for mode in ("xla", "transpose"):
        model, variables = init(tiny_config(dense_backward=mode, hidden_dropout=0.0, attention_dropout=0.0))
        params = nn.meta.unbox(variables["params"])
        loss_fn = mlm_loss_fn(model, inputs, masked_positions, masked_ids)
        results[mode] = jax.value_and_grad(loss_fn)(params)
        jaxprs[mode] = str(jax.make_jaxpr(jax.grad(loss_fn))(params))
    (loss_xla, grads_xla), (loss_t, grads_t) = results["xla"], results["transpose"]
    assert float(loss_t) == float(loss_xla)
    for (path, g_xla), g_t in zip(jax.tree_util.tree_leaves_with_path(grads_xla), jax.tree.leaves(grads_t)):
        np.testing.assert_allclose(g_t, g_xla, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert "custom_vjp" in jaxprs["transpose"] and "optimization_barrier" in jaxprs["transpose"]
    assert "custom_vjp" not in jaxprs["xla"] and config_lib.pretrain_config("tiny").model.dense_backward == "xla"
    model, variables = init(tiny_config(dense_backward="transpose"))
    loss = mlm_loss_fn(model, inputs, masked_positions, masked_ids)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(loss, (nn.meta.unbox(variables["params"]),), (jax.tree.map(jnp.ones_like, nn.meta.unbox(variables["params"])),))
    with pytest.raises(config_lib.ConfigError, match="model.dense_backward"):
        config = config_lib.pretrain_config("tiny")
        config.model.dense_backward = "fast"
        config_lib.validate(config)
