"""Greedy and beam search over a step function, jitted, batched; `generate` for the seq2seq model; the verb.

    tokens = generate.generate(model, variables, input_ids, attention_mask, num_beams=4, max_length=64)
    for line in generate.run("runs/bart", sys.stdin, num_beams=4): ...    # `bertjax generate`

Three layers: `greedy` and `beam_search` (model-agnostic, below), `generate` (a `Seq2Seq`: the
encoder once, the decoder one token a step over its KV cache, all in one compiled program) and `run`
(`bertjax generate`: a checkpoint and its tokenizer, lines in, lines out).

The searches know nothing of the model. They drive a step function

    step(tokens [N, 1] int32, cache, position) -> (logits or log-probabilities [N, V], cache)

where N is the batch (greedy) or batch x beams (beam search, beams of one example adjacent), `cache`
any pytree whose leaves of rank >= 1 have N first (beam search reorders them by the surviving beams'
parents each step; scalars such as a cache index are left alone), and `position` the index of the fed
token in the target (0 is the decoder start token). Both run in one `jax.lax.while_loop` over a fixed
`max_length`, stopping early once every sequence is done, and return (tokens [B, max_length],
lengths [B]): token 0 is the start token, `lengths` counts the tokens of each sequence (start and EOS
included) and everything after it is `pad_id`.

They follow HuggingFace `generate` (transformers 5) so that a converted model gives HF's tokens:
- `max_length` counts the start token, as HF's does; `min_length` forbids EOS while fewer tokens exist.
- Beam search is HF's: the top 2 x beams continuations of all beams; the live beams are the best
  `beams` that did not just end (in EOS or at `max_length`); an ended one among the top `beams` joins the
  finished list with score sum(log p) / generated_length ** length_penalty (generated tokens, EOS
  included, start token not); the best finished hypothesis is returned. `early_stopping` is HF's: False
  (HF's default) stops an example once all `beams` finished slots are filled and the best live beam,
  scored at its current length, cannot beat the worst of them; True once the slots are filled;
  "never" when the live beam scored at `max_length` cannot (the exact bound for a positive penalty).
"""

from __future__ import annotations

import functools
import itertools
import logging
import pathlib
from typing import Any, Callable, Iterable, Iterator

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from bertjax.errors import UserError

log = logging.getLogger(__name__)

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]

# HF's "minus infinity" for beams that must not be chosen: finite, so sums of them stay ordered.
NEVER = -1.0e9


def _forbid_eos(logits: jax.Array, eos_id: int, forbid: jax.Array) -> jax.Array:
    """float32 logits with EOS at -inf while `min_length` is not reached (HF's MinLengthLogitsProcessor)."""
    logits = logits.astype(jnp.float32)
    return logits.at[:, eos_id].set(jnp.where(forbid, -jnp.inf, logits[:, eos_id]))


def greedy(
    step: StepFn,
    cache: Any,
    start_tokens: jax.Array,
    *,
    max_length: int,
    eos_id: int,
    pad_id: int,
    min_length: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """The most likely token each step until EOS or `max_length`: (tokens [B, max_length], lengths [B])."""
    batch = start_tokens.shape[0]
    tokens = jnp.full((batch, max_length), pad_id, jnp.int32).at[:, 0].set(start_tokens)

    def body(state):
        position, tokens, finished, cache = state
        logits, cache = step(jax.lax.dynamic_slice_in_dim(tokens, position, 1, axis=1), cache, position)
        chosen = jnp.argmax(_forbid_eos(logits, eos_id, position + 1 < min_length), axis=-1).astype(jnp.int32)
        chosen = jnp.where(finished, pad_id, chosen)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], position + 1, axis=1)
        return position + 1, tokens, finished | (chosen == eos_id), cache

    def running(state):
        position, _, finished, _ = state
        return (position + 1 < max_length) & ~jnp.all(finished)

    state = (jnp.int32(0), tokens, jnp.zeros((batch,), bool), cache)
    _, tokens, _, _ = jax.lax.while_loop(running, body, state)
    return tokens, _lengths(tokens, eos_id, max_length)


