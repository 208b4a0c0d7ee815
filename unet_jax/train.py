"""`train_and_evaluate(config, workdir)`: the one training loop, and `evaluate_checkpoint`.

Data -> one `jax.jit` step over the global batch sharded on the mesh's `data` axis (state
replicated and donated, BatchNorm over the global batch) -> log sums on device, read at log
steps (metrics.jsonl, TensorBoard, tqdm) -> periodic evaluation (metrics, overlays, best
checkpoint) -> periodic checkpoints. A workdir holding checkpoints is resumed from its last
committed step, with exactly the data order, dropout masks, logs and final parameters of an
uninterrupted run.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from unet_jax import parallel
from unet_jax.io import checkpoint, paths, weights
from unet_jax.config import check_config
from unet_jax.errors import CheckpointError, DivergenceError, WorkdirError
from unet_jax.io.lock import WorkdirLock
from unet_jax.io.paths import as_path
from unet_jax.run_logs import (CURVES_FILE, OVERLAYS_DIR, SUMMARY_KEYS, MetricsLog, TensorBoard,
                               plot_curves, print_table, save_overlays, tqdm_write)
from unet_jax.step import MODEL, OPTIMIZER, TrainState, create_train_state, make_train_step

CONFIG_FILE = "config.json"


class Preempted(Exception):
    """SIGTERM, SIGINT (Ctrl-C) or a preemption notice was received; a checkpoint was saved at
    `step`."""

    def __init__(self, step: int, workdir: Path):
        super().__init__(f"stopped by a signal after step {step}; checkpoint saved in "
                         f"{workdir / checkpoint.CHECKPOINTS_DIR}; run the same command to resume")
        self.step = step


# --------------------------------------------------------------------------- small helpers

def default_workdir(config: Any, root: str | Path = "runs") -> Path:
    """`runs/<dataset>_<head>_<YYYYmmdd-HHMMSS>` (the same on every process)."""
    stamp = int(parallel.broadcast_from_main(np.asarray(int(time.time()), np.int64)))
    when = datetime.datetime.fromtimestamp(stamp).strftime("%Y%m%d-%H%M%S")
    return as_path(root) / f"{config.data.name}_{config.model.head}_{when}"


def load_splits(config: Any) -> tuple[Any, Any]:
    """(train, validation) record sources of `config.data` (`unet_jax.data.records`); prepares
    the data the first time. With `data.host_shard` the train source is this host's rows.

    Process 0 prepares first; the others then prepare only if their disk does not see it.
    """
    from unet_jax import data
    from unet_jax.data.records import host_rows

    if parallel.is_main_process():
        data.prepare(config.data)
    parallel.sync("unet_jax:data_prepared")
    train = data.source(config.data, "train")
    if config.data.host_shard:
        train = train.shard(host_rows(len(train), jax.process_index(), jax.process_count()))
    return train, data.source(config.data, "validation")


def _build(config: Any) -> nnx.Module:
    from unet_jax.models import build_model
    return build_model(config.model, seed=config.train.seed)


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _check_same_model(workdir: Path, config: Any) -> None:
    """Refuse to resume a workdir whose `config.json` describes another model."""
    path = workdir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text()).get("model", {})
    except (OSError, json.JSONDecodeError):
        return
    from unet_jax.recipe import unet_s5_d16

    ours = json.loads(config.model.to_json())
    # a field added since the run began is absent from its record: it held the default then
    defaults = json.loads(unet_s5_d16(config.model.head, "ce").model.to_json())
    saved = {**{k: v for k, v in defaults.items() if k in ours}, **saved}
    diff = [f"model.{k}: {saved.get(k)!r} in the workdir, {ours.get(k)!r} now"
            for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if diff:
        raise WorkdirError(f"{workdir} holds checkpoints of another model ({'; '.join(diff)}); "
                           "resume with the workdir's config or choose a new --workdir")


def _schedule_note(workdir: Path, config: Any, step: int) -> str | None:
    """What changes when a run resumes under another schedule than its `config.json` recorded
    (None if nothing does): the run continues from `step` on the new schedule, and says so."""
    from unet_jax.optim import schedule_changes
    try:
        saved = json.loads((workdir / CONFIG_FILE).read_text()).get("train", {})
    except (OSError, json.JSONDecodeError):
        return None
    return schedule_changes(saved, config.train, step)


# --------------------------------------------------------------------------- evaluation

def run_evaluation(model: nnx.Module, val_ds: Any, config: Any, *, num_examples: int = 0,
                   progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate `model` on the validation split -> (summary, first `num_examples` examples)."""
    from unet_jax.evaluate import evaluate

    result = evaluate(model, val_ds, config, progress=progress, num_examples=num_examples)
    return result.summary, result.examples


