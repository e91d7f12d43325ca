"""FaceID: the LoRA processors, the projections, every family member's count, the toy recognizer,
and the shipped toy FaceID adapter loading in diffusers (through PEFT) with the same images."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import perturb_
from ipa_lab.adapter import count_parameters, install_ip_adapter
from ipa_lab.attention import AttnProcessor, IPAttnProcessor
from ipa_lab.attention_faceid import LoRAAttnProcessor, LoRAIPAttnProcessor, LoRALinearLayer
from ipa_lab.faceid import MLPProjModel, ProjPlusModel
from ipa_lab.family import VARIANTS, attention_counts, count_variant, family_table, variant

# The counts of FACTS.md ("The family"), computed there with the original code's own classes.
EXPECTED = {
    "SD 1.5 base": (3_150_336, 22_319_616),
    "SD 1.5 Plus": (29_918_208, 49_087_488),
    "SD 1.5 Plus-Face": (29_918_208, 49_087_488),
    "SD 1.5 Full-face": (2_625_024, 21_794_304),
    "SD 1.5 FaceID": (3_675_648, 48_354_816),
    "SD 1.5 FaceID-Plus / PlusV2": (33_581_568, 78_260_736),
    "SDXL (ViT-bigG)": (10_498_048, 351_285_248),
    "SDXL (ViT-H)": (8_400_896, 349_188_096),
    "SDXL Plus (ViT-H)": (82_961_664, 423_748_864),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_variant_is_counted_as_the_original_builds_it(name):
    counts = count_variant(variant(name))
    assert (counts["projection"], counts["total"]) == EXPECTED[name]


def test_faceid_portrait_is_faceid_without_lora_and_with_80_tokens():
    v = variant("SD 1.5 FaceID-Portrait")
    counts = count_variant(v)
    # 512 -> 1024 -> 16 x 768 per face, LayerNorm; the base model's image branch; no LoRA
    assert counts["projection"] == 512 * 1024 + 1024 + 1024 * 16 * 768 + 16 * 768 + 2 * 768
    assert counts["lora_self"] == counts["lora_cross"] == 0 and v.tokens == 16 * 5
    assert counts["ip_branch"] == count_variant(variant("SD 1.5 base"))["ip_branch"]


def test_faceid_lora_sits_in_self_and_cross_attention_of_sd15():
    counts = attention_counts("sd15_unet", 128)
    assert counts["lora_self"] == 12_779_520 and counts["lora_cross"] == 12_730_368
    assert counts["ip_branch"] == 19_169_280 and counts["layers"] == 16


@pytest.mark.parametrize("v", [v for v in VARIANTS if v.published], ids=lambda v: v.name)
def test_published_fp16_files_weigh_two_bytes_per_counted_parameter(v):
    megabytes = 2 * count_variant(v)["total"] / 1e6
    assert abs(megabytes - v.published[1]) < 1.0, (v.published, megabytes)


def test_family_table_rows_and_unknown_variant():
    rows = family_table(VARIANTS[:2])
    assert [r["variant"] for r in rows] == ["SD 1.5 base", "SD 1.5 Plus"] and rows[0]["total"] == 22_319_616
    with pytest.raises(ValueError, match="no variant 'SD 2'"):
        variant("SD 2")


# ------------------------------------------------------------------------------------- LoRA
def test_lora_layer_starts_at_zero_and_counts_rank_times_fan_in_plus_fan_out():
    torch.manual_seed(0)
    layer = LoRALinearLayer(64, 128, rank=8)
    assert count_parameters(layer) == 8 * (64 + 128)
    assert torch.count_nonzero(layer(torch.randn(3, 5, 64))) == 0  # up is zero: no change at step 0
    perturb_(layer)
    x = torch.randn(2, 64)
    assert torch.allclose(layer(x), x @ (layer.up.weight @ layer.down.weight).T, atol=1e-6)
    halved = LoRALinearLayer(64, 128, rank=8, network_alpha=4.0)
    halved.load_state_dict(layer.state_dict())
    assert torch.allclose(halved(x), 0.5 * layer(x), atol=1e-6)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRALinearLayer(4, 4, rank=0)


def _unet_output(unet, seed: int = 0, text_tokens: int = 7, image_tokens: int = 4):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, text_tokens + image_tokens, 64, generator=g)
    with torch.no_grad():
        return unet(latents, 10, states).sample


def test_faceid_processors_start_as_the_base_adapter(toy_unet):
    base, faceid = toy_unet, copy.deepcopy(toy_unet)
    install_ip_adapter(base)
    modules = install_ip_adapter(faceid, lora_rank=4)
    kinds = {type(p) for p in faceid.attn_processors.values()}
    assert kinds == {LoRAAttnProcessor, LoRAIPAttnProcessor}
    assert all(count_parameters(p) > 0 for p in modules)  # the self-attention processors hold parameters now
    assert torch.allclose(_unet_output(base), _unet_output(faceid), atol=1e-6)


def test_lora_processor_computes_the_merged_weights(toy_unet):
    """A trained LoRA is W + B A: merging it into a copy of the layers gives the same UNet output."""
    merged = copy.deepcopy(toy_unet)
    modules = install_ip_adapter(toy_unet, lora_rank=4)
    perturb_(modules, seed=3, std=0.1)
    install_ip_adapter(merged)
    layers = dict(merged.named_modules())
    with torch.no_grad():
        for name, p in toy_unet.attn_processors.items():
            layer = layers[name[: -len(".processor")]]
            for target in ("to_q", "to_k", "to_v", "to_out"):
                lora = getattr(p, f"{target}_lora")
                linear = layer.to_out[0] if target == "to_out" else getattr(layer, target)
                linear.weight += lora.up.weight @ lora.down.weight
            if isinstance(p, IPAttnProcessor):
                mine = merged.attn_processors[name]
                mine.to_k_ip.weight.copy_(p.to_k_ip.weight)
                mine.to_v_ip.weight.copy_(p.to_v_ip.weight)
    assert torch.allclose(_unet_output(toy_unet), _unet_output(merged), atol=1e-5)


def test_install_refuses_a_bad_rank(toy_unet):
    with pytest.raises(ValueError, match="lora_rank must be a positive integer"):
        install_ip_adapter(toy_unet, lora_rank=0)
    assert not any(isinstance(p, LoRAAttnProcessor) for p in toy_unet.attn_processors.values())


def test_faceid_projections_shapes_and_errors():
    torch.manual_seed(0)
    proj = MLPProjModel(cross_attention_dim=64, id_embeddings_dim=32, num_tokens=4)
    assert proj(torch.randn(3, 32)).shape == (3, 4, 64)
    with pytest.raises(ValueError, match=r"shape \(batch, 32\)"):
        proj(torch.randn(3, 1, 32))
    plus = ProjPlusModel(cross_attention_dim=128, id_embeddings_dim=32, clip_embeddings_dim=48, num_tokens=4)
    ids, clip = torch.randn(2, 32), torch.randn(2, 9, 48)
    out, short = plus(ids, clip), plus(ids, clip, shortcut=True, scale=0.5)
    tokens = plus.norm(plus.proj(ids).reshape(-1, 4, 128))
    assert out.shape == (2, 4, 128) and torch.allclose(short, tokens + 0.5 * out, atol=1e-6)


# ------------------------------------------------------------------------------- the toy's FaceID
from ipa_lab.pipeline import REPO_ROOT  # noqa: E402

SHIPPED_FACEID = REPO_ROOT / "data" / "ip-adapter-toy-faceid" / "ip_adapter.safetensors"
DATA = REPO_ROOT / "data" / "shapes"


@pytest.fixture(scope="module")
def recognizer():
    from ipa_lab.recognition import load_recognizer

    return load_recognizer()


def test_recognizer_names_identities_whatever_the_layout(recognizer):
    from ipa_lab.data import POSITIONS, SIZES, ShapeSpec, render_shape
    from ipa_lab.recognition import IDENTITIES, identity_embeds, identity_of

    specs = [ShapeSpec(c, s, p, z) for c, s in (("red", "circle"), ("blue", "triangle"), ("cyan", "square"))
             for p in POSITIONS for z in SIZES]
    embeds = identity_embeds(recognizer, [render_shape(s) for s in specs])
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(len(specs)), atol=1e-5)  # unit length, like InsightFace's
    assert [IDENTITIES[i] for i in recognizer.cosines(embeds).argmax(-1)] == [f"{s.colour} {s.shape}" for s in specs]
    same = embeds @ embeds.T
    ids = torch.tensor([identity_of(s) for s in specs])
    within, across = same[ids[:, None] == ids[None]], same[ids[:, None] != ids[None]]
    assert within.min() > across.max(), (within.min(), across.max())  # 8 layouts of one identity stay together


def test_recognizer_refuses_bad_pixels_and_aligns_a_blank_picture_whole(recognizer):
    from ipa_lab.recognition import align

    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        recognizer(torch.rand(3, 32, 32))
    blank = torch.full((1, 3, 32, 32), 245 / 255)
    assert torch.allclose(align(blank), blank)


def test_recognizer_training_is_seeded(toy_data):
    from ipa_lab.recognition import train_recognizer

    a, b = (train_recognizer(toy_data, steps=3, batch_size=8) for _ in range(2))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_identity_inputs_zero_the_dropped_images():
    from types import SimpleNamespace

    from ipa_lab.train_faceid import IdentityInputs

    cache = lambda d, device: (torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 64), torch.ones(2, 32))  # noqa: E731
    ids = torch.arange(12.0).reshape(6, 2)
    d = SimpleNamespace(indices=torch.tensor([4, 1]), drop_image=torch.tensor([False, True]))
    _, _, image = IdentityInputs(cache, lambda records: ids[records])(d, "cpu")
    assert torch.equal(image, torch.tensor([[8.0, 9.0], [0.0, 0.0]]))


def test_dataset_identities_recognize_only_what_is_drawn_and_match_a_full_pass():
    from ipa_lab.data import IPAdapterDataset
    from ipa_lab.pipeline import REPO_ROOT
    from ipa_lab.recognition import identity_embeds, load_recognizer, to_pixels
    from ipa_lab.train_faceid import DatasetIdentities

    recognizer = load_recognizer(REPO_ROOT / "data" / "toy-recognition")
    dataset = IPAdapterDataset(REPO_ROOT / "data" / "shapes", "val")
    identities = DatasetIdentities(recognizer, dataset)
    first = identities([5, 2, 5])
    second = identities([2, 9, 11])  # 2 is known: only 9 and 11 are new
    third = identities(list(range(20, 40)))  # more than MIN_BATCH at once
    assert sorted(identities.known) == [2, 5, 9, 11, *range(20, 40)]
    with torch.no_grad():  # one pass over the first 40, as a run that knew them all would see them
        full = identity_embeds(recognizer, to_pixels([dataset.image(i) for i in range(40)]))
    assert torch.equal(first, full[[5, 2, 5]]) and torch.equal(second, full[[2, 9, 11]])
    assert torch.equal(third, full[20:40])


def test_shipped_faceid_checkpoint_is_the_original_format(tiny_pipeline):
    from ipa_lab.checkpoint import load_ip_adapter
    from ipa_lab.generate import lora_rank_of

    state = load_ip_adapter(SHIPPED_FACEID)
    assert set(state["image_proj"]) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
                                        "norm.weight", "norm.bias"}
    assert lora_rank_of(state) == 8
    assert "0.to_q_lora.down.weight" in state["ip_adapter"] and "0.to_k_ip.weight" not in state["ip_adapter"]
    assert "1.to_k_ip.weight" in state["ip_adapter"] and "1.to_out_lora.up.weight" in state["ip_adapter"]


@pytest.fixture(scope="module")
def toy_pipe():
    from ipa_lab.pipeline import load_pipeline

    return load_pipeline()


def test_faceid_loads_in_diffusers_through_peft_with_the_same_images(toy_pipe, recognizer):
    from ipa_lab.data import load_rgb, read_records
    from ipa_lab.diffusers_path import generate_with_diffusers
    from ipa_lab.generate import generate, load_adapter, remove_adapter
    from ipa_lab.recognition import identity_embeds

    records = read_records(DATA / "val.json")[:2]
    ids = identity_embeds(recognizer, [load_rgb(DATA / r["image_file"]) for r in records])
    proj = load_adapter(toy_pipe, SHIPPED_FACEID)
    assert {type(p).__name__ for p in toy_pipe.unet.attn_processors.values()} == {"LoRAAttnProcessor",
                                                                                 "LoRAIPAttnProcessor"}
    args = dict(image_embeds=ids, prompt=["", records[0]["text"]], num_samples=1, seed=0, num_inference_steps=5,
                output_type="np")
    ours = generate(toy_pipe, proj, **args)
    theirs = generate_with_diffusers(toy_pipe, SHIPPED_FACEID, **args)
    assert np.abs(ours - theirs).max() < 1e-4
    # diffusers' LoRA is gone again (plain nn.Linear, not PEFT's wrapper), our adapter back in place
    assert type(toy_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    assert np.array_equal(generate(toy_pipe, proj, **args), ours)
    remove_adapter(toy_pipe)


def test_generate_refuses_image_and_embeds_together(toy_pipe):
    from ipa_lab.generate import generate, load_adapter, remove_adapter

    proj = load_adapter(toy_pipe, SHIPPED_FACEID)
    with pytest.raises(ValueError, match="either `image` or `image_embeds`"):
        generate(toy_pipe, proj, image=[np.zeros((32, 32, 3), np.uint8)], image_embeds=torch.zeros(1, 64))
    remove_adapter(toy_pipe)


@pytest.mark.parametrize("argv, message", [(["train", "--output", "x", "--steps", "0"], "--steps must be at least 1"),
                                           (["train", "--output", "x", "--rank", "0"], "--rank must be at least 1"),
                                           (["compare", "--faceid", "f", "--output", "o", "--n", "0"],
                                            "--n must be at least 1")])
def test_train_faceid_command_line_refuses_bad_numbers(argv, message, capsys):
    from ipa_lab.train_faceid import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def _diffusers_projection(state_dict):
    """diffusers' own converter: an original-format image_proj state dict -> its projection class."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        None, state_dict, low_cpu_mem_usage=False).eval()


