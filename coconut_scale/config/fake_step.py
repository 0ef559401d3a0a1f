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
buffers, gradients, activations, temporaries: what backward creates, optimizer states), plus gradient sums (a
weight's gradient while backward still adds up its contributions from the latent passes: PeakTracker), at the
whole step's peak and at the peak of every region of the step (PeakTracker.region). It counts tensor bytes,
exactly; what a GPU adds on top (allocator rounding and fragmentation, the CUDA context, NCCL and DeepSpeed
buffers) it cannot see. Two things are kept as a GPU runs them, not as the instrument or the CPU would: the module
tracker's backward hooks hold no gradients (_fw_pre_hook_first_gradient), and attention dropout keeps no
probabilities (fused_attention_memory). Everything is one process: ZeRO's sharding across GPUs is applied to these
figures afterwards (config/measured_memory.py).
"""

from __future__ import annotations

import contextlib
import functools
import re
import weakref
from dataclasses import asdict, dataclass, field

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


_LAYER = re.compile(r"\.(?:layers|h|layer)\.(\d+)(?=\.|$)")


@functools.cache  # called for every name the tracker holds at every tracked operation (~640k in a small fit)
def _nesting(name: str) -> tuple:
    """Sort key of the innermost module the tracker holds: the deepest name, then the lowest layer, then the name.
    In backward the tracker also lists other layers' modules, most often layers above the one running (whose
    gradients are done); taking the highest instead put llama8b_gsm's activation side 10% off its full-depth
    measurement. Never the set's order, which follows the process's string hash seed: one seed in eight moved the
    layer fit's check by 2.7%."""
    m = _LAYER.search(name)
    return name.count("."), -int(m.group(1)) if m else 0, name


