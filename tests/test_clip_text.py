"""CLIP text encoder: parity with transformers (random weights, small configs), checkpoint key forms, causal
mask, config validation, dtype policy; the tokenizer wrapper, encode_prompts and PromptCache (offline)."""
import json
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel

from cassr_jax.convert.keys import load_clip_state_dict
from cassr_jax import checkpoint, text
from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import clip_text
from cassr_jax.nn.layers import Policy
from conftest import relative_max_error

VOCAB, TOKENS, LAYERS = 100, 20, 3


def _torch_clip(hidden_act, eos_token_id, seed=0, vocab_size=VOCAB, max_positions=TOKENS):
  """A transformers CLIPTextModel with every weight perturbed (LayerNorms included)."""
  torch.manual_seed(seed)
  config = TorchCLIPTextConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
      num_attention_heads=4, max_position_embeddings=max_positions, hidden_act=hidden_act,
      eos_token_id=eos_token_id, bos_token_id=vocab_size - 2, pad_token_id=0)
  model = TorchCLIPTextModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _numpy_state(model, prefix=""):
  return {prefix + k: v.detach().numpy() for k, v in model.state_dict().items()}


def _abstract(config, **kwargs):
  # Shapes only; load_state_dict fills every parameter (eager random init is slow on CPU).
  return eval_shape(lambda: clip_text.CLIPTextModel(config, rngs=nnx.Rngs(0), **kwargs))


def _ours(torch_model, **kwargs):
  model = _abstract(clip_text.CLIPTextConfig.from_transformers(torch_model.config.to_dict()), **kwargs)
  load_clip_state_dict(model, _numpy_state(torch_model))
  return model


def _ids(rng, eos):
  """Two sequences: <bos> words <eos> padding, one ending early, one filling every position."""
  ids = rng.integers(1, VOCAB - 2, (2, TOKENS))
  ids[:, 0] = VOCAB - 2
  ids[0, 7], ids[0, 8:] = eos, 0
  ids[1, -1] = eos
  return ids


@nnx.jit(static_argnames=("hidden_layer",))
def _run(model, ids, hidden_layer=None):
  return model(ids, hidden_layer=hidden_layer)


@pytest.mark.parametrize("hidden_act,eos", [("quick_gelu", 2), ("gelu", VOCAB - 1)])
def test_parity_with_transformers(rng, hidden_act, eos):
  torch_model = _torch_clip(hidden_act, eos)
  ours = _ours(torch_model, attention="xla")
  ids = _ids(rng, VOCAB - 1)  # legacy eos_token_id=2 pools at the largest id, which is VOCAB - 1 here
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
  out = _run(ours, jnp.asarray(ids), hidden_layer=-2)
  assert out.last_hidden_state.shape == (2, TOKENS, 64)
  assert relative_max_error(out.last_hidden_state, ref.last_hidden_state.numpy()) <= 1e-4
  assert relative_max_error(out.pooler_output, ref.pooler_output.numpy()) <= 1e-4
  assert relative_max_error(out.hidden_state, ref.hidden_states[-2].numpy()) <= 1e-4
  embeddings = _run(ours, jnp.asarray(ids), hidden_layer=0).hidden_state
  assert relative_max_error(embeddings, ref.hidden_states[0].numpy()) <= 1e-4
  # The pooled vector is the last hidden state at each sequence's end token (XLA may fuse the two reads
  # differently, so up to an ulp; any other token differs at the 1e-1 scale).
  np.testing.assert_allclose(out.pooler_output[0], out.last_hidden_state[0, 7], rtol=0, atol=1e-6)
  np.testing.assert_allclose(out.pooler_output[1], out.last_hidden_state[1, -1], rtol=0, atol=1e-6)


