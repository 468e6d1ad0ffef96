"""Flow-GRPO: fine-tune a flow-matching model (SD3-style) with group-relative clipped policy gradients.

    python recipes/flow_grpo.py                      # flow-digits preset: CPU, a few minutes
    python recipes/flow_grpo.py --preset sd35-compressibility --output-dir runs/sd35
    python recipes/flow_grpo.py --sde-window-size 4  # MixGRPO / Flow-GRPO-Fast: train 4 of the T steps
    python recipes/flow_grpo.py --help               # every config field

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) is DDPO-IS's clipped importance-sampling loss on the
flow-matching SDE policy (ddpo_rl.flow_policy, noise level ``--noise-level``) with advantages
standardised within groups of ``--group-size`` samples of one prompt (ddpo_rl.advantages). The loop
is recipes/ddpo_recipe.py's DDPORecipe, which picks the flow-matching policy from the model's
scheduler; this script only sets the algorithm and the default preset.
"""

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)
from ddpo_recipe import main as recipe_main  # this script's folder is on sys.path

DEFAULT_PRESET = "flow-digits"


def main(argv=None):
    return recipe_main(argv, algorithm="ddpo_is", preset=DEFAULT_PRESET)


if __name__ == "__main__":
    main()
