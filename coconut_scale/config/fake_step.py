"""One training step and one evaluation batch of a recipe's exact model, executed on fake tensors, measured.

At one decoder-layer count (config/fake_model.py builds the model and the batches):

    train        one micro step (forward + backward) with the optimizer states already alive, as in every step
                 after the first: the peak by category and the FLOPs of forward and backward (FlopCounterMode)
    optimizer    the optimizer step that follows: AdamW with its states in the dtype DeepSpeed keeps them (fp32
                 master weights and both moments for 16-bit training, the moments alone in fp32; the fp32 copy of
                 the gradients is made during the step), fused as on a GPU
    validation   one validation-loss batch (batch.eval_batch_size training rows, forward only), states alive
    generation   one batch of greedy decoding with the KV cache (no gradients), optimizer states alive

Memory is MemTracker's (torch.distributed._tools.mem_tracker): every tensor's storage, by category (parameters,
buffers, gradients, activations, temporaries: what backward creates, optimizer states). It counts tensor bytes,
exactly; what a GPU adds on top (allocator rounding and fragmentation, the CUDA context, NCCL and DeepSpeed
buffers) it cannot see. Everything is one process: ZeRO's sharding across GPUs is applied to these figures
afterwards (config/measured_memory.py).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.distributed._tools import mem_tracker
from torch.utils.flop_counter import FlopCounterMode

from coconut_scale.config.fake_model import (fake_spec, fake_training_model, generation_batch, shape_tokenizer,
                                             training_batch)
from coconut_scale.config.model_spec import loss_weights
from coconut_scale.model.spec import build_training_model

CATEGORIES = ("params", "buffers", "gradients", "gradient_sums", "optimizer", "activations", "temporaries")


class _GradientSum(mem_tracker._RefType):
    """A weight's gradient while backward is still summing it: a parameter used in several latent passes gets one
    contribution per pass, which the autograd engine adds up before the parameter's gradient hooks run. Until then
    it is not a `.grad` (DeepSpeed reduces and shards a gradient only from that hook on)."""

    GRADIENT_SUM = "Gradient sum"


_KIND = {"params": mem_tracker._MemRefType.PARAM, "buffers": mem_tracker._MemRefType.BUFFER,
         "gradients": mem_tracker._MemRefType.GRAD, "gradient_sums": _GradientSum.GRADIENT_SUM,
         "optimizer": mem_tracker._MemRefType.OPT, "activations": mem_tracker._MemRefType.ACT,
         "temporaries": mem_tracker._MemRefType.TEMP}


class PeakTracker(mem_tracker.MemTracker):
    """MemTracker's accounting of every storage by category, with only the whole-process peak. Its per-module
    statistics (a snapshot copied at every module call, and a walk over every module seen at every op: five times
    the run time of a small model here) are not kept; they also refuse a module called again outside a parent
    module, as every decoding step calls the model. Kept from its module hooks: the first call of a module
    registers its parameters (so their gradients count as gradients), and a module re-run during backward
    (checkpointing's recompute) creates activations, not temporaries."""

    def __init__(self):
        super().__init__()
        self._registered = weakref.WeakSet()
        self._ref_class = tuple(_KIND.values())  # the categories of a snapshot, the gradient sums among them

    def watch_gradient_sums(self, loss: torch.Tensor) -> None:
        """Before `loss.backward()`: every gradient that backward sends towards a trainable parameter is counted as
        a gradient sum (not a temporary) from the moment it exists until it becomes the parameter's `.grad`."""
        seen, todo = set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            edges = [i for i, (nxt, _) in enumerate(node.next_functions)
                     if nxt is not None and getattr(getattr(nxt, "variable", None), "requires_grad", False)]
            if edges:
                node.register_hook(functools.partial(self._mark_gradient_sums, edges))
            todo.extend(nxt for nxt, _ in node.next_functions)

    def _mark_gradient_sums(self, edges, grad_inputs, grad_outputs) -> None:
        for i in edges:
            if grad_inputs[i] is not None:
                self._update_and_maybe_create_winfos(grad_inputs[i], _GradientSum.GRADIENT_SUM)

    def _pre_fw_hook(self, module, inputs) -> None:
        if self._mod_tracker.is_bw:
            if self._ac_mod is None:
                self._ac_mod, self._in_ac = weakref.ref(module), True
        elif module not in self._registered:
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
            self._registered.add(module)

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod, self._in_ac = None, False

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    def _update_peak_stats(self, peak_state) -> None:
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap[mem_tracker._TOTAL_KEY]:
                self._peak_mem[device] = snap[mem_tracker._TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snap)

    def skip_frozen_parameters(self, model: torch.nn.Module) -> None:
        """MemTracker hooks the gradient of every parameter a module uses, which torch refuses for a frozen one
        (LoRA's base): mark those as hooked already."""
        for p in model.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())

    def peak(self, which: str = "peak") -> dict[str, int]:
        """Bytes by category (CATEGORIES) at the peak since entry or the last `restart_peak` ("current": now)."""
        snaps = self.get_tracker_snapshot(which).values()
        return {name: sum(int(s.get(kind, 0)) for s in snaps) for name, kind in _KIND.items()}

    def restart_peak(self) -> None:
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {d: s[mem_tracker._TOTAL_KEY] for d, s in self._peak_mem_snap.items()}


