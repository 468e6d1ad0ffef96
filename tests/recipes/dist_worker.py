"""Worker launched by tests/recipes/test_distributed.py under torchrun (not a test module).

    python -m torch.distributed.run --nproc-per-node 2 tests/recipes/dist_worker.py OUT VARIANTS_JSON

VARIANTS_JSON maps a variant name to recipe CLI arguments. For each variant, in the same
process group, every rank runs a DDPORecipe into OUT/NAME (shared output directory: rank 0
writes it) and saves OUT/NAME/rank{R}.pt with what the test compares across ranks: the
trainable weights before and after training, the per-prompt statistics, and the rewards and
prompt ids of the batches this rank trained on.
"""

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import json
import os
import sys

import torch

from ddpo_rl import distributed
from ddpo_rl.config import parse_cli
from ddpo_rl.keys import KEYS
from recipes.ddpo_recipe import DDPORecipe


def trainable(recipe):
    return {n: p.detach().cpu().clone() for n, p in recipe.policy.named_parameters() if p.requires_grad}


def run_variant(root, name, args):
    out = os.path.join(root, name)
    recipe = DDPORecipe(parse_cli([*args, "--output-dir", out, "--progress", "false"])).setup()
    initial = trainable(recipe)
    seen = []
    train = recipe.trainer.train

    def recording_train(batch):
        seen.append(
            {
                "rewards": batch.get(("next", KEYS.reward))[:, -1, 0].clone(),
                "prompt_ids": batch.get(KEYS.prompt_id)[:, 0].clone(),
            }
        )
        return train(batch)

    recipe.trainer.train = recording_train
    recipe.train()
    state = {
        "rank": recipe.dist.rank,
        "world_size": recipe.dist.world_size,
        "initial": initial,
        "final": trainable(recipe),
        "tracker": recipe.tracker.state_dict() if recipe.tracker is not None else None,
        "seen": seen,
        "skipped_steps": recipe.trainer.skipped_steps,
    }
    torch.save(state, os.path.join(out, f"rank{recipe.dist.rank}.pt"))
    return recipe


def main():
    root, variants = sys.argv[1], json.loads(sys.argv[2])
    recipe = None
    try:
        for name, args in variants.items():
            recipe = run_variant(root, name, args)
            distributed.barrier()
    finally:
        if recipe is not None:
            recipe.cleanup()  # restores signal handlers, leaves the process group


if __name__ == "__main__":
    main()
