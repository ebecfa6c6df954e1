"""HuggingFace interchange, checked against `transformers.BertForPreTraining` (PyTorch, CPU, float32) as the reference."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bertjax import models  # noqa: E402
from bertjax.convert import hf  # noqa: E402

# Two differently shaped configs: vocabulary, width, heads, depth and segment vocabulary all differ.
HF_CONFIGS = {
    "V99-H32-A4-L2-T2": dict(vocab_size=99, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37, type_vocab_size=2),
    "V120-H48-A3-L3-T3": dict(vocab_size=120, hidden_size=48, num_attention_heads=3, num_hidden_layers=3, intermediate_size=64, type_vocab_size=3),
}
LENGTH = 10


def reference_model(shape: dict, seed: int) -> "transformers.BertForPreTraining":
    """A random HF model; every parameter is perturbed so biases and LayerNorms are not at their 0/1 init."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(max_position_embeddings=64, attn_implementation="eager", **shape)
    model = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def padded_batch(shape: dict, seed: int = 0):
    """Three rows: full, right-padded, and mostly padding; segments use every token type."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, shape["vocab_size"], (3, LENGTH))
    token_type_ids = rng.integers(0, shape["type_vocab_size"], (3, LENGTH))
    attention_mask = np.ones((3, LENGTH), np.int64)
    attention_mask[1, 6:] = 0
    attention_mask[2, 2:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, token_type_ids, attention_mask


def torch_outputs(model, inputs):
    input_ids, token_type_ids, attention_mask = (torch.tensor(x) for x in inputs)
    with torch.no_grad():
        out = model(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, output_hidden_states=True
        )
    return [h.numpy() for h in out.hidden_states], out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()


def bertjax_outputs(model, variables, inputs):
    out = model.apply(variables, *(jnp.asarray(x, jnp.int32) for x in inputs))
    return [np.asarray(h) for h in out.hidden_states], np.asarray(out.mlm_logits), np.asarray(out.sentence_logits)


def assert_same_outputs(actual, expected, atol=1e-4):
    (hidden_a, mlm_a, sentence_a), (hidden_e, mlm_e, sentence_e) = actual, expected
    assert len(hidden_a) == len(hidden_e)
    for layer, (a, e) in enumerate(zip(hidden_a, hidden_e)):
        # HF computes padded positions too (with padded keys masked), so every position is compared.
        np.testing.assert_allclose(a, e, atol=atol, rtol=0, err_msg=f"hidden state {layer}")
    np.testing.assert_allclose(mlm_a, mlm_e, atol=atol, rtol=0, err_msg="MLM logits")
    np.testing.assert_allclose(sentence_a, sentence_e, atol=atol, rtol=0, err_msg="NSP logits")


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    shape = HF_CONFIGS[request.param]
    model = reference_model(shape, seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return directory, model, shape


def test_load_matches_transformers(hf_checkpoint):
    directory, reference, shape = hf_checkpoint
    model, variables = hf.load(directory)
    assert model.cfg.num_layers == shape["num_hidden_layers"] and model.cfg.type_vocab_size == shape["type_vocab_size"]
    assert not any(isinstance(leaf, nn.Partitioned) for leaf in jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    assert models.count_params(variables["params"]) == sum(p.numel() for p in reference.parameters())
    inputs = padded_batch(shape)
    assert_same_outputs(bertjax_outputs(model, variables, inputs), torch_outputs(reference, inputs))


def test_save_round_trips_through_from_pretrained(hf_checkpoint, tmp_path):
    directory, reference, shape = hf_checkpoint
    model, variables = hf.load(directory)
    hf.save(model, variables, tmp_path / "out")
    reloaded, info = transformers.BertForPreTraining.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager"
    )
    assert all(not info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    original = safetensors.numpy.load_file(directory / hf.WEIGHTS_FILE)
    written = safetensors.numpy.load_file(tmp_path / "out" / hf.WEIGHTS_FILE)
    assert written.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(written[name], original[name], err_msg=name)
    inputs = padded_batch(shape, seed=1)
    assert_same_outputs(torch_outputs(reloaded.eval(), inputs), torch_outputs(reference, inputs), atol=0)


def test_save_writes_a_freshly_initialised_bertjax_model(tmp_path):
    """bertjax -> HF from boxed (`model.init`) variables; the torch model then reproduces bertjax's outputs."""
    model_config = hf.config_from_hf({"model_type": "bert", **HF_CONFIGS["V99-H32-A4-L2-T2"], "max_position_embeddings": 16})
    model = models.BertForPreTraining(models.BertConfig.from_config(model_config))
    inputs = padded_batch(HF_CONFIGS["V99-H32-A4-L2-T2"])
    variables = model.init(jax.random.key(0), *(jnp.asarray(x) for x in inputs))
    hf.save(model, variables, tmp_path)
    reloaded = transformers.BertForPreTraining.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_same_outputs(bertjax_outputs(model, variables, inputs), torch_outputs(reloaded, inputs))


def test_save_refuses_what_hf_bert_cannot_hold(tmp_path):
    model_config = hf.config_from_hf({"model_type": "bert", **HF_CONFIGS["V99-H32-A4-L2-T2"]})
    model_config.position_embedding = "sinusoidal"
    model = models.BertForPreTraining(models.BertConfig.from_config(model_config))
    with pytest.raises(hf.HFCheckpointError, match="sinusoidal"):
        hf.save(model, {"params": {}}, tmp_path)


def rewrite_weights(directory, edit):
    path = directory / hf.WEIGHTS_FILE
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def small_checkpoint(tmp_path):
    reference_model(HF_CONFIGS["V99-H32-A4-L2-T2"], seed=0).save_pretrained(tmp_path)
    return tmp_path


