"""One checkpoint ready to probe: its config, float32 parameters, tokenizer and batched forward passes.

The forward passes are jitted on fixed shapes: sentences are sorted by length and each batch is
padded to `batch_size` rows and to the smallest length bucket (a power of two, at most
max_seq_length) that holds it, so a whole study compiles a handful of programs, not one per batch.
They reduce on the device, per batch, to what a measure needs, so memory stays bounded whatever the
set size: `predict_ids` returns the MLM argmax at chosen positions (never [N, S, V] logits),
`hidden_states` the L + 1 layers at chosen positions, `mean_pooled` each layer's mean over the
real tokens.

The model always computes in float32 with XLA attention, whatever the run trained with: a measure
should not change with the machine it is computed on (and cuDNN's kernel has no float32 form).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from bertjax import checkpoint_io, models
from bertjax.data import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import UserError
from bertjax.train import state as state_lib

MIN_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class WordBatch:
    """Sentences encoded as `[CLS] pieces [SEP]`, each word tokenised on its own (as tagging fine-tuning does).

    word_start/word_end [N, W]: the first piece of each word and one past its last; -1 for a word cut
    off by max_seq_length (and for the padding of shorter sentences). num_words [N]: words per sentence.
    """

    input_ids: np.ndarray  # [N, S] int32
    attention_mask: np.ndarray  # [N, S] int32
    word_start: np.ndarray  # [N, W] int32
    word_end: np.ndarray  # [N, W] int32
    num_words: np.ndarray  # [N] int32

    @property
    def kept(self) -> np.ndarray:
        """[N, W] bool: the words that fit in max_seq_length."""
        return self.word_start >= 0

    @property
    def truncated(self) -> int:
        """Words cut off by max_seq_length (they are not scored)."""
        return int(self.num_words.sum() - self.kept.sum())


def _bucket(length: int, limit: int) -> int:
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


def _apply_config(model_config) -> models.BertConfig:
    """The model's shape from the run's config, computed in float32 with XLA attention (see the module docstring)."""
    return dataclasses.replace(models.BertConfig.from_config(model_config), dtype="float32", attention_implementation="xla")


def _mlm_head(module, hidden):
    return module.mlm(hidden, module.encoder.attend)


@functools.partial(jax.jit, static_argnums=0)
def _mlm_argmax(cfg: models.BertConfig, params, hidden):
    logits = models.BertForPreTraining(cfg).apply({"params": params}, hidden, method=_mlm_head)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _encoder_hidden_states(module, input_ids, attention_mask):
    return module.encoder(input_ids, jnp.zeros_like(input_ids), attention_mask, True)[1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _hidden_states(cfg: models.BertConfig, layers: tuple[int, ...], params, input_ids, attention_mask, positions):
    hidden = models.BertForPreTraining(cfg).apply({"params": params}, input_ids, attention_mask, method=_encoder_hidden_states)
    return jnp.stack([models.gather_positions(hidden[layer], positions) for layer in layers])  # [len(layers), B, P, H]


@functools.partial(jax.jit, static_argnums=0)
def _mean_pooled(cfg: models.BertConfig, params, input_ids, attention_mask):
    hidden = models.BertForPreTraining(cfg).apply({"params": params}, input_ids, attention_mask, method=_encoder_hidden_states)
    weights = attention_mask[..., None].astype(jnp.float32)
    return jnp.stack([jnp.sum(layer * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0) for layer in hidden])  # [L+1, B, H]


@dataclasses.dataclass
class Model:
    """A checkpoint (`load`) or a run's initialisation (`initial`), ready for the measures."""

    config: ml_collections.ConfigDict
    params: dict
    tokenizer: tokenizer_lib.Tokenizer

    def __post_init__(self):
        self.cfg = _apply_config(self.config.model)
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise UserError(
                f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} pieces but the model's vocabulary has "
                f"{self.cfg.vocab_size}: give the run's own tokenizer"
            )

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def max_positions(self) -> int:
        return self.cfg.max_position_embeddings if self.cfg.position_embedding == "learned" else 1 << 30

    @classmethod
    def load(cls, source: str) -> Model:
        """Anything `checkpoint_io.load_params` reads: WORKDIR (newest checkpoint), WORKDIR:STEP, a HuggingFace directory."""
        config, params = checkpoint_io.load_params(source)
        return cls(config, params, _tokenizer(source, config))

    @classmethod
    def initial(cls, workdir) -> Model:
        """Step 0: the parameters pretraining started from, rebuilt from the run's config and train.seed.

        Same module, same example inputs, same key and, like `state.create`, under jit, so the values
        are bit-identical to the run's initial state.
        """
        config = checkpoint_io.read_config(workdir)
        module = models.BertForPreTraining(models.BertConfig.from_config(config.model))
        inputs = state_lib.example_inputs(1, config.data.max_seq_length)
        params = jax.jit(lambda rng: nn.meta.unbox(module.init(rng, *inputs)["params"]))(jax.random.key(config.train.seed))
        return cls(config, params, _tokenizer(str(workdir), config))

    # --- Encoding -------------------------------------------------------------------------------

    def encode_words(self, sentences: Sequence[Sequence[str]], max_seq_length: int) -> WordBatch:
        """Each sentence's words tokenised one by one, as `tasks.encode_tagging` does for fine-tuning."""
        max_seq_length = min(max_seq_length, self.max_positions)
        tagged = [tasks.TaggedSentence(tuple(words), None, "") for words in sentences]
        encoded = tasks.encode_tagging(self.tokenizer, tagged, max_seq_length, None)
        word_start = encoded["word_positions"]
        kept = word_start >= 0
        # A word ends where the next kept word starts; the last kept word where [SEP] sits.
        sep = encoded["attention_mask"].sum(axis=1) - 1
        following = np.concatenate([word_start[:, 1:], np.full((len(tagged), 1), -1, np.int32)], axis=1)
        word_end = np.where(following >= 0, following, sep[:, None]).astype(np.int32)
        word_end = np.where(kept, word_end, -1)
        num_words = np.array([len(words) for words in sentences], np.int32)
        return WordBatch(encoded["input_ids"], encoded["attention_mask"], word_start, word_end, num_words)

    # --- Forward passes (batched, bucketed, reduced per batch) ----------------------------------

    def predict_ids(self, input_ids, attention_mask, positions, *, batch_size: int = 32, head_chunk: int = 1024) -> np.ndarray:
        """[N, P] the MLM head's most likely piece at positions [N, P] (-1 = none: 0 is returned there).

        The encoder runs batched; the head (the costly vocabulary projection) runs only on the chosen
        positions, flattened into fixed chunks of `head_chunk`, so no padding position pays for it.
        """
        positions = np.asarray(positions, np.int32)
        last = self.hidden_states(input_ids, attention_mask, positions, batch_size=batch_size, layers=(self.num_layers,))[0]
        chosen = positions >= 0
        hidden = np.zeros((-(-chosen.sum() // head_chunk) * head_chunk, self.hidden_size), np.float32)
        hidden[: chosen.sum()] = last[chosen]
        flat = [np.asarray(_mlm_argmax(self.cfg, self.params, hidden[first : first + head_chunk])) for first in range(0, len(hidden), head_chunk)]
        ids = np.zeros(positions.shape, np.int32)
        ids[chosen] = np.concatenate(flat or [np.zeros(0, np.int32)])[: chosen.sum()]
        return ids

    def hidden_states(self, input_ids, attention_mask, positions, *, batch_size: int = 32, layers: Sequence[int] | None = None) -> np.ndarray:
        """[L+1, N, P, H] float32: the embeddings output (layer 0) and each layer's output at positions [N, P]
        (-1 = none: meaningless values there); only `layers` (indices 0..L) when given."""
        layers = tuple(range(self.num_layers + 1)) if layers is None else tuple(layers)
        return self._batched(functools.partial(_hidden_states, self.cfg, layers), input_ids, attention_mask, positions, batch_size, batch_axis=1)

    def mean_pooled(self, input_ids, attention_mask, *, batch_size: int = 32) -> np.ndarray:
        """[L+1, N, H] float32: each layer averaged over the real tokens ([CLS] and [SEP] included), as
        the 'features' fine-tuning regime pools a sentence."""
        return self._batched(functools.partial(_mean_pooled, self.cfg), input_ids, attention_mask, None, batch_size, batch_axis=1)

    def word_features(self, sentences: Sequence[Sequence[str]], max_tokens: int, seed: int, *, max_seq_length: int = 128, batch_size: int = 32):
        """A fixed sample of whole sentences, about `max_tokens` words, and every layer's features at each word's first piece.

        The sentences are drawn in a seeded order until the next would pass `max_tokens` (whole
        sentences, so that sentence-level metrics such as entity F1 stay defined). Returns
        (features [L+1, N, H] float32, sentence [N], word [N]): the indices of each feature's word in
        `sentences`; words cut off by max_seq_length are left out.
        """
        chosen, total = [], 0
        for index in np.random.default_rng(seed).permutation(len(sentences)):
            if chosen and total + len(sentences[index]) > max_tokens:
                break
            chosen.append(int(index))
            total += len(sentences[index])
        chosen.sort()
        parts, sentence_ids, word_ids = [], [], []
        # Chunks of sentences bound the [L+1, chunk, words, H] array hidden_states returns.
        for first in range(0, len(chosen), 4 * batch_size):
            chunk = chosen[first : first + 4 * batch_size]
            batch = self.encode_words([sentences[index] for index in chunk], max_seq_length)
            hidden = self.hidden_states(batch.input_ids, batch.attention_mask, batch.word_start, batch_size=batch_size)
            parts.append(hidden[:, batch.kept])
            rows, words = np.nonzero(batch.kept)
            sentence_ids.append(np.asarray(chunk)[rows])
            word_ids.append(words)
        if not parts:
            raise ValueError("no sentences to take features from")
        return np.concatenate(parts, axis=1), np.concatenate(sentence_ids), np.concatenate(word_ids)

    def _batched(self, function, input_ids, attention_mask, positions, batch_size: int, batch_axis: int = 0) -> np.ndarray:
        input_ids, attention_mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
        count, limit = input_ids.shape
        lengths = attention_mask.sum(axis=1)
        if positions is not None:
            positions = np.asarray(positions, np.int32)
            position_counts = (positions >= 0).sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        outputs = []
        for first in range(0, count, batch_size):
            rows = order[first : first + batch_size]
            length = _bucket(int(lengths[rows].max()), limit)
            ids = np.full((batch_size, length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((batch_size, length), np.int32)
            mask[:, 0] = 1  # padding rows attend to one token, so no softmax sees only masked keys
            ids[: len(rows)], mask[: len(rows)] = input_ids[rows, :length], attention_mask[rows, :length]
            args = [ids, mask]
            if positions is not None:
                # Positions are -1 padded at the end of each row: keep a quarter, a half or all of the
                # batch's length in columns, whichever holds them (few shapes, few compilations).
                needed = int(position_counts[rows].max())
                width = min(next(w for w in (length // 4, length // 2, length) if w >= needed), positions.shape[1])
                chosen = np.zeros((batch_size, width), np.int32)
                chosen[: len(rows)] = np.maximum(positions[rows, :width], 0)
                args.append(chosen)
            result = np.take(np.asarray(function(self.params, *args)), range(len(rows)), axis=batch_axis)
            if positions is not None:
                pad = [(0, 0)] * result.ndim
                pad[batch_axis + 1] = (0, positions.shape[1] - result.shape[batch_axis + 1])
                result = np.pad(result, pad)
            outputs.append(result)
        if not outputs:
            raise ValueError("no sentences to run the model on")
        joined = np.concatenate(outputs, axis=batch_axis)
        return np.take(joined, np.argsort(order, kind="stable"), axis=batch_axis)


def _tokenizer(source: str, config) -> tokenizer_lib.Tokenizer:
    """The run's saved tokenizer (WORKDIR/tokenizer, or the HuggingFace directory), else config.data.tokenizer."""
    try:
        return tokenizer_lib.load(checkpoint_io.tokenizer_path(source))
    except FileNotFoundError:
        if config.data.get("tokenizer"):
            return tokenizer_lib.load(config.data.tokenizer)
        raise UserError(f"{source}: no tokenizer saved with the run and no config.data.tokenizer; the measures need the run's tokenizer") from None


def positions_of(word_batch: WordBatch, words: np.ndarray) -> np.ndarray:
    """[N, P] the piece positions of the chosen words ([N, W] bool), -1 padded: all pieces of each."""
    rows = []
    for start, end, chosen in zip(word_batch.word_start, word_batch.word_end, words & word_batch.kept):
        rows.append([p for s, e in zip(start[chosen], end[chosen]) for p in range(s, e)])
    width = max([len(row) for row in rows] + [1])
    positions = np.full((len(rows), width), -1, np.int32)
    for index, row in enumerate(rows):
        positions[index, : len(row)] = row
    return positions