def test_full_face_faceid_and_faceid_plus_projections_load_in_diffusers_with_the_same_output():
    """Our projections carry the original's parameter names: diffusers' converter recognises each
    (IPAdapterFullImageProjection, IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection)
    and computes the same tokens."""
    from ipa_lab.projection import MLPProjModel as FullFaceProjModel

    torch.manual_seed(0)
    full = perturb_(FullFaceProjModel(cross_attention_dim=64, clip_embeddings_dim=48)).eval()
    twin = _diffusers_projection(full.state_dict())
    assert type(twin).__name__ == "IPAdapterFullImageProjection"
    patches = torch.randn(2, 9, 48)
    assert torch.allclose(full(patches), twin(patches), atol=1e-5)

    faceid = perturb_(MLPProjModel(cross_attention_dim=64, id_embeddings_dim=32, num_tokens=4)).eval()
    twin = _diffusers_projection(faceid.state_dict())
    assert type(twin).__name__ == "IPAdapterFaceIDImageProjection"
    ids = torch.randn(2, 32)
    assert torch.allclose(faceid(ids), twin(ids), atol=1e-5)

    plus = perturb_(ProjPlusModel(cross_attention_dim=128, id_embeddings_dim=32, clip_embeddings_dim=48)).eval()
    twin = _diffusers_projection(plus.state_dict())
    assert type(twin).__name__ == "IPAdapterFaceIDPlusImageProjection"
    twin.clip_embeds = patches[:, None]  # diffusers takes the CLIP features as an attribute, one image per prompt
    with torch.no_grad():
        for shortcut in (False, True):
            twin.shortcut, twin.shortcut_scale = shortcut, 0.7
            assert torch.allclose(plus(ids, patches, shortcut=shortcut, scale=0.7), twin(ids).squeeze(1), atol=1e-5)