class PeakTracker(mem_tracker.MemTracker):
    """MemTracker's accounting of every storage by category, with the whole-process peak and the peak of every
    *region* of the step (below). Its per-module
    statistics (a snapshot copied at every module call, and a walk over every module seen at every op: five times
    the run time of a small model here) are not kept; they also refuse a module called again outside a parent
    module, as every decoding step calls the model. Kept from its module hooks: the first call of a module
    registers its parameters (so their gradients count as gradients), and a module re-run during backward
    (checkpointing's recompute) creates activations, not temporaries.

    Regions: the step's moments named the same way at every decoder-layer count, so that each one's memory can be
    fitted across layer counts on its own (the step's peak moves between them as the model deepens: in a shallow
    model the loss or the top layer's recompute, in a deep one the gradients summed over the passes at the end of
    backward). A region is (forward or backward, the pass: the decoder call in forward, the how-many-th descent
    through the top decoder layer in backward, the layer's role: first, mid or last, the submodule within the
    layer or outside the layers). `num_layers`: the decoder's depth (for the roles); `pass_count()`: the decoder
    calls so far, `bw_pass()`: the descents so far (RecipeRun counts both with module hooks; the module tracker's
    own idea of where backward is cannot count them: it attributes backward to modules approximately)."""

    def __init__(self, num_layers: int = 0, pass_count=lambda: 0, bw_pass=lambda: 0):
        super().__init__()
        self._registered = weakref.WeakSet()
        self._ref_class = tuple(_KIND.values())  # the categories of a snapshot, the gradient sums among them
        self.num_layers = num_layers
        self._pass_count = pass_count
        self._bw_pass = bw_pass
        # The module tracker learns that a module's backward is done from a hook on its inputs' gradients that waits
        # for all of them, holding each until the last arrives: for a module whose inputs' gradients come far apart
        # (LoRA's tied-head hook: the logits' early, the hidden states' only once every loss chunk is through) that
        # hook itself would keep every chunk's logits gradient alive. It waits for the first instead.
        self._mod_tracker._fw_pre_hook = functools.partial(_fw_pre_hook_first_gradient, self._mod_tracker)
        self.regions: dict[str, tuple[int, dict]] = {}  # region -> (its peak total, the snapshot there)
        self._anchor_pass = None  # the descent during which the deferred gradients' anchor ran (watch_gradient_sums)

    def region(self) -> str:
        """The current region's name (class doc)."""
        inner = max(self._mod_tracker.parents, key=_nesting)
        m = _LAYER.search(inner)
        bw = self._mod_tracker.is_bw
        if m is None:
            role, sub = "none", inner.rsplit(".", 1)[-1] if "." in inner else inner
            # SIM-CoT's decoder copy outside its layers ("decoder:none"): in forward, and in backward before the
            # first descent (its head's; later the tracker's attribution of backward to modules is approximate)
            if "step_supervision" in inner and (not bw or self._bw_pass() == 0):
                role = "decoder:none"
        else:
            i = int(m.group(1))
            role = "first" if i == 0 else "last" if i == self.num_layers - 1 else "mid"
            sub = inner[m.end() + 1:] or "layer"
            sub = _LAYER.sub(".*", sub)
            top = inner[:m.start()]  # the decoder whose layer this is (the base, or SIM-CoT's decoder copy)
            role = f"{top.rsplit('.', 1)[-1]}:{role}" if "step_supervision" in top else role
        if bw and self._anchor_pass is not None and self._anchor_pass == self._bw_pass():
            return f"bw/{self._bw_pass()}/none/anchor"
        if bw:
            return f"bw/{self._bw_pass()}/{role}/{sub}"
        return f"fw/{self._pass_count()}/{role}/{sub}"

    def watch_gradient_sums(self, loss: torch.Tensor) -> None:
        """Before `loss.backward()`: every gradient that backward sends towards a trainable parameter is counted as
        a gradient sum (not a temporary) from the moment it exists until it becomes the parameter's `.grad`. The
        anchor of the deferred weight gradients (model/deferred_grad.py) gets a region of its own, "anchor", from its
        backward (every deferred weight's gradient made at once, then added to its sum) until the next descent: the
        module tracker would file it under whichever module it last saw, beside other moments."""
        seen, todo = set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ == "_AnchorBackward":
                node.register_prehook(self._anchor_begins)
            edges = [i for i, (nxt, _) in enumerate(node.next_functions)
                     if nxt is not None and getattr(getattr(nxt, "variable", None), "requires_grad", False)]
            if edges:
                node.register_hook(functools.partial(self._mark_gradient_sums, edges))
            todo.extend(nxt for nxt, _ in node.next_functions)

    def _anchor_begins(self, grad_outputs) -> None:
        self._anchor_pass = self._bw_pass()

    _SUMS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = super().__torch_dispatch__(func, types, args, kwargs)
        # The autograd engine adds a weight's next contribution to what it has summed so far (aten.add, outside any
        # node): the result is that weight's gradient sum too, not a temporary.
        if func in self._SUMS and self._mod_tracker.is_bw and isinstance(res, torch.Tensor) and any(
                isinstance(a, torch.Tensor) and self._is_gradient_sum(a) for a in args):
            self._update_and_maybe_create_winfos(res, _GradientSum.GRADIENT_SUM)
            self._update_peak_stats(None)
        return res

    def _is_gradient_sum(self, t: torch.Tensor) -> bool:
        for st in mem_tracker.get_untyped_storages(t):
            winfo, _ = self._WINFO.get(st, (None, None))
            if winfo is not None and winfo.reftype == _GradientSum.GRADIENT_SUM:
                return True
        return False

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
        total = 0
        for device, snap in self._curr_mem_snap.items():
            total += snap[mem_tracker._TOTAL_KEY]
            if self._peak_mem.get(device, 0) < snap[mem_tracker._TOTAL_KEY]:
                self._peak_mem[device] = snap[mem_tracker._TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snap)
        name = self.region()
        if total > self.regions.get(name, (-1, None))[0]:
            self.regions[name] = (total, self._by_category(self._curr_mem_snap.values()))

    @staticmethod
    def _by_category(snaps) -> dict[str, int]:
        snaps = list(snaps)
        return {name: sum(int(s.get(kind, 0)) for s in snaps) for name, kind in _KIND.items()}

    def region_peaks(self) -> dict[str, "Phase"]:
        """Every region's peak, by category."""
        return {name: Phase(**snap) for name, (_, snap) in self.regions.items()}

    def skip_frozen_parameters(self, model: torch.nn.Module) -> None:
        """MemTracker hooks the gradient of every parameter a module uses, which torch refuses for a frozen one
        (LoRA's base): mark those as hooked already."""
        for p in model.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())

    def peak(self, which: str = "peak") -> dict[str, int]:
        """Bytes by category (CATEGORIES) at the peak since entry or the last `restart_peak` ("current": now)."""
        return self._by_category(self.get_tracker_snapshot(which).values())

    def restart_peak(self) -> None:
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {d: s[mem_tracker._TOTAL_KEY] for d, s in self._peak_mem_snap.items()}
        self.regions = {}


