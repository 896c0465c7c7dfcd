"""Small random-weight diffusers U-Net / ControlNet pairs shared by the ControlNet and CasSR tests."""
import numpy as np
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

TINY_UNET = dict(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)

# Three cross-attention levels, like SD-1.5's up path (a smaller width and one layer per block).
SD_LIKE_UNET = dict(
    sample_size=8, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)

HINT_CHANNELS = (8, 16, 16, 16)  # three stride-2 convs: hint is 8x the latent size, as in SD


def random_torch_pair(unet_kwargs, seed=0, std=0.1):
  """A diffusers U-Net and a matching ControlNet with every weight random (zero convs included)."""
  torch.manual_seed(seed)
  unet = TorchUNet(**unet_kwargs).eval()
  cn_kwargs = {k: v for k, v in unet_kwargs.items() if k not in ("sample_size", "up_block_types")}
  controlnet = TorchControlNet(**cn_kwargs, conditioning_embedding_out_channels=HINT_CHANNELS).eval()
  with torch.no_grad():
    for p in list(unet.parameters()) + list(controlnet.parameters()):
      p.normal_(0, std)
  return unet, controlnet


def state_dict_numpy(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def nchw_to_nhwc(a):
  return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def nhwc_to_nchw(a):
  return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))