def test_the_original_faceid_classes_load_the_shipped_toy_adapter_strictly(toy_unet):
    """What the unmodified `IPAdapterFaceID(pipe, ckpt, device, lora_rank=8, num_tokens=4)` builds for the
    toy UNet: `MLPProjModel(cross_attention_dim, id_embeddings_dim=512, num_tokens)` and, in `set_ip_adapter`,
    LoRAAttnProcessor(hidden_size, cross_attention_dim=None, rank) / LoRAIPAttnProcessor(hidden_size,
    cross_attention_dim, scale=1.0, rank, num_tokens); then two strict `load_state_dict` calls. Our classes
    carry the original's names and arguments, so they stand in for them here."""
    from ipa_lab.adapter import hidden_size_of
    from ipa_lab.checkpoint import load_ip_adapter

    state = load_ip_adapter(SHIPPED_FACEID)
    projection = MLPProjModel(cross_attention_dim=toy_unet.config.cross_attention_dim, id_embeddings_dim=512,
                              num_tokens=4)
    projection.load_state_dict(dict(state["image_proj"]))  # strict
    procs = {}
    for name in toy_unet.attn_processors:
        cross = None if name.endswith("attn1.processor") else toy_unet.config.cross_attention_dim
        hidden = hidden_size_of(name, toy_unet.config)
        procs[name] = (LoRAAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, rank=8) if cross is None else
                       LoRAIPAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, scale=1.0, rank=8, num_tokens=4))
    toy_unet.set_attn_processor(procs)
    torch.nn.ModuleList(toy_unet.attn_processors.values()).load_state_dict(dict(state["ip_adapter"]))  # strict


