"""One module per method; each registers itself with ``rsmbench.core.method.register``."""