def _lengths(tokens: jax.Array, eos_id: int, max_length: int) -> jax.Array:
    """Tokens up to and including the first generated EOS, or `max_length` if there is none."""
    is_eos = tokens[:, 1:] == eos_id
    return jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 2, max_length).astype(jnp.int32)


def _take(array: jax.Array, indices: jax.Array) -> jax.Array:
    """array[b, indices[b, k], ...] for [B, K, ...] arrays and [B, K'] indices."""
    return jnp.take_along_axis(array, indices.reshape(indices.shape + (1,) * (array.ndim - 2)), axis=1)


def reorder_cache(cache: Any, parents: jax.Array) -> Any:
    """The cache of beams [B * beams] taken from `parents` [B, beams] (beam indices within each example)."""
    batch, beams = parents.shape
    flat = (parents + beams * jnp.arange(batch)[:, None]).reshape(-1)
    return jax.tree.map(lambda leaf: leaf if leaf.ndim == 0 else jnp.take(leaf, flat, axis=0), cache)


def beam_search(
    step: StepFn,
    cache: Any,
    start_tokens: jax.Array,
    *,
    beams: int,
    max_length: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    min_length: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """HF's beam search (module docstring): (best tokens [B, max_length], lengths [B]).

    `start_tokens` is [B]; `cache` is for B * beams rows, beams of one example adjacent (each example's
    rows repeated `beams` times).
    """
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r}: choose True, False or 'never' (HF's meanings)")
    batch = start_tokens.shape[0]
    candidates = 2 * beams  # enough that `beams` live ones remain when the best `beams` all end in EOS
    is_top = jnp.arange(candidates) < beams
    live = jnp.full((batch, beams, max_length), pad_id, jnp.int32).at[:, :, 0].set(start_tokens[:, None])
    state = {
        "length": jnp.int32(1),  # tokens so far, start token included
        "live": live,
        "live_scores": jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(NEVER),  # one live beam at first
        "done": live,  # the finished hypotheses, best first
        "done_scores": jnp.full((batch, beams), NEVER, jnp.float32),
        "done_filled": jnp.zeros((batch, beams), bool),
        "done_lengths": jnp.ones((batch, beams), jnp.int32),
        "open": jnp.ones((batch,), bool),  # HF's is_early_stop_heuristic_unsatisfied
        "stop": jnp.bool_(False),
        "cache": cache,
    }

    def body(s):
        length = s["length"]
        fed = s["live"][:, :, length - 1].reshape(batch * beams, 1)
        logits, cache = step(fed, s["cache"], length - 1)
        # The top candidates of each beam first (log_softmax keeps each row's order), log-probabilities
        # only for those: the same numbers as HF's log_softmax over the whole vocabulary, and the same
        # best candidates overall, since no beam gives more than `candidates` of them.
        logits = logits.astype(jnp.float32)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        log_normaliser = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))
        per_beam = min(candidates, logits.shape[-1])
        row_logits, row_tokens = jax.lax.top_k(_forbid_eos(logits, eos_id, length < min_length), per_beam)
        log_probs = (row_logits - row_max) - log_normaliser  # jax.nn.log_softmax's arithmetic
        scores = (log_probs.reshape(batch, beams, per_beam) + s["live_scores"][:, :, None]).reshape(batch, beams * per_beam)
        top_scores, top_index = jax.lax.top_k(scores, candidates)
        parents = top_index // per_beam
        chosen = jnp.take_along_axis(row_tokens.reshape(batch, beams * per_beam), top_index, axis=1).astype(jnp.int32)
        sequences = _take(s["live"], parents).at[:, :, length].set(chosen)
        ended = (chosen == eos_id) | (length + 1 >= max_length)

        # The live beams: the best `beams` candidates that did not end.
        live_candidates = top_scores + NEVER * ended
        _, keep = jax.lax.top_k(live_candidates, beams)
        live, live_scores = _take(sequences, keep), _take(live_candidates, keep)

        # The finished list: merge those that ended among the top `beams` candidates, length-penalised.
        normalised = top_scores / (length.astype(jnp.float32) ** length_penalty)
        closed = ~s["open"][:, None]
        if early_stopping is True:
            closed = closed | jnp.all(s["done_filled"], axis=1, keepdims=True)
        normalised = normalised + NEVER * closed + NEVER * ~(ended & is_top)
        merged_scores = jnp.concatenate([s["done_scores"], normalised], axis=1)
        _, best = jax.lax.top_k(merged_scores, beams)
        merged_filled = jnp.concatenate([s["done_filled"], ended & is_top], axis=1)
        merged_lengths = jnp.concatenate([s["done_lengths"], jnp.full((batch, candidates), length + 1, jnp.int32)], axis=1)
        done = _take(jnp.concatenate([s["done"], sequences], axis=1), best)
        done_scores, done_filled, done_lengths = _take(merged_scores, best), _take(merged_filled, best), _take(merged_lengths, best)

        length = length + 1
        if early_stopping == "never" and length_penalty > 0.0:
            hoped_length = jnp.float32(max_length - 1)
        else:
            hoped_length = (length - 1).astype(jnp.float32)
        best_live = live_scores[:, :1] / hoped_length**length_penalty
        worst_done = jnp.where(done_filled, jnp.min(done_scores, axis=1, keepdims=True), NEVER)
        still_open = s["open"] & jnp.any(best_live > worst_done, axis=1)
        stop = ~jnp.any(still_open) | jnp.all(ended)
        if early_stopping is True:
            stop = stop | jnp.all(done_filled)
        return {
            "length": length,
            "live": live,
            "live_scores": live_scores,
            "done": done,
            "done_scores": done_scores,
            "done_filled": done_filled,
            "done_lengths": done_lengths,
            "open": still_open,
            "stop": stop,
            "cache": reorder_cache(cache, _take(parents, keep)),
        }

    s = jax.lax.while_loop(lambda s: ~s["stop"] & (s["length"] < max_length), body, state)
    return s["done"][:, 0], s["done_lengths"][:, 0]


