"""How do the pretraining pipeline's preparation time and memory grow with the text? (issue 12)

  python experiments/data_scale/bench.py --quick                      # 5 MB, baseline and HEAD (~2 min)
  python experiments/data_scale/bench.py                              # 5, 20, 80 MB
  python experiments/data_scale/bench.py --sizes 5,20,80,320,1280     # up to 1.3 GB (tens of minutes)
  python experiments/data_scale/bench.py --versions baseline          # the baseline alone

For each size of text and each code version it runs the CLI as a user runs it, in a fresh child each time:

  bertjax data stats --config TREE/configs/pretrain.py:tiny --config.data.corpus=TEXT
      --config.data.tokenizer=MODEL --config.data.data_dir=DIR --batches 20

once with DIR empty (cold: tokenize and store the corpus) and once again (warm: read it back), and then
times `bertjax.data.batches` at length 128 with token masking through each version's own
experiments/data_throughput/run.py (its `build_config` and `time_loader`, imported, not copied).

The versions are the baseline (commit 87da076, before issue 12's work) and the new code (`--new`, a
commit, default HEAD), each extracted with `git archive` into the scratch directory and run with
PYTHONPATH pointing at it, so neither is affected by uncommitted edits in the working tree
(`--new-tree PATH` measures a directory as it is instead). Both run in the same invocation,
interleaved size by size, so their ratios are measured under the same load.

What is measured:
  - preparation seconds: the time `data stats` spends before its first batch (inside
    `bertjax.data.inspect.stats`, less the batches it times itself), read by a launcher that calls
    `bertjax.cli.main` with the same arguments and puts a clock around that one function: the
    interpreter's and libraries' start-up, the same for every size, is left out (the command's whole
    wall time is in the JSON rows); beside it, the CPU seconds of that same span (the process and the
    workers it waited for), which a machine shared with other work disturbs far less than the clock;
  - peak RSS: the child's `ru_maxrss` (from `os.wait4`, it covers its waited-for descendants), or the
    sum of the proportional set sizes (Pss) of the child's process tree sampled every 0.25 s, whichever
    is larger: with worker processes the machine holds their sum, which `ru_maxrss` (a maximum over
    single processes) would not show;
  - peak anonymous memory: the sum of RssAnon over the child's process tree, sampled every 0.25 s: RSS
    without the file-backed pages a process maps (the prepared token files are memory-mapped, and the
    page-cache pages a batch touches count in RSS although they are clean, shared and reclaimable);
  - tokens: what the text holds under the fixed tokenizer, counted independently with sentencepiece at
    generation time (and checked against the pipeline's own count where its log gives one).

The text is built from the real corpora in $BERTJAX_SHARED_DATA/corpus (two Gutenberg books and
WikiText-2 valid/test, 4.4 MB), split into 322 documents of sentences by the baseline's own parser and
written one sentence a line with a blank line between documents (BERT's format); repetition r writes
the documents in the order of a permutation seeded with r, until the size (MB = 10^6 bytes) is reached.
The 8k unigram sentencepiece model is trained once on the same four files with the baseline's
`bertjax tokenizer train`. Text, model and baseline tree are kept in --scratch and reused.

It prints a JSON row per size and version, then markdown: a table per version, the ratios new /
baseline, least-squares lines through the sizes extrapolated to 20 GB of text (bytes of RSS per token,
seconds per MB) and issue 12's bars with PASS/FAIL. `--with RESULTS.json` adds an earlier run's rows
(the big sizes take minutes each: measure them once per version and join them).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
BASELINE = "87da076"
SIZES_MB = (5, 20, 80, 320, 1280)
SOURCES = ("moby-dick.txt", "pride-and-prejudice.txt", "wikitext-2-valid.tokens.txt", "wikitext-2-test.tokens.txt")
VOCAB_SIZE = 8192
TARGET_GB = 20  # the extrapolation: BERT's 3.3 B words are about 20 GB of text
GIB = 1 << 30


# ---- inputs: baseline tree, tokenizer, text ----


def shared_corpus() -> list[pathlib.Path]:
    root = pathlib.Path(os.environ.get("BERTJAX_SHARED_DATA", REPO.parent / "shared" / "data")) / "corpus"
    files = [root / name for name in SOURCES]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        sys.exit(f"bench.py: {', '.join(missing)} not found: set BERTJAX_SHARED_DATA to the shared data directory")
    return files


def extracted(scratch: pathlib.Path, rev: str) -> pathlib.Path:
    """The tree of commit `rev`, extracted once under scratch (git archive: no working-tree edits)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True, capture_output=True, text=True).stdout.strip()
    tree = scratch / f"tree_{sha}"
    if not (tree / "bertjax").exists():
        partial = scratch / f".tree_{sha}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
        partial.rename(tree)
    return tree


