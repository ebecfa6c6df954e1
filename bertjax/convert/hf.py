"""HuggingFace `transformers` checkpoints <-> bertjax parameters: BERT and BART.

    model, variables = hf.load("path/to/hf_dir")      # config.json + model.safetensors
    hf.save(model, variables, "path/to/out_dir")       # BertForPreTraining.from_pretrained reads it

config.json's model_type chooses the model: 'bert' (BertForPreTraining) gives a
`models.BertForPreTraining`, 'bart' (BartForConditionalGeneration, post-LN) and 'mbart'
(MBartForConditionalGeneration, pre-LN with a final LayerNorm on each stack) a `models.seq2seq.Seq2Seq`.
BART's learned position tables have two rows HF never reads (its positions start at row 2): load
drops them and save writes them as zeros.

Weights are read and written with `safetensors.numpy` only: a pickled checkpoint (pytorch_model.bin)
is refused, never unpickled, because unpickling runs arbitrary code. `transformers` itself is not
needed. One table (`tensor_map`) names every tensor in both directions.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy

from bertjax import config as config_lib
from bertjax.errors import UserError
from bertjax.models import BertConfig, BertForPreTraining
from bertjax.models import seq2seq
from bertjax.models.seq2seq import Seq2Seq, Seq2SeqConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # a checkpoint sharded over several files
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Tensors HF writes that hold no parameter (the position-id buffer of older versions).
IGNORED_TENSORS = ("bert.embeddings.position_ids",)
# The word-embedding table of each family, and the copies of it HF may write besides; bertjax ties them all.
WORD_EMBEDDINGS = {"bert": "bert.embeddings.word_embeddings.weight", "bart": "model.shared.weight"}
TIED_DECODERS = {
    "bert": ("cls.predictions.decoder.weight",),
    "bart": ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"),
}
# Tensors HF itself loads as zeros when a checkpoint lacks them (BartForConditionalGeneration's _keys_to_ignore_on_load_missing).
ZERO_WHEN_MISSING = ("final_logits_bias",)
BART_POSITION_OFFSET = 2  # HF's BartLearnedPositionalEmbedding reads row position + 2
SEQ2SEQ_TYPES = {"bart": ("post", "BartForConditionalGeneration"), "mbart": ("pre", "MBartForConditionalGeneration")}
DECODER_BIAS_ALIAS = ("cls.predictions.decoder.bias", "cls.predictions.bias")
# Older checkpoints (the original TF conversion) name LayerNorm parameters gamma/beta.
LAYER_NORM_ALIASES = {".gamma": ".weight", ".beta": ".bias"}


class HFCheckpointError(UserError, ValueError):
    """A directory that is not a usable HuggingFace checkpoint (BERT, BART or mBART); the message names the
    file and tensor. A UserError: every verb prints it as one line."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf_name: str
    path: tuple[str, ...]  # in the bertjax parameter tree
    hf_shape: tuple[int, ...]
    transpose: bool  # torch Linear weights are [out, in]; Flax kernels are [in, ...out]
    skipped_rows: int = 0  # leading rows HF keeps and never reads (BART's position offset)


def linear(hf_prefix: str, path: tuple[str, ...], out_features: int, in_features: int) -> list[TensorMap]:
    return [
        TensorMap(f"{hf_prefix}.weight", (*path, "kernel"), (out_features, in_features), True),
        TensorMap(f"{hf_prefix}.bias", (*path, "bias"), (out_features,), False),
    ]


def norm(hf_prefix: str, path: tuple[str, ...], features: int) -> list[TensorMap]:
    return [
        TensorMap(f"{hf_prefix}.weight", (*path, "scale"), (features,), False),
        TensorMap(f"{hf_prefix}.bias", (*path, "bias"), (features,), False),
    ]


def embedding(hf_name: str, path: tuple[str, ...], rows: int, features: int, skipped_rows: int = 0) -> TensorMap:
    return TensorMap(hf_name, (*path, "embedding"), (rows + skipped_rows, features), False, skipped_rows)


