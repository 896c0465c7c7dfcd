"""The grain pipeline: batches, determinism across workers, resume, sharding, mixtures, tfds, paired sets."""
import io
import logging
import os

import cv2
import numpy as np
import pytest

from cassr_jax.data import degradations, images, pipeline, sources
from cassr_jax.data.sources import DataError

CROP = 64


def _save(path, rgb):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ok, buf = cv2.imencode(os.path.splitext(path)[1], np.ascontiguousarray(rgb[..., ::-1]))
  assert ok
  with open(path, "wb") as f:
    f.write(buf.tobytes())


def _photos():
  from skimage import data
  out = []
  for f in (data.astronaut, data.coffee, data.chelsea, data.rocket, data.immunohistochemistry, data.retina):
    img = f()
    h, w = img.shape[:2]
    out.append(np.ascontiguousarray(cv2.resize(img, (w * 96 // h, 96), interpolation=cv2.INTER_AREA)))
  return out  # six RGB photos, 96 px high


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  for i, img in enumerate(_photos()):
    _save(str(root / ("sub" if i % 2 else "") / f"p{i}.{'png' if i < 4 else 'jpg'}"), img)
  return str(root)


def _config(sources_spec, **overrides):
  c = pipeline.default_data_config()
  c.sources = sources_spec
  c.crop_size = CROP
  c.batch_size = 2
  c.num_epochs = 1
  c.num_workers = 0
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _examples(config, **kw):
  """{(epoch, index): batch row} over the whole dataset."""
  out = {}
  for batch in pipeline.make_train_dataset(config, process_index=0, process_count=1, **kw):
    for row in range(len(batch["index"])):
      out[(int(batch["epoch"][row]), int(batch["index"][row]))] = {k: v[row] for k, v in batch.items()}
  return out


def test_default_config_and_scale_link():
  c = pipeline.default_data_config()
  assert (c.crop_size, c.scale, c.degradation.name, c.degradation.scale) == (512, 4, "x4plus", 4)
  c.scale = 2
  assert c.degradation.scale == 2
  c.sources = "folder:/nonexistent"
  with pytest.raises(DataError, match="does not exist"):
    pipeline.make_train_dataset(c, process_index=0, process_count=1)


def test_batches_shapes_dtypes_ranges_and_crops(photo_dir):
  c = _config(f"folder:{photo_dir}", hflip=False)
  ex = _examples(c)
  assert len(ex) == 6
  photos = {i: p for i, p in enumerate(_photos())}
  names = sorted(sources.FolderSource(photo_dir).files)
  for (epoch, index), e in ex.items():
    assert set(e) == {"hr", "lr", "lr_up", "epoch", "index"}
    assert e["hr"].shape == (CROP, CROP, 3) and e["lr_up"].shape == (CROP, CROP, 3)
    assert e["lr"].shape == (CROP // 4, CROP // 4, 3)
    for k in ("hr", "lr", "lr_up"):
      assert e[k].dtype == np.float32 and 0.0 <= e[k].min() and e[k].max() <= 1.0
    # The HR is an exact crop of its source photo (PNG sources are lossless).
    src = photos[int(os.path.basename(names[index])[1])]
    if names[index].endswith(".png"):
      hr = np.rint(e["hr"] * 255).astype(np.uint8)
      hits = [(t, l) for t in range(src.shape[0] - CROP + 1) for l in range(src.shape[1] - CROP + 1)
              if src[t, l, 0] == hr[0, 0, 0] and np.array_equal(src[t:t + CROP, l:l + CROP], hr)]
      assert hits, names[index]


def test_lr_up_is_torch_bicubic_of_lr(photo_dir):
  torch = pytest.importorskip("torch")
  e = next(iter(_examples(_config(f"folder:{photo_dir}")).values()))
  lr = torch.from_numpy(e["lr"]).permute(2, 0, 1)[None].double()
  ref = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
  ref = ref.clamp(0, 1)[0].permute(1, 2, 0).numpy()
  assert np.abs(e["lr_up"] - ref).max() < 1e-5


def test_same_example_same_bits_whatever_the_workers_and_resume(photo_dir):
  """2 worker processes vs in-process: identical examples; and a restored iterator continues exactly."""
  c = _config(f"folder:{photo_dir}", num_epochs=2, batch_size=1)
  serial = _examples(c)
  assert len(serial) == 12
  assert not np.array_equal(serial[(0, 0)]["lr"], serial[(1, 0)]["lr"])  # a new epoch, a new degradation
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1, num_workers=2)
  got = [next(it) for _ in range(5)]
  state = pipeline.iterator_state(it)
  rest = list(it)
  for b in got + rest:
    key = (int(b["epoch"][0]), int(b["index"][0]))
    for k in ("hr", "lr", "lr_up"):
      assert np.array_equal(b[k][0], serial[key][k]), (key, k)
  assert len(got) + len(rest) == 12
  resumed = pipeline.make_train_iterator(c, process_index=0, process_count=1, num_workers=2, state=state)
  again = list(resumed)
  assert [int(b["index"][0]) for b in again] == [int(b["index"][0]) for b in rest]
  assert all(np.array_equal(a["lr"], b["lr"]) for a, b in zip(again, rest))


def test_orbax_checkpoint_of_the_iterator(photo_dir, tmp_path):
  import orbax.checkpoint as ocp
  c = _config(f"folder:{photo_dir}", num_epochs=0, batch_size=2)
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  for _ in range(4):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(data=pipeline.orbax_save_args(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  fresh = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(4, args=ocp.args.Composite(data=pipeline.orbax_restore_args(fresh)))
  for e in expected:
    b = next(fresh)
    assert np.array_equal(b["index"], e["index"]) and np.array_equal(b["lr"], e["lr"])
  # Past the 6 images of epoch 0, the stream continues into epoch 1.
  assert max(int(e["epoch"].max()) for e in expected) >= 1


def test_hosts_read_disjoint_shards(photo_dir):
  c = _config(f"folder:{photo_dir}", batch_size=1, drop_remainder=False)
  seen = []
  for p in range(2):
    batches = list(pipeline.make_train_dataset(c, process_index=p, process_count=2))
    seen.append({int(b["index"][0]) for b in batches})
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(6))
  assert len(seen[0]) == len(seen[1]) == 3


def test_weighted_mixture(photo_dir, tmp_path):
  other = tmp_path / "other"
  for i, img in enumerate(_photos()):
    _save(str(other / f"q{i}.png"), img[::-1])
  c = _config([{"kind": "folder", "path": photo_dir, "weight": 3.0},
               {"kind": "folder", "path": str(other), "weight": 1.0}], batch_size=1, num_epochs=0)
  ds = pipeline.make_train_dataset(c, process_index=0, process_count=1, keep_names=True)
  it = iter(ds)
  names = [str(next(it)["name"][0]) for _ in range(80)]
  frac = sum(str(other) not in n for n in names) / len(names)
  assert abs(frac - 0.75) <= 0.05
  assert sources.parse_sources("folder:/a*3, tfds:div2k/bicubic_x4@validation")[1] == sources.SourceSpec(
      "tfds", "div2k/bicubic_x4", 1.0, "validation")
  with pytest.raises(DataError, match="kind"):
    sources.parse_sources("ftp:/x")


def _build_tiny_tfds(data_dir, photos):
  tfds = pytest.importorskip("tensorflow_datasets")

  class CassrTinyPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "hr": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.Tensor(shape=(), dtype=np.int64)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, p in enumerate(photos):
        ok, buf = cv2.imencode(".png", p[..., ::-1])
        yield i, {"hr": io.BytesIO(buf.tobytes()), "label": i}  # encoded bytes: no TensorFlow needed

  CassrTinyPhotos(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return "cassr_tiny_photos"


def test_tfds_source_built_locally(tmp_path):
  photos = [p[:92, :92] for p in _photos()[:4]]
  name = _build_tiny_tfds(str(tmp_path), photos)
  src = sources.TfdsSource(name, split="train", data_dir=str(tmp_path))
  assert len(src) == 4 and isinstance(src[0]["image"], bytes)
  c = _config([{"kind": "tfds", "path": name, "split": "train", "data_dir": str(tmp_path)}], crop_size=0,
              batch_size=1, shuffle=False, hflip=False)
  got = list(pipeline.make_train_dataset(c, process_index=0, process_count=1))
  assert len(got) == 4
  matched = set()
  for b in got:  # tfds stores examples in its own (hashed) order: match them by content
    hr = np.rint(b["hr"][0] * 255).astype(np.uint8)
    matched |= {i for i, p in enumerate(photos) if np.array_equal(hr, p)}  # the whole image, exactly
    assert b["lr"].shape == (1, 23, 23, 3)
  assert matched == {0, 1, 2, 3}
  with pytest.raises(DataError, match="no feature 'image'"):
    sources.TfdsSource(name, data_dir=str(tmp_path), image_key="image")
  with pytest.raises(DataError, match="cannot be opened"):
    sources.TfdsSource("cassr_missing_dataset", data_dir=str(tmp_path))


def test_paired_source_with_references_stays_aligned(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(3):
    lr = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, 4, 0), 4, 1)  # HR = nearest-upsampled LR: alignment is checkable
    _save(str(tmp_path / "hr" / f"{i:03d}.png"), hr)
    _save(str(tmp_path / "lr" / f"{i:03d}.png"), lr)
    _save(str(tmp_path / "ref" / f"{i:03d}.png"), 255 - hr)
  c = _config(f"paired:{tmp_path}", crop_size=32, batch_size=1, num_epochs=3, hflip=True, rotate=True)
  got = list(pipeline.make_train_dataset(c, process_index=0, process_count=1))
  assert len(got) == 9
  for b in got:
    hr, lr, ref = (np.rint(b[k][0] * 255).astype(np.uint8) for k in ("hr", "lr", "ref"))
    assert hr.shape == ref.shape == (32, 32, 3) and lr.shape == (8, 8, 3)
    np.testing.assert_array_equal(hr, np.repeat(np.repeat(lr, 4, 0), 4, 1))
    np.testing.assert_array_equal(ref, 255 - hr)
  # Missing references in one example: that example is skipped with a warning naming it.
  os.remove(tmp_path / "ref" / "001.png")
  assert len(sources.PairedSource(tmp_path)) == 2


def test_damaged_files_skipped_once_and_an_all_damaged_source_stops(photo_dir, tmp_path, caplog):
  bad = tmp_path / "mixed"
  for i, img in enumerate(_photos()[:3]):
    _save(str(bad / f"ok{i}.png"), img)
  ok, buf = cv2.imencode(".png", _photos()[3])
  (bad / "truncated.png").write_bytes(buf.tobytes()[:len(buf) // 2])  # header fine, data cut
  c = _config(f"folder:{bad}", batch_size=1, num_epochs=3)
  with caplog.at_level(logging.WARNING, logger="cassr_jax.data"):
    ex = _examples(c)
  assert len(ex) == 9 and {i for _, i in ex} == {0, 1, 2}
  warned = [r.getMessage() for r in caplog.records if "truncated.png" in r.getMessage()]
  assert len(warned) == 1 and "truncated" in warned[0]
  all_bad = tmp_path / "all_bad"
  all_bad.mkdir()
  for i in range(4):
    (all_bad / f"t{i}.png").write_bytes(buf.tobytes()[:len(buf) // 2])
  c = _config(f"folder:{all_bad}", batch_size=1, num_epochs=0, max_consecutive_failures=5)
  with pytest.raises(DataError, match="unusable images in a row"):
    next(iter(pipeline.make_train_dataset(c, process_index=0, process_count=1)))


def test_small_images_pad_or_skip(tmp_path, caplog):
  photos = _photos()
  _save(str(tmp_path / "big.png"), photos[0])
  _save(str(tmp_path / "small.png"), photos[1][:40, :50])
  _save(str(tmp_path / "tiny.png"), photos[2][:5, :5])
  c = _config(f"folder:{tmp_path}", batch_size=1, shuffle=False, hflip=False, min_image_size=8)
  with caplog.at_level(logging.WARNING, logger="cassr_jax.data"):
    padded = list(pipeline.make_train_dataset(c, process_index=0, process_count=1))
  assert len(padded) == 2  # tiny is skipped whatever the policy
  assert any("tiny.png" in r.getMessage() for r in caplog.records)
  small = next(b for b in padded if int(b["index"][0]) == 1)["hr"][0]
  np.testing.assert_array_equal(np.rint(small[:40, :50] * 255).astype(np.uint8), photos[1][:40, :50])
  np.testing.assert_array_equal(small[40:42], small[38:36:-1])  # reflect-101 padding below
  c.small_images = "skip"
  skipped = list(pipeline.make_train_dataset(c, process_index=0, process_count=1))
  assert len(skipped) == 1


def test_example_maker_is_a_pure_function_of_the_triple(photo_dir):
  c = _config(f"folder:{photo_dir}")
  src = sources.FolderSource(photo_dir)
  m1 = pipeline.ExampleMaker(c, len(src))
  m2 = pipeline.ExampleMaker(c, len(src))
  a = m1(len(src) * 3 + 2, src[2])  # epoch 3, index 2
  b = m2.make(src[2], 3, 2)
  assert (int(a["epoch"]), int(a["index"])) == (3, 2)
  for k in ("hr", "lr", "lr_up"):
    assert np.array_equal(a[k], b[k])
  hr = images.decode_image(src[2]["image"])
  assert degradations.settings(c.degradation).scale == 4 and hr.ndim == 3