def repeat_rows(tree: Any, times: int) -> Any:
    """Each row (axis 0) of every non-scalar leaf repeated `times` times in place: [B, ...] -> [B * times, ...]."""
    return jax.tree.map(lambda leaf: leaf if leaf.ndim == 0 else jnp.repeat(leaf, times, axis=0), tree)


def split_cache(cache: dict) -> tuple[dict, dict]:
    """(the part a decode step changes, the cross-attentions' keys and values, which it only reads).

    The cross-attention keys and values are the encoder's, projected once; every beam of an example holds
    the same ones. Kept out of the search's loop state, beam search does not reorder them each step (a
    gather of B x beams x source length x hidden per layer that changes nothing), and the loop does not
    carry them.
    """
    flat = flax.traverse_util.flatten_dict(cache)
    fixed = {path: leaf for path, leaf in flat.items() if "cross_attention" in path}
    changing = {path: leaf for path, leaf in flat.items() if path not in fixed}
    return flax.traverse_util.unflatten_dict(changing), flax.traverse_util.unflatten_dict(fixed)


def _merge(changing: dict, fixed: dict) -> dict:
    flat = flax.traverse_util.flatten_dict(changing)
    flat.update(flax.traverse_util.flatten_dict(fixed))
    return flax.traverse_util.unflatten_dict(flat)


