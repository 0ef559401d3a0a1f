"""The memory a recipe needs per GPU, by component, and the single changes that would make it fit.

The memory model (bytes per GPU; b = 2 for bf16/fp16, 4 for fp32; P = all parameters, P_t = trainable ones
(LoRA adapters, or P), W = world size, B = micro batch, T = data.max_seq_len, L = layers, h = hidden,
q/kv = query/key-value widths, I = MLP width, V = vocab, n = latent passes = c_thought*max_latent_stage + 1):

  weights      (P_frozen + P_t) * b, / W under ZeRO-3, 0 with parameter offload. A LoRA base is frozen in the
               model dtype (16-bit for the bf16 recipes) and never gets gradients or optimizer states.
  gradients    P_t * b (DeepSpeed accumulates in the model dtype), / W from ZeRO-2, 0 with optimizer offload.
  optimizer    P_t * (8 + 4): fp32 Adam m and v, plus the fp32 master copy when training in 16 bits;
               / W from ZeRO-1, 0 with optimizer offload (then it is host memory, reported separately).
  gathered     ZeRO-3's working set of all-gathered weights: min(P, stage3_max_live_parameters) * b. The
               configs keep up to 1e9 resident so the n latent passes do not re-gather each layer.
  activations  Coconut runs n base-model calls per step, but on consecutive column ranges of the sequence
               with the keys/values of earlier passes carried in a cache (coconut_scale/model/coconut.py), so the
               passes together cover T tokens once.
               With checkpointing: each layer keeps only its input, per pass, for that pass's tokens:
               (L + 1) * B*T*h*b in total (+1: the embeddings), plus one layer's full activations while it is
               recomputed in backward: B*T*b*(4h + 3q + 4kv + 4I) (norm inputs/outputs, q, rotated q,
               attention output, k, rotated k, v, the concatenated past keys, gate, up, act(gate), product),
               plus 2*B*heads*T*T*b for eager attention's scores and probabilities (sdpa/flash keep none).
               Without checkpointing: L full layers, plus every later pass re-materialising the concatenated
               past keys/values inside attention: 2*L*B*T*kv*b*(n - 1).
  kv_cache     the keys/values carried across passes: 2*L*B*T*kv*b.
  logits       ceil(B*(T-1)/K)*V*(b + 12) + 2*B*T*h*b: the training loss is computed in K = 8 token chunks
               (model/chunked_loss.py), so only one chunk's logits exist at a time: in the model dtype, the fp32
               log-softmax cross-entropy saves, and the fp32 gradient and input gradient during backward. The second
               term is the final hidden states of all passes, concatenated, and their shifted copy. Unchunked
               (B*T*V*(b + 12)) it would be the largest activation at big vocabularies (Llama-3: 128k, Qwen3: 152k).
               A trainable head that ZeRO-3 does not partition takes the fused path, which holds the head's
               gradient in fp32 from forward to backward: + V*h*4.
  buffers      DeepSpeed communication buckets: ZeRO-2/3: 2 * reduce_bucket_size * b (overlap_comm double
               buffer), + stage3_prefetch_bucket_size * b; ZeRO-0/1 with W > 1: min(5e8, P_t) * b.
  overhead     2.5 GiB: CUDA context, NCCL, cuBLAS workspaces, allocator fragmentation.

Step supervision (coconut.step_supervision, SIM-CoT) with a separate decoder (`pretrained`/`copy`) adds a second
model of the base's shape: its parameters join P and P_t above (LoRA: frozen, with its own adapters), so weights,
gradients, optimizer and the gathered set grow with it. Whatever the decoder (`shared` too), its one batched call
reads at most the tokens of the rows (the replaced steps, plus c_thought thoughts and an EOS per step), so its
activations and its labelled-token logits are bounded by one more base-model pass over B*T tokens: the checkpointed
layer inputs (L + 1) * B*T*h*b (L * layer_full without checkpointing) and B*T*V*(b + 12).

CODI (`method: codi`) runs n = num_latent + 1 student passes and one teacher pass of the same weights over the
teacher sequence (question + CoT + answer, at most T tokens), without a cache: the teacher adds one more pass's
activations over B*T tokens (its checkpointed layer inputs (L + 1) * B*T*h*b, which are also the hidden states the
distillation reads; L * layer_full without checkpointing) and its own chunked-loss logits (the chunk term above).
Its projection, 2*h*prj_dim + prj_dim + h parameters (+ 2h for the LayerNorm), is always trained: it joins P and
P_t. SIM-CoT on CODI adds its decoder as above, except that under LoRA the decoder is trained in full (their code
never wraps it): its parameters join P_t whole.

These are estimates (+-20%): they bound what the recipe needs, they do not replace a first real step.
"""