def _eval_model(train: TrainState) -> nnx.Module:
    """The training model over the training arrays, as they are (evaluation makes an eval view
    that uses this process's replicas in place: no copy)."""
    return train.model()


def _evaluate_and_log(config: Any, train: TrainState, val_ds: Any, step: int, log: MetricsLog,
                      board: TensorBoard, ckpts: checkpoint.TrainCheckpoints,
                      workdir: Path) -> dict[str, Any]:
    summary, examples = run_evaluation(_eval_model(train), val_ds, config,
                                       num_examples=config.train.num_overlays,
                                       progress=parallel.is_main_process())
    log.write({"step": step, "split": "validation", **summary})
    board.scalars("validation", summary, step)
    save_overlays(examples, workdir / OVERLAYS_DIR / f"step_{step}", config.data.palette)
    if parallel.is_main_process():
        brief = ", ".join(f"{k} {summary.get(k)}" for k in SUMMARY_KEYS)
        tqdm_write(f"step {step}: validation {brief}")
    ckpts.save_best(train, step, summary, {"classes": list(config.data.classes),
                                           "palette": [list(p) for p in config.data.palette],
                                           "source": f"unet_jax training {workdir}"})
    return summary


def _finished_summary(log: MetricsLog, config: Any, train: TrainState, val_ds: Any,
                      step: int) -> dict[str, Any]:
    """The final validation line of a run that is already complete (evaluated if missing)."""
    for record in reversed(log.read()):
        if (record.get("split") == "validation" and record.get("step") == step
                and record.get("mode") != "eval"):
            if parallel.is_main_process():
                print(f"{log.path.parent}: already trained to step {step}")
            return {k: v for k, v in record.items() if k not in ("step", "split")}
    summary, _ = run_evaluation(_eval_model(train), val_ds, config)
    log.write({"step": step, "split": "validation", **summary})
    return summary


# --------------------------------------------------------------------------- training

def _left_healthy_range(history: list[dict[str, Any]]) -> tuple[int, float] | None:
    """(first step that may hold it, bound) of the first logged training loss above twice the
    run's first logged loss, or None. A run starts near its highest loss, so a loss beyond twice
    that has left the range training moves in, well before it overflows; the window of that log
    line may have started right after the previous one."""
    losses = [(int(r["step"]), float(r["loss"])) for r in history
              if r.get("split") == "train" and "loss" in r]
    if not losses:
        return None
    bound = 2 * losses[0][1]
    previous = 0
    for step, loss in losses:
        if not loss <= bound:  # NaN included
            return previous + 1, bound
        previous = step
    return None


def _divergence(step: int, logs: dict[str, Any], bad: dict[str, int],
                ckpts: checkpoint.TrainCheckpoints,
                history: list[dict[str, Any]]) -> DivergenceError:
    """The error for non-finite training values, naming the last good checkpoint.

    Nothing non-finite is ever saved, but a finite checkpoint can still lead into the
    divergence: the one of step f - 1 when the loss of step f is the first one out of its
    healthy range (`history`, the run's metrics lines) or the first non-finite one. Such
    checkpoints are moved to `<workdir>/diverged/` (kept), so that the same command with a lower
    learning rate resumes from the last good one.
    """
    ckpts.wait()
    what = []
    last_good = step
    left = _left_healthy_range(history)
    if left is not None:
        what.append(f"the loss left its healthy range (above {left[1]:.4g}, twice its first "
                    f"logged value) by step {left[0]}")
        last_good = left[0] - 2  # its parameters came from step left[0] - 1
    if logs["first_nonfinite"] >= 0:
        first = logs["first_nonfinite"] + 1  # the step whose loss is the first non-finite one
        what.append(f"the loss is not finite from step {first}")
        last_good = min(last_good, first - 2)
    if bad:
        names = ", ".join(f"{k} ({n})" for k, n in sorted(bad.items())[:4])
        what.append(f"{sum(bad.values())} non-finite values in parameters or BatchNorm "
                    f"statistics: {names}{', ...' if len(bad) > 4 else ''}")
    moved = [ckpts.set_aside(s, ckpts.diverged_directory)
             for s in sorted(ckpts.manager.all_steps()) if s > last_good]
    latest = ckpts.latest_step()
    aside = (f"; the checkpoints after it, which lead into the divergence, were moved to "
             f"{ckpts.diverged_directory}" if moved else "")
    if latest is None:
        advice = ("no checkpoint precedes the divergence" + aside.replace("after it", "made")
                  + ": start again with a lower --config.train.lr")
    else:
        advice = (f"the last good checkpoint is {ckpts.directory / str(latest)} (step {latest}, "
                  f"all finite){aside}: run the same command with a lower --config.train.lr to "
                  "resume from it")
    return DivergenceError(f"training diverged by step {step}: {'; '.join(what)}; {advice}")