# ------------------------------------------------------------------------------- notebook 08's checkers
from verdicts import assert_fail, assert_pass, assert_todo  # noqa: E402


def test_lora_linear_layer_checker_names_the_mistakes(capsys):
    from ipa_lab import checks

    class Good(torch.nn.Module):
        def __init__(self, fan_in, fan_out, rank):
            super().__init__()
            self.down = torch.nn.Linear(fan_in, rank, bias=False)
            self.up = torch.nn.Linear(rank, fan_out, bias=False)
            torch.nn.init.normal_(self.down.weight, std=1 / rank)
            torch.nn.init.zeros_(self.up.weight)

        def forward(self, x):
            return self.up(self.down(x))

    class Biased(Good):
        def __init__(self, fan_in, fan_out, rank):
            super().__init__(fan_in, fan_out, rank)
            self.up = torch.nn.Linear(rank, fan_out)
            torch.nn.init.zeros_(self.up.weight)

    class UpRandom(Good):
        def __init__(self, fan_in, fan_out, rank):
            super().__init__(fan_in, fan_out, rank)
            torch.nn.init.normal_(self.up.weight)

    class DownZero(Good):
        def __init__(self, fan_in, fan_out, rank):
            super().__init__(fan_in, fan_out, rank)
            torch.nn.init.zeros_(self.down.weight)

    class Swapped(Good):
        def forward(self, x):
            return self.up(self.down(x)) * 2

    assert_pass(capsys, checks.lora_linear_layer.passed, Good)
    assert_fail(capsys, checks.lora_linear_layer.passed, Biased, "biases")
    assert_fail(capsys, checks.lora_linear_layer.passed, UpRandom, "up.weight does not start at zero")
    assert_fail(capsys, checks.lora_linear_layer.passed, DownZero, "standard deviation 0")
    assert_fail(capsys, checks.lora_linear_layer.passed, Swapped, "output")


