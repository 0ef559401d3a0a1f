"""The memory a recipe needs per GPU, by component and phase, and the single changes that would make it fit.

Held to a measurement: `coconut-scale check --measure` executes the recipe's exact step on fake tensors and the
figures here must stay within measured_memory.TOLERANCE of it at every shipped recipe and world size
(docs/memory.md has the table, tests/config/test_fake_measure.py the CI check). What fake tensors cannot see
(DeepSpeed's buffers, the CUDA context, allocator fragmentation) is the `buffers` and `overhead` rows.

Symbols (bytes per GPU): b = 2 for bf16/fp16, 4 for fp32; P = all parameters, P_t = trainable ones (the LoRA
adapters and the three Coconut token rows, or P), W = world size, B = micro batch, T = data.max_seq_len,
L = layers, h = hidden, q / kv = query / key-value widths, I = MLP width, V = vocab, n = latent passes
(c_thought * max_latent_stage + 1). Rows are laid out as `check --measure` builds them (ROW_LAYOUT): the question
takes a quarter of the row, so the first pass is w0 = T/4 + 1 columns, the n - 2 latent passes one column each
and the last pass Tl = T - w0 - (n - 2) columns (one pass of T columns without latents).

Model states (every phase):
  weights      (P_frozen + P_t) * b, / W under ZeRO-3 (0 with parameter offload); a LoRA base is frozen in b.
  gathered     ZeRO-3's working set of all-gathered weights: min(P, stage3_max_live_parameters) * b.
  optimizer    P_t * (8 + 4): fp32 Adam moments, plus the fp32 master copy when training in 16 bits; / W from
               ZeRO-1 (0 with optimizer offload). The optimizer step adds its fp32 copy of the gradients: P_t * 4
               per partition (ZeRO-3: of sub_group_size parameters at a time).
  gradients    a parameter's gradient exists twice over in a Coconut step. While backward runs, a weight that
               every latent pass uses (every decoder weight, LoRA's adapters) collects one contribution per pass,
               and the autograd engine sums them before the weight's gradient hook runs: until then the sum is
               a "gradient sum", whole on every GPU whatever the ZeRO stage (DeepSpeed reduces and shards a
               gradient only from that hook on). The last pass is backpropagated first and the first pass last,
               so every layer's sum exists from the moment the last pass's backward reaches it until the first
               pass's backward does: at the end of backward they are P_layers_t * b on every GPU. Once whole, a
               gradient is a `.grad`: / W from ZeRO-2 (0 with optimizer offload).

Activations of a checkpointed step (per-layer non-reentrant checkpointing, model/activation_checkpointing.py),
per GPU, at each moment the peak can sit (the largest is the step's):
  kept through backward   the embeddings (B*T*h*b) and the latent-filled chunks of the passes after the first
               (B*(T - w0)*h*b); each layer's checkpointed input, i.e. the previous layer's output, per wide
               pass ((L - 1) * B*cols*h*b); for the one-column passes, not recomputed below ZeRO-3
               (model/column_pass.py), what each layer's forward saves (L * B * LAYER_SAVED per pass; their
               keys/values are the cache's) and their attention mask; the final norm's fp32 input (B*cols*h*4);
               and the keys/values every layer records in every pass (kv_cache: 2*L*B*T*kv*b, model/kv_cache.py).
  top          backward of the last pass at its top layer: all of the above, that layer recomputed (R, below)
               and the loss's output gradients (B*T*h*b + B*Tl*h*b).
  bottom       the same pass at its bottom layer: the last pass's layer inputs above it are gone, replaced by
               each layer's gradient of the keys/values it attended to ((L - 1) * 2*B*T*kv*b), and the gradient
               sums of the L - 1 layers above (a gradient of n = 1 is a `.grad` already).
  next pass    the pass before the last (n > 2) begins its backward: a one-column pass rebuilds its top layer's
               keys/values from the cache's chunks (2*B*(T - Tl)*kv*b), a wide one recomputes the layer.
  end          the first pass's backward (n > 1): what that pass kept, and every layer's gradient sum.
  anchor       the one-column passes' weight gradients (model/deferred_grad.py; n > 2, below ZeRO-3): made at once,
               over all those passes, when backward reaches the first pass's hidden states, beside every layer's
               gradient sum (2 * L * g_layer of sums), with what the first pass kept (its recompute not begun).
  loss         the chunked loss (model/chunked_loss.py, K = 8 chunks of N = B*(T - 1) rows): the passes' final
               hidden states, concatenated and flattened (2*B*T*h*b), and one chunk's logits in b and fp32 with
               the cross-entropy's fp32 work (ceil(N/K) * V * (b + 12)); a trainable head called as a module
               (ZeRO-3) sums K gradients of V*h*b (3 * V*h*b at once), the fused sweep (ZeRO 0-2) holds an fp32
               one (V*h*4) from forward to backward, and its backward scales it into a second one.
  R            one decoder layer recomputed during backward: the tensors it saves for its own backward at the
               widest point of that backward, counted per token of the pass from the fake-tensor census of each
               layer kind (LAYER_TENSORS: hidden-, query-, key/value- and MLP-wide tensors, fp32 ones apart,
               LoRA's dropout copies and adapter outputs), plus the keys/values repeated to every query head over
               the T columns (2*B*T*q*b when kv < q, else their concatenation 2*B*T*kv*b), the attention mask
               (B*Tl*T*(b + 1)) and, with eager attention, its scores and probabilities (2*B*heads*Tl*T*b); with full
               fine-tuning, at the layer's end, its own gradient sums instead of its MLP activations.
  Without checkpointing every layer keeps what R counts, for every pass, and attention re-materialises the
  concatenated past keys/values in every pass after the first.
Step supervision (SIM-CoT) adds its decoder's one batched call over B * max_latent_stage (row, step) pairs of
ROW_LAYOUT's step length: one more checkpointed pass of those tokens (with its hidden states, which the decoder
returns) and its chunked weighted loss; a decoder copy (`pretrained`/`copy`) adds a second model's states. Its
loss is the last computed, so it is backpropagated first: a copy trained in full peaks at its head's backward
(the head's gradient summed over the chunks), and its gradients are finished .grad through every later moment.
CODI (`method: codi`): the student row is question <bot> num_latent latents <eot> answer (num_latent + 1 passes);
the teacher pass (model/codi.py) runs the same weights over data.max_seq_len columns without a cache after the
student's. At the loss it keeps its layer inputs beside everything the student's passes keep, and its chunked loss
follows the student's; it is backpropagated first ("teacher": its top layer recomputed over the whole row;
"teacher bottom": its bottom layer, the layer inputs above gone and their weights' gradient sums there), so
the student's backward begins with every layer's gradient sum. Its projection always trains. SIM-CoT on CODI:
one (row, thought) pair per z_0..z_num_latent, the teacher's CoT cut into that many steps; the decoder copy trained
in full, LoRA or not.

Evaluation at batch.eval_batch_size rows E (no gradients; the model states above, without gradients):
  validation   a forward with the loss: the keys/values of every pass while the passes run, one layer's
               forward work; then the hidden states and one chunk's logits (ceil(E*(T-1)/K) * V * (b + 8)).
  generation   prompt passes, then eval.max_new_tokens decoding steps: the keys/values of T columns
               (2*L*E*T*kv*b), one layer's copy while the cache is merged, and the last position's logits.

  buffers      not seen by fake tensors: DeepSpeed's communication buckets (ZeRO-2/3: 2 * reduce_bucket_size * b,
               + stage3_prefetch_bucket_size * b; ZeRO-0/1 with W > 1: min(5e8, P_t) * b) and the gradient
               partition it keeps between steps (ZeRO-2/3: P_t * b / W; ZeRO-0/1 in 16 bits: P_t * 4).
  overhead     2.5 GiB: CUDA context, NCCL, cuBLAS workspaces, allocator fragmentation (docs/memory.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coconut_scale.config.batch_plan import resolve_batch
from coconut_scale.config.ds_config import build_ds_config, zero_settings
from coconut_scale.config.model_shape import recipe_shape
from coconut_scale.model.chunked_loss import DEFAULT_LOSS_CHUNKS
from coconut_scale.model.shapes import dims, linear_shapes, lora_param_count, param_count

GIB = 1024**3
OVERHEAD_GIB = 2.5
GPU_COMPONENTS = ("weights", "gradients", "optimizer", "gathered", "activations", "kv_cache", "logits", "buffers",
                  "overhead")
PHASES = ("train", "optimizer step", "validation", "generation")


@dataclass(frozen=True)
class RowLayout:
    """The rows the estimate assumes and `check --measure` builds (config/fake_model.py): the question a quarter
    of data.max_seq_len, each replaced reasoning step `step_tokens` long, an answer of `answer_tokens` and EOS,
    SIM-CoT's step prompt `prompt_tokens`."""

    question_share: float = 0.25
    step_tokens: int = 16  # a replaced reasoning step (GSM8K-Aug's "<<3*4=12>>" steps are 8-12 tokens)
    answer_tokens: int = 8  # "### 1234" before the EOS
    prompt_tokens: int = 6  # SIM-CoT's optional step prompt ("Step {k} of the solution")

    def question(self, max_seq_len: int) -> int:
        return max(int(max_seq_len * self.question_share), 1)