class _NoHook:
    def remove(self) -> None:
        pass


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 copies of 16-bit parameters, as DeepSpeed's bf16/fp16 optimizers (ZeRO 0-3) keep them: each
    step copies the gradients to fp32, updates the masters and writes them back; fp32 parameters are updated
    directly (no master). The masters sit in `state` (under the model parameter), so MemTracker counts them as
    optimizer state."""

    def __init__(self, params, **kwargs):
        self.model_params = [p for p in params if p.requires_grad]
        masters = [p.detach().float() if p.dtype != torch.float32 else p for p in self.model_params]
        super().__init__(masters, **kwargs)
        for p, m in zip(self.model_params, masters):
            if m is not p:
                self.state[p]["master"] = m

    def _pairs(self):
        return [(p, self.state[p].get("master", p)) for p in self.model_params]

    @torch.no_grad()
    def step(self, closure=None):
        for p, master in self._pairs():
            if master is not p:
                master.grad = None if p.grad is None else p.grad.float()
        loss = super().step(closure)
        for p, master in self._pairs():
            if master is not p:
                p.copy_(master)
                master.grad = None
        return loss

    def prime(self) -> None:
        """Create every state tensor with a zero step, as the first real step would."""
        for p, master in self._pairs():
            master.grad = torch.zeros_like(master)
        super().step()
        for _, master in self._pairs():
            master.grad = None


@dataclass
class Phase:
    """Bytes by category at a phase's peak."""

    params: int
    buffers: int
    gradients: int  # parameters' .grad
    gradient_sums: int  # gradients backward is still summing over the passes (see _GradientSum)
    optimizer: int
    activations: int
    temporaries: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass
class StepMeasure:
    layers: int
    micro_batch: int
    tokens: int  # micro batch x max_seq_len
    passes: int
    train: Phase
    optimizer: Phase
    after_backward: Phase  # what is left once backward is done: every gradient
    after_step: Phase  # and once the optimizer has stepped: its states, no gradient


@dataclass
class StepFlops:
    layers: int
    micro_batch: int
    forward: int
    backward: int  # with the checkpointing recompute
    recompute: int  # the checkpointed layers' forward, run again in backward
    modules: int  # of the wrapper, every nested one (ZeRO-3 hooks each)
    base_modules: int  # of those, the base model's (run in every latent pass)
    trainable_params: int
    params: int  # counted once when tied
    largest_module_params: int  # the most parameters one module holds itself (DeepSpeed's "largest layer")

    @property
    def model_flops(self) -> int:
        """What MFU counts: forward and backward, not the recompute."""
        return self.forward + self.backward - self.recompute


@dataclass
class GenerationMeasure:
    layers: int
    batch: int
    new_tokens: int
    peak: Phase


def _fake(mode, value):
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value) if hasattr(mode, "from_tensor") else value
    if isinstance(value, dict):
        return {k: _fake(mode, v) for k, v in value.items()}
    return value


def _optimizer(recipe, model) -> MasterWeightAdamW:
    o = recipe.optim
    return MasterWeightAdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, fused=True)


