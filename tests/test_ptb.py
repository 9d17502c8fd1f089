"""The Penn Treebank trainer (examples/ptb) on tiny vocabularies and models.

Covers the data (files, download cache, vocabulary, BPTT windows), the LSTM (against a NumPy
reference, and carried state against whole sequences), exact evaluation over padded streams, and
runs of the shared loop (learning, resume, the command line).
"""

import dataclasses
import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples import metrics
from examples.ptb import input_pipeline, models, train

TIMING = {"epoch_seconds", "train_seconds", "eval_seconds", "tokens_per_second"}
# Small enough to compile in about a second; with every kind of dropout, so that resumption has to
# reproduce the dropout masks.
TEST_SPECS = {
  "test-lstm": models.ModelSpec(embed_size=12, hidden_sizes=(16, 10), init_scale=0.3, bptt=6),
  "test-dropout": models.ModelSpec(
    embed_size=12,
    hidden_sizes=(16, 12),
    tie_weights=True,
    init_scale=None,
    locked_dropout=True,
    dropout_embed=0.1,
    dropout_input=0.2,
    dropout_hidden=0.2,
    dropout_output=0.2,
    dropout_weight=0.3,
    bptt=6,
    clip=0.5,
  ),
}


@pytest.fixture(autouse=True)
def _test_models(monkeypatch):
  for name, spec in TEST_SPECS.items():
    monkeypatch.setitem(models.MODELS, name, spec)


def write_corpus(folder, train_text, valid_text, test_text):
  folder.mkdir(parents=True, exist_ok=True)
  for split, text in (("train", train_text), ("valid", valid_text), ("test", test_text)):
    (folder / f"ptb.{split}.txt").write_text(text)
  return folder


PATTERN = " the cat sat on a mat\n a dog ran\n"


def pattern_corpus(repeats=60):
  train_words = (PATTERN * repeats).replace("\n", " <eos> ").split()
  valid_words = (PATTERN * 8).replace("\n", " <eos> ").split()
  vocab = input_pipeline.build_vocab(train_words)
  return input_pipeline.Corpus(
    vocab,
    input_pipeline.encode(train_words, vocab),
    input_pipeline.encode(valid_words, vocab),
    input_pipeline.encode(valid_words[5:], vocab),
  )


@nnx.jit
def forward(model, tokens, carry, rng=None):
  # Jitted so that the scan over time compiles once per shape, not at every eager call.
  return model(tokens, carry, rng=rng)


@functools.partial(nnx.jit, static_argnums=0)
def eval_loss(task, model, batch, carry):
  return task.loss(model, batch, carry, None, train=False)


def without_timing(history):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


# Data.


def test_read_words_vocab_and_encode(tmp_path):
  folder = write_corpus(tmp_path, " b a\n a c a\n", " a b\n", " c\n")
  words = input_pipeline.read_words(folder / "ptb.train.txt")
  assert words == ["b", "a", "<eos>", "a", "c", "a", "<eos>"]
  vocab = input_pipeline.build_vocab(words)
  assert vocab == ("a", "<eos>", "b", "c")  # by frequency, then alphabetical
  corpus = input_pipeline.load(folder)
  np.testing.assert_array_equal(corpus.train, [2, 0, 1, 0, 3, 0, 1])
  np.testing.assert_array_equal(corpus.valid, [0, 2, 1])
  assert corpus.train.dtype == np.int32
  assert input_pipeline.load(folder, train_tokens=3).train.size == 3


@pytest.mark.parametrize("split", ["valid", "test"])
def test_unknown_words_in_valid_or_test_raise_a_clear_error(tmp_path, split):
  texts = {"train": " a b\n", "valid": " a\n", "test": " b\n"}
  texts[split] = " a zebra b yak\n"
  folder = write_corpus(tmp_path, texts["train"], texts["valid"], texts["test"])
  with pytest.raises(input_pipeline.DataError, match=f"the {split} split has 2 word type") as e:
    input_pipeline.load(folder)
  assert "'yak'" in str(e.value) and "'zebra'" in str(e.value)


def test_missing_files_name_the_folder_and_the_fix(tmp_path, monkeypatch):
  monkeypatch.delenv("PADAM_DATA_DIR", raising=False)
  write_corpus(tmp_path, " a\n", " a\n", " a\n")
  (tmp_path / "ptb.test.txt").unlink()
  with pytest.raises(input_pipeline.DataError, match=r"--data-dir .*lacks ptb\.test\.txt"):
    input_pipeline.resolve_data_dir(tmp_path)
  monkeypatch.setenv("PADAM_DATA_DIR", str(tmp_path))
  with pytest.raises(input_pipeline.DataError, match=r"\$PADAM_DATA_DIR"):
    input_pipeline.resolve_data_dir(None)


