"""Greedy and beam search (bertjax.models.generate): on a toy table model against exhaustive search, then
on the seq2seq model against an uncached forward pass and HuggingFace BART's `generate`."""

from __future__ import annotations

import functools
import itertools
import json
import math

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bertjax.models import generate

EOS, PAD, START = 0, 1, 2


def toy_table(vocab: int, seed: int, eos_bias: float = 0.0) -> np.ndarray:
    """Logits of the next token given the previous two: [vocab, vocab, vocab]."""
    table = np.random.default_rng(seed).normal(size=(vocab, vocab, vocab)).astype(np.float32) * 2.0
    table[..., EOS] += eos_bias
    return table


def toy_step(table: jax.Array):
    """A step function whose cache holds each row's previous token (and a scalar the search must not
    reorder): beam search that failed to reorder the cache would score continuations of the wrong beam."""

    def step(tokens, cache, position):
        logits = table[cache["previous"], tokens[:, 0]]
        return logits, {"previous": tokens[:, 0], "calls": cache["calls"] + 1}

    return step


def toy_cache(rows: int):
    return {"previous": jnp.full((rows,), START, jnp.int32), "calls": jnp.int32(0)}


def exhaustive_best(table: np.ndarray, max_length: int, length_penalty: float) -> tuple[list[int], float]:
    """The best complete sequence (ended by EOS or cut at max_length) by sum(log p) / generated ** penalty."""
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(table), axis=-1), np.float64)
    vocab = table.shape[0]
    best, best_score = None, -math.inf
    for generated in range(1, max_length):
        for tail in itertools.product(range(vocab), repeat=generated):
            if EOS in tail[:-1] or (generated < max_length - 1 and tail[-1] != EOS):
                continue
            sequence, total = [START, *tail], 0.0
            for i in range(1, len(sequence)):
                previous = sequence[i - 2] if i >= 2 else START
                total += log_probs[previous, sequence[i - 1], sequence[i]]
            score = total / generated**length_penalty
            if score > best_score:
                best, best_score = sequence, score
    return best, best_score


@functools.partial(jax.jit, static_argnames=("kind", "batch", "max_length", "options"))
def _search(table, kind, batch, max_length, options):
    options = dict(options)
    starts = jnp.full((batch,), START, jnp.int32)
    function = generate.greedy if kind == "greedy" else generate.beam_search
    cache = toy_cache(batch * options.get("beams", 1))
    return function(toy_step(table), cache, starts, max_length=max_length, eos_id=EOS, pad_id=PAD, **options)


def search(kind, table, batch, max_length, **options):
    tokens, lengths = _search(jnp.asarray(table), kind, batch, max_length, tuple(sorted(options.items())))
    return np.asarray(tokens), np.asarray(lengths)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_finds_the_exhaustive_best(length_penalty):
    """Three tokens and EOS, up to 4 generated: a beam as wide as every candidate of every step makes
    HF's beam search exact, so it must return the exhaustive optimum (EOS hypotheses kept while later
    steps run on, the length penalty as HF applies it). Seeds 2, 7 and 10 have optima off the top beam's
    path, which only a correctly reordered cache finds."""
    max_length = 5
    for seed in range(12):
        table = toy_table(4, seed, eos_bias=0.5)
        best, _ = exhaustive_best(table, max_length, length_penalty)
        tokens, lengths = search("beam", table, 2, max_length, beams=3**3 * 4, length_penalty=length_penalty, early_stopping="never")
        for row in range(2):
            assert lengths[row] == len(best)
            assert tokens[row, : len(best)].tolist() == best
            assert (tokens[row, len(best) :] == PAD).all()


def test_beam_one_equals_greedy():
    for seed in range(6):
        table = toy_table(7, seed, eos_bias=1.0)
        greedy_tokens, greedy_lengths = search("greedy", table, 3, 12)
        beam_tokens, beam_lengths = search("beam", table, 3, 12, beams=1)
        np.testing.assert_array_equal(beam_tokens, greedy_tokens)
        np.testing.assert_array_equal(beam_lengths, greedy_lengths)