def _fw_pre_hook_first_gradient(tracker, mod, inputs) -> None:
    """torch's ModTracker._fw_pre_hook with its backward hook in mode "any" (PeakTracker.__init__)."""
    from torch.autograd.graph import register_multi_grad_hook
    from torch.utils._pytree import tree_flatten

    name = tracker._get_mod_name(mod)
    w_mod = weakref.ref(mod)
    tracker._get_append_fn(w_mod, name, False)()
    if tracker._user_pre_fw_hook is not None:
        tracker._user_pre_fw_hook(mod, inputs)
    args, _ = tree_flatten(inputs)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not tracker.is_bw:
        if tensors:
            register_multi_grad_hook(tensors, tracker._get_pop_fn(w_mod, name, True), mode="any")
        else:
            tracker._post_bw_callbacks_to_enqueue.append(tracker._get_pop_fn(w_mod, name, True))


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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The model's gradients go too (the masters are the optimizer's own parameters): every step after the
        first starts without gradients, as DeepSpeed leaves it (its gradient buffers are not model tensors)."""
        super().zero_grad(set_to_none=set_to_none)
        for p in self.model_params:
            p.grad = None

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
    train_regions: dict[str, Phase] = field(default_factory=dict)  # forward + backward, by region (PeakTracker)


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
    regions: dict[str, Phase] = field(default_factory=dict)


@dataclass
class ValidationMeasure:
    peak: Phase
    regions: dict[str, Phase] = field(default_factory=dict)


@contextlib.contextmanager
def fused_attention_memory():
    """Attention dropout as a GPU's fused SDPA kernels run it (flash / memory-efficient attention: they keep the
    output and its log-sum-exp, and regenerate the dropout mask from a seed): the CPU has no fused kernel with
    dropout and would fall back to the math path, which keeps the [B, heads, q, k] scores, probabilities and mask
    (GPT-2 trains with attention dropout 0.1). For memory, the step runs the fused CPU kernel without dropout."""
    original = torch.nn.functional.scaled_dot_product_attention

    @functools.wraps(original)
    def sdpa(*args, dropout_p: float = 0.0, **kwargs):
        return original(*args, dropout_p=0.0, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


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
        self.decoder_calls = 0
        self.model.base_causallm.get_decoder().register_forward_pre_hook(self._count_decoder_call)
        self._count_descents()
        with self.mode:
            self.optimizer = _optimizer(recipe, self.model)
            self.optimizer.prime()

    def _count_decoder_call(self, module, args) -> None:
        self.decoder_calls += 1

    def _count_descents(self) -> None:
        """Backward's passes, counted where they start: the top decoder layer's recompute (checkpointing: the
        forward of any of its submodules while backward runs, after another layer's), or the gradient of its
        output reaching it (no checkpointing, and a one-column pass, which checkpointing does not recompute:
        model/column_pass.py)."""
        from coconut_scale.model.activation_checkpointing import decoder_layers

        layers = decoder_layers(self.model.base_causallm)
        top = len(layers) - 1
        self.descents, self._recomputing = 0, None

        def recompute(index, module, args):
            if torch._C._current_graph_task_id() == -1:  # not inside backward
                return
            if index == top and self._recomputing != top:
                self.descents += 1
            self._recomputing = index

        if self.recipe.model.gradient_checkpointing:
            for i, layer in enumerate(layers):
                for sub in layer.modules():
                    if sub is not layer:
                        sub.register_forward_pre_hook(functools.partial(recompute, i))

            from coconut_scale.model.deferred_grad import weights_unpartitioned

            def one_column_reached(module, grad_output):
                g = grad_output[0] if grad_output else None
                if g is not None and g.dim() == 3 and g.shape[1] == 1:
                    self.descents += 1
                    self._recomputing = None  # the next wide pass's recompute of the top layer starts a descent

            # Under ZeRO-3 one-column passes are recomputed too, so `recompute` already counts their descents.
            if weights_unpartitioned(self.model.base_causallm.get_decoder()):
                layers[top].register_full_backward_pre_hook(one_column_reached)
        else:
            def reached(module, grad_output):
                self.descents += 1

            layers[top].register_full_backward_pre_hook(reached)

    def _tracker(self) -> PeakTracker:
        self.decoder_calls, self.descents, self._recomputing = 0, 0, None
        tracker = PeakTracker(self.layers, lambda: self.decoder_calls, lambda: self.descents)
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
        with self.mode, fused_attention_memory():
            tracker = self._tracker()
            with tracker:
                loss = self._loss(inputs, batch, parts)
                tracker.watch_gradient_sums(loss)
                loss.backward()
                del loss
                train, after_backward = self._phase(tracker), Phase(**tracker.peak("current"))
                regions = tracker.region_peaks()
                tracker.restart_peak()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                optimizer, after_step = self._phase(tracker), Phase(**tracker.peak("current"))
        return StepMeasure(layers=self.layers, micro_batch=micro_batch,
                           tokens=micro_batch * self.recipe.data.max_seq_len, passes=inputs["num_passes"], train=train,
                           optimizer=optimizer, after_backward=after_backward, after_step=after_step,
                           train_regions=regions)

    def flops(self, micro_batch: int = 1) -> StepFlops:
        """FLOPs of one micro step (every op scales with the batch: count at micro 1 and multiply)."""
        inputs, batch, parts = self._inputs(micro_batch)
        self.model.train()
        with self.mode, fused_attention_memory():
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

    def validation(self) -> ValidationMeasure:
        """Memory of one validation-loss batch: batch.eval_batch_size training rows, forward only, no gradients (as
        evaluate/generation.py's validation_loss), with the optimizer states alive."""
        inputs, batch, parts = self._inputs(self.recipe.batch.eval_batch_size)
        self.model.eval()
        with self.mode, torch.no_grad():
            tracker = self._tracker()
            with tracker:
                self.model(**batch, num_passes=inputs["num_passes"], latent_columns=inputs["latent_columns"])
            peak = ValidationMeasure(self._phase(tracker), tracker.region_peaks())
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
            peak, regions = self._phase(tracker), tracker.region_peaks()
        model.train()
        return GenerationMeasure(layers=self.layers, batch=ids.shape[0], new_tokens=inputs["max_new_tokens"],
                                 peak=peak, regions=regions)
