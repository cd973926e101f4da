"""One module per method; each registers itself with ``rsmbench.method.register``."""
