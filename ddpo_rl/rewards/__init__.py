"""Reward functions (plain callables on image batches) and the reward transform that calls them."""

from ddpo_rl.rewards.base import RewardFn

__all__ = ["RewardFn"]
