"""The BERT encoder: embeddings (token + segment + position) and a stack of Transformer layers.

Parameters are float32 and carry logical axis names (`bertjax.models.axes`) so that
`bertjax.train.partitioning` can shard them without touching this module; the compute dtype is
`BertConfig.dtype`. The parameter tree names are a contract (see `encoder_layer_index` and the
HuggingFace name map in `bertjax.convert.hf`):

    embeddings/{word_embeddings, position_embeddings (learned only), token_type_embeddings, LayerNorm}
    layer_i/{attention/{query, key, value, output}, attention_layer_norm,
             mlp/{intermediate, output}, mlp_layer_norm}
    final_layer_norm (pre-LN only)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bertjax.models.axes import BATCH, EMBED, HEADS, KV, LENGTH, MLP, POSITIONS, TYPES, VOCAB

ACTIVATION_AXES = (BATCH, LENGTH, EMBED)

# jax.nn.dot_product_attention's `implementation` for each config value.
ATTENTION_IMPLEMENTATIONS = {"xla": "xla", "cudnn": "cudnn", "auto": None}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The model's hyperparameters: `config.model` as a hashable value a Flax module can hold."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    type_vocab_size: int = 2
    max_position_embeddings: int = 512
    position_embedding: str = "learned"  # 'learned' | 'sinusoidal'
    layer_norm: str = "post"  # 'post' (BERT) | 'pre'
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"  # compute dtype; parameters are always float32
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_implementation: str = "xla"  # 'xla' | 'cudnn' | 'auto'
    dense_backward: str = "xla"  # 'xla' | 'transpose': see `dense`
    initializer_range: float = 0.02

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict | dict) -> BertConfig:
        """Build from `config.model`; keys that are not model hyperparameters (e.g. `size`) are ignored."""
        values = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
        fields = {field.name for field in dataclasses.fields(cls)}
        missing = sorted(field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING and field.name not in values)
        if missing:
            raise KeyError(f"config.model lacks {missing}")
        return cls(**{key: value for key, value in values.items() if key in fields})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)


def normal_init(cfg: BertConfig, axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes)


def zeros_init(axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


@jax.custom_vjp
def _dense_product(inputs: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))


def _dense_product_forward(inputs, kernel):
    return _dense_product(inputs, kernel), (inputs, kernel)


def _dense_product_backward(residuals, grad):
    inputs, kernel = residuals
    grad_inputs = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
    # The kernel's gradient X^T dY with the transpose of X written out first: XLA:CPU otherwise contracts
    # dimension 0 of both operands, which on some CPUs is 1.3-1.5x slower than a transpose and a plain matmul
    # at BERT's MLP shapes, on others faster (experiments/seq2seq_train_speed). The barrier keeps XLA from
    # folding the transpose back into the dot.
    flat_inputs = inputs.reshape(-1, inputs.shape[-1])
    grad_kernel = jax.lax.optimization_barrier(flat_inputs.T) @ grad.reshape(-1, grad.shape[-1])
    return grad_inputs, grad_kernel


_dense_product.defvjp(_dense_product_forward, _dense_product_backward)


def _transposed_backward_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`nn.Dense`'s dot_general with `_dense_product`'s backward (same product, same forward)."""
    if kwargs or precision is not None or preferred_element_type is not None or dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kwargs)
    return _dense_product(lhs, rhs)


def dense(cfg: BertConfig, features: int, axes: tuple[str, str], name: str | None = None) -> nn.Dense:
    """A Dense layer with BERT's init and logical axes (input axis, output axis) on its kernel.

    `cfg.dense_backward='transpose'` computes the kernel's gradient as a written-out transpose and a plain
    matmul (`_dense_product`) instead of XLA's dimension-0 contraction: the same numbers, and faster or
    slower by CPU (1.10x faster on one development machine, 0.7-0.9x on an AMD EPYC one, in the small
    seq2seq step: experiments/seq2seq_train_speed), hence opt-in. Its custom VJP has no forward-mode
    derivative: `jax.jvp` or a Hessian needs 'xla', the default."""
    return nn.Dense(
        features,
        dtype=cfg.compute_dtype,
        kernel_init=normal_init(cfg, axes),
        bias_init=zeros_init(axes[-1:]),
        dot_general=_transposed_backward_dot_general if cfg.dense_backward == "transpose" else None,
        name=name,
    )


