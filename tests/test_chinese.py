"""Chinese text as the shared data sets have it (ChnSentiCorp reviews, XQuAD zh passages): sentence
splitting, a tokenizer trained on it (one piece per character, every character covered), and
whole-word masking with jieba's words."""

import json

import numpy as np
import pytest

from bertjax.data import corpus, masking
from bertjax.data import tokenizer as tokenizer_lib

jieba = pytest.importorskip("jieba")


def reviews(shared_data, split="train"):
    lines = (shared_data / "chinese" / "ChnSentiCorp" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[0] for line in lines if line.strip()]


def xquad_contexts(shared_data):
    data = json.loads((shared_data / "squad-format" / "xquad.zh.json").read_text(encoding="utf-8"))["data"]
    return [paragraph["context"] for article in data for paragraph in article["paragraphs"]]


@pytest.fixture(scope="module")
def text(shared_data):
    # ChnSentiCorp is simplified Chinese; the seeds' example is traditional (貓).
    return reviews(shared_data)[:4000] + xquad_contexts(shared_data) + ["貓追狗。貓追老鼠。"]


@pytest.fixture(scope="module")
def tok(text, tmp_path_factory):
    return tokenizer_lib.load(tokenizer_lib.train_from_sentences(text, 8192, tmp_path_factory.mktemp("zh"), description="chinese"))


def test_reviews_split_at_chinese_punctuation(shared_data):
    documents = [corpus.split_sentences(review) for review in reviews(shared_data)]
    single = sum(len(document) < 2 for document in documents)
    # Splitting at . ! ? before a capital alone leaves 9,547 of the 9,600 reviews one sentence long;
    # what is left are reviews punctuated with commas or spaces only.
    assert len(documents) == 9600 and single < 2700
    assert sum(map(len, documents)) > 32_000
    assert corpus.split_sentences("房间太小。其他的都一般。。。。。。。。。") == ["房间太小。", "其他的都一般。。。。。。。。。"]
    assert corpus.split_sentences("他说：“好。”然后走了！真的吗？是的……再见") == ["他说：“好。”", "然后走了！", "真的吗？", "是的……", "再见"]
    assert corpus.split_sentences("「你好。」他说。Mr. Smith came. He left.") == ["「你好。」", "他说。", "Mr. Smith came.", "He left."]
    # . ! ? ; end a sentence after an ideograph (as reviews type them), not inside a number.
    assert corpus.split_sentences("不错!下次再来.接23.6寸显示器") == ["不错!", "下次再来.", "接23.6寸显示器"]


def test_every_character_is_one_piece_and_the_seeds_example_holds(tok, text):
    out = tok.encode_batch(["貓追狗", "貓追老鼠"], padding="longest")
    assert out["input_ids"].shape == (2, 6) and out["attention_mask"].sum(1).tolist() == [5, 6]
    assert [tok.id_to_piece(i) for i in out["input_ids"][1]] == ["[CLS]", "貓", "追", "老", "鼠", "[SEP]"]
    assert out["input_ids"][0, -1] == tok.pad_id
    # Every CJK character of the training text, traditional or simplified, however rare, is its own
    # piece (no byte fallback); no stand-alone '▁' is left before a Chinese character (one stays before
    # a Latin word with no '▁' piece of its own, "▁" "LED", where it marks the word's start).
    characters = sorted({c for line in text for c in line if tokenizer_lib.CJK_IDEOGRAPH.match(c)})
    assert len(characters) > 3500
    assert all(len(ids) == 1 for ids in tok.encode_many(characters))
    assert [tok.id_to_piece(ids[0]) for ids in tok.encode_many(characters)] == characters
    encoded = tok.encode_many(text[:2000])
    pairs = [(ids[k], ids[k + 1]) for ids in encoded for k in range(len(ids) - 1)]
    assert tok.space_id >= 0 and not any(a == tok.space_id and tok.is_cjk[b] for a, b in pairs)
    assert sum(a == tok.space_id for a, _ in pairs) < 1e-3 * len(pairs)
    # Byte fallback is left to rare symbols (character_coverage), such as emoji.
    assert sum(tok.id_to_piece(i).startswith("<0x") for ids in encoded for i in ids) < 1e-3 * len(pairs)
    assert sum(map(len, encoded)) < 1.05 * sum(len(line.replace(" ", "")) for line in text[:2000])
    assert tok.decode(tok.encode(text[5])) == text[5].replace(" ", "").replace("，", ",")


def test_a_vocabulary_smaller_than_the_character_set_is_refused_with_the_size_to_set(shared_data, tmp_path):
    text = reviews(shared_data, "dev")
    with pytest.raises(tokenizer_lib.TokenizerError, match=r"^chinese has 2\d\d\d distinct CJK characters .* set model.vocab_size .* to at least \d+, not 1000$"):
        tokenizer_lib.train_from_sentences(text, 1000, tmp_path, description="chinese")
    # Room for the characters but not for the other characters sentencepiece needs: the same message.
    needed = len({c for line in text for c in line if tokenizer_lib.CJK_IDEOGRAPH.match(c)}) + 5 + 256
    with pytest.raises(tokenizer_lib.TokenizerError, match=r"distinct CJK characters .* to at least (\d+)") as caught:
        tokenizer_lib.train_from_sentences(text, needed + 40, tmp_path, description="chinese")
    suggested = int(caught.value.args[0].split("at least ")[1].split(",")[0])
    assert tokenizer_lib.load(tokenizer_lib.train_from_sentences(text, suggested, tmp_path / "ok")).vocab_size <= suggested


