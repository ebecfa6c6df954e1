"""Pretraining: `train_and_evaluate(config, workdir)`, the one entry point (`bertjax pretrain` calls it).

Read top to bottom: mesh, data, model, state, step, checkpoint, loop. The objective is a switch of
the config, everything else is shared:

  masked LM (BERT)        the masked-LM cross-entropy averaged over the weighted masked positions plus
                          the sentence objective's cross-entropy (NSP or SOP; none when
                          data.sentence_objective='none'); model BertForPreTraining.
  seq2seq denoising       when config.data has `noising` (BART: bertjax/data/noising.py corrupts each
  (BART)                  document, configs/seq2seq.py): the decoder's token cross-entropy against the
                          original document, averaged over the weighted target positions, with label
                          smoothing train.label_smoothing (0 = none); model Seq2Seq, so config.model
                          must have the decoder's keys (`num_decoder_layers`, the token ids).

A workdir that holds
checkpoints resumes from the newest complete one, exactly: same parameters, optimizer state, data
position and dropout keys as if the run had never stopped. The run holds the workdir's lock
(`bertjax.train.workdir`) from before its first write to its end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from bertjax import config as config_lib
from bertjax import checkpoint_io, host_memory, models
from bertjax.train import checkpoints as checkpoints_lib
from bertjax.train import metrics as metrics_lib
from bertjax.train import optim, partitioning
from bertjax.train import state as state_lib
from bertjax.train import workdir as workdir_lib

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "masked_ids", "masked_weights")
SEQ2SEQ_BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels", "label_weights")
SENTENCE_OBJECTIVES = ("nsp", "sop")

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# --- Losses ----------------------------------------------------------------------------------------


def is_seq2seq(config) -> bool:
    """The objective switch: seq2seq denoising when the data config says how to corrupt documents."""
    return "noising" in config.data


def batch_keys(config) -> tuple[str, ...]:
    if is_seq2seq(config):
        return SEQ2SEQ_BATCH_KEYS
    return BATCH_KEYS + (("sentence_label",) if config.data.sentence_objective != "none" else ())


def build_model(config, tok) -> tuple[nn.Module, models.BertConfig]:
    """The model the objective trains (and its config, for the FLOPs count)."""
    if not is_seq2seq(config):
        model_cfg = models.BertConfig.from_config(config.model)
        return models.BertForPreTraining(model_cfg), model_cfg
    if "num_decoder_layers" not in config.model:
        raise config_lib.ConfigError(
            "config.data.noising asks for seq2seq denoising but config.model has no decoder (no num_decoder_layers): "
            "start from configs/seq2seq.py, or drop data.noising for masked-LM pretraining"
        )
    model_cfg = models.Seq2SeqConfig.from_config(config.model)
    # The noising batches frame targets as [CLS] text [SEP] and start the decoder from [SEP] (as BART
    # starts from </s>); generation reads the ids from the model config, so they must agree.
    expected = dict(pad_token_id=tok.pad_id, bos_token_id=tok.cls_id, eos_token_id=tok.sep_id, decoder_start_token_id=tok.sep_id)
    for key, value in expected.items():
        if getattr(model_cfg, key) != value:
            raise config_lib.ConfigError(
                f"config.model.{key}={getattr(model_cfg, key)} but the seq2seq batches of tokenizer {tok.path} use {value}: "
                f"set --config.model.{key}={value}"
            )
    return models.Seq2Seq(model_cfg), model_cfg


def loss_sums(model, params, batch: dict, deterministic: bool, dropout_rng=None, label_smoothing: float = 0.0) -> dict:
    """Sums over the batch (not means), so micro-batches and eval batches add up exactly."""
    rngs = None if deterministic else {"dropout": dropout_rng}
    if "labels" in batch:
        return _seq2seq_sums(model, params, batch, deterministic, rngs, label_smoothing)
    out = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["token_type_ids"],
        batch["attention_mask"],
        masked_positions=batch["masked_positions"],
        deterministic=deterministic,
        rngs=rngs,
    )
    logits = out.mlm_logits.astype(jnp.float32)
    weights = batch["masked_weights"].astype(jnp.float32)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["masked_ids"])
    sums = {
        "mlm_loss": jnp.sum(cross_entropy * weights),
        "mlm_correct": jnp.sum((jnp.argmax(logits, -1) == batch["masked_ids"]) * weights),
        "mlm_weight": jnp.sum(weights),
    }
    if "sentence_label" in batch:
        sentence_logits = out.sentence_logits.astype(jnp.float32)
        labels = batch["sentence_label"]
        sums["sentence_loss"] = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(sentence_logits, labels))
        sums["sentence_correct"] = jnp.sum(jnp.argmax(sentence_logits, -1) == labels).astype(jnp.float32)
        sums["sentence_count"] = jnp.asarray(labels.shape[0], jnp.float32)
    return sums


def _seq2seq_sums(model, params, batch: dict, deterministic: bool, rngs, label_smoothing: float) -> dict:
    """The decoder's token cross-entropy against `labels` over the weighted target positions. With label
    smoothing a (the target distribution (1 - a) one-hot + a / V, optax.smooth_labels) the loss is
    (1 - a) nll + a (logsumexp - mean logit), computed without a [B, T, V] one-hot; `nll` stays the
    plain cross-entropy."""
    out = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["decoder_input_ids"],
        batch["decoder_attention_mask"],
        deterministic=deterministic,
        rngs=rngs,
    )
    logits = out.logits.astype(jnp.float32)
    weights = batch["label_weights"].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    loss = nll
    if label_smoothing:
        uniform = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return {
        "token_loss": jnp.sum(loss * weights),
        "token_nll": jnp.sum(nll * weights),
        "token_correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weights),
        "token_weight": jnp.sum(weights),
    }


def normalisers(batch: dict) -> dict:
    """Each summed loss term's divisor over the full batch: the objective is sum(sums[k] / divisor[k])."""
    if "labels" in batch:
        return {"token_loss": jnp.maximum(jnp.sum(batch["label_weights"].astype(jnp.float32)), 1.0)}
    divisors = {"mlm_loss": jnp.maximum(jnp.sum(batch["masked_weights"].astype(jnp.float32)), 1.0)}
    if "sentence_label" in batch:
        divisors["sentence_loss"] = jnp.asarray(batch["input_ids"].shape[0], jnp.float32)
    return divisors


