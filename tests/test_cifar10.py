"""The CIFAR-10 trainer: augmentation, data loading and its errors, models, a short run, the CLI."""

import hashlib
import io
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples import metrics
from examples.cifar10 import __main__ as cli_main
from examples.cifar10 import input_pipeline, models, train

# optax's piecewise-constant schedule (the registry's step decay) compares a float with the int32
# step count, which strict dtype promotion rejects; only the training runs below need this.
standard = pytest.mark.standard_promotion


class TinyNet(nnx.Module):
  """Batch statistics and a linear layer: the smallest CIFAR-10 model with the real one's state."""

  def __init__(self, rngs, dtype=jnp.float32):
    self.norm = nnx.BatchNorm(3, rngs=rngs)
    self.out = nnx.Linear(3, 10, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.mean(self.norm(x), axis=(1, 2)))


def synthetic_cifar(n_train=60, n_test=30, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
    "y_train": np.arange(n_train, dtype=np.int64) % 10,
    "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
    "y_test": np.arange(n_test, dtype=np.int64) % 10,
  }


@pytest.fixture
def data_dir(tmp_path):
  folder = tmp_path / "data"
  folder.mkdir()
  np.savez(folder / "cifar10.npz", **synthetic_cifar())
  return folder


# --- augmentation ------------------------------------------------------------------------------


def all_crops(image):
  """Every image the augmentation may produce from ``image``: 9x9 offsets, flipped or not."""
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  h, w = image.shape[:2]
  crops = [padded[i : i + h, j : j + w] for i in range(9) for j in range(9)]
  return crops + [c[:, ::-1] for c in crops]


def test_crop_flip_outputs_are_padded_crops_possibly_flipped():
  images = np.arange(64 * 6 * 5 * 3, dtype=np.int32).reshape(64, 6, 5, 3) % 251 + 1
  out = np.asarray(input_pipeline.random_crop_flip(jnp.asarray(images), jax.random.key(0)))
  assert out.shape == images.shape and out.dtype == images.dtype
  offsets, flips = set(), 0
  for image, result in zip(images, out, strict=True):
    crops = all_crops(image)
    matches = [k for k, crop in enumerate(crops) if np.array_equal(crop, result)]
    assert matches, "an output is not a padded crop of its input"
    offsets.add(matches[0] % 81)
    flips += matches[0] >= 81
  # 64 draws out of 81 offsets and a fair coin: many offsets, both flip states.
  assert len(offsets) > 20 and 10 < flips < 54


def test_crop_flip_is_seeded_and_pads_with_zeros():
  images = jnp.full((256, 16, 16, 1), 7, jnp.uint8)
  a = input_pipeline.random_crop_flip(images, jax.random.key(1))
  b = input_pipeline.random_crop_flip(images, jax.random.key(1))
  c = input_pipeline.random_crop_flip(images, jax.random.key(2))
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  assert set(np.unique(np.asarray(a)).tolist()) == {0, 7}  # zero padding shows in shifted crops
  # A shift of at most 4 pixels never reaches the centre 8x8 of a 16x16 image.
  assert np.all(np.asarray(a)[:, 4:12, 4:12] == 7)


def test_crop_flip_does_not_depend_on_sharding():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8))
  key = jax.random.key(3)
  expected = input_pipeline.random_crop_flip(images, key)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  got = jax.jit(input_pipeline.random_crop_flip)(sharded, key)
  np.testing.assert_array_equal(got, expected)


def test_normalize_matches_the_reference_formula():
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  expected = (images / 255.0 - np.array([0.4914, 0.4822, 0.4465])) / np.array(
    [0.2023, 0.1994, 0.2010]
  )
  got = input_pipeline.normalize(jnp.asarray(images))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- data loading --------------------------------------------------------------------------------


def test_load_reads_the_npz(data_dir):
  train_split, test_split = input_pipeline.load(data_dir)
  arrays = synthetic_cifar()
  np.testing.assert_array_equal(train_split.images, arrays["x_train"])
  np.testing.assert_array_equal(test_split.labels, arrays["y_test"])
  assert train_split.labels.dtype == np.int32


def test_data_dir_from_environment(data_dir, monkeypatch):
  monkeypatch.setenv("PADAM_DATA_DIR", str(data_dir))
  assert input_pipeline.resolve_data_file(None, download=False) == data_dir / "cifar10.npz"


