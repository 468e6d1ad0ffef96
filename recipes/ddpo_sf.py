"""DDPO-SF: fine-tune a diffusion model with score-function (REINFORCE) policy gradients.

    python recipes/ddpo_sf.py                       # digits preset, CPU, a few minutes
    python recipes/ddpo_sf.py --preset sd15-aesthetic --output-dir runs/aesthetic
    python recipes/ddpo_sf.py --help                # every config field

The loop (sample -> advantages -> train -> log -> evaluate -> checkpoint) is
ddpo_rl.recipe.DDPORecipe; this script only picks the algorithm.
"""

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)
from ddpo_rl.recipe import main as recipe_main


def main(argv=None):
    return recipe_main(argv, algorithm="ddpo_sf")


if __name__ == "__main__":
    main()