def means(sums: dict) -> dict:
    """Losses and accuracies from the sums of `loss_sums` (host or device values)."""
    if "token_weight" in sums:
        weight = jnp.maximum(sums["token_weight"], 1.0)
        return {"loss": sums["token_loss"] / weight, "nll": sums["token_nll"] / weight, "token_accuracy": sums["token_correct"] / weight}
    result = {
        "mlm_loss": sums["mlm_loss"] / jnp.maximum(sums["mlm_weight"], 1.0),
        "mlm_accuracy": sums["mlm_correct"] / jnp.maximum(sums["mlm_weight"], 1.0),
    }
    if "sentence_count" in sums:
        result["sentence_loss"] = sums["sentence_loss"] / sums["sentence_count"]
        result["sentence_accuracy"] = sums["sentence_correct"] / sums["sentence_count"]
    return result


def make_train_step(model, tx, schedule, config):
    """One optimizer step over the global batch, optionally as a scan over micro-batches."""
    accumulation = config.train.grad_accum_steps
    dropout_seed = config.train.dropout_seed
    nan_step = config.train.inject_nan_at_step
    label_smoothing = config.train.get("label_smoothing", 0.0)

    def objective(params, micro_batch, dropout_rng, divisors):
        sums = loss_sums(model, params, micro_batch, deterministic=False, dropout_rng=dropout_rng, label_smoothing=label_smoothing)
        return sum(sums[key] / divisor for key, divisor in divisors.items()), sums

    gradient = jax.grad(objective, has_aux=True)

    def train_step(state: state_lib.TrainState, batch: dict):
        step_rng = state_lib.dropout_key(dropout_seed, state.step)
        # The full batch's totals normalise every micro-batch, so accumulation is exact, not a mean of means.
        divisors = normalisers(batch)
        if accumulation == 1:
            grads, sums = gradient(state.params, batch, step_rng, divisors)
        else:
            # Micro-batch k takes rows k, k+A, k+2A, ...: every device keeps contributing its own rows.
            micro_batches = jax.tree.map(lambda x: x.reshape((-1, accumulation) + x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                grads, sums = gradient(state.params, micro_batch, jax.random.fold_in(step_rng, index), divisors)
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zeros = jax.eval_shape(gradient, state.params, jax.tree.map(lambda x: x[0], micro_batches), step_rng, divisors)
            zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), zeros)
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accumulation), micro_batches))
        step_means = means(sums)
        loss = sum(sums[key] / divisor for key, divisor in divisors.items())
        if nan_step >= 0:
            poison = jnp.where(state.step + 1 == nan_step, jnp.nan, 1.0)
            loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step_metrics = {
            "loss": loss,
            **step_means,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), step_metrics

    return train_step


