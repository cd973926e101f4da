"""rsmbench: reward fine-tuning methods for diffusion and flow models, each implemented twice
(original formulation and Reward Score Matching instance), with a gradient-equivalence harness."""

__version__ = "0.1.0"
