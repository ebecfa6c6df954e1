"""Shared pieces of the experiment configs, and the check every config passes before use.

Config files under `configs/` call these helpers rather than copying blocks between them
(big_vision's convention): `configs/pretrain.py:tiny` is `pretrain_config("tiny")`.
The keys documented in DESIGN.md are the public surface: sweeps and users set them by name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib

import ml_collections

from bertjax.errors import UserError

# (num_layers, hidden_size, num_heads); intermediate = 4 * hidden. The published BERT miniatures
# (Turc et al., 2019) and the two sizes of the BERT paper.
SIZES = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}

POSITION_EMBEDDINGS = ("learned", "sinusoidal")
LAYER_NORMS = ("post", "pre")
DTYPES = ("float32", "bfloat16")
SENTENCE_OBJECTIVES = ("nsp", "sop", "none")
OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("linear", "polynomial", "cosine", "constant")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")
DENSE_BACKWARDS = ("xla", "transpose")
REGIMES = ("full", "freeze_bottom", "features")
FEATURES = ("last", "sum_last4", "concat_last4", "scalar_mix")
# BART's corruptions (bertjax/data/noising.py) and the rate each gets when switched on by name.
CORRUPTIONS = ("masking", "deletion", "infilling", "permutation", "rotation")
CORRUPTION_RATES = dict(masking=0.3, deletion=0.3, infilling=0.3, permutation=1.0, rotation=1.0)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_PRETRAIN_CONFIG = f"{REPO_ROOT / 'configs' / 'pretrain.py'}:tiny"


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names the key and the value."""


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    num_layers, hidden_size, num_heads = SIZES[size]
    return ml_collections.ConfigDict(
        dict(
            size=size,
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads,
            intermediate_size=4 * hidden_size,
            vocab_size=8192,
            type_vocab_size=2,
            max_position_embeddings=512,
            position_embedding="learned",
            layer_norm="post",
            layer_norm_eps=1e-12,
            dtype="float32",
            hidden_dropout=0.1,
            attention_dropout=0.1,
            attention_implementation="xla",
            dense_backward="xla",  # the dense kernels' gradient: 'xla' (XLA's own matmul form) or 'transpose' (see models.encoder.dense)
            initializer_range=0.02,
        )
    )


def data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # A path, a directory, a glob (several: comma-separated), 'tfds:NAME' or 'python-docs' (the
            # docstrings of the Python standard library: a corpus every machine has without a download).
            corpus="python-docs",
            # 'auto' | 'sentences' (one sentence a line, blank line between documents) | 'documents'
            # (one document a line) | 'paragraphs' (blank-line separated paragraphs, hard-wrapped;
            # Gutenberg header/footer removed, chapters are documents) | 'wikitext' (' = Title = ' lines
            # start articles). See bertjax/data/corpus.py for what 'auto' picks.
            corpus_format="auto",
            tfds_text_key="text",
            tfds_data_dir="",  # where TFDS keeps 'tfds:NAME' data sets; '' = TFDS's default
            # Held-out documents for evaluation, as a fraction of the corpus (a separate path also works).
            eval_corpus="",
            eval_fraction=0.02,
            # A sentencepiece model file, a WordPiece vocab.txt, or '' to train one on the corpus.
            tokenizer="",
            tokenizer_type="unigram",
            data_dir="",  # '' = $BERTJAX_DATA_DIR or ~/.cache/bertjax
            max_seq_length=128,
            short_seq_prob=0.1,
            sentence_objective="nsp",
            max_predictions=20,
            seed=0,
            num_workers=0,
            prefetch=2,
            masking=dict(
                rate=0.15,
                mask=0.8,
                random=0.1,
                keep=0.1,
                whole_word=False,
                span=False,
                span_mean=3.0,
                span_max=10,
                eval_rate=0.15,
            ),
        )
    )


