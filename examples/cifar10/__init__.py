"""CIFAR-10 image classification with the paper's models: ``python -m examples.cifar10 --help``."""
