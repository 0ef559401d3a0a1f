"""`check --measure`: a recipe's step executed on fake tensors (config/fake_step.py), per world size, beside the estimate.

What is measured at each decoder-layer count in LAYER_COUNTS (the real count when it is not deeper): one training
micro step at each world size's micro batch, the optimizer step, a validation-loss batch, a generation batch, and
the FLOPs of a micro step. Every byte count and FLOP count is linear in the layer count (the same layer repeats), so
the figures at the real count come from a least-squares line through the three points; the fit's largest residual
is reported, and where it exceeds LINEAR_RESIDUAL the window moves one layer deeper.

Per world size W, ZeRO's sharding is applied to the one-process figures (ds_config's stage):
    weights      ZeRO-3: the partition (1/W) plus the gathered working set, min(all, stage3_max_live_parameters)
                 (0 partition with parameter offload); else every weight on every GPU
    gradients    a parameter's .grad: 1/W from ZeRO-2. The gradients backward is still summing over the latent
                 passes (fake_step._GradientSum): unsharded, as DeepSpeed reduces a gradient only once it is whole
    optimizer    fp32 masters and moments: 1/W from ZeRO-1 (0, like the gradients, when the optimizer is
                 offloaded); the optimizer step's fp32 copy of the gradients: of the partition (ZeRO-3: of
                 sub_group_size parameters at a time, as its optimizer steps them)
    activations and temporaries: the micro batch's, unsharded
The peak per GPU is the largest of four phases: forward + backward (optimizer states alive), the optimizer step, a
validation-loss batch and a generation batch (batch.eval_batch_size rows; weights, optimizer states, the KV cache).
What a GPU adds on top (CUDA context, allocator fragmentation, NCCL and DeepSpeed buffers) fake tensors cannot see:
docs/memory.md has the allowance.

Time: FLOPs per optimizer step (micro x accumulation, every pass, the checkpointing recompute counted apart) and the
step time at MFU x the dense tensor-core peak of an H100 SXM / H200 (the same: 989.4 TFLOP/s in bf16, 66.9 in fp32
without TF32), with "model FLOPs" as MFU counts them (no recompute). Under ZeRO-3 every pass also pays a fixed cost
per hooked module that FLOPs do not see; `zero3_floor_s` is that cost as measured on one H200 (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from coconut_scale.config.batch_plan import BatchMathError, resolve_batch
from coconut_scale.config.ds_config import build_ds_config, zero_settings
from coconut_scale.config.fake_model import layer_count
from coconut_scale.config.fake_step import Phase, RecipeRun
from coconut_scale.config.memory import GIB, estimate_memory
from coconut_scale.config.model_shape import hidden_size

LAYER_COUNTS = (2, 3, 4)
LINEAR_RESIDUAL = 0.01  # of the peak: three layer counts this close to one line are taken as linear
MFU = 0.40
DENSE_PEAK = {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12}  # H100 SXM = H200, FLOP/s
# One H200, Llama-3.1-8B + LoRA under ZeRO-3: every latent pass cost ~0.5 s forward and ~0.75 s backward
# (recompute included) whatever its width, over the 2,665 modules ZeRO-3 hooks (docs/benchmarks.md).
ZERO3_S_PER_MODULE_PASS = (0.5 + 0.75) / 2665
TOLERANCE = {"activation_side": 0.10, "total_above": 0.10, "total_below": 0.05}


@dataclass
class LinearFit:
    intercept: float
    slope: float
    residual: float  # largest |fit - point| / point over the points fitted

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


def fit_line(xs, ys) -> LinearFit:
    n = len(xs)
    if n == 1:
        return LinearFit(float(ys[0]), 0.0, 0.0)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    line = LinearFit(my - slope * mx, slope, 0.0)
    line.residual = max(abs(line.at(x) - y) / max(abs(y), 1.0) for x, y in zip(xs, ys))
    return line


def _fit_phase(layers: list[int], phases: list[Phase], full: int) -> tuple[dict[str, float], float]:
    """Bytes by category at `full` layers, and the fit's largest residual (relative to the phase's total)."""
    out, worst = {}, 0.0
    totals = [p.total for p in phases]
    for name in asdict(phases[0]):
        values = [getattr(p, name) for p in phases]
        line = fit_line(layers, values)
        out[name] = max(line.at(full), 0.0)
        worst = max(worst, *(abs(line.at(x) - y) / max(t, 1) for x, y, t in zip(layers, values, totals)))
    return out, worst


@dataclass
class RecipeMeasurement:
    """The one-process figures of a recipe at its real layer count (bytes and FLOPs), fitted from LAYER_COUNTS."""

    recipe: str
    layers: int
    layer_counts: list[int]
    train: dict[int, dict[str, float]]  # micro batch -> bytes by category, forward + backward peak
    optimizer: dict[int, dict[str, float]]  # micro batch -> bytes by category, optimizer step peak
    optimizer_transient: dict[int, float]  # micro batch -> of its optimizer bytes, the step's fp32 gradient copy
    generation: dict[str, float]
    validation: dict[str, float]
    activation_slope: dict[int, float]  # micro batch -> bytes per layer (activations + temporaries, train peak)
    fit_residual: float
    flops_per_sample: dict[str, float]  # forward, backward, recompute, model: one micro-1 step
    params: float
    trainable_params: float
    largest_module_params: int
    base_modules: float  # modules ZeRO-3 hooks in each latent pass (the base model's, LoRA's included)
    part_modules: float  # the method parts' (called once per step)
    passes: int
    seconds: float
    points: dict = field(default_factory=dict)  # the raw per-layer-count figures, for the JSON


def zero_stage(recipe) -> int:
    """The ZeRO stage of the recipe's DeepSpeed config (the same at every world size)."""
    for ws in recipe.batch.world_sizes:
        try:
            plan = resolve_batch(recipe.batch, ws, recipe.data.max_seq_len)
        except BatchMathError:
            continue
        return zero_settings(build_ds_config(recipe, plan, hidden_size(recipe)))["stage"]
    raise BatchMathError(f"{recipe.name}: no world size of batch.world_sizes has a batch plan")


