"""The seq2seq model (bertjax.models.seq2seq): parity with `transformers` BART and mBART (PyTorch, CPU,
float32) as the reference, in both conversion directions; the KV-cached decode against the full
forward pass; logical axes on every parameter."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bertjax import checkpoint_io  # noqa: E402
from bertjax.convert import hf  # noqa: E402
from bertjax.models import axes, seq2seq  # noqa: E402
from bertjax.train import partitioning  # noqa: E402

# Programs of the same shapes (the HF-loaded and the bertjax-made model; steps of the cached decode) compile once.
pytestmark = pytest.mark.usefixtures("compilation_cache")

# Encoder and decoder depths differ, the feed-forward width is not 4H, and mBART scales its embeddings.
SHAPE = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=37,
    decoder_ffn_dim=37,
    max_position_embeddings=24,
)
REFERENCES = {"bart": (transformers.BartConfig, transformers.BartForConditionalGeneration, {}),
              "mbart": (transformers.MBartConfig, transformers.MBartForConditionalGeneration, {"scale_embedding": True})}
SOURCE_LENGTH, TARGET_LENGTH = 10, 7


def reference_model(model_type: str, seed: int = 0):
    """A random HF model; every parameter and final_logits_bias perturbed, so LayerNorms and biases are not at their 0/1 init."""
    config_class, model_class, extra = REFERENCES[model_type]
    torch.manual_seed(seed)
    config = config_class(attn_implementation="eager", dropout=0.0, attention_dropout=0.0, **SHAPE, **extra)
    model = model_class(config).eval()
    with torch.no_grad():
        for tensor in (*model.parameters(), model.final_logits_bias):
            tensor.add_(0.05 * torch.randn_like(tensor))
    return model


def padded_batch(seed: int = 0):
    """Three rows, right-padded in both encoder and decoder inputs (one row is mostly padding)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, SHAPE["vocab_size"], (3, SOURCE_LENGTH))
    decoder_input_ids = rng.integers(3, SHAPE["vocab_size"], (3, TARGET_LENGTH))
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 6:] = attention_mask[2, 2:] = 0
    decoder_attention_mask = np.ones_like(decoder_input_ids)
    decoder_attention_mask[1, 4:] = decoder_attention_mask[2, 1:] = 0
    input_ids[attention_mask == 0] = decoder_input_ids[decoder_attention_mask == 0] = 1  # BART's <pad>
    return input_ids, attention_mask, decoder_input_ids, decoder_attention_mask


def torch_outputs(model, batch) -> dict:
    input_ids, attention_mask, decoder_input_ids, decoder_attention_mask = (torch.tensor(x) for x in batch)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                    decoder_attention_mask=decoder_attention_mask, output_hidden_states=True)
        decoder = model.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                              decoder_attention_mask=decoder_attention_mask)
    return dict(encoder=out.encoder_last_hidden_state.numpy(), decoder=decoder.last_hidden_state.numpy(), logits=out.logits.numpy())


def bertjax_outputs(model, variables, batch) -> dict:
    out = jax.jit(model.apply)(variables, *(jnp.asarray(x, jnp.int32) for x in batch))
    return dict(encoder=np.asarray(out.encoder_last_hidden_state), decoder=np.asarray(out.decoder_last_hidden_state), logits=np.asarray(out.logits))


