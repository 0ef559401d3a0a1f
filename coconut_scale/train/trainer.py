"""The Trainer: a recipe's whole curriculum, from data to checkpoints and HF exports.

    trainer = Trainer(recipe)
    trainer.setup()        # process group, data, tokenizer, engine; resumes from the newest checkpoint
    trainer.fit()          # for each epoch: train_epoch, evaluate, exports, save

Every rank runs the same code. The loop keeps the number of base-model calls constant within a stage (ZeRO-3's
collectives and its prefetch trace need that), reads nothing back from the device but the logged loss, and
writes a stage's HF export before the checkpoint that moves past it, so a kill can never lose an export.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import yaml

from coconut_scale import distributed as dist
from coconut_scale.atomic_files import write_jsonl_atomic
from coconut_scale.config.batch_plan import BatchMathError, BatchPlan, format_batch_table, resolve_batch
from coconut_scale.config.ds_config import build_ds_config, ds_config_path
from coconut_scale.config.model_shape import hidden_size
from coconut_scale.config.schedule import schedule_steps
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.data.curriculum import CurriculumConfig, build_eval_examples, build_stage_dataset, stage_for_epoch
from coconut_scale.data.sampler import GlobalBatchSampler
from coconut_scale.data.step_targets import StepTargetCollator
from coconut_scale.data.tokenized import load_tokenized
from coconut_scale.errors import UserError
from coconut_scale.evaluate.generation import generate_and_score, validation_loss
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.train.checkpoints import CheckpointManager
from coconut_scale.train.export import export_hf
from coconut_scale.train.nonfinite_guard import NonFiniteError, NonFiniteGuard
from coconut_scale.train.recipe_guard import CHANGES_FILE, change_history, check_resume
from coconut_scale.train.run_lock import RunLock, RunLockError
from coconut_scale.train.run_log import RunLog, peak_memory_gb
from coconut_scale.train.strategy import DeepSpeedStrategy, init_distributed, validate_ds_config


def _say(message: str) -> None:
    """A line on rank 0, for what happens before the RunLog exists."""
    if dist.is_main():
        print(message, flush=True)


class LogWindow:
    """What the loop accumulated since the last logged line, kept on the device: read back once per logged step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.n_losses = torch.zeros((), device=self.device), 0
        self.part_sums, self.n_parts = torch.zeros(2, device=self.device), 0  # coconut loss, step loss
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, losses: list[torch.Tensor], parts: list[torch.Tensor]) -> None:
        for loss in losses:
            self.loss_sum += loss
        for pair in parts:
            self.part_sums += pair
        self.n_losses += len(losses)
        self.n_parts += len(parts)


@dataclass
class TrainState:
    """Where the loop is; saved as loop_state.json in every checkpoint (world-size free)."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    best_accuracy: float = -1.0
    stage: int | None = None  # stage of the last epoch trained (the optimizer reset looks at it)
    skipped_steps: int = 0  # non-finite steps skipped so far (optim.skip_nonfinite_steps)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(self)}
        missing = known - set(state)
        if missing:
            raise UserError(f"loop state lacks {sorted(missing)}: not a checkpoint of this coconut_scale version")
        for name in known:
            setattr(self, name, state[name])


def recipe_tokenizer(recipe):
    """The recipe's tokenizer with the Coconut tokens (collective when it trains a BPE: rank 0 fits, all load)."""
    from coconut_scale.model.loading import load_tokenizer

    if recipe.checkpoint.init_from:
        return load_tokenizer(recipe.checkpoint.init_from)
    source = recipe.model.tokenizer or recipe.model.name_or_path
    if not source.startswith("train-bpe"):
        return load_tokenizer(source, recipe.model.gguf_file if not recipe.model.tokenizer else None)
    # `train-bpe:N`: a byte-level BPE of N tokens fit on the training file (small from-scratch models).
    from coconut_scale.data.bpe import bpe_corpus, train_bpe_tokenizer
    from coconut_scale.data.records import load_records

    target = Path(recipe.output_dir) / "tokenizer"
    if dist.is_main() and not (target / "tokenizer.json").exists():
        vocab = int(source.split(":")[1]) if ":" in source else 512
        train_bpe_tokenizer(bpe_corpus(load_records(recipe.data.train_file)), vocab).save_pretrained(str(target))
    dist.barrier()
    return load_tokenizer(str(target))


