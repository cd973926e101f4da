"""Reward models: differentiable and black-box, tiny and full scale."""
