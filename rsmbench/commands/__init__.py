"""The commands that compose the layers below (a run plan, its execution, the analysis of its runs):
``bench`` and ``tune``. Each exposes ``add_parser(sub)`` like every other command module."""