class RecipeRun:
    """A recipe's model at `layers` decoder layers with its optimizer states, on fake tensors (or, `fake=False`,
    real CPU tensors of a model small enough to hold); measures steps at any micro batch and one generation
    batch. `zero3`: the code paths the model takes when ZeRO-3 has partitioned it."""

    def __init__(self, recipe, layers: int | None = None, fake: bool = True, zero3: bool = False):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.recipe = recipe
        if fake:
            self.mode = FakeTensorMode()
            self.model = fake_training_model(recipe, self.mode, layers)
        else:
            self.mode = contextlib.nullcontext()
            self.model = build_training_model(fake_spec(recipe, layers), shape_tokenizer(recipe))
        if zero3:
            # ZeRO-3 partitions every parameter and tags it; the chunked loss reads the tag to call the lm_head as a
            # module (so that ZeRO-3 gathers it) instead of its fused sweep (model/chunked_loss.py), and so must this.
            for i, p in enumerate(self.model.parameters()):
                p.ds_id = i
        self.layers = self.model.num_layers
        self.weights = loss_weights(recipe)
        with self.mode:
            self.optimizer = _optimizer(recipe, self.model)
            self.optimizer.prime()

    def _tracker(self) -> PeakTracker:
        tracker = PeakTracker()
        tracker.skip_frozen_parameters(self.model)
        tracker.track_external(self.model, self.optimizer)
        return tracker

    def _phase(self, tracker: PeakTracker) -> Phase:
        return Phase(**tracker.peak())

    def _inputs(self, micro_batch: int):
        inputs = training_batch(self.recipe, micro_batch)
        return inputs, _fake(self.mode, inputs["batch"]), _fake(self.mode, inputs["part_inputs"])

    def _loss(self, inputs, batch, parts):
        out = self.model(**batch, num_passes=inputs["num_passes"], latent_columns=inputs["latent_columns"],
                         part_inputs=parts)
        return out.loss + sum(self.weights[n] * t for n, t in (out.terms or {}).items())  # as train/losses.py

    def step(self, micro_batch: int) -> StepMeasure:
        """Memory of one micro step and the optimizer step after it (no FLOP counting here: FlopCounterMode's
        module hooks keep tensors alive and would inflate the peak)."""
        inputs, batch, parts = self._inputs(micro_batch)
        self.model.train()
        with self.mode:
            tracker = self._tracker()
            with tracker:
                loss = self._loss(inputs, batch, parts)
                tracker.watch_gradient_sums(loss)
                loss.backward()
                del loss
                train, after_backward = self._phase(tracker), Phase(**tracker.peak("current"))
                tracker.restart_peak()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                optimizer, after_step = self._phase(tracker), Phase(**tracker.peak("current"))
        return StepMeasure(layers=self.layers, micro_batch=micro_batch,
                           tokens=micro_batch * self.recipe.data.max_seq_len, passes=inputs["num_passes"], train=train,
                           optimizer=optimizer, after_backward=after_backward, after_step=after_step)

    def flops(self, micro_batch: int = 1) -> StepFlops:
        """FLOPs of one micro step (every op scales with the batch: count at micro 1 and multiply)."""
        inputs, batch, parts = self._inputs(micro_batch)
        self.model.train()
        with self.mode:
            with FlopCounterMode(display=False) as forward:
                loss = self._loss(inputs, batch, parts)
            with FlopCounterMode(display=False) as backward:
                loss.backward()
            self.model.zero_grad(set_to_none=True)
        names = {id(m): f"{type(self.model).__name__}.{n}" for n, m in self.model.named_modules()}
        counts = forward.get_flop_counts()
        recompute = sum(sum(counts.get(names[id(m)], {}).values()) for m in self.model.modules()
                        if getattr(m, "_coconut_checkpointed", False))
        params = {id(p): p.numel() for p in self.model.parameters()}
        return StepFlops(layers=self.layers, micro_batch=micro_batch, forward=forward.get_total_flops(),
                         backward=backward.get_total_flops(), recompute=recompute,
                         modules=sum(1 for _ in self.model.modules()),
                         base_modules=sum(1 for _ in self.model.base_causallm.modules()),
                         trainable_params=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                         params=sum(params.values()),
                         largest_module_params=max(sum(p.numel() for p in m.parameters(recurse=False))
                                                   for m in self.model.modules()))

    def validation(self) -> Phase:
        """Memory of one validation-loss batch: batch.eval_batch_size training rows, forward only, no gradients (as
        evaluate/generation.py's validation_loss), with the optimizer states alive."""
        inputs, batch, parts = self._inputs(self.recipe.batch.eval_batch_size)
        self.model.eval()
        with self.mode, torch.no_grad():
            tracker = self._tracker()
            with tracker:
                self.model(**batch, num_passes=inputs["num_passes"], latent_columns=inputs["latent_columns"])
            peak = self._phase(tracker)
        self.model.train()
        return peak

    def generation(self) -> GenerationMeasure:
        inputs = generation_batch(self.recipe)
        model = self.model
        model.eval()
        with self.mode:
            ids, mask, pos = (_fake(self.mode, inputs[k]) for k in ("input_ids", "attention_mask", "position_ids"))
            tracker = self._tracker()
            with tracker:
                model.generate(ids, mask, max_new_tokens=inputs["max_new_tokens"], position_ids=pos,
                               num_passes=inputs["num_passes"], latent_columns=inputs["latent_columns"],
                               stop_at_eos=False)
            peak = self._phase(tracker)
        model.train()
        return GenerationMeasure(layers=self.layers, batch=ids.shape[0], new_tokens=inputs["max_new_tokens"],
                                 peak=peak)