def micro_batches(recipe, world_sizes) -> dict[int, int]:
    """World size -> micro batch, for the world sizes whose batch plan resolves."""
    out = {}
    for ws in world_sizes:
        try:
            out[ws] = resolve_batch(recipe.batch, ws, recipe.data.max_seq_len).micro_batch_size
        except BatchMathError:
            pass
    return out


def measure_recipe(recipe, micros, layer_counts=LAYER_COUNTS, log=None) -> RecipeMeasurement:
    """Run the recipe's step at every micro batch in `micros` (and its generation batch) at each layer count; where
    the three are not on one line (the peak sits elsewhere in a very shallow model: in the loss, not in a layer), the
    window moves one layer deeper until they are (or reach the real count)."""
    start = time.perf_counter()
    full = layer_count(recipe)
    micros = sorted(set(micros))
    zero3 = zero_stage(recipe) == 3
    done: dict[int, tuple] = {}

    def at(layers: int):
        if layers not in done:
            run = RecipeRun(recipe, layers, zero3=zero3)
            steps = {m: run.step(m) for m in micros}
            if log:
                log(f"  {layers} layers: " + ", ".join(f"micro {m} {s.train.total / GIB:.2f} GiB" for m, s in steps.items()))
            done[layers] = steps, run.flops(1), run.generation(), run.validation()
        return done[layers]

    counts = list(layer_counts) if full > max(layer_counts) else [full]
    while True:
        fits = _fit_all([at(c) for c in counts], counts, full, micros)
        if fits[-1] <= LINEAR_RESIDUAL or counts[-1] + 1 >= full or len(counts) == 1:
            break
        counts = [*counts[1:], counts[-1] + 1]
    train, optimizer, transient, slope, generation, validation, worst = fits
    flops = [at(c)[1] for c in counts]
    per_sample = {k: max(fit_line(counts, [getattr(f, k) for f in flops]).at(full), 0.0)
                  for k in ("forward", "backward", "recompute")}
    per_sample["model"] = per_sample["forward"] + per_sample["backward"] - per_sample["recompute"]
    line = lambda attr: fit_line(counts, [getattr(f, attr) for f in flops]).at(full)  # noqa: E731
    return RecipeMeasurement(
        recipe=recipe.name, layers=full, layer_counts=counts, train=train, optimizer=optimizer,
        optimizer_transient=transient, generation=generation, validation=validation, activation_slope=slope,
        fit_residual=worst,
        flops_per_sample=per_sample, params=line("params"), trainable_params=line("trainable_params"),
        largest_module_params=max(f.largest_module_params for f in flops), base_modules=line("base_modules"),
        part_modules=line("modules") - line("base_modules"), passes=at(counts[0])[0][micros[0]].passes,
        seconds=time.perf_counter() - start,
        points={str(c): {"steps": {m: asdict(s) for m, s in done[c][0].items()}, "flops": asdict(done[c][1]),
                         "generation": asdict(done[c][2]), "validation": asdict(done[c][3])} for c in sorted(done)})


