"""Notebook 03, freeze and count: what the optimizer trains, and how much of it there is.

The parameters handed to the optimizer (the projection and to_k_ip/to_v_ip, nothing frozen) and
the size of the adapter.
"""
from __future__ import annotations

import torch

from .core import CheckFailed, as_whole_number, checker, describe, expect


@checker
def params_to_opt(fn) -> str:
    """fn(image_proj_model, adapter_modules, unet) -> the list of parameters to hand to the optimizer."""
    from ..adapter import freeze, install_ip_adapter
    from ..configs import build_unet, load_config
    from ..projection import ImageProjModel

    unet = build_unet("toy_unet", device="meta")
    freeze(unet)  # the backbone first, as the original does; then the new, trainable modules
    adapter_modules = install_ip_adapter(unet)
    with torch.device("meta"):
        image_proj_model = ImageProjModel(load_config("toy_unet")["cross_attention_dim"], 32, 4)
    names = {id(p): f"unet: {n}" for n, p in unet.named_parameters()}
    names.update({id(p): f"adapter_modules: {n}" for n, p in adapter_modules.named_parameters()})
    names.update({id(p): f"image_proj_model: {n}" for n, p in image_proj_model.named_parameters()})
    want_in_order = [*image_proj_model.parameters(), *adapter_modules.parameters()]
    want = {id(p) for p in want_in_order}

    got = fn(image_proj_model, adapter_modules, unet)
    expect(got is not None, "your function returned None; return a list of parameters")
    expect(not isinstance(got, torch.nn.Module), "return the parameters (e.g. list(module.parameters())), not a module")
    try:
        got = list(got)
    except TypeError:  # not iterable: an int, a single tensor's number...
        raise CheckFailed(f"return a list of parameters, got {describe(got)}") from None
    bad = [type(p).__name__ for p in got if not isinstance(p, torch.Tensor)]
    if bad:
        raise CheckFailed(f"expected parameters (tensors), found {bad[0]} in your list")
    ids = [id(p) for p in got]
    twice = [i for i in ids if ids.count(i) > 1]
    if twice:
        raise CheckFailed(f"{len(ids) - len(set(ids))} parameters appear twice (e.g. {names.get(twice[0], '?')}): "
                          "chain the projection and adapter_modules once each")
    extra = [p for p in got if id(p) not in want]
    frozen = [p for p in extra if not p.requires_grad]
    if frozen:
        raise CheckFailed(f"{len(frozen)} frozen tensors are in your list (e.g. {names.get(id(frozen[0]), '?')}): "
                          "they never get a gradient, so they only cost optimizer memory; hand the optimizer what trains")
    if extra:
        raise CheckFailed(f"{len(extra)} tensors in your list are neither the projection nor the adapter "
                          f"(e.g. {names.get(id(extra[0]), '?')})")
    missing = [names[id(p)] for p in want_in_order if id(p) not in set(ids)]
    proj_missing = [n for n in missing if n.startswith("image_proj_model")]
    expect(not proj_missing, f"your list misses the image projection ({', '.join(proj_missing)}): it is trained too")
    if missing:
        raise CheckFailed(f"your list misses {len(missing)} adapter tensors, e.g. {missing[0]} (to_k_ip/to_v_ip of "
                          "each cross-attention layer)")
    return (f"exactly the {len(want)} trainable tensors: the projection's proj/norm and to_k_ip/to_v_ip of "
            f"{sum(1 for m in adapter_modules if any(True for _ in m.parameters()))} cross-attention layers.")


@checker
def adapter_parameters(fn) -> str:
    """fn(hidden_sizes, cross_attention_dim) -> parameters of to_k_ip + to_v_ip over all cross-attention layers."""
    cases = [
        ("SD 1.5 (320 x5, 640 x5, 1280 x6; cross_attention_dim 768)", [320] * 5 + [640] * 5 + [1280] * 6, 768),
        ("the toy UNet (7 layers; cross_attention_dim 64)", [64, 128, 128, 128, 64, 64, 128], 64),
        ("SDXL (640 x10, 1280 x60; cross_attention_dim 2048)", [640] * 10 + [1280] * 60, 2048),
    ]
    for what, widths, dim in cases:
        want = 2 * dim * sum(widths)
        got = fn(list(widths), dim)
        number = as_whole_number(got)
        expect(number is not None, f"return a whole number, got {got!r}")
        got = number
        expect(got * 2 != want, f"for {what} you get {got:,}, exactly half of {want:,}: each layer gets two new "
               "matrices, to_k_ip and to_v_ip")
        expect(got != want + 2 * sum(widths), f"for {what} you get {got:,}, expected {want:,}: to_k_ip and "
               "to_v_ip have no bias (bias=False)")
        expect(got != 2 * sum(w * w for w in widths), f"for {what} you get {got:,}, expected {want:,}: to_k_ip "
               "reads the image tokens (cross_attention_dim wide) and writes hidden_size, so its weight is "
               "hidden_size x cross_attention_dim")
        expect(got == want, f"for {what} you get {got:,}, expected {want:,} (off by {got - want:+,})")
    return "2 x cross_attention_dim x (sum of the hidden sizes): 2 x 768 x 12,480 = 19,169,280 for SD 1.5."
