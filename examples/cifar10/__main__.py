"""``python -m examples.cifar10``: train a CIFAR-10 model with any optimizer of the registry."""

import argparse
import sys

from examples import cli, optimizers
from examples.cifar10 import input_pipeline, models, train


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m examples.cifar10",
    description="Train a CIFAR-10 classifier as in Chen et al. (IJCAI 2020), Section 5. Each epoch "
    "appends one JSON object to WORKDIR/metrics.jsonl and checkpoints to WORKDIR/checkpoints/.",
  )
  parser.add_argument(
    "--model",
    default="resnet20",
    choices=list(models.MODELS),
    metavar="MODEL",
    help=f"network: {', '.join(models.MODELS)} (default: %(default)s)",
  )
  parser.add_argument(
    "--train-size",
    type=int,
    default=None,
    help="class-balanced, seeded subset of the 50,000 training images",
  )
  parser.add_argument(
    "--test-size",
    type=int,
    default=None,
    help="class-balanced, seeded subset of the 10,000 test images",
  )
  parser.add_argument(
    "--eval-batch-size", type=int, default=1000, help="evaluation batch (default: %(default)s)"
  )
  cli.add_common_flags(parser, optimizers=optimizers.NAMES, epochs=200, batch_size=128)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.configure_xla(sys.argv[1:] if argv is None else argv)  # before JAX starts its backend
  config = train.Config(
    model=args.model,
    train_size=args.train_size,
    test_size=args.test_size,
    data_dir=args.data_dir,
    eval_batch_size=args.eval_batch_size,
    **cli.loop_kwargs(args),
  )
  return cli.run(
    lambda: train.train_and_evaluate(config), args, expected=(input_pipeline.DataError,)
  )


if __name__ == "__main__":
  sys.exit(main())