def tensor_map(cfg: BertConfig) -> list[TensorMap]:
    """Every tensor of the HF model of `cfg` (BertForPreTraining, or for a Seq2SeqConfig a
    BartForConditionalGeneration) and where it lives in bertjax's parameter tree."""
    if isinstance(cfg, Seq2SeqConfig):
        return bart_tensor_map(cfg)
    if cfg.position_embedding != "learned" or cfg.layer_norm != "post":
        raise HFCheckpointError(
            f"a HuggingFace BERT has learned positions and post-LN; this model has "
            f"position_embedding={cfg.position_embedding!r}, layer_norm={cfg.layer_norm!r}"
        )
    hidden, intermediate = cfg.hidden_size, cfg.intermediate_size
    embeddings = ("encoder", "embeddings")
    tensors = [
        embedding("bert.embeddings.word_embeddings.weight", (*embeddings, "word_embeddings"), cfg.vocab_size, hidden),
        embedding("bert.embeddings.position_embeddings.weight", (*embeddings, "position_embeddings"), cfg.max_position_embeddings, hidden),
        embedding("bert.embeddings.token_type_embeddings.weight", (*embeddings, "token_type_embeddings"), cfg.type_vocab_size, hidden),
        *norm("bert.embeddings.LayerNorm", (*embeddings, "LayerNorm"), hidden),
    ]
    for i in range(cfg.num_layers):
        hf_layer, layer = f"bert.encoder.layer.{i}", ("encoder", f"layer_{i}")
        for projection in ("query", "key", "value"):
            tensors += linear(f"{hf_layer}.attention.self.{projection}", (*layer, "attention", projection), hidden, hidden)
        tensors += linear(f"{hf_layer}.attention.output.dense", (*layer, "attention", "output"), hidden, hidden)
        tensors += norm(f"{hf_layer}.attention.output.LayerNorm", (*layer, "attention_layer_norm"), hidden)
        tensors += linear(f"{hf_layer}.intermediate.dense", (*layer, "mlp", "intermediate"), intermediate, hidden)
        tensors += linear(f"{hf_layer}.output.dense", (*layer, "mlp", "output"), hidden, intermediate)
        tensors += norm(f"{hf_layer}.output.LayerNorm", (*layer, "mlp_layer_norm"), hidden)
    tensors += linear("bert.pooler.dense", ("pooler", "dense"), hidden, hidden)
    tensors += linear("cls.predictions.transform.dense", ("mlm", "transform"), hidden, hidden)
    tensors += norm("cls.predictions.transform.LayerNorm", ("mlm", "LayerNorm"), hidden)
    tensors.append(TensorMap("cls.predictions.bias", ("mlm", "bias"), (cfg.vocab_size,), False))
    tensors += linear("cls.seq_relationship", ("sentence",), 2, hidden)
    return tensors