def test_missing_tensor_is_named(small_checkpoint):
    rewrite_weights(small_checkpoint, lambda t: t.pop("bert.encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(hf.HFCheckpointError, match=r"bert\.encoder\.layer\.1\.attention\.self\.key\.bias is missing"):
        hf.load(small_checkpoint)


def test_wrong_shape_is_named(small_checkpoint):
    def widen(tensors):
        tensors["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((40, 32), np.float32)

    rewrite_weights(small_checkpoint, widen)
    with pytest.raises(hf.HFCheckpointError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight has shape \(40, 32\)"):
        hf.load(small_checkpoint)


def test_config_disagreeing_with_weights_is_caught(small_checkpoint):
    config_path = small_checkpoint / hf.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["vocab_size"] = 100
    config_path.write_text(json.dumps(config))
    with pytest.raises(hf.HFCheckpointError, match=r"word_embeddings\.weight has shape \(99, 32\).*\(100, 32\)"):
        hf.load(small_checkpoint)


def test_old_names_gamma_beta_and_decoder_are_read(small_checkpoint):
    reference = hf.load(small_checkpoint)[1]

    def rename(tensors):
        for name in [n for n in tensors if "LayerNorm" in n]:
            tensors[name.replace(".weight", ".gamma").replace(".bias", ".beta")] = tensors.pop(name)
        tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
        tensors["cls.predictions.decoder.bias"] = tensors.pop("cls.predictions.bias")

    rewrite_weights(small_checkpoint, rename)
    loaded = hf.load(small_checkpoint)[1]
    jax.tree.map(np.testing.assert_array_equal, loaded, reference)


@pytest.mark.parametrize(
    "config, match",
    [
        (None, "no config.json"),
        ({"model_type": "gpt2", "vocab_size": 10}, "model_type='gpt2', not a BERT checkpoint"),
        ({**HF_CONFIGS["V99-H32-A4-L2-T2"], "model_type": "bert", "hidden_act": "relu"}, "hidden_act='relu'"),
        ({**HF_CONFIGS["V99-H32-A4-L2-T2"], "model_type": "bert", "num_attention_heads": 5}, r"model\.hidden_size=32.*num_heads=5"),
    ],
)
def test_not_a_bert_directory(tmp_path, config, match):
    if config is not None:
        (tmp_path / hf.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(hf.HFCheckpointError, match=match):
        hf.load(tmp_path)


def test_pickle_only_directory_is_refused_unread(tmp_path):
    (tmp_path / hf.CONFIG_FILE).write_text(json.dumps({"model_type": "bert", **HF_CONFIGS["V99-H32-A4-L2-T2"]}))
    # Not a valid pickle: any attempt to unpickle it would raise an UnpicklingError instead of our message.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x05not a pickle")
    with pytest.raises(hf.HFCheckpointError, match=r"pytorch_model\.bin.*never unpickles"):
        hf.load(tmp_path)


def test_config_from_hf_gives_a_model_config():
    model_config = hf.config_from_hf({"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                                      "num_attention_heads": 12, "intermediate_size": 3072})
    assert model_config.size == "base"
    assert (model_config.num_layers, model_config.max_position_embeddings, model_config.type_vocab_size) == (12, 512, 2)
    assert set(model_config.keys()) == set(hf.config_lib.model_config().keys())
    assert hf.hf_config_from(models.BertConfig.from_config(model_config))["num_hidden_layers"] == 12
    cfg = models.BertConfig.from_config(model_config)
    # The name table covers every parameter of the model, each once.
    paths = [tensor.path for tensor in hf.tensor_map(cfg)]
    assert len(paths) == len(set(paths)) and set(paths) == set(hf.param_shapes(models.BertForPreTraining(cfg)))


def test_convert_verb_round_trips_hf_to_workdir_and_back(small_checkpoint, tmp_path, capsys):
    """`bertjax convert` both ways: HF dir -> bertjax workdir (orbax) -> HF dir gives back the same tensors and vocab."""
    from bertjax import cli
    from bertjax import checkpoint_io

    (small_checkpoint / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    workdir, exported = tmp_path / "workdir", tmp_path / "exported"
    cli.main(["convert", "--from", str(small_checkpoint), "--to", str(workdir)])
    config, params = checkpoint_io.load_params(str(workdir))
    assert config.model.vocab_size == 99 and config.model.size == "custom"
    assert (workdir / checkpoint_io.TOKENIZER / "vocab.txt").exists()
    cli.main(["convert", "--from", str(workdir), "--to", str(exported)])
    assert "wrote HuggingFace checkpoint" in capsys.readouterr().out
    original = safetensors.numpy.load_file(small_checkpoint / hf.WEIGHTS_FILE)
    written = safetensors.numpy.load_file(exported / hf.WEIGHTS_FILE)
    assert written.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(written[name], original[name], err_msg=name)
    assert (exported / "vocab.txt").read_text() == (small_checkpoint / "vocab.txt").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint_io.convert(str(small_checkpoint), str(workdir))


@pytest.mark.parametrize("verb", ["convert", "generate"])
def test_an_unusable_hf_directory_is_one_line_and_exit_1(tmp_path, capsys, verb):
    """HFCheckpointError is a UserError: every verb that reads an HF directory prints it as one line, no traceback."""
    from bertjax import cli

    source = tmp_path / "t5"
    source.mkdir()
    (source / hf.CONFIG_FILE).write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    (source / hf.WEIGHTS_FILE).write_bytes(b"")
    args = ["--from", str(source), "--to", str(tmp_path / "out")] if verb == "convert" else ["--workdir", str(source)]
    assert cli.main([verb, *args]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"bertjax {verb}: ") and "model_type='t5'" in error and "Traceback" not in error
    assert len(error.splitlines()) == 1
