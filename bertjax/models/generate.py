"""Greedy and beam search over a step function, jitted, batched; and `generate` for the seq2seq model.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]

# HF's "minus infinity" for beams that must not be chosen: finite, so sums of them stay ordered.
NEVER = -1.0e9


def _log_probs(logits: jax.Array, eos_id: int, forbid_eos: jax.Array) -> jax.Array:
    """log_softmax in float32 (a no-op on log-probabilities), EOS at -inf where `min_length` is not reached."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return log_probs.at[:, eos_id].set(jnp.where(forbid_eos, -jnp.inf, log_probs[:, eos_id]))


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
        chosen = jnp.argmax(_log_probs(logits, eos_id, position + 1 < min_length), axis=-1).astype(jnp.int32)
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
    live_scores = jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(NEVER)  # one live beam at first
    done = jnp.full((batch, beams), NEVER, jnp.float32)
    state = {
        "length": jnp.int32(1),  # tokens so far, start token included
        "live": live,
        "live_scores": live_scores,
        "done": live,
        "done_scores": done,
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
        log_probs = _log_probs(logits, eos_id, length < min_length).reshape(batch, beams, -1)
        vocab = log_probs.shape[-1]
        scores = (log_probs + s["live_scores"][:, :, None]).reshape(batch, beams * vocab)
        top_scores, top_index = jax.lax.top_k(scores, candidates)
        parents, chosen = top_index // vocab, (top_index % vocab).astype(jnp.int32)
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


def cached_step(model, params, attention_mask: jax.Array) -> StepFn:
    """The seq2seq model's step: one token through the decoder over its KV cache (`Seq2Seq.decode`)."""

    def step(tokens, cache, position):
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, tokens, None, attention_mask, decode=True, method=model.decode, mutable=["cache"]
        )
        return logits[:, -1], mutated["cache"]

    return step


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_length", "length_penalty", "min_length", "early_stopping"))
def _generate(model, params, input_ids, attention_mask, *, num_beams, max_length, length_penalty, min_length, early_stopping):
    cfg = model.cfg
    encoder_hidden = model.apply({"params": params}, input_ids, attention_mask, method=model.encode)
    encoder_hidden, attention_mask = repeat_rows((encoder_hidden, attention_mask), num_beams)
    cache = model.init_cache({"params": params}, encoder_hidden, max_length)
    starts = jnp.full((input_ids.shape[0],), cfg.decoder_start_token_id, jnp.int32)
    ids = {"max_length": max_length, "eos_id": cfg.eos_token_id, "pad_id": cfg.pad_token_id, "min_length": min_length}
    if num_beams == 1:
        return greedy(cached_step(model, params, attention_mask), cache, starts, **ids)
    return beam_search(
        cached_step(model, params, attention_mask), cache, starts, beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, **ids
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