def jit_train_step(model, tx, schedule, config, mesh, rule_table, state_spec: state_lib.StateSpec):
    """`make_train_step` as the loop runs it (and experiments/seq2seq_train_speed times it): jitted with the
    state's shardings in and out, the batch split over the data axes, the old state donated."""
    batch_shardings = {key: partitioning.batch_sharding(mesh, rule_table, 1 if key == "sentence_label" else 2) for key in batch_keys(config)}
    return jax.jit(
        make_train_step(model, tx, schedule, config),
        in_shardings=(state_spec.shardings, batch_shardings),
        out_shardings=(state_spec.shardings, partitioning.replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(model, config):
    label_smoothing = config.train.get("label_smoothing", 0.0)

    def eval_step(params, batch: dict) -> dict:
        return loss_sums(model, params, batch, deterministic=True, label_smoothing=label_smoothing)

    return eval_step


# --- Evaluation ------------------------------------------------------------------------------------


def _with_objective(config, objective: str):
    """The config with another sentence objective: the eval data of the ALBERT cross-evaluation."""
    other = config.copy_and_resolve_references()
    other.data.sentence_objective = objective
    return other


def evaluate(eval_step, params, config, mesh, rule_table, num_batches: int) -> dict:
    """Sums of `loss_sums` over the first `num_batches` eval batches (fixed masking)."""
    from bertjax.data import loader

    totals: dict = {}
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    for index, local_batch in enumerate(loader.batches(config, split="eval")):
        if index >= num_batches:
            break
        if local_batch["input_ids"].shape[0] * jax.process_count() % data_parallel:
            continue  # a short final batch would not split over the mesh; the eval set is fixed either way
        sums = eval_step(params, partitioning.global_batch({key: local_batch[key] for key in batch_keys(config)}, mesh, rule_table))
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if not totals:
        raise ValueError(f"evaluation: the eval split of {config.data.corpus!r} gave no batch that splits over {data_parallel} devices")
    return totals


def evaluation(eval_step, params, config, mesh, rule_table) -> dict:
    """eval/ metrics on the held-out documents: MLM loss and accuracy, sentence accuracy, and NSP and SOP
    accuracy (ALBERT); for seq2seq denoising the reconstruction loss, nll and token accuracy."""
    num_batches = config.train.eval_batches
    results = {f"eval/{key}": float(value) for key, value in means(evaluate(eval_step, params, config, mesh, rule_table, num_batches)).items()}
    if is_seq2seq(config):
        return results
    # Every model is scored on both sentence tasks, whatever it trained on (ALBERT, Table 5): an
    # NSP-trained model on SOP data, an SOP-trained one on NSP data, an untrained head (none) on both.
    for objective in SENTENCE_OBJECTIVES:
        if objective == config.data.sentence_objective:
            results[f"eval/{objective}_accuracy"] = results["eval/sentence_accuracy"]
        else:
            sums = evaluate(eval_step, params, _with_objective(config, objective), mesh, rule_table, num_batches)
            results[f"eval/{objective}_accuracy"] = sums["sentence_correct"] / sums["sentence_count"]
    return results


# --- Stopping cleanly on SIGTERM / SIGINT ------------------------------------------------------


@contextlib.contextmanager
def stop_requests():
    """Yields a list that receives the signal's name on SIGTERM or SIGINT: the loop then finishes the
    step, saves a checkpoint and returns (a scheduler's preemption, or Ctrl-C; a second Ctrl-C
    interrupts at once)."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final checkpoint
        received.append(signal.Signals(signum).name)
        log.warning("%s: finishing this step, saving a checkpoint, then stopping", received[-1])

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# --- The run ---------------------------------------------------------------------------------------


def _check_finite(history: list[tuple[int, dict]], last_checkpoint: int | None) -> None:
    for step, values in history:
        if not math.isfinite(values["loss"]):
            where = f"step {last_checkpoint} is the last good checkpoint" if last_checkpoint else "no checkpoint was saved"
            raise NonFiniteLossError(f"the loss is {values['loss']} at step {step}; stopping ({where})")


def train_and_evaluate(config, workdir) -> dict:
    """Pretrain as `config` says, in `workdir` (resumed if it holds checkpoints). Returns the last metrics."""
    config_lib.validate(config)
    # Orbax reports every phase of every save at INFO (through absl); the progress bar says enough.
    logging.getLogger("absl").setLevel(logging.WARNING)
    partitioning.initialize_distributed(config.mesh)  # before the lock: it asks which process this is
    with workdir_lib.lock(workdir) as locked:
        return _train(config, locked)


def _train(config, workdir: pathlib.Path) -> dict:
    total_steps = config.train.total_steps
    seq_len = config.data.max_seq_length

    # --- Mesh
    mesh = partitioning.make_mesh(config.mesh)
    rule_table = partitioning.rules(config.mesh)
    primary = jax.process_index() == 0
    if config.train.batch_size % (jax.process_count() * mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} must be divisible by the data-parallel size "
            f"{mesh.shape['data'] * mesh.shape['fsdp']} (mesh.data * mesh.fsdp) and the {jax.process_count()} processes"
        )

    # --- Data
    from bertjax.data import loader, tokenizer

    if config.init_from and not config.data.tokenizer:
        # Parameters from another run only mean something with that run's vocabulary.
        config = config.copy_and_resolve_references()
        config.data.tokenizer = str(checkpoint_io.tokenizer_path(config.init_from))
        log.info("init_from %s: using its tokenizer %s", config.init_from, config.data.tokenizer)
    tok = tokenizer.for_config(config)
    # tokenizer.for_config refuses more pieces than model.vocab_size; fewer leave rows unused (the loader logs it).
    if primary:
        tok.save(workdir / checkpoint_io.TOKENIZER)
    train_batches = loader.batches(config, split="train")

    # --- Model
    model, model_cfg = build_model(config, tok)

    # --- State
    boxed_params = state_lib.abstract_params(model, seq_len)
    schedule = optim.learning_rate_schedule(config.optim, total_steps)
    tx = optim.create(config.optim, total_steps, boxed_params)
    state, state_spec = state_lib.create(model, tx, config.train.seed, seq_len, mesh, rule_table)

    # --- Step
    train_step = jit_train_step(model, tx, schedule, config, mesh, rule_table, state_spec)
    eval_step = jax.jit(make_eval_step(model, config), out_shardings=partitioning.replicated(mesh))

    # --- Checkpoint
    checkpoints = checkpoints_lib.Checkpoints(workdir, config.checkpoint, total_steps)
    latest = checkpoints.latest_step()
    tokens_seen = 0
    if latest is not None and not checkpoints.metadata(latest).get("params_only"):
        state, metadata = checkpoints.restore(latest, state_spec, train_batches)
        tokens_seen = metadata["tokens_seen"]
        if metadata["config_hash"] != config_lib.config_hash(config):
            log.warning("resuming %s from step %d with a config that differs from the checkpoint's", workdir, latest)
        log.info("resumed from %s step %d", checkpoints.directory, latest)
    elif latest is not None or config.init_from:
        source = f"{workdir}:{latest}" if latest is not None else config.init_from
        _, params = checkpoint_io.load_params(source, state_spec.abstract.params)
        state = state.replace(params=params)
        log.info("initialised the parameters from %s (fresh optimizer)", source)
    start_step = int(jax.device_get(state.step))
    checkpoint_metadata = {
        "config": config.to_dict(),
        "config_hash": config_lib.config_hash(config),
        "git_revision": checkpoint_io.git_revision(),
        "param_shapes": checkpoint_io.param_shapes(state_spec.abstract.params),
    }

    # --- Loop
    writer = metrics_lib.Writer(workdir, config, resumed_step=start_step)
    tokens_per_step = config.train.batch_size * seq_len
    peak = metrics_lib.peak_flops_per_device(override_tflops=config.train.peak_tflops)
    throughput = metrics_lib.Throughput(tokens_per_step, models.flops_per_token(model_cfg, seq_len), peak * jax.device_count() if peak else None)
    progress = metrics_lib.Progress(total_steps, start_step, enabled=primary and config.train.progress)
    log_every = config.train.log_every
    unchecked: list[tuple[int, dict]] = []  # device metrics not yet read back (no host stall per step)
    window: list[dict] = []  # host metrics since the last log line
    last: dict = {}
    steps_timed = 0
    stopped_by = None
    started = time.perf_counter()
    step = start_step
    with stop_requests() as stop, contextlib.closing(checkpoints), contextlib.closing(writer), contextlib.closing(progress):
        for step in range(start_step + 1, total_steps + 1):
            local_batch = next(train_batches)
            state, step_metrics = train_step(state, partitioning.global_batch({key: local_batch[key] for key in batch_keys(config)}, mesh, rule_table))
            unchecked.append((step, step_metrics))
            tokens_seen += tokens_per_step
            steps_timed += 1
            progress.advance()
            if step == start_step + 1:
                jax.block_until_ready(step_metrics)  # compilation is not throughput
                host_memory.release_if_tight()
                throughput.restart()
                steps_timed = 0
            stopped_by = stop[0] if stop else None
            if config.train.run_steps and step - start_step == config.train.run_steps and step < total_steps:
                stopped_by = "train.run_steps"
            log_due = step % log_every == 0 or step == total_steps
            eval_due = config.train.eval_batches > 0 and (step % config.train.eval_every == 0 or step == total_steps)
            save_due = checkpoints.due(step) or stopped_by is not None
            if not (log_due or eval_due or save_due):
                continue
            history = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in unchecked]
            unchecked.clear()
            _check_finite(history, checkpoints.latest_step())
            window.extend(values for _, values in history)
            record = {}
            if log_due and window:
                record.update({key: float(np.mean([values[key] for values in window])) for key in window[0]})
                record["learning_rate"] = window[-1]["learning_rate"]
                record.update(throughput.measure(steps_timed) if steps_timed else {})
                record["tokens_seen"] = tokens_seen
                steps_timed = 0
                window.clear()
                progress.show(record)
            if save_due:
                checkpoints.save(step, state, train_batches, {**checkpoint_metadata, "tokens_seen": tokens_seen, "time": time.time()})
            if eval_due:
                record.update(evaluation(eval_step, state.params, config, mesh, rule_table))
            if record:
                writer.write(step, record)
                last.update(record)
            host_memory.release_if_tight()  # the heap settles in the first steps and evaluations; if it grows too far, stop keeping
            if save_due or eval_due:
                throughput.restart()
                steps_timed = 0
            if stopped_by is not None:
                break
    summary = {"step": step, "tokens_seen": tokens_seen, "seconds": round(time.perf_counter() - started, 1), **last}
    if stopped_by is not None:
        summary["stopped_by"] = stopped_by
    if primary:
        shown = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in summary.items())
        print(f"pretrain {'stopped' if stopped_by else 'done'}: {shown} workdir={workdir}", flush=True)
    return summary