def test_greedy_stops_at_eos_and_pads_after_it():
    table = toy_table(5, 0)
    table[:, :, EOS] = -10.0
    table[:, 3, EOS] = 10.0  # EOS right after the first 3
    table[START, START, :] = -10.0
    table[START, START, 4] = 10.0  # START -> 4 -> 3 -> EOS
    table[START, 4, :] = -10.0
    table[START, 4, 3] = 10.0
    tokens, lengths = search("greedy", table, 2, 8)
    assert tokens[0].tolist() == [START, 4, 3, EOS, PAD, PAD, PAD, PAD]
    assert lengths.tolist() == [4, 4]


def test_min_length_forbids_an_early_eos():
    table = toy_table(5, 1, eos_bias=20.0)  # EOS is always the most likely
    for kind, kwargs in (("greedy", {}), ("beam", {"beams": 3})):
        tokens, lengths = search(kind, table, 1, 8, min_length=4, **kwargs)
        # HF's meaning: no EOS while the sequence (start token included) is shorter than min_length
        assert lengths[0] == 5 and tokens[0, 4] == EOS and EOS not in tokens[0, 1:4].tolist(), kind


# ------------------------------------------------------------------------------- the seq2seq model


BART_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)
MAX_LENGTH = 33  # the longest the random BART's 32 positions allow: the start token and 32 fed positions