def test_download_checks_md5_and_caches(tmp_path, monkeypatch):
  source = write_corpus(tmp_path / "source", " a b\n", " a\n", " b\n")
  md5 = {
    s: hashlib.md5((source / f"ptb.{s}.txt").read_bytes()).hexdigest()
    for s in input_pipeline.SPLITS
  }
  monkeypatch.setattr(input_pipeline, "BASE_URL", source.as_uri() + "/")
  monkeypatch.setattr(input_pipeline, "MD5", md5)
  monkeypatch.setenv("PADAM_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("PADAM_DATA_DIR", raising=False)

  folder = input_pipeline.resolve_data_dir(None)  # downloads over file://
  assert folder == tmp_path / "cache" / "ptb"
  for split in input_pipeline.SPLITS:
    name = f"ptb.{split}.txt"
    assert (folder / name).read_bytes() == (source / name).read_bytes()
  assert not list(folder.glob("*.partial"))

  def no_network(url, destination):
    raise AssertionError(f"fetched {url} although it is cached")

  monkeypatch.setattr(input_pipeline, "_fetch", no_network)
  assert input_pipeline.load(None).vocab == ("<eos>", "a", "b")

  # A corrupt cached file is reported, not used.
  (folder / "ptb.valid.txt").write_text(" b\n")
  with pytest.raises(input_pipeline.DataError, match="corrupt"):
    input_pipeline.resolve_data_dir(None)


def test_download_with_wrong_checksum_caches_nothing(tmp_path):
  source = write_corpus(tmp_path / "source", " a b\n", " a\n", " b\n")
  cache = tmp_path / "cache"
  with pytest.raises(input_pipeline.DataError, match="md5"):
    input_pipeline.download(cache, base_url=source.as_uri() + "/")  # the official md5s
  assert list(cache.iterdir()) == []


def test_failed_download_says_how_to_fix_it(tmp_path):
  with pytest.raises(input_pipeline.DataError, match="--data-dir"):
    input_pipeline.download(tmp_path, base_url=(tmp_path / "nowhere").as_uri() + "/")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("n", "rows", "bptt"), [(101, 4, 5), (100, 3, 7), (58, 2, 4), (9, 8, 1)])
def test_training_windows_cover_a_prefix_exactly_once_in_order(n, rows, bptt):
  stream = np.arange(n, dtype=np.int32) + 7  # distinct ids: any repeat or reorder shows
  w = input_pipeline.bptt_windows(stream, rows, bptt, pad=False)
  assert w.inputs.shape == w.targets.shape and w.inputs.shape[1:] == (rows, bptt)
  assert np.all(w.weights == 1.0)
  # Row r continues across windows: stitching windows per row, then rows, gives the stream.
  inputs = w.inputs.transpose(1, 0, 2).reshape(-1)
  targets = w.targets.transpose(1, 0, 2).reshape(-1)
  used = inputs.size
  np.testing.assert_array_equal(inputs, stream[:used])
  np.testing.assert_array_equal(targets, stream[1 : used + 1])
  assert 0 <= (n - 1) - used < rows * bptt  # only the tail that fills no window is dropped


@pytest.mark.parametrize(("n", "rows", "bptt"), [(101, 4, 5), (100, 3, 7), (58, 2, 4), (5, 8, 3)])
def test_evaluation_windows_cover_every_pair_exactly_once_in_order(n, rows, bptt):
  stream = np.arange(n, dtype=np.int32) + 7
  w = input_pipeline.bptt_windows(stream, rows, bptt, pad=True)
  weights = w.weights.transpose(1, 0, 2).reshape(-1)
  real = weights == 1.0
  assert np.all((weights == 0.0) | real)
  assert real.sum() == n - 1
  assert not np.any(np.diff(real.astype(np.int8)) > 0)  # padding only after the last real pair
  np.testing.assert_array_equal(w.inputs.transpose(1, 0, 2).reshape(-1)[real], stream[:-1])
  np.testing.assert_array_equal(w.targets.transpose(1, 0, 2).reshape(-1)[real], stream[1:])


def test_too_few_training_tokens_is_a_clear_error():
  with pytest.raises(ValueError, match="fewer than one window"):
    input_pipeline.bptt_windows(np.arange(20), 4, 5, pad=False)


# Models.


