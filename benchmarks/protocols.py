"""The reproduction's protocols: what a protocol is, and the registry of them.

A protocol (:class:`Protocol`) is a grid of runs, task x variant x seed, and how to report it: its
trainer config, its variants (:class:`Variant`: an optimizer of the registry with overrides), the
paper's numbers for the same cell and, for a tuned protocol, how each variant's learning rate is
chosen (:class:`Tuning`, carried out by :mod:`benchmarks.tuning`). :data:`PROTOCOLS` holds the
protocols by name; :func:`run_dir` is where a run of a protocol lives, under
``RESULTS/runs/SETTING/``, so that protocols sharing a setting share the identical runs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

from examples import metrics
from examples.optimizers import PAPER_OPTIMIZERS

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _paper(*values: float) -> dict[str, float]:
  """The paper's numbers for its optimizers, in the registry's order (sgdm, adam, ..., padam)."""
  return dict(zip(PAPER_OPTIMIZERS, values, strict=True))


# The paper's final-epoch numbers (its Tables 1 and 3), by model and optimizer.
PAPER_CIFAR10_ACC = {
  "vgg16": _paper(93.71, 92.21, 92.54, 93.54, 92.94, 93.28, 93.78),
  "resnet18": _paper(95.00, 92.89, 93.53, 94.56, 93.92, 94.16, 94.94),
  "wrn16_4": _paper(95.26, 92.27, 92.91, 95.08, 94.23, 93.85, 95.34),
}
PAPER_PTB_PPL = {
  "lstm2": _paper(63.37, 61.58, 62.56, 63.93, 64.13, 63.14, 61.53),
  "lstm3": _paper(61.22, 60.44, 61.92, 63.24, 60.01, 60.89, 58.48),
}


@dataclasses.dataclass(frozen=True)
class Tuning:
  """How a protocol picks each variant's learning rate.

  Attributes:
    factor: the grid's ratio between neighbouring rates.
    start: the first grid, as powers of ``factor`` times the base rate.
    reach: the grid grows past an edge holding the best score up to ``factor**reach``.
    seeds: seeds run at the chosen rate (seed 0 is the grid's run).
    select: the metric (last epoch) that picks the rate.
    lower_is_better: whether the smallest ``select`` wins (a perplexity), not the largest.
  """

  factor: float = 3.0
  start: tuple[int, ...] = (-1, 0, 1)
  reach: int = 2
  seeds: int = 3
  select: str = "val_acc"
  lower_is_better: bool = False


@dataclasses.dataclass(frozen=True)
class Variant:
  """One line of a table: an optimizer from the registry, with optional overrides."""

  label: str
  optimizer: str
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  run: str | None = (
    None  # the run folder's name when it is not the label's (a run shared by protocols)
  )
  base_lr: float | None = None  # a tuned protocol's x1 rate, when not the registry's
  rate_of: tuple[str, str] | None = None  # (protocol, label): use the rate chosen there, no grid
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # trainer settings, e.g.
  # {"state_bits": 8}, over the protocol's
  seeds: int | None = None  # at most this many seeds, fewer than the protocol's (a tuned
  # protocol's variant not worth its seeds)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A grid of runs and how to report it.

  Attributes:
    name: the protocol's name (the folder of its report).
    task: ``"cifar10"`` or ``"ptb"``.
    setting: the name of the shared run folder; protocols with the same setting share runs.
    config: the trainer's config fields common to every run (model, epochs, sizes, ...).
    variants: the table's lines.
    seeds: how many seeds (0, 1, ...) by default.
    paper: the paper's number per optimizer for the same cell, and what that cell is.
    figure: ``"curves"`` (the paper's Figure 2), ``"psweep"`` (its Figure 1) or ``"batch"`` (the
      curves, and the final test metric against the batch size per optimizer).
    about: why this design, printed at the top of the table.
    tuning: for a tuned protocol, how each variant's learning rate is chosen (see
      :mod:`benchmarks.tuning`); None: the registry's rates.
    compare: pairs of labels whose paired test-accuracy difference a tuned protocol reports.
  """

  name: str
  task: str
  setting: str
  config: Mapping[str, Any]
  variants: tuple[Variant, ...]
  seeds: int = 1
  paper: tuple[str, Mapping[str, float]] | None = None
  figure: str = "curves"
  about: str = ""
  tuning: Tuning | None = None
  compare: tuple[tuple[str, str], ...] = ()

  @property
  def registry_task(self) -> str:
    """The optimizer registry's task (its hyperparameters) for this protocol's runs."""
    if self.task == "cifar10":
      return "cifar10"
    model = str(self.config.get("model", ""))
    if model.startswith("transformer"):
      return "lm"
    return "ptb3" if model.startswith("lstm3") else "ptb2"


def _seven() -> tuple[Variant, ...]:
  """The paper's optimizers, each with the registry's hyperparameters."""
  return tuple(Variant(name, name) for name in PAPER_OPTIMIZERS)


_P_SWEEP = (
  Variant("padam p=1/2", "padam", {"p": 0.5}),
  Variant("padam p=1/4", "padam", {"p": 0.25}),
  Variant("padam p=1/8", "padam", run="padam"),  # the registry's default: cifar10-mini's run
  Variant("padam p=1/16", "padam", {"p": 0.0625}),
  Variant("sgdm", "sgdm"),  # p -> 0
)

_CIFAR10_MINI = dict(
  model="resnet8", train_size=1000, test_size=1000, batch_size=32, epochs=240, eval_batch_size=1000
)
_CIFAR10_MINI_ABOUT = (
  "ResNet-8 (widths 16/32/64, 75k parameters) on a class-balanced 1,000-image subset of the "
  "CIFAR-10 training set with the reference augmentation, tested on a class-balanced 1,000 "
  "test images after every epoch; batch 32 "
  "(31 steps an epoch), 240 epochs = 7,440 steps, learning rate x0.1 after epochs 120 and 180; "
  "the paper's hyperparameters from the registry. Why: the paper's effects live where the "
  "training loss approaches zero and the decays decide generalization; on 2 CPU cores that "
  "needs thousands of cheap steps on a set small enough to be fitted (the measured pilots "
  "stopped at train loss 0.6-1.0 after 600-2,500 steps); measured 515-706 s a run on the 2-core "
  "CPU, so the 7 optimizers take ~65 minutes a seed. A seed draws the model's initialization, "
  "the augmentation and the batch order, and also the 1,000-image training and test subsets, so "
  "the spread over seeds includes the choice of subset."
)

_CIFAR10_TUNED = dict(
  model="resnet8",
  train_size=1000,
  val_size=1000,
  batch_size=32,
  epochs=240,
  eval_batch_size=1000,
  eval_every=4,
  test_every=240,
  checkpoint_every=4,
)
_CIFAR10_TUNED_ABOUT = (
  "ResNet-8 on 1,000 class-balanced CIFAR-10 training images, as cifar10-mini (batch 32, 240 "
  "epochs, x0.1 after epochs 120 and 180, the registry's other hyperparameters), but the learning "
  "rate is tuned: a class-balanced validation split of 1,000 further training images (disjoint "
  "from the 1,000) is evaluated every 4 epochs and after the last, and each optimizer's rate is "
  "chosen among x1/3, x1 and x3 of its base rate by the final validation accuracy of seed 0 (the "
  "grid grows by x3 past an edge that holds the best, up to x1/27 or x27); seeds 1 and 2 then run "
  "at the chosen rate. The full 10,000-image test set is evaluated once, after the last epoch, "
  "and nothing is chosen by it. A seed draws the initialization, augmentation, batch order, and "
  "the training and validation subsets. Evaluating and checkpointing every 4 epochs instead of "
  "every epoch saves time and changes no trained number."
)
# Padam's x1 rate per p: log-linear in p between the paper's two anchors, Padam's 0.1 at p = 1/8
# and AMSGrad's 1e-3 at p = 1/2 (the step lr / vhat^p scales like vhat^-p).
_P_RATES = {0.5: 1e-3, 0.25: 0.1 * 0.01 ** (1 / 3), 0.0625: 0.1 * 0.01 ** (-1 / 6)}
_TUNED_GRID = Tuning(reach=3)


def _tuned_four() -> tuple[Variant, ...]:
  return tuple(Variant(name, name) for name in ("sgdm", "adam", "amsgrad", "padam"))


def _gap_variants() -> tuple[Variant, ...]:
  rate = ("cifar10-tuned", "padam")
  return (
    Variant("padam", "padam", rate_of=rate),
    Variant("sgdm", "sgdm", rate_of=("cifar10-tuned", "sgdm")),
    Variant("padamw", "padamw", {"weight_decay_normalized": 0.025}, rate_of=rate),
    Variant("padam wd x2", "padam", {"weight_decay": 1e-3}, rate_of=rate),
    Variant("padam wd x1/2", "padam", {"weight_decay": 2.5e-4}, rate_of=rate),
    Variant("padam no bias correction", "padam", {"bias_correction": False}, rate_of=rate),
    Variant("padam p annealed", "padam_annealed", rate_of=rate),
  )


def _state_bits_variants() -> tuple[Variant, ...]:
  rate = ("cifar10-tuned", "padam")
  return (
    Variant("padam", "padam", rate_of=rate),  # float32 state: cifar10-tuned's runs
    Variant("padam state 16", "padam", rate_of=rate, config={"state_bits": 16}),
    Variant("padam state 8", "padam", rate_of=rate, config={"state_bits": 8}),
  )


_PTB_TUNED = dict(model="lstm2-small", epochs=6, batch_size=20, train_tokens=300_000, test_every=6)
# Padam's x1 rate at p = 1/8 on PTB: log-linear in p between the registry's SGD-M (1 at p -> 0)
# and Padam (0.01 at p = 0.4).
_PTB_P8_RATE = 0.01 ** (0.125 / 0.4)
_PTB_TUNED_ABOUT = (
  "lstm2-small (2x200, no dropout) on the first 300,000 training tokens of PTB, batch 20, BPTT "
  "20 (750 steps an epoch), 6 epochs = 4,500 steps, learning rate x0.1 after steps 2,250 and "
  "3,375 (the paper's 50% and 75%), the registry's ptb2 hyperparameters but the learning rate, "
  "which is tuned: each optimizer's rate is chosen among x1/3, x1 and x3 of its base rate by the "
  "final perplexity on PTB's own validation text (all of it, 73,760 tokens) of seed 0 (the grid "
  "grows by x3 past an edge that holds the best, up to x1/81 or x81, since p = 1/8's base rate "
  "is interpolated, not measured); seeds 1 and 2 then run at the chosen rate. The test text is "
  "scored once, after the last epoch, and nothing is chosen by it. Padam runs at the paper's "
  "2-layer p = 0.4 (base rate 0.01, the registry's) and at p = 1/8 "
  "(base rate 0.237, log-linear in p between SGD-M's 1 at p -> 0 and Padam's 0.01 at p = 0.4). "
  "A seed draws the initialization and the batch order. Why this size: two runs at a time on "
  "the 2-core CPU train ~3,000 tokens/s each, so ~10 minutes a run buys 1.8M tokens; ptb-mini's "
  "4 passes over the same 300,000 tokens left every optimizer still improving, so 6 passes, "
  "with 2,250 steps after the first decay, let the decays act and the rates separate, while "
  "the grids and seeds (31 runs, 6.2 hours of run time) fit in about 3 hours two at a time. "
  "Like ptb-mini it is far from the paper's converged perplexities (its 2-layer LSTM trains 200 "
  "epochs on all 929k tokens, with dropout)."
)

_TRANSFORMER_TUNED = dict(
  model="transformer-small", epochs=3, train_tokens=300_000, test_every=3, eval_batch_size=10
)
# The two batch sizes of transformer-tuned (sequences of 64 tokens): the same tokens, 8x the steps.
TRANSFORMER_BATCHES = (8, 64)
# Padam's x1 rate at p = 1/4 on lm: log-linear in 2p between SGD-M's 0.3 (p -> 0) and AdamW's 1e-3
# (p = 1/2), as the registry's p = 1/8 rate (0.0721).
_LM_P4_RATE = float(f"{0.3 * (1e-3 / 0.3) ** 0.5:.3g}")


def _transformer_variants() -> tuple[Variant, ...]:
  variants = []
  for batch in TRANSFORMER_BATCHES:
    size = {"batch_size": batch}
    variants += [
      Variant(f"adamw b{batch}", "adamw", config=size),
      Variant(f"sgdm b{batch}", "sgdm", config=size),
      Variant(f"padamw p=1/8 b{batch}", "padamw", {"p": 0.125}, config=size),
      Variant(f"padamw p=1/4 b{batch}", "padamw", {"p": 0.25}, base_lr=_LM_P4_RATE, config=size),
    ]
  return tuple(variants)


def _transformer_compare() -> tuple[tuple[str, str], ...]:
  pairs = []
  for batch in TRANSFORMER_BATCHES:
    pairs += [
      (f"padamw p=1/8 b{batch}", f"adamw b{batch}"),
      (f"padamw p=1/8 b{batch}", f"sgdm b{batch}"),
      (f"sgdm b{batch}", f"adamw b{batch}"),
      (f"padamw p=1/8 b{batch}", f"padamw p=1/4 b{batch}"),
    ]
  return tuple(pairs)


_TRANSFORMER_TUNED_ABOUT = (
  "transformer-small (a GPT-style decoder: 4 pre-LayerNorm layers, width 128, 4 heads, context "
  "64, tied softmax, 2.1M parameters) on the first 300,000 training tokens of PTB, cut into "
  "4,687 windows of 64 tokens that carry nothing across windows and are shuffled every epoch; 3 "
  "epochs (0.9M tokens) at two batch sizes with the same tokens: 8 windows a step (512 tokens, "
  "585 steps an epoch, 1,755 in all) and 64 (4,096 tokens, 73 steps an epoch, 219 in all). The "
  "registry's lm task: linear warmup over the first 10% of the steps, cosine decay to 10% of the "
  "peak, clipping at global norm 1, b2 0.95, decoupled weight decay on the matrices only "
  "(1e-4 x the schedule's multiplier per step: optax.adamw's 0.1 at AdamW's base rate), the same "
  "for every optimizer and rate. AdamW, SGD-M and PadamW at p = 1/8 and 1/4, each at each batch "
  "size with its own rate, chosen among x1/3, x1 and x3 of its base rate by the final perplexity "
  "on PTB's whole validation text of seed 0 (the grid grows by x3 past an edge that holds the "
  "best, up to x1/27 or x27); seeds 1 and 2 then run at the chosen rate. Base rates: AdamW 1e-3, "
  "SGD-M 0.3, Padam 0.0721 at p = 1/8 and 0.0173 at p = 1/4 (log-linear in 2p between SGD-M at "
  "p -> 0 and AdamW at p = 1/2), the same at both batch sizes. The test text is scored once, "
  "after the last epoch; every (input, target) pair of the validation and test texts is scored "
  "once, with the context its window gives it, so the perplexities compare optimizers on this "
  "model, not language models. A seed draws the initialization and the window order. Why this "
  "size: two runs at a time on the 2-core CPU train 1,000-1,600 tokens/s each: a run took 10.6 "
  "minutes with nothing else running, 12-15 beside the test suite. It is early training of "
  "a small model on a small corpus: far from the scale where the Adam-SGD gap is reported."
)

PROTOCOLS: dict[str, Protocol] = {
  p.name: p
  for p in (
    Protocol(
      name="cifar10-mini",
      task="cifar10",
      setting="cifar10-mini",
      config=_CIFAR10_MINI,
      variants=_seven(),
      seeds=2,
      paper=("paper: ResNet-18, full CIFAR-10, 200 epochs", PAPER_CIFAR10_ACC["resnet18"]),
      about=_CIFAR10_MINI_ABOUT,
    ),
    Protocol(
      name="psweep-mini",
      task="cifar10",
      setting="cifar10-mini",
      config=_CIFAR10_MINI,
      variants=_P_SWEEP,
      figure="psweep",
      about="Padam's p on the cifar10-mini setting (the paper's Figure 1). " + _CIFAR10_MINI_ABOUT,
    ),
    Protocol(
      name="cifar10-tuned",
      task="cifar10",
      setting="cifar10-tuned",
      config=_CIFAR10_TUNED,
      variants=_tuned_four(),
      tuning=_TUNED_GRID,
      compare=(
        ("padam", "sgdm"),
        ("adam", "sgdm"),
        ("amsgrad", "sgdm"),
        ("padam", "adam"),
        ("padam", "amsgrad"),
      ),
      about=_CIFAR10_TUNED_ABOUT,
    ),
    Protocol(
      name="psweep-tuned",
      task="cifar10",
      setting="cifar10-tuned",
      config=_CIFAR10_TUNED,
      variants=(
        Variant("padam p=1/2", "padam", {"p": 0.5}, base_lr=_P_RATES[0.5], seeds=1),
        Variant("padam p=1/4", "padam", {"p": 0.25}, base_lr=_P_RATES[0.25]),
        Variant("padam p=1/8", "padam", run="padam"),  # cifar10-tuned's runs
        Variant("padam p=1/16", "padam", {"p": 0.0625}, base_lr=_P_RATES[0.0625]),
        Variant("sgdm", "sgdm"),  # p -> 0; cifar10-tuned's runs
      ),
      tuning=_TUNED_GRID,
      compare=(
        ("padam p=1/8", "padam p=1/4"),
        ("padam p=1/8", "padam p=1/16"),
        ("padam p=1/4", "padam p=1/16"),
        ("padam p=1/4", "sgdm"),
        ("padam p=1/16", "sgdm"),
      ),
      figure="psweep",
      about="Padam's p with the learning rate tuned per p, on the cifar10-tuned setting: each p's "
      "grid is centred on a rate log-linear in p between the paper's Padam (0.1 at p = 1/8) and "
      "AMSGrad (1e-3 at p = 1/2): 1e-3 at p = 1/2, 0.0215 at 1/4, 0.215 at 1/16. Three seeds "
      "at the chosen rate for p = 1/4, 1/8, 1/16 and SGD-M (p = 1/8 and SGD-M share "
      "cifar10-tuned's runs), paired by seed; p = 1/2, clearly behind at seed 0, has the grid's "
      "seed only. " + _CIFAR10_TUNED_ABOUT,
    ),
    Protocol(
      name="state-bits",
      task="cifar10",
      setting="cifar10-tuned",
      config=_CIFAR10_TUNED,
      variants=_state_bits_variants(),
      seeds=3,
      tuning=_TUNED_GRID,
      compare=(("padam state 16", "padam"), ("padam state 8", "padam")),
      about="Padam's optimizer state kept narrow (--state-bits): every moment in bfloat16, rounded "
      "stochastically (16), or in 8-bit block-wise codes (8), against float32 (cifar10-tuned's "
      "runs), at the rate cifar10-tuned chose for Padam, 3 seeds, paired by seed. "
      + _CIFAR10_TUNED_ABOUT,
    ),
    Protocol(
      name="padam-gap",
      task="cifar10",
      setting="cifar10-tuned",
      config=_CIFAR10_TUNED,
      variants=_gap_variants(),
      seeds=2,
      tuning=dataclasses.replace(_TUNED_GRID, seeds=2),
      compare=(
        ("padamw", "padam"),
        ("padam wd x2", "padam"),
        ("padam wd x1/2", "padam"),
        ("padam no bias correction", "padam"),
        ("padam p annealed", "padam"),
        ("padam", "sgdm"),
        ("padamw", "sgdm"),
        ("padam wd x2", "sgdm"),
        ("padam wd x1/2", "sgdm"),
        ("padam no bias correction", "sgdm"),
        ("padam p annealed", "sgdm"),
      ),
      about="What closes Padam's gap to SGD-M: at the rate cifar10-tuned chose for Padam, one "
      "change at a time, 2 seeds each (seeds 0 and 1, paired with Padam's and SGD-M's "
      "cifar10-tuned runs of the same seeds): decoupled weight decay (padamw, normalized as the "
      "registry's AdamW: 0.025 sqrt(batch / (train size x epochs)) per step, following the "
      "schedule), coupled L2 x2 (1e-3) and x1/2 (2.5e-4), no bias correction (the reference "
      "applies Adam's), and p annealed linearly from 1/2 to 1/8 over the first quarter of the "
      "steps while the rate rises log-linearly from 1/100 of the chosen rate to it (padam_annealed). "
      + _CIFAR10_TUNED_ABOUT,
    ),
    Protocol(
      name="ptb-mini",
      task="ptb",
      setting="ptb-mini",
      config=dict(model="lstm2-small", epochs=4, batch_size=20, train_tokens=300_000),
      variants=_seven(),
      paper=("paper: 2-layer LSTM (size not given), 200 epochs", PAPER_PTB_PPL["lstm2"]),
      about=(
        "lstm2-small (2x200) on the first 300,000 training tokens of PTB, 4 epochs, batch "
        "20, learning rate x0.1 after epochs 2 and 3, the paper's ptb2 hyperparameters from "
        "the registry; full validation and test streams. Why: at ~3,500 training tokens/s "
        "on the 2-core CPU, 60 minutes for seven optimizers is ~1.2M tokens each, 1.3 "
        "passes over PTB's 929k; a 300k-token prefix seen 4 times keeps the paper's two "
        "decays and a per-epoch curve (measured 328-378 s a run, 42 minutes in all). It "
        "compares early training, far from the paper's converged perplexities."
      ),
    ),
    Protocol(
      name="ptb-tuned",
      task="ptb",
      setting="ptb-tuned",
      config=_PTB_TUNED,
      variants=(
        *(Variant(name, name) for name in ("sgdm", "adam", "amsgrad")),
        Variant("padam", "padam"),  # the registry's p = 0.4
        Variant("padam p=1/8", "padam", {"p": 0.125}, base_lr=_PTB_P8_RATE),
      ),
      tuning=Tuning(reach=4, select="valid_ppl", lower_is_better=True),
      compare=(
        ("padam", "sgdm"),
        ("padam", "adam"),
        ("padam", "amsgrad"),
        ("padam p=1/8", "sgdm"),
        ("padam p=1/8", "adam"),
        ("padam p=1/8", "padam"),
        ("adam", "sgdm"),
      ),
      paper=("paper: 2-layer LSTM, 200 epochs", PAPER_PTB_PPL["lstm2"]),
      about=_PTB_TUNED_ABOUT,
    ),
    Protocol(
      name="transformer-tuned",
      task="ptb",
      setting="transformer-tuned",
      config=_TRANSFORMER_TUNED,
      variants=_transformer_variants(),
      tuning=Tuning(reach=3, select="valid_ppl", lower_is_better=True),
      compare=_transformer_compare(),
      figure="batch",
      about=_TRANSFORMER_TUNED_ABOUT,
    ),
    Protocol(
      name="gpu-short",
      task="cifar10",
      setting="gpu-short",
      config=dict(model="resnet18", epochs=8, batch_size=128, eval_batch_size=2000),
      variants=_seven(),
      paper=("paper: ResNet-18, 200 epochs", PAPER_CIFAR10_ACC["resnet18"]),
      about="ResNet-18 on full CIFAR-10, 8 epochs per optimizer: sized for ~10 minutes on one H200.",
    ),
    Protocol(
      name="gpu-short-tiny",
      task="cifar10",
      setting="gpu-short-tiny",
      config=dict(
        model="resnet8_w0.5",
        epochs=2,
        batch_size=32,
        train_size=256,
        test_size=200,
        eval_batch_size=200,
      ),
      variants=tuple(Variant(name, name) for name in ("padam", "sgdm")),
      about="A rehearsal of gpu-short on a CPU (`python -m benchmarks.accelerator --tiny`): "
      "ResNet-8 at half width on 256 training and 200 test images, 2 epochs, Padam and SGD-M. "
      "It checks the pipeline, not the optimizers.",
    ),
    *(
      Protocol(
        name=f"paper-cifar10-{model}",
        task="cifar10",
        setting=f"paper-cifar10-{model}",
        config=dict(model=model, epochs=200, batch_size=128),
        variants=_seven(),
        paper=(f"paper: {model}", PAPER_CIFAR10_ACC[model]),
        about="The paper's exact CIFAR-10 configuration (its Section 5), for GPU/TPU.",
      )
      for model in PAPER_CIFAR10_ACC
    ),
    *(
      Protocol(
        name=f"paper-ptb-{model}",
        task="ptb",
        setting=f"paper-ptb-{model}",
        config=dict(model=model, epochs=200, batch_size=20),
        variants=_seven(),
        paper=(f"paper: {model}", PAPER_PTB_PPL[model]),
        about="The paper's PTB configuration (its Section 5; LSTM sizes are this project's "
        "choice).",
      )
      for model in PAPER_PTB_PPL
    ),
  )
}


def slug(label: str) -> str:
  """A label as a folder name: ``"padam p=1/4"`` -> ``"padam-p1_4"``."""
  return label.replace(" ", "-").replace("/", "_").replace("=", "")


def run_dir(
  protocol: Protocol, variant: Variant, seed: int, root: pathlib.Path = RESULTS
) -> pathlib.Path:
  """The folder of an untuned protocol's run: ``root/runs/SETTING/LABEL-seedS`` (a tuned one's is
  :func:`benchmarks.tuning.run_dir`)."""
  return root / "runs" / protocol.setting / f"{slug(variant.run or variant.label)}-seed{seed}"


def finished_epochs(workdir: pathlib.Path) -> int:
  """The epochs the run in ``workdir`` has finished (0 when it has no metrics file)."""
  try:
    return len(metrics.read_metrics(workdir))
  except FileNotFoundError:
    return 0
