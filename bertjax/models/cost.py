"""Model size and training cost, for the trainer's MFU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bertjax.models.encoder import BertConfig
from bertjax.models.heads import BertForPreTraining
from bertjax.models.seq2seq import Seq2Seq, Seq2SeqConfig


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (boxed or plain arrays, or their ShapeDtypeStructs)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(nn.meta.unbox(params))))


def pretraining_param_count(cfg: BertConfig) -> int:
    """Parameters of `BertForPreTraining(cfg)`, from its abstract init (no arrays are allocated)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: BertForPreTraining(cfg).init(jax.random.key(0), ids, ids, ids))
    return count_params(shapes)


def flops_per_token(cfg: BertConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token: 6 N + 12 L H S.

    6 N for the matmuls of the N parameters (the tied decoder counted once, as in
    the peer baseline bench/peer_hf_torch.py that bertjax's throughput is compared with), and 12 L H S for the
    attention score and context products.
    """
    if isinstance(cfg, Seq2SeqConfig):
        # A source and a target position per token: the encoder's and decoder's self-attention and the
        # decoder's cross-attention (target length = source length = seq_len).
        ids = jnp.zeros((1, 1), jnp.int32)
        params = count_params(jax.eval_shape(lambda: Seq2Seq(cfg).init(jax.random.key(0), ids, ids, ids)))
        return 6 * params + 12 * (cfg.num_layers + 2 * cfg.num_decoder_layers) * cfg.hidden_size * seq_len
    return 6 * pretraining_param_count(cfg) + 12 * cfg.num_layers * cfg.hidden_size * seq_len
