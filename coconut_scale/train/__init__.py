"""The train wing: the Trainer and its loop, the DeepSpeed strategy (the only importer of deepspeed), checkpoints,
HF exports and the run log.

`python -m coconut_scale.train RECIPE` (and `deepspeed --module coconut_scale.train`) runs `train/__main__.py`.
"""
