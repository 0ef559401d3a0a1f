"""The one door to DeepSpeed: process group, engine, optimizer and LR schedule, checkpoints, 16-bit gathers.

No other module imports deepspeed, and nothing here reads a recipe: OpenRLHF's `prepare` shape,

    strategy = DeepSpeedStrategy(ds_config)                  # ZeRO-3: HfDeepSpeedConfig alive from here on
    model = build_training_model(spec, tokenizer, strategy.gather)   # model/spec.py, partitioned as it loads
    strategy.prepare(model, recipe.optim, schedule_steps)    # AdamW, the LR schedule, deepspeed.initialize

Order matters under ZeRO-3: an `HfDeepSpeedConfig` must be alive *before* `from_pretrained`/`from_config`, so each
rank materialises only its partition; the new token rows are written inside `GatheredParameters(modifier_rank=0)`;
the *wrapper* (not the HF model) is the engine's module, so ZeRO-3 sees one forward per step and its prefetch trace
stays valid across the latent passes.

The optimizer is AdamW (a client optimizer, fused on CUDA; DeepSpeed's CPUAdam when the config offloads it) and
the LR schedule is transformers' `get_scheduler` with the recipe's name, handed to DeepSpeed so that its
checkpoints carry the schedule. The stage-boundary reset (the paper's setting) clears Adam's moments and
rewinds the schedule to its first step.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ContextManager

import torch

from coconut_scale import distributed as dist
from coconut_scale.config.ds_config import DeepSpeedConfigError


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the process group the launcher set up (deepspeed, torchrun), or make a world of one; every collective
    fails after `timeout_s` seconds instead of waiting for a dead or hung rank (coconut_scale/distributed.py)."""
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        return
    if "RANK" not in os.environ:
        # Plain `python -m`: DeepSpeed still wants a process group.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
    import deepspeed

    if not torch.cuda.is_available():
        # The shared-memory comm op is JIT-compiled on first use (about a minute, needs g++): gloo suffices on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=dist.timeout(timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank())


def validate_ds_config(cfg: dict, source: str) -> None:
    """Run a filled config through DeepSpeed's own config parser (its pydantic models), without a GPU or a
    process group, so that an unknown key or a bad value fails before any model loads, naming `source` and the
    key. train_batch_size is left for DeepSpeed to derive: the parser sees a world of one, and build_ds_config
    already checked the batch arithmetic for the real world size."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    trial = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(trial)
    except ValidationError as e:
        problems = []
        for error in e.errors(include_url=False):
            loc = [str(part) for part in error["loc"]]
            # The models validate one section each; find the section that holds the offending key.
            section = [k for k, v in cfg.items() if isinstance(v, dict) and loc and loc[0] in v]
            key = ".".join(section[:1] + loc) if len(section) <= 1 else ".".join(loc)
            problems.append(f"{key} = {error['input']!r}: {error['msg']}")
        raise DeepSpeedConfigError(f"DeepSpeed refuses the config {source}: " + "; ".join(problems)) from None
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise DeepSpeedConfigError(f"DeepSpeed refuses the config {source}: {type(e).__name__}: {e}") from None


def deepspeed_model_state_estimate(total_params: float, largest_layer_params: int, world_size: int,
                                   stage: int) -> float | None:
    """DeepSpeed's own estimate of the model states per GPU in bytes, without offload: the functions behind its
    `estimate_zero3_model_states_mem_needs_all_live` / `estimate_zero2_model_states_mem_needs_all_live` (which count
    a live model's parameters through data_ptr(), none on fake tensors, hence the counts here). They assume every
    parameter trains in 16 bits with fp32 master weights and Adam (ZeRO-3: 18 bytes per parameter / GPUs + the
    largest layer in fp32; ZeRO-1/2: 2 bytes + 18 / GPUs). ZeRO-0 is the ZeRO-2 formula on one GPU (nothing
    sharded)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = int(total_params)
    if stage == 3:
        return float(estimate_zero3_model_states_mem_needs(total, int(largest_layer_params), num_gpus_per_node=world_size,
                                                           cpu_offload=False, cpu_offload_params=False)[1])
    gpus = world_size if stage in (1, 2) else 1
    return float(estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)[1])


def _new_schedule(optim, optimizer, schedule_steps: int):
    from transformers import get_scheduler

    return get_scheduler(optim.scheduler, optimizer, num_warmup_steps=optim.warmup_steps,
                         num_training_steps=max(int(schedule_steps), 1))