def random_bart(directory, eos_bias: float = 1.0, **ids):
    """A random HF BartForConditionalGeneration saved in `directory`, and the model: weights scaled up
    (init_std 0.2) so that next-token choices are clear, not near-ties float rounding could flip, and an
    EOS bias that ends some sequences early and not others."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(2)
    config = transformers.BartConfig(
        vocab_size=48, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, init_std=0.2, forced_eos_token_id=None, **ids,
    )
    reference = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        reference.final_logits_bias[0, ids["eos_token_id"]] = eos_bias
    reference.save_pretrained(directory)
    return reference


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """(HF BART, its bertjax conversion, variables). The decoder starts with <s>, not BART's </s>, which
    this random model would answer with EOS at once."""
    from bertjax.convert import hf

    directory = tmp_path_factory.mktemp("bart")
    reference = random_bart(directory, **BART_IDS)
    model, variables = hf.load(directory)
    return reference, model, variables


def source_batch(vocab: int, seed: int = 0):
    """Four sources of lengths 9, 5, 7, 3: right padding with the pad id, BART's <s> ... </s> framing."""
    rng = np.random.default_rng(seed)
    lengths = [9, 5, 7, 3]
    input_ids = np.full((len(lengths), max(lengths)), 1, np.int32)
    attention_mask = np.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = [0, *rng.integers(3, vocab, length - 2), 2]
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def uncached_search(model, variables, input_ids, attention_mask, beams, max_length, **options):
    """The same searches over a step that re-runs the whole decoder on the tokens so far (no KV cache):
    its 'cache' is the token history, which beam search reorders like any other."""
    params = variables["params"]
    encoder_hidden = model.apply(variables, input_ids, attention_mask, method=model.encode)
    encoder_hidden, attention_mask = generate.repeat_rows((encoder_hidden, jnp.asarray(attention_mask)), beams)

    def step(tokens, history, position):
        history = jax.lax.dynamic_update_slice_in_dim(history, tokens, position, axis=1)
        logits = model.apply({"params": params}, history, encoder_hidden, attention_mask, method=model.decode)
        return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False), history

    cfg = model.cfg
    history = jnp.full((input_ids.shape[0] * beams, max_length - 1), cfg.pad_token_id, jnp.int32)  # the fed tokens
    starts = jnp.full((input_ids.shape[0],), cfg.decoder_start_token_id, jnp.int32)
    ids = dict(max_length=max_length, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
    if beams == 1:
        tokens, lengths = jax.jit(lambda h: generate.greedy(step, h, starts, **ids))(history)
    else:
        tokens, lengths = jax.jit(lambda h: generate.beam_search(step, h, starts, beams=beams, **ids, **options))(history)
    return np.asarray(tokens)[:, : int(np.max(lengths))]


@pytest.mark.parametrize("beams", [1, 4])
def test_cached_generation_equals_the_uncached_forward(bart, beams):
    _, model, variables = bart
    input_ids, attention_mask = source_batch(model.cfg.vocab_size)
    cached = generate.generate(model, variables, input_ids, attention_mask, num_beams=beams, max_length=MAX_LENGTH)
    uncached = uncached_search(model, variables, input_ids, attention_mask, beams, MAX_LENGTH)
    np.testing.assert_array_equal(cached, uncached)
    assert cached.shape[1] == MAX_LENGTH  # some sequence runs to max_length: the cache is used every step


def test_the_cross_attention_cache_stays_out_of_the_search_state(bart):
    """Beam search reorders its state's cache every step; the cross-attentions' keys and values are the
    same for every beam of an example, so `generate` keeps them out of it (split_cache) and the step
    must still see them."""
    _, model, variables = bart
    input_ids, attention_mask = source_batch(model.cfg.vocab_size)
    encoder_hidden = model.apply(variables, input_ids, attention_mask, method=model.encode)
    cache = model.init_cache(variables, encoder_hidden, 4)
    changing, fixed = generate.split_cache(cache)
    layers = model.cfg.num_decoder_layers
    fixed_paths = sorted("/".join(path) for path in flax.traverse_util.flatten_dict(fixed))
    assert fixed_paths == sorted(f"decoder/layer_{i}/cross_attention/{name}" for i in range(layers) for name in ("cached_key", "cached_value"))
    changing_paths = ["/".join(path) for path in flax.traverse_util.flatten_dict(changing)]
    assert "decoder/index" in changing_paths and len(changing_paths) == 1 + 2 * layers
    assert not any("cross_attention" in path for path in changing_paths)
    # one step with the split cache gives the full cache's logits and the same new self-attention cache
    tokens = jnp.full((input_ids.shape[0], 1), model.cfg.decoder_start_token_id, jnp.int32)
    whole_logits, whole_cache = generate.cached_step(model, variables["params"], attention_mask)(tokens, cache, 0)
    split_logits, split_changing = generate.cached_step(model, variables["params"], attention_mask, fixed)(tokens, changing, 0)
    np.testing.assert_array_equal(np.asarray(whole_logits), np.asarray(split_logits))
    jax.tree.map(np.testing.assert_array_equal, generate.split_cache(whole_cache)[0], split_changing)


@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=4), dict(num_beams=4, length_penalty=2.0, early_stopping="never")])
def test_generation_equals_huggingface(bart, options):
    """The tokens of HF `generate` with every extra processor off (forced BOS/EOS, n-gram blocking,
    repetition penalty): greedy, and beam search under HF's default and 'never' stopping rules.
    On this batch the rows end at different steps (greedy: after 1, 10 and 1 tokens and at max_length),
    and greedy and beam 4 differ (row 0 runs to max_length in the beam)."""
    import torch
    import transformers

    reference, model, variables = bart
    input_ids, attention_mask = source_batch(model.cfg.vocab_size)
    settings = transformers.GenerationConfig(
        do_sample=False, max_length=MAX_LENGTH, min_length=0, no_repeat_ngram_size=0, repetition_penalty=1.0,
        forced_bos_token_id=None, forced_eos_token_id=None, length_penalty=1.0, early_stopping=False, **BART_IDS,
    )
    settings.update(**options)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(input_ids, dtype=torch.long), attention_mask=torch.tensor(attention_mask, dtype=torch.long), generation_config=settings
        ).numpy()
    tokens = generate.generate(model, variables, input_ids, attention_mask, max_length=MAX_LENGTH, **options)
    np.testing.assert_array_equal(tokens, expected)


# ------------------------------------------------------------------------------- bertjax generate

WORDS = "the a cat dog sat ran on in mat park big small red blue old new one two three four and but or it is was we they see saw"