def masked(out, shape):
    chosen = np.zeros(shape, bool)
    np.put_along_axis(chosen, out["masked_positions"], out["masked_weights"].astype(bool), axis=1)
    return chosen


def test_whole_word_masking_masks_jieba_words_whole_at_the_configured_rate(tok, shared_data):
    ids = tok.encode_batch(reviews(shared_data, "dev")[:250], max_length=128, padding="max_length")["input_ids"]
    spec = masking.MaskingSpec(rate=0.15, max_predictions=20, whole_word=True, seed=3)
    masker = masking.Masker(spec, tok)
    out = masker(ids, np.zeros(len(ids), np.int64), np.arange(len(ids)))
    chosen = masked(out, ids.shape)
    real = (~tok.is_special[ids]).sum(1)
    budget = np.clip(np.floor(0.15 * real + 0.5), 1, 20)
    # A word that does not fit the rest of the budget is skipped: the rate is met from below.
    assert (chosen.sum(1) <= budget).all() and chosen.sum() > 0.95 * budget.sum()
    assert 0.13 < chosen.sum() / real.sum() < 0.15
    # Every masked Chinese character belongs to a jieba word (segmenting the row's run of characters
    # independently) whose characters are all masked; many masked words have several characters.
    characters = np.array([masking._ideograph(piece) for piece in tok.pieces], object)
    words = whole = multi = 0
    for row in range(len(ids)):
        chinese = characters[ids[row]] != ""
        positions = np.flatnonzero(chinese)
        for run in np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1):
            offset = 0
            for word in jieba.lcut("".join(characters[ids[row, run]]), HMM=False):
                span = chosen[row, run[offset : offset + len(word)]]
                offset += len(word)
                if span.any():
                    words += 1
                    whole += span.all()
                    multi += len(word) > 1
    assert words > 300 and whole == words and multi > 0.4 * words
    # Token-level masking of the same rows splits words.
    token_level = masked(masking.Masker(masking.MaskingSpec(rate=0.15, seed=3), tok)(ids, np.zeros(len(ids), np.int64), np.arange(len(ids))), ids.shape)
    assert (token_level != chosen).any()


def test_chinese_masks_are_a_pure_function_of_seed_epoch_and_example(tok, shared_data):
    ids = tok.encode_batch(reviews(shared_data, "dev")[:64], max_length=64, padding="max_length")["input_ids"]
    spec = masking.MaskingSpec(rate=0.2, max_predictions=15, whole_word=True, seed=7)
    example = np.arange(100, 164)
    first = masking.Masker(spec, tok)(ids, np.ones(64, np.int64), example)
    order = np.random.default_rng(0).permutation(64)
    again = masking.Masker(spec, tok)(ids[order], np.ones(64, np.int64), example[order])
    for key in first:
        np.testing.assert_array_equal(first[key][order], again[key])
    other_epoch = masking.Masker(spec, tok)(ids, np.full(64, 2), example)
    assert (other_epoch["masked_positions"] != first["masked_positions"]).any()
    spans = masking.Masker(masking.MaskingSpec(rate=0.2, max_predictions=15, span=True, seed=7), tok)(ids, np.ones(64, np.int64), example)
    assert spans["masked_weights"].sum() > 0.9 * first["masked_weights"].sum()


def test_xquad_zh_features_have_a_piece_per_character_and_recover_the_answers(tok, shared_data):
    from bertjax.data import tasks
    from bertjax.eval import squad

    examples = tasks.read_squad(shared_data / "squad-format/xquad.zh.json")[:40]
    features = tasks.encode_squad(tok, examples, max_seq_length=128, doc_stride=48, max_query_length=32)
    ids = features["input_ids"]
    assert not ((ids[:, :-1] == tok.space_id) & tok.is_cjk[ids[:, 1:]]).any()
    # A passage piece is one character (a Chinese one) or a Latin word or part of one.
    offsets = features["offsets"][features["offsets"][:, :, 0] >= 0]
    chinese = tok.is_cjk[ids[features["offsets"][:, :, 0] >= 0]]
    assert (offsets[chinese, 1] - offsets[chinese, 0] == 1).all() and chinese.mean() > 0.8
    shape = ids.shape
    start_logits, end_logits = np.zeros(shape), np.zeros(shape)
    rows = np.arange(shape[0])
    start_logits[rows, features["start_position"]] = 10.0
    end_logits[rows, features["end_position"]] = 10.0
    predicted = squad.answers([e.context for e in examples], features["example_index"], features["offsets"], features["max_context"], start_logits, end_logits, max_answer_length=64)
    assert sum(e.answers[0] == text for e, text in zip(examples, predicted)) >= 39
