"""The IP-Adapter family: what each variant trains, counted on the real configs (notebook 8).

Every variant keeps the frozen backbone (UNet, VAE, text encoder) and its image encoder frozen,
and trains a projection plus the image branch of every cross-attention layer. They differ in
what feeds the projection, how many tokens it makes, and, for FaceID, in a LoRA on every
attention layer, self-attention included: the one member whose self-attention processors hold
parameters.

`VARIANTS` describes each one (as the original's classes build it); `build_projection` builds its
projection and `count_variant` counts it, all on the `meta` device (shapes, no memory, no
download). `family_table()` is the notebook's table; `python -m ipa_lab.family --output
data/family.csv` writes it. The published fp16 files weigh about 2 bytes per parameter, a check
anyone can repeat against the sizes listed on the model hub (`published_mb`).
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

import torch
from torch import nn

from .configs import build_unet, load_config


@dataclass(frozen=True)
class Variant:
    """One member of the family, as the original code builds it."""

    name: str
    unet: str  # config name: sd15_unet or sdxl_unet
    projection: str  # the projection's class, as named in the original
    feeds: str  # what the projection reads
    encoder: str | None = None  # image encoder config (CLIP), None when none is read
    tokens: int = 4  # image tokens appended after the text tokens (for all the images of a prompt)
    images: int = 1  # images per prompt the projection's tokens are made for (FaceID-Portrait: 5 faces)
    lora_rank: int | None = None  # FaceID's LoRA on every attention layer
    script: str = ""  # official training script, or what the maintainers advise
    published: tuple[str, float] | None = None  # (fp16 file, size in MB) where known


_H, _G = "clip_vit_h14_vision", "clip_vit_bigg14_vision"
VARIANTS = (
    Variant("SD 1.5 base", "sd15_unet", "ImageProjModel", "CLIP image embedding (ViT-H/14, 1024)", _H, 4,
            script="tutorial_train.py", published=("ip-adapter_sd15_light", 44.6)),
    Variant("SD 1.5 Plus", "sd15_unet", "Resampler", "CLIP penultimate patch features (257 x 1280)", _H, 16,
            script="tutorial_train_plus.py"),
    Variant("SD 1.5 Plus-Face", "sd15_unet", "Resampler", "the same, of face crops", _H, 16,
            script="tutorial_train_plus.py (face crops)"),
    Variant("SD 1.5 Full-face", "sd15_unet", "MLPProjModel (ip_adapter.py)", "CLIP penultimate patch features (257 x 1280)",
            _H, 257, script="none; maintainers: tutorial_train_plus.py with this projection"),
    Variant("SD 1.5 FaceID", "sd15_unet", "MLPProjModel (ip_adapter_faceid.py)", "InsightFace identity embedding (512)",
            None, 4, lora_rank=128, script="tutorial_train_faceid.py"),
    Variant("SD 1.5 FaceID-Plus / PlusV2", "sd15_unet", "ProjPlusModel",
            "identity embedding (512) + CLIP patch features of the face", _H, 4, lora_rank=128,
            script="none; maintainers: adapt tutorial_train_faceid.py"),
    Variant("SD 1.5 FaceID-Portrait", "sd15_unet", "MLPProjModel (ip_adapter_faceid.py), 16 tokens per face",
            "identity embeddings of 5 faces (5 x 512)", None, 80, images=5,
            script="none; maintainers (issue #283): as FaceID, one face crop (2x the detection box) per sample"),
    Variant("SDXL (ViT-bigG)", "sdxl_unet", "ImageProjModel", "CLIP image embedding (ViT-bigG/14, 1280)", _G, 4,
            script="tutorial_train_sdxl.py", published=("ip-adapter_sdxl", 703.0)),
    Variant("SDXL (ViT-H)", "sdxl_unet", "ImageProjModel", "CLIP image embedding (ViT-H/14, 1024)", _H, 4,
            script="tutorial_train_sdxl.py (ViT-H encoder)", published=("ip-adapter_sdxl_vit-h", 698.0)),
    Variant("SDXL Plus (ViT-H)", "sdxl_unet", "Resampler", "CLIP penultimate patch features (257 x 1280)", _H, 16,
            script="none; tutorial_train_sdxl.py trains the base model only",
            published=("ip-adapter-plus_sdxl_vit-h", 848.0)),
)


def variant(name: str) -> Variant:
    """The variant called `name` (see `VARIANTS`)."""
    for v in VARIANTS:
        if v.name == name:
            return v
    raise ValueError(f"no variant {name!r}; the family: {', '.join(v.name for v in VARIANTS)}")


def build_projection(v: Variant) -> nn.Module:
    """The variant's projection, with the original's settings, on the meta device."""
    from .faceid import MLPProjModel as FaceIDProjModel, ProjPlusModel
    from .projection import ImageProjModel, MLPProjModel, Resampler

    cross = load_config(v.unet)["cross_attention_dim"]
    enc = load_config(v.encoder) if v.encoder else None
    tokens = v.tokens // v.images  # the projection runs once per image (FaceID-Portrait: per face)
    kind = v.projection.split(" (")[0].split(",")[0]
    with torch.device("meta"):
        if kind == "ImageProjModel":
            return ImageProjModel(cross, enc["projection_dim"], tokens)
        if kind == "Resampler":  # IPAdapterPlus: dim = cross (12 heads); IPAdapterPlusXL: 1280 (20 heads)
            dim, heads = (cross, 12) if cross <= 1024 else (1280, 20)
            return Resampler(dim=dim, depth=4, dim_head=64, heads=heads, num_queries=tokens,
                             embedding_dim=enc["hidden_size"], output_dim=cross, ff_mult=4)
        if kind == "MLPProjModel" and "ip_adapter.py" in v.projection:  # Full-face: one token per CLIP token
            return MLPProjModel(cross, enc["hidden_size"])
        if kind == "MLPProjModel":  # FaceID's (ip_adapter_faceid.py)
            return FaceIDProjModel(cross, 512, tokens)
        if kind == "ProjPlusModel":
            return ProjPlusModel(cross, 512, enc["hidden_size"], tokens)
    raise ValueError(f"unknown projection {v.projection!r}")


@functools.lru_cache(maxsize=None)
def attention_counts(unet: str, lora_rank: int | None) -> dict[str, int]:
    """What the processors train in UNet `unet`: {'ip_branch', 'lora_self', 'lora_cross', 'layers'},
    counted on a meta UNet with the processors installed (cached: SDXL takes a few seconds)."""
    from .adapter import install_ip_adapter

    model = build_unet(unet)
    install_ip_adapter(model, lora_rank=lora_rank)
    counts = {"ip_branch": 0, "lora_self": 0, "lora_cross": 0, "layers": 0}
    for name, processor in model.attn_processors.items():
        for pname, p in processor.named_parameters():
            if "_lora." in pname:
                counts["lora_self" if "attn1" in name else "lora_cross"] += p.numel()
            else:
                counts["ip_branch"] += p.numel()
        counts["layers"] += int(hasattr(processor, "to_k_ip"))
    return counts


def count_variant(v: Variant) -> dict[str, int]:
    """{'projection', 'ip_branch', 'lora_self', 'lora_cross', 'total', 'cross_attention_layers'}."""
    from .adapter import count_parameters

    counts = dict(attention_counts(v.unet, v.lora_rank))
    layers = counts.pop("layers")
    out = {"projection": count_parameters(build_projection(v)), **counts}
    out["total"] = sum(out.values())
    out["cross_attention_layers"] = layers
    return out


def family_table(variants=VARIANTS) -> list[dict]:
    """One row per variant: what feeds it, tokens, what trains (counted), and the training script."""
    rows = []
    for v in variants:
        c = count_variant(v)
        rows.append({"variant": v.name, "feeds": v.feeds, "projection": v.projection, "tokens": v.tokens,
                     "trains: projection": c["projection"], "to_k_ip/to_v_ip": c["ip_branch"],
                     "LoRA in self-attn": c["lora_self"], "LoRA in cross-attn": c["lora_cross"], "total": c["total"],
                     "fp16 MB (2 bytes each)": round(2 * c["total"] / 1e6, 1),
                     "published fp16 MB": v.published[1] if v.published else None, "training script": v.script})
    return rows


def main(argv=None) -> None:
    from .results import write_csv
    from .tables import format_table

    parser = argparse.ArgumentParser(prog="python -m ipa_lab.family", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="CSV to write (the table is printed either way)")
    args = parser.parse_args(argv)
    rows = family_table()
    if args.output:
        write_csv(args.output, rows)
    print(format_table([{k: v for k, v in r.items() if k not in ("feeds", "training script")} for r in rows],
                       formats={k: "," for k in rows[0] if k not in ("variant", "projection", "tokens")}))


if __name__ == "__main__":
    main()
