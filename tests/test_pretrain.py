"""The script that made data/toy-sd, on a tiny budget: its three stages run on the shared loop
(ipa_lab.loop), checkpoint, resume, and assemble a pipeline that diffusers loads."""
from __future__ import annotations

import torch

from ipa_lab.pretrain import main


def test_three_tiny_stages_checkpoint_resume_and_assemble(toy_data, tmp_path):
    work, out, clip = tmp_path / "work", tmp_path / "sd", tmp_path / "clip"
    argv = ["--data", toy_data, "--output", str(out), "--clip-output", str(clip), "--work-dir", str(work),
            "--steps-vae", "3", "--steps-clip", "3", "--steps-unet", "3", "--checkpoint-every", "2",
            "--batch-size", "4", "--threads", "1"]
    main(argv)
    for stage in ("vae", "clip", "unet"):
        assert torch.load(work / f"{stage}.pt", weights_only=True)["step"] == 3
    main([a if a != "3" else "5" for a in argv] + ["--resume"])  # two more steps each, from step 3
    state = torch.load(work / "unet.pt", weights_only=True)
    assert state["step"] == 5 and "ema" in state
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    assert pipe.image_encoder is not None and pipe.unet.config.cross_attention_dim == 64
