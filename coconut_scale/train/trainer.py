"""The Trainer: a recipe's whole curriculum, from data to checkpoints and HF exports.

    trainer = Trainer(recipe)
    try:
        trainer.setup()    # the run (process group, lock, checkpoint to resume), its data, its engine, the resume
        trainer.fit()      # for each epoch: train_epoch (train_step per optimizer step), evaluate, exports, save
    finally:
        trainer.close()    # wandb finished, the run lock released, whatever happened

Every rank runs the same code. The loop keeps the number of base-model calls constant within a stage (ZeRO-3's
collectives and its prefetch trace need that), reads nothing back from the device but one tensor per optimizer
step (the non-finite guard) and the logged loss, and writes a stage's HF export before the checkpoint that moves
past it, so a kill can never lose an export.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import yaml

from coconut_scale import distributed as dist
from coconut_scale.atomic_files import write_jsonl_atomic, write_text_atomic
from coconut_scale.config.batch_plan import BatchMathError, BatchPlan, format_batch_table, resolve_batch
from coconut_scale.config.ds_config import build_ds_config, ds_config_path
from coconut_scale.config.model_shape import hidden_size
from coconut_scale.config.model_spec import loss_weights
from coconut_scale.config.schedule import schedule_steps
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.data.curriculum import CurriculumConfig, build_eval_examples, build_stage_dataset, stage_for_epoch
from coconut_scale.data.sampler import GlobalBatchSampler
from coconut_scale.data.step_targets import StepTargetCollator
from coconut_scale.data.tokenized import cache_file, load_tokenized
from coconut_scale.evaluate.generation import generate_and_score, validation_loss
from coconut_scale.model.export_meta import ExportMeta, StepDecoderMeta
from coconut_scale.model.loading import DTYPES, verify_export
from coconut_scale.model.step_supervision import StepSupervision
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.train import storage
from coconut_scale.train.checkpoints import LOOP_STATE, CheckpointManager, read_json
from coconut_scale.train.codi_run import (PART_NAME as CODI_PART, CodiData, codi_export_meta, codi_step_collator,
                                          load_codi_data)
from coconut_scale.train.cpu_malloc import tune_cpu_malloc
from coconut_scale.train.data_identity import DATA_FILE, check_data, check_tokenizer, data_identity, token_identity
from coconut_scale.train.engine import build_engine
from coconut_scale.train.export import export_hf, point_export
from coconut_scale.train.losses import logged_parts, training_loss
from coconut_scale.train.nonfinite_guard import NonFiniteError, NonFiniteGuard
from coconut_scale.train.preemption import Preempted, StopSignals, timed
from coconut_scale.train.recipe_guard import CHANGES_FILE, RECIPE_FILE, change_history, check_resume
from coconut_scale.train.run_data import prepare_data, recipe_tokenizer
from coconut_scale.train.run_lock import RunLock, RunLockError
from coconut_scale.train.run_log import RunLog, cpu_threads_note, peak_memory_gb
from coconut_scale.train.save_cost import checkpoint_bytes, save_line
from coconut_scale.train.staged_setup import StagedSetup
from coconut_scale.train.state import LogWindow, StepResult, TrainState
from coconut_scale.train.strategy import DeepSpeedStrategy, init_distributed, validate_ds_config
from coconut_scale.train.versions import refuse_unknown


def _expected_checkpoint_bytes(recipe) -> int | None:
    try:
        return checkpoint_bytes(recipe)
    except (ValueError, KeyError):  # a model whose shape is unknown here: no estimate
        return None


class RunComplete(Exception):
    """The checkpoint to resume from ends the recipe's last epoch: nothing is left to train."""

    def __init__(self, checkpoint: Path, loop_state: dict, epochs: int, out: Path):
        self.checkpoint, self.loop_state, self.epochs, self.out = checkpoint, loop_state, epochs, out

    def line(self) -> str:
        state, best = self.loop_state, self.loop_state.get("best_accuracy", -1.0)
        return (f"run already complete: {self.checkpoint} ends epoch {self.epochs - 1}, the last of optim.epochs = "
                f"{self.epochs} (global step {state.get('global_step')}"
                f"{f', best accuracy {best:.4f}' if best >= 0 else ''}); nothing to train, exports in "
                f"{self.out / 'hf'}. To train on, raise optim.epochs and allow it: "
                f"checkpoint.allow_changes=[optim.epochs]")


