"""`check --measure`: a recipe's step executed on fake tensors (config/fake_step.py), per world size, beside the estimate.

What is measured (config/fake_step.py): one training micro step at each world size's micro batch, the optimizer
step, a validation-loss batch, a generation batch, and the FLOPs of a micro step; memory at the peak of every region
of the step (fake_step.PeakTracker.region). A model of up to DIRECT_UP_TO layers is measured at its real depth. A
deeper one is measured at each decoder-layer count in LAYER_COUNTS: each region's bytes are linear in the depth (the
same layer repeats), so each region is fitted on its own line (regions whose points are not on one are dropped) and
extrapolated, and the largest at the real depth is the peak; the step's peak itself is not linear in the depth (it
moves between regions as the model deepens). The fit is checked by a direct run at CHECK_LAYERS; where a region or a
phase's peak misses there by more than LINEAR_RESIDUAL, the model is measured at its real depth instead.

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
from coconut_scale.config.memory import GIB, estimate_phases
from coconut_scale.config.model_shape import hidden_size

LAYER_COUNTS = (2, 3, 4)
LINEAR_RESIDUAL = 0.01  # of the peak: a fit this close to a direct measurement is taken as linear
CHECK_LAYERS = 8  # the fit from LAYER_COUNTS is checked against a direct measurement at this depth
DIRECT_UP_TO = 12  # models this shallow are measured at their real depth (about the cost of the fit and its check)
MFU = 0.40
DENSE_PEAK = {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12}  # H100 SXM = H200, FLOP/s
# One H200, Llama-3.1-8B + LoRA under ZeRO-3: every latent pass cost ~0.5 s forward and ~0.75 s backward
# (recompute included) whatever its width, over the 2,665 modules ZeRO-3 hooks (docs/benchmarks.md).
ZERO3_S_PER_MODULE_PASS = (0.5 + 0.75) / 2665
# The estimate against the measurement: the activation side (activations + kv + logits at the moment where the
# measurement peaks) within +-10%, the total within -5%..+10%.
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


MODEL_STATES = ("params", "buffers", "optimizer")


def _fit_phase(layers: list[int], phases: list[Phase], full: int, moving: bool = False
               ) -> tuple[dict[str, float], float]:
    """Bytes by category at `full` layers, and the fit's largest residual: relative to the phase's total, or
    (`moving`) to its part besides the model states (gradients, gradient sums, activations, temporaries)."""
    out, worst = {}, 0.0
    totals = [p.total - (sum(getattr(p, k) for k in MODEL_STATES) if moving else 0) for p in phases]
    for name in asdict(phases[0]):
        values = [getattr(p, name) for p in phases]
        line = fit_line(layers, values)
        out[name] = max(line.at(full), 0.0)
        worst = max(worst, *(abs(line.at(x) - y) / max(t, 1) for x, y, t in zip(layers, values, totals)))
    return out, worst


KEPT_REGIONS = 6  # per ranking: the largest one-process totals and the largest unsharded parts (below)
UNSHARDED = ("gradient_sums", "activations", "temporaries")


def _fit_regions(layers: list[int], regions: list[dict[str, Phase]], full: int
                 ) -> tuple[dict[str, dict[str, float]], float, float]:
    """Each region (fake_step.PeakTracker) seen at every layer count, fitted to `full` layers on its own: the
    regions that can hold a world size's peak (the KEPT_REGIONS largest one-process totals, and the KEPT_REGIONS
    largest gradient sums + activations + temporaries, which ZeRO does not shard and so hold the peak on many
    GPUs), the fit residual of the two largest (relative to each point's total), and the activations +
    temporaries per layer of the region with the largest total."""
    common = set(regions[0]).intersection(*regions[1:])
    fitted, residual = {}, {}
    for name in common:
        fit, res = _fit_phase(layers, [r[name] for r in regions], full, moving=True)
        if res <= LINEAR_RESIDUAL or len(layers) < 3:
            fitted[name], residual[name] = fit, res
    # A region whose points are not on a line names different moments at different depths (the module tracker's
    # attribution in backward is approximate); its moments are other regions' too, so it is left out. Linear is
    # judged against what the step's moments move (gradients, gradient sums, activations, temporaries), not the
    # total: the weights and optimizer states grow exactly with the depth and would hide a category that is off its
    # line by a percent of the total at the fitted depths and by far more, extrapolated, at the real one.
    by_total = sorted(fitted, key=lambda n: -sum(fitted[n].values()))[:KEPT_REGIONS]
    by_unsharded = sorted(fitted, key=lambda n: -sum(fitted[n][k] for k in UNSHARDED))[:KEPT_REGIONS]
    kept = {n: fitted[n] for n in dict.fromkeys(by_total + by_unsharded)}
    top = by_total[0]
    slope = fit_line(layers, [r[top].activations + r[top].temporaries for r in regions]).slope
    return kept, max(residual[top], residual[by_unsharded[0]]), slope


def _region_gap(predicted, measured) -> float:
    """The largest gap between the regions a fit predicts at the check depth and the same regions measured there,
    relative to the measured phase's peak (every kept region, not only the largest: a region that is small at the
    check depth can still hold the peak deeper down)."""
    train_p, _, _, _, gen_p, val_p, _ = predicted
    train_m, _, _, _, gen_m, val_m, _ = measured
    pairs = [(train_p[m], train_m[m]) for m in train_p] + [(gen_p, gen_m), (val_p, val_m)]
    gap = 0.0
    for p, q in pairs:
        peak = max(sum(v.values()) for v in q.values())
        for name, fit in p.items():
            if name in q:
                gap = max(gap, abs(sum(fit.values()) - sum(q[name].values())) / max(peak, 1.0))
    return gap


def estimate_moment(region: str, passes: int, moments) -> str | None:
    """The moment of config/memory.py's model (its train phase) at which a measured region lies: backward of the
    last pass at its top layer ("top") or below ("bottom"), a later descent ("next pass"; the n-th, the first
    pass's: "end"), the deferred weight gradients' anchor (fake_step's "anchor" region), the embedding's gradient,
    the loss (forward, and backward before any layer), SIM-CoT's decoder, CODI's teacher pass (backpropagated
    before the student's passes: the first descent; its top layer "teacher", below it "teacher bottom"). A frozen
    embedding (LoRA: only the Coconut token rows train) has no moment of its own: its backward ends its pass's
    descent. None where the model has no such moment."""
    kind, number, role, sub = (region.split("/", 3) + ["", "", ""])[:4]
    if "teacher" in moments and kind == "bw" and number.isdigit() and int(number) > 0:
        if number == "1":
            below_top = role not in ("last", "none") and "teacher bottom" in moments
            return "teacher bottom" if below_top else "teacher"
        number = str(int(number) - 1)  # the student's descents follow the teacher's
    if "step_supervision" in region or role.startswith("decoder:"):
        name = "step decoder"
    elif kind == "fw" or number == "0":
        name = "loss"
    elif "backward" in moments:  # no checkpointing: one backward moment
        name = "backward"
    elif sub == "anchor":
        name = "anchor"  # fake_step.PeakTracker's region of the deferred gradients' anchor
    elif role == "none" and sub.split(".")[-1] in ("wte", "embed_tokens", "coconut_new_rows") and "embedding" in moments:
        name = "embedding"  # (GPT-2's wpe is added inside the decoder, in every pass)
    elif number == "1":
        name = "top" if role == "last" else "bottom"
    else:
        name = "end" if int(number) >= passes else "next pass"
    return name if name in moments else None


def peak_region(regions: dict[str, dict[str, float]], weigh=None) -> str:
    """The region with the largest total (`weigh(bytes by category) -> bytes`: e.g. per GPU after sharding)."""
    weigh = weigh or (lambda phase: sum(phase.values()))
    return max(regions, key=lambda n: weigh(regions[n]))


@dataclass
class RecipeMeasurement:
    """The one-process figures of a recipe at its real layer count (bytes and FLOPs), fitted from LAYER_COUNTS."""

    recipe: str
    layers: int
    layer_counts: list[int]
    train: dict[int, dict[str, dict[str, float]]]  # micro batch -> region -> bytes by category (forward + backward)
    optimizer: dict[int, dict[str, float]]  # micro batch -> bytes by category, optimizer step peak
    optimizer_transient: dict[int, float]  # micro batch -> of its optimizer bytes, the step's fp32 gradient copy
    generation: dict[str, dict[str, float]]  # region -> bytes by category
    validation: dict[str, dict[str, float]]  # region -> bytes by category
    activation_slope: dict[int, float]  # micro batch -> bytes per layer (activations + temporaries, largest region)
    fit_residual: float
    check_layers: int | None  # the depth at which the fit was checked against a direct measurement (None: none)
    check_error: float | None  # the largest relative gap there between the fit's peaks and the measured ones
    flops_per_sample: dict[str, float]  # forward, backward, recompute, model: one micro-1 step
    params: float
    trainable_params: float
    largest_module_params: int
    base_modules: float  # modules ZeRO-3 hooks in each latent pass (the base model's, LoRA's included)
    part_modules: float  # the method parts' (called once per step)
    passes: int
    seconds: float
    fitted_layer_counts: list[int] = field(default_factory=list)  # the fit's depths (layer_counts: what was used)
    points: dict = field(default_factory=dict)  # the raw per-layer-count figures, for the JSON

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RecipeMeasurement":
        """The inverse of to_json after a JSON round trip (whose object keys are strings: micro batches are ints)."""
        by_micro = ("train", "optimizer", "optimizer_transient", "activation_slope")
        return cls(**{k: ({int(m): v for m, v in data[k].items()} if k in by_micro else data[k]) for k in data})


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


def measure_recipe(recipe, micros, layer_counts=LAYER_COUNTS, log=None, direct_up_to: int = DIRECT_UP_TO,
                   check_layers: int = CHECK_LAYERS) -> RecipeMeasurement:
    """Run the recipe's step at every micro batch in `micros` (and its generation and validation batches): at its
    real depth when that is at most `direct_up_to` layers; else at each of `layer_counts`, every region fitted on its
    own (_fit_regions) and the fit checked against a direct run at `check_layers`; where the check misses by more
    than LINEAR_RESIDUAL, at the real depth after all."""
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

    if full <= direct_up_to or full <= max(layer_counts):
        counts, check = [full], None  # as cheap as the shallow runs and the check, and exact
    else:
        counts, check = list(layer_counts), min(check_layers, full)
    fits = _fit_all([at(c) for c in counts], counts, full, micros)
    check_error = None
    if check is not None and check not in counts:
        predicted = _fit_all([at(c) for c in counts], counts, check, micros)
        measured = _fit_all([at(check)], [check], check, micros)
        check_error = max(max(_peak_gap(p, q) for p, q in zip(_peaks(predicted), _peaks(measured))),
                          _region_gap(predicted, measured))
        if log:
            log(f"  the fit predicts {check} layers within {check_error:.2%} of the measurement there")
        if check_error > LINEAR_RESIDUAL:  # not linear after all: measure at the real depth (the check is kept)
            counts = [full]
            fits = _fit_all([at(full)], counts, full, micros)
    train, optimizer, transient, slope, generation, validation, worst = fits
    flops = [at(c)[1] for c in counts]
    per_sample = {k: max(fit_line(counts, [getattr(f, k) for f in flops]).at(full), 0.0)
                  for k in ("forward", "backward", "recompute")}
    per_sample["model"] = per_sample["forward"] + per_sample["backward"] - per_sample["recompute"]
    line = lambda attr: fit_line(counts, [getattr(f, attr) for f in flops]).at(full)  # noqa: E731
    return RecipeMeasurement(
        recipe=recipe.name, layers=full, layer_counts=counts, train=train, optimizer=optimizer,
        optimizer_transient=transient, generation=generation, validation=validation, activation_slope=slope,
        fit_residual=worst, check_layers=None if check_error is None else check, check_error=check_error,
        fitted_layer_counts=list(layer_counts) if check_error is not None else [],
        flops_per_sample=per_sample, params=line("params"), trainable_params=line("trainable_params"),
        largest_module_params=max(f.largest_module_params for f in flops), base_modules=line("base_modules"),
        part_modules=line("modules") - line("base_modules"), passes=at(counts[0])[0][micros[0]].passes,
        seconds=time.perf_counter() - start,
        points={str(c): {"steps": {m: _without_regions(s) for m, s in done[c][0].items()}, "flops": asdict(done[c][1]),
                         "generation": _without_regions(done[c][2]), "validation": _without_regions(done[c][3])}
                for c in sorted(done)})


def _without_regions(measure) -> dict:
    """A measurement's global peaks for the JSON (its hundreds of regions only feed the fit)."""
    out = asdict(measure)
    out.pop("train_regions", None)
    out.pop("regions", None)
    return out


def _peaks(fits) -> list[float]:
    """The one-process peak totals of a _fit_all result: forward + backward per micro batch, the optimizer step
    per micro batch, generation, validation."""
    train, optimizer, _, _, generation, validation, _ = fits
    total = lambda regions: max(sum(p.values()) for p in regions.values())  # noqa: E731
    return ([total(train[m]) for m in sorted(train)] + [sum(optimizer[m].values()) for m in sorted(optimizer)]
            + [total(generation), total(validation)])


def _peak_gap(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / max(measured, 1.0)


def _fit_all(measured, counts, full, micros):
    """The per-micro-batch phases at `full` layers from the measurements at `counts`, and the largest residual."""
    train, optimizer, transient, slope, worst = {}, {}, {}, {}, 0.0
    for m in micros:
        steps = [steps_at[m] for steps_at, *_ in measured]
        train[m], r1, slope[m] = _fit_regions(counts, [s.train_regions for s in steps], full)
        optimizer[m], r2 = _fit_phase(counts, [s.optimizer for s in steps], full)
        kept, _ = _fit_phase(counts, [s.after_step for s in steps], full)
        transient[m] = max(optimizer[m]["optimizer"] - kept["optimizer"], 0.0)
        worst = max(worst, r1, r2)
    generation, r3, _ = _fit_regions(counts, [g.regions for _, _, g, _ in measured], full)
    validation, r4, _ = _fit_regions(counts, [v.regions for *_, v in measured], full)
    return train, optimizer, transient, slope, generation, validation, max(worst, r3, r4)


# --- per world size ----------------------------------------------------------------------------------------------


@dataclass
class WorldSizeRow:
    world_size: int
    micro_batch: int
    grad_accum: int
    zero_stage: int
    peak_phase: str
    peak_region: str  # where in that phase (fake_step.PeakTracker's region; "" for the optimizer step)
    measured: dict[str, float]  # GiB per GPU at the peak phase: weights, gradients, optimizer, activations, temporaries
    measured_total: float
    measured_activation_side: float  # activations + temporaries of forward + backward, at its peak
    measured_train_total: float  # per GPU, the forward + backward peak (what the estimate's train phase models)
    estimate: dict[str, float]  # config/memory.py's, GiB
    estimate_executed: float  # the estimate without what fake tensors cannot see (buffers, overhead)
    estimate_activation_side: float  # activations + kv_cache + logits of the estimate at estimate_moment
    estimate_moment: str  # the model's moment (config/memory.py) at the measured forward + backward peak
    estimate_train_executed: float  # the estimate's train phase without buffers and overhead
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
        per_gpu = lambda p: sum(shard(p, z, ws, m.params, m.trainable_params).values())  # noqa: E731
        regions = {"forward+backward": m.train[micro], "generation": m.generation, "validation": m.validation}
        where = {name: peak_region(r, per_gpu) for name, r in regions.items()}
        phases = {name: regions[name][where[name]] for name in regions}
        phases["optimizer step"] = m.optimizer[micro]
        transient = {"optimizer step": m.optimizer_transient[micro]}
        sharded = {name: shard(p, z, ws, m.params, m.trainable_params, transient.get(name, 0.0))
                   for name, p in phases.items()}
        phase = max(sharded, key=lambda k: sum(sharded[k].values()))
        measured = {k: v / GIB for k, v in sharded[phase].items()}
        train = phases["forward+backward"]
        phases_est = estimate_phases(recipe, ws)
        est_phase = max(phases_est, key=lambda k: phases_est[k]["total"])
        est, train_est = phases_est[est_phase], phases_est["train"]
        # The activation side is compared at the moment where the measurement peaks (several moments can be within
        # a percent of each other in total, with different splits between activations and gradient sums).
        moment = estimate_moment(where["forward+backward"], m.passes, train_est["moments"]) or train_est["moment"]
        at_moment = train_est["moments"][moment]
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
            peak_region=where.get(phase, ""), measured=measured, measured_total=sum(measured.values()),
            measured_activation_side=(train["activations"] + train["temporaries"]) / GIB,
            measured_train_total=sum(shard(train, z, ws, m.params, m.trainable_params).values()) / GIB,
            estimate={**est, "phase": est_phase}, estimate_executed=est["total"] - est["buffers"] - est["overhead"],
            estimate_activation_side=at_moment["activations"] + at_moment["kv_cache"] + at_moment["logits"],
            estimate_moment=moment,
            estimate_train_executed=train_est["total"] - train_est["buffers"] - train_est["overhead"],
            deepspeed_model_states=None if ds is None else ds / GIB,
            measured_model_states=measured["weights"] + measured["gradients"] + measured["optimizer"]
            - (gathered_bytes(phases[phase], z, m.params) + phases[phase]["gradient_sums"]) / GIB,
            gradient_sums=phases[phase]["gradient_sums"] / GIB,
            step_tflop=step_flops / 1e12, model_tflop=model_flops / 1e12, step_s=step_s,
            tokens_per_s=samples * recipe.data.max_seq_len / step_s, zero3_floor_s=floor))
    return rows