def assert_same_outputs(actual: dict, expected: dict, atol: float = 1e-4):
    # HF computes padded positions too (padded keys masked), so every position is compared.
    for name in ("encoder", "decoder", "logits"):
        assert np.isfinite(actual[name]).all(), name  # assert_allclose would take NaN == NaN
        np.testing.assert_allclose(actual[name], expected[name], atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("model_type", sorted(REFERENCES))
def test_hf_checkpoint_loads_and_matches(model_type, tmp_path):
    reference = reference_model(model_type)
    reference.save_pretrained(tmp_path)
    model, variables = hf.load(tmp_path)
    assert isinstance(model, seq2seq.Seq2Seq)
    assert model.cfg.layer_norm == {"bart": "post", "mbart": "pre"}[model_type]
    assert (model.cfg.num_layers, model.cfg.num_decoder_layers, model.cfg.pad_token_id) == (2, 3, 1)
    batch = padded_batch()
    assert_same_outputs(bertjax_outputs(model, variables, batch), torch_outputs(reference, batch))


def perturbed_params(model, seed: int = 0) -> dict:
    """Random parameters of the model's shapes: N(0, 0.05), LayerNorm scales around 1 (numpy: nothing to compile)."""
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        centre = 1.0 if path[-1].key == "scale" else 0.0
        return (centre + rng.normal(0.0, 0.05, leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("layer_norm", ["post", "pre"])
def test_bertjax_model_saves_for_transformers(layer_norm, tmp_path):
    config = seq2seq.model_config("tiny")
    config.update(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"], num_heads=SHAPE["encoder_attention_heads"],
                  intermediate_size=SHAPE["encoder_ffn_dim"], num_layers=SHAPE["encoder_layers"], num_decoder_layers=SHAPE["decoder_layers"],
                  max_position_embeddings=SHAPE["max_position_embeddings"], layer_norm=layer_norm, pad_token_id=1, scale_embedding=layer_norm == "pre")
    model = seq2seq.Seq2Seq(seq2seq.Seq2SeqConfig.from_config(config))
    params = perturbed_params(model)
    hf.save(model, {"params": params}, tmp_path)
    reference_class = {"post": transformers.BartForConditionalGeneration, "pre": transformers.MBartForConditionalGeneration}[layer_norm]
    reference = reference_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = padded_batch(seed=1)
    assert_same_outputs(bertjax_outputs(model, {"params": params}, batch), torch_outputs(reference, batch))
    _, reloaded = hf.load(tmp_path)  # and back: every parameter bertjax has survives exactly
    jax.tree.map(np.testing.assert_array_equal, reloaded["params"], jax.device_get(params))


def test_convert_cli_both_ways(tmp_path):
    reference = reference_model("bart", seed=2)
    reference.save_pretrained(tmp_path / "hf")
    checkpoint_io.convert(str(tmp_path / "hf"), str(tmp_path / "workdir"))
    config, params = checkpoint_io.load_params(str(tmp_path / "workdir"))
    assert config.model.num_decoder_layers == 3
    checkpoint_io.convert(str(tmp_path / "workdir"), str(tmp_path / "back"))
    back = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    batch = padded_batch(seed=2)
    model = hf.model_for(config.model)
    assert_same_outputs(bertjax_outputs(model, {"params": params}, batch), torch_outputs(reference, batch))
    np.testing.assert_allclose(torch_outputs(back, batch)["logits"], torch_outputs(reference, batch)["logits"], atol=1e-6, rtol=0)


def tiny_model(**overrides):
    config = seq2seq.model_config("tiny")
    config.update({**dict(vocab_size=SHAPE["vocab_size"], hidden_size=32, num_heads=4, intermediate_size=64, max_position_embeddings=16), **overrides})
    return seq2seq.Seq2Seq(seq2seq.Seq2SeqConfig.from_config(config))


@pytest.mark.parametrize("overrides", [{}, {"layer_norm": "pre", "position_embedding": "sinusoidal", "scale_embedding": True}], ids=["bart", "pre-sinusoidal"])
def test_cached_decode_equals_full_forward(overrides):
    """Steps of 1 token (and one of 3) through the KV cache give the full forward's logits at every position."""
    model = tiny_model(**overrides)
    params = perturbed_params(model)
    input_ids, attention_mask, decoder_input_ids, _ = (jnp.asarray(x, jnp.int32) for x in padded_batch(seed=3))
    full = jax.jit(model.apply)({"params": params}, input_ids, attention_mask, decoder_input_ids).logits
    encoder_hidden = jax.jit(lambda *inputs: model.apply({"params": params}, *inputs, method=model.encode))(input_ids, attention_mask)
    init_cache = jax.jit(model.init_cache, static_argnums=2)
    cache = init_cache({"params": params}, encoder_hidden, TARGET_LENGTH + 2)

    @jax.jit
    def step(cache, ids):
        logits, mutated = model.apply({"params": params, "cache": cache}, ids, None, attention_mask, decode=True, method=model.decode, mutable=["cache"])
        return logits, mutated["cache"]

    pieces = []
    for start, stop in [(0, 1), (1, 4), (4, 5), (5, 6), (6, 7)]:
        logits, cache = step(cache, decoder_input_ids[:, start:stop])
        pieces.append(logits)
    assert int(cache["decoder"]["index"]) == TARGET_LENGTH and np.isfinite(full).all()
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)
    # The cache matters: decoding the last token from a fresh cache gives different logits.
    fresh, _ = step(init_cache({"params": params}, encoder_hidden, TARGET_LENGTH + 2), decoder_input_ids[:, -1:])
    assert np.abs(fresh - full[:, -1:]).max() > 1e-3


def test_decode_errors_name_the_fix():
    model = tiny_model()
    ids = jnp.ones((1, 4), jnp.int32)
    variables = {"params": perturbed_params(model)}
    with pytest.raises(ValueError, match="init_cache"):
        model.apply(variables, ids[:, :1], None, ids, decode=True, method=model.decode, mutable=["cache"])
    with pytest.raises(ValueError, match="max_target_length=17 exceeds model.max_position_embeddings=16"):
        model.init_cache(variables, jnp.zeros((1, 4, 32)), 17)


def test_every_parameter_has_logical_axes_the_rule_table_shards():
    model = tiny_model(layer_norm="pre", vocab_size=100)
    ids = jnp.ones((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids))["params"]
    flat = flax.traverse_util.flatten_dict(boxed)
    known = {getattr(axes, name) for name in dir(axes) if name.isupper()}
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), "/".join(path)
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= known, "/".join(path)
    mesh = jax.make_mesh((1, 2, 2), partitioning.MESH_AXES, devices=jax.devices()[:4])
    shardings = flax.traverse_util.flatten_dict(partitioning.param_shardings(boxed, mesh, partitioning.RULES["default"]))
    assert shardings[("decoder", "layer_1", "cross_attention", "query", "kernel")].spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert shardings[("word_embeddings", "embedding")].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
