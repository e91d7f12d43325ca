"""Shared fixtures: tiny, seeded models built from configs (no downloads, a few ms each)."""
from __future__ import annotations

import copy

import pytest
import torch

from ipa_lab.configs import load_config
from ipa_lab.runtime import quiet

quiet()
# The models here are tiny: one thread is fastest, and two threads fighting over the cores with
# another job (a training run) turn a 10 ms forward pass into seconds.
torch.set_num_threads(1)

CROSS_DIM = 64  # the toy UNet's cross_attention_dim (= the tiny text encoder's width)
EMBED_DIM = 32  # the tiny image encoder's projection_dim (base IP-Adapter input)
HIDDEN_DIM = 48  # the tiny image encoder's hidden size (Plus input)


def toy_unet_settings() -> dict:
    return {k: v for k, v in load_config("toy_unet").items() if not k.startswith("_")}


def make_toy_unet(seed: int = 0):
    """The course's toy UNet (8x8x4 latents) with seeded random weights, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(toy_unet_settings()).eval()


@pytest.fixture(scope="session")
def _toy_unet_template():
    return make_toy_unet(0)


@pytest.fixture
def toy_unet(_toy_unet_template):
    """A fresh copy of the seeded toy UNet for each test (installing processors mutates it)."""
    return copy.deepcopy(_toy_unet_template)


def perturb_(module: torch.nn.Module, seed: int = 1, std: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, so that copied or default values prove nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


@pytest.fixture(scope="session")
def tiny_sd_parts():
    """VAE, text encoder, tokenizer and scheduler of a tiny Stable Diffusion, built offline."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CROSS_DIM, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=CROSS_DIM,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32],
                        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                        layers_per_block=1, norm_num_groups=8, sample_size=8).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


@pytest.fixture
def tiny_pipeline(tiny_sd_parts, toy_unet):
    """A StableDiffusionPipeline around the toy UNet, no safety checker, no image encoder."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=toy_unet, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False, **tiny_sd_parts)


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory):
    """The toy architecture (as data/toy-sd, image encoder included), untrained, saved as a
    pipeline folder: what the training loop and the benchmark load."""
    from ipa_lab.pretrain import random_toy_pipeline

    path = tmp_path_factory.mktemp("toy-sd")
    random_toy_pipeline(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A 40-image shapes data set in the original training format."""
    from ipa_lab.data import make_shapes_dataset

    return str(make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=40, n_val=8, seed=1))
