"""An encoder-decoder Transformer (BART: Lewis et al., ACL 2020) built from the encoder's modules.

    cfg = Seq2SeqConfig.from_config(config.model)
    model = Seq2Seq(cfg)
    variables = model.init(rng, input_ids, attention_mask, decoder_input_ids)
    out = model.apply(variables, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    out.logits                       # [B, T, V] float32
    out.encoder_last_hidden_state    # [B, S, H]
    out.decoder_last_hidden_state    # [B, T, H]

Incremental decoding keeps a KV cache in a 'cache' collection (the Flax lm1b pattern):

    encoder_hidden = model.apply(variables, input_ids, attention_mask, method=model.encode)
    cache = model.init_cache(variables, encoder_hidden, max_target_length)
    logits, mutated = model.apply({**variables, "cache": cache}, step_ids, None, attention_mask,
                                  decode=True, method=model.decode, mutable=["cache"])
    cache = mutated["cache"]         # logits [B, L, V] for the L new tokens step_ids [B, L]

`init_cache` projects the encoder output into every cross-attention's keys and values once; each
decode step appends its own keys and values to the self-attention caches at `decoder/index` (the
target positions written so far, an int32 scalar) and advances it. Every other cache leaf has the
batch on axis 0, so a beam search reorders the cache with `x[beam_indices]` on the non-scalar leaves.
Writing past `max_target_length` is not checked inside jit: the caller stops before it.

The encoder is `bertjax.models.encoder`'s `Layer` stack; the decoder layer adds a causal
self-attention and a cross-attention (the same `Attention` module) before the same feed-forward
block; both take the config's switches: post-LN (BART) or pre-LN (mBART: a final LayerNorm on each
stack), learned or sinusoidal positions, dtype and attention implementation. Word embeddings are one
table shared by encoder, decoder and the LM head (whose bias is BART's `final_logits_bias`). The
parameter tree (the contract of the BART name map in `bertjax.convert.hf`):

    word_embeddings/embedding
    encoder/{embeddings/{position_embeddings (learned only), LayerNorm}, layer_i/... (encoder.Layer),
             final_layer_norm (pre-LN only)}
    decoder/{embeddings/{position_embeddings, LayerNorm},
             layer_i/{self_attention, self_attention_layer_norm, cross_attention, cross_attention_layer_norm,
                      mlp/{intermediate, output}, mlp_layer_norm},
             final_layer_norm (pre-LN only)}
    lm_head/bias
"""

from __future__ import annotations

import dataclasses
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bertjax import config as config_lib
from bertjax.models.axes import EMBED, POSITIONS, VOCAB
from bertjax.models.encoder import Attention, BertConfig, FeedForward, Layer, layer_norm, normal_init, residual, sinusoidal_positions, zeros_init


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(BertConfig):
    """BertConfig (`num_layers` is the encoder's depth; `type_vocab_size` is unused) plus the decoder's fields.

    The token ids default to the tokenizers bertjax trains ([PAD]=0, [CLS]=2 starts the target,
    [SEP]=3 ends it); a converted BART carries its own (<s>=0, <pad>=1, </s>=2, which also starts the target).
    """

    num_decoder_layers: int = 2
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 3
    decoder_start_token_id: int = 2
    scale_embedding: bool = False  # multiply word embeddings by sqrt(hidden_size) (False in BART, True in mBART)


# Preset shapes: (layers in each of encoder and decoder, hidden size, heads); feed-forward = 4 * hidden.
# base is BART-base (Lewis et al., 2020): 6+6 layers, hidden 768, 12 heads, feed-forward 3072.
SIZES = {"tiny": (2, 128, 2), "small": (4, 512, 8), "base": (6, 768, 12)}


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
    """`config.model` of a seq2seq preset: the encoder's keys (`bertjax.config.model_config`) plus the
    decoder's, with BART's LayerNorm epsilon and, for base, its vocabulary and position table."""
    if size not in SIZES:
        raise config_lib.ConfigError(f"unknown seq2seq size {size!r}; choose one of {sorted(SIZES)}")
    layers, hidden, heads = SIZES[size]
    model = config_lib.model_config("tiny")
    model.update(size=size, num_layers=layers, hidden_size=hidden, num_heads=heads, intermediate_size=4 * hidden, layer_norm_eps=1e-5)
    encoder_fields = {field.name for field in dataclasses.fields(BertConfig)}
    for field in dataclasses.fields(Seq2SeqConfig):
        if field.name not in encoder_fields:
            model[field.name] = field.default
    model.num_decoder_layers = layers
    if size == "base":
        model.update(vocab_size=50265, max_position_embeddings=1024)
    return model


