"""Timing a Coconut train step pass by pass, in stream order, and the FLOPs the step must do (gpu_validate.py).

Clock gives timestamps in stream order (CUDA events on a GPU, the host clock on the CPU). PassTimer brackets each
pass's forward with hooks on the decoder body and marks the end of each pass's backward with an identity
autograd function on its input embeddings; timed_steps runs engine steps under it. step_flops counts what a
step must compute (gpu_validate.py's docstring says what it counts), the numerator of MFU.
"""

from __future__ import annotations

import time


def _torch():
    import torch

    return torch


def on_cuda() -> bool:
    return _torch().cuda.is_available()


class Clock:
    """Timestamps in stream order: CUDA events on a GPU, the host clock on the CPU (where work is synchronous)."""

    def __init__(self):
        self.cuda = on_cuda()

    def now(self):
        torch = _torch()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self):
        if self.cuda:
            _torch().cuda.synchronize()


def matmul_tflops(n: int, iters: int = 10) -> float:
    """bf16 n x n x n matrix products on random data (a GPU multiplies zeros faster: their rate would overstate
    the peak)."""
    torch = _torch()
    device = "cuda" if on_cuda() else "cpu"
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    clock = Clock()
    for _ in range(3):
        a @ b
    clock.sync()
    start = clock.now()
    for _ in range(iters):
        a @ b
    end = clock.now()
    clock.sync()
    return 2 * n**3 * iters / (clock.ms(start, end) / 1e3) / 1e12


def step_flops(shape: dict, batch: int, seq: int, lora_rank: int | None, lora_targets: list[str] | None) -> float:
    """FLOPs one training step must do (what gpu_validate.py's docstring lists): recompute not counted."""
    from coconut_scale.model.shapes import dims, linear_shapes

    d = dims(shape)
    tokens = batch * seq
    linear = sum(i * o for mods in linear_shapes(shape).values() for i, o in mods) * d.layers
    head = d.vocab * d.hidden
    fwd_matmul = 2 * tokens * (linear + head)
    fwd_attention = 2 * 2 * tokens * d.layers * d.q_dim * (seq + 1) / 2  # QK^T and PV over a causal prefix
    if lora_rank is None:  # full fine-tune: input and weight gradients of every matmul
        return 3 * fwd_matmul + 3 * fwd_attention
    layout = linear_shapes(shape)
    adapters = sum(lora_rank * (i + o) for t in lora_targets for i, o in layout[t]) * d.layers
    return 2 * fwd_matmul + 3 * fwd_attention + 3 * 2 * tokens * adapters


class _BackwardMark:
    """Identity in forward; calls `callback` when the gradient reaches it (the end of one pass's backward)."""

    @staticmethod
    def make():
        torch = _torch()

        class Mark(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, anchor, callback):
                ctx.callback = callback
                return x.view_as(x)

            @staticmethod
            def backward(ctx, grad):
                ctx.callback()
                return grad, None, None

        return Mark


class PassTimer:
    """Per-pass forward and backward times of a Coconut step, from timestamps in stream order.

    Forward: a pre-hook and a hook on the decoder body bracket each pass. Backward: an identity marker on each
    pass's input embeddings fires when that pass's gradient is complete; the interval since the previous marker
    (or since backward began) is that pass's backward. Optional profiler labels name each pass.
    """

    def __init__(self, base, clock: Clock, label_passes: bool = False):
        torch = _torch()
        self.clock, self.label = clock, label_passes
        self.mark = _BackwardMark.make()
        self.anchor = torch.zeros((), requires_grad=True)
        self.fwd, self.bwd_marks, self._labels = [], {}, []
        self.handles = [base.register_forward_pre_hook(self._pre, with_kwargs=True),
                        base.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        i = len(self.fwd)
        if self.label:
            rf = _torch().autograd.profiler.record_function(f"coconut_pass_{i}")
            rf.__enter__()
            self._labels.append(rf)
        self.fwd.append([self.clock.now(), None])
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and _torch().is_grad_enabled():
            kwargs["inputs_embeds"] = self.mark.apply(embeds, self.anchor,
                                                      lambda i=i: self.bwd_marks.__setitem__(i, self.clock.now()))
        return args, kwargs

    def _post(self, module, args, output):
        self.fwd[-1][1] = self.clock.now()
        if self._labels:
            self._labels.pop().__exit__(None, None, None)

    def reset(self):
        self.fwd, self.bwd_marks = [], {}

    def remove(self):
        for h in self.handles:
            h.remove()

    def per_pass_ms(self, bwd_start, bwd_end) -> tuple[list[float], list[float]]:
        fwd = [self.clock.ms(a, b) for a, b in self.fwd]
        stamps = sorted(self.bwd_marks.items(), key=lambda kv: self.clock.ms(bwd_start, kv[1]))
        bwd, prev = [0.0] * len(fwd), bwd_start
        for i, stamp in stamps:
            bwd[i] = self.clock.ms(prev, stamp)
            prev = stamp
        return fwd, bwd


def timed_steps(bundle, batch: dict, latent_id: int, steps: int, label_passes: bool = False) -> dict:
    """Run `steps` engine steps (forward, backward, step) and time each pass; returns medians and per-pass ms."""
    import statistics

    from coconut_scale.model.coconut import plan_passes

    engine, clock = bundle.engine, Clock()
    plan = plan_passes(batch["input_ids"], latent_id)
    latent = [i for i, ((a, b), fill) in enumerate(zip(plan.ranges, plan.fills)) if fill and b - a == 1]
    # The decoder body: training passes call it directly (the loss is chunked over the final hidden states),
    # and a logits-returning pass calls it through the LM, so every pass is bracketed once either way.
    timer = PassTimer(bundle.model.base_causallm.get_decoder(), clock, label_passes)
    rows = []
    try:
        for _ in range(steps):
            timer.reset()
            start = clock.now()
            loss = engine(**batch, num_passes=len(plan.ranges)).loss
            bwd_start = clock.now()
            engine.backward(loss)
            bwd_end = clock.now()
            engine.step()
            end = clock.now()
            clock.sync()
            fwd, bwd = timer.per_pass_ms(bwd_start, bwd_end)
            print(f"  step {len(rows)}: {clock.ms(start, end):.0f} ms (micro {batch['input_ids'].shape[0]})", flush=True)
            rows.append(dict(step_ms=clock.ms(start, end), forward_ms=clock.ms(start, bwd_start),
                             backward_ms=clock.ms(bwd_start, bwd_end), optimizer_ms=clock.ms(bwd_end, end),
                             pass_forward_ms=fwd, pass_backward_ms=bwd, loss=float(loss)))
    finally:
        timer.remove()
    median = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    last = rows[-1]
    latent_ms = sum(last["pass_forward_ms"][i] + last["pass_backward_ms"][i] for i in latent)
    return dict(step_ms=median("step_ms"), forward_ms=median("forward_ms"), backward_ms=median("backward_ms"),
                optimizer_ms=median("optimizer_ms"), passes=len(plan.ranges), latent_passes=latent,
                pass_ranges=[list(r) for r in plan.ranges], pass_forward_ms=last["pass_forward_ms"],
                pass_backward_ms=last["pass_backward_ms"], latent_share=latent_ms / last["step_ms"],
                losses=[r["loss"] for r in rows])