def _fit_all(measured, counts, full, micros):
    """The per-micro-batch phases at `full` layers from the measurements at `counts`, and the largest residual."""
    train, optimizer, transient, slope, worst = {}, {}, {}, {}, 0.0
    for m in micros:
        steps = [steps_at[m] for steps_at, *_ in measured]
        train[m], r1 = _fit_phase(counts, [s.train for s in steps], full)
        optimizer[m], r2 = _fit_phase(counts, [s.optimizer for s in steps], full)
        kept, _ = _fit_phase(counts, [s.after_step for s in steps], full)
        transient[m] = max(optimizer[m]["optimizer"] - kept["optimizer"], 0.0)
        slope[m] = fit_line(counts, [s.train.activations + s.train.temporaries for s in steps]).slope
        worst = max(worst, r1, r2)
    generation, r3 = _fit_phase(counts, [g.peak for _, _, g, _ in measured], full)
    validation, r4 = _fit_phase(counts, [v for *_, v in measured], full)
    return train, optimizer, transient, slope, generation, validation, max(worst, r3, r4)


# --- per world size ----------------------------------------------------------------------------------------------


@dataclass
class WorldSizeRow:
    world_size: int
    micro_batch: int
    grad_accum: int
    zero_stage: int
    peak_phase: str
    measured: dict[str, float]  # GiB per GPU at the peak phase: weights, gradients, optimizer, activations, temporaries
    measured_total: float
    measured_activation_side: float  # activations + temporaries of forward + backward
    estimate: dict[str, float]  # config/memory.py's, GiB
    estimate_executed: float  # the estimate without what fake tensors cannot see (buffers, overhead)
    estimate_activation_side: float  # activations + kv_cache + logits
    deepspeed_model_states: float | None  # DeepSpeed's own model-state estimate, GiB (filled by the caller)
    measured_model_states: float  # weights (without ZeRO-3's gathered set) + .grad + optimizer, peak phase
    gradient_sums: float  # of measured["gradients"], the gradients backward was still summing (unsharded)
    step_tflop: float  # executed, per optimizer step on one GPU
    model_tflop: float  # as MFU counts them
    step_s: float  # at MFU of the dense peak
    tokens_per_s: float  # per GPU
    zero3_floor_s: float | None  # the per-module hook cost per step under ZeRO-3 (H200-measured)

    @property
    def activation_error(self) -> float:
        return self.estimate_activation_side / max(self.measured_activation_side, 1e-9) - 1

    @property
    def total_error(self) -> float:
        return self.estimate_executed / max(self.measured_total, 1e-9) - 1

    def within_tolerance(self) -> bool:
        t = TOLERANCE
        return (abs(self.activation_error) <= t["activation_side"]
                and -t["total_below"] <= self.total_error <= t["total_above"])


def gathered_bytes(phase: dict[str, float], z: dict, params: float) -> float:
    """ZeRO-3's working set of gathered weights: up to stage3_max_live_parameters of them (0 below ZeRO-3)."""
    return min(1.0, z["max_live_parameters"] / max(params, 1.0)) * phase["params"] if z["stage"] == 3 else 0.0