@flax.struct.dataclass
class Seq2SeqOutput:
    logits: jax.Array  # [B, T, V] float32
    encoder_last_hidden_state: jax.Array  # [B, S, H]
    decoder_last_hidden_state: jax.Array  # [B, T, H]


class SequenceEmbeddings(nn.Module):
    """The shared word embeddings (scaled if `scale_embedding`) + positions from `start`, then LayerNorm
    (BART's layernorm_embedding) and dropout. `start` is a decode step's first target position."""

    cfg: Seq2SeqConfig
    word_embeddings: nn.Embed

    @nn.compact
    def __call__(self, ids: jax.Array, start: int | jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        length = ids.shape[-1]
        x = self.word_embeddings(ids)
        if cfg.scale_embedding:
            x = x * math.sqrt(cfg.hidden_size)
        if cfg.position_embedding == "learned":
            if isinstance(start, int) and start + length > cfg.max_position_embeddings:
                raise ValueError(f"sequence length {start + length} exceeds model.max_position_embeddings={cfg.max_position_embeddings}")
            table = nn.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                dtype=cfg.compute_dtype,
                embedding_init=normal_init(cfg, (POSITIONS, EMBED)),
                name="position_embeddings",
            )
            positions = table(start + jnp.arange(length))
        else:
            positions = sinusoidal_positions(length, cfg.hidden_size, start).astype(cfg.compute_dtype)
        x = layer_norm(cfg, name="LayerNorm")(x + positions[None])
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class Seq2SeqEncoder(nn.Module):
    """Embeddings and `num_layers` encoder `Layer`s (bidirectional, over the non-padding tokens)."""

    cfg: Seq2SeqConfig
    word_embeddings: nn.Embed

    def setup(self):
        cfg = self.cfg
        self.embeddings = SequenceEmbeddings(cfg, self.word_embeddings)
        for i in range(cfg.num_layers):
            setattr(self, f"layer_{i}", Layer(cfg))
        if cfg.layer_norm == "pre":
            self.final_layer_norm = layer_norm(cfg)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool) -> jax.Array:
        x = self.embeddings(input_ids, 0, deterministic)
        for i in range(self.cfg.num_layers):
            x = getattr(self, f"layer_{i}")(x, attention_mask, deterministic)
        return self.final_layer_norm(x) if self.cfg.layer_norm == "pre" else x


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, feed-forward: each a `residual` sublayer."""

    cfg: Seq2SeqConfig

    def setup(self):
        cfg = self.cfg
        self.self_attention = Attention(cfg, causal=True)
        self.self_attention_layer_norm = layer_norm(cfg)
        self.cross_attention = Attention(cfg)
        self.cross_attention_layer_norm = layer_norm(cfg)
        self.mlp = FeedForward(cfg)
        self.mlp_layer_norm = layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def __call__(self, x, decoder_attention_mask, encoder_hidden, attention_mask, deterministic: bool, decode_index=None):
        """With `decode_index` the self-attention appends to its cache and the cross-attention reads its own."""
        cfg = self.cfg

        def dropout(y):
            return self.dropout(y, deterministic=deterministic)

        def self_attention(h):
            return self.self_attention(h, decoder_attention_mask, deterministic, decode_index=decode_index)

        def cross_attention(h):
            return self.cross_attention(h, attention_mask, deterministic, key_value=encoder_hidden, decode_index=decode_index)

        x = residual(cfg, x, self_attention, self.self_attention_layer_norm, dropout)
        x = residual(cfg, x, cross_attention, self.cross_attention_layer_norm, dropout)
        return residual(cfg, x, self.mlp, self.mlp_layer_norm, dropout)

    def init_cache(self, encoder_hidden: jax.Array, max_length: int) -> None:
        self.self_attention.init_self_attention_cache(encoder_hidden.shape[0], max_length)
        self.cross_attention.init_cross_attention_cache(encoder_hidden)


class Decoder(nn.Module):
    """Embeddings and `num_decoder_layers` `DecoderLayer`s; with `decode`, one step over the cache."""

    cfg: Seq2SeqConfig
    word_embeddings: nn.Embed

    def setup(self):
        cfg = self.cfg
        self.embeddings = SequenceEmbeddings(cfg, self.word_embeddings)
        for i in range(cfg.num_decoder_layers):
            setattr(self, f"layer_{i}", DecoderLayer(cfg))
        if cfg.layer_norm == "pre":
            self.final_layer_norm = layer_norm(cfg)

    def __call__(self, decoder_input_ids, decoder_attention_mask, encoder_hidden, attention_mask, deterministic: bool, decode: bool = False):
        if decode:
            if not self.has_variable("cache", "index"):
                raise ValueError("decode=True needs a cache: build it with Seq2Seq.init_cache(variables, encoder_hidden, max_target_length)")
            start = decode_index = self.get_variable("cache", "index")
            self.put_variable("cache", "index", start + decoder_input_ids.shape[1])
        else:
            start, decode_index = 0, None
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones_like(decoder_input_ids)
        x = self.embeddings(decoder_input_ids, start, deterministic)
        for i in range(self.cfg.num_decoder_layers):
            x = getattr(self, f"layer_{i}")(x, decoder_attention_mask, encoder_hidden, attention_mask, deterministic, decode_index)
        return self.final_layer_norm(x) if self.cfg.layer_norm == "pre" else x

    def init_cache(self, encoder_hidden: jax.Array, max_length: int) -> None:
        cfg = self.cfg
        if cfg.position_embedding == "learned" and max_length > cfg.max_position_embeddings:
            raise ValueError(f"max_target_length={max_length} exceeds model.max_position_embeddings={cfg.max_position_embeddings}")
        self.put_variable("cache", "index", jnp.zeros((), jnp.int32))
        for i in range(self.cfg.num_decoder_layers):
            getattr(self, f"layer_{i}").init_cache(encoder_hidden, max_length)


class LMHead(nn.Module):
    """Logits: hidden states by the word-embedding table (tied), float32, plus an output bias: BART's
    final_logits_bias, a buffer HF never trains; here it trains like BERT's MLM output bias, and its
    name `bias` keeps it out of weight decay."""

    cfg: Seq2SeqConfig
    word_embeddings: nn.Embed

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        bias = self.param("bias", zeros_init((VOCAB,)), (self.cfg.vocab_size,), jnp.float32)
        return self.word_embeddings.attend(hidden).astype(jnp.float32) + bias


class Seq2Seq(nn.Module):
    """Encoder, decoder and the tied LM head (module docstring)."""

    cfg: Seq2SeqConfig

    def setup(self):
        cfg = self.cfg
        self.word_embeddings = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, embedding_init=normal_init(cfg, (VOCAB, EMBED))
        )
        self.encoder = Seq2SeqEncoder(cfg, self.word_embeddings)
        self.decoder = Decoder(cfg, self.word_embeddings)
        self.lm_head = LMHead(cfg, self.word_embeddings)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> Seq2SeqOutput:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        encoder_hidden = self.encoder(input_ids, attention_mask, deterministic)
        decoder_hidden = self.decoder(decoder_input_ids, decoder_attention_mask, encoder_hidden, attention_mask, deterministic)
        return Seq2SeqOutput(
            logits=self.lm_head(decoder_hidden),
            encoder_last_hidden_state=encoder_hidden,
            decoder_last_hidden_state=decoder_hidden,
        )

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """The encoder output [B, S, H]."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        return self.encoder(input_ids, attention_mask, deterministic)

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoder_hidden: jax.Array | None,
        attention_mask: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits [B, T, V] of the decoder over `encoder_hidden`; with `decode`, of the next T tokens after the
        cache (apply with mutable=['cache']; `encoder_hidden` may then be None: the cache holds its keys and values)."""
        hidden = self.decoder(decoder_input_ids, decoder_attention_mask, encoder_hidden, attention_mask, deterministic, decode)
        return self.lm_head(hidden)

    def build_cache(self, encoder_hidden: jax.Array, max_target_length: int) -> None:
        """Create the 'cache' collection (apply with mutable=['cache']); `init_cache` does that for you."""
        self.decoder.init_cache(encoder_hidden, max_target_length)

    @nn.nowrap
    def init_cache(self, variables: dict, encoder_hidden: jax.Array, max_target_length: int) -> dict:
        """The decode cache for `encoder_hidden` [B, S, H] and up to `max_target_length` target tokens."""
        variables = {name: value for name, value in variables.items() if name != "cache"}
        _, mutated = self.apply(variables, encoder_hidden, max_target_length, method=Seq2Seq.build_cache, mutable=["cache"])
        return mutated["cache"]
