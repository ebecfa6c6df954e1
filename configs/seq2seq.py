"""Seq2seq denoising (BART-style): an encoder-decoder restores documents from their corruptions.

  bertjax pretrain --config configs/seq2seq.py:tiny --workdir runs/s2s-tiny

The argument is the model size (`bertjax.models.seq2seq.SIZES`): tiny (2+2 layers, H128, A2),
small (4+4, H512, A8) or base (BART-base: 6+6, H768, A12, feed-forward 3072, vocabulary 50265,
1024 positions); feed-forward = 4H. The training, optimizer, mesh and checkpoint sections are
`configs/pretrain.py`'s for the same size; `model` adds the decoder's keys
(`num_decoder_layers`, the pad/bos/eos/decoder-start token ids, `scale_embedding`) to the encoder's.
The model and its HuggingFace BART conversion are tested in tests/test_seq2seq_model.py.

`data.noising` is the trainer's objective switch (bertjax/train/pretrain.py): its presence makes
`bertjax pretrain` train seq2seq denoising. Its default is BART's best corruption (text infilling 30%
with Poisson(3) spans + a full sentence permutation); `config_lib.noising_config("rotation")` etc. give
the ablation arms. Each example is one chunk of whole sentences (sentence_objective 'none'). The
target is [CLS] text [SEP] and the decoder starts from [SEP], as BART's from </s>: the token ids below
are those of the tokenizers bertjax trains ([PAD]=0, [CLS]=2, [SEP]=3); the trainer checks them
against the tokenizer. `train.label_smoothing` (0 = none; BART's fine-tuning uses 0.1) smooths the
decoder's targets.
"""

from bertjax import config as config_lib
from bertjax.models import seq2seq


def get_config(size: str = "tiny"):
    if size not in seq2seq.SIZES:
        raise config_lib.ConfigError(f"unknown seq2seq size {size!r}; choose one of {sorted(seq2seq.SIZES)}")
    config = config_lib.pretrain_config(size)
    dtype = config.model.dtype
    config.model = seq2seq.model_config(size)
    config.model.dtype = dtype
    config.model.update(pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3)
    config.data.sentence_objective = "none"
    config.data.noising = config_lib.noising_config()
    config.train.label_smoothing = 0.0
    return config