def test_faceid_trainable_checker_names_the_part_left_out(capsys):
    from ipa_lab import checks
    from ipa_lab.adapter import hidden_size_of

    def count(unet, rank, id_dim, tokens, parts=("proj", "ip", "self", "cross")):
        cross = unet.config.cross_attention_dim
        total = (id_dim * 2 * id_dim + 2 * id_dim + 2 * id_dim * tokens * cross + tokens * cross + 2 * cross
                 if "proj" in parts else 0)
        for name in unet.attn_processors:
            width = hidden_size_of(name, unet.config)
            is_cross = name.endswith("attn2.processor")
            context = cross if is_cross else width
            if ("cross" if is_cross else "self") in parts:
                total += rank * 2 * width * 2 + rank * (context + width) * 2
            if is_cross and "ip" in parts:
                total += 2 * context * width
        return total

    assert_pass(capsys, checks.faceid_trainable, count)
    assert_todo(capsys, checks.faceid_trainable)
    assert_fail(capsys, checks.faceid_trainable, lambda *a: count(*a, parts=("proj", "ip", "cross")),
                "the LoRA of the self-attention layers")
    assert_fail(capsys, checks.faceid_trainable, lambda *a: count(*a, parts=("proj", "self", "cross")), "to_k_ip")
    assert_fail(capsys, checks.faceid_trainable, lambda *a: count(*a, parts=("ip", "self", "cross")), "the projection")


# ------------------------------------------------------------------------------- review follow-ups
def test_layout_prompts_ask_for_another_position_and_size_and_name_no_identity():
    from ipa_lab.data import COLOURS, SHAPES, parse_caption, read_records
    from ipa_lab.train_faceid import layout_prompts

    records = read_records(DATA / "val.json")
    indices, captions, asked = layout_prompts(records, 32)
    for i, caption, spec in zip(indices, captions, asked):
        shown = parse_caption(records[i]["text"])
        assert (spec.colour, spec.shape) == (shown.colour, shown.shape)
        assert spec.position != shown.position and spec.size != shown.size
        assert caption == f"a {spec.size} in the {spec.position}"
        assert not set(caption.split()) & (set(COLOURS) | set(SHAPES))