def cached_step(model, params, attention_mask: jax.Array, fixed_cache: dict | None = None) -> StepFn:
    """The seq2seq model's step: one token through the decoder over its KV cache (`Seq2Seq.decode`).

    With `fixed_cache` (`split_cache`'s second part) the step takes and returns only the changing part.
    """

    def step(tokens, cache, position):
        full = cache if fixed_cache is None else _merge(cache, fixed_cache)
        logits, mutated = model.apply(
            {"params": params, "cache": full}, tokens, None, attention_mask, decode=True, method=model.decode, mutable=["cache"]
        )
        cache = mutated["cache"] if fixed_cache is None else split_cache(mutated["cache"])[0]
        return logits[:, -1], cache

    return step


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_length", "length_penalty", "min_length", "early_stopping"))
def _generate(model, params, input_ids, attention_mask, *, num_beams, max_length, length_penalty, min_length, early_stopping):
    cfg = model.cfg
    encoder_hidden = model.apply({"params": params}, input_ids, attention_mask, method=model.encode)
    encoder_hidden, attention_mask = repeat_rows((encoder_hidden, attention_mask), num_beams)
    cache, fixed_cache = split_cache(model.init_cache({"params": params}, encoder_hidden, max_length - 1))  # the last token is never fed
    starts = jnp.full((input_ids.shape[0],), cfg.decoder_start_token_id, jnp.int32)
    ids = {"max_length": max_length, "eos_id": cfg.eos_token_id, "pad_id": cfg.pad_token_id, "min_length": min_length}
    if num_beams == 1:
        return greedy(cached_step(model, params, attention_mask, fixed_cache), cache, starts, **ids)
    return beam_search(
        cached_step(model, params, attention_mask, fixed_cache), cache, starts, beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, **ids
    )