from __future__ import annotations

import math

from coconut_scale.config.batch_plan import resolve_batch
from coconut_scale.config.ds_config import build_ds_config, zero_settings
from coconut_scale.config.model_shape import recipe_shape
from coconut_scale.model.chunked_loss import DEFAULT_LOSS_CHUNKS
from coconut_scale.model.shapes import dims, lora_param_count, param_count

GIB = 1024**3
OVERHEAD_GIB = 2.5
GPU_COMPONENTS = ("weights", "gradients", "optimizer", "gathered", "activations", "kv_cache", "logits", "buffers",
                  "overhead")


def step_decoder_is_separate(recipe) -> bool:
    """Whether step supervision holds a second model (a decoder copy) beside the base."""
    step = recipe.coconut.step_supervision
    return step.enabled and step.decoder != "shared"


def codi_projection_params(recipe, hidden: int) -> int:
    """CODI's projection: Linear(h, prj_dim), Linear(prj_dim, h), LayerNorm(h) (0 without use_prj)."""
    c = recipe.codi
    if not c.use_prj:
        return 0
    return 2 * hidden * c.prj_dim + c.prj_dim + hidden + (0 if c.prj_no_ln else 2 * hidden)


def trainable_params(recipe, shape: dict) -> int:
    """Parameters the optimizer updates: the LoRA adapters, or every parameter."""
    if recipe.lora.enabled:
        return lora_param_count(shape, recipe.lora.rank, recipe.lora_targets())
    return param_count(shape)


def estimate_memory(recipe, world_size: int, *, shape: dict | None = None, ds_config: dict | None = None) -> dict[str, float]:
    """GiB per GPU for each component of GPU_COMPONENTS, "total" (their sum) and "host_offload" (CPU RAM per
    rank for offloaded state, not in the total). See the module docstring for every formula."""
    shape = shape or recipe_shape(recipe)
    d = dims(shape)
    plan = resolve_batch(recipe.batch, world_size, recipe.data.max_seq_len)
    ds_config = ds_config or build_ds_config(recipe, plan, d.hidden)
    z = zero_settings(ds_config)
    stage, W = z["stage"], world_size
    b = 4 if recipe.model.dtype == "fp32" else 2

    copies = 2 if step_decoder_is_separate(recipe) else 1  # the base, and SIM-CoT's decoder when it is a copy
    codi = recipe.method == "codi"
    projection = codi_projection_params(recipe, dims(shape).hidden) if codi else 0
    P = param_count(shape) * copies + projection
    P_t = trainable_params(recipe, shape) * copies + projection
    if codi and copies == 2 and recipe.lora.enabled:  # SIM-CoT's CODI decoder: trained in full, never LoRA-wrapped
        P_t = trainable_params(recipe, shape) + param_count(shape) + projection
    # the frozen base (the projection always trains; so does SIM-CoT's CODI decoder)
    P_frozen = (P - projection - (param_count(shape) if codi and copies == 2 else 0)) if recipe.lora.enabled else 0
    opt_bytes = 8 + (4 if b < 4 else 0)

    weights = (P_frozen + P_t) * b / (W if stage == 3 else 1)
    gradients = P_t * b / (W if stage >= 2 else 1)
    optimizer = P_t * opt_bytes / (W if stage >= 1 else 1)
    host = 0.0
    if stage == 3 and z["offload_param"]:
        host += weights
        weights = 0.0
    if z["offload_optimizer"]:
        host += gradients + optimizer
        gradients = optimizer = 0.0
    adapters = trainable_params(recipe, shape) * (1 if codi else copies)
    in_model = P + (adapters if recipe.lora.enabled else 0)  # LoRA adds its adapters to the base
    gathered = min(in_model, z["max_live_parameters"]) * b if stage == 3 else 0.0

    B, T = plan.micro_batch_size, recipe.data.max_seq_len
    L, h, q, kv, I = d.layers, d.hidden, d.q_dim, d.kv_dim, d.intermediate
    n = recipe.codi.num_latent + 1 if codi else recipe.coconut.max_passes
    layer_full = B * T * b * (4 * h + 3 * q + 4 * kv + 4 * I)
    if recipe.model.attn_implementation == "eager":
        layer_full += 2 * B * d.heads * T * T * b
    if recipe.model.gradient_checkpointing:
        activations = (L + 1) * B * T * h * b + layer_full
    else:
        activations = L * layer_full + 2 * L * B * T * kv * b * (n - 1)
    kv_cache = 2 * L * B * T * kv * b
    logits = math.ceil(B * (T - 1) / DEFAULT_LOSS_CHUNKS) * d.vocab * (b + 12) + 2 * B * T * h * b
    if stage < 3 and not recipe.lora.enabled:  # a trainable, unpartitioned head: the fused loss's fp32 d(lm_head)
        logits += d.vocab * h * 4
    if recipe.coconut.step_supervision.enabled:  # the decoder's one call: at most one more pass over B*T tokens
        activations += (L + 1) * B * T * h * b if recipe.model.gradient_checkpointing else L * layer_full
        logits += B * T * d.vocab * (b + 12)  # its labelled positions' logits, unchunked
    if codi:  # the teacher pass: one more pass over B*T tokens, and its chunked CE
        activations += (L + 1) * B * T * h * b if recipe.model.gradient_checkpointing else L * layer_full
        logits += math.ceil(B * (T - 1) / DEFAULT_LOSS_CHUNKS) * d.vocab * (b + 12) + B * T * h * b

    if stage >= 2:
        buffers = 2 * z["reduce_bucket_size"] * b + (z["prefetch_bucket_size"] * b if stage == 3 else 0)
    else:
        buffers = min(5e8, P_t) * b if W > 1 else 0.0

    out = {
        "weights": weights, "gradients": gradients, "optimizer": optimizer, "gathered": gathered,
        "activations": activations, "kv_cache": kv_cache, "logits": logits, "buffers": buffers,
    }
    out = {k: v / GIB for k, v in out.items()}
    out["overhead"] = OVERHEAD_GIB
    out["total"] = sum(out[k] for k in GPU_COMPONENTS)
    out["host_offload"] = host / GIB
    return out


