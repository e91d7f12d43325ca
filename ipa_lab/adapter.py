"""Put IP-Adapter into a UNet, find it there again, freeze the rest, and count what trains.

`install_ip_adapter` walks `unet.attn_processors` (one entry per Attention layer, named like
`down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor`): self-attention layers
(`attn1`) get a weightless `AttnProcessor`, cross-attention layers (`attn2`) get an
`IPAttnProcessor` whose `to_k_ip`/`to_v_ip` start as copies of that layer's `to_k`/`to_v`.
The returned `nn.ModuleList` is the original's `adapter_modules`: what the optimizer trains
and what the checkpoint stores, next to the image projection. `ip_processors` finds the
adapter's processors in a UNet again (ours, or the ones diffusers' `load_ip_adapter` installs).

Counting: `count_parameters` for any module, `parameter_table` (+ `format_parameter_table`)
for where the parameters sit, and `count_ip_adapter_parameters` for what IP-Adapter trains on
a real architecture (SD 1.5, SDXL), built from `ipa_lab.configs` on the meta device.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttnProcessor, ConcatAttnProcessor, IPAttnProcessor
from .attention_faceid import LoRAAttnProcessor, LoRAIPAttnProcessor
from .configs import build_unet, load_config
from .projection import build_image_projection
from .tables import format_table

_SUFFIX = ".processor"


def _config_value(config, key: str):
    """Read `key` from a dict-like config (diffusers' FrozenDict, a plain dict) or an object."""
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def hidden_size_of(name: str, unet_config) -> int:
    """The width of the attention layer called `name`, read from the UNet's block widths.

    The down path uses `block_out_channels` in order, the up path in reverse (it mirrors the
    down path) and the mid block runs at the deepest width. For SD 1.5 (320, 640, 1280, 1280):
    `down_blocks.1...` -> 640, `up_blocks.1...` -> 1280, `mid_block...` -> 1280.
    """
    widths = list(_config_value(unet_config, "block_out_channels") or [])
    if not widths:
        raise ValueError("the UNet config has no block_out_channels; is this a UNet2DConditionModel config?")
    parts = name.split(".")
    if parts[0] == "mid_block":
        return widths[-1]
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1 and parts[1].isdigit():
        index = int(parts[1])
        ordered = widths if parts[0] == "down_blocks" else widths[::-1]
        if index >= len(ordered):
            raise ValueError(f"{name!r} names block {index}, but the UNet has {len(ordered)} {parts[0]}")
        return ordered[index]
    raise ValueError(
        f"cannot tell the width of attention layer {name!r}: expected a name starting with "
        "'down_blocks.<i>', 'up_blocks.<i>' or 'mid_block'"
    )


def block_of(name: str) -> str:
    """The UNet block an attention layer belongs to: 'down_blocks.0', 'mid_block', 'up_blocks.3'."""
    parts = name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def is_ip_processor(processor) -> bool:
    """An image-branch processor: ours, a learner's own (notebook 2: anything with to_k_ip and
    to_v_ip), diffusers' IPAdapterAttnProcessor* (what `pipe.load_ip_adapter` installs), or the
    ablation's `ConcatAttnProcessor` (it reads the image tokens too, with no weights of its own)."""
    return (isinstance(processor, (IPAttnProcessor, ConcatAttnProcessor)) or "IPAdapter" in type(processor).__name__
            or (hasattr(processor, "to_k_ip") and hasattr(processor, "to_v_ip")))


def ip_processors(unet) -> dict:
    """The UNet's IP-Adapter processors by name: ours (`IPAttnProcessor`), or diffusers' own
    `IPAdapterAttnProcessor*` (what `pipe.load_ip_adapter` installs). Empty without an adapter."""
    return {name: p for name, p in unet.attn_processors.items() if is_ip_processor(p)}


# How `to_k_ip` / `to_v_ip` start: the original's copies of to_k / to_v, and two ablations
# (`python -m ipa_lab.ablation init` measures all three).
INITS = ("copy", "zeros", "random")


def init_ip_branch(processor: nn.Module, layer: nn.Module, init: str = "copy") -> None:
    """Set one processor's `to_k_ip` / `to_v_ip` in place: "copy" (the original: the weights of
    the layer's own to_k / to_v, which the paper chose to speed up convergence, section 3.2.2),
    "zeros" (ControlNet's argument: the branch adds exactly nothing at step 0; but with to_v_ip
    zero, to_k_ip gets no gradient until to_v_ip has moved) or "random" (nn.Linear's default
    init, from torch's random stream: seed it first)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    with torch.no_grad():
        for mine, theirs in ((processor.to_k_ip, layer.to_k), (processor.to_v_ip, layer.to_v)):
            if init == "copy":
                mine.weight.copy_(theirs.weight)  # a copy, not a shared tensor: to_k stays frozen
            elif init == "zeros":
                mine.weight.zero_()
            else:
                mine.reset_parameters()


def install_ip_adapter(unet: nn.Module, num_tokens: int = 4, scale: float = 1.0, init: str = "copy",
                       lora_rank: int | None = None) -> nn.ModuleList:
    """Replace every attention processor of `unet`; return them all as `adapter_modules`.

    Self-attention (`attn1`) -> `AttnProcessor()` (no weights). Cross-attention (`attn2`) ->
    `IPAttnProcessor(hidden_size, cross_attention_dim, scale, num_tokens)` with to_k_ip/to_v_ip
    initialised as copies of the layer's to_k/to_v, so the image branch works from step 0
    (`init`: "copy", the original's; "zeros" and "random" are the ablations of `init_ip_branch`).
    The layer's own weights are not touched. Works on the meta device (no memory used).

    `lora_rank` (FaceID, notebook 8): self-attention gets a `LoRAAttnProcessor` and cross-attention
    a `LoRAIPAttnProcessor`, each with a rank-`lora_rank` update of to_q/to_k/to_v/to_out that
    starts at zero: the self-attention processors then hold parameters too, and train.

    The returned ModuleList follows `unet.attn_processors` order (down blocks, up blocks, mid
    block last): index i holds the i-th processor, so cross-attention weights sit at the odd
    indices of the checkpoint (`1.to_k_ip.weight`, `3.to_k_ip.weight`, ...).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if lora_rank is not None and not (isinstance(lora_rank, int) and lora_rank > 0):
        raise ValueError(f"lora_rank must be a positive integer (the original FaceID uses 128) or None, got {lora_rank!r}")
    processors = unet.attn_processors
    already = list(ip_processors(unet))
    if already:
        raise RuntimeError(
            f"this UNet already has IP-Adapter processors ({len(already)} of them, e.g. {already[0]!r}); "
            "installing again would stack a second adapter on the first. Start from a fresh UNet, or "
            "restore plain attention first with unet.set_attn_processor(AttnProcessor())."
        )
    cross_attention_dim = _config_value(getattr(unet, "config", {}), "cross_attention_dim")
    cross_names = [n for n in processors if n.endswith("attn2" + _SUFFIX)]
    if cross_attention_dim is None or not cross_names:
        raise ValueError(
            f"{type(unet).__name__} has no cross-attention layers (no 'attn2' processors among its "
            f"{len(processors)} attention processors, cross_attention_dim={cross_attention_dim}): "
            "IP-Adapter needs a text-conditioned UNet with cross-attention blocks (e.g. CrossAttnDownBlock2D)."
        )
    if not isinstance(cross_attention_dim, int):
        raise ValueError(f"expected one integer cross_attention_dim, got {cross_attention_dim!r}")

    layers = dict(unet.named_modules())
    new_processors = {}
    for name in processors:
        layer = layers[name[: -len(_SUFFIX)]]
        if not (name.endswith("attn2" + _SUFFIX) and getattr(layer, "is_cross_attention", True)):
            new_processors[name] = AttnProcessor() if lora_rank is None else LoRAAttnProcessor(
                hidden_size_of(name, unet.config), None, lora_rank, device=layer.to_q.weight.device,
                dtype=layer.to_q.weight.dtype)
            continue
        hidden_size = hidden_size_of(name, unet.config)
        to_k, to_v = layer.to_k.weight, layer.to_v.weight
        if tuple(to_k.shape) != (hidden_size, cross_attention_dim):
            raise ValueError(
                f"{name}: to_k has shape {tuple(to_k.shape)}, expected (hidden_size={hidden_size}, "
                f"cross_attention_dim={cross_attention_dim}) from the UNet config"
            )
        # Build without initialising (meta), then allocate where the layer lives: the random
        # init would be thrown away by the copy anyway, and on a real SDXL it costs seconds.
        if lora_rank is None:
            processor = IPAttnProcessor(hidden_size, cross_attention_dim, scale, num_tokens,
                                        device="meta", dtype=to_k.dtype).to_empty(device=to_k.device)
        else:  # built where the layer lives: the LoRA's own init (down random, up zero) is kept
            processor = LoRAIPAttnProcessor(hidden_size, cross_attention_dim, lora_rank, scale=scale,
                                            num_tokens=num_tokens, device=to_k.device, dtype=to_k.dtype)
        if to_k.device.type != "meta":  # on meta there are no values to set
            init_ip_branch(processor, layer, init)
        new_processors[name] = processor
    for name, processor in new_processors.items():
        processor.layer_name = name[: -len(_SUFFIX)]  # lets parameter_table group by block
    unet.set_attn_processor(new_processors)
    return nn.ModuleList(unet.attn_processors.values())


def freeze(*modules: nn.Module) -> None:
    """Freeze whole models: no gradients (`requires_grad_(False)`) and eval mode (no dropout).

    Call it on the backbone (UNet, VAE, text encoder, image encoder) *before*
    `install_ip_adapter`, as the original does: processors installed afterwards are new,
    trainable modules. Freezing the UNet after installing would freeze them too.
    """
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); only those with requires_grad if asked."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_ip_adapter_parameters(unet_config_name: str = "sd15_unet",
                                image_encoder_name: str = "clip_vit_h14_vision",
                                variant: str = "base", num_tokens: int | None = None) -> dict[str, int]:
    """What IP-Adapter trains on a real architecture, counted on the meta device.

    The UNet and the projection are built from `ipa_lab.configs` with shapes only (no memory,
    no download). Returns {'projection', 'adapter', 'total', 'cross_attention_layers', 'unet'};
    e.g. SD 1.5 + ViT-H base: projection 3,150,336 + adapter 19,169,280 = total 22,319,616.
    """
    unet = build_unet(unet_config_name)
    unet_size = count_parameters(unet)
    default_tokens = 16 if variant == "plus" else 4
    adapter = install_ip_adapter(unet, num_tokens=num_tokens or default_tokens)
    with torch.device("meta"):
        projection = build_image_projection(load_config(unet_config_name), load_config(image_encoder_name),
                                            variant, num_tokens)
    counts = {"projection": count_parameters(projection), "adapter": count_parameters(adapter)}
    counts["total"] = counts["projection"] + counts["adapter"]
    counts["cross_attention_layers"] = sum(1 for m in adapter if count_parameters(m) > 0)
    counts["unet"] = unet_size
    return counts


