"""BERT in Flax linen: the encoder, the pretraining heads, and their size and cost; and the
encoder-decoder (`seq2seq`, BART-style) built from the same layers.

    cfg = models.BertConfig.from_config(config.model)
    model = models.BertForPreTraining(cfg)
    variables = model.init(rng, input_ids, token_type_ids, attention_mask)
    out = model.apply(variables, input_ids, token_type_ids, attention_mask, masked_positions)
"""

from bertjax.models.cost import count_params, flops_per_token, pretraining_param_count
from bertjax.models.encoder import Attention, BertConfig, Embeddings, Encoder, Layer, encoder_layer_index
from bertjax.models.heads import BertForPreTraining, BertOutput, MaskedLMHead, Pooler, gather_positions
from bertjax.models.seq2seq import Seq2Seq, Seq2SeqConfig, Seq2SeqOutput

__all__ = [
    "Attention",
    "BertConfig",
    "BertForPreTraining",
    "BertOutput",
    "Embeddings",
    "Encoder",
    "Layer",
    "MaskedLMHead",
    "Pooler",
    "Seq2Seq",
    "Seq2SeqConfig",
    "Seq2SeqOutput",
    "count_params",
    "encoder_layer_index",
    "flops_per_token",
    "gather_positions",
    "pretraining_param_count",
]
