"""The global batch sampler at GSM8K-Aug size (385,620 examples) on recipes/gpt2_gsm_coconut.yaml's 64-rank plan.

Every rank's micro-batches of an epoch are disjoint, together they cover the epoch (all but the incomplete last
global batch, which a new permutation drops each epoch), each optimizer step takes the next global batch of the
permutation, and a sampler resumed mid-epoch as the trainer resumes (a new GlobalBatchSampler, then
`micro_batches(epoch, step_in_epoch)`), in this process or in a fresh one, yields exactly the rest.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coconut_scale.config.batch_plan import resolve_batch
from coconut_scale.config.recipe import load_recipe
from coconut_scale.data.sampler import GlobalBatchSampler

REPO = Path(__file__).resolve().parents[2]
GSM8K_AUG = 385_620
WORLD = 64
EPOCH = 5


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(REPO / "recipes" / "gpt2_gsm_coconut.yaml")


@pytest.fixture(scope="module")
def plan(recipe):
    return resolve_batch(recipe.batch, WORLD, recipe.data.max_seq_len)


@pytest.fixture(scope="module")
def sampler_of(recipe, plan):
    """A new sampler for a rank, as Trainer.setup builds it."""
    return lambda rank: GlobalBatchSampler(GSM8K_AUG, plan, rank, seed=recipe.seed)


@pytest.fixture(scope="module")
def epoch_batches(sampler_of):
    """Per rank, its micro-batches of the whole epoch."""
    return [list(sampler_of(rank).micro_batches(EPOCH)) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def fresh_process_env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def digest(batches) -> str:
    return hashlib.sha256(json.dumps(batches).encode()).hexdigest()


def test_the_64_rank_plan_is_the_recipes(plan, sampler_of):
    assert (plan.micro_batch_size, plan.grad_accum, plan.global_batch_size) == (2, 1, 128)
    assert sampler_of(0).steps_per_epoch == GSM8K_AUG // 128 == 3012


def test_ranks_are_disjoint_and_together_cover_the_epoch(epoch_batches, plan, sampler_of):
    seen = [i for batches in epoch_batches for mb in batches for i in mb]
    covered = sampler_of(0).steps_per_epoch * plan.global_batch_size
    assert len(seen) == len(set(seen)) == covered == GSM8K_AUG - GSM8K_AUG % 128  # 84 dropped
    permutation = sampler_of(0).permutation(EPOCH)
    assert set(seen) == set(permutation[:covered])
    assert all(len(mb) == plan.micro_batch_size for batches in epoch_batches for mb in batches)
    # Another epoch drops other examples, so over epochs every one is trained on.
    assert set(permutation[covered:]) != set(sampler_of(0).permutation(EPOCH + 1)[covered:])


@pytest.mark.parametrize("step", [0, 1, 1506, 3011])
def test_each_step_takes_the_next_global_batch_of_the_permutation(epoch_batches, plan, sampler_of, step):
    permutation = sampler_of(0).permutation(EPOCH)
    in_step = [i for batches in epoch_batches for mb in batches[step * plan.grad_accum:(step + 1) * plan.grad_accum]
               for i in mb]
    assert in_step == permutation[step * plan.global_batch_size:(step + 1) * plan.global_batch_size]


@pytest.mark.parametrize("step", [1, 1507, 3011, 3012])
def test_a_new_sampler_resumed_at_a_step_yields_the_rest(epoch_batches, plan, sampler_of, step):
    for rank in (0, 1, 31, 62, 63):
        assert list(sampler_of(rank).micro_batches(EPOCH, step)) == epoch_batches[rank][step * plan.grad_accum:]


def test_a_restarted_process_resumes_identically(epoch_batches, plan, recipe, fresh_process_env):
    step, ranks = 1507, [0, 17, 63]
    script = (
        "import hashlib, json, sys\n"
        "from coconut_scale.config.batch_plan import resolve_batch\n"
        "from coconut_scale.config.recipe import load_recipe\n"
        "from coconut_scale.data.sampler import GlobalBatchSampler\n"
        f"recipe = load_recipe({str(REPO / 'recipes' / 'gpt2_gsm_coconut.yaml')!r})\n"
        f"plan = resolve_batch(recipe.batch, {WORLD}, recipe.data.max_seq_len)\n"
        f"tails = [list(GlobalBatchSampler({GSM8K_AUG}, plan, r, seed=recipe.seed).micro_batches({EPOCH}, {step}))"
        f" for r in {ranks}]\n"
        "print(json.dumps([hashlib.sha256(json.dumps(t).encode()).hexdigest() for t in tails]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=fresh_process_env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert json.loads(out) == [digest(epoch_batches[r][step * plan.grad_accum:]) for r in ranks]