def generate(
    model,
    variables: dict,
    input_ids,
    attention_mask=None,
    *,
    num_beams: int = 1,
    max_length: int = 20,
    length_penalty: float = 1.0,
    min_length: int = 0,
    early_stopping: bool | str = False,
) -> np.ndarray:
    """Token ids [B, T] from a `Seq2Seq` model, as HF `generate` returns them: the decoder start token
    first, EOS ending each finished sequence, pad after it, T the longest sequence (at most `max_length`).
    (HF's beam search fills with EOS instead of pad when pad_token_id is 0: its `pad or eos`.)

    One compiled program per (model, shapes, settings): the encoder runs once, the decoder one token per
    step over its KV cache, greedy when `num_beams` is 1, else beam search (module docstring).
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: it counts the decoder start token, so at least 2 generates anything")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    tokens, lengths = _generate(
        model,
        variables["params"],
        input_ids,
        attention_mask,
        num_beams=num_beams,
        max_length=max_length,
        length_penalty=float(length_penalty),
        min_length=min_length,
        early_stopping=early_stopping,
    )
    return np.asarray(tokens)[:, : int(np.max(lengths))]


# ------------------------------------------------------------------------------- bertjax generate


class _Text:
    """A checkpoint's tokenizer as `generate` needs it: texts -> framed, padded source ids; ids -> text.

    A bertjax tokenizer frames a source `[CLS] text [SEP]`, as the seq2seq data does
    (`bertjax.data.noising`); a HuggingFace BART directory's `tokenizer.json` (byte-level BPE, without
    BERT's special tokens) frames it `<s> text </s>` with its own post-processor.
    """

    def __init__(self, directory: pathlib.Path, cfg):
        from bertjax.data import tokenizer as tokenizer_lib

        self.cfg = cfg
        try:
            self.bertjax = tokenizer_lib.load(directory)
        except tokenizer_lib.TokenizerError:
            if not (directory / "tokenizer.json").exists():
                raise
            import tokenizers

            self.bertjax, self.backend = None, tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        vocab_size = self.bertjax.vocab_size if self.bertjax else self.backend.get_vocab_size()
        if vocab_size > cfg.vocab_size:
            raise UserError(f"{directory}: the tokenizer has {vocab_size} pieces but the model only {cfg.vocab_size}: not this model's tokenizer")

    def encode(self, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
        """Framed ids of each text cut to `max_length` (the end is dropped, the closing token kept), and how many were cut."""
        if self.bertjax:
            rows = [[self.bertjax.cls_id, *ids, self.bertjax.sep_id] for ids in self.bertjax.encode_many(texts)]
        else:
            rows = [encoding.ids for encoding in self.backend.encode_batch(texts)]
        cut = sum(len(row) > max_length for row in rows)
        return [row if len(row) <= max_length else row[: max_length - 1] + row[-1:] for row in rows], cut

    def decode(self, ids) -> str:
        """The text of generated ids: after the start token, up to EOS, special tokens dropped."""
        ids = [int(i) for i in ids[1:]]
        ids = ids[: ids.index(self.cfg.eos_token_id)] if self.cfg.eos_token_id in ids else ids
        if self.bertjax:
            return self.bertjax.decode([i for i in ids if not self.bertjax.is_special[i]])
        return self.backend.decode(ids, skip_special_tokens=True)


def load(source: str):
    """(model, variables, tokenizer) of a seq2seq workdir (WORKDIR[:STEP]) or a HuggingFace BART directory;
    anything else (an encoder-only BERT) is a one-line UserError."""
    from bertjax import checkpoint_io
    from bertjax import config as config_lib
    from bertjax.convert import hf

    path, _ = config_lib.split_step(source)
    huggingface = checkpoint_io.is_huggingface_dir(path)
    model_config = hf.read_config(pathlib.Path(path)) if huggingface else checkpoint_io.read_config(path).model
    if "num_decoder_layers" not in model_config:
        kind = "a HuggingFace BERT (encoder-only)" if huggingface else "an encoder-only run (config.model has no num_decoder_layers)"
        raise UserError(f"--workdir {source}: {kind}; bertjax generate needs a seq2seq model: a run of configs/seq2seq.py or a HuggingFace BART directory")
    if not huggingface and (pathlib.Path(path) / "results.json").exists():
        # A fine-tuning run keeps its parameters per seed (seed_K/) and reads task-shaped input lines.
        raise UserError(f"--workdir {source}: a fine-tuning run; generate from it with `bertjax predict --workdir {path}` (input lines: answer TAB passage)")
    model = hf.model_for(model_config)
    _, params = checkpoint_io.load_params(source)
    return model, {"params": params}, _Text(checkpoint_io.tokenizer_path(source), model.cfg)


def _bucket(width: int, limit: int) -> int:
    """Source widths rounded up to a power of two (at least 8, at most `limit`): few shapes, few compilations."""
    return min(limit, max(8, 1 << (width - 1).bit_length()))


def run(
    source: str, lines: Iterable[str], *, num_beams: int = 1, max_length: int = 64, length_penalty: float = 1.0, batch_size: int = 32
) -> Iterator[str]:
    """`bertjax generate`: one output text per input line, in order, `batch_size` lines at a time.

    Sources longer than the model's position table are cut at the end (logged, counted); every batch is
    padded to `batch_size` rows and a power-of-two width so that a long input compiles a few programs.
    """
    if num_beams < 1 or batch_size < 1:
        raise UserError(f"--num-beams {num_beams} --batch-size {batch_size}: both must be at least 1")
    model, variables, text = load(source)
    cfg = model.cfg
    if cfg.position_embedding == "learned" and max_length - 1 > cfg.max_position_embeddings:
        raise UserError(f"--max-length {max_length}: the model has {cfg.max_position_embeddings} target positions; give at most {cfg.max_position_embeddings + 1}")
    if max_length < 2:
        raise UserError(f"--max-length {max_length}: it counts the decoder start token; give at least 2")
    lines, cut, total = iter(lines), 0, 0
    while batch := list(itertools.islice(lines, batch_size)):
        rows, batch_cut = text.encode(batch, cfg.max_position_embeddings)
        cut, total = cut + batch_cut, total + len(rows)
        width = _bucket(max(map(len, rows)), cfg.max_position_embeddings)
        input_ids = np.full((batch_size, width), cfg.pad_token_id, np.int32)
        attention_mask = np.zeros((batch_size, width), np.int32)
        for row, ids in enumerate(rows + [rows[0]] * (batch_size - len(rows))):
            input_ids[row, : len(ids)], attention_mask[row, : len(ids)] = ids, 1
        tokens = generate(model, variables, input_ids, attention_mask, num_beams=num_beams, max_length=max_length, length_penalty=length_penalty)
        yield from (text.decode(row) for row in tokens[: len(rows)])
    if cut:
        log.warning("%d of %d inputs were longer than the model's %d source positions: cut at the end", cut, total, cfg.max_position_embeddings)
