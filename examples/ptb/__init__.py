"""Penn Treebank word-level language modelling with LSTMs: ``python -m examples.ptb --help``."""