ROW_LAYOUT = RowLayout()

# Tensors one decoder layer keeps while its recompute is backpropagated, at the widest point of that backward, per
# token of the pass, in units of the layer's widths: h (hidden), q (query heads x head_dim), kv, I (MLP); "*_f32"
# in fp32 whatever the model dtype (RMSNorm's and Qwen3's q/k-norm's upcast inputs; none when the model is fp32).
# Read off the fake-tensor census of the recomputed top layer (docs/memory.md, "What one layer keeps").
#   full: the MLP's backward; its weights' gradient sums of the MLP are counted apart (gradients).
#   lora: every projection also keeps its adapter input and the base + adapter sum; with lora.dropout > 0 each
#         adapter keeps its dropped-out input too (peft applies the dropout per adapter).
LAYER_TENSORS = {
    ("llama", "full"): {"h": 4, "q": 2, "I": 6, "h_f32": 2},
    ("llama", "lora"): {"h": 3, "q": 2, "I": 6, "h_f32": 2},
    ("llama", "lora_dropout"): {"h": 14, "q": 4, "I": 6, "h_f32": 2},
    ("gpt2", "full"): {"h": 8, "I": 7},
    ("gpt2", "lora"): {"h": 8, "I": 7},
    ("gpt2", "lora_dropout"): {"h": 12, "I": 8},
}
QK_NORM_TENSORS = {"q": 1, "kv": 1, "q_f32": 1, "kv_f32": 1}  # Qwen3's per-head q_norm / k_norm
# Without checkpointing, what each layer's forward saves for its backward, per token (the census of a forward):
# the norms' outputs and the residual sums, the rotated queries and attention's output, SwiGLU's gate, up, act and
# product (LoRA's adapter outputs are added apart). Layer kinds not listed: LAYER_TENSORS less LAYER_TEMPORARIES.
LAYER_SAVED = {("llama", "lora"): {"h": 4, "q": 2, "I": 4, "h_f32": 2}, ("llama", "full"): {"h": 4, "q": 2, "I": 4, "h_f32": 2}}
# Of those, what only the layer being backpropagated holds (its gradients' temporaries): without checkpointing
# every layer keeps the rest from forward to backward.
LAYER_TEMPORARIES = {"llama": {"h": 1, "I": 3}, "gpt2": {"h": 1, "I": 3}}
# The same layer at the end of its backward (full fine-tuning): its activations mostly gone, all its weights'
# gradient sums there.
LAYER_END_TENSORS = {"llama": {"h": 1, "h_f32": 6}, "gpt2": {"h": 2, "I": 2}}


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