def bart_tensor_map(cfg: Seq2SeqConfig) -> list[TensorMap]:
    """Every tensor of a HF (M)BartForConditionalGeneration: post-LN is BART's layout, pre-LN mBART's."""
    if cfg.position_embedding != "learned":
        raise HFCheckpointError(f"a HuggingFace BART has learned positions; this model has position_embedding={cfg.position_embedding!r}")
    hidden, intermediate = cfg.hidden_size, cfg.intermediate_size
    tensors = [
        embedding("model.shared.weight", ("word_embeddings",), cfg.vocab_size, hidden),
        TensorMap("final_logits_bias", ("lm_head", "bias"), (1, cfg.vocab_size), False),
    ]

    def attention(hf_prefix: str, path: tuple[str, ...]) -> list[TensorMap]:
        projections = [("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "output")]
        return [tensor for hf_name, name in projections for tensor in linear(f"{hf_prefix}.{hf_name}", (*path, name), hidden, hidden)]

    for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        hf_stack = f"model.{stack}"
        tensors.append(
            embedding(f"{hf_stack}.embed_positions.weight", (stack, "embeddings", "position_embeddings"), cfg.max_position_embeddings, hidden, BART_POSITION_OFFSET)
        )
        tensors += norm(f"{hf_stack}.layernorm_embedding", (stack, "embeddings", "LayerNorm"), hidden)
        for i in range(layers):
            hf_layer, layer = f"{hf_stack}.layers.{i}", (stack, f"layer_{i}")
            if stack == "encoder":
                tensors += attention(f"{hf_layer}.self_attn", (*layer, "attention"))
                tensors += norm(f"{hf_layer}.self_attn_layer_norm", (*layer, "attention_layer_norm"), hidden)
            else:
                tensors += attention(f"{hf_layer}.self_attn", (*layer, "self_attention"))
                tensors += norm(f"{hf_layer}.self_attn_layer_norm", (*layer, "self_attention_layer_norm"), hidden)
                tensors += attention(f"{hf_layer}.encoder_attn", (*layer, "cross_attention"))
                tensors += norm(f"{hf_layer}.encoder_attn_layer_norm", (*layer, "cross_attention_layer_norm"), hidden)
            tensors += linear(f"{hf_layer}.fc1", (*layer, "mlp", "intermediate"), intermediate, hidden)
            tensors += linear(f"{hf_layer}.fc2", (*layer, "mlp", "output"), hidden, intermediate)
            tensors += norm(f"{hf_layer}.final_layer_norm", (*layer, "mlp_layer_norm"), hidden)
        if cfg.layer_norm == "pre":
            tensors += norm(f"{hf_stack}.layer_norm", (stack, "final_layer_norm"), hidden)
    return tensors


def to_bertjax(tensor: TensorMap, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = array.T if tensor.transpose else array[tensor.skipped_rows :]
    return np.ascontiguousarray(array.reshape(shape), dtype=np.float32)


def to_hf(tensor: TensorMap, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if tensor.transpose:
        return np.ascontiguousarray(array.reshape(tensor.hf_shape[::-1]).T)
    if tensor.skipped_rows:
        array = np.concatenate([np.zeros((tensor.skipped_rows, *array.shape[1:]), np.float32), array])
    return np.ascontiguousarray(array.reshape(tensor.hf_shape))


def param_shapes(model: BertForPreTraining | Seq2Seq) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The model's parameter shapes by path, from an abstract init (nothing is allocated)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids))
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
    return {path: leaf.shape for path, leaf in flat.items()}


# ----------------------------------------------------------------------------------------- config


HF_CONFIG_KEYS = {  # HF config.json key -> (config.model key, HF's default when absent)
    "vocab_size": ("vocab_size", None),
    "hidden_size": ("hidden_size", None),
    "num_hidden_layers": ("num_layers", None),
    "num_attention_heads": ("num_heads", None),
    "intermediate_size": ("intermediate_size", None),
    "type_vocab_size": ("type_vocab_size", 2),
    "max_position_embeddings": ("max_position_embeddings", 512),
    "layer_norm_eps": ("layer_norm_eps", 1e-12),
    "hidden_dropout_prob": ("hidden_dropout", 0.1),
    "attention_probs_dropout_prob": ("attention_dropout", 0.1),
    "initializer_range": ("initializer_range", 0.02),
}


def config_from_hf(hf_config: dict, source: str = CONFIG_FILE) -> ml_collections.ConfigDict:
    """A `config.model` ConfigDict from a HF BERT or (M)BART config.json dict; `source` names the file in errors."""
    model_type = hf_config.get("model_type")
    if model_type in SEQ2SEQ_TYPES:
        return bart_config_from_hf(hf_config, source)
    if model_type != "bert":
        raise HFCheckpointError(
            f"{source}: model_type={model_type!r}, not a BERT checkpoint (expected 'bert') nor a BART one ({' or '.join(map(repr, SEQ2SEQ_TYPES))})"
        )
    checks = {"hidden_act": ("gelu", None), "position_embedding_type": ("absolute", None)}  # None: HF's default
    for key, allowed in checks.items():
        if hf_config.get(key) not in allowed:
            raise HFCheckpointError(f"{source}: {key}={hf_config.get(key)!r} is not supported (bertjax's BERT has {allowed[0]!r})")
    model = config_lib.model_config()
    for hf_key, (key, default) in HF_CONFIG_KEYS.items():
        value = hf_config.get(hf_key, default)
        if value is None:
            raise HFCheckpointError(f"{source}: lacks {hf_key!r}")
        model[key] = value
    model.position_embedding = "learned"
    model.layer_norm = "post"
    size = (model.num_layers, model.hidden_size, model.num_heads)
    model.size = next((name for name, shape in config_lib.SIZES.items() if shape == size), "custom")
    try:
        config_lib.validate(ml_collections.ConfigDict({"model": model}))
    except config_lib.ConfigError as error:
        raise HFCheckpointError(f"{source}: {error}") from error
    return model


BART_CONFIG_KEYS = {  # HF config.json key -> (config.model key, HF's default when absent)
    "vocab_size": ("vocab_size", None),
    "d_model": ("hidden_size", None),
    "encoder_layers": ("num_layers", None),
    "decoder_layers": ("num_decoder_layers", None),
    "encoder_attention_heads": ("num_heads", None),
    "encoder_ffn_dim": ("intermediate_size", None),
    "max_position_embeddings": ("max_position_embeddings", 1024),
    "dropout": ("hidden_dropout", 0.1),
    "attention_dropout": ("attention_dropout", 0.0),
    "init_std": ("initializer_range", 0.02),
    "pad_token_id": ("pad_token_id", 1),
    "bos_token_id": ("bos_token_id", 0),
    "eos_token_id": ("eos_token_id", 2),
    "decoder_start_token_id": ("decoder_start_token_id", 2),
    "scale_embedding": ("scale_embedding", False),
}
# The decoder's shapes bertjax keeps equal to the encoder's (one Layer config for both stacks).
BART_SAME_AS_ENCODER = {"decoder_attention_heads": "encoder_attention_heads", "decoder_ffn_dim": "encoder_ffn_dim"}
BART_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which (M)BART uses


def bart_config_from_hf(hf_config: dict, source: str) -> ml_collections.ConfigDict:
    """A seq2seq `config.model` from a HF BART ('post'-LN) or mBART ('pre'-LN) config.json dict.

    activation_dropout (dropout inside the feed-forward block, training only) has no bertjax counterpart.
    """
    if hf_config.get("activation_function", "gelu") != "gelu":
        raise HFCheckpointError(f"{source}: activation_function={hf_config['activation_function']!r} is not supported (bertjax's BART has 'gelu')")
    for decoder_key, encoder_key in BART_SAME_AS_ENCODER.items():
        if decoder_key in hf_config and hf_config[decoder_key] != hf_config.get(encoder_key):
            raise HFCheckpointError(
                f"{source}: {decoder_key}={hf_config[decoder_key]} differs from {encoder_key}={hf_config.get(encoder_key)}; bertjax's seq2seq needs them equal"
            )
    if hf_config.get("decoder_start_token_id") is None:  # mBART's: HF generate then starts with bos_token_id
        hf_config = {**hf_config, "decoder_start_token_id": hf_config.get("bos_token_id", BART_CONFIG_KEYS["bos_token_id"][1])}
    model = seq2seq.model_config()
    for hf_key, (key, default) in BART_CONFIG_KEYS.items():
        value = hf_config.get(hf_key, default)
        if value is None:
            raise HFCheckpointError(f"{source}: lacks {hf_key!r}")
        model[key] = value
    model.layer_norm = SEQ2SEQ_TYPES[hf_config["model_type"]][0]
    model.layer_norm_eps = BART_LAYER_NORM_EPS
    model.position_embedding = "learned"
    size = (model.num_layers, model.hidden_size, model.num_heads)
    shaped = model.num_decoder_layers == model.num_layers and model.intermediate_size == 4 * model.hidden_size
    model.size = next((name for name, shape in seq2seq.SIZES.items() if shaped and shape == size), "custom")
    try:
        config_lib.validate(ml_collections.ConfigDict({"model": model}))
    except config_lib.ConfigError as error:
        raise HFCheckpointError(f"{source}: {error}") from error
    return model


def hf_config_from(cfg: BertConfig) -> dict:
    """The config.json of the HF model with this model's shape (BertForPreTraining, or (M)BartForConditionalGeneration)."""
    if isinstance(cfg, Seq2SeqConfig):
        return bart_hf_config_from(cfg)
    hf_config = {"architectures": ["BertForPreTraining"], "model_type": "bert", "hidden_act": "gelu"}
    hf_config.update({hf_key: getattr(cfg, key) for hf_key, (key, _) in HF_CONFIG_KEYS.items()})
    hf_config.update(position_embedding_type="absolute", pad_token_id=0, tie_word_embeddings=True)
    return hf_config


def bart_hf_config_from(cfg: Seq2SeqConfig) -> dict:
    model_type = next(name for name, (layer_norm, _) in SEQ2SEQ_TYPES.items() if layer_norm == cfg.layer_norm)
    hf_config = {"architectures": [SEQ2SEQ_TYPES[model_type][1]], "model_type": model_type, "activation_function": "gelu"}
    hf_config.update({hf_key: getattr(cfg, key) for hf_key, (key, _) in BART_CONFIG_KEYS.items()})
    hf_config.update({decoder_key: hf_config[encoder_key] for decoder_key, encoder_key in BART_SAME_AS_ENCODER.items()})
    hf_config.update(activation_dropout=0.0, is_encoder_decoder=True, tie_word_embeddings=True, forced_eos_token_id=None)
    return hf_config


def model_for(model_config) -> BertForPreTraining | Seq2Seq:
    """The bertjax model a `config.model` describes: a Seq2Seq when it has decoder layers, else BERT."""
    if "num_decoder_layers" in model_config:
        return Seq2Seq(Seq2SeqConfig.from_config(model_config))
    return BertForPreTraining(BertConfig.from_config(model_config))


# ------------------------------------------------------------------------------------------- load


def read_weights(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors (or its shards); a pickle-only directory is refused."""
    if (hf_dir / WEIGHTS_INDEX_FILE).exists():
        index = json.loads((hf_dir / WEIGHTS_INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
    elif (hf_dir / WEIGHTS_FILE).exists():
        shards = [WEIGHTS_FILE]
    else:
        pickles = sorted(path.name for path in hf_dir.iterdir() if path.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise HFCheckpointError(
                f"{hf_dir} holds only pickled weights ({', '.join(pickles)}); bertjax reads {WEIGHTS_FILE} only and never "
                f"unpickles a file (unpickling runs arbitrary code). Convert it where you trust the file: "
                f"BertForPreTraining.from_pretrained(dir).save_pretrained(dir) writes {WEIGHTS_FILE}."
            )
        raise HFCheckpointError(f"{hf_dir} has no {WEIGHTS_FILE}")
    tensors = {}
    for shard in shards:
        tensors.update(safetensors.numpy.load_file(hf_dir / shard))
    return tensors


def canonical_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename the aliases older checkpoints use (gamma/beta, decoder.bias) to today's names."""
    renamed = {}
    for name, array in tensors.items():
        for old, new in LAYER_NORM_ALIASES.items():
            if "LayerNorm" in name and name.endswith(old):
                name = name[: -len(old)] + new
        if name == DECODER_BIAS_ALIAS[0]:
            name = DECODER_BIAS_ALIAS[1]
        renamed[name] = array
    return renamed


def params_from_hf(tensors: dict[str, np.ndarray], model: BertForPreTraining | Seq2Seq, source: str) -> dict:
    """The bertjax parameter tree (plain float32 arrays) from HF tensors; errors name the tensor."""
    tensors = canonical_names(tensors)
    family = "bart" if isinstance(model.cfg, Seq2SeqConfig) else "bert"
    table_name = WORD_EMBEDDINGS[family]
    if table_name not in tensors:  # a checkpoint that kept only one of the tied copies
        copy = next((name for name in TIED_DECODERS[family] if name in tensors), None)
        if copy is not None:
            tensors[table_name] = tensors[copy]
    shapes = param_shapes(model)
    flat = {}
    for tensor in tensor_map(model.cfg):
        if tensor.hf_name not in tensors and tensor.hf_name in ZERO_WHEN_MISSING:
            tensors[tensor.hf_name] = np.zeros(tensor.hf_shape, np.float32)
        if tensor.hf_name not in tensors:
            raise HFCheckpointError(f"{source}: tensor {tensor.hf_name} is missing")
        array = tensors.pop(tensor.hf_name)
        if array.shape != tensor.hf_shape:
            raise HFCheckpointError(
                f"{source}: tensor {tensor.hf_name} has shape {array.shape}, but config.json implies {tensor.hf_shape}"
            )
        flat[tensor.path] = jnp.asarray(to_bertjax(tensor, array, shapes[tensor.path]))
    word_embeddings = next(np.asarray(flat[tensor.path]) for tensor in tensor_map(model.cfg) if tensor.hf_name == table_name)
    for name in TIED_DECODERS[family]:
        copy = tensors.pop(name, None)
        if copy is not None and not np.array_equal(copy, word_embeddings):
            raise HFCheckpointError(f"{source}: tensor {name} differs from the word embeddings; bertjax ties them")
    unexpected = sorted(name for name in tensors if name not in IGNORED_TENSORS)
    if unexpected:
        architecture = hf_config_from(model.cfg)["architectures"][0]
        raise HFCheckpointError(f"{source}: tensors a {architecture} does not have: {', '.join(unexpected)}")
    return flax.traverse_util.unflatten_dict(flat)


def read_config(hf_dir: pathlib.Path) -> ml_collections.ConfigDict:
    """The `config.model` of a HF checkpoint directory."""
    if not hf_dir.is_dir():
        raise HFCheckpointError(f"{hf_dir} is not a directory")
    config_path = hf_dir / CONFIG_FILE
    if not config_path.exists():
        raise HFCheckpointError(f"{hf_dir} has no {CONFIG_FILE}: not a HuggingFace checkpoint directory")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise HFCheckpointError(f"{config_path}: not valid JSON ({error})") from error
    return config_from_hf(hf_config, source=str(config_path))


def load(hf_dir: str | pathlib.Path) -> tuple[BertForPreTraining | Seq2Seq, dict]:
    """(model, {'params': plain float32 arrays}) from a directory of `BertForPreTraining.save_pretrained`
    (a BertForPreTraining) or of `(M)BartForConditionalGeneration.save_pretrained` (a Seq2Seq)."""
    hf_dir = pathlib.Path(hf_dir)
    model = model_for(read_config(hf_dir))
    params = params_from_hf(read_weights(hf_dir), model, source=str(hf_dir))
    return model, {"params": params}


# ------------------------------------------------------------------------------------------- save


def save(model: BertForPreTraining | Seq2Seq, variables: dict, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write config.json + model.safetensors that `transformers.BertForPreTraining.from_pretrained` loads
    (for a Seq2Seq: `BartForConditionalGeneration`, or `MBartForConditionalGeneration` when pre-LN).

    `variables` is {'params': ...} or the parameter tree itself, boxed or plain.
    """
    params = nn.meta.unbox(variables.get("params", variables))
    flat = flax.traverse_util.flatten_dict(jax.device_get(params))
    tensors = {tensor.hf_name: to_hf(tensor, flat[tensor.path]) for tensor in tensor_map(model.cfg)}
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(hf_config_from(model.cfg), indent=2) + "\n")
    safetensors.numpy.save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    return out_dir


# ---------------------------------------------------------------------------------------- convert


def is_hf_dir(path: pathlib.Path) -> bool:
    """Whether `path` looks like a HF checkpoint directory (a config.json with a model_type, or HF weight files)."""
    if not (path / CONFIG_FILE).exists():
        return False
    return "model_type" in json.loads((path / CONFIG_FILE).read_text()) or any(
        (path / name).exists() for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE, "pytorch_model.bin")
    )


def copy_tokenizer_files(source_dir: pathlib.Path, target_dir: pathlib.Path) -> list[str]:
    """Copy the WordPiece tokenizer files (those HF's BertTokenizer and bertjax both read) that exist."""
    copied = [name for name in TOKENIZER_FILES if (source_dir / name).exists()]
    if copied:
        target_dir.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copy(source_dir / name, target_dir / name)
    return copied