def test_causal_mask_and_attention_switch(rng):
  """Changing token j leaves positions < j unchanged, on the default and the blockwise attention paths."""
  torch_model = _torch_clip("quick_gelu", 2)
  ids = _ids(rng, VOCAB - 1)
  changed = ids.copy()
  changed[:, 10] = (changed[:, 10] + 1) % (VOCAB - 2)
  for attention in ("auto", "blockwise"):
    ours = _ours(torch_model, attention=attention)
    a = _run(ours, jnp.asarray(ids)).last_hidden_state
    b = _run(ours, jnp.asarray(changed)).last_hidden_state
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(a[:, 10:] - b[:, 10:]).max(axis=-1).min()) > 0


def test_checkpoint_key_forms(rng):
  """SD checkpoints: "text_model." prefix and a position_ids buffer; transformers 5: no prefix."""
  torch_model = _torch_clip("quick_gelu", 2)
  config = clip_text.CLIPTextConfig.from_transformers(torch_model.config.to_dict())
  prefixed = _numpy_state(torch_model, "text_model.")
  prefixed["text_model.embeddings.position_ids"] = np.arange(TOKENS)[None]
  assert "text_model.embeddings.token_embedding.weight" in prefixed
  a, b = _abstract(config), _abstract(config)
  load_clip_state_dict(a, prefixed)
  load_clip_state_dict(b, _numpy_state(torch_model))
  for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
    np.testing.assert_array_equal(x, y)
  broken = dict(prefixed)
  del broken["text_model.final_layer_norm.bias"]
  broken["text_model.text_projection.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(CheckpointError, match="final_layer_norm.bias(.|\n)*text_projection"):
    load_clip_state_dict(_abstract(config), broken, source="te.safetensors")
  mixed = dict(prefixed)
  mixed["final_layer_norm.bias"] = mixed.pop("text_model.final_layer_norm.bias")
  with pytest.raises(CheckpointError, match="mixes keys"):
    load_clip_state_dict(_abstract(config), mixed)


SD15_TEXT_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408}


def test_config_from_transformers():
  assert clip_text.CLIPTextConfig.from_transformers(SD15_TEXT_CONFIG) == clip_text.CLIPTextConfig.sd15()
  nested = {"model_type": "clip", "text_config": {**SD15_TEXT_CONFIG, "hidden_act": "gelu"}}
  assert clip_text.CLIPTextConfig.from_transformers(nested).hidden_act == "gelu"
  for change, fragment in (({"hidden_act": "relu"}, "hidden_act='relu'"),
                           ({"num_attention_heads": 7}, "not a multiple of num_attention_heads=7"),
                           ({"model_type": "t5"}, "model_type 't5'")):
    with pytest.raises(ValueError, match=re.escape(fragment)):
      clip_text.CLIPTextConfig.from_transformers({**SD15_TEXT_CONFIG, **change})


def test_input_errors():
  model = _abstract(clip_text.CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8,
                                             num_hidden_layers=2, num_attention_heads=2,
                                             max_position_embeddings=TOKENS))
  with pytest.raises(ValueError, match="exceed max_position_embeddings=20"):
    model(jnp.zeros((1, TOKENS + 1), jnp.int32))
  with pytest.raises(ValueError, match="integer array"):
    model(jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match=re.escape("hidden_layer=3 is outside [-3, 2]")):
    model(jnp.zeros((1, 4), jnp.int32), hidden_layer=3)


def test_dtype_policies(rng):
  torch_model = _torch_clip("quick_gelu", 2)
  ids = jnp.asarray(_ids(rng, VOCAB - 1))
  reference = _run(_ours(torch_model), ids).last_hidden_state
  for policy in (Policy(jnp.float32, jnp.bfloat16), Policy(jnp.bfloat16, jnp.bfloat16)):
    model = _ours(torch_model, policy=policy)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(policy.param_dtype)}
    out = _run(model, ids).last_hidden_state
    assert out.dtype == jnp.bfloat16
    assert relative_max_error(out, reference) < 5e-2


# ------------------------------------------------------------------------------------ tokenizer and prompts

MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A diffusers-style folder with a tiny CLIP BPE vocabulary under tokenizer/ (no downloads)."""
  tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
  tokens += [a.replace(" ", "") for a in MERGES]
  # As in CLIP's real vocabulary, <|startoftext|> and <|endoftext|> have the two largest ids.
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  root = tmp_path_factory.mktemp("sd")
  (root / "tokenizer").mkdir()
  (root / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  return root


def test_tokenizer_pads_and_truncates(tokenizer_dir, tmp_path):
  tokenizer = text.load_tokenizer(str(tokenizer_dir))
  vocab = tokenizer.get_vocab()
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  ids = text.tokenize(tokenizer, ["a cat", "A  photo of a DOG"])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert list(ids[0, :4]) == [bos, vocab["a</w>"], vocab["cat</w>"], eos]
  assert list(ids[1, :7]) == [bos, vocab["a</w>"], vocab["photo</w>"], vocab["o"], vocab["f</w>"],
                              vocab["a</w>"], vocab["dog</w>"]]
  assert (ids[0, 4:] == tokenizer.pad_token_id).all()
  long = text.tokenize(tokenizer, " ".join(["cat"] * 100))
  assert long.shape == (1, 77) and long[0, 0] == bos and long[0, -1] == eos
  assert (long[0, 1:-1] == vocab["cat</w>"]).all()
  assert text.tokenize(tokenizer, "a dog", max_length=8).shape == (1, 8)
  with pytest.raises(FileNotFoundError, match="no CLIP tokenizer files"):
    text.load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="prompts"):
    text.tokenize(tokenizer, [])


def test_encode_prompts_and_cache(tokenizer_dir, monkeypatch):
  tokenizer = text.load_tokenizer(str(tokenizer_dir))
  vocab_size = len(tokenizer.get_vocab())
  torch_model = _torch_clip("quick_gelu", 2, vocab_size=vocab_size, max_positions=77)
  ours = _ours(torch_model)
  prompts = ["a cat", "a photo of a dog"]
  ids = text.tokenize(tokenizer, prompts)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
  embeddings = text.encode_prompts(ours, tokenizer, prompts)
  assert embeddings.shape == (2, 77, 64)
  assert relative_max_error(embeddings, ref.last_hidden_state.numpy()) <= 1e-4
  skip = text.encode_prompts(ours, tokenizer, prompts, hidden_layer=-2)
  want = torch_model.final_layer_norm(ref.hidden_states[-2]).detach().numpy()  # diffusers' clip_skip=1
  assert relative_max_error(skip, want) <= 1e-4

  calls = []
  real = text.encode_prompts
  monkeypatch.setattr(text, "encode_prompts", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
  cache = text.PromptCache(ours, tokenizer)
  first = cache(["a cat", "a photo of a dog", "a cat"])
  again = cache("a photo of a dog")
  assert calls == [["a cat", "a photo of a dog"]] and len(cache) == 2 and "a cat" in cache
  np.testing.assert_array_equal(first[0], first[2])
  np.testing.assert_allclose(first[:2], embeddings, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(again[0], first[1])
  cache(["a dog", "a cat"])
  assert calls[-1] == ["a dog"] and len(cache) == 3


def test_registry_round_trip(tmp_path, rng):
  torch_model = _torch_clip("gelu", VOCAB - 1)
  ours = _ours(torch_model)
  assert ours.text_model.encoder.layers[0].mlp.fc1.kernel.get_metadata()["out_sharding"] == (
      "embed_in", "embed_out")
  checkpoint.save_model(str(tmp_path / "te"), ours, "clip_text", ours.config)
  restored = checkpoint.load_model(str(tmp_path / "te"))
  assert isinstance(restored, clip_text.CLIPTextModel) and restored.config == ours.config
  ids = jnp.asarray(_ids(rng, VOCAB - 1))
  np.testing.assert_array_equal(_run(restored, ids).last_hidden_state, _run(ours, ids).last_hidden_state)