# ---------------------------------------------------------------------------------------------
# The trainable-parameter table (notebook 3)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamRow:
    """One line of `parameter_table`.

    kind: 'part' for a component or block, 'subtotal' for the adapter sum, 'total' for the
    last line; plot the 'part' rows, they add up to the total.
    """

    component: str  # 'image projection', 'adapter', 'backbone' or 'total'
    block: str  # UNet block, model name or class name
    width: int | None  # hidden size of the adapter layers in that block
    layers: int | None  # number of processors counted in the row
    count: int  # parameters
    trainable: int  # of which requires_grad
    kind: str = "part"


def _count(params) -> tuple[int, int]:
    params = list(params)
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _block_sort_key(block: str):
    kind, _, index = block.partition(".")
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(kind, 3)
    return order, int(index) if index.isdigit() else 0, block


def parameter_table(image_proj_model: nn.Module, adapter_modules, backbone: Mapping[str, nn.Module]
                    ) -> list[ParamRow]:
    """Where the parameters are, and which train: the image projection, the adapter by UNet
    block, each backbone model, and the total.

    Backbone counts leave out the adapter's weights, which live inside the UNet once
    installed, so the UNet row shows the original model's size. Processors without weights
    (self-attention) get a row of their own: they are in `adapter_modules`, and hold 0.
    """
    adapter_modules = list(adapter_modules)
    adapter_params = {id(p) for m in adapter_modules for p in m.parameters()}
    projection_params = {id(p) for p in image_proj_model.parameters()}

    # Processor -> layer name, from any backbone model that has attention processors (the UNet).
    names = {}
    for model in backbone.values():
        for name, processor in (getattr(model, "attn_processors", None) or {}).items():
            names.setdefault(id(processor), name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name)

    rows = [ParamRow("image projection", type(image_proj_model).__name__, None, None,
                     *_count(image_proj_model.parameters()))]

    groups: dict[str, list[nn.Module]] = {}
    empty = []
    for processor in adapter_modules:
        if not any(True for _ in processor.parameters()):
            empty.append(processor)
            continue
        name = names.get(id(processor)) or getattr(processor, "layer_name", None) or "unknown"
        groups.setdefault(block_of(name) if name != "unknown" else name, []).append(processor)
    for block in sorted(groups, key=_block_sort_key):
        members = groups[block]
        widths = sorted({getattr(m, "hidden_size", None) for m in members} - {None})
        rows.append(ParamRow("adapter", block, widths[0] if len(widths) == 1 else None, len(members),
                             *_count(p for m in members for p in m.parameters())))
    if empty:
        rows.append(ParamRow("adapter", "no weights (self-attn)", None, len(empty), 0, 0))
    with_weights = [m for ms in groups.values() for m in ms]
    rows.append(ParamRow("adapter", "all blocks", None, len(with_weights),
                         *_count(p for m in with_weights for p in m.parameters()), kind="subtotal"))

    seen = adapter_params | projection_params
    for model_name, model in backbone.items():
        own = [p for p in model.parameters() if id(p) not in seen]
        seen |= {id(p) for p in own}
        rows.append(ParamRow("backbone", model_name, None, None, *_count(own)))

    parts = [r for r in rows if r.kind == "part"]
    rows.append(ParamRow("total", "", None, None, sum(r.count for r in parts),
                         sum(r.trainable for r in parts), kind="total"))
    return rows


def format_parameter_table(rows: list[ParamRow]) -> str:
    """`parameter_table` rows as an aligned plain-text table, counts with thousands separators.

    Sums (the adapter's subtotal, the total) are ruled off from the rows they add up.
    """
    cells = [{"component": r.component, "block": r.block, "width": r.width, "layers": r.layers,
              "parameters": r.count, "trainable": r.trainable} for r in rows]
    rules = {i for i, r in enumerate(rows) if r.kind != "part"}
    rules |= {i + 1 for i, r in enumerate(rows) if r.kind == "subtotal"}
    return format_table(cells, formats={"layers": ",", "parameters": ",", "trainable": ","}, rules=rules)