def noising_config(*corruptions: str) -> ml_collections.ConfigDict:
    """`config.data.noising` for seq2seq denoising with `corruptions` on (default: BART's best,
    text infilling + sentence permutation) and the others off. Each key is a rate, 0 = off; the
    token corruptions take disjoint shares, so masking + deletion + infilling <= 1. See
    bertjax/data/noising.py for what each does and where it deviates from fairseq's BART."""
    corruptions = corruptions or ("infilling", "permutation")
    unknown = [name for name in corruptions if name not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruption {unknown[0]!r}; choose from {CORRUPTIONS}")
    return ml_collections.ConfigDict(
        dict(
            # Fractions of a document's units (words, or tokens without whole_word):
            masking=0.0,  # each token of a chosen unit becomes [MASK]
            deletion=0.0,  # chosen units are removed
            infilling=0.0,  # covered by spans of Poisson(poisson_lambda) units, each span -> one [MASK] (BART: 0.3)
            poisson_lambda=3.0,
            permutation=0.0,  # fraction of sentences shuffled among their places (BART: 1.0)
            rotation=0.0,  # probability that a document is rotated to start at a random token
            whole_word=True,  # units are words, as BART masks whole GPT-2 words; False: tokens
            mask_random=0.0,  # each [MASK] becomes a random token with this probability (BART's runs: 0.1)
        )
        | {name: CORRUPTION_RATES[name] for name in corruptions}
    )


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-3,
            schedule="linear",
            warmup_steps=100,
            end_lr_fraction=0.0,
            power=1.0,
            weight_decay=0.01,
            b1=0.9,
            b2=0.999,
            eps=1e-6,
            grad_clip=1.0,
            layerwise_lr_decay=1.0,
        )
    )


def mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            data=-1,  # -1: the devices the other axes leave
            fsdp=1,
            tensor=1,
            rules="default",  # a name in bertjax.train.partitioning.RULES
            distributed=False,  # call jax.distributed.initialize() (also when the environment says so)
        )
    )


def checkpoint_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            every=500,  # the rolling checkpoint, for resuming
            keep=2,  # how many rolling checkpoints to keep
            # The kept schedule for embryology studies, never deleted: explicit steps, every K steps,
            # and/or N log-spaced steps (dense early).
            keep_steps=(),
            keep_every=0,
            keep_log=0,
            async_save=True,
        )
    )


def pretrain_config(size: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config(size)
    config.data = data_config()
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=32,
            total_steps=600,
            seed=0,  # parameter initialisation
            dropout_seed=0,
            eval_every=200,
            eval_batches=8,  # per evaluation; 0: no evaluation
            log_every=20,
            grad_accum_steps=1,
            inject_nan_at_step=-1,  # for fault tests: make the loss NaN at this step
            # Steps this invocation may take before it checkpoints and exits (0: up to total_steps):
            # a long run split into scheduler-sized jobs, each resuming where the last stopped.
            run_steps=0,
            peak_tflops=0.0,  # per device, for MFU; 0 = known from the device kind (none for a CPU)
            progress=True,
        )
    )
    config.optim = optim_config()
    config.mesh = mesh_config()
    config.checkpoint = checkpoint_config()
    config.init_from = ""
    if size in ("base", "large"):
        config.train.batch_size = 256
        config.train.total_steps = 1_000_000
        config.optim.lr = 1e-4
        config.optim.warmup_steps = 10_000
        config.model.vocab_size = 30522
        config.model.dtype = "bfloat16"
    return config


def _check(condition: bool, key: str, value, why: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}={value!r}: {why}")


