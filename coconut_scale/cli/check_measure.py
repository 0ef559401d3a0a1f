"""`coconut-scale check --measure`: the recipe's step executed on fake tensors, beside the estimate, per world size.

The measurement is config/measured_memory.py's (the model and batches: config/fake_model.py; the run:
config/fake_step.py); this module prints it and names what fails:
  - the measured peak per GPU plus what fake tensors cannot see (DeepSpeed's buffers as config/memory.py counts
    them, and ALLOWANCE_GIB for the CUDA context and the allocator: docs/memory.md) above the GPU memory;
  - the estimate (config/memory.py) outside its tolerance of the measurement (measured_memory.TOLERANCE).
"""

from __future__ import annotations

from coconut_scale.config.measured_memory import (LINEAR_RESIDUAL, TOLERANCE, RecipeMeasurement, WorldSizeRow, measure_recipe,
                                                  micro_batches, peak_region, world_size_rows)
from coconut_scale.config.memory import GIB, OVERHEAD_GIB
from coconut_scale.train.strategy import deepspeed_model_state_estimate

# What a GPU holds beyond the tensors (the CUDA context with NCCL and cuBLAS, allocator rounding and
# fragmentation): the estimate's own allowance for them, derived in docs/memory.md.
ALLOWANCE_GIB = OVERHEAD_GIB


def _row_cells(r: WorldSizeRow, scale: float = 1.0) -> list[str]:
    m = {k: v * scale for k, v in r.measured.items()}
    g = lambda x: f"{x * scale:.1f}"  # noqa: E731
    ds = "-" if r.deepspeed_model_states is None else g(r.deepspeed_model_states)
    floor = "-" if r.zero3_floor_s is None else f"{r.zero3_floor_s:.1f}"
    return [str(r.world_size), str(r.micro_batch), str(r.grad_accum), str(r.zero_stage),
            *(f"{m[k]:.1f}" for k in ("weights", "gradients", "optimizer", "activations", "temporaries")),
            g(r.measured_total), r.peak_phase.split()[0], g(r.estimate_executed), f"{r.total_error:+.0%}",
            g(r.measured_activation_side), g(r.estimate_activation_side), f"{r.activation_error:+.0%}",
            g(r.measured_model_states), ds, f"{r.step_tflop:.0f}", f"{r.step_s:.2f}", f"{r.tokens_per_s:,.0f}",
            floor]


HEADER = ["GPUs", "micro", "accum", "ZeRO", "weights", "grads", "optim", "activ", "temp", "peak", "phase", "est",
          "err", "act", "est act", "err", "states", "DS states", "TFLOP/step", "step s", "tok/s/GPU", "ZeRO-3 floor s"]


