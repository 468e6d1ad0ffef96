"""ddpo_rl: fine-tune generative models with reinforcement learning, on torchrl.

The data flow, one module per stage::

    prompts (ddpo_rl.prompts) -> env reset (envs.denoising)
    -> policy step x T (ddpo_rl.policy: network -> DDIM Gaussian (ddpo_rl.ddim) -> next latent, log-prob)
    -> reward transform at the last step (ddpo_rl.rewards)
    -> advantages, per-prompt normalisation (ddpo_rl.advantages)
    -> loss (ddpo_rl.objectives) -> optimizer (ddpo_rl.trainer)
"""

import ddpo_rl.threads  # noqa: F401  (first look at the machine's load: ddpo_rl/threads.py)
from ddpo_rl._compat import patch_torchvision  # noqa: E402

patch_torchvision()  # before anything imports torchvision (transformers, diffusers, open_clip)

from ddpo_rl.advantages import PerPromptStatTracker, compute_advantages  # noqa: E402
from ddpo_rl.collector import collect_trajectories, terminal_rewards, with_advantages  # noqa: E402
from ddpo_rl.keys import KEYS, DDPOKeys  # noqa: E402
from ddpo_rl.objectives import DDPOSFLoss, RWRLoss, make_ddpo_is_loss, make_loss  # noqa: E402
from ddpo_rl.policy import DiffusionPolicy  # noqa: E402
from ddpo_rl.prompts import PromptSource  # noqa: E402
from ddpo_rl.rewards.transform import RewardTransform  # noqa: E402
from ddpo_rl.text import PromptEncoder  # noqa: E402
from ddpo_rl.trainer import DDPOTrainer, TrainConfig  # noqa: E402

from ddpo_rl._version import __version__  # noqa: E402
__all__ = [
    "KEYS",
    "DDPOKeys",
    "DDPOSFLoss",
    "DDPOTrainer",
    "DiffusionPolicy",
    "PerPromptStatTracker",
    "PromptEncoder",
    "PromptSource",
    "RWRLoss",
    "RewardTransform",
    "TrainConfig",
    "__version__",
    "collect_trajectories",
    "compute_advantages",
    "make_ddpo_is_loss",
    "make_loss",
    "terminal_rewards",
    "with_advantages",
]