def test_balanced_subset_is_seeded_and_balanced(data_dir):
  train_split, _ = input_pipeline.load(data_dir)
  a = input_pipeline.balanced_subset(train_split, 23, seed=0)
  b = input_pipeline.balanced_subset(train_split, 23, seed=0)
  c = input_pipeline.balanced_subset(train_split, 23, seed=1)
  counts = np.bincount(a.labels, minlength=10)
  assert counts.sum() == 23 and counts.max() - counts.min() <= 1
  assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
  few_zeros = input_pipeline.Split(train_split.images, np.maximum(train_split.labels, 1))
  with pytest.raises(ValueError, match="class 0 has 0 examples"):
    input_pipeline.balanced_subset(few_zeros, 20, seed=0)


def test_missing_data_says_where_it_looked(tmp_path):
  with pytest.raises(input_pipeline.DataError, match="--data-dir") as error:
    input_pipeline.load(tmp_path / "nowhere")
  assert "nowhere" in str(error.value) and "cifar10.npz" in str(error.value)


def test_corrupt_npz_is_reported(tmp_path):
  (tmp_path / "cifar10.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
  with pytest.raises(input_pipeline.DataError, match="not a readable"):
    input_pipeline.load(tmp_path)


@pytest.mark.parametrize(
  ("change", "message"),
  [
    (lambda d: d.pop("y_test"), "lacks the arrays"),
    (lambda d: d.update(x_train=d["x_train"][:, :16]), "shape"),
    (lambda d: d.update(x_test=d["x_test"].astype(np.float32)), "uint8"),
    (lambda d: d.update(y_train=d["y_train"] + 5), "labels outside"),
    (lambda d: d.update(y_test=d["y_test"][:5]), "labels of shape"),
  ],
)
def test_malformed_npz_is_reported(tmp_path, change, message):
  arrays = synthetic_cifar()
  change(arrays)
  np.savez(tmp_path / "cifar10.npz", **arrays)
  with pytest.raises(input_pipeline.DataError, match=message):
    input_pipeline.load(tmp_path)


def official_archive(path, arrays):
  """A tar.gz in the official python format: 5 training pickles, a test pickle, CHW rows."""

  def rows(x):
    return x.transpose(0, 3, 1, 2).reshape(len(x), 3072)

  x_parts = np.array_split(arrays["x_train"], 5)
  y_parts = np.array_split(arrays["y_train"], 5)
  members = {f"data_batch_{i + 1}": (x_parts[i], y_parts[i]) for i in range(5)}
  members["test_batch"] = (arrays["x_test"], arrays["y_test"])
  with tarfile.open(path, "w:gz") as tar:
    for name, (x, y) in members.items():
      blob = pickle.dumps(
        {
          b"batch_label": name.encode(),
          b"labels": [int(v) for v in y],
          b"data": rows(x),
          b"filenames": [b"x.png"] * len(y),
        },
        protocol=2,
      )
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return hashlib.md5(path.read_bytes()).hexdigest()


def test_convert_official_archive(tmp_path):
  arrays = synthetic_cifar()
  md5 = official_archive(tmp_path / "cifar.tar.gz", arrays)
  input_pipeline.convert_archive(
    tmp_path / "cifar.tar.gz", tmp_path / "out" / "cifar10.npz", md5=md5
  )
  train_split, test_split = input_pipeline.load(tmp_path / "out")
  np.testing.assert_array_equal(train_split.images, arrays["x_train"])
  np.testing.assert_array_equal(train_split.labels, arrays["y_train"])
  np.testing.assert_array_equal(test_split.images, arrays["x_test"])
  with pytest.raises(input_pipeline.DataError, match="md5"):
    input_pipeline.convert_archive(tmp_path / "cifar.tar.gz", tmp_path / "x.npz")  # official md5


def test_download_converts_once_into_the_cache(tmp_path, monkeypatch):
  md5 = official_archive(tmp_path / "served.tar.gz", synthetic_cifar())
  fetched = []

  def fake_urlretrieve(url, filename):
    fetched.append(url)
    with open(filename, "wb") as f:
      f.write((tmp_path / "served.tar.gz").read_bytes())

  monkeypatch.delenv("PADAM_DATA_DIR", raising=False)
  monkeypatch.setenv("PADAM_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(input_pipeline, "ARCHIVE_MD5", md5)
  monkeypatch.setattr(input_pipeline.urllib.request, "urlretrieve", fake_urlretrieve)
  path = input_pipeline.resolve_data_file(None)
  assert path == tmp_path / "cache" / "cifar10.npz" and path.is_file()
  assert input_pipeline.resolve_data_file(None) == path
  assert fetched == [input_pipeline.ARCHIVE_URL]  # converted once, then read from the cache


# --- models ----------------------------------------------------------------------------------------


def he_resnet_params(blocks, widths):
  """Parameters of He et al.'s CIFAR ResNet with option-A shortcuts, counted from its description."""
  conv_bn = lambda cin, cout: 9 * cin * cout + 2 * cout  # noqa: E731
  total = conv_bn(3, widths[0])
  cin = widths[0]
  for width in widths:
    for _ in range(blocks):
      total += conv_bn(cin, width) + conv_bn(width, width)
      cin = width
  return total + cin * 10 + 10


@pytest.mark.parametrize(
  ("name", "blocks", "widths"),
  [("resnet20", 3, (16, 32, 64)), ("resnet8", 1, (16, 32, 64)), ("resnet20_w2", 3, (32, 64, 128))],
)
def test_he_resnets_have_the_expected_size(name, blocks, widths):
  model = nnx.eval_shape(lambda: models.create_model(name, rngs=nnx.Rngs(0)))
  assert models.count_params(model) == he_resnet_params(blocks, widths)


def test_every_model_maps_images_to_logits():
  for name in models.MODELS:
    model = nnx.eval_shape(lambda name=name: models.create_model(name, rngs=nnx.Rngs(0)))
    out = jax.eval_shape(
      lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    )
    assert out.shape == (2, 10), name


def test_unknown_model_lists_the_valid_ones():
  with pytest.raises(ValueError, match="resnet20") as error:
    models.create_model("resnet21", rngs=nnx.Rngs(0))
  assert "vgg16" in str(error.value) and "wrn16_4" in str(error.value)


# --- the trainer -----------------------------------------------------------------------------------

REQUIRED = (
  "epoch",
  "step",
  "lr",
  "train_loss",
  "train_acc",
  "test_loss",
  "test_acc",
  "epoch_seconds",
  "images_per_second",
)


@standard
def test_two_step_run_writes_metrics(data_dir, tmp_path, monkeypatch):
  # The records do not depend on the network: the smallest model with a real one's state (batch
  # statistics) compiles in a fraction of ResNet-8's time.
  monkeypatch.setitem(models.MODELS, "tiny", TinyNet)
  config = train.Config(
    model="tiny",
    optimizer="padam",
    epochs=1,
    batch_size=16,
    train_size=32,
    test_size=30,
    data_dir=str(data_dir),
    workdir=str(tmp_path / "run"),
    progress=False,
    eval_batch_size=16,
    devices=1,  # the records do not depend on the mesh; one device compiles in a fraction
  )
  history = train.train_and_evaluate(config)
  assert metrics.read_metrics(tmp_path / "run") == history
  (record,) = history
  assert set(REQUIRED) <= set(record)
  assert record["epoch"] == 1 and record["step"] == 2
  assert all(np.isfinite(record[k]) for k in REQUIRED)
  assert 0 <= record["test_acc"] <= 1 and record["images_per_second"] > 0


def test_cli_help_and_unknown_names(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli_main.parse_args(["--help"])
  assert exit_.value.code == 0
  assert "--train-size" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli_main.parse_args(["--model", "resnet21", "--workdir", "w"])
  err = capsys.readouterr().err
  assert "resnet21" in err and "resnet20" in err and "vgg16" in err
  with pytest.raises(SystemExit):
    cli_main.parse_args(["--optimizer", "padamm", "--workdir", "w"])
  err = capsys.readouterr().err
  assert "padamm" in err and "sgdm" in err


def test_unknown_names_through_the_python_api(tmp_path):
  with pytest.raises(ValueError, match="sgdm"):
    train.train_and_evaluate(train.Config(optimizer="padamm", workdir=str(tmp_path)))
  with pytest.raises(ValueError, match="vgg16"):
    train.train_and_evaluate(train.Config(model="vgg", workdir=str(tmp_path)))


def test_cli_reports_missing_data_in_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")  # main() adds the XNNPACK flag; restored afterwards
  code = cli_main.main(
    ["--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w"), "--no-progress"]
  )
  assert code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: CIFAR-10 not found") and "Traceback" not in err
