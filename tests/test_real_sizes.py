"""The real SD 1.5 / SDXL figures, computed from configs on the meta device (no weights, no memory)."""
from collections import Counter

import pytest
import torch

from ipa_lab import (
    ImageProjModel,
    IPAttnProcessor,
    count_ip_adapter_parameters,
    count_parameters,
    format_parameter_table,
    freeze,
    install_ip_adapter,
    parameter_table,
)
from ipa_lab.configs import (
    available_configs,
    build_image_encoder,
    build_unet,
    load_config,
)


@pytest.fixture(scope="module")
def sd15():
    return build_unet("sd15_unet")


def test_sd15_unet(sd15):
    assert all(p.is_meta for p in sd15.parameters())
    assert count_parameters(sd15) == 859_520_964
    names = list(sd15.attn_processors)
    cross = [n for n in names if n.endswith("attn2.processor")]
    assert len(names) == 32 and len(cross) == 16
    assert names[-1].startswith("mid_block") and names[-3].startswith("up_blocks.3")


def test_sd15_ip_adapter(sd15):
    freeze(sd15)  # before installing, as the original does
    adapter = install_ip_adapter(sd15)
    widths = Counter(m.hidden_size for m in adapter if isinstance(m, IPAttnProcessor))
    assert widths == {320: 5, 640: 5, 1280: 6} and sum(k * v for k, v in widths.items()) == 12_480
    assert count_parameters(adapter) == 2 * 768 * 12_480 == 19_169_280
    assert all(p.is_meta for p in adapter.parameters())
    with torch.device("meta"):
        proj = ImageProjModel(768, 1024, 4)
    assert count_parameters(proj) == 3_150_336
    rows = parameter_table(proj, adapter, {"unet": sd15})
    assert rows[-1].trainable == 22_319_616
    assert format_parameter_table(rows) == SD15_TABLE  # as printed before the formatters became one


SD15_TABLE = """\
component         block                   width  layers   parameters   trainable
----------------  ----------------------  -----  ------  -----------  ----------
image projection  ImageProjModel              -       -    3,150,336   3,150,336
adapter           down_blocks.0             320       2      983,040     983,040
adapter           down_blocks.1             640       2    1,966,080   1,966,080
adapter           down_blocks.2            1280       2    3,932,160   3,932,160
adapter           mid_block                1280       1    1,966,080   1,966,080
adapter           up_blocks.1              1280       3    5,898,240   5,898,240
adapter           up_blocks.2               640       3    2,949,120   2,949,120
adapter           up_blocks.3               320       3    1,474,560   1,474,560
adapter           no weights (self-attn)      -      16            0           0
----------------  ----------------------  -----  ------  -----------  ----------
adapter           all blocks                  -      16   19,169,280  19,169,280
----------------  ----------------------  -----  ------  -----------  ----------
backbone          unet                        -       -  859,520,964           0
----------------  ----------------------  -----  ------  -----------  ----------
total                                         -       -  881,840,580  22,319,616"""


@pytest.mark.parametrize("unet, encoder, variant, expected", [
    ("sd15_unet", "clip_vit_h14_vision", "base", dict(projection=3_150_336, adapter=19_169_280, total=22_319_616)),
    ("sd15_unet", "clip_vit_h14_vision", "plus", dict(projection=29_918_208, adapter=19_169_280, total=49_087_488)),
    ("sdxl_unet", "clip_vit_bigg14_vision", "base", dict(adapter=340_787_200, total=351_285_248)),
    ("sdxl_unet", "clip_vit_h14_vision", "base", dict(adapter=340_787_200, total=349_188_096)),
])
def test_count_ip_adapter_parameters(unet, encoder, variant, expected):
    counts = count_ip_adapter_parameters(unet, encoder, variant=variant)
    assert {k: counts[k] for k in expected} == expected
    assert counts["cross_attention_layers"] == (16 if unet == "sd15_unet" else 70)


def test_image_encoders_on_meta():
    for name, hidden, projection in [("clip_vit_h14_vision", 1280, 1024), ("clip_vit_bigg14_vision", 1664, 1280)]:
        encoder = build_image_encoder(name)
        assert all(p.is_meta for p in encoder.parameters())
        assert (encoder.config.hidden_size, encoder.config.projection_dim) == (hidden, projection)
        assert encoder.visual_projection.weight.shape == (projection, hidden)


def test_configs_are_listed_and_unknown_names_explained():
    assert {"sd15_unet", "sdxl_unet", "clip_vit_h14_vision", "clip_vit_bigg14_vision", "toy_unet"} <= set(available_configs())
    assert load_config("sd15_unet.json")["cross_attention_dim"] == 768
    with pytest.raises(ValueError, match="no config named 'sd14_unet'; available: .*sd15_unet"):
        load_config("sd14_unet")
