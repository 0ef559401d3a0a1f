"""Evaluation and analysis of exported Coconut checkpoints (see docs/evaluation.md).

Each module is one job with its own CLI (`python -m coconut_scale.evaluate.<name>`) that writes a JSON report
and a PNG into an output directory:
    noise_sweep  accuracy under perturbed continuous thoughts, per noise type x scale x latent pass
    ablations    continuous feedback on/off and fewer latents than trained: loss, answer perplexity, accuracy
    probing      the top-k tokens each continuous thought decodes to; ProsQA concept mass per latent step
    curves       training curves from a run's metrics.jsonl
Generation accuracy itself is `python -m coconut_scale.eval`. Shared plumbing: inputs.py (checkpoint + data
-> evaluation examples), runtime.py (process group, progress bars, atomic outputs, PNGs).
"""