def _positive(config, *keys: str) -> None:
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        _check(isinstance(value, (int, float)) and value > 0, key, value, "must be positive")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ConfigError naming the key and value of the first unusable setting; return the config."""
    if "model" in config:
        m = config.model
        _positive(
            config,
            "model.num_layers",
            "model.hidden_size",
            "model.num_heads",
            "model.intermediate_size",
            "model.vocab_size",
            "model.type_vocab_size",
            "model.max_position_embeddings",
        )
        _check(
            m.hidden_size % m.num_heads == 0,
            "model.hidden_size",
            m.hidden_size,
            f"must be divisible by model.num_heads={m.num_heads}",
        )
        _check(m.position_embedding in POSITION_EMBEDDINGS, "model.position_embedding", m.position_embedding, f"choose one of {POSITION_EMBEDDINGS}")
        _check(m.layer_norm in LAYER_NORMS, "model.layer_norm", m.layer_norm, f"choose one of {LAYER_NORMS}")
        _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"choose one of {DTYPES}")
        _check(
            m.attention_implementation in ATTENTION_IMPLEMENTATIONS,
            "model.attention_implementation",
            m.attention_implementation,
            f"choose one of {ATTENTION_IMPLEMENTATIONS}",
        )
        _check(m.get("dense_backward", "xla") in DENSE_BACKWARDS, "model.dense_backward", m.get("dense_backward"), f"choose one of {DENSE_BACKWARDS}")
        for key in ("hidden_dropout", "attention_dropout"):
            _check(0.0 <= m[key] < 1.0, f"model.{key}", m[key], "must be in [0, 1)")
    if "data" in config and "masking" in config.data:
        d = config.data
        _positive(config, "data.max_seq_length", "data.max_predictions")
        if "model" in config:
            _check(
                d.max_seq_length <= config.model.max_position_embeddings,
                "data.max_seq_length",
                d.max_seq_length,
                f"exceeds model.max_position_embeddings={config.model.max_position_embeddings}",
            )
        _check(d.sentence_objective in SENTENCE_OBJECTIVES, "data.sentence_objective", d.sentence_objective, f"choose one of {SENTENCE_OBJECTIVES}")
        _check(
            d.max_predictions <= d.max_seq_length,
            "data.max_predictions",
            d.max_predictions,
            f"larger than data.max_seq_length={d.max_seq_length}",
        )
        mk = d.masking
        _check(0.0 < mk.rate < 1.0, "data.masking.rate", mk.rate, "must be in (0, 1)")
        for key in ("mask", "random", "keep"):
            _check(0.0 <= mk[key] <= 1.0, f"data.masking.{key}", mk[key], "must be in [0, 1]")
        total = mk.mask + mk.random + mk.keep
        _check(
            abs(total - 1.0) < 1e-6,
            "data.masking",
            f"mask={mk.mask}, random={mk.random}, keep={mk.keep}",
            f"mask + random + keep must sum to 1 (they sum to {total:g})",
        )
        _check(mk.span_mean >= 1.0, "data.masking.span_mean", mk.span_mean, "must be at least 1")
        _check(mk.span_max >= 1, "data.masking.span_max", mk.span_max, "must be at least 1")
    if "data" in config and "noising" in config.data:
        from bertjax.data import noising  # its spec holds the rules: one home for them

        noising.NoisingSpec.from_config(config)
    if "train" in config:
        _positive(config, "train.batch_size", "train.total_steps")
        if "label_smoothing" in config.train:
            smoothing = config.train.label_smoothing
            _check(isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0, "train.label_smoothing", smoothing, "must be in [0, 1)")
        if "grad_accum_steps" in config.train:
            _positive(config, "train.grad_accum_steps")
            _check(
                config.train.batch_size % config.train.grad_accum_steps == 0,
                "train.grad_accum_steps",
                config.train.grad_accum_steps,
                f"must divide train.batch_size={config.train.batch_size}",
            )
    if "optim" in config:
        o = config.optim
        _check(o.name in OPTIMIZERS, "optim.name", o.name, f"choose one of {OPTIMIZERS}")
        _check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"choose one of {SCHEDULES}")
        _positive(config, "optim.lr")
        _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be non-negative")
    if "mesh" in config:
        for axis in ("data", "fsdp", "tensor"):
            value = config.mesh[axis]
            _check(value == -1 or value >= 1, f"mesh.{axis}", value, "must be -1 (the rest) or at least 1")
    if "finetune" in config:
        f = config.finetune
        _check(f.regime in REGIMES, "finetune.regime", f.regime, f"choose one of {REGIMES}")
        _check(f.features in FEATURES, "finetune.features", f.features, f"choose one of {FEATURES}")
        if "failed_margin" in f:
            _check(f.failed_margin >= 0, "finetune.failed_margin", f.failed_margin, "must be non-negative")
        if "dev_split" in config.data:
            _check(0.0 <= config.data.dev_split < 1.0, "data.dev_split", config.data.dev_split, "must be in [0, 1): the fraction of dev held out")
            _check(
                not (config.data.dev_split and config.data.test),
                "data.dev_split",
                config.data.dev_split,
                f"data.test={config.data.test!r} is the held-out set already: set one of them",
            )
        if "model" in config:
            _check(
                0 <= f.freeze_layers <= config.model.num_layers,
                "finetune.freeze_layers",
                f.freeze_layers,
                f"must be between 0 and model.num_layers={config.model.num_layers}",
            )
    return config


def config_file(path: str) -> pathlib.Path:
    """A config file's absolute path: a relative path is tried from the working directory, then the repo root."""
    file = pathlib.Path(path).expanduser()
    if not file.exists() and not file.is_absolute() and (REPO_ROOT / file).exists():
        file = REPO_ROOT / file
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist (here or under {REPO_ROOT})")
    return pathlib.Path(os.path.abspath(file))