def numpy_lstm(x, h, c, w_ih, w_hh, b):
  """An LSTM layer from the equations, in float64: gates i, f, g, o."""
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
  outputs = []
  for t in range(x.shape[1]):
    z = x[:, t] @ w_ih + h @ w_hh + b
    i, f, g, o = np.split(z, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    outputs.append(h)
  return np.stack(outputs, axis=1), h, c


def test_lstm_layer_matches_numpy_reference():
  layer = models.LSTMLayer(5, 7, 0.5, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 5)).astype(np.float32)
  h0 = rng.normal(size=(3, 7)).astype(np.float32)
  c0 = rng.normal(size=(3, 7)).astype(np.float32)
  out, (h, c) = layer(jnp.asarray(x), (jnp.asarray(h0), jnp.asarray(c0)))
  params = [np.asarray(p, np.float64) for p in (layer.w_ih[...], layer.w_hh[...], layer.bias[...])]
  ref_out, ref_h, ref_c = numpy_lstm(x.astype(np.float64), h0, c0, *params)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(c, ref_c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["test-lstm", "test-dropout"])
def test_carried_state_equals_the_whole_sequence_at_once(name):
  model = models.create_model(name, 11, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 18), 0, 11)
  whole, whole_carry = forward(model, tokens, model.zero_carry(3))  # no key: deterministic
  carry, parts = model.zero_carry(3), []
  for start in range(0, 18, 6):
    logits, carry = forward(model, tokens[:, start : start + 6], carry)
    parts.append(logits)
  np.testing.assert_allclose(jnp.concatenate(parts, axis=1), whole, rtol=1e-5, atol=1e-5)
  for (h, c), (h_ref, c_ref) in zip(carry, whole_carry, strict=True):
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-5)


def test_dropout_only_with_a_key():
  model = models.create_model("test-dropout", 11, rngs=nnx.Rngs(0))
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 11
  plain, _ = forward(model, tokens, model.zero_carry(2))
  again, _ = forward(model, tokens, model.zero_carry(2))
  dropped, _ = forward(model, tokens, model.zero_carry(2), jax.random.key(0))
  np.testing.assert_array_equal(plain, again)
  assert not np.allclose(plain, dropped)


def test_unknown_model_names_list_the_valid_ones(tmp_path):
  with pytest.raises(ValueError, match="lstm2-small") as e:
    models.create_model("lstm4", 10, rngs=nnx.Rngs(0))
  for name in ("lstm2-medium", "lstm2", "lstm3"):
    assert name in str(e.value)
  with pytest.raises(ValueError, match=r"valid models: .*lstm2-small"):
    train.train_and_evaluate(train.Config(model="gru2", workdir=str(tmp_path)), pattern_corpus(2))
  with pytest.raises(ValueError, match="cannot tie"):
    models.get_spec("test-lstm", tie_weights=True)


def test_paper_sizes():
  # The sizes documented in models.py and the README.
  counts = {
    name: models.count_params(
      nnx.eval_shape(lambda n=name: models.create_model(n, 10_000, rngs=nnx.Rngs(0)))
    )
    for name in ("lstm2-small", "lstm2", "lstm3")
  }
  assert counts == {"lstm2-small": 4_651_600, "lstm2": 13_626_200, "lstm3": 24_210_800}


# Evaluation and training through the shared loop.


def test_evaluation_is_exact_over_the_whole_stream():
  rows = 3
  corpus = pattern_corpus(4)
  task = train.PtbTask(
    train.Config(model="test-lstm", batch_size=2, eval_batch_size=rows, bptt=5), corpus
  )
  model = task.init_model(nnx.Rngs(params=jax.random.key(3)))
  windows = task.evaluation_windows()["valid"]
  total = count = 0.0
  carry = task.init_carry(rows)
  for w in range(windows.inputs.shape[0]):
    batch = {k: jnp.asarray(getattr(windows, k)[w]) for k in ("inputs", "targets", "weights")}
    _, (carry, sums) = eval_loss(task, model, batch, carry)
    total, count = total + float(sums["loss"]), count + float(sums["count"])
  # Reference: each row's real pairs in one call from a zero state, log-softmax in NumPy.
  stream = corpus.valid
  pairs = stream.size - 1
  length = windows.inputs.shape[0] * windows.inputs.shape[2]  # ceil(pairs / rows), whole windows
  ref_total = 0.0
  for r in range(rows):
    x = stream[r * length : min((r + 1) * length, pairs)]
    y = stream[r * length + 1 : min((r + 1) * length, pairs) + 1]
    if x.size == 0:
      continue
    logits, _ = forward(model, jnp.asarray(x[None]), task.init_carry(1))
    logits = np.asarray(logits[0], np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref_total -= log_probs[np.arange(y.size), y].sum()
  assert count == pairs
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)


def run_config(tmp_path, name="run", **kwargs):
  base = dict(
    model="test-lstm",
    optimizer="adam",
    learning_rate=0.03,
    epochs=2,
    batch_size=4,
    eval_batch_size=2,
    workdir=str(tmp_path / name),
    devices=1,
    progress=False,
  )
  return train.Config(**{**base, **kwargs})