def test_align_centres_and_scales_every_layout_alike():
    from ipa_lab.data import POSITIONS, SIZES, ShapeSpec, render_shape
    from ipa_lab.metrics import foreground
    from ipa_lab.recognition import align, to_pixels

    crops = align(to_pixels([render_shape(ShapeSpec("green", "square", p, z)) for p in POSITIONS for z in SIZES]))
    for crop in crops:
        ys, xs = np.nonzero(foreground(crop * 2 - 1))
        assert abs(ys.mean() - 15.5) < 1.5 and abs(xs.mean() - 15.5) < 1.5  # centred
        assert 20 <= ys.max() - ys.min() + 1 <= 28  # about 32 / 1.25 px across, whatever the size


def test_faceid_trainer_trains_the_lora_everywhere_and_nothing_frozen(toy_model, toy_data, tmp_path, recognizer):
    from ipa_lab.train import TrainConfig
    from ipa_lab.train_faceid import faceid_trainer

    cfg = TrainConfig(model=toy_model, data=toy_data, output=str(tmp_path / "run"), steps=2, batch_size=4,
                      device="cpu", verify_frozen=0, cache_dir=str(tmp_path / "cache"))
    trainer = faceid_trainer(cfg, recognizer, lora_rank=4)
    trainable = {n for n, p in trainer.ip_adapter.named_parameters() if p.requires_grad}
    assert any(".attn1.processor.to_q_lora." in n for n in trainable)  # self-attention trains now
    assert any(n.endswith("to_k_ip.weight") for n in trainable) and any(n.startswith("image_proj_model.") for n in trainable)
    result = trainer.run(progress=False)
    assert result.report["frozen_changed"] == [] and result.report["trainable_unmoved"] == []
    from ipa_lab.checkpoint import load_ip_adapter

    state = load_ip_adapter(tmp_path / "run" / "ip_adapter.safetensors")
    assert "0.to_q_lora.up.weight" in state["ip_adapter"] and "proj.0.weight" in state["image_proj"]


def test_faceid_samples_without_an_image_and_refuses_pixels(toy_pipe):
    from ipa_lab.generate import generate, load_adapter, remove_adapter

    proj = load_adapter(toy_pipe, SHIPPED_FACEID)
    out = generate(toy_pipe, proj, prompt="a small red circle in the top left", num_samples=1, num_inference_steps=2,
                   output_type="np")  # "no image": a zero identity embedding
    assert out.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="reads identity embeddings, not images"):
        generate(toy_pipe, proj, image=[np.zeros((32, 32, 3), np.uint8)], num_samples=1, num_inference_steps=2)
    remove_adapter(toy_pipe)


def test_faceid_plus_and_full_face_checkpoints_are_named_not_misread():
    from ipa_lab.checkpoint import CheckpointMismatchError, image_proj_from_state_dict
    from ipa_lab.projection import MLPProjModel as FullFaceProjModel

    plus = ProjPlusModel(cross_attention_dim=128, id_embeddings_dim=32, clip_embeddings_dim=48)
    with pytest.raises(CheckpointMismatchError, match="FaceID-Plus"):
        image_proj_from_state_dict(plus.state_dict())
    with pytest.raises(CheckpointMismatchError, match="Full-face"):
        image_proj_from_state_dict(FullFaceProjModel(64, 48).state_dict())


def test_a_failed_diffusers_load_puts_our_adapter_back(toy_pipe):
    from ipa_lab.checkpoint import load_ip_adapter
    from ipa_lab.diffusers_path import diffusers_ip_adapter
    from ipa_lab.generate import load_adapter, remove_adapter

    load_adapter(toy_pipe, SHIPPED_FACEID)
    before = dict(toy_pipe.unet.attn_processors)
    state = load_ip_adapter(SHIPPED_FACEID)
    state["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(3, 3)  # diffusers cannot load this
    with pytest.raises(Exception):
        with diffusers_ip_adapter(toy_pipe, state):
            pass
    assert all(toy_pipe.unet.attn_processors[n] is p for n, p in before.items())
    remove_adapter(toy_pipe)


def test_portrait_total_and_the_fp16_column():
    rows = {r["variant"]: r for r in family_table()}
    portrait = rows["SD 1.5 FaceID-Portrait"]
    assert portrait["total"] == 13_122_048 + 19_169_280 and portrait["tokens"] == 80
    assert all(r["fp16 MB (2 bytes each)"] == round(2 * r["total"] / 1e6, 1) for r in rows.values())