def train_and_evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Train `config` in `workdir` (resuming if it holds checkpoints); returns the final summary.

    Writes `metrics.jsonl`, TensorBoard events, `checkpoints/`, `best/`, `overlays/step_<N>/`,
    `training_curves.png` and `config.json` into `workdir`, which one run holds at a time.
    Raises `DivergenceError` if the loss, a parameter or a BatchNorm statistic stops being
    finite (nothing non-finite is ever checkpointed) and `Preempted` after saving on SIGTERM.
    """
    check_config(config)
    workdir = paths.to_path(workdir)
    # a bucket's folder is not asked for (no permission would fail there, not at the lock)
    created = not paths.is_url(workdir) and not workdir.exists()
    lock = WorkdirLock(workdir)
    error = None
    if parallel.is_main_process():
        try:
            lock.acquire()
        except WorkdirError as err:
            error = err
    if int(parallel.broadcast_from_main(np.int32(error is None))) != 1:
        raise error or WorkdirError(f"{workdir} is in use by another run (see process 0)")
    failed = True
    try:
        summary = _train_and_evaluate(config, workdir)
        failed = False
        return summary
    finally:
        lock.release()
        if failed and created and parallel.is_main_process():
            _remove_empty_folders(workdir)


def _remove_empty_folders(folder: Path) -> None:
    """Remove `folder` if no file lies under it: a run that failed before writing anything (a
    missing dataset, a bad checkpoint) leaves no empty run folder behind."""
    inside = sorted(folder.rglob("*"), reverse=True)  # children before parents
    if any(not p.is_dir() or p.is_symlink() for p in inside):
        return
    for path in [*inside, folder]:
        with contextlib.suppress(OSError):  # filled meanwhile (or gone): keep the error raised
            path.rmdir()


def _train_and_evaluate(config: Any, workdir: Path) -> dict[str, Any]:
    # ---- set-up: everything that can fail on the user's input fails here, before any work
    main = parallel.is_main_process()
    t = config.train
    mesh = parallel.make_mesh()
    local_batch = parallel.check_batch_size(t.batch_size, mesh)
    ckpts = checkpoint.TrainCheckpoints(workdir, keep=t.keep_checkpoints,
                                        metric=config.eval.metric)
    has_checkpoints = ckpts.latest_step() is not None
    if has_checkpoints:
        _check_same_model(workdir, config)
    else:
        ckpts.check_history()
    if main:
        print(f"{workdir}: {jax.device_count()} {jax.devices()[0].platform} device(s) in "
              f"{jax.process_count()} process(es), global batch {t.batch_size} "
              f"({local_batch} per process), model dtype {config.model.dtype}")
    train_ds, val_ds = load_splits(config)

    # ---- the model, its optimiser and the jitted step
    model = _build(config)
    if not has_checkpoints and config.init_from:
        info = weights.load(model, config.init_from)
        if main:
            print(f"initialised from {info['source']}")
    train = create_train_state(model, config)
    del model
    train.state = parallel.replicate(train.state, mesh)
    resume_step = ckpts.restore(train) if has_checkpoints else None
    if resume_step is not None and main:
        print(f"resuming {workdir} from step {resume_step}")
        note = _schedule_note(workdir, config, resume_step)
        if note:
            print(note)
    if main:
        paths.replace_text(workdir / CONFIG_FILE, config.to_json_best_effort(indent=1) + "\n")
    parallel.sync("unet_jax:workdir")
    start = resume_step or 0
    log = MetricsLog(workdir)
    log.truncate(start)
    board = TensorBoard(workdir, start)
    step_fn = parallel.jit_step(make_train_step(train, config), train.state, mesh)

    from unet_jax.data.folder import sample_weights
    from unet_jax.data.sampler import train_batches
    batches: Iterator[dict[str, np.ndarray]] = train_batches(
        train_ds, config.data, global_batch_size=t.batch_size, seed=t.seed,
        start_step=start, process_index=jax.process_index(),
        process_count=jax.process_count(), host_shard=config.data.host_shard,
        workers=config.data.workers, sample_weights=sample_weights(config.data, train_ds.names()))

    # ---- the loop
    watcher = checkpoint.PreemptionWatcher()
    from tqdm import tqdm
    bar = tqdm(total=t.num_steps, initial=start, desc="train", unit="step", disable=not main,
               dynamic_ncols=True, mininterval=1.0)
    last_summary: dict[str, Any] | None = None
    tic, tic_step = time.perf_counter(), start
    try:
        if start >= t.num_steps:
            last_summary = _finished_summary(log, config, train, val_ds, start)
        for step in range(start + 1, t.num_steps + 1):
            train.state = step_fn(train.state, parallel.global_batch(next(batches), mesh))
            bar.update(1)
            stop = watcher.reached(step)
            do_log = _every(step, t.log_every) or step == t.num_steps
            do_eval = _every(step, t.eval_every) or step == t.num_steps
            do_ckpt = _every(step, t.checkpoint_every) or step == t.num_steps or stop
            if not (do_log or do_eval or do_ckpt):
                continue
            logs = train.read_logs()  # the one host sync between log steps
            bad = weights.nonfinite({"model": train.state[MODEL],
                                     "optimizer": train.state[OPTIMIZER]})
            if logs["first_nonfinite"] >= 0 or bad:
                raise _divergence(step, logs, bad, ckpts, log.read())
            if do_log:
                now = time.perf_counter()
                rate = (step - tic_step) * t.batch_size / max(now - tic, 1e-9)
                tic, tic_step = now, step
                means = logs["means"]
                log.write({"step": step, "split": "train", **means, "lr": logs["lr"]})
                board.scalars("train", {**means, "lr": logs["lr"], "images_per_s": rate}, step)
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                                img_s=f"{rate:.1f}", refresh=False)
                train.reset_logs()
            if do_eval:
                last_summary = _evaluate_and_log(config, train, val_ds, step, log, board, ckpts,
                                                 workdir)
                tic, tic_step = time.perf_counter(), step  # evaluation is not training time
            if do_ckpt:
                ckpts.save(train, step)
            if stop:
                ckpts.wait()
                raise Preempted(step, workdir)
        ckpts.wait()
    finally:
        batches.close()  # stops the augmentation workers
        bar.close()
        watcher.close()
        board.close()
        ckpts.close()

    # ---- the end: the per-class table, curves and where everything is
    if last_summary is None:
        raise RuntimeError("training ended without an evaluation")
    final_step = max(start, t.num_steps)
    print_table(last_summary, config, final_step)
    if main:
        plot_curves(log.read(), workdir / CURVES_FILE)
        print(f"metrics: {log.path}\ncurves: {workdir / CURVES_FILE}\n"
              f"checkpoints: {ckpts.directory} (best {config.eval.metric}: {ckpts.best_directory})")
    return last_summary


# --------------------------------------------------------------------------- eval mode

def evaluate_checkpoint(config: Any, workdir: str | Path | None, *,
                        overridden: Collection[str] = ()) -> dict[str, Any]:
    """Evaluate the latest checkpoint of `workdir` (or `config.init_from`) on the validation split.

    Appends a line (split "validation", mode "eval") to `<workdir>/metrics.jsonl` when a workdir
    is given, prints the per-class table and returns the summary.
    """
    check_config(config)
    source = None
    if workdir is not None and (as_path(workdir) / checkpoint.CHECKPOINTS_DIR).is_dir():
        source = as_path(workdir)
    elif config.init_from:
        source = as_path(config.init_from)
    if source is None:
        raise CheckpointError(
            f"eval mode: expected checkpoints in {Path(workdir or '.') / checkpoint.CHECKPOINTS_DIR}"
            " or --config.init_from=CKPT (a weights folder, a workdir or an mmseg .pth); "
            "found neither")
    weights.use_recorded_model(config, source, overridden)  # the model the checkpoint holds
    model = _build(config)
    info = weights.load(model, source)
    if parallel.is_main_process():
        print(f"evaluating {info['source']}")
    _, val_ds = load_splits(config)
    step = info["step"]
    summary, examples = run_evaluation(model, val_ds, config,
                                       num_examples=config.train.num_overlays)
    if workdir is not None:
        workdir = as_path(workdir)
        if parallel.is_main_process():
            workdir.mkdir(parents=True, exist_ok=True)
        MetricsLog(workdir).write({"step": int(step or 0), "split": "validation", "mode": "eval",
                                   **summary})
        save_overlays(examples, workdir / OVERLAYS_DIR / f"eval_step_{int(step or 0)}",
                      config.data.palette)
    print_table(summary, config, step)
    return summary
