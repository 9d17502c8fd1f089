"""``python -m examples.ptb``: train an LSTM language model on Penn Treebank with any registry optimizer."""

import argparse
import sys

from examples import cli, optimizers
from examples.ptb import input_pipeline, models, train


def _model_help() -> str:
  rows = []
  for name, spec in models.MODELS.items():
    sizes = "x".join(str(h) for h in spec.hidden_sizes)
    rows.append(
      f"{name} (embed {spec.embed_size}, LSTM {sizes}, bptt {spec.bptt}, clip {spec.clip})"
    )
  return "; ".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m examples.ptb",
    description="Train an LSTM language model on Penn Treebank as in Chen et al. (IJCAI 2020), "
    "Section 5, with truncated BPTT and carried state. Each epoch appends one JSON object "
    "(train/valid/test perplexity, tokens/s, ...) to WORKDIR/metrics.jsonl and checkpoints to "
    "WORKDIR/checkpoints/.",
  )
  parser.add_argument(
    "--model",
    default="lstm2-small",
    choices=list(models.MODELS),
    metavar="MODEL",
    help=f"network: {_model_help()} (default: %(default)s)",
  )
  parser.add_argument(
    "--bptt", type=int, default=None, help="steps per truncated-BPTT window (default: the model's)"
  )
  parser.add_argument(
    "--clip",
    type=float,
    default=None,
    help="clip the gradient to this global norm, 0 for none (default: the model's)",
  )
  parser.add_argument(
    "--tie-weights",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="share the embedding and softmax matrices (default: the model's)",
  )
  parser.add_argument(
    "--train-tokens",
    type=int,
    default=None,
    help="train on the first N tokens of the training stream only (quick runs; default: all)",
  )
  parser.add_argument(
    "--eval-batch-size",
    type=int,
    default=10,
    help="rows the valid/test streams are cut into; 1 scores them as one sequence (default: %(default)s)",
  )
  cli.add_common_flags(parser, optimizers=optimizers.NAMES, epochs=200, batch_size=20)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.configure_xla(sys.argv[1:] if argv is None else argv)  # before JAX starts its backend
  config = train.Config(
    model=args.model,
    bptt=args.bptt,
    clip=args.clip,
    tie_weights=args.tie_weights,
    train_tokens=args.train_tokens,
    eval_batch_size=args.eval_batch_size,
    data_dir=args.data_dir,
    **cli.loop_kwargs(args),
  )
  return cli.run(
    lambda: train.train_and_evaluate(config), args, expected=(input_pipeline.DataError,)
  )


if __name__ == "__main__":
  sys.exit(main())
