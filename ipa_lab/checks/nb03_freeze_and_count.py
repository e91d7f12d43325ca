"""Notebook 03, freeze and count: what the optimizer trains, and how much of it there is.

The parameters handed to the optimizer (the projection and to_k_ip/to_v_ip, nothing frozen) and
the size of the adapter.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .core import (CheckFailed, LearnerRaised, builds, checker, describe, expect, first_line,
                   learner_code, toy_pipeline)


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


# ---------------------------------------------------------------------------------------------
# prepare_training: freeze, build, install, hand the optimizer what trains, in the right order.
# ---------------------------------------------------------------------------------------------
_MODELS = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "image_encoder": "image encoder"}
_LR = 3e-4  # not the default 1e-4, so an lr that is not passed on shows


def _toy_models() -> dict:
    """Private copies of the toy pipeline's four models (the learner's function freezes and changes them)."""
    pipe = toy_pipeline()
    return {name: copy.deepcopy(getattr(pipe, name)) for name in _MODELS}


def _is_adapter_parameter(name: str) -> bool:
    """A UNet parameter that lives in an installed processor (to_k_ip/to_v_ip), not in the backbone."""
    return ".processor." in name


def _unpack(result):
    """(image_proj_model, adapter_modules, optimizer), or a message saying what came back instead."""
    got = (f"a {type(result).__name__} of {len(result)} items" if isinstance(result, (tuple, list))
           else describe(result))  # describe() would print the modules' multi-line reprs
    expect(isinstance(result, (tuple, list)) and len(result) == 3, f"return a 3-tuple (image_proj_model, "
           f"adapter_modules, optimizer), got {got}")
    image_proj_model, adapter_modules, optimizer = result
    expect(isinstance(optimizer, torch.optim.Optimizer), f"the third item should be the optimizer, got "
           f"{describe(optimizer)}: return (image_proj_model, adapter_modules, optimizer)")
    expect(isinstance(image_proj_model, nn.Module), f"the first item should be the image projection (an "
           f"nn.Module), got {describe(image_proj_model)}")
    return image_proj_model, adapter_modules, optimizer


def _check_installed(unet, adapter_modules) -> list:
    """The UNet runs the adapter's processors, and adapter_modules are those processors."""
    processors = list(unet.attn_processors.values())
    expect(any(hasattr(p, "to_k_ip") for p in processors), "the UNet has no to_k_ip/to_v_ip: call "
           "install_ip_adapter(unet) (it sets the processors and returns adapter_modules)")
    expect(isinstance(adapter_modules, nn.Module) and [id(m) for m in adapter_modules.children()] ==
           [id(p) for p in processors], "the second item should be adapter_modules, what install_ip_adapter(unet) "
           "returned: the processors installed in the UNet")
    return [p for name, p in unet.named_parameters() if _is_adapter_parameter(name)]


def _check_frozen(models: dict, adapter: list) -> None:
    """Backbones frozen; the adapter (inside the UNet) trainable: the order trap shows here."""
    expect(all(p.requires_grad for p in adapter), f"{sum(not p.requires_grad for p in adapter)} of the "
           f"{len(adapter)} to_k_ip/to_v_ip tensors do not require grad: you froze the UNet after installing the "
           "processors, so requires_grad_(False) on the UNet reached to_k_ip/to_v_ip (they are its submodules "
           "now). Freeze first, then install")
    for name, model in models.items():
        thawed = [p for n, p in model.named_parameters() if p.requires_grad and not _is_adapter_parameter(n)]
        count = sum(p.numel() for p in thawed)
        expect(not thawed, f"the {_MODELS[name]} is not frozen: {count:,} of its parameters require grad; call "
               f"{name}.requires_grad_(False) first (all four models, before installing the processors): "
               "IP-Adapter trains none of the backbone")


def _check_optimizer(optimizer, image_proj_model, adapter: list, models: dict) -> int:
    """The optimizer holds exactly the projection and to_k_ip/to_v_ip, at the lr given; returns how many."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    held_ids = {id(p) for p in held}
    projection = list(image_proj_model.parameters())
    expect(any(p.requires_grad for p in projection), "the projection's parameters do not require grad: it is "
           "the new, trained part, leave it unfrozen")
    wanted = {id(p) for p in projection + adapter}
    for name, model in models.items():
        extra = [p for n, p in model.named_parameters() if id(p) in held_ids and id(p) not in wanted]
        expect(not extra, f"the optimizer holds {sum(p.numel() for p in extra):,} {_MODELS[name]} parameters: hand it "
               "itertools.chain(image_proj_model.parameters(), adapter_modules.parameters()): the projection and to_k_ip/to_v_ip only")
    expect(all(id(p) in held_ids for p in projection), "the projection is not in the optimizer: it trains too; "
           "hand AdamW itertools.chain(image_proj_model.parameters(), adapter_modules.parameters())")
    expect(all(id(p) in held_ids for p in adapter), "to_k_ip/to_v_ip are not (all) in the optimizer: hand AdamW "
           "itertools.chain(image_proj_model.parameters(), adapter_modules.parameters())")
    expect(held_ids == wanted, f"the optimizer holds {len(held_ids - wanted)} tensors that are neither the "
           "projection nor to_k_ip/to_v_ip")
    expect(isinstance(optimizer, torch.optim.AdamW), f"the optimizer is {type(optimizer).__name__}; IP-Adapter "
           "trains with torch.optim.AdamW, as the original does")
    lrs = sorted({group["lr"] for group in optimizer.param_groups})
    expect(lrs == [_LR], f"called with lr={_LR:g}, your optimizer's lr is {', '.join(f'{lr:g}' for lr in lrs)}: "
           "pass lr on to AdamW")
    return len(wanted)


def _check_projection(image_proj_model, models: dict) -> None:
    """The projection reads the image encoder's embeddings and makes 4 tokens as wide as the UNet's text tokens."""
    embed_dim = models["image_encoder"].config.projection_dim
    dim = models["unet"].config.cross_attention_dim
    sizes = (f"build it with cross_attention_dim=unet.config.cross_attention_dim ({dim}), clip_embeddings_dim="
             f"image_encoder.config.projection_dim ({embed_dim}), clip_extra_context_tokens=4")
    try:
        with torch.no_grad():
            tokens = learner_code(image_proj_model)(torch.zeros(2, embed_dim))
    except LearnerRaised as e:
        raise CheckFailed(f"your projection cannot read the image encoder's embeddings ({embed_dim} wide; it raised "
                          f"{first_line(e.error)}): {sizes}") from None
    expect(isinstance(tokens, torch.Tensor) and tuple(tokens.shape) == (2, 4, dim), f"your projection turns 2 "
           f"embeddings into {describe(tokens)}, expected (2, 4, {dim}): {sizes}")


@builds("trainer.prepare_training")
def prepare_training(fn) -> str:
    """fn(unet, vae, text_encoder, image_encoder, lr=1e-4) -> (image_proj_model, adapter_modules, optimizer)."""
    models = _toy_models()
    with torch.random.fork_rng():  # building the projection must not move the notebook's seed
        result = fn(models["unet"], models["vae"], models["text_encoder"], models["image_encoder"], lr=_LR)
    image_proj_model, adapter_modules, optimizer = _unpack(result)
    adapter = _check_installed(models["unet"], adapter_modules)
    _check_frozen(models, adapter)
    count = _check_optimizer(optimizer, image_proj_model, adapter, models)
    _check_projection(image_proj_model, models)
    return (f"four models frozen first, then the processors installed, so AdamW gets exactly the {count} trainable "
            "tensors (projection + to_k_ip/to_v_ip) and nothing of the backbone.")