def layer_norm(cfg: BertConfig, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.compute_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (EMBED,)),
        bias_init=zeros_init((EMBED,)),
        name=name,
    )


def gelu(x: jax.Array) -> jax.Array:
    """The exact erf GELU of BERT (HuggingFace's "gelu"), not the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def sinusoidal_positions(length: int, features: int, start: int | jax.Array = 0) -> jax.Array:
    """Vaswani et al.'s table for positions start..start+length-1 (`start` may be traced: a decode step):
    sin on even features, cos on odd ones; [length, features] float32."""
    positions = (start + jnp.arange(length, dtype=jnp.float32))[:, None]
    frequencies = jnp.exp(-math.log(10000.0) * jnp.arange(0, features, 2, dtype=jnp.float32) / features)
    angles = positions * frequencies[None, :]
    table = jnp.zeros((length, features), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(angles))
    return table.at[:, 1::2].set(jnp.cos(angles[:, : features // 2]))


class Embeddings(nn.Module):
    """Word + segment + position embeddings, then LayerNorm and dropout."""

    cfg: BertConfig

    def setup(self):
        cfg = self.cfg
        self.word_embeddings = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            embedding_init=normal_init(cfg, (VOCAB, EMBED)),
        )
        if cfg.position_embedding == "learned":
            self.position_embeddings = nn.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                dtype=cfg.compute_dtype,
                embedding_init=normal_init(cfg, (POSITIONS, EMBED)),
            )
        self.token_type_embeddings = nn.Embed(
            cfg.type_vocab_size,
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            embedding_init=normal_init(cfg, (TYPES, EMBED)),
        )
        self.LayerNorm = layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        length = input_ids.shape[-1]
        if cfg.position_embedding == "learned":
            if length > cfg.max_position_embeddings:
                raise ValueError(f"sequence length {length} exceeds model.max_position_embeddings={cfg.max_position_embeddings}")
            positions = self.position_embeddings(jnp.arange(length))
        else:  # computed for any length: a model trained on short sequences can be run on longer ones
            positions = sinusoidal_positions(length, cfg.hidden_size).astype(cfg.compute_dtype)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + positions[None]
        x = self.dropout(self.LayerNorm(x), deterministic=deterministic)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class Attention(nn.Module):
    """Multi-head attention through jax.nn.dot_product_attention.

    Self-attention over `x`, or cross-attention when `key_value` (the encoder's output) is given;
    `attention_mask` [B, K] marks the keys that are not padding. `causal` (a decoder's self-attention)
    lets each query see only the keys at or before its own position.

    With attention dropout active (training, attention_dropout > 0) the XLA path computes
    softmax(QK^T/sqrt(d) + mask) itself, because jax.nn.dot_product_attention has no dropout. The cuDNN
    path ('cudnn') never drops attention probabilities (the fused kernel has no dropout) and takes
    sequence lengths instead of a mask, so it assumes right padding.

    Incremental decoding (the Flax lm1b pattern, a 'cache' collection): `init_self_attention_cache` or
    `init_cross_attention_cache` creates `cached_key`/`cached_value` [B, K, heads, head_dim]; a call with
    `decode_index` (the target position of x's first row) then writes this step's keys and values there
    (a causal self-attention) or reads the encoder's, projected once (a cross-attention: `key_value` is
    not needed then).
    """

    cfg: BertConfig
    causal: bool = False

    def setup(self):
        self.query, self.key, self.value = self.projection(), self.projection(), self.projection()
        self.output = nn.DenseGeneral(
            self.cfg.hidden_size,
            axis=(-2, -1),
            dtype=self.cfg.compute_dtype,
            kernel_init=normal_init(self.cfg, (HEADS, KV, EMBED)),
            bias_init=zeros_init((EMBED,)),
        )
        self.dropout = nn.Dropout(self.cfg.attention_dropout)

    @nn.nowrap
    def projection(self) -> nn.DenseGeneral:
        cfg = self.cfg
        return nn.DenseGeneral(
            (cfg.num_heads, cfg.head_dim),
            dtype=cfg.compute_dtype,
            kernel_init=normal_init(cfg, (EMBED, HEADS, KV)),
            bias_init=zeros_init((HEADS, KV)),
        )

    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array,
        deterministic: bool,
        key_value: jax.Array | None = None,
        decode_index: jax.Array | None = None,
    ) -> jax.Array:
        query = self.query(x)  # [B, Q, N, D]
        if decode_index is not None:
            key, value, mask = self.cached_keys_values(x, attention_mask, decode_index)
            return self.output(self.attend(query, key, value, mask, deterministic))
        source = x if key_value is None else key_value
        key, value = self.key(source), self.value(source)
        mask = key_mask(attention_mask)
        if self.causal:
            mask = mask & causal_mask(x.shape[1], source.shape[1])
        if self.cfg.attention_implementation == "cudnn":
            if self.cfg.compute_dtype != jnp.bfloat16:
                raise ValueError(
                    f"model.attention_implementation='cudnn' needs model.dtype='bfloat16' (got {self.cfg.dtype!r}): "
                    "cuDNN's fused attention has no float32 kernel"
                )
            lengths = attention_mask.sum(axis=-1).astype(jnp.int32)
            context = jax.nn.dot_product_attention(
                query,
                key,
                value,
                is_causal=self.causal,
                query_seq_lengths=lengths if key_value is None else None,
                key_value_seq_lengths=lengths,
                implementation="cudnn",
            )
        else:
            context = self.attend(query, key, value, mask, deterministic)
        return self.output(context)

    def attend(self, query, key, value, mask, deterministic: bool) -> jax.Array:
        """softmax(QK^T/sqrt(d)) V over the keys `mask` [B or 1, 1, Q, K] allows (the XLA path)."""
        if deterministic or self.cfg.attention_dropout == 0.0:
            implementation = ATTENTION_IMPLEMENTATIONS[self.cfg.attention_implementation]
            # cuDNN only serves whole sequences (lengths, no mask): single decode steps take the XLA path.
            implementation = "xla" if implementation == "cudnn" else implementation
            return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)
        scores = jnp.einsum("bqnd,bknd->bnqk", query, key).astype(jnp.float32) / math.sqrt(self.cfg.head_dim)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probabilities = self.dropout(jax.nn.softmax(scores, axis=-1), deterministic=False)
        return jnp.einsum("bnqk,bknd->bqnd", probabilities.astype(value.dtype), value)

    def cached_keys_values(self, x, attention_mask, decode_index):
        """(keys, values, mask) of a decode step: the cache with this step written in (a causal self-attention),
        or as `init_cross_attention_cache` left it (a cross-attention, which is never causal)."""
        if not self.has_variable("cache", "cached_key"):
            raise ValueError("decoding with decode=True needs the cache: build it with Seq2Seq.init_cache first")
        key, value = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
        if not self.causal:
            return key, value, key_mask(attention_mask)
        start = (0, decode_index, 0, 0)
        key = jax.lax.dynamic_update_slice(key, self.key(x).astype(key.dtype), start)
        value = jax.lax.dynamic_update_slice(value, self.value(x).astype(value.dtype), start)
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
        query_positions = decode_index + jnp.arange(x.shape[1])
        mask = jnp.arange(key.shape[1])[None, :] <= query_positions[:, None]  # [Q, K]: filled and not later
        return key, value, mask[None, None]

    def init_self_attention_cache(self, batch_size: int, max_length: int) -> None:
        shape = (batch_size, max_length, self.cfg.num_heads, self.cfg.head_dim)
        self.put_variable("cache", "cached_key", jnp.zeros(shape, self.cfg.compute_dtype))
        self.put_variable("cache", "cached_value", jnp.zeros(shape, self.cfg.compute_dtype))

    def init_cross_attention_cache(self, key_value: jax.Array) -> None:
        self.put_variable("cache", "cached_key", self.key(key_value))
        self.put_variable("cache", "cached_value", self.value(key_value))


def key_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, S] 1/0 padding mask -> [B, 1, 1, S] boolean: every query may attend to the non-padding keys."""
    return attention_mask.astype(bool)[:, None, None, :]


def causal_mask(query_length: int, key_length: int) -> jax.Array:
    """[1, 1, Q, K] boolean: query i sees keys 0..i."""
    return jnp.tril(jnp.ones((query_length, key_length), bool))[None, None]


class FeedForward(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = gelu(dense(cfg, cfg.intermediate_size, (EMBED, MLP), name="intermediate")(x))
        return dense(cfg, cfg.hidden_size, (MLP, EMBED), name="output")(x)


def residual(cfg: BertConfig, x: jax.Array, sublayer: Callable, norm: nn.LayerNorm, dropout: nn.Dropout) -> jax.Array:
    """One residual sublayer: LayerNorm after the residual sum ('post', BERT) or before the sublayer ('pre')."""
    if cfg.layer_norm == "post":
        x = norm(x + dropout(sublayer(x)))
    else:
        x = x + dropout(sublayer(norm(x)))
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class Layer(nn.Module):
    """One Transformer layer: self-attention, then the feed-forward block, each a `residual` sublayer."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        dropout = nn.Dropout(cfg.hidden_dropout, deterministic=deterministic)
        attention = Attention(cfg, name="attention")
        x = residual(cfg, x, lambda h: attention(h, attention_mask, deterministic), layer_norm(cfg, name="attention_layer_norm"), dropout)
        return residual(cfg, x, FeedForward(cfg, name="mlp"), layer_norm(cfg, name="mlp_layer_norm"), dropout)


class Encoder(nn.Module):
    """Embeddings and the layer stack: returns (sequence_output [B, S, H], hidden_states).

    hidden_states holds L + 1 arrays as HuggingFace does: the embeddings output, then each layer's
    output. With pre-LN the last one (= sequence_output) has the final LayerNorm applied.
    """

    cfg: BertConfig

    def setup(self):
        cfg = self.cfg
        self.embeddings = Embeddings(cfg)
        # Named attributes rather than a list, so the parameter tree reads layer_0 ... layer_{L-1}.
        for i in range(cfg.num_layers):
            setattr(self, f"layer_{i}", Layer(cfg))
        if cfg.layer_norm == "pre":
            self.final_layer_norm = layer_norm(cfg)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        hidden_states = [x]
        for i in range(self.cfg.num_layers):
            x = getattr(self, f"layer_{i}")(x, attention_mask, deterministic)
            hidden_states.append(x)
        if self.cfg.layer_norm == "pre":
            x = self.final_layer_norm(x)
            hidden_states[-1] = x
        return x, tuple(hidden_states)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Logits over the vocabulary by the word-embedding table (the tied MLM decoder)."""
        return self.embeddings.word_embeddings.attend(hidden)


_LAYER_NAME = re.compile(r"layer_(\d+)")


def _path_names(path) -> list[str]:
    """Key names of a parameter path: a '/'-joined string, a tuple of strings, or a jax key path."""
    if isinstance(path, str):
        return path.split("/")
    names = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                entry = getattr(entry, attribute)
                break
        names.append(str(entry))
    return names


def encoder_layer_index(path) -> int | None:
    """-1 for a parameter of the embeddings, i for one of `layer_i`, None for anything else.

    `path` is a parameter's path as `flax.traverse_util.flatten_dict` gives it (a tuple of names), as
    `jax.tree_util.tree_map_with_path` gives it (key entries), or '/'-joined. The trainer freezes the
    bottom k layers and decays learning rates by depth with it.
    """
    for name in _path_names(path):
        if name == "embeddings":
            return -1
        match = _LAYER_NAME.fullmatch(name)
        if match:
            return int(match.group(1))
    return None
