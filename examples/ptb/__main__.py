"""``python -m examples.ptb``: train an LSTM language model on Penn Treebank with any registry optimizer."""

import argparse
import sys

from examples import cli

if __name__ == "__main__":
  cli.end_on_ctrl_c()  # Ctrl-C while the libraries load: one line and status 130, as later

from examples.ptb import input_pipeline, train


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m examples.ptb",
    description="Train an LSTM language model on Penn Treebank as in Chen et al. (IJCAI 2020), "
    "Section 5, with truncated BPTT and carried state. Each epoch appends one JSON object "
    "(train/valid/test perplexity, tokens/s, ...) to WORKDIR/metrics.jsonl and checkpoints to "
    "WORKDIR/checkpoints/.",
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