class DeepSpeedStrategy:
    """A DeepSpeed engine around a model, from a filled DeepSpeed config; `prepare` builds the engine."""

    def __init__(self, ds_config: dict):
        self.ds_config = copy.deepcopy(ds_config)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.hf_ds_config = None  # kept alive: transformers consults it while ZeRO-3 is active
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self.hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        self.engine = self.model = self.schedule = self.optim = None
        self._fresh_schedule: dict | None = None

    def gather(self, params) -> ContextManager:
        """A context in which `params` are whole and writes by rank 0 persist (ZeRO-3); a no-op otherwise."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def prepare(self, model: torch.nn.Module, optim, schedule_steps: int):
        """The engine over `model`: AdamW on its trainable parameters and the LR schedule of `optim` (the recipe's
        optim section: lr, betas, eps, weight_decay, scheduler, warmup_steps) over `schedule_steps` steps."""
        import deepspeed

        ds_config = copy.deepcopy(self.ds_config)
        params = self.trainable_parameters(model)
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        optimizer = None
        if offload in (None, "none"):  # an offloaded optimizer must be DeepSpeed's own (CPUAdam)
            ds_config.pop("optimizer", None)
            ds_config["zero_allow_untested_optimizer"] = True
            optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                          weight_decay=optim.weight_decay, fused=torch.cuda.is_available() or None)
        self.optim = optim
        self.engine, _, _, self.schedule = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: _new_schedule(optim, opt, schedule_steps),
        )
        self.model = model
        self._fresh_schedule = copy.deepcopy(self.schedule.state_dict())
        return self.engine

    @staticmethod
    def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    @staticmethod
    def numel(p: torch.nn.Parameter) -> int:
        """A parameter's size, also when ZeRO-3 left a (0,) placeholder in its place."""
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    # -- one optimizer step ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.engine.device

    def forward(self, **batch):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """Called after every micro-batch: DeepSpeed steps the optimizer at the accumulation boundary."""
        self.engine.step()

    def step_outcome(self) -> tuple[bool, torch.Tensor | float | None]:
        """After an optimizer step: whether DeepSpeed applied it, and the global gradient norm it computed (a device
        tensor under ZeRO, not read here so the caller syncs once). ZeRO stages 1-3 skip a step whose gradient norm
        is not finite by themselves (zeroed gradients, no optimizer or schedule step): `applied` is then False."""
        return bool(self.engine.was_step_applied()), self.engine.get_global_grad_norm()

    @property
    def skips_nonfinite_steps(self) -> bool:
        """Whether the engine refuses a non-finite step itself (ZeRO 1-3) rather than applying it."""
        return self.zero_stage > 0

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    # -- optimizer and schedule -----------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        opt = self.engine.optimizer
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # ZeRO wraps the torch optimizer; its param_groups hold the live LR
        return opt

    def reset_optimizer(self) -> None:
        """Fresh Adam moments and the LR schedule back at its first step (the paper resets at each stage)."""
        opt = self._optimizer()
        opt.state.clear()
        self.schedule.load_state_dict(copy.deepcopy(self._fresh_schedule))
        for group, lr in zip(opt.param_groups, self._fresh_schedule["_last_lr"]):
            group["lr"] = lr

    def apply_optim_settings(self) -> None:
        """After a load: the optimizer settings `prepare` was given replace the checkpoint's, the schedule keeping its
        position. They are equal unless checkpoint.allow_changes let optim.* differ; without this a new optim.lr
        would be ignored (the loaded schedule's base_lrs and the groups' initial_lr keep the old one). Same arithmetic
        as the schedule's own step (base lr x factor), so an unchanged recipe resumes bit for bit."""
        o = self.optim
        opt, schedule = self._optimizer(), self.schedule
        schedule.base_lrs = [o.lr] * len(opt.param_groups)
        for group, factor in zip(opt.param_groups, schedule.lr_lambdas):
            group.update(initial_lr=o.lr, lr=o.lr * factor(schedule.last_epoch), betas=tuple(o.betas), eps=o.eps,
                         weight_decay=o.weight_decay)
        schedule._last_lr = [group["lr"] for group in opt.param_groups]

    def lr(self) -> float:
        return float(self._optimizer().param_groups[0]["lr"])

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, tag: str) -> list[tuple[str, BaseException]]:
        """Collective: every rank writes its shards under directory/tag. Returns the (file, error) of each shard
        write that failed on this rank: DeepSpeed's save runs collectives between its writes, so a rank whose write
        fails must go on through them (the caller then stops every rank together) instead of raising alone and
        leaving the others waiting."""
        failures: list[tuple[str, BaseException]] = []

        def noting(write, where):
            def guarded(*args, **kwargs):
                try:
                    write(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - a full disk reaches us as torch.save's RuntimeError
                    failures.append((where(*args, **kwargs), e))
            return guarded

        # Its writes: each shard (checkpoint_engine.save) and the recovery script rank 0 copies beside them.
        writer, engine = self.engine.checkpoint_engine, self.engine
        writer.save = noting(writer.save, lambda state_dict=None, path=None: str(path))
        engine._copy_recovery_script = noting(engine._copy_recovery_script, lambda save_path: str(save_path))
        try:
            engine.save_checkpoint(str(directory), tag=tag, save_latest=False)
        finally:
            del writer.save, engine._copy_recovery_script  # the classes' own methods again
        return failures

    def load_checkpoint(self, directory: Path, tag: str) -> None:
        """Weights, optimizer and schedule; a universal tag needs the engine built with load_universal."""
        path, _ = self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {Path(directory) / tag}")

    def consolidated_state_dict(self) -> dict | None:
        """Full weights on rank 0 (None elsewhere); collective under ZeRO-3."""
        if self.engine.zero_optimization_partition_weights():
            state = self.engine._zero3_consolidated_16bit_state_dict()
            return state if dist.is_main() else None
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()} if dist.is_main() else None


def convert_to_universal(ds_dir: Path, out_dir: Path, workers: int = 2) -> None:
    """DeepSpeed's `ds_to_universal`: ZeRO shards -> one file per parameter, loadable at any world size.

    A subprocess: the converter forks its own worker pools and must not inherit a process group of ours.
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ds_dir),
           "--output_folder", str(out_dir), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal failed on {ds_dir} (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")

