"""Generation speed: bertjax `generate` vs HuggingFace `generate`, tokens per second, same model and batch.

    python experiments/generation_speed/bench.py                         # tiny and small, greedy and beam 4
    python experiments/generation_speed/bench.py --sizes small --repeats 5

One random-weight BartForConditionalGeneration per size (the shapes of configs/seq2seq.py's presets),
saved and converted with `bertjax.convert.hf`, so both sides run the same weights. A batch of 32
random sources of 32 tokens (padded rows included); every sequence is made to run to `--max-length`
(min_length = max_length: EOS forbidden), so both sides generate exactly batch x (max_length - 1)
tokens and tokens/s counts those (for beam search: of the returned sequences, not of every beam).
The tokens are compared too: both sides must agree. bertjax is timed after its one compilation (reported
apart); HF after one warm-up call; the two alternate, `--repeats` times each, and the median is kept.
Prints one JSON line per (size, beams) and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np

SIZES = {"tiny": (2, 128, 2), "small": (4, 512, 8)}  # layers per stack, hidden, heads (configs/seq2seq.py)
IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def reference_model(size: str, vocab_size: int, directory: str):
    import torch
    import transformers

    layers, hidden, heads = SIZES[size]
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=vocab_size, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * hidden, decoder_ffn_dim=4 * hidden,
        max_position_embeddings=512, forced_eos_token_id=None, **IDS,
    )
    model = transformers.BartForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    return model


def sources(batch: int, length: int, vocab_size: int):
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, vocab_size, (batch, length)).astype(np.int32)
    attention_mask = np.ones_like(input_ids)
    for row in range(0, batch, 4):  # every fourth row padded to half length
        input_ids[row, length // 2 :], attention_mask[row, length // 2 :] = IDS["pad_token_id"], 0
    input_ids[:, 0] = IDS["bos_token_id"]
    return input_ids, attention_mask


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import jax
    import torch
    import transformers

    from bertjax.convert import hf
    from bertjax.models import generate

    rows = []
    for size in args.sizes:
        directory = tempfile.mkdtemp(prefix=f"bart_{size}_")
        reference = reference_model(size, args.vocab_size, directory)
        model, variables = hf.load(directory)
        input_ids, attention_mask = sources(args.batch, args.source_length, args.vocab_size)
        torch_ids, torch_mask = torch.tensor(input_ids, dtype=torch.long), torch.tensor(attention_mask, dtype=torch.long)
        for beams in args.beams:
            options = dict(num_beams=beams, max_length=args.max_length, min_length=args.max_length)
            settings = transformers.GenerationConfig(
                do_sample=False, no_repeat_ngram_size=0, repetition_penalty=1.0, forced_bos_token_id=None,
                forced_eos_token_id=None, length_penalty=1.0, early_stopping=False, **IDS, **options,
            )

            def ours():
                return generate.generate(model, variables, input_ids, attention_mask, **options)

            def theirs():
                with torch.no_grad():
                    return reference.generate(torch_ids, attention_mask=torch_mask, generation_config=settings).numpy()

            start = time.perf_counter()
            tokens = ours()
            compile_s = time.perf_counter() - start
            expected = theirs()
            times = {"bertjax": [], "transformers": []}
            for _ in range(args.repeats):
                for name, function in (("bertjax", ours), ("transformers", theirs)):
                    start = time.perf_counter()
                    function()
                    times[name].append(time.perf_counter() - start)
            generated = args.batch * (args.max_length - 1)
            row = {
                "size": size,
                "beams": beams,
                "batch": args.batch,
                "generated_tokens": generated,
                "bertjax_s": statistics.median(times["bertjax"]),
                "transformers_s": statistics.median(times["transformers"]),
                "bertjax_compile_s": compile_s,
                "same_tokens": bool(tokens.shape == expected.shape and (tokens == expected).all()),
            }
            row["bertjax_tokens_per_s"] = generated / row["bertjax_s"]
            row["transformers_tokens_per_s"] = generated / row["transformers_s"]
            row["ratio"] = row["transformers_s"] / row["bertjax_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)

    print(f"\njax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print("| size | beams | bertjax tokens/s | transformers tokens/s | ratio | bertjax compile (s) | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row['size']} | {row['beams']} | {row['bertjax_tokens_per_s']:,.0f} | {row['transformers_tokens_per_s']:,.0f} | "
            f"**{row['ratio']:.2f}x** | {row['bertjax_compile_s']:.1f} | {row['same_tokens']} |"
        )


if __name__ == "__main__":
    sys.exit(main())