@pytest.fixture(scope="module")
def pattern_run(tmp_path_factory):
  """A 4-epoch run on the repeated pattern, shared by the tests that read it (compiling is slow)."""
  # Module scope: outside the per-test strict promotion, which optax's step-decay schedule (a float
  # compared with an int32 step) does not satisfy.
  with pytest.MonkeyPatch.context() as patch:
    for name, spec in TEST_SPECS.items():
      patch.setitem(models.MODELS, name, spec)
    config = run_config(tmp_path_factory.mktemp("pattern"), epochs=4)
    return config, train.train_and_evaluate(config, pattern_corpus())


def test_tiny_model_learns_a_repeated_pattern(pattern_run):
  config, history = pattern_run
  first, last = history[0], history[-1]
  assert first["train_ppl"] > 3.0  # about uniform over 9 words at the start
  # Every word follows from the two before it; only the first words of each row are guesses.
  assert last["valid_ppl"] < 1.3 and last["test_ppl"] < 1.3
  assert last["train_loss"] < first["train_loss"]
  for key in ("epoch", "step", "lr", "train_loss", "train_ppl", "valid_ppl", "test_ppl"):
    assert key in last
  assert last["tokens_per_second"] > 0 and last["epoch_seconds"] > 0
  np.testing.assert_allclose(last["valid_ppl"], np.exp(last["valid_loss"]))
  run = metrics.read_run(config.workdir)
  assert run["optimizer"]["task"] == "ptb2" and run["optimizer"]["optimizer"] == "adam"


@pytest.mark.standard_promotion
def test_two_devices_match_one(pattern_run, tmp_path):
  # The batch rows and the carried LSTM state are split over the devices; the numbers stay the same.
  assert len(jax.devices()) >= 2, "tests/conftest.py forces 8 host devices"
  config, history = pattern_run
  two = dataclasses.replace(config, workdir=str(tmp_path / "two"), devices=2, stop_after_epoch=1)
  (record,) = train.train_and_evaluate(two, pattern_corpus())
  assert len(metrics.read_run(two.workdir)["devices"]) == 2
  a, b = without_timing(history)[0], without_timing([record])[0]
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=key)


@pytest.mark.standard_promotion
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
  corpus = pattern_corpus(20)
  kwargs = dict(model="test-dropout", optimizer="padam", epochs=2, learning_rate=0.1)
  full = train.train_and_evaluate(run_config(tmp_path, "full", **kwargs), corpus)
  cfg = run_config(tmp_path, "parts", **kwargs)
  assert len(train.train_and_evaluate(dataclasses.replace(cfg, stop_after_epoch=1), corpus)) == 1
  resumed = train.train_and_evaluate(dataclasses.replace(cfg, resume=True), corpus)
  assert without_timing(resumed) == without_timing(full)
  assert without_timing(metrics.read_metrics(cfg.workdir)) == without_timing(full)
  assert full[0]["train_loss"] != full[1]["train_loss"]


@pytest.mark.standard_promotion
def test_command_line_writes_the_metrics(tmp_path, monkeypatch):
  from examples.ptb import __main__ as cli_main

  monkeypatch.delenv("PADAM_DATA_DIR", raising=False)
  folder = write_corpus(tmp_path / "data", PATTERN * 30, PATTERN * 3, PATTERN * 2)
  workdir = tmp_path / "run"
  argv = ["--model", "test-lstm", "--optimizer", "sgdm", "--epochs", "1", "--batch-size", "4"]
  argv += ["--bptt", "5", "--clip", "1.0", "--data-dir", str(folder), "--workdir", str(workdir)]
  argv += ["--devices", "1", "--no-progress", "--no-xnnpack", "--train-tokens", "300"]
  argv += ["--eval-batch-size", "3"]
  assert cli_main.main(argv) == 0
  (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # 300 tokens: 299 pairs in 4 rows of 70 (14 windows of 5) are trained on.
  assert record["step"] == 14
  for key in ("lr", "train_loss", "train_ppl", "valid_ppl", "test_ppl", "tokens_per_second"):
    assert np.isfinite(record[key])
  config = metrics.read_run(workdir)["config"]
  assert config["clip"] == 1.0 and config["train_tokens"] == 300
  # A missing data folder is one line of error, exit status 2.
  missing = ["--data-dir", str(tmp_path / "none"), "--workdir", str(tmp_path / "other")]
  assert cli_main.main([*missing, "--devices", "1", "--no-progress"]) == 2


@pytest.mark.standard_promotion
def test_test_stream_is_scored_only_when_due(tmp_path):
  # --test-every 2 over 3 epochs: validation every epoch, the test stream after epochs 2 and 3.
  config = run_config(tmp_path, epochs=3, test_every=2, train_tokens=200)
  history = train.train_and_evaluate(config, pattern_corpus(4))
  assert [("valid_ppl" in r, "test_ppl" in r) for r in history] == [
    (True, False),
    (True, True),
    (True, True),
  ]
