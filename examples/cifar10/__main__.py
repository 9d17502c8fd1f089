"""``python -m examples.cifar10``: train a CIFAR-10 model with any optimizer of the registry."""

import argparse
import sys

from examples import cli

if __name__ == "__main__":
  cli.end_on_ctrl_c()  # Ctrl-C while the libraries load: one line and status 130, as later

from examples.cifar10 import input_pipeline, train


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m examples.cifar10",
    description="Train a CIFAR-10 classifier as in Chen et al. (IJCAI 2020), Section 5. Each epoch "
    "appends one JSON object to WORKDIR/metrics.jsonl and checkpoints to WORKDIR/checkpoints/.",
    epilog=cli.EXIT_STATUS_HELP,
  )
  cli.add_config_flags(parser, train.Config)  # a flag per field of train.Config
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.configure_xla(sys.argv[1:] if argv is None else argv)  # before JAX starts its backend
  return cli.run(
    lambda: train.train_and_evaluate(cli.config_from_args(train.Config, args)),
    args,
    expected=(input_pipeline.DataError,),
  )


if __name__ == "__main__":
  sys.exit(main())
