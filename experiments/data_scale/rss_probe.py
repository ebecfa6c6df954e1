"""How much of a memory-mapped token file lands in a reader's RSS, and does releasing the pages help?

  python experiments/data_scale/rss_probe.py --mb 400 --release-every 0   # never release
  python experiments/data_scale/rss_probe.py --mb 400 --release-every 1   # madvise(MADV_DONTNEED) before every gather

Writes MB of random int32 tokens to --path (once), maps it the way the loader does
(as `bertjax.data.corpus.map_random`: read-only, shared, MADV_RANDOM), then gathers like a batch of
256 two-segment instances (512 random runs of 64 tokens, 128 KiB) --gathers times, and prints the
CPU time per gather and the peak and final file-backed RSS (RssFile in /proc/self/status).
"""

from __future__ import annotations

import argparse
import mmap
import pathlib
import time

import numpy as np



def rss_mib() -> dict:
    fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith(("VmRSS", "RssFile", "RssAnon")))
    return {key: int(value.split()[0]) // 1024 for key, value in fields.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=400, help="size of the token file, MB")
    parser.add_argument("--release-every", type=int, default=0, help="release the mapped pages before every N-th gather (0: never)")
    parser.add_argument("--gathers", type=int, default=400)
    parser.add_argument("--path", default="/tmp/bertjax_rss_probe_tokens.bin")
    args = parser.parse_args()
    path, count = pathlib.Path(args.path), args.mb * 250_000
    if not path.exists() or path.stat().st_size != 4 * count:
        np.random.default_rng(0).integers(0, 8192, count, dtype=np.int32).tofile(path)
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    mapping.madvise(mmap.MADV_RANDOM)
    tokens = np.frombuffer(mapping, np.int32)
    starts = np.random.default_rng(1).integers(0, count - 64, (args.gathers, 512))
    before, peak = rss_mib()["RssFile"], 0
    cpu = time.process_time()
    for number in range(args.gathers):
        if args.release_every and number % args.release_every == 0:
            mapping.madvise(mmap.MADV_DONTNEED)
        tokens[(starts[number][:, None] + np.arange(64)).reshape(-1)].sum()
        peak = max(peak, rss_mib()["RssFile"])
    cpu = (time.process_time() - cpu) / args.gathers * 1e3
    print(f"{args.mb} MB file, release every {args.release_every or 'never'}: {cpu:.2f} ms CPU a gather; "
          f"file pages in RSS: {before} MiB before, peak {peak} MiB, end {rss_mib()['RssFile']} MiB")


if __name__ == "__main__":
    main()