# --- what to change when it does not fit ---------------------------------------------------------------


def _variant(recipe, edit):
    r = recipe.model_copy(deep=True)
    edit(r)
    return r


def suggestions(recipe, world_size: int, limit_gb: float, shape: dict) -> list[str]:
    """Single changes that would bring the estimate under the limit, each with its estimate."""
    tries = []
    plan = resolve_batch(recipe.batch, world_size, recipe.data.max_seq_len)
    smaller = [m for m in range(plan.micro_batch_size - 1, 0, -1)
               if plan.global_batch_size % (m * world_size) == 0]
    for m in smaller:
        def edit(r, m=m):
            r.batch.micro_batch_per_world_size = {**r.batch.micro_batch_per_world_size, world_size: m}
        tries.append((f"batch.micro_batch_per_world_size.{world_size}={m} (smaller micro batch, more accumulation)", edit))
    if not recipe.model.gradient_checkpointing:
        tries.append(("model.gradient_checkpointing=true", lambda r: setattr(r.model, "gradient_checkpointing", True)))
    z = zero_settings(build_ds_config(recipe, plan, dims(shape).hidden))
    precision = "fp32" if recipe.model.dtype == "fp32" else "bf16"
    if z["stage"] < 3:
        cfg = f"ds_configs/zero3_{precision}.json"
        tries.append((f"deepspeed.config={cfg} (ZeRO-3 shards weights too)", lambda r: setattr(r.deepspeed, "config", cfg)))
    if not z["offload_param"] and recipe.model.dtype == "bf16":
        cfg_off = "ds_configs/zero3_offload_bf16.json"
        tries.append((f"deepspeed.config={cfg_off} (CPU offload: slow, needs host RAM)",
                      lambda r: setattr(r.deepspeed, "config", cfg_off)))
    if not recipe.lora.enabled:
        tries.append(("lora.enabled=true (train adapters only)", lambda r: setattr(r.lora, "enabled", True)))
    out, micro_listed = [], False
    for label, edit in tries:
        try:
            est = estimate_memory(_variant(recipe, edit), world_size, shape=shape)["total"]
        except ValueError:  # a UserError (batch math, DS config, LoRA targets): this variant cannot be built
            continue
        if est <= limit_gb:
            if label.startswith("batch.") and micro_listed:
                continue  # only the largest micro batch that fits
            micro_listed = micro_listed or label.startswith("batch.")
            out.append(f"{label}: ~{est:.1f} GiB")
    return out