def child_env(tree: pathlib.Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu", BERTJAX_VERBOSE="1")
    env.pop("BERTJAX_DATA_DIR", None)
    return env


def tokenizer_model(scratch: pathlib.Path, baseline: pathlib.Path) -> pathlib.Path:
    out = scratch / "tokenizer_8k"
    model = out / "tokenizer.model"
    if not model.exists():
        print(f"training the fixed {VOCAB_SIZE}-piece tokenizer on the real corpus -> {out}", flush=True)
        command = [sys.executable, "-m", "bertjax", "tokenizer", "train", "--input", *map(str, shared_corpus())]
        subprocess.run([*command, "--vocab-size", str(VOCAB_SIZE), "--out", str(out)], env=child_env(baseline), check=True, capture_output=True)
    return model


def document_pool(scratch: pathlib.Path, baseline: pathlib.Path, model: pathlib.Path) -> list[dict]:
    """The real corpus as documents: [{"text": sentences, one a line, "tokens": n}], parsed once."""
    path = scratch / "documents.json"
    if not path.exists():
        command = [sys.executable, __file__, "_pool", str(path), str(model), *map(str, shared_corpus())]
        subprocess.run(command, env=child_env(baseline), check=True)
    return json.loads(path.read_text())


def _pool_child(out: str, model: str, *files: str) -> None:
    """Run with the baseline on PYTHONPATH: its parser splits each file into documents of sentences."""
    import sentencepiece as spm

    from bertjax.data import corpus

    processor = spm.SentencePieceProcessor(model_file=model)
    pool = []
    for file in files:
        for document in corpus.parse(corpus.read_text(file), "auto", file):
            tokens = sum(len(ids) for ids in processor.encode(document))
            pool.append({"text": "".join(sentence + "\n" for sentence in document) + "\n", "tokens": tokens})
    partial = pathlib.Path(out + ".partial")
    partial.write_text(json.dumps(pool))
    partial.rename(out)


def text(scratch: pathlib.Path, pool: list[dict], megabytes: float) -> tuple[pathlib.Path, dict]:
    """`megabytes` of text: repetition r is every document, in the order of a permutation seeded with r."""
    import numpy as np

    name = f"text_{megabytes:g}MB"
    path, info_path = scratch / f"{name}.txt", scratch / f"{name}.json"
    if not info_path.exists():
        target = int(megabytes * 1e6)
        encoded = [document["text"].encode() for document in pool]
        info = dict(bytes=0, documents=0, tokens=0, repetitions=0)
        with open(path, "wb") as f:
            while info["bytes"] < target:
                for index in np.random.default_rng(info["repetitions"]).permutation(len(pool)):
                    f.write(encoded[index])
                    info["bytes"] += len(encoded[index])
                    info["documents"] += 1
                    info["tokens"] += pool[index]["tokens"]
                    if info["bytes"] >= target:
                        break
                info["repetitions"] += 1
        info_path.write_text(json.dumps(info))
    return path, json.loads(info_path.read_text())


# ---- measurement ----


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        tree += frontier
    return tree


def _proc_bytes(pid: int, name: str, field: str) -> int:
    """A kB field of /proc/PID/NAME (e.g. smaps_rollup's Pss, status's RssAnon) in bytes; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], env: dict, log: pathlib.Path) -> dict:
    """Wall seconds and peak memory (bytes) of one fresh child running `command`; its output goes to `log`."""
    tree_peak, anon_peak = [0], [0]
    done = threading.Event()

    def sample(pid):
        while not done.wait(0.25):
            tree = _descendants(pid)
            anon_peak[0] = max(anon_peak[0], sum(_proc_bytes(p, "status", "RssAnon") for p in tree))
            if len(tree) > 1:  # one process: ru_maxrss is exact
                tree_peak[0] = max(tree_peak[0], sum(_proc_bytes(p, "smaps_rollup", "Pss") for p in tree))

    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=env["PYTHONPATH"])
        sampler = threading.Thread(target=sample, args=(process.pid,), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    if process.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}; the end of {log}:\n{tail}")
    return dict(
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss=max(usage.ru_maxrss * 1024, tree_peak[0]),
        ru_maxrss=usage.ru_maxrss * 1024,
        tree_pss=tree_peak[0],
        peak_anon=anon_peak[0],
    )


def stats_command(timing: pathlib.Path, tree: pathlib.Path, corpus: pathlib.Path, model: pathlib.Path, data_dir: pathlib.Path, batches: int) -> list[str]:
    """`bertjax data stats ...` through `_stats_child`, which writes the preparation seconds to `timing`."""
    return [
        sys.executable,
        __file__,
        "_stats",
        str(timing),
        "data",
        "stats",
        f"--config={tree}/configs/pretrain.py:tiny",
        f"--config.data.corpus={corpus}",
        f"--config.data.tokenizer={model}",
        f"--config.data.data_dir={data_dir}",
        f"--batches={batches}",
    ]


def logged_tokens(log: pathlib.Path) -> int | None:
    """The pipeline's own token count, where its log says '(N tokens)' per split (the baseline does)."""
    text = log.read_text(errors="replace")
    total = re.search(r"(\d+) tokens in all", text)  # the new code's count
    return int(total.group(1)) if total else sum(int(n) for n in re.findall(r"\((\d+) tokens\)", text)) or None


def _stats_child(timing: str, *argv: str) -> None:
    """`bertjax ARGV` (the CLI's own main), timing the preparation inside `data stats`.

    `inspect.stats` prepares the corpus (or reads it back), then times its batches itself: what it
    spends before them is the preparation (cold) or the start (warm) this size of text costs. Its CPU
    seconds (this process and the workers it has waited for, the 20 batches included) are recorded too:
    on a machine shared with other work they vary far less than the wall clock. The clock
    is put around it when the CLI imports the module, not before: importing it first would change the
    import order (a library's import-time warning would configure logging before the CLI does).
    """
    import importlib.abc
    import resource

    def cpu_seconds():
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(u.ru_utime + u.ru_stime for u in usage)

    def timed(stats):
        def wrapper(*args, **kwargs):
            start, cpu = time.perf_counter(), cpu_seconds()
            result = stats(*args, **kwargs)
            total, cpu = time.perf_counter() - start, cpu_seconds() - cpu
            iteration = result["batches"] / result["batches_per_second"]
            timings = {"preparation_seconds": total - iteration, "preparation_cpu_seconds": cpu, "batches_seconds": iteration}
            pathlib.Path(timing).write_text(json.dumps(timings))
            return result

        return wrapper

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bertjax.data.inspect":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                module.stats = timed(module.stats)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())
    from bertjax import cli

    sys.exit(cli.main(list(argv)))


def _loader_child(tree: str, corpus: str, model: str, data_dir: str, batches: str) -> None:
    """Run with `tree` on PYTHONPATH: that version's data_throughput timing at length 128, token masking.

    A first short call opens the prepared data (the baseline builds its instance table then); the second
    is the one reported, with the process's CPU seconds over it (its 5 warm-up batches included): batches
    per CPU second is what the loader costs, whatever share of the shared machine it got.
    """
    spec = importlib.util.spec_from_file_location("data_throughput_run", pathlib.Path(tree) / "experiments" / "data_throughput" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    config = run.build_config(argparse.Namespace(corpus=corpus, batch_size=256, batches=int(batches)))
    config.data.tokenizer = model
    config.data.data_dir = data_dir
    run.time_loader(config, 1)
    cpu = time.process_time()
    rate = run.time_loader(config, int(batches))
    per_cpu_second = int(batches) * config.train.batch_size / (time.process_time() - cpu)
    print(json.dumps({"sequences_per_second": rate, "sequences_per_cpu_second": per_cpu_second}))


class Version:
    """One code version (a tree on PYTHONPATH), measured size by size."""

    def __init__(self, name: str, tree: pathlib.Path, label: str, scratch: pathlib.Path, model: pathlib.Path, args):
        self.name, self.tree, self.label, self.scratch, self.model, self.args = name, tree, label, scratch, model, args
        self.env = child_env(tree)
        self.logs = scratch / "logs" / f"{name}_{tree.name}"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _stats(self, corpus: pathlib.Path, data_dir: pathlib.Path, name: str) -> dict:
        timing = self.logs / f"{name}.json"
        timing.unlink(missing_ok=True)
        result = measure(stats_command(timing, self.tree, corpus, self.model, data_dir, self.args.batches), self.env, self.logs / f"{name}.log")
        return dict(result, **json.loads(timing.read_text()))

    def measure_size(self, megabytes: float, corpus: pathlib.Path, info: dict, repeats: int) -> dict:
        """Cold `data stats` on an empty data_dir, warm again, then the loader, `repeats` times.

        Seconds are the least of the repeats and loader rates the greatest (what the code does when
        the shared machine lets it), peak RSS the greatest. The cache is removed after each (GBs).
        """
        tag = f"{megabytes:g}MB"
        data_dir = self.scratch / "cache" / f"{self.name}_{tag}"
        runs, load = [], os.getloadavg()[0]
        for repeat in range(repeats):
            shutil.rmtree(data_dir, ignore_errors=True)
            cold = self._stats(corpus, data_dir, f"{tag}_cold{repeat}")
            warm = self._stats(corpus, data_dir, f"{tag}_warm{repeat}")
            loader_log = self.logs / f"{tag}_loader{repeat}.log"
            command = [sys.executable, __file__, "_loader", str(self.tree), str(corpus), str(self.model), str(data_dir), str(self.args.loader_batches)]
            loader = measure(command, self.env, loader_log)
            loader.update(json.loads(loader_log.read_text().strip().splitlines()[-1]))
            shutil.rmtree(data_dir, ignore_errors=True)
            runs.append(dict(cold=cold, warm=warm, loader=loader))
        row = dict(
            version=self.name,
            code=self.label,
            megabytes=megabytes,
            text_bytes=info["bytes"],
            documents=info["documents"],
            tokens=info["tokens"],
            pipeline_tokens=logged_tokens(self.logs / f"{tag}_cold0.log"),
            repeats=repeats,
            load_average_before=load,
        )
        for phase in ("cold", "warm"):
            results = [run[phase] for run in runs]
            row.update(
                {
                    f"{phase}_seconds": min(r["preparation_seconds"] for r in results),
                    f"{phase}_cpu_seconds": min(r["preparation_cpu_seconds"] for r in results),
                    f"{phase}_peak_rss": max(r["peak_rss"] for r in results),
                    f"{phase}_seconds_each": [r["preparation_seconds"] for r in results],
                    f"{phase}_wall_seconds_each": [r["seconds"] for r in results],
                    f"{phase}_cpu_seconds_each": [r["preparation_cpu_seconds"] for r in results],
                    f"{phase}_command_cpu_seconds_each": [r["cpu_seconds"] for r in results],
                    f"{phase}_ru_maxrss_each": [r["ru_maxrss"] for r in results],
                    f"{phase}_tree_pss_each": [r["tree_pss"] for r in results],
                    f"{phase}_peak_anon": max(r["peak_anon"] for r in results),
                }
            )
        row.update(
            loader_sequences_per_second=max(run["loader"]["sequences_per_second"] for run in runs),
            loader_sequences_per_cpu_second=max(run["loader"]["sequences_per_cpu_second"] for run in runs),
            loader_sequences_per_second_each=[run["loader"]["sequences_per_second"] for run in runs],
            loader_batches=self.args.loader_batches,
            loader_peak_rss=max(run["loader"]["peak_rss"] for run in runs),
        )
        return row


# ---- report ----


def _size(megabytes: float) -> str:
    return f"{megabytes / 1000:.2g} GB" if megabytes >= 1000 else f"{megabytes:g} MB"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _anon(row: dict, phase: str) -> str:
    """Peak anonymous memory (rows from before it was measured have none)."""
    return _gib(row[f"{phase}_peak_anon"]) if row.get(f"{phase}_peak_anon") else ""


RATIO_KEYS = (
    "cold_seconds",
    "cold_cpu_seconds",
    "cold_peak_rss",
    "warm_seconds",
    "warm_cpu_seconds",
    "warm_peak_rss",
    "loader_sequences_per_second",
    "loader_sequences_per_cpu_second",
)


def _per_cpu(row: dict) -> str:
    rate = row.get("loader_sequences_per_cpu_second")  # rows measured before it was recorded lack it
    return f"{rate:,.0f}" if rate else "-"


def table(rows: list[dict]) -> str:
    by = {(r["version"], r["megabytes"]): r for r in rows}
    versions = [v for v in ("baseline", "new") if any(r["version"] == v for r in rows)]
    lines = []
    for version in versions:
        code = next(r["code"] for r in rows if r["version"] == version)
        lines += [
            f"**{version}** ({code})",
            "",
            "| text | tokens | cold preparation s | (CPU s) | cold peak RSS GiB | (anon) | warm start s | (CPU s) | warm peak RSS GiB | (anon) | loader seq/s (128, token masking) | (per CPU s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted((r for r in rows if r["version"] == version), key=lambda r: r["megabytes"]):
            lines.append(
                f"| {_size(r['megabytes'])} | {r['tokens'] / 1e6:.1f} M | {r['cold_seconds']:.1f} | {r['cold_cpu_seconds']:.1f} | {_gib(r['cold_peak_rss'])} | {_anon(r, 'cold')} | "
                f"{r['warm_seconds']:.1f} | {r['warm_cpu_seconds']:.1f} | {_gib(r['warm_peak_rss'])} | {_anon(r, 'warm')} | {r['loader_sequences_per_second']:,.0f} | {_per_cpu(r)} |"
            )
        lines.append("")
    if len(versions) == 2:
        lines += [
            "**new / baseline**",
            "",
            "| text | cold preparation s | (CPU s) | cold peak RSS | warm start s | (CPU s) | warm peak RSS | loader seq/s | (per CPU s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for megabytes in sorted({r["megabytes"] for r in rows}):
            old, new = by.get(("baseline", megabytes)), by.get(("new", megabytes))
            if old and new:
                ratios = [new[k] / old[k] if old.get(k) and new.get(k) else float("nan") for k in RATIO_KEYS]
                lines.append(f"| {_size(megabytes)} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
        lines.append("")
    return "\n".join(lines)


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x through two or more distinct x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def extrapolation(rows: list[dict]) -> str:
    """Lines through the measured sizes (RSS against tokens, seconds against MB), evaluated at 20 GB of text."""
    lines = [
        f"**Extrapolated to {TARGET_GB} GB of text** (least-squares lines through the sizes above; seconds as wall clock, CPU in brackets)",
        "",
        f"| code | tokens at {TARGET_GB} GB | RSS bytes/token, cold | warm | cold peak RSS | warm peak RSS | cold s/MB | warm s/MB | cold preparation | warm start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for version in ("baseline", "new"):
        mine = [r for r in rows if r["version"] == version]
        if not mine:
            continue
        if len({r["megabytes"] for r in mine}) < 2:
            lines.append(f"| {version} | (a line needs two sizes or more) |" + " |" * 8)
            continue
        tokens = TARGET_GB * 1e9 * sum(r["tokens"] for r in mine) / sum(r["text_bytes"] for r in mine)
        cells = [f"{tokens / 1e9:.1f} B"]
        memory = [_fit([r["tokens"] for r in mine], [r[f"{phase}_peak_rss"] for r in mine]) for phase in ("cold", "warm")]
        cells += [f"{slope:.1f}" for _, slope in memory] + [f"{(a + b * tokens) / GIB:.1f} GiB" for a, b in memory]
        per_mb, totals = [], []
        for phase in ("cold", "warm"):
            wall, cpu = (_fit([r["megabytes"] for r in mine], [r[f"{phase}{kind}_seconds"] for r in mine]) for kind in ("", "_cpu"))
            per_mb.append(f"{wall[1]:.3f} ({cpu[1]:.3f})")
            wall_minutes, cpu_minutes = ((a + b * TARGET_GB * 1000) / 60 for a, b in (wall, cpu))
            totals.append(f"{wall_minutes:.1f} min ({cpu_minutes:.1f} min)")
        lines.append(f"| {version} | " + " | ".join(cells + per_mb + totals) + " |")
    lines.append("")
    return "\n".join(lines)


def bars(rows: list[dict]) -> str:
    """Issue 12's bars, on the new code (the baseline measured in the same run where a bar is relative)."""
    by = {(r["version"], r["megabytes"]): r for r in rows}
    new = sorted((r for r in rows if r["version"] == "new"), key=lambda r: r["megabytes"])
    results = []

    def verdict(ok):
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    at320 = by.get(("new", 320))
    results.append(("at 320 MB, cold peak RSS <= 1 GiB", verdict(at320 and at320["cold_peak_rss"] <= GIB), at320 and f"{_gib(at320['cold_peak_rss'])} GiB"))
    results.append(("at 320 MB, warm start <= 2 s", verdict(at320 and at320["warm_seconds"] <= 2.0), at320 and f"{at320['warm_seconds']:.1f} s"))
    both = [m for m in sorted({r["megabytes"] for r in new}) if ("baseline", m) in by]
    if both:
        # Wall clocks compare only within one run (the machine's load changes between runs); CPU seconds travel.
        peers = [m for m in both if by[("baseline", m)]["run"] == by[("new", m)]["run"]]
        largest = (peers or both)[-1]
        old, new_ = by[("baseline", largest)], by[("new", largest)]
        speedup = old["cold_seconds"] / new_["cold_seconds"]
        cpu_speedup = old["cold_cpu_seconds"] / new_["cold_cpu_seconds"]
        where = f"at {_size(largest)}, one run" if peers else f"at {_size(largest)}, measured in different runs"
        label = f"cold preparation throughput >= 2x baseline (wall clock, {where})"
        results.append((label, verdict(speedup >= 2), f"{speedup:.2f}x (CPU seconds: {cpu_speedup:.2f}x)"))
    else:
        results.append(("cold preparation throughput >= 2x baseline", "n/a", None))
    flat = [r for r in new if r["megabytes"] >= 80]
    if flat:
        peaks = [max(r["cold_peak_rss"], r["warm_peak_rss"]) for r in flat]
        spread = max(peaks) / peaks[0]
        complete = flat[-1]["megabytes"] >= 1280
        label = f"peak RSS flat within 20% from 80 MB to 1.3 GB ({_size(flat[0]['megabytes'])}..{_size(flat[-1]['megabytes'])})"
        results.append((label, verdict(spread <= 1.2) + ("" if complete else " (partial: 1.3 GB not measured)"), f"max/at 80 MB = {spread:.2f}"))
    else:
        results.append(("peak RSS flat within 20% from 80 MB to 1.3 GB", "n/a", None))
    anon = [r for r in flat if r.get("cold_peak_anon")]
    if anon:
        peaks = [max(r["cold_peak_anon"], r["warm_peak_anon"]) for r in anon]
        label = f"peak anonymous memory (RSS less mapped files) flat within 20% ({_size(anon[0]['megabytes'])}..{_size(anon[-1]['megabytes'])})"
        results.append((label, verdict(max(peaks) / peaks[0] <= 1.2), f"max/at {_size(anon[0]['megabytes'])} = {max(peaks) / peaks[0]:.2f} ({', '.join(_gib(x) for x in peaks)} GiB)"))
    if both:
        compared = peers or both
        old_rate = sum(by[("baseline", m)]["loader_sequences_per_second"] for m in compared) / len(compared)
        new_rate = sum(by[("new", m)]["loader_sequences_per_second"] for m in compared) / len(compared)
        measured = f"{new_rate:,.0f} vs {old_rate:,.0f} seq/s ({new_rate / old_rate:.2f}x)"
        per_cpu = [m for m in both if by[("baseline", m)].get("loader_sequences_per_cpu_second") and by[("new", m)].get("loader_sequences_per_cpu_second")]
        if per_cpu:
            ratio = sum(by[("new", m)]["loader_sequences_per_cpu_second"] / by[("baseline", m)]["loader_sequences_per_cpu_second"] for m in per_cpu) / len(per_cpu)
            measured += f"; per CPU second {ratio:.2f}x (mean over {', '.join(_size(m) for m in per_cpu)})"
        sizes = ", ".join(_size(m) for m in compared)
        label = f"loader throughput at 128 no lower than baseline (wall clock, mean over {sizes}; 5% allowed for a shared machine)"
        results.append((label, verdict(new_rate >= 0.95 * old_rate), measured))
    lines = ["**Issue 12's bars** (new code)", "", "| bar | result | measured |", "|---|---|---|"]
    lines += [f"| {bar} | {result} | {measured or ''} |" for bar, result, measured in results]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5,20,80", help=f"MB of text, comma-separated, from {SIZES_MB} (any number works); '' measures nothing (a report of --with files)")
    parser.add_argument("--quick", action="store_true", help="5 MB only: a check that the script runs (about 2 minutes)")
    parser.add_argument("--versions", default="baseline,new", help="baseline,new (default) or one of them")
    parser.add_argument("--new", default="HEAD", help="the commit measured as the new code")
    parser.add_argument("--new-tree", default="", help="measure this directory as it is (uncommitted edits included) instead of --new")
    parser.add_argument("--scratch", default="/tmp/bertjax_data_scale", help="text, tokenizer, trees, caches and logs (never the repo)")
    parser.add_argument("--repeats", type=int, default=1, help="measure each size below 320 MB this many times (best of)")
    parser.add_argument("--batches", type=int, default=20, help="`data stats --batches`")
    parser.add_argument("--loader-batches", type=int, default=100, help="batches of 256 timed for loader throughput")
    parser.add_argument(
        "--with",
        dest="earlier",
        action="append",
        default=[],
        help="a results JSON of an earlier run whose rows join the report (a version and size measured now, or in a file named before, wins)",
    )
    parser.add_argument("--json", default="", help="also write the rows here (default: SCRATCH/results/TIME.json)")
    args = parser.parse_args(argv)
    sizes = [5.0] if args.quick else [float(s) for s in args.sizes.split(",") if s]
    names = [v.strip() for v in args.versions.split(",")]
    scratch = pathlib.Path(args.scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)

    baseline_tree = extracted(scratch, BASELINE)
    model = tokenizer_model(scratch, baseline_tree)
    pool = document_pool(scratch, baseline_tree, model)
    versions = []
    if not sizes:
        names = []
    if "baseline" in names:
        versions.append(Version("baseline", baseline_tree, f"commit {BASELINE}", scratch, model, args))
    if "new" in names:
        if args.new_tree:
            tree = pathlib.Path(args.new_tree).resolve()
            versions.append(Version("new", tree, f"working tree {tree}", scratch, model, args))
        else:
            tree = extracted(scratch, args.new)
            versions.append(Version("new", tree, f"commit {tree.name.removeprefix('tree_')}", scratch, model, args))

    rows = []
    for megabytes in sizes:  # one size at a time, both versions back to back
        corpus, info = text(scratch, pool, megabytes)
        for version in versions:
            row = version.measure_size(megabytes, corpus, info, args.repeats if megabytes < 320 else 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if rows:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = pathlib.Path(args.json) if args.json else scratch / "results" / f"{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(when=stamp, argv=sys.argv[1:], cpu_count=os.cpu_count(), rows=rows), indent=1))
        for row in rows:
            row["run"] = stamp
        print(f"rows written to {out}")
    seen = {(r["version"], r["megabytes"]) for r in rows}
    for earlier in args.earlier:  # a row measured now, or in an earlier-named file, wins
        results = json.loads(pathlib.Path(earlier).read_text())
        for row in results["rows"]:
            row["run"] = results["when"]
            if (row["version"], row["megabytes"]) not in seen:
                seen.add((row["version"], row["megabytes"]))
                rows.append(row)
    print()
    print(table(rows))
    print(extrapolation(rows))
    if any(r["version"] == "new" for r in rows):
        print(bars(rows))
    print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    children = {"_pool": _pool_child, "_stats": _stats_child, "_loader": _loader_child}
    if len(sys.argv) > 1 and sys.argv[1] in children:
        children[sys.argv[1]](*sys.argv[2:])
    else:
        main()
