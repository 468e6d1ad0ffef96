"""RWR: fine-tune a diffusion model with reward-weighted regression (the DDPO paper's baseline).

    python recipes/rwr.py                       # digits preset, CPU, a few minutes
    python recipes/rwr.py --preset sd15-aesthetic --output-dir runs/aesthetic
    python recipes/rwr.py --help                # every config field

The loop (sample -> advantages -> train -> log -> evaluate -> checkpoint) is
recipes/ddpo_recipe.py's DDPORecipe; this script only picks the algorithm.
"""

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)
from ddpo_recipe import main as recipe_main  # this script's folder is on sys.path


def main(argv=None):
    return recipe_main(argv, algorithm="rwr")


if __name__ == "__main__":
    main()
