"""Prompts -> CLIP text embeddings: the transformers CLIPTokenizer, padding to 77 tokens, and a cache.

CasSR conditions on fixed prompts (a general positive prompt and a negative prompt), so their embeddings are
computed once with PromptCache and reused for every image and step.
"""
from __future__ import annotations

import functools
import json
import os
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_jax.models.clip_text import CLIPTextModel

MAX_LENGTH = 77  # CLIP's context length; SD pads every prompt to it
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
HASH_TOKENIZER_FILE = "hash_tokenizer.json"  # HashTokenizer's only state (random models)


def _has_tokenizer(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES)


class HashTokenizer:
  """A deterministic word-hash tokenizer for random text encoders (no vocabulary files needed).

  Same call convention as transformers' CLIPTokenizer as used by cassr_jax.text.tokenize: <bos> ids <eos>,
  padded with <eos> to max_length.
  """

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size
    self.bos, self.eos = vocab_size - 2, vocab_size - 1

  def __call__(self, prompts, *, padding="max_length", max_length=77, truncation=True, return_tensors="np"):
    del padding, truncation, return_tensors
    rows = []
    for prompt in prompts:
      words = [zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in prompt.lower().split()]
      ids = ([self.bos] + words)[:max_length - 1] + [self.eos]
      rows.append(ids + [self.eos] * (max_length - len(ids)))
    return {"input_ids": np.asarray(rows, np.int32)}

  def save_pretrained(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, HASH_TOKENIZER_FILE), "w") as f:
      json.dump({"vocab_size": self.vocab_size}, f)


def load_tokenizer(name_or_path: str, *, subfolder: str | None = None):
  """A transformers CLIPTokenizer from a local directory or a Hugging Face hub id.

  A directory may hold the tokenizer files itself (vocab.json + merges.txt, or tokenizer.json) or be a
  diffusers pipeline folder with them under tokenizer/. A hub id is tried at its root, then under tokenizer/.
  """
  from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel

  if subfolder is not None:
    return CLIPTokenizer.from_pretrained(name_or_path, subfolder=subfolder)
  if os.path.isdir(name_or_path):
    for directory in (name_or_path, os.path.join(name_or_path, "tokenizer")):
      if os.path.isfile(os.path.join(directory, HASH_TOKENIZER_FILE)):
        with open(os.path.join(directory, HASH_TOKENIZER_FILE)) as f:
          return HashTokenizer(int(json.load(f)["vocab_size"]))
      if _has_tokenizer(directory):
        return CLIPTokenizer.from_pretrained(directory)
    raise FileNotFoundError(
        f"{name_or_path}: no CLIP tokenizer files ({' or '.join(_TOKENIZER_FILES)}) here or in tokenizer/")
  try:
    return CLIPTokenizer.from_pretrained(name_or_path)
  except OSError as root_error:
    try:
      return CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
    except OSError:
      raise OSError(f"{name_or_path}: could not load a CLIP tokenizer from the hub id's root or its "
                    f"tokenizer/ subfolder: {root_error}") from root_error


def tokenize(tokenizer, prompts: str | Sequence[str], *, max_length: int = MAX_LENGTH) -> np.ndarray:
  """(B, max_length) int32 token ids: <start> tokens <end>, padded with the pad token, truncated."""
  if isinstance(prompts, str):
    prompts = [prompts]
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"prompts must be a string or a non-empty sequence of strings, got {prompts!r}")
  encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                      return_tensors="np")
  return np.asarray(encoded["input_ids"], np.int32)


@functools.partial(nnx.jit, static_argnames=("hidden_layer",))
def _embed(text_encoder: CLIPTextModel, input_ids: jax.Array, hidden_layer: int | None):
  out = text_encoder(input_ids, hidden_layer=hidden_layer)
  if hidden_layer is None:
    return out.last_hidden_state
  return text_encoder.final_layer_norm(out.hidden_state)


def encode_prompts(text_encoder: CLIPTextModel, tokenizer, prompts: str | Sequence[str], *,
                   hidden_layer: int | None = None, max_length: int = MAX_LENGTH) -> jax.Array:
  """(B, max_length, D) conditioning for a U-Net's cross-attention.

  hidden_layer: None uses last_hidden_state (SD-1.x); an index (e.g. -2) uses that layer's output followed by
  the final LayerNorm, as diffusers' clip_skip does.
  """
  return _embed(text_encoder, jnp.asarray(tokenize(tokenizer, prompts, max_length=max_length)), hidden_layer)


class PromptCache:
  """Embeddings of prompts, each computed once. Valid while the text encoder's weights do not change
  (CasSR keeps it frozen)."""

  def __init__(self, text_encoder: CLIPTextModel, tokenizer, *, hidden_layer: int | None = None,
               max_length: int = MAX_LENGTH):
    self.text_encoder, self.tokenizer = text_encoder, tokenizer
    self.hidden_layer, self.max_length = hidden_layer, max_length
    self._cache: dict[str, jax.Array] = {}

  def __len__(self) -> int:
    return len(self._cache)

  def __contains__(self, prompt: str) -> bool:
    return prompt in self._cache

  def __call__(self, prompts: str | Sequence[str]) -> jax.Array:
    """(B, max_length, D) for `prompts` (a string gives B = 1); new prompts are encoded in one batch."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError(f"PromptCache: prompts must be a string or a non-empty sequence of strings, got "
                       f"{prompts!r}")
    new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
    if new:
      embeddings = encode_prompts(self.text_encoder, self.tokenizer, new, hidden_layer=self.hidden_layer,
                                  max_length=self.max_length)
      self._cache.update(zip(new, embeddings))
    return jnp.stack([self._cache[p] for p in prompts])