def _say(message: str) -> None:
    """A line on rank 0, for what happens before the RunLog exists."""
    if dist.is_main():
        print(message, flush=True)


class Trainer:
    def __init__(self, recipe):
        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        self.cfg = CurriculumConfig.from_recipe(recipe.coconut)
        self.state = TrainState(epoch=recipe.checkpoint.resume_from_epoch)
        self.loss_weights = loss_weights(recipe)  # of each method part's loss term (train/losses.py)
        self.last_checkpoint: Path | None = None
        # The run (_setup_run)
        self.plan: BatchPlan | None = None
        self.ds_config: dict | None = None  # filled for this world size; validated before any process group
        self.resolved_yaml = yaml.safe_dump(recipe.resolved_dict(), sort_keys=False)
        self.lock: RunLock | None = None
        self.ckpts: CheckpointManager | None = None
        self.log: RunLog | None = None
        self.recipe_changes: dict[str, list] = {}
        self.side_files: dict[str, str] = {}  # written beside every checkpoint
        self.staged = StagedSetup(self.out)  # what setup writes into output_dir, moved into place once it succeeds
        self.stop = StopSignals(recipe.checkpoint.on_signal)  # checkpoint.on_signal: stop at a step boundary
        self.identity: dict = {}  # the data's identity (data_identity.json beside every checkpoint)
        # The data (_setup_data)
        self.tokenizer = None
        self.tokens: LatentTokens | None = None
        self.train_recs: list[dict] = []
        self.val_recs: list[dict] = []
        self.sampler: GlobalBatchSampler | None = None
        self.steps_per_epoch = 0
        self.collate: LatentAlignedCollator | None = None
        self.step_collate: StepTargetCollator | None = None  # SIM-CoT's per-step decoder targets
        self.codi: CodiData | None = None  # method codi: its features, prompts and part collator (train/codi_run.py)
        # The engine (_setup_engine)
        self.strategy: DeepSpeedStrategy | None = None
        self.model = None  # the Coconut wrapper the engine trains
        self.guard: NonFiniteGuard | None = None
        self.window: LogWindow | None = None  # the current epoch's accumulators since the last logged line

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        """The run, its data, its engine and the resume. Nothing stays in output_dir when any of it fails: what it
        wrote there is staged (train/staged_setup.py) and moved into place only at the end."""
        self.stop.install()
        try:
            latest = self._setup_run()
            self._setup_data(latest)
            universal = self._setup_engine(latest)
            self._resume(latest, universal)
        except BaseException:
            self.staged.roll_back(self.lock)
            raise
        self._commit_setup()
        return self

    def _commit_setup(self) -> None:
        """Setup succeeded: its files move into output_dir, the recipe is written, the log opens (metrics, wandb)."""
        if dist.is_main():
            self.staged.commit()
            write_text_atomic(self.out / RECIPE_FILE, self.resolved_yaml)
        self.log.start()
        if self.recipe_changes:
            self.log.log("recipe_change", global_step=self.state.global_step, checkpoint=str(self.last_checkpoint),
                         changes=self.recipe_changes)
        dist.barrier()

    def _setup_run(self) -> Path | None:
        """Batch plan and DeepSpeed config (every recipe mistake fails here, before any process group), the
        process group, the run lock, the checkpoint to resume from, the log. Returns that checkpoint."""
        recipe = self.recipe
        world = dist.env_world_size()
        self.plan = resolve_batch(recipe.batch, world, recipe.data.max_seq_len)
        self.ds_config = build_ds_config(recipe, self.plan, hidden_size(recipe))
        validate_ds_config(self.ds_config, f"{ds_config_path(recipe)} (+ deepspeed.overrides)")

        init_distributed(recipe.distributed.timeout_s)
        self._take_output_dir()
        if dist.is_main():  # saves and exports a kill interrupted, a setup that never finished: redone by this run
            ckpt_root = self.out / "checkpoints"
            storage.remove_leftovers([self.out, self.out / "hf", self.out / "token_cache", self.out / "samples",
                                      ckpt_root, *(sorted(ckpt_root.glob("step-*")) if ckpt_root.is_dir() else [])],
                                     log=_say)
        torch.manual_seed(recipe.seed)
        self.ckpts = CheckpointManager(self.out / "checkpoints", recipe.checkpoint.keep_last,
                                       expected_bytes=_expected_checkpoint_bytes(recipe))
        latest = self.ckpts.resume_point(log=_say) if recipe.checkpoint.auto_resume else None
        # Before anything is written or loaded: another recipe stops the run here, naming every key it changes.
        self.recipe_changes = check_resume(recipe, latest) if latest is not None else {}
        if latest is not None:  # a finished run: said before the data, the model or anything in output_dir
            done = read_json(latest / LOOP_STATE)
            if done.get("epoch", 0) >= recipe.optim.epochs:
                raise RunComplete(latest, done, recipe.optim.epochs, self.out)
        if recipe.checkpoint.init_from:  # the export it starts from, against its manifest
            dist.refuse_together(lambda: verify_export(recipe.checkpoint.init_from, log=_say)
                                 if dist.is_main() else None)
        self.log = RunLog(self.out, recipe.logging.wandb_project, recipe.logging.wandb_run_name, recipe.resolved_dict())
        self.log.print(f"coconut_scale: {recipe.name} | world size {world} | output {self.out}")
        self.log.print(format_batch_table([self.plan]))
        self.log.print(save_line(recipe, world))
        note = cpu_threads_note()
        if note:
            self.log.print(note)
        malloc_line = tune_cpu_malloc(dist.device().type == "cpu")  # before the model: its tensors reuse the heap
        if malloc_line:
            self.log.print(malloc_line)
        return latest

    def _take_output_dir(self) -> None:
        """Rank 0 locks output_dir before anything is written there; a refusal stops every rank together."""
        self.lock = RunLock(self.out)
        refusal = None
        if dist.is_main():
            try:
                self.lock.acquire(log=_say)
            except RunLockError as e:
                refusal = str(e)
        refusal = dist.gather_objects(refusal)[0]
        if refusal:
            raise RunLockError(refusal)

    def _setup_data(self, latest: Path | None) -> None:
        """Generated data, its identity (checked against the checkpoint's), the tokenizer, tokenized records
        (through the cache), the sampler, the collators."""
        recipe = self.recipe
        prepare_data(recipe, self.log.print)
        self._check_data(latest)
        self.tokenizer = recipe_tokenizer(recipe, self.staged.path("tokenizer"))
        if recipe.model.bpe_vocab_size is not None:  # staged or not, the run's tokenizer/ (the cache key names it)
            self.tokenizer.name_or_path = str(self.out / "tokenizer")
        self.tokens = LatentTokens.from_tokenizer(self.tokenizer)
        self.collate = LatentAlignedCollator(self.tokens.pad_id, self.tokens.latent_id)
        if recipe.method == "codi":
            self.codi = load_codi_data(recipe, self.tokenizer, self.tokens, self.collate)
            self.train_recs, self.val_recs = self.codi.train, self.codi.val
            self.log.print(self.codi.summary)
        else:
            self._tokenize()
        if dist.is_main():
            self.identity.update(token_identity(recipe, self.tokenizer))
        dist.refuse_together(lambda: check_tokenizer(latest, self.identity, recipe) if dist.is_main() else None)
        self.sampler = GlobalBatchSampler(len(self.train_recs), self.plan, dist.rank(), seed=recipe.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        step = recipe.coconut.step_supervision
        # SIM-CoT's per-step decoder targets, built once from the records' step texts (data/step_targets.py).
        if step.enabled and self.codi is not None:  # SIM-CoT's CODI variant: steps cut from the teacher ids
            self.step_collate = codi_step_collator(recipe, self.tokenizer, self.tokens)
        elif step.enabled:
            self.step_collate = StepTargetCollator.from_records(self.train_recs, self.tokenizer, self.cfg, step.prompt)

    def _check_data(self, latest: Path | None) -> None:
        """Rank 0 reads the data files' identity and compares it with the checkpoint's; every rank stops together on
        a refusal. Accepted changes (checkpoint.allow_changes: [data.train_file]) join the recipe changes."""
        accepted = {}

        def check():
            self.identity = data_identity(self.recipe)
            if latest is not None:
                accepted.update(check_data(self.recipe, latest, self.identity))

        dist.refuse_together(check if dist.is_main() else lambda: None)
        self.recipe_changes.update(dist.gather_objects(accepted)[0])

    def _tokenize(self) -> None:
        data, cfg = self.recipe.data, self.cfg
        # An empty set (everything dropped by max_seq_len) is refused, naming the file, counts and lengths.
        cache = self.staged.token_cache_dir(data.cache_dir, lambda d: cache_file(data.train_file, self.tokenizer, d))
        self.train_recs, dropped = load_tokenized(data.train_file, self.tokenizer, data.max_seq_len, cache,
                                                  cfg.c_thought, cfg.max_latent_stage, role="train")
        cache = self.staged.token_cache_dir(data.cache_dir, lambda d: cache_file(data.val_file, self.tokenizer, d))
        self.val_recs, val_dropped = load_tokenized(data.val_file, self.tokenizer, data.max_seq_len, cache,
                                                    cfg.c_thought, cfg.max_latent_stage, role="validation")
        self.log.print(f"data: {len(self.train_recs)} train records ({dropped} dropped > max_seq_len "
                       f"{data.max_seq_len}), {len(self.val_recs)} validation ({val_dropped} dropped)")
        if data.eval_max_examples:
            self.val_recs = self.val_recs[: data.eval_max_examples]

    def _setup_engine(self, latest: Path | None) -> bool:
        """The engine over the recipe's training model (model/spec.py), built inside the strategy's ZeRO context.
        Returns whether `latest` loads through its universal copy (written at another world size)."""
        recipe = self.recipe
        n_schedule = schedule_steps(recipe, len(self.train_recs))  # refuses a data set with no full global batch
        ds_config = copy.deepcopy(self.ds_config)
        # A checkpoint from another GPU count loads only through its universal copy (coconut_scale.universal).
        universal = latest is not None and self.ckpts.needs_universal(latest, self.plan.world_size)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
        self.strategy = build_engine(recipe, ds_config, self.tokenizer, n_schedule, log=self.log.print)
        self.model = self.strategy.model
        self.guard = NonFiniteGuard(recipe, self.strategy, self.log)
        self.side_files = {RECIPE_FILE: self.resolved_yaml,
                           "batch_table.txt": format_batch_table(self._resolvable_plans()) + "\n"}
        if dist.is_main():
            self.side_files[DATA_FILE] = json.dumps(self.identity, indent=2, sort_keys=True) + "\n"
        return universal

    def _resume(self, latest: Path | None, universal: bool) -> None:
        """Weights, optimizer, schedule, RNG and loop state of `latest`, and the recipe changes it was resumed with."""
        if latest is not None:
            self.load(latest, universal)
        history = change_history(latest, self.recipe_changes, self.state.global_step)
        if history:  # beside every later checkpoint: the run's recipe changes so far
            self.side_files[CHANGES_FILE] = json.dumps(history, indent=2) + "\n"
        if self.recipe_changes:
            self.log.print("recipe changed on resume (checkpoint.allow_changes): " + "; ".join(
                f"{k}: {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in self.recipe_changes.items()))

    def _resolvable_plans(self) -> list[BatchPlan]:
        """The running world size's plan plus every listed one that resolves. A world size this run does not use
        must not stop it (the check command reports those); it is left out of the saved table instead."""
        plans = {self.plan.world_size: self.plan}
        for ws in self.recipe.batch.world_sizes:
            try:
                plans.setdefault(ws, resolve_batch(self.recipe.batch, ws, self.recipe.data.max_seq_len))
            except BatchMathError:
                pass
        return [plans[ws] for ws in sorted(plans)]

    def close(self) -> None:
        """Finish wandb, release the run lock and the signal handlers; safe after any failure, and more than once."""
        self.stop.uninstall()
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()

    # -- the loop -------------------------------------------------------------------------------------
    def planned_passes(self, stage: int) -> int:
        """Base-model calls per batch at `stage`, the same for every batch and rank. A uniform re-draw can give
        a row any stage up to max_latent_stage, so then every batch gets the most any stage needs. CODI: always
        num_latent + 1."""
        if self.codi is not None:
            return self.codi.passes
        return self.cfg.max_passes if self.cfg.uniform_prob > 0 else self.cfg.passes_for_stage(stage)

    def fit(self) -> TrainState:
        recipe, state = self.recipe, self.state
        self.strategy.train()
        if self.stop.agreed():  # a signal during setup: nothing trained since the checkpoint there is
            raise Preempted(self.stop.name(), self.last_checkpoint, state, None)
        for epoch in range(state.epoch, recipe.optim.epochs):
            stage = self.stage_of(epoch)
            if state.stage is not None and stage != state.stage and recipe.coconut.reset_optimizer \
                    and state.step_in_epoch == 0:
                self.strategy.reset_optimizer()
                self.log.print(f"stage {state.stage} -> {stage}: optimizer state and LR schedule reset")
            state.stage = stage
            self.train_epoch(epoch, stage)
            metrics = {"epoch": epoch, "stage": stage, "global_step": state.global_step}
            if (epoch + 1) % recipe.eval.every_epochs == 0 or epoch + 1 == recipe.optim.epochs:
                self.log.print(f"epoch {epoch} stage {stage}: evaluating on {len(self.val_recs)} validation records")
                metrics.update(self.evaluate(epoch, stage))
            state.epoch, state.step_in_epoch = epoch + 1, 0
            accuracy = metrics.get("accuracy")
            is_best = accuracy is not None and accuracy > state.best_accuracy
            if is_best:
                state.best_accuracy = accuracy
            # Exports first: a kill before the checkpoint below re-runs this epoch's tail and exports again.
            if recipe.checkpoint.export_hf:
                stage_ends = epoch + 1 == recipe.optim.epochs or self.stage_of(epoch + 1) != stage
                if stage_ends:
                    self.export(f"stage{stage}", stage, metrics)
                if is_best and stage_ends:  # the same weights: best names the stage's export, no second copy
                    point_export(self.out / "hf" / "best", self.out / "hf" / f"stage{stage}")
                    self.log.print(f"best -> {self.out / 'hf' / f'stage{stage}'}")
                elif is_best:
                    self.export("best", stage, metrics)
            _, save_s = timed(self.save)
            if epoch + 1 < recipe.optim.epochs and self.stop.agreed():
                raise Preempted(self.stop.name(), self.last_checkpoint, state, save_s)
        self.log.print(f"done: best accuracy {state.best_accuracy:.4f}; outputs in {self.out}")
        return state

    def stage_of(self, epoch: int) -> int:
        """The curriculum stage of `epoch`; CODI has no curriculum (stage 0 throughout)."""
        return 0 if self.codi is not None else stage_for_epoch(epoch, self.cfg)

    def _epoch_data(self, records: list[dict], stage: int, epoch: int):
        if self.codi is not None:
            return records  # CODI's features are the training examples, the same every epoch
        return build_stage_dataset(records, stage, self.cfg, self.tokens, seed=self.recipe.seed * 1000 + epoch)

    def train_epoch(self, epoch: int, stage: int) -> None:
        recipe, state = self.recipe, self.state
        data = self._epoch_data(self.train_recs, stage, epoch)
        passes = self.planned_passes(stage)
        bar = self.log.progress(self.steps_per_epoch, f"epoch {epoch} stage {stage}", initial=state.step_in_epoch)
        micro_batches = self.sampler.micro_batches(epoch, state.step_in_epoch)
        self.window = window = LogWindow(self.strategy.device, 1 + len(self.loss_weights))
        for step in range(state.step_in_epoch, self.steps_per_epoch):
            batches = [[data[i] for i in next(micro_batches)] for _ in range(self.plan.grad_accum)]
            result = self.train_step(batches, epoch, stage, passes)
            bar.update(1)
            self.log.heartbeat(bar, state.global_step, self.steps_per_epoch * recipe.optim.epochs,
                               f"epoch {epoch} stage {stage}")
            # Nothing to log when every step since the last line was skipped (the same on every rank).
            if window.n_losses and (state.global_step % recipe.logging.log_every_steps == 0
                                    or step + 1 == self.steps_per_epoch):
                self._log_train(window, epoch, stage, passes, bar)
            every = recipe.checkpoint.save_every_steps
            if every and state.global_step % every == 0 and step + 1 < self.steps_per_epoch:
                self.save()
            if result.stop:  # every rank got here with the same answer: save (unless just done) and stop together
                bar.close()
                just_saved = self.last_checkpoint is not None and self.last_checkpoint.name == \
                    f"step-{state.global_step:08d}"
                _, save_s = (None, 0.0) if just_saved else timed(self.save)
                raise Preempted(self.stop.name(), self.last_checkpoint, state, save_s)
        bar.close()

    def train_step(self, micro_batches: list[list[dict]], epoch: int, stage: int, passes: int) -> StepResult:
        """One optimizer step: forward and backward of each micro-batch (DeepSpeed applies the update at the last),
        the step counted in the loop state, then the non-finite guard (the step's one host sync); a step it lets
        through joins the log window."""
        state = self.state
        result = StepResult(losses=[])
        for features in micro_batches:
            loss, parts = self._micro_step(features, stage, passes)
            result.losses.append(loss)
            if parts is not None:
                result.parts.append(parts)
        state.step_in_epoch, state.global_step = state.step_in_epoch + 1, state.global_step + 1
        stop_flag = self.stop.flag(self.strategy.device)  # all-reduced on the device, read back by the guard
        result.applied, result.stop = self.guard.check(result.losses, state, epoch, self.steps_per_epoch, stop_flag)
        if dist.world_size() == 1:
            result.stop = self.stop.received is not None
        if result.applied:
            self.window.add(result)
        return result

    def _micro_step(self, features: list[dict], stage: int, passes: int):
        """Forward, backward and (at the accumulation boundary) the optimizer step of one micro-batch.
        Returns the detached loss and the detached [Coconut loss, *terms] when a method part ran."""
        batch = self.collate(features)
        part_inputs = None
        if self.step_collate is not None and self.recipe.coconut.step_supervision.applies_to(stage):
            part_inputs = {StepSupervision.name: self.step_collate(features)}  # the same on every rank
        if self.codi is not None:  # every stage: CODI has no curriculum
            part_inputs = {CODI_PART: self.codi.collate(features)}
            if self.step_collate is not None:
                part_inputs[StepSupervision.name] = self.step_collate(features)
        # From the features, not the batch: no tensor is read back (on a GPU each read stalls the stream).
        self.window.tokens += sum(len(f["input_ids"]) for f in features)
        columns = self.collate.latent_columns(features)  # the pass plan's input
        needed = self.model.count_passes(batch["input_ids"], columns)
        if needed > passes:
            raise RuntimeError(f"a batch at stage {stage} needs {needed} passes, more than the {passes} planned")
        device = self.strategy.device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if part_inputs is not None:
            part_inputs = {name: {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
                           for name, inputs in part_inputs.items()}
        out = self.strategy.forward(**batch, num_passes=passes, latent_columns=columns, part_inputs=part_inputs)
        loss = training_loss(out, self.loss_weights)
        self.strategy.backward(loss)
        self.strategy.step()
        return loss.detach(), logged_parts(out)

    def _log_train(self, window: LogWindow, epoch: int, stage: int, passes: int, bar) -> None:
        """One train record over the steps since the last one, averaged over ranks (a collective), then reset."""
        state = self.state
        elapsed = time.perf_counter() - window.start
        loss_total, tokens = dist.all_reduce_sum([float(window.loss_sum) / window.n_losses, window.tokens])
        if not math.isfinite(loss_total):  # a loss non-finite on one rank only (its gradients were finite)
            raise NonFiniteError(f"non-finite mean training loss {loss_total} over the steps logged at global "
                                 f"step {state.global_step} (epoch {epoch}): a rank's micro-batch loss was not "
                                 f"finite; nothing of it was checkpointed or exported")
        record = dict(global_step=state.global_step, epoch=epoch, stage=stage, loss=loss_total / dist.world_size(),
                      lr=self.strategy.lr(), grad_norm=self.strategy.grad_norm(), latent_passes=passes - 1,
                      tokens_per_s=tokens / max(elapsed, 1e-9), peak_mem_gb=peak_memory_gb())
        if window.n_parts:  # the same on every rank (the stage decides), so this reduction is collective
            means = dist.all_reduce_sum((window.part_sums / window.n_parts).tolist())
            names = ["coconut", *self.loss_weights]
            record.update({f"{name}_loss": value / dist.world_size() for name, value in zip(names, means)})
        self.log.log("train", **record)
        self.log.step_line(bar, record, self.steps_per_epoch * self.recipe.optim.epochs)
        window.reset()

    def evaluate(self, epoch: int, stage: int) -> dict:
        """Validation loss and (if the recipe asks) generation accuracy at `stage`, over every rank's shard."""
        recipe = self.recipe
        val_data = self._epoch_data(self.val_recs, stage, epoch)
        passes = self.planned_passes(stage)
        metrics = {"val_loss": validation_loss(self.strategy.engine, list(val_data), recipe.batch.eval_batch_size,
                                               self.collate, self.strategy.device, num_passes_fn=lambda ids: passes)}
        if recipe.eval.generation:
            examples = (self.codi.eval_examples if self.codi is not None
                        else build_eval_examples(self.val_recs, stage, self.cfg, self.tokens))
            result = generate_and_score(self.model, examples, self.tokenizer, recipe.batch.eval_batch_size,
                                        recipe.eval.max_new_tokens, self.strategy.device)
            rows = result.pop("rows")
            metrics.update(result)
            if dist.is_main():
                write_jsonl_atomic(self.out / "samples" / f"epoch{epoch:03d}.jsonl",
                                   rows[: recipe.logging.num_sample_outputs])
        self.log.log("eval", epoch=epoch, stage=stage, global_step=self.state.global_step, **metrics)
        self.log.print(f"epoch {epoch} stage {stage}: "
                       + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics

    # -- state on disk --------------------------------------------------------------------------------
    def save(self) -> Path:
        self.last_checkpoint = self.ckpts.save(self.strategy, self.state.state_dict(), self.side_files,
                                               log=self.log.print)
        return self.last_checkpoint

    def load(self, path: Path, universal: bool = False) -> None:
        loop_state = self.ckpts.load(self.strategy, path, universal=universal)
        known = set(self.state.state_dict()) | {"world_size"}
        refuse_unknown(path, "loop state", [f"key {k}" for k in sorted(set(loop_state) - known)])
        self.state.load_state_dict(loop_state)
        self.strategy.apply_optim_settings()  # a new optim.lr (checkpoint.allow_changes) takes effect at once
        self.last_checkpoint = path
        self.log.print(f"resumed from {path}{' (universal copy)' if universal else ''} (epoch {self.state.epoch}, "
                       f"step {self.state.step_in_epoch} of {self.steps_per_epoch}, "
                       f"global step {self.state.global_step})")

    def export(self, name: str, stage: int, metrics: dict) -> None:
        cfg = self.cfg
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.codi is not None:
            meta = codi_export_meta(self.recipe, self.tokens, metrics)
        else:
            meta = ExportMeta(c_thought=cfg.c_thought, tokens=self.tokens, stage=stage, mode=cfg.mode,
                              max_latent_stage=cfg.max_latent_stage, pad_latent_to_max=cfg.pad_latent_to_max,
                              no_thoughts_markers=cfg.no_thoughts_markers, metrics=metrics)
        step = self.recipe.coconut.step_supervision
        decoder = None
        if step.enabled and step.export_decoder:
            decoder = StepDecoderMeta(c_thought=1 if self.codi is not None else cfg.c_thought,  # codi: z_k alone
                                      weight=step.weight, prompt=step.prompt,
                                      shared=step.decoder == "shared")
        dtype = DTYPES[self.recipe.checkpoint.export_dtype or self.recipe.model.dtype]
        path = export_hf(self.strategy, self.tokenizer, self.out / "hf" / name, meta, lora=self.recipe.lora.enabled,
                         step_decoder=decoder, dtype=dtype)
        if path:
            self.log.print(f"exported HF model -> {path}")
