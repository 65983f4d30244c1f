"""RLHF building blocks: pure, unit-tested functions that the PPO and DPO stages call.

- advantages.py: per-token KL-penalised rewards, GAE, whitening, adaptive KL, reward scaling
- losses.py: clipped policy and value losses, entropy, DPO and Bradley-Terry losses
- rollout.py: response log-probs and values of padded (prompt | response) batches
- rewards.py: rule-based reward functions usable as `reward.function=module:function`
"""