def pass_widths(recipe, max_seq_len: int | None = None) -> list[int]:
    """Columns of each pass of a training row laid out as ROW_LAYOUT, at the largest stage."""
    from coconut_scale.data.curriculum import CurriculumConfig

    T = max_seq_len or recipe.data.max_seq_len
    q = ROW_LAYOUT.question(T)
    if recipe.method == "codi":  # question <bot> latents <eot> answer <eos> (the teacher's row is T long)
        n = recipe.codi.num_latent + 1
        return [q + 1] + [1] * (n - 2) + [1 + 1 + ROW_LAYOUT.answer_tokens + 1]
    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    n = cfg.max_passes if recipe.coconut.mode == "coconut" else 1
    if n <= 1:
        return [T]
    w0 = q + 1  # the question and <|start-latent|>
    return [w0] + [1] * (n - 2) + [T - w0 - (n - 2)]


def _family(model_type: str) -> str:
    return "gpt2" if model_type == "gpt2" else "llama"


def _lora_kind(recipe) -> str:
    if not recipe.lora.enabled:
        return "full"
    return "lora_dropout" if recipe.lora.dropout > 0 else "lora"


def layer_tokens_bytes(recipe, d, b: int, kind: str | None = None, table=None) -> float:
    """Bytes per token of one layer's kept tensors (LAYER_TENSORS, or `table`)."""
    fam = _family(d.model_type)
    t = dict(table if table is not None else LAYER_TENSORS[(fam, kind or _lora_kind(recipe))])
    if d.model_type == "qwen3" and table is None:
        for k, v in QK_NORM_TENSORS.items():
            t[k] = t.get(k, 0) + v
    width = {"h": d.hidden, "q": d.q_dim, "kv": d.kv_dim, "I": d.intermediate}
    f32 = 4 if b < 4 else 0  # an fp32 model upcasts nothing
    total = sum(v * width[k] * b for k, v in t.items() if not k.endswith("_f32"))
    total += sum(v * width[k[:-4]] * f32 for k, v in t.items() if k.endswith("_f32"))
    if recipe.lora.enabled and table is None:
        targets = len(recipe.lora_targets())
        total += targets * recipe.lora.rank * b  # each adapter's A output
    return total


