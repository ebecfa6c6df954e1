"""Heads on top of the encoder, and the models that join them to it.

Pretraining: `MaskedLMHead` (transform + decoder tied to the word embeddings + output bias, at the
masked positions only when they are given), `Pooler` (dense + tanh on the first token) and a 2-way
sentence classifier shared by NSP and SOP; `BertForPreTraining` puts them on an `Encoder`.
A task head is one more small module here that reads `sequence_output` or `pooled_output`.
"""

from __future__ import annotations

from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bertjax.config import FEATURES
from bertjax.models.axes import CLASSES, EMBED, LAYERS, VOCAB
from bertjax.models.encoder import BertConfig, Encoder, dense, gelu, layer_norm, zeros_init


def gather_positions(sequence: jax.Array, positions: jax.Array) -> jax.Array:
    """sequence [B, S, H] at positions [B, P] -> [B, P, H]."""
    return jnp.take_along_axis(sequence, positions[..., None].astype(jnp.int32), axis=1)


class Pooler(nn.Module):
    """BERT's pooled output: dense + tanh on the first ([CLS]) token."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, sequence_output: jax.Array) -> jax.Array:
        first_token = sequence_output[:, 0]
        return jnp.tanh(dense(self.cfg, self.cfg.hidden_size, (EMBED, EMBED), name="dense")(first_token))


class MaskedLMHead(nn.Module):
    """Transform (dense + GELU + LayerNorm), then `decoder` (the tied word embeddings) plus an output bias.

    Logits are float32 whatever the compute dtype, so the loss's log-softmax is taken in float32.
    """

    cfg: BertConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, decoder: Callable[[jax.Array], jax.Array]) -> jax.Array:
        cfg = self.cfg
        hidden = gelu(dense(cfg, cfg.hidden_size, (EMBED, EMBED), name="transform")(hidden))
        hidden = layer_norm(cfg, name="LayerNorm")(hidden)
        bias = self.param("bias", zeros_init((VOCAB,)), (cfg.vocab_size,), jnp.float32)
        return decoder(hidden).astype(jnp.float32) + bias


@flax.struct.dataclass
class BertOutput:
    sequence_output: jax.Array  # [B, S, H] final hidden states
    pooled_output: jax.Array  # [B, H]
    hidden_states: tuple[jax.Array, ...]  # L + 1 arrays [B, S, H]: embeddings output, then each layer
    mlm_logits: jax.Array  # [B, P, V] at masked_positions, or [B, S, V] when none are given
    sentence_logits: jax.Array  # [B, 2] (NSP or SOP)


class BertForPreTraining(nn.Module):
    """The encoder with the masked-LM and sentence (NSP/SOP) heads.

    Parameter tree: encoder/..., pooler/dense, mlm/{transform, LayerNorm, bias}, sentence.
    """

    cfg: BertConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.pooler = Pooler(self.cfg)
        self.mlm = MaskedLMHead(self.cfg)
        self.sentence = dense(self.cfg, 2, (EMBED, CLASSES))

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        masked_positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> BertOutput:
        sequence_output, hidden_states = self.encoder(input_ids, token_type_ids, attention_mask, deterministic)
        pooled_output = self.pooler(sequence_output)
        mlm_hidden = sequence_output if masked_positions is None else gather_positions(sequence_output, masked_positions)
        return BertOutput(
            sequence_output=sequence_output,
            pooled_output=pooled_output,
            hidden_states=hidden_states,
            mlm_logits=self.mlm(mlm_hidden, self.encoder.attend),
            sentence_logits=self.sentence(pooled_output).astype(jnp.float32),
        )


# --- Fine-tuning: task heads, the 'features' regime's layer combination, and the task model --------


class ScalarMix(nn.Module):
    """ELMo's learned mix of layers: gamma * sum_j softmax(w)_j * h_j (Peters et al., 2018, eq. 1)."""

    @nn.compact
    def __call__(self, hidden_states: tuple[jax.Array, ...]) -> jax.Array:
        weights = self.param("weights", zeros_init((LAYERS,)), (len(hidden_states),), jnp.float32)
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.ones_init(), ()), (), jnp.float32)
        mixed = jnp.einsum("l,lbsh->bsh", jax.nn.softmax(weights), jnp.stack(hidden_states).astype(jnp.float32))
        return gamma * mixed


class LayerCombination(nn.Module):
    """The features a frozen encoder offers a new head: the last layer, the sum or the concatenation
    of the last four (the BERT paper's feature-based NER table), or a learned scalar mix of all."""

    features: str

    @nn.compact
    def __call__(self, hidden_states: tuple[jax.Array, ...]) -> jax.Array:
        if self.features == "last":
            return hidden_states[-1]
        if self.features == "sum_last4":
            return sum(hidden_states[-4:])
        if self.features == "concat_last4":
            return jnp.concatenate(hidden_states[-4:], axis=-1)
        if self.features == "scalar_mix":
            return ScalarMix(name="scalar_mix")(hidden_states)
        raise ValueError(f"features={self.features!r}: choose one of {FEATURES}")


TASK_FAMILIES = ("single", "pair", "tagging", "span")


class BertForTask(nn.Module):
    """The encoder and one task head: logits [B, num_outputs] for single/pair (class scores, or one
    regression score), [B, S, num_outputs] for tagging, [B, S, 2] (start, end) for span QA.

    `features=None` fine-tunes the encoder (regimes 'full' and 'freeze_bottom'; sentence tasks read
    the pooled [CLS] output, as BERT does). With `features` set ('features' regime) the encoder runs
    deterministically under stop_gradient and the head reads the combined layers; sentence tasks
    then average them over the real tokens, since a frozen [CLS] vector was never trained to
    summarise the sentence for this task.

    Parameter tree: encoder/..., pooler/dense (fine-tuned sentence tasks), combination/scalar_mix
    (scalar mix only), head/{kernel, bias}.
    """

    cfg: BertConfig
    family: str
    num_outputs: int
    features: str | None = None

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        if self.family not in TASK_FAMILIES:
            raise ValueError(f"family={self.family!r}: choose one of {TASK_FAMILIES}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        encoder = Encoder(self.cfg, name="encoder")
        sentence_task = self.family in ("single", "pair")
        if self.features is None:
            hidden, _ = encoder(input_ids, token_type_ids, attention_mask, deterministic)
            if sentence_task:
                hidden = Pooler(self.cfg, name="pooler")(hidden)
        else:
            _, hidden_states = encoder(input_ids, token_type_ids, attention_mask, True)
            hidden = LayerCombination(self.features, name="combination")(jax.lax.stop_gradient(hidden_states))
            if sentence_task:
                weights = attention_mask[..., None].astype(hidden.dtype)
                hidden = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        hidden = nn.Dropout(self.cfg.hidden_dropout)(hidden, deterministic=deterministic)
        return dense(self.cfg, self.num_outputs, (EMBED, CLASSES), name="head")(hidden).astype(jnp.float32)
