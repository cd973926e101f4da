"""Data: the pretraining data-source registry, the Gaussian-mixture ground truth and the photo
patches of the image tasks. Imports the core only."""
