"""ddpo_rl: fine-tune generative models with reinforcement learning, on torchrl.

The data flow, one module per stage::

    prompts (ddpo_rl.prompts) -> env reset (envs.denoising)
    -> policy step x T (ddpo_rl.policy: network -> DDIM Gaussian (ddpo_rl.ddim) -> next latent, log-prob)
    -> reward transform at the last step (ddpo_rl.rewards)
    -> advantages, per-prompt normalisation (ddpo_rl.advantages)
    -> loss (ddpo_rl.objectives) -> optimizer (ddpo_rl.trainer)
"""

from ddpo_rl._compat import patch_torchvision

patch_torchvision()

from ddpo_rl.keys import KEYS, DDPOKeys  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KEYS", "DDPOKeys", "__version__"]