def format_rows(rows: list[WorldSizeRow], scale: float = 1.0) -> str:
    lines = [HEADER, *(_row_cells(r, scale) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _unit(rows: list[WorldSizeRow]) -> tuple[str, float]:
    """GiB, or MiB for a model whose every figure would print as 0.0 GiB (the tiny CPU recipes)."""
    return ("GiB", 1.0) if not rows or max(r.measured_total for r in rows) >= 1.0 else ("MiB", 1024.0)


def describe(recipe, m: RecipeMeasurement, rows: list[WorldSizeRow]) -> list[str]:
    """The report's lines: how it was measured (the layer fit and its check), the table, the per-layer slope, where
    the evaluation batches peak."""
    if m.layer_counts != [m.layers]:
        fitted = (f"at {', '.join(map(str, m.layer_counts))} decoder layers, every region of the step fitted on a line "
                  f"to its {m.layers} (largest residual {m.fit_residual:.2%})")
        if m.check_layers:
            fitted += f"; the fit checked by a run at {m.check_layers} layers: within {m.check_error:.2%}"
    elif m.check_layers:
        fitted = (f"at its {m.layers} decoder layers (the fit at {', '.join(map(str, m.fitted_layer_counts))} layers "
                  f"missed a run at {m.check_layers} by {m.check_error:.2%}, more than the {LINEAR_RESIDUAL:.0%} "
                  f"allowed)")
    else:
        fitted = f"at its {m.layers} decoder layers"
    unit, scale = _unit(rows)
    out = [f"measured on fake tensors: the training model {fitted}, {m.passes} passes per micro step, "
           f"{m.params / 1e9:.2f}B parameters ({m.trainable_params / 1e6:.1f}M trainable); {m.seconds:.0f} s",
           f"{unit} per GPU: the measured peak split at its phase (forward+backward, optimizer step, validation or "
           "generation), the estimate without what fake tensors cannot see (buffers, overhead) and its error; the "
           "activation side of forward+backward (act: activations + temporaries; est act: activations + kv + logits); "
           "model states (measured weights partition + gradients + optimizer vs DeepSpeed's estimate); time at 40% "
           "MFU of an H100/H200 dense peak (ZeRO-3 adds the floor: per-module hook cost, H200-measured)",
           format_rows(rows, scale)]
    slopes = ", ".join(f"micro {k}: {v / 2**20:.1f}" for k, v in sorted(m.activation_slope.items()))
    if m.layer_counts != [m.layers]:
        out.append(f"activations + temporaries per decoder layer at the largest region, MiB: {slopes}")
    for name, regions in (("generation", m.generation), ("validation", m.validation)):
        where = peak_region(regions)
        g = regions[where]
        batch = (f"{recipe.batch.eval_batch_size} x {recipe.eval.max_new_tokens} new tokens, KV cache"
                 if name == "generation" else f"{recipe.batch.eval_batch_size} rows, forward only")
        out.append(f"{name} batch ({batch}): activations {g['activations'] / GIB * scale:.2f} {unit}, temporaries "
                   f"{g['temporaries'] / GIB * scale:.2f} {unit}, at {where}")
    return out


def measure_and_report(recipe, world_sizes, limit_gb: float, out=print, log=None) -> list[str]:
    """Measure, print, and return the failures (empty: every world size fits and the estimate holds)."""
    world_sizes = world_sizes or recipe.batch.world_sizes
    micros = micro_batches(recipe, world_sizes)
    if not micros:
        return [f"{recipe.name}: no world size has a batch plan to measure"]
    m = measure_recipe(recipe, micros.values(), log=log)
    rows = world_size_rows(recipe, m, world_sizes,
                           lambda params, largest, ws, stage: states_estimate(recipe, m, ws, stage))
    for line in describe(recipe, m, rows):
        out(line)
    failures = []
    for r in rows:
        unseen = r.estimate["buffers"] + ALLOWANCE_GIB
        if r.measured_total + unseen > limit_gb:
            failures.append(f"{recipe.name} at {r.world_size} GPU(s), micro {r.micro_batch}: measured "
                            f"{r.measured_total:.1f} GiB + {unseen:.1f} unseen (DeepSpeed's buffers "
                            f"{r.estimate['buffers']:.1f}, allowance {ALLOWANCE_GIB:g}) > {limit_gb:g} GiB")
        if not r.within_tolerance():
            failures.append(
                f"{recipe.name} at {r.world_size} GPU(s): the estimate is outside its tolerance of the measurement "
                f"(activation side {r.activation_error:+.0%}, allowed +-{TOLERANCE['activation_side']:.0%}; total "
                f"{r.total_error:+.0%}, allowed -{TOLERANCE['total_below']:.0%}..+{TOLERANCE['total_above']:.0%}): "
                f"fix config/memory.py's model")
    for f in failures:
        out(f"FAIL {f}")
    return failures


def states_estimate(recipe, m: RecipeMeasurement, world_size: int, stage: int) -> float:
    """DeepSpeed's estimate of the model states per GPU (bytes). Its formula assumes every parameter trains; for
    LoRA it is applied to the trainable parameters and the frozen 16-bit weights are added (sharded under ZeRO-3)."""
    if not recipe.lora.enabled:
        return deepspeed_model_state_estimate(m.params, m.largest_module_params, world_size, stage)
    b = 4 if recipe.model.dtype == "fp32" else 2
    frozen = (m.params - m.trainable_params) * b / (world_size if stage == 3 else 1)
    return deepspeed_model_state_estimate(m.trainable_params, m.largest_module_params, world_size, stage) + frozen
