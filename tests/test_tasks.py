"""Task readers on the real files and on tiny fixtures; labels; encoding; QA span recovery through doc stride."""

import numpy as np
import pytest

from bertjax.data import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.eval import squad


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shared_data):
    lines = (shared_data / "glue/SST-2/train.tsv").read_text(encoding="utf-8").splitlines()[1:3000]
    lines += [p["context"] for a in __import__("json").loads((shared_data / "squad-format/xquad.en.json").read_text())["data"][:20] for p in a["paragraphs"]]
    path = tokenizer_lib.train_from_sentences(lines, 600, tmp_path_factory.mktemp("tok"))
    return tokenizer_lib.load(path)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_glue_tsv_real_files(shared_data):
    sst2 = tasks.read_tsv(shared_data / "glue/SST-2/dev.tsv", "text", None, "label", header=True)
    assert len(sst2) == 872 and {e.label for e in sst2} == {"0", "1"}
    assert sst2[0].texts == ("it 's a charming and often affecting journey .",) and sst2[0].where.endswith("dev.tsv:2")
    cola = tasks.read_tsv(shared_data / "glue/CoLA/dev.tsv", 3, None, 1, header=False)
    assert len(cola) == 527 and {e.label for e in cola} == {"0", "1"}
    chinese = tasks.read_tsv(shared_data / "chinese/ChnSentiCorp/dev.tsv", 0, None, 1, header=False)
    assert {e.label for e in chinese} == {"positive", "negative"}


def test_tsv_pairs_and_malformed_row(tmp_path):
    path = write(tmp_path, "mnli.tsv", "index\tsentence1\tsentence2\tgold_label\n0\tA man.\tA person.\tentailment\n1\tonly two\tfields\n")
    with pytest.raises(tasks.TaskDataError, match=r"mnli.tsv:3: 3 tab-separated field\(s\), but data.text_a='sentence1', data.text_b='sentence2', data.label='gold_label' need at least 4"):
        tasks.read_tsv(path, "sentence1", "sentence2", "gold_label")
    path = write(tmp_path, "ok.tsv", "index\tsentence1\tsentence2\tgold_label\n0\tA man.\tA person.\tentailment\n")
    (example,) = tasks.read_tsv(path, "sentence1", "sentence2", "gold_label")
    assert example.texts == ("A man.", "A person.") and example.label == "entailment"
    with pytest.raises(tasks.TaskDataError) as error:
        tasks.read_tsv(path, "sentence", None, "gold_label")
    assert str(error.value) == (
        f"{path}:1: no column 'sentence' (config data.text_a); the header line has ['index', 'sentence1', 'sentence2', 'gold_label']: "
        "set --config.data.text_a to one of them, or, if that line is data, --config.data.header=false and column indices"
    )
    with pytest.raises(tasks.TaskDataError) as error:
        tasks.read_tsv(path, 1, None, "gold_label", header=False)
    assert str(error.value) == (
        f"{path}: column 'gold_label' (config data.label) is a name but data.header=false; give a 0-based column index "
        "(line 1 has 4 fields: 'index\\tsentence1\\tsentence2\\tgold_label')"
    )
    with pytest.raises(tasks.TaskDataError) as error:
        tasks.read_tsv(path, 3, None, 5, header=False)
    assert str(error.value) == (
        f"{path}:1: 4 tab-separated field(s), but data.text_a=3, data.label=5 need at least 6: 'index\\tsentence1\\tsentence2\\tgold_label' "
        "(if it is a header line, set --config.data.header=true and name the columns)"
    )


def test_text_files_are_repaired_or_refused(tmp_path, caplog):
    """CRLF and a BOM are read silently; Latin-1 bytes are replaced and counted; empty and binary files are errors."""
    path = tmp_path / "crlf.tsv"
    path.write_bytes("\ufeffsentence\tlabel\r\nfine film\t1\r\nsoso\t0\r\n".encode())
    assert [(e.texts, e.label, e.where) for e in tasks.read_tsv(path, "sentence", None, "label")] == [
        (("fine film",), "1", f"{path}:2"),
        (("soso",), "0", f"{path}:3"),
    ]
    path = tmp_path / "latin1.tsv"
    path.write_bytes("sentence\tlabel\nun film tr\u00e8s beau\t1\ncaf\u00e9 cr\u00e8me\t0\n".encode("latin-1"))
    with caplog.at_level("WARNING"):
        examples = tasks.read_tsv(path, "sentence", None, "label")
    assert [e.texts[0] for e in examples] == ["un film tr\ufffds beau", "caf\ufffd cr\ufffdme"]
    assert f"{path}:2: not UTF-8; replaced 3 undecodable byte sequence(s) with U+FFFD" in caplog.text
    for name, content, message in [
        ("empty.tsv", b"", "is empty"),
        ("blank.conll", b"\n\n  \n", "is empty"),
        ("binary.tsv", b"sentence\tlabel\n\x89PNG\x00\x00\x01", "is not a text file (a NUL byte at offset 19): give a UTF-8 text file"),
        ("utf16.tsv", "sentence\tlabel\n".encode("utf-16"), "is UTF-16: re-save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)"),
    ]:
        (tmp_path / name).write_bytes(content)
        reader = tasks.read_conll if name.endswith(".conll") else lambda p: tasks.read_tsv(p, "sentence", None, "label")
        with pytest.raises(tasks.TaskDataError) as error:
            reader(tmp_path / name)
        assert str(error.value) == f"{tmp_path / name} {message}"
    with pytest.raises(tasks.TaskDataError) as error:
        tasks.read_tsv(tmp_path, "sentence", None, "label")
    assert str(error.value) == f"{tmp_path} is a directory: give a file (it holds ['binary.tsv', 'blank.conll', 'crlf.tsv', 'empty.tsv', 'latin1.tsv'])"