def absolute_spec(spec: str) -> str:
    """`path/to/file.py[:arg]` with the file made absolute, so that the spec works from any directory."""
    path, colon, arg = spec.partition(":")
    return f"{config_file(path)}{colon}{arg}"


# Config keys whose values are paths on this machine, and how each is written:
#   path        one path ('' = unset)
#   checkpoint  WORKDIR or HF_DIR, optionally WORKDIR:STEP (the suffix is kept)
#   corpus      paths, directories or globs separated by commas; 'tfds:NAME' and 'python-docs' are names
#   task        a file or 'tfds:NAME[:SPLIT]'; a ConfigDict of them (data.other_dev) maps names to such values
# A sweep's `sweep.finetune.` keys name the same settings of its fine-tuning runs.
PATH_KEYS = {
    "init_from": "checkpoint",
    "data.corpus": "corpus",
    "data.eval_corpus": "corpus",
    "data.tokenizer": "path",
    "data.data_dir": "path",
    "data.tfds_data_dir": "path",
    "data.train": "task",
    "data.dev": "task",
    "data.test": "task",
    "data.other_dev": "task",
}
SWEEP_FINETUNE_PREFIX = "sweep.finetune."


def split_step(source: str) -> tuple[str, int | None]:
    """'WORKDIR:STEP' -> (WORKDIR, STEP); a source without a step -> (source, None)."""
    path, _, step = source.rpartition(":")
    return (path, int(step)) if path and step.isdigit() else (source, None)


def absolute(path: str) -> str:
    """A path as typed (relative, ~) made absolute against the working directory; symlinks are kept."""
    return os.path.abspath(os.path.expanduser(path))


def resolve_path(key: str, value):
    """`value` of config key `key` with every relative path made absolute against the working directory.

    Paths are resolved once, where a user gives them (the CLI), so that nothing downstream depends on
    the directory a process happens to run in: orbax wants absolute paths, and a sweep's commands run
    wherever a scheduler starts them. Keys that are not paths come back unchanged.
    """
    key = key.removeprefix(SWEEP_FINETUNE_PREFIX)
    kind = PATH_KEYS.get(key) or PATH_KEYS.get(key.rpartition(".")[0])  # data.other_dev.NAME: its parent's kind
    if kind is None or not isinstance(value, str) or not value.strip():
        return value
    value = value.strip()
    if kind == "checkpoint":
        path, step = split_step(value)
        return absolute(path) if step is None else f"{absolute(path)}:{step}"
    if kind in ("corpus", "task") and (value.startswith("tfds:") or value == "python-docs"):
        return value
    if kind == "corpus":
        return ",".join(absolute(part.strip()) for part in value.split(",") if part.strip())
    return absolute(value)