def prepare_data(recipe, log=print) -> None:
    """Generate the recipe's data set when it asks for one and a file is missing (rank 0), then sync."""
    from coconut_scale.data.generate import generate_missing

    data = recipe.data
    if data.generate and dist.is_main():
        generate_missing(data.generate, data.train_file, data.val_file, log=log)
    dist.barrier()


class Trainer:
    def __init__(self, recipe):
        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        self.cfg = CurriculumConfig.from_recipe(recipe.coconut)
        self.state = TrainState(epoch=recipe.checkpoint.resume_from_epoch)
        self.last_checkpoint: Path | None = None

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        recipe = self.recipe
        world = dist.env_world_size()
        # Everything that can be wrong with the recipe fails here, before any process group or model exists.
        self.plan = resolve_batch(recipe.batch, world, recipe.data.max_seq_len)
        self.hidden = hidden_size(recipe)
        validate_ds_config(build_ds_config(recipe, self.plan, self.hidden),
                           f"{ds_config_path(recipe)} (+ deepspeed.overrides)")

        init_distributed()
        self._take_output_dir()
        torch.manual_seed(recipe.seed)
        self.ckpts = CheckpointManager(self.out / "checkpoints", recipe.checkpoint.keep_last)
        latest = self.ckpts.resume_point(log=_say) if recipe.checkpoint.auto_resume else None
        # Before anything is written or loaded: another recipe stops the run here, naming every key it changes.
        self.recipe_changes = check_resume(recipe, latest) if latest is not None else {}
        self.log = RunLog(self.out, recipe.logging.wandb_project, recipe.logging.wandb_run_name, recipe.resolved_dict())
        self.log.print(f"coconut_scale: {recipe.name} | world size {world} | output {self.out}")
        self.log.print(format_batch_table([self.plan]))
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.resolved_dict(), sort_keys=False))
            for stale in (self.out / "hf").glob(".tmp-*"):  # an export a kill interrupted; it is redone
                shutil.rmtree(stale, ignore_errors=True)
        prepare_data(recipe, self.log.print)
        self.tokenizer = recipe_tokenizer(recipe)
        self.tokens = LatentTokens.from_tokenizer(self.tokenizer)
        self._tokenize()

        self.sampler = GlobalBatchSampler(len(self.train_recs), self.plan, dist.rank(), seed=recipe.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        n_schedule = schedule_steps(recipe, len(self.train_recs))  # refuses a data set with no full global batch
        ds_config = build_ds_config(recipe, self.plan, self.hidden)
        # A checkpoint from another GPU count loads only through its universal copy (coconut_scale.universal).
        universal = latest is not None and self.ckpts.needs_universal(latest, world)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
        self.strategy = DeepSpeedStrategy(recipe, ds_config, self.tokenizer,
                                          n_schedule, log=self.log.print)
        self.model = self.strategy.model
        self.guard = NonFiniteGuard(recipe, self.strategy, self.log)
        self.collate = LatentAlignedCollator(self.tokens.pad_id, self.tokens.latent_id)
        step = recipe.coconut.step_supervision
        # SIM-CoT's per-step decoder targets, built once from the records' step texts (data/step_targets.py).
        self.step_collate = (StepTargetCollator.from_records(self.train_recs, self.tokenizer, self.cfg, step.prompt)
                             if step.enabled else None)
        self.side_files = {"recipe.resolved.yaml": yaml.safe_dump(recipe.resolved_dict(), sort_keys=False),
                           "batch_table.txt": format_batch_table(self._resolvable_plans()) + "\n"}
        if latest is not None:
            self.load(latest, universal)
        history = change_history(latest, self.recipe_changes, self.state.global_step)
        if history:  # beside every later checkpoint: the run's recipe changes so far
            self.side_files[CHANGES_FILE] = json.dumps(history, indent=2) + "\n"
        if self.recipe_changes:
            self.log.log("recipe_change", global_step=self.state.global_step, checkpoint=str(latest),
                         changes=self.recipe_changes)
            self.log.print("recipe changed on resume (checkpoint.allow_changes): " + "; ".join(
                f"{k}: {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in self.recipe_changes.items()))
        return self

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

    def _tokenize(self) -> None:
        data, cfg = self.recipe.data, self.cfg
        cache_dir = data.cache_dir or str(self.out / "token_cache")
        # An empty set (everything dropped by max_seq_len) is refused, naming the file, counts and lengths.
        self.train_recs, dropped = load_tokenized(data.train_file, self.tokenizer, data.max_seq_len, cache_dir,
                                                  cfg.c_thought, cfg.max_latent_stage, role="train")
        self.val_recs, val_dropped = load_tokenized(data.val_file, self.tokenizer, data.max_seq_len, cache_dir,
                                                    cfg.c_thought, cfg.max_latent_stage, role="validation")
        self.log.print(f"data: {len(self.train_recs)} train records ({dropped} dropped > max_seq_len "
                       f"{data.max_seq_len}), {len(self.val_recs)} validation ({val_dropped} dropped)")
        if data.eval_max_examples:
            self.val_recs = self.val_recs[: data.eval_max_examples]

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

    # -- the loop -------------------------------------------------------------------------------------
    def planned_passes(self, stage: int) -> int:
        """Base-model calls per batch at `stage`, the same for every batch and rank. A uniform re-draw can give
        a row any stage up to max_latent_stage, so then every batch gets the most any stage needs."""
        return self.cfg.max_passes if self.cfg.uniform_prob > 0 else self.cfg.passes_for_stage(stage)

    def fit(self) -> TrainState:
        recipe, state = self.recipe, self.state
        self.strategy.train()
        for epoch in range(state.epoch, recipe.optim.epochs):
            stage = stage_for_epoch(epoch, self.cfg)
            if state.stage is not None and stage != state.stage and recipe.coconut.reset_optimizer \
                    and state.step_in_epoch == 0:
                self.strategy.reset_optimizer()
                self.log.print(f"stage {state.stage} -> {stage}: optimizer state and LR schedule reset")
            state.stage = stage
            self.train_epoch(epoch, stage)
            metrics = {"epoch": epoch, "stage": stage, "global_step": state.global_step}
            if (epoch + 1) % recipe.eval.every_epochs == 0 or epoch + 1 == recipe.optim.epochs:
                metrics.update(self.evaluate(epoch, stage))
            state.epoch, state.step_in_epoch = epoch + 1, 0
            accuracy = metrics.get("accuracy")
            is_best = accuracy is not None and accuracy > state.best_accuracy
            if is_best:
                state.best_accuracy = accuracy
            # Exports first: a kill before the checkpoint below re-runs this epoch's tail and exports again.
            if recipe.checkpoint.export_hf:
                if epoch + 1 == recipe.optim.epochs or stage_for_epoch(epoch + 1, self.cfg) != stage:
                    self.export(f"stage{stage}", stage, metrics)
                if is_best:
                    self.export("best", stage, metrics)
            self.save()
        self.log.print(f"done: best accuracy {state.best_accuracy:.4f}; outputs in {self.out}")
        self.log.close()
        self.lock.release()
        return state

    def train_epoch(self, epoch: int, stage: int) -> None:
        recipe, state = self.recipe, self.state
        data = build_stage_dataset(self.train_recs, stage, self.cfg, self.tokens, seed=recipe.seed * 1000 + epoch)
        passes = self.planned_passes(stage)
        bar = self.log.progress(self.steps_per_epoch, f"epoch {epoch} stage {stage}", initial=state.step_in_epoch)
        micro_batches = self.sampler.micro_batches(epoch, state.step_in_epoch)
        self.window = window = LogWindow(self.strategy.device)
        for step in range(state.step_in_epoch, self.steps_per_epoch):
            losses, parts = [], []
            for _ in range(self.plan.grad_accum):
                loss, part = self._micro_step([data[i] for i in next(micro_batches)], stage, passes)
                losses.append(loss)
                parts += [] if part is None else [part]
            state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
            if self.guard.check(losses, state, epoch, self.steps_per_epoch):  # the one host sync of a step
                window.add(losses, parts)
            bar.update(1)
            # Nothing to log when every step since the last line was skipped (the same on every rank).
            if window.n_losses and (state.global_step % recipe.logging.log_every_steps == 0
                                    or step + 1 == self.steps_per_epoch):
                self._log_train(window, epoch, stage, passes, bar)
            every = recipe.checkpoint.save_every_steps
            if every and state.global_step % every == 0 and step + 1 < self.steps_per_epoch:
                self.save()
        bar.close()

    def _log_train(self, window: "LogWindow", epoch: int, stage: int, passes: int, bar) -> None:
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
            coconut_loss, step_loss = dist.all_reduce_sum((window.part_sums / window.n_parts).tolist())
            record.update(coconut_loss=coconut_loss / dist.world_size(), step_loss=step_loss / dist.world_size())
        self.log.log("train", **record)
        self.log.step_line(bar, record, self.steps_per_epoch * self.recipe.optim.epochs)
        window.reset()

    def _micro_step(self, features: list[dict], stage: int, passes: int):
        """Forward, backward and (at the accumulation boundary) the optimizer step of one micro-batch.
        Returns the detached loss and, with step supervision, the detached (coconut loss, step loss) pair."""
        batch = self.collate(features)
        if self.step_collate is not None and self.recipe.coconut.step_supervision.applies_to(stage):
            batch.update(self.step_collate(features))  # the same on every rank: the stage decides
        # From the features, not the batch: no tensor is read back (on a GPU each read stalls the stream).
        self.window.tokens += sum(len(f["input_ids"]) for f in features)
        columns = self.collate.latent_columns(features)  # the pass plan's input
        needed = self.model.count_passes(batch["input_ids"], columns)
        if needed > passes:
            raise RuntimeError(f"a batch at stage {stage} needs {needed} passes, more than the {passes} planned")
        batch = {k: v.to(self.strategy.device, non_blocking=True) for k, v in batch.items()}
        out = self.strategy.forward(**batch, num_passes=passes, latent_columns=columns)
        self.strategy.backward(out.loss)
        self.strategy.step()
        parts = None
        if getattr(out, "step_loss", None) is not None:  # logged apart: coconut loss and step loss
            parts = torch.stack([out.coconut_loss.detach(), out.step_loss.detach()])
        return out.loss.detach(), parts

    def evaluate(self, epoch: int, stage: int) -> dict:
        """Validation loss and (if the recipe asks) generation accuracy at `stage`, over every rank's shard."""
        recipe = self.recipe
        val_data = build_stage_dataset(self.val_recs, stage, self.cfg, self.tokens, seed=recipe.seed * 1000 + epoch)
        passes = self.planned_passes(stage)
        metrics = {"val_loss": validation_loss(self.strategy.engine, list(val_data), recipe.batch.eval_batch_size,
                                               self.collate, self.strategy.device, num_passes_fn=lambda ids: passes)}
        if recipe.eval.generation:
            examples = build_eval_examples(self.val_recs, stage, self.cfg, self.tokens)
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
        self.last_checkpoint = self.ckpts.save(self.strategy, self.state.state_dict(), self.side_files)
        return self.last_checkpoint

    def load(self, path: Path, universal: bool = False) -> None:
        self.state.load_state_dict(self.ckpts.load(self.strategy, path, universal=universal))
        self.strategy.apply_recipe_optim()  # a new optim.lr (checkpoint.allow_changes) takes effect at once
        self.last_checkpoint = path
        self.log.print(f"resumed from {path}{' (universal copy)' if universal else ''} (epoch {self.state.epoch}, "
                       f"step {self.state.step_in_epoch} of {self.steps_per_epoch}, "
                       f"global step {self.state.global_step})")

    def export(self, name: str, stage: int, metrics: dict) -> None:
        cfg = self.cfg
        meta = ExportMeta(c_thought=cfg.c_thought, tokens=self.tokens, stage=stage, mode=cfg.mode,
                          max_latent_stage=cfg.max_latent_stage, pad_latent_to_max=cfg.pad_latent_to_max,
                          no_thoughts_markers=cfg.no_thoughts_markers,
                          metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        to_base = None
        if self.strategy.lora:
            from coconut_scale.model.lora import merged_base_for_export

            to_base = merged_base_for_export(self.model)
        step = self.recipe.coconut.step_supervision
        path = export_hf(self.strategy, self.tokenizer, self.out / "hf" / name, meta, to_base=to_base,
                         export_step_decoder=step.enabled and step.export_decoder, step_prompt=step.prompt)
        if path:
            self.log.print(f"exported HF model -> {path}")