def test_labels_order_unseen_and_roundtrip(tmp_path):
    labels = tasks.Labels.from_records(["neutral", "entailment", "contradiction", "entailment"])
    assert labels.names == ["contradiction", "entailment", "neutral"]
    assert tasks.Labels.from_records(["10", "2", "1"]).names == ["1", "2", "10"]
    assert tasks.Labels.from_records(["positive"], declared=["negative", "positive"]).names == ["negative", "positive"]
    with pytest.raises(tasks.TaskDataError) as error:
        labels.encode("maybe", "dev.tsv:7")
    assert str(error.value) == (
        "dev.tsv:7: label 'maybe' does not occur in the training data (data.train has ['contradiction', 'entailment', 'neutral']): "
        "fix the label, check that data.label names the label column, or declare every label with --config.task.labels"
    )
    declared = tasks.Labels.from_records(["positive"], declared=["negative", "positive"])
    with pytest.raises(tasks.TaskDataError, match=r"dev.tsv:3: label 'neutral' is not one of config.task.labels \['negative', 'positive'\]"):
        declared.encode("neutral", "dev.tsv:3")
    labels.save(tmp_path / "labels.json")
    assert tasks.Labels.load(tmp_path / "labels.json").names == labels.names


def test_conll_real_and_fixture(shared_data, tmp_path):
    sentences = tasks.read_conll(shared_data / "conll2003/eng.testa")
    assert len(sentences) > 3000
    assert sentences[0].words[:3] == ("CRICKET", "-", "LEICESTERSHIRE") and sentences[0].tags[2] == "B-ORG"
    assert {tag for s in sentences for tag in s.tags} == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"}
    path = write(tmp_path, "x.conll", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\n\nbad\n")
    with pytest.raises(tasks.TaskDataError, match=r"x.conll:6: expected a word and a tag column \(config data.label=-1\), got \['bad'\]"):
        tasks.read_conll(path)
    path = write(tmp_path, "z.conll", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ O\n")
    with pytest.raises(tasks.TaskDataError) as error:
        tasks.read_conll(path)
    assert str(error.value) == f"{path}:4: 3 columns ['rejects', 'VBZ', 'O'], but line 3 (the first word line) has 4; every word line needs the same columns"
    path = write(tmp_path, "y.conll", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\n\nHi UH O O\n")
    assert [(s.words, s.tags) for s in tasks.read_conll(path)] == [(("EU", "rejects"), ("I-ORG", "O")), (("Hi",), ("O",))]


def test_conllu_skips_multiword_and_empty_nodes(shared_data, tmp_path):
    sentences = tasks.read_conllu(shared_data / "ud-english-ewt/en_ewt-ud-dev.conllu")
    assert len(sentences) > 2000
    words = [w for s in sentences for w in s.words]
    assert "didn't" not in words and "n't" in words
    assert {tag for s in sentences for tag in s.tags} <= {
        "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X", "_",
    }  # fmt: skip
    row = "\t".join
    text = "\n".join(
        [
            "# text = I didn't go",
            row(["1", "I", "I", "PRON", "PRP", "_", "3", "nsubj", "_", "_"]),
            row(["2-3", "didn't", "_", "_", "_", "_", "_", "_", "_", "_"]),
            row(["2", "did", "do", "AUX", "VBD", "_", "4", "aux", "_", "_"]),
            row(["3", "n't", "not", "PART", "RB", "_", "4", "advmod", "_", "_"]),
            row(["3.1", "go", "go", "VERB", "VB", "_", "_", "_", "_", "_"]),
            row(["4", "go", "go", "VERB", "VB", "_", "0", "root", "_", "_"]),
            "",
            row(["1", "bad", "line"]),
            "",
        ]
    )
    path = write(tmp_path, "x.conllu", text)
    with pytest.raises(tasks.TaskDataError, match=r"x.conllu:9: a CoNLL-U line has 10 tab-separated fields"):
        tasks.read_conllu(path)
    path = write(tmp_path, "y.conllu", text.rsplit("\n\n", 2)[0] + "\n")
    (sentence,) = tasks.read_conllu(path)
    assert sentence.words == ("I", "did", "n't", "go") and sentence.tags == ("PRON", "AUX", "PART", "VERB")


def test_squad_real_and_mismatched_offset(shared_data, tmp_path, caplog):
    examples = tasks.read_squad(shared_data / "squad-format/xquad.en.json")
    assert len(examples) == 1190 and all(e.answers for e in examples)
    assert all(e.context[s : s + len(a)] == a for e in examples for a, s in zip(e.answers, e.answer_starts) if s >= 0)
    json_text = '{"data": [{"paragraphs": [{"context": "Paris is in France. Paris is big.", "qas": [' + (
        '{"id": "a", "question": "Where?", "answers": [{"text": "France", "answer_start": 12}]},'
        '{"id": "b", "question": "What?", "answers": [{"text": "Paris", "answer_start": 3}]},'
        '{"id": "b2", "question": "What?", "answers": [{"text": "Paris", "answer_start": 18}]},'
        '{"id": "d", "question": "What?", "answers": [{"text": "Lyon", "answer_start": 0}]},'
        '{"id": "c", "question": "Who?", "answers": [], "is_impossible": true}]}]}]}'
    )
    path = write(tmp_path, "s.json", json_text)
    with caplog.at_level("WARNING"):
        a, b, b2, d, c = tasks.read_squad(path)
    assert a.answer_starts == (12,) and c.answers == ()
    assert b.answer_starts == (0,) and b2.answer_starts == (20,), "moved to the nearest occurrence of the text"
    assert d.answer_starts == (-1,) and d.answers == ("Lyon",), "text absent: kept for scoring, not trained on"
    assert (
        f"{path}: 2 answers' answer_start did not point at their text: moved to the nearest occurrence of the text; "
        f"first: {path}: data[0].paragraphs[0] question 'b' (answer_start 3, text 'Paris')"
    ) in caplog.text
    assert f"{path}: 1 answers' text does not occur in their passage: kept for scoring, not trained on; first: {path}: data[0].paragraphs[0] question 'd'" in caplog.text


def test_squad_bad_json_names_line_and_column(tmp_path):
    path = write(tmp_path, "cut.json", '{"data": [{"paragraphs": [\n  {"context": "Paris is in France.", "qas": [{"id": "a", "quest')
    with pytest.raises(tasks.TaskDataError) as error:
        tasks.read_squad(path)
    assert str(error.value) == f"{path}:2:58: not valid JSON (Unterminated string starting at); is the file truncated?"
    path = write(tmp_path, "list.json", "[1, 2]")
    with pytest.raises(tasks.TaskDataError, match="list.json: not a SQuAD file: expected"):
        tasks.read_squad(path)
    path = write(tmp_path, "noq.json", '{"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "a", "answers": []}]}]}]}')
    with pytest.raises(tasks.TaskDataError) as error:
        tasks.read_squad(path)
    assert str(error.value).startswith(f"{path}: data[0].paragraphs[0] question 'a': not SQuAD (no key 'question'); articles hold 'paragraphs'")
    path = write(tmp_path, "noctx.json", '{"data": [["not an article"]]}')
    with pytest.raises(tasks.TaskDataError, match=r"noctx.json: data\[0\]: not SQuAD \('list' object has no attribute 'get'\)"):
        tasks.read_squad(path)


def test_encode_classification_pairs_and_regression(tokenizer):
    examples = [tasks.TextExample(("a good movie", "a bad film " * 30), "1", "f:1"), tasks.TextExample(("fine",), "0", "f:2")]
    labels = tasks.Labels.from_records(["0", "1"])
    features = tasks.encode_classification(tokenizer, examples[:1], 24, labels)
    ids, types, mask = features["input_ids"][0], features["token_type_ids"][0], features["attention_mask"][0]
    assert mask.sum() == 24 and ids[0] == tokenizer.cls_id and list(ids).count(tokenizer.sep_id) == 2
    # Longest-first truncation keeps the short first text whole.
    first = tokenizer.encode("a good movie")
    assert list(ids[1 : 1 + len(first)]) == first and types[1 + len(first)] == 0 and types[2 + len(first)] == 1
    assert features["label"].tolist() == [1]
    regression = tasks.encode_classification(tokenizer, [tasks.TextExample(("x", "y"), "3.8", "f:1")], 16, None)
    assert regression["label"].dtype == np.float32 and regression["label"][0] == pytest.approx(3.8)


def test_encode_tagging_labels_first_piece_only(tokenizer):
    sentence = tasks.TaggedSentence(("Unbelievably", "good", "Zyxwvut"), ("B-X", "O", "I-Y"), "f:1")
    labels = tasks.Labels.from_records(["B-X", "I-Y", "O"])
    features = tasks.encode_tagging(tokenizer, [sentence], 32, labels)
    pieces = [tokenizer.encode(word) for word in sentence.words]
    assert len(pieces[2]) > 1
    positions = features["word_positions"][0].tolist()
    assert positions == [1, 1 + len(pieces[0]), 1 + len(pieces[0]) + len(pieces[1])]
    tag_ids = features["tag_ids"][0]
    assert [tag_ids[p] for p in positions] == [0, 2, 1]
    assert (tag_ids >= 0).sum() == 3  # every other piece, [CLS], [SEP] and padding are ignored
    truncated = tasks.encode_tagging(tokenizer, [sentence], len(pieces[0]) + len(pieces[1]) + 2, labels)
    assert truncated["word_positions"][0].tolist() == positions[:2] + [-1]


def test_encode_tagging_dev_tag_unseen_in_train_is_counted_and_left_out_of_the_loss(tokenizer, caplog):
    """A rare tag missing from the training data must not stop a run: it stays gold for scoring, no loss."""
    labels = tasks.Labels.from_records(["B-X", "O"])
    sentences = [tasks.TaggedSentence(("good", "Zyxwvut"), ("O", "B-MISC"), "dev.conll:7"), tasks.TaggedSentence(("fine",), ("B-MISC",), "dev.conll:10")]
    with caplog.at_level("WARNING"):
        features = tasks.encode_tagging(tokenizer, sentences, 32, labels)
    assert features["tag_ids"][0, features["word_positions"][0, 0]] == 1 and features["tag_ids"][0, features["word_positions"][0, 1]] == -1
    assert (features["tag_ids"][1] >= 0).sum() == 0
    assert "2 words carry tags the label set ['B-X', 'O'] lacks (B-MISC x2; first in the sentence at dev.conll:7)" in caplog.text


def test_squad_doc_stride_recovers_gold_span_from_one_hot_logits(shared_data, tokenizer):
    examples = tasks.read_squad(shared_data / "squad-format/xquad.en.json")[:60]
    features = tasks.encode_squad(tokenizer, examples, max_seq_length=96, doc_stride=32, max_query_length=24)
    windows_per_example = np.bincount(features["example_index"])
    assert windows_per_example.max() >= 3  # long passages really are split
    logits_shape = features["input_ids"].shape
    start_logits, end_logits = np.zeros(logits_shape), np.zeros(logits_shape)
    rows = np.arange(len(start_logits))
    start_logits[rows, features["start_position"]] = 10.0
    end_logits[rows, features["end_position"]] = 10.0
    start_logits[:, 1] = end_logits[:, 1] = 50.0  # a question token scored highest is still never an answer
    predicted = squad.answers(
        [e.context for e in examples], features["example_index"], features["offsets"], features["max_context"], start_logits, end_logits,
        max_answer_length=64,  # a 600-piece vocabulary splits long answers into many pieces
    )
    # An answer longer than a window's max-context stretch can be lost (as in Google's run_squad): allow one.
    assert sum(e.answers[0] != text for e, text in zip(examples, predicted)) <= 1
    scores = squad.evaluate(dict(zip([e.qid for e in examples], predicted)), {e.qid: e.answers for e in examples})
    assert scores["exact_match"] > 98.0
    # SQuAD v2.0: with all mass on [CLS] every question is unanswerable.
    null_start, null_end = np.zeros(logits_shape), np.zeros(logits_shape)
    null_start[:, 0] = null_end[:, 0] = 10.0
    empty = squad.answers([e.context for e in examples], features["example_index"], features["offsets"], features["max_context"], null_start, null_end, allow_no_answer=True)
    assert empty == [""] * len(examples)


def test_squad_spans_inside_words_and_multibyte_characters(tokenizer):
    context = "Le café ouvrit le 1996-08-30, à Zürich."
    example = tasks.QAExample("q", "When?", context, ("1996",), (context.index("1996"),), "f:1")
    features = tasks.encode_squad(tokenizer, [example], max_seq_length=64, doc_stride=16, max_query_length=8)
    start, end = features["start_position"][0], features["end_position"][0]
    assert context[features["offsets"][0, start, 0] : features["offsets"][0, end, 1]] == "1996"
    # Every passage piece maps to characters of the passage, in order.
    spans = features["offsets"][0][features["offsets"][0, :, 0] >= 0]
    assert spans[0, 0] == 0 and spans[-1, 1] == len(context) and np.all(np.diff(spans[:, 0]) >= 0)