def path_values(config, prefix: str = "") -> dict[str, str]:
    """Every path-valued key of `config` (flattened, e.g. 'data.other_dev.mismatched') and its value."""
    values = {}
    for key in PATH_KEYS:
        node, parts = config, key.split(".")
        for part in parts:
            node = node.get(part) if hasattr(node, "get") else None
        if hasattr(node, "items"):
            values.update({f"{prefix}{key}.{name}": value for name, value in node.items()})
        elif node is not None:
            values[prefix + key] = node
    return values


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Make every path-valued key of `config` (and of its `sweep.finetune` section) absolute, in place."""
    sections = [(config, "")]
    if "sweep" in config and "finetune" in config.sweep:
        sections.append((config.sweep.finetune, SWEEP_FINETUNE_PREFIX))
    for section, prefix in sections:
        for key, value in path_values(section).items():
            *parents, leaf = key.split(".")
            node = section
            for part in parents:
                node = node[part]
            node[leaf] = resolve_path(key, value)
    return config


def load_module(path: str):
    """Import a config file; a relative path is tried from the working directory, then the repo root."""
    file = config_file(path)
    module_spec = importlib.util.spec_from_file_location(f"_bertjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(f"config file {file}:{error.lineno}: {error.msg} (a Python syntax error)") from error
    return module


def load(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/file.py[:arg]` by calling its get_config(arg); a ValueError there (an unknown argument) is a ConfigError."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(): it is not a bertjax config")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as error:
        raise ConfigError(f"config {spec}: {error}") from error


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_hash(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(to_json(config).encode()).hexdigest()[:16]


def shared_data_path(*parts: str) -> str:
    """A path under the real data sets: $BERTJAX_SHARED_DATA, else ../shared/data (from the working directory)."""
    import os

    return str(pathlib.Path(os.environ.get("BERTJAX_SHARED_DATA", "../shared/data"), *parts))


def ablation_config(size: str = "tiny") -> ml_collections.ConfigDict:
    """The pretraining config every arm of a shipped ablation starts from, plus its `sweep` section.

    Real English text (the Gutenberg novels and WikiText-2 under ../shared/data/corpus), a model small
    enough for a CPU, the same data seed for every arm; then fine-tuning on SST-2.
    `sweep.task` is the fine-tuning config each arm runs after pretraining ('' = none) and
    `sweep.finetune` the overrides it gets (override them as --config.sweep.finetune.KEY=VALUE).
    """
    config = pretrain_config(size)
    config.data.corpus = shared_data_path("corpus", "*.txt")
    config.data.eval_fraction = 0.1  # ~700 held-out pairs: sentence accuracies within a few points
    config.train.total_steps = 600
    config.train.eval_every = 200
    config.train.eval_batches = 16
    config.checkpoint.every = 200
    config.optim.warmup_steps = 60
    config.sweep = ml_collections.ConfigDict(
        dict(
            task="configs/finetune.py:sst2",
            # SST-2 on 8,000 training sentences at length 64: about a minute a seed on a CPU. Fine-tuning
            # varies more between seeds than most pretraining ablations do, so each arm fine-tunes 3 times.
            finetune=dict(
                train=dict(epochs=0.0, total_steps=500, batch_size=16, eval_every=250),
                data=dict(max_train_examples=8000, max_seq_length=64),
                seeds=3,
                # The fine-tuning regime of every arm (--config.sweep.finetune.finetune.regime=features: a
                # frozen encoder, BERT's feature-based comparison).
                finetune=dict(regime="full"),
                # A suite spec (configs/suites.py:local) fine-tunes every arm on each of its tasks instead
                # of sweep.task; its tasks' own settings win over the keys above.
                suite="",
            ),
        )
    )
    return config