def _layer_params(shape: dict, d) -> float:
    """One decoder layer's parameters, and of those its MLP's."""
    lin = linear_shapes(shape)
    per_layer = sum(i * o for mods in lin.values() for i, o in mods)
    mlp = d.hidden * d.intermediate * (3 if _family(d.model_type) == "llama" else 2)
    return per_layer, mlp


def _gib(parts: dict[str, float]) -> dict[str, float]:
    return {k: v / GIB for k, v in parts.items()}


def estimate_phases(recipe, world_size: int, *, shape: dict | None = None,
                    ds_config: dict | None = None) -> dict[str, dict[str, float]]:
    """GiB per GPU of each component of GPU_COMPONENTS, "total", "host_offload" and "moment" (where in the phase
    the peak is, an index into the phase's candidate moments is not kept: see `moments`) for each of PHASES.
    Formulas: the module docstring."""
    shape = shape or recipe_shape(recipe)
    d = dims(shape)
    plan = resolve_batch(recipe.batch, world_size, recipe.data.max_seq_len)
    ds_config = ds_config or build_ds_config(recipe, plan, d.hidden)
    z = zero_settings(ds_config)
    stage, W = z["stage"], world_size
    b = 4 if recipe.model.dtype == "fp32" else 2
    lora = recipe.lora.enabled

    copies = 2 if step_decoder_is_separate(recipe) else 1  # the base, and SIM-CoT's decoder when it is a copy
    codi = recipe.method == "codi"
    projection = codi_projection_params(recipe, d.hidden) if codi else 0  # always trained
    P1, Pt1 = param_count(shape), trainable_params(recipe, shape)
    P, P_t = P1 * copies + projection, Pt1 * copies + projection
    if codi and copies == 2 and lora:  # SIM-CoT's CODI decoder: trained in full, never LoRA-wrapped
        P_t = Pt1 + P1 + projection
    # the frozen base (the projection always trains; so does SIM-CoT's CODI decoder)
    P_frozen = (P - projection - (P1 if codi and copies == 2 else 0)) if lora else 0
    opt_bytes = 8 + (4 if b < 4 else 0)
    shard_weights = W if stage == 3 else 1
    shard_grads = W if stage >= 2 else 1
    shard_opt = W if stage >= 1 else 1

    weights = (P_frozen + P_t) * b / shard_weights
    optimizer = P_t * opt_bytes / shard_opt
    all_grads = P_t * b / shard_grads
    host = 0.0
    if stage == 3 and z["offload_param"]:
        host += weights
        weights = 0.0
    if z["offload_optimizer"]:
        host += all_grads + optimizer
        all_grads = optimizer = 0.0
    grad_scale = 0.0 if z["offload_optimizer"] else 1.0 / shard_grads  # a finished .grad per GPU, per byte
    in_model = P + (Pt1 * (1 if codi else copies) if lora else 0)  # LoRA adds its adapters to the base
    gathered = min(in_model, z["max_live_parameters"]) * b if stage == 3 else 0.0
    states = {"weights": weights, "optimizer": optimizer, "gathered": gathered}

    # DeepSpeed's buffers: communication buckets and the gradient partition kept between steps.
    if stage >= 2:
        buffers = 2 * z["reduce_bucket_size"] * b + (z["prefetch_bucket_size"] * b if stage == 3 else 0)
        buffers += all_grads
    else:
        buffers = min(5e8, P_t) * b if W > 1 else 0.0
        buffers += P_t * 4 if b < 4 and not z["offload_optimizer"] else 0.0

    widths = pass_widths(recipe)
    # T: the student's row (a CODI student row is shorter than data.max_seq_len, its teacher's row as long)
    B, T, L, h, q, kv, I, V = (plan.micro_batch_size, sum(widths), d.layers, d.hidden, d.q_dim, d.kv_dim,
                              d.intermediate, d.vocab)
    n, w0, Tl = len(widths), widths[0], widths[-1]
    Te = T - Tl
    K = DEFAULT_LOSS_CHUNKS
    per_layer, mlp_params = _layer_params(shape, d)
    layer_t = (lora_param_count(shape, recipe.lora.rank, recipe.lora_targets()) / L) if lora else per_layer
    g_layer = layer_t * b  # one layer's trainable weights' gradient, in the model dtype
    head_trainable = not lora
    head = V * h * b if head_trainable else 0.0  # its .grad once the loss's backward is done
    emb_grad = 0.0 if lora or d.tied else 0.0  # the embedding's gradient comes at the very end (after the peak)
    fused_head = head_trainable and stage < 3  # model/chunked_loss.py: a plain, unpartitioned head
    gpt2 = d.model_type == "gpt2"
    lt = layer_tokens_bytes(recipe, d, b)

    def layer(rows: int, cols: int, seen: int = T) -> float:
        """R: one layer recomputed over `cols` columns of `rows` rows that attend to `seen` columns, what its
        backward keeps at its widest."""
        eager = 2 * rows * d.heads * cols * seen * b if recipe.model.attn_implementation == "eager" else 0.0
        # the keys/values over the columns seen: repeated to every query head (GQA), else their concatenation
        kv_seen = 2 * rows * seen * (q if kv < q else kv) * b
        return rows * cols * lt + kv_seen + rows * cols * seen * (b + 1) + eager  # eager: scores, probabilities

    # A tied, trainable head: its gradient from the loss waits for the embedding's, at the very end of backward.
    tied_sum = V * h * b if head_trainable and d.tied else 0.0

    # SIM-CoT's decoder copy is backpropagated first (its loss is the last computed): through the base's passes its
    # gradients are finished .grad (all of it when trained in full, else its adapters').
    decoder_grads = ((P1 if codi or not lora else Pt1) * b if copies == 2 else 0.0)

    def states_with(gsum: float = 0.0, grads: float = 0.0, in_backward: bool = True) -> dict[str, float]:
        if in_backward and tied_sum:  # a sum waiting for the embedding's contribution, not a .grad
            gsum, grads = gsum + tied_sum, max(grads - head, 0.0)
        if in_backward:
            grads += decoder_grads
        return {**states, "gradients": gsum + grads * grad_scale}

    def backward_logits(value: float) -> float:
        return value

    moments: dict[str, dict[str, float]] = {}
    Tt = recipe.data.max_seq_len  # CODI's teacher row

    def teacher_loss(moment: dict, kept: float, head_work: float) -> None:
        """CODI's loss moment: the teacher's chunked loss, after the student's, with what its pass keeps; one
        chunk's backward holds its logits and their gradient in b and both in fp32 (2b + 8 bytes each)."""
        moment["activations"] += kept
        moment["logits"] = (2 * B * T * h * b + 2 * B * Tt * h * b + math.ceil(B * (Tt - 1) / K) * V * (2 * b + 8)
                            + head_work)

    ckpt = recipe.model.gradient_checkpointing
    # model/deferred_grad.py: with three passes or more, the one-column passes' weight gradients are made once, at
    # the anchor (not under ZeRO-3, which partitions the weights)
    deferred = n > 2 and stage < 3 and any(w == 1 for w in widths[1:])
    if gpt2:  # what layer 0 reads is the embeddings' dropout (output and mask), made per pass inside the decoder
        emb, filled = 2 * B * T * h * b, 0.0
    else:  # the embeddings and the latent-filled chunks, layer 0's input
        emb, filled = B * T * h * b, (B * (T - w0) * h * b if n > 1 else 0.0)
    # The keys/values each layer records per pass: GPT-2's are views of its fused q/k/v projection, which stays.
    kv_token = 3 * h * b if gpt2 else 2 * kv * b
    kv_rec = L * B * T * kv_token
    outs = lambda cols: (L - 1) * B * cols * h * b  # noqa: E731 - each layer's output, the next one's input
    norm = lambda cols: B * cols * h * 4  # noqa: E731 - the final norm's fp32 input
    grad_out = B * T * h * b + B * Tl * h * b
    # Once the last pass's backward is done: the gradient of the concatenated hidden states and the embeddings'
    # gradient, which every pass's backward adds its columns to.
    d_embeds = 2 * B * T * h * b
    chunk = math.ceil(B * (T - 1) / K) * V * (b + 12)
    sums = n > 1  # gradients of weights that every pass uses are summed before they become .grad
    # What one layer's forward saves for its backward, per token (a layer that is not recomputed)
    saved = LAYER_SAVED.get((_family(d.model_type), _lora_kind(recipe)))
    temp_token = layer_tokens_bytes(recipe, d, b, table=LAYER_TEMPORARIES[_family(d.model_type)])
    saved_token = (layer_tokens_bytes(recipe, d, b, table=saved) + len(recipe.lora_targets()) * recipe.lora.rank
                   * b * recipe.lora.enabled if saved is not None else lt - temp_token)
    if ckpt:
        # The one-column latent passes are not recomputed below ZeRO-3 (model/column_pass.py): each layer keeps what
        # its forward saves for that column (its keys/values the cache's own chunks), each pass its attention mask.
        # `wide(c)`: the layer inputs the checkpointed passes keep over c of their columns, beside those.
        n1 = sum(1 for w in widths[1:-1] if w == 1) if stage < 3 else 0
        one_column = n1 * (L * B * saved_token + B * T * (b + 1))
        wide = lambda cols: outs(cols) + one_column  # noqa: E731
        R = layer(B, Tl)
        R_gsum = 0.0
        # A weight's next contribution, just computed, beside the sum it is about to join (full fine-tuning: the
        # largest projection's gradient).
        incoming = 0.0 if lora else max(i * o for mods in linear_shapes(shape).values() for i, o in mods) * b
        if not lora:  # full fine-tuning: the MLP's backward with the MLP weights' sums, or the layer's end
            mlp_first = mlp_params * b / (3 if _family(d.model_type) == "llama" else 2)  # down_proj / c_proj first
            end = B * Tl * layer_tokens_bytes(recipe, d, b, table=LAYER_END_TENSORS[_family(d.model_type)])
            if end + incoming + g_layer > R + mlp_first:
                R, R_gsum = end + incoming, g_layer
            else:
                R_gsum = mlp_first
        layer_sums = (lambda k: k * g_layer) if sums else (lambda k: 0.0)  # noqa: E731
        layer_grads = (lambda k: 0.0) if sums else (lambda k: k * g_layer)  # noqa: E731
        moments["top"] = {**states_with(R_gsum, head), "activations": emb + filled + wide(T - n1) + norm(Te) + R,
                          "kv_cache": kv_rec, "logits": backward_logits(grad_out)}
        moments["bottom"] = {**states_with(layer_sums(L - 1) + R_gsum, head + layer_grads(L - 1)),
                             "activations": emb + filled + wide(Te - n1) + norm(Te) + R
                             + ((L - 1) * 2 * B * T * kv * b if n > 1 else 0.0),
                             "kv_cache": kv_rec, "logits": backward_logits(grad_out)}
        if n > 1:
            moments["end"] = {**states_with(layer_sums(L), head),
                              "activations": emb + outs(w0) + norm(w0) + L * 2 * B * w0 * kv * b + layer(B, w0)
                              + incoming,
                              "kv_cache": L * B * w0 * kv_token, "logits": backward_logits(d_embeds)}
        if n > 2:  # the next pass's backward begins: every layer's gradient sum, the last pass's d(keys/values);
            # a one-column pass rebuilds its top layer's keys/values from the cache's chunks, a wide one recomputes it
            top_layer = 2 * B * Te * kv * b if widths[-2] == 1 else layer(B, widths[-2])
            moments["next pass"] = {**states_with(layer_sums(L), head),
                                    "activations": emb + filled + wide(Te - n1) + norm(Te) + L * 2 * B * T * kv * b
                                    + top_layer + incoming,
                                    "kv_cache": L * B * Te * kv_token, "logits": backward_logits(d_embeds)}
        if deferred:  # the anchor (model/deferred_grad.py): between the second pass's descent and the first's, every
            # weight the one-column passes use gets its gradient over all of them at once, beside the sums so far;
            # what is left of the activations is the first pass's (its recompute has not begun), and the newest
            # sum beside the one it replaces (the largest matrix: a LoRA factor or a full projection)
            newest = incoming
            if lora:
                layout = linear_shapes(shape)
                newest = max(max(i, o) for t in recipe.lora_targets() for i, o in layout[t]) * recipe.lora.rank * b
            moments["anchor"] = {**states_with(layer_sums(L) + L * g_layer, head),
                                 "activations": emb + outs(w0) + norm(w0) + L * 2 * B * w0 * kv * b + newest,
                                 "kv_cache": L * B * w0 * kv_token, "logits": backward_logits(d_embeds)}
        if head_trainable:  # the embedding's backward, last: a dense V x h gradient beside every other one
            emb_sum = (2 * tied_sum, V * h * b) if tied_sum else (0.0, V * h * b)  # (waiting sums, the new one)
            moments["embedding"] = {**states, "gradients": emb_sum[0] + P_t * b * grad_scale,
                                    "activations": 0.0, "kv_cache": 0.0, "logits": emb_sum[1]}
        loss = chunk
        loss_gsum = 0.0
        if head_trainable and fused_head:
            # The fused sweep's fp32 d(head) and d(hidden) exist from forward on, beside one chunk's logits; its
            # backward (no logits then) scales d(head) into a second fp32 copy.
            loss = B * T * h * b + max(chunk + V * h * 4, 2 * V * h * 4)
        elif head_trainable:
            loss, loss_gsum = chunk + 2 * V * h * b, V * h * b  # K chunk gradients summed: the sum, one more, theirs
        moments["loss"] = {**states_with(loss_gsum, in_backward=False),
                           "activations": emb + filled + wide(T - n1) + norm(T),
                           "kv_cache": kv_rec, "logits": 2 * B * T * h * b + loss}
        if codi:  # the teacher pass (model/codi.py): data.max_seq_len columns, no cache, backpropagated first
            for name in ("top", "bottom"):  # so every layer's weights hold a gradient sum when the student's begins
                moments[name]["gradients"] = states_with(layer_sums(L) + incoming, head)["gradients"]
            kept = B * Tt * h * b + outs(Tt) + norm(Tt)
            student = emb + filled + wide(T - n1) + norm(T)
            moments["teacher"] = {**states_with(R_gsum, head), "activations": student + kept + layer(B, Tt, Tt),
                                  "kv_cache": kv_rec, "logits": 2 * B * Tt * h * b}
            # Its bottom layer: the layer inputs above it (and the final norm's) are gone, their weights' gradient
            # sums there.
            moments["teacher bottom"] = {**states_with(layer_sums(L - 1) + R_gsum, head + layer_grads(L - 1)),
                                         "activations": student + B * Tt * h * b + layer(B, Tt, Tt),
                                         "kv_cache": kv_rec, "logits": 2 * B * Tt * h * b}
            teacher_loss(moments["loss"], kept, loss - chunk)
    else:
        cum, past_kv = 0, 0.0
        for w in widths:
            cum += w
            # attention's keys/values over every column so far: repeated to the query heads (GQA), and the past
            # concatenated with this pass's (after the first pass)
            past_kv += 2 * B * cum * q * b if kv < q else (2 * B * cum * kv * b if cum > w else 0.0)
            past_kv += B * cum * kv * b if cum > w and kv < q else 0.0
        temps = B * T * temp_token
        acts = L * (B * T * saved_token + past_kv) + temps + sum(B * w * T * (b + 1) for w in widths)
        moments["loss"] = {**states_with(), "activations": emb + filled + acts + norm(T),
                           "kv_cache": kv_rec, "logits": 2 * B * T * h * b + chunk
                           + (V * h * 4 if head_trainable and fused_head else 0.0)}
        moments["backward"] = {**states_with(L * g_layer if sums else 0.0, head), "activations": emb + filled + acts,
                               "kv_cache": kv_rec, "logits": grad_out}
        if codi:  # the teacher pass, backpropagated first: its layers' saved tensors beside all of the student's
            kept = (L * (B * Tt * saved_token + (2 * B * Tt * q * b if kv < q else 0.0)) + B * Tt * Tt * (b + 1)
                    + B * Tt * h * b)
            moments["teacher"] = {**states_with(), "activations": emb + filled + acts + kept + B * Tt * temp_token,
                                  "kv_cache": kv_rec, "logits": 2 * B * Tt * h * b}
            teacher_loss(moments["loss"], kept, V * h * 4 if head_trainable and fused_head else 0.0)
    step = recipe.coconut.step_supervision
    if step.enabled:  # the decoder's one call over B * max_latent_stage (row, step) pairs, after the passes
        if codi:  # one pair per thought z_0..z_n: the teacher's CoT cut into num_latent + 1 steps, then EOS
            steps = recipe.codi.num_latent + 1
            cot = Tt - ROW_LAYOUT.question(Tt) - ROW_LAYOUT.answer_tokens - 1
            S, pairs = 1 + math.ceil(cot / steps) + 1, B * steps
        else:
            S = (ROW_LAYOUT.prompt_tokens if step.prompt else 0) + recipe.coconut.c_thought + ROW_LAYOUT.step_tokens + 1
            pairs = B * recipe.coconut.max_latent_stage
        dec = (L + 1) * pairs * S * h * b + (pairs * S * lt + 2 * pairs * S * S * b if ckpt else L * pairs * S * lt)
        base = moments["loss"]
        dec_logits = 2 * B * T * h * b + math.ceil(pairs * S / K) * V * (b + 12)
        dec_sums = 0.0
        if copies == 2 and (codi or not lora):
            # A decoder copy trained in full: the peak is its head's backward, before its layers' (no recompute
            # yet, the chunk's logits gone) with the head's gradient: under ZeRO-3 its K chunk gradients summed
            # (V*h*b twice over) beside the newest chunk's; below, the fused sweep's fp32 d(head) from forward on
            # and the copy its backward scales it into.
            dec -= pairs * S * lt if ckpt else 0.0
            dec_logits = 2 * B * T * h * b + (V * h * b if stage == 3 else 2 * V * h * 4)
            dec_sums = 2 * V * h * b if stage == 3 else 0.0
        moments["step decoder"] = {**base, "gradients": base["gradients"] + dec_sums,
                                   "activations": base["activations"] + dec, "logits": dec_logits}

    # -- evaluation: E rows, no gradients -------------------------------------------------------------------
    E = recipe.batch.eval_batch_size
    eval_states = {**states, "gradients": 0.0}
    # One layer's forward work at the widest pass (no gradients: nothing is saved, the MLP's intermediates are the
    # widest: SwiGLU's gate, up, act and product; GPT-2's fused q/k/v and its tanh-GELU's steps).
    forward_width = (3 * h + 5 * I) if gpt2 else (4 * h + 3 * I)
    forward_layer = E * Tl * forward_width * b
    # Without gradients each pass's cache is merged into one copy per layer (kv_cache.py); the last pass's own
    # records are still the projections' outputs (GPT-2: views of its fused q/k/v).
    eval_kv = L * E * ((T - Tl) * 2 * kv * b + Tl * kv_token) + (2 * E * T * kv * b if n > 1 else 0.0)
    validation = {
        "passes": {**eval_states, "activations": E * T * h * b * 3 + forward_layer,
                   "kv_cache": eval_kv, "logits": 0.0},
        "loss": {**eval_states, "activations": E * T * h * b * 3, "kv_cache": 0.0,
                 "logits": 2 * E * T * h * b + math.ceil(E * (T - 1) / K) * V * (b + 8)},
    }
    new = recipe.eval.max_new_tokens
    if codi:  # a CODI prompt is its question, the thoughts and <eot>: up to data.max_seq_len with the answer
        T = recipe.data.max_seq_len
    prompt = max(T - new, 1)
    # the prompt's widest pass: a CODI prompt's question pass is nearly all of it
    first = max(prompt - n, 1) if codi else prompt / max(n, 1)
    generation = {
        # the prompt passes' keys/values (the widest pass's own records still its projections' outputs, GPT-2: views
        # of its fused q/k/v) and one layer's copy while a pass's cache is merged
        "prompt": {**eval_states, "activations": 3 * E * prompt * h * b + E * first * forward_width * b,
                   "kv_cache": L * E * (first * kv_token + (prompt - first) * 2 * kv * b) + 2 * E * prompt * kv * b,
                   "logits": E * V * (b + 4)},
        "decode": {**eval_states, "activations": 2 * E * prompt * h * b,
                   "kv_cache": 2 * L * E * T * kv * b + 2 * E * T * kv * b, "logits": E * V * (b + 4)},
    }
    optimizer_step = {**states, "gradients": all_grads, "activations": 0.0, "kv_cache": 0.0, "logits": 0.0}
    optimizer_step["optimizer"] += (0.0 if z["offload_optimizer"] else
                                    P_t * 4 * (min(1.0, z["sub_group_size"] * W / max(P_t, 1)) if stage == 3 else 1.0)
                                    / shard_opt)

    out = {}
    for phase, candidates in (("train", moments), ("optimizer step", {"step": optimizer_step}),
                              ("validation", validation), ("generation", generation)):
        best = max(candidates, key=lambda k: sum(candidates[k].values()))
        parts = {**candidates[best], "buffers": buffers}
        parts = _gib(parts)
        parts["overhead"] = OVERHEAD_GIB
        parts["total"] = sum(parts[k] for k in GPU_COMPONENTS)
        parts["host_offload"] = host / GIB
        parts["moment"] = best
        parts["moments"] = {k: _gib(v) for k, v in candidates.items()}  # every moment's components (executed)
        out[phase] = parts
    return out


def estimate_memory(recipe, world_size: int, *, shape: dict | None = None, ds_config: dict | None = None) -> dict:
    """GiB per GPU for each component of GPU_COMPONENTS at the phase with the largest total ("phase", and
    "moment" within it), "total" (their sum) and "host_offload" (CPU RAM per rank for offloaded state, not in
    the total). See the module docstring for every formula."""
    phases = estimate_phases(recipe, world_size, shape=shape, ds_config=ds_config)
    phase = max(phases, key=lambda k: phases[k]["total"])
    return {**phases[phase], "phase": phase}


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
