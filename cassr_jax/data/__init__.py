"""Training data: Real-ESRGAN degradations, robust image decoding, sources and the grain input pipeline.

  presets       the degradation presets (x4plus_preset, mild_preset) and their validation (settings)
  degradations  the second-order degradation's operations and pipeline (numpy + OpenCV)
  jpeg          JPEG round trips: DiffJPEG's float codec in numpy (the presets' default), libjpeg
  images        decoding any image file to 8-bit RGB, or a clear error naming the file; atomic writers
  sources       image folders, tensorflow-datasets, offline paired sets
  pipeline      default_data_config() (the trainer's config.data), paper_data_config, make_train_iterator,
                make_eval_dataset
  paired        fixed degraded paired sets (scripts/make_paired_data.py)
  testsets      the paper's real test sets, RealSR / DRealSR centre crops (scripts/prepare_testsets.py)
  tiles         BasicSR-style training sub-images and the paper's mixture (scripts/prepare_train_data.py)
  cli           the shared error/JSON tail of those command lines

Names below are loaded on first use, so importing this package does not import grain (which imports jax).
"""
import importlib

_LAZY = {
    "default_data_config": "pipeline",
    "paper_data_config": "pipeline",
    "make_train_dataset": "pipeline",
    "make_train_iterator": "pipeline",
    "make_eval_dataset": "pipeline",
    "iterator_state": "pipeline",
    "restore_iterator_state": "pipeline",
    "orbax_save_args": "pipeline",
    "orbax_restore_args": "pipeline",
    "x4plus_preset": "presets",
    "mild_preset": "presets",
    "degrade": "degradations",
    "decode_image": "images",
    "read_image": "images",
    "ImageError": "images",
    "DataError": "sources",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