def shard(phase: dict[str, float], z: dict, world_size: int, params: float, trainable: float = 0.0,
          transient: float = 0.0) -> dict:
    """One-process bytes by category -> bytes per GPU at `world_size` under the config's ZeRO settings (module doc);
    "weights" holds ZeRO-3's gathered working set too. `transient`: the optimizer step's fp32 copy of the gradients
    (part of phase["optimizer"]), made per partition, and under ZeRO-3 per sub_group_size parameters of it."""
    stage, w = z["stage"], world_size
    weights = phase["params"] + phase["buffers"]
    if stage == 3:
        weights = gathered_bytes(phase, z, params) + (0.0 if z["offload_param"] else phase["params"] / w) \
            + phase["buffers"]
    gradients = phase["gradients"] / (w if stage >= 2 else 1)
    sums = phase["gradient_sums"]  # before its gradient hook, no weight's gradient is sharded
    optimizer = (phase["optimizer"] - transient) / (w if stage >= 1 else 1)
    if stage == 3:
        optimizer += transient * min(1.0, z["sub_group_size"] * w / max(trainable, 1.0)) / w
    else:
        optimizer += transient / (w if stage >= 1 else 1)
    if z["offload_optimizer"]:
        gradients = optimizer = 0.0
    return {"weights": weights, "gradients": gradients + sums, "optimizer": optimizer,
            "activations": phase["activations"], "temporaries": phase["temporaries"]}


def world_size_rows(recipe, m: RecipeMeasurement, world_sizes, model_state_estimate=None) -> list[WorldSizeRow]:
    """`model_state_estimate(total_params, largest_module_params, world_size, stage)` -> bytes, or None."""
    rows = []
    peak = DENSE_PEAK[recipe.model.dtype] * MFU
    for ws in world_sizes:
        try:
            plan = resolve_batch(recipe.batch, ws, recipe.data.max_seq_len)
        except BatchMathError:
            continue
        micro = plan.micro_batch_size
        if micro not in m.train:
            continue
        z = zero_settings(build_ds_config(recipe, plan, hidden_size(recipe)))
        phases = {"forward+backward": m.train[micro], "optimizer step": m.optimizer[micro], "generation": m.generation,
                  "validation": m.validation}
        transient = {"optimizer step": m.optimizer_transient[micro]}
        sharded = {name: shard(p, z, ws, m.params, m.trainable_params, transient.get(name, 0.0))
                   for name, p in phases.items()}
        phase = max(sharded, key=lambda k: sum(sharded[k].values()))
        measured = {k: v / GIB for k, v in sharded[phase].items()}
        est = estimate_memory(recipe, ws)
        samples = micro * plan.grad_accum
        step_flops = samples * (m.flops_per_sample["forward"] + m.flops_per_sample["backward"])
        model_flops = samples * m.flops_per_sample["model"]
        step_s = model_flops / peak
        floor = None
        if z["stage"] == 3:
            floor = plan.grad_accum * (m.passes * m.base_modules + m.part_modules) * ZERO3_S_PER_MODULE_PASS
        ds = model_state_estimate(m.params, m.largest_module_params, ws, z["stage"]) if model_state_estimate else None
        rows.append(WorldSizeRow(
            world_size=ws, micro_batch=micro, grad_accum=plan.grad_accum, zero_stage=z["stage"], peak_phase=phase,
            measured=measured, measured_total=sum(measured.values()),
            measured_activation_side=(m.train[micro]["activations"] + m.train[micro]["temporaries"]) / GIB,
            estimate=est, estimate_executed=est["total"] - est["buffers"] - est["overhead"],
            estimate_activation_side=est["activations"] + est["kv_cache"] + est["logits"],
            deepspeed_model_states=None if ds is None else ds / GIB,
            measured_model_states=measured["weights"] + measured["gradients"] + measured["optimizer"]
            - (gathered_bytes(phases[phase], z, m.params) + phases[phase]["gradient_sums"]) / GIB,
            gradient_sums=phases[phase]["gradient_sums"] / GIB,
            step_tflop=step_flops / 1e12, model_tflop=model_flops / 1e12, step_s=step_s,
            tokens_per_s=samples * recipe.data.max_seq_len / step_s, zero3_floor_s=floor))
    return rows
