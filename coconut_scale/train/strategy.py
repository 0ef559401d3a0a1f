"""The one door to DeepSpeed: process group, engine, optimizer and LR schedule, checkpoints, 16-bit gathers.

No other module imports deepspeed. The model wing takes a `gather` context for the new token rows and plain
dtypes; the trainer, checkpoints and exports call the methods here.

Order matters under ZeRO-3 (shared FACTS): an `HfDeepSpeedConfig` must be alive *before*
`from_pretrained`/`from_config`, so each rank materialises only its partition; the new token rows are
written inside `GatheredParameters(modifier_rank=0)`; the *wrapper* (not the HF model) is the engine's module,
so ZeRO-3 sees one forward per step and its prefetch trace stays valid across the latent passes.

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

import torch

from coconut_scale import distributed as dist
from coconut_scale.config.ds_config import DeepSpeedConfigError
from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
from coconut_scale.model.loading import DTYPES, build_coconut, load_causal_lm


def init_distributed() -> None:
    """Join the process group the launcher set up (deepspeed, torchrun), or make a world of one."""
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
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
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


def _zero3_gather(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _numel(p: torch.nn.Parameter) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 leaves a (0,) placeholder behind


def _new_schedule(recipe, optimizer, schedule_steps: int):
    from transformers import get_scheduler

    return get_scheduler(recipe.optim.scheduler, optimizer, num_warmup_steps=recipe.optim.warmup_steps,
                         num_training_steps=max(int(schedule_steps), 1))


class DeepSpeedStrategy:
    """A DeepSpeed engine around a Coconut wrapper, built from a recipe and a filled DeepSpeed config."""

    def __init__(self, recipe, ds_config: dict, tokenizer, schedule_steps: int, log=print):
        import deepspeed

        ds_config = copy.deepcopy(ds_config)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.hf_ds_config = None  # kept alive: transformers consults it while ZeRO-3 is active
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self.hf_ds_config = HfDeepSpeedConfig(ds_config)

        source = recipe.checkpoint.init_from or recipe.model.name_or_path
        base = load_causal_lm(
            source,
            dtype=recipe.model.dtype,
            attn_implementation=recipe.model.attn_implementation,
            gguf_file=None if recipe.checkpoint.init_from else recipe.model.gguf_file,
            from_config=None if recipe.checkpoint.init_from else recipe.model.from_config,
            vocab_size=len(tokenizer),
            seed=recipe.seed,
        )
        gather = _zero3_gather if self.zero_stage == 3 else (lambda params: contextlib.nullcontext())
        model = build_coconut(base, tokenizer, init_text=recipe.model.init_text, gather=gather)
        model.feedback = recipe.coconut.mode == "coconut"
        if recipe.model.gradient_checkpointing:
            enable_latent_safe_checkpointing(base)
        step = recipe.coconut.step_supervision
        if step.enabled:  # SIM-CoT's decoder: a submodule of the wrapper, so ZeRO-3 partitions it with the base
            from coconut_scale.model.step_supervision import add_step_decoder, load_step_decoder

            add_step_decoder(model, load_step_decoder(recipe, len(tokenizer)), recipe.coconut.c_thought, step.weight)
        self.lora = bool(recipe.lora.enabled)
        if self.lora:
            from coconut_scale.model.lora import apply_lora

            apply_lora(model, recipe.lora, tokenizer, dtype=DTYPES[recipe.model.dtype])
            if getattr(model, "step_decoder", None) is not None:
                from coconut_scale.model.step_supervision import apply_decoder_lora

                model.step_decoder = apply_decoder_lora(model.step_decoder, recipe.lora)

        params = [p for p in model.parameters() if p.requires_grad]
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        optimizer = None
        if offload in (None, "none"):  # an offloaded optimizer must be DeepSpeed's own (CPUAdam)
            ds_config.pop("optimizer", None)
            ds_config["zero_allow_untested_optimizer"] = True
            o = recipe.optim
            optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay, fused=torch.cuda.is_available() or None)
        self.recipe, self.schedule_steps = recipe, schedule_steps
        self.engine, _, _, self.schedule = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: _new_schedule(recipe, opt, schedule_steps),
        )
        self.model = model
        self._fresh_schedule = copy.deepcopy(self.schedule.state_dict())
        n_total = sum(_numel(p) for p in model.parameters())
        n_train = sum(_numel(p) for p in params)
        log(f"model: {n_total / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable; ZeRO stage {self.zero_stage}; "
            f"checkpointing {'on' if recipe.model.gradient_checkpointing else 'off'}; "
            f"attention {base.config._attn_implementation}")

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

    def apply_recipe_optim(self) -> None:
        """After a load: the recipe's optimizer settings replace the checkpoint's, the schedule keeping its position.
        They are equal unless checkpoint.allow_changes let optim.* differ; without this a new optim.lr would be
        ignored (the loaded schedule's base_lrs and the groups' initial_lr keep the old one). Same arithmetic as
        the schedule's own step (base lr x factor), so an unchanged recipe resumes bit for bit."""
        o = self.recipe.optim
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
    def save_checkpoint(self, directory: Path, tag: str) -> None:
        """Collective: every rank writes its shards under directory/tag."""
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False)

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


def build_engine(recipe, ds_config: dict, tokenizer, schedule_steps: int, log=print) -> DeepSpeedStrategy:
    """The strategy for a recipe; `.engine` is the DeepSpeedEngine, `.model` the Coconut wrapper."""
    return DeepSpeedStrategy(recipe, ds_config, tokenizer, schedule_steps, log=log)


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