def test_generate_verb_writes_one_line_per_input_as_huggingface_generates(tmp_path, monkeypatch, capsys):
    """A random HF BART directory with a WordPiece vocabulary ([CLS] text [SEP] framing), and the bertjax
    workdir `bertjax convert` makes of it: three lines in
    batches of two (the second padded with a filler row), each output the text of HF's tokens (one
    ends early at EOS, two run to max_length)."""
    import io

    import torch
    import transformers

    from bertjax import cli
    from bertjax.data import tokenizer as tokenizer_lib

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split(), "##s", "##ed", "##ing", ".", ","]
    pieces += [f"[unused{i}]" for i in range(48 - len(pieces))]
    (tmp_path / "vocab.txt").write_text("\n".join(pieces) + "\n")
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3)  # [SEP] starts, as in the seq2seq data
    reference = random_bart(tmp_path, **ids)
    lines = ["the cat sat on the mat.", "two red dogs ran in the park", "we saw it"]

    hf_dir, workdir = tmp_path, tmp_path / "converted"
    assert cli.main(["convert", "--from", str(hf_dir), "--to", str(workdir)]) == 0
    capsys.readouterr()
    outputs = {}
    for source in (hf_dir, workdir):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\n".join(lines).encode() + b"\n")))
        assert cli.main(["generate", "--workdir", str(source), "--batch-size", "2", "--max-length", "12"]) == 0
        outputs[source] = capsys.readouterr().out.splitlines()
    assert outputs[workdir] == outputs[hf_dir]
    outputs = outputs[hf_dir]

    tok = tokenizer_lib.load(tmp_path)
    sources = tok.encode_batch(lines)
    settings = transformers.GenerationConfig(do_sample=False, num_beams=1, max_length=12, forced_eos_token_id=None, **ids)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(sources["input_ids"], dtype=torch.long), attention_mask=torch.tensor(sources["attention_mask"]), generation_config=settings
        ).numpy()
    texts = [tok.decode([i for i in row[1:].tolist() if not tok.is_special[i]]) for row in expected]
    assert outputs == texts
    assert len(set(outputs)) == 3 and all(outputs)


def test_generate_on_an_encoder_only_model_names_the_problem(tmp_path, capsys):
    from bertjax import cli
    from bertjax import config as config_lib
    from bertjax.convert import hf
    from bertjax.models import BertConfig

    workdir, hf_dir = tmp_path / "run", tmp_path / "hf"
    workdir.mkdir(), hf_dir.mkdir()
    (workdir / "config.json").write_text(config_lib.to_json(config_lib.pretrain_config()))
    (hf_dir / "config.json").write_text(json.dumps(hf.hf_config_from(BertConfig.from_config(config_lib.model_config()))))
    for source, kind in ((workdir, "an encoder-only run"), (hf_dir, "a HuggingFace BERT (encoder-only)")):
        assert cli.main(["generate", "--workdir", str(source)]) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"bertjax generate: --workdir {source}: {kind}") and "BART" in error and "\n" not in error
    assert cli.main(["generate", "--workdir", str(workdir), "--num-beams", "0"]) == 1
    assert "--num-beams 0" in capsys.readouterr().err


def test_a_bart_tokenizer_json_frames_and_decodes_the_text(tmp_path):
    """A HuggingFace BART directory's byte-level BPE tokenizer.json (no BERT special tokens): its own
    post-processor frames the source <s> ... </s>, an overlong one keeps </s>, and generated ids decode
    to the text up to EOS without the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from bertjax.models.seq2seq import Seq2SeqConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([WORDS] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = Seq2SeqConfig(vocab_size=320, hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8, **BART_IDS)

    text = generate._Text(tmp_path, cfg)
    (row, long_row), cut = text.encode(["the cat sat", " ".join(WORDS.split() * 3)], max_length=16)
    assert row[0] == 0 and row[-1] == 2 and cut == 1 and len(long_row) == 16 and long_row[-1] == 2
    generated = [BART_IDS["decoder_start_token_id"], *row[1:-1], 2, 1, 1]
    assert text.decode(generated) == "the cat sat"
