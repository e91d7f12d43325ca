"""Notebook 03, freeze and count: what the optimizer trains, and how much of it there is.

The parameters handed to the optimizer (the projection and to_k_ip/to_v_ip, nothing frozen) and
the size of the adapter.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .core import (CheckFailed, LearnerRaised, builds, checker, describe, expect, first_line,
                   learner_code, toy_pipeline, tr, zh_word)


@checker
def params_to_opt(fn) -> str:
    """fn(image_proj_model, adapter_modules, unet) -> the list of parameters to hand to the optimizer.

    中文：fn(image_proj_model, adapter_modules, unet) -> 要交给优化器的参数列表。"""
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
    expect(got is not None, tr("your function returned None; return a list of parameters",
                               "你的函数返回了 None；请返回参数列表"))
    expect(not isinstance(got, torch.nn.Module), tr("return the parameters (e.g. list(module.parameters())), not a module",
                                                    "请返回参数（例如 list(module.parameters())），而不是模块"))
    try:
        got = list(got)
    except TypeError:  # not iterable: an int, a single tensor's number...
        raise CheckFailed(tr(f"return a list of parameters, got {describe(got)}",
                             f"请返回参数列表，得到的是 {describe(got)}")) from None
    bad = [type(p).__name__ for p in got if not isinstance(p, torch.Tensor)]
    if bad:
        raise CheckFailed(tr(f"expected parameters (tensors), found {bad[0]} in your list",
                             f"列表里应是参数（张量），却发现了 {bad[0]}"))
    ids = [id(p) for p in got]
    twice = [i for i in ids if ids.count(i) > 1]
    if twice:
        raise CheckFailed(tr(f"{len(ids) - len(set(ids))} parameters appear twice (e.g. {names.get(twice[0], '?')}): "
                             "chain the projection and adapter_modules once each",
                             f"有 {len(ids) - len(set(ids))} 个参数出现了两次（例如 {names.get(twice[0], '?')}）："
                             "图像投影和 adapter_modules 各串联一次即可"))
    extra = [p for p in got if id(p) not in want]
    frozen = [p for p in extra if not p.requires_grad]
    if frozen:
        raise CheckFailed(tr(f"{len(frozen)} frozen tensors are in your list (e.g. {names.get(id(frozen[0]), '?')}): "
                             "they never get a gradient, so they only cost optimizer memory; hand the optimizer what trains",
                             f"你的列表里有 {len(frozen)} 个冻结的张量（例如 {names.get(id(frozen[0]), '?')}）："
                             "它们永远得不到梯度，只会白占优化器的内存；只把要训练的交给优化器"))
    if extra:
        raise CheckFailed(tr(f"{len(extra)} tensors in your list are neither the projection nor the adapter "
                             f"(e.g. {names.get(id(extra[0]), '?')})",
                             f"你的列表里有 {len(extra)} 个张量既不属于图像投影也不属于适配器"
                             f"（例如 {names.get(id(extra[0]), '?')}）"))
    missing = [names[id(p)] for p in want_in_order if id(p) not in set(ids)]
    proj_missing = [n for n in missing if n.startswith("image_proj_model")]
    expect(not proj_missing, tr(f"your list misses the image projection ({', '.join(proj_missing)}): it is trained too",
                                f"你的列表缺了图像投影（{', '.join(proj_missing)}）：它也要训练"))
    if missing:
        raise CheckFailed(tr(f"your list misses {len(missing)} adapter tensors, e.g. {missing[0]} (to_k_ip/to_v_ip of "
                             "each cross-attention layer)",
                             f"你的列表缺了 {len(missing)} 个适配器张量，例如 {missing[0]}"
                             "（每个交叉注意力层的 to_k_ip/to_v_ip）"))
    layers = sum(1 for m in adapter_modules if any(True for _ in m.parameters()))
    return tr(f"exactly the {len(want)} trainable tensors: the projection's proj/norm and to_k_ip/to_v_ip of "
              f"{layers} cross-attention layers.",
              f"恰好是 {len(want)} 个可训练张量：图像投影的 proj/norm，以及 {layers} 个交叉注意力层的 to_k_ip/to_v_ip。")


# ---------------------------------------------------------------------------------------------
# prepare_training: freeze, build, install, hand the optimizer what trains, in the right order.
# ---------------------------------------------------------------------------------------------
_MODELS = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "image_encoder": "image encoder"}
_MODELS_ZH = {"unet": "UNet", "vae": "VAE", "text_encoder": "文本编码器", "image_encoder": "图像编码器"}
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
    got = (tr(f"a {type(result).__name__} of {len(result)} items", f"一个有 {len(result)} 项的 {type(result).__name__}")
           if isinstance(result, (tuple, list))
           else describe(result))  # describe() would print the modules' multi-line reprs
    expect(isinstance(result, (tuple, list)) and len(result) == 3,
           tr(f"return a 3-tuple (image_proj_model, "
              f"adapter_modules, optimizer), got {got}",
              f"请返回三元组 (image_proj_model, adapter_modules, optimizer)；实际得到：{got}"))
    image_proj_model, adapter_modules, optimizer = result
    expect(isinstance(optimizer, torch.optim.Optimizer),
           tr(f"the third item should be the optimizer, got "
              f"{describe(optimizer)}: return (image_proj_model, adapter_modules, optimizer)",
              f"第三项应是优化器，得到的是 {describe(optimizer)}：请返回 (image_proj_model, adapter_modules, optimizer)"))
    expect(isinstance(image_proj_model, nn.Module),
           tr(f"the first item should be the image projection (an "
              f"nn.Module), got {describe(image_proj_model)}",
              f"第一项应是图像投影（一个 nn.Module），得到的是 {describe(image_proj_model)}"))
    return image_proj_model, adapter_modules, optimizer


def _check_installed(unet, adapter_modules) -> list:
    """The UNet runs the adapter's processors, and adapter_modules are those processors."""
    processors = list(unet.attn_processors.values())
    expect(any(hasattr(p, "to_k_ip") for p in processors),
           tr("the UNet has no to_k_ip/to_v_ip: call "
              "install_ip_adapter(unet) (it sets the processors and returns adapter_modules)",
              "UNet 里没有 to_k_ip/to_v_ip：请调用 install_ip_adapter(unet)（它装好注意力处理器并返回 adapter_modules）"))
    expect(isinstance(adapter_modules, nn.Module) and [id(m) for m in adapter_modules.children()] ==
           [id(p) for p in processors],
           tr("the second item should be adapter_modules, what install_ip_adapter(unet) "
              "returned: the processors installed in the UNet",
              "第二项应是 adapter_modules，即 install_ip_adapter(unet) 的返回值：装在 UNet 里的注意力处理器"))
    return [p for name, p in unet.named_parameters() if _is_adapter_parameter(name)]


def _check_frozen(models: dict, adapter: list) -> None:
    """Backbones frozen; the adapter (inside the UNet) trainable: the order trap shows here."""
    not_grad = sum(not p.requires_grad for p in adapter)
    expect(all(p.requires_grad for p in adapter),
           tr(f"{not_grad} of the "
              f"{len(adapter)} to_k_ip/to_v_ip tensors do not require grad: you froze the UNet after installing the "
              "processors, so requires_grad_(False) on the UNet reached to_k_ip/to_v_ip (they are its submodules "
              "now). Freeze first, then install",
              f"{len(adapter)} 个 to_k_ip/to_v_ip 张量中有 {not_grad} 个不需要梯度：你在安装注意力处理器之后才冻结 UNet，"
              "于是 UNet 上的 requires_grad_(False) 也作用到了 to_k_ip/to_v_ip（它们现在是 UNet 的子模块）。"
              "先冻结，再安装"))
    for name, model in models.items():
        thawed = [p for n, p in model.named_parameters() if p.requires_grad and not _is_adapter_parameter(n)]
        count = sum(p.numel() for p in thawed)
        expect(not thawed, tr(f"the {_MODELS[name]} is not frozen: {count:,} of its parameters require grad; call "
                              f"{name}.requires_grad_(False) first (all four models, before installing the processors): "
                              "IP-Adapter trains none of the backbone",
                              f"{zh_word(_MODELS_ZH[name])}没有冻结：它有 {count:,} 个参数需要梯度；请先调用 "
                              f"{name}.requires_grad_(False)（四个模型都要，在安装注意力处理器之前）："
                              "IP-Adapter 不训练主干网络的任何部分"))


def _check_optimizer(optimizer, image_proj_model, adapter: list, models: dict) -> int:
    """The optimizer holds exactly the projection and to_k_ip/to_v_ip, at the lr given; returns how many."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    held_ids = {id(p) for p in held}
    projection = list(image_proj_model.parameters())
    expect(any(p.requires_grad for p in projection),
           tr("the projection's parameters do not require grad: it is "
              "the new, trained part, leave it unfrozen",
              "图像投影的参数不需要梯度：它是新加的、要训练的部分，不要冻结它"))
    wanted = {id(p) for p in projection + adapter}
    for name, model in models.items():
        extra = [p for n, p in model.named_parameters() if id(p) in held_ids and id(p) not in wanted]
        count = sum(p.numel() for p in extra)
        name_zh = f" {_MODELS_ZH[name]} " if _MODELS_ZH[name].isascii() else _MODELS_ZH[name]
        expect(not extra, tr(f"the optimizer holds {count:,} {_MODELS[name]} parameters: hand it "
                             "itertools.chain(image_proj_model.parameters(), adapter_modules.parameters()): the projection and to_k_ip/to_v_ip only",
                             f"优化器里有 {count:,} 个{name_zh}参数：请交给它 "
                             "itertools.chain(image_proj_model.parameters(), adapter_modules.parameters())："
                             "只有图像投影和 to_k_ip/to_v_ip"))
    expect(all(id(p) in held_ids for p in projection),
           tr("the projection is not in the optimizer: it trains too; "
              "hand AdamW itertools.chain(image_proj_model.parameters(), adapter_modules.parameters())",
              "图像投影不在优化器里：它也要训练；请交给 AdamW "
              "itertools.chain(image_proj_model.parameters(), adapter_modules.parameters())"))
    expect(all(id(p) in held_ids for p in adapter),
           tr("to_k_ip/to_v_ip are not (all) in the optimizer: hand AdamW "
              "itertools.chain(image_proj_model.parameters(), adapter_modules.parameters())",
              "to_k_ip/to_v_ip 没有（全部）放进优化器：请交给 AdamW "
              "itertools.chain(image_proj_model.parameters(), adapter_modules.parameters())"))
    expect(held_ids == wanted, tr(f"the optimizer holds {len(held_ids - wanted)} tensors that are neither the "
                                  "projection nor to_k_ip/to_v_ip",
                                  f"优化器里有 {len(held_ids - wanted)} 个张量既不属于图像投影，也不是 to_k_ip/to_v_ip"))
    expect(isinstance(optimizer, torch.optim.AdamW),
           tr(f"the optimizer is {type(optimizer).__name__}; IP-Adapter "
              "trains with torch.optim.AdamW, as the original does",
              f"优化器是 {type(optimizer).__name__}；IP-Adapter 用 torch.optim.AdamW 训练，与原版一致"))
    lrs = sorted({group["lr"] for group in optimizer.param_groups})
    shown = ", ".join(f"{lr:g}" for lr in lrs)
    expect(lrs == [_LR], tr(f"called with lr={_LR:g}, your optimizer's lr is {shown}: "
                            "pass lr on to AdamW",
                            f"调用时传入 lr={_LR:g}，你的优化器的 lr 却是 {shown}：请把 lr 传给 AdamW"))
    return len(wanted)


def _check_projection(image_proj_model, models: dict) -> None:
    """The projection reads the image encoder's embeddings and makes 4 tokens as wide as the UNet's text tokens."""
    embed_dim = models["image_encoder"].config.projection_dim
    dim = models["unet"].config.cross_attention_dim
    sizes = tr(f"build it with cross_attention_dim=unet.config.cross_attention_dim ({dim}), clip_embeddings_dim="
               f"image_encoder.config.projection_dim ({embed_dim}), clip_extra_context_tokens=4",
               f"请用 cross_attention_dim=unet.config.cross_attention_dim ({dim})、clip_embeddings_dim="
               f"image_encoder.config.projection_dim ({embed_dim})、clip_extra_context_tokens=4 构建它")
    try:
        with torch.no_grad():
            tokens = learner_code(image_proj_model)(torch.zeros(2, embed_dim))
    except LearnerRaised as e:
        raise CheckFailed(tr(f"your projection cannot read the image encoder's embeddings ({embed_dim} wide; it raised "
                             f"{first_line(e.error)}): {sizes}",
                             f"你的图像投影读不了图像编码器的图像嵌入（宽 {embed_dim}；它抛出了 "
                             f"{first_line(e.error)}）：{sizes}")) from None
    expect(isinstance(tokens, torch.Tensor) and tuple(tokens.shape) == (2, 4, dim),
           tr(f"your projection turns 2 "
              f"embeddings into {describe(tokens)}, expected (2, 4, {dim}): {sizes}",
              f"你的图像投影把 2 个图像嵌入变成了 {describe(tokens)}，应为 (2, 4, {dim})：{sizes}"))


@builds("trainer.prepare_training")
def prepare_training(fn) -> str:
    """fn(unet, vae, text_encoder, image_encoder, lr=1e-4) -> (image_proj_model, adapter_modules, optimizer).

    中文：fn(unet, vae, text_encoder, image_encoder, lr=1e-4) -> (image_proj_model, adapter_modules, optimizer)，即图像投影、适配器模块和优化器。"""
    models = _toy_models()
    with torch.random.fork_rng():  # building the projection must not move the notebook's seed
        result = fn(models["unet"], models["vae"], models["text_encoder"], models["image_encoder"], lr=_LR)
    image_proj_model, adapter_modules, optimizer = _unpack(result)
    adapter = _check_installed(models["unet"], adapter_modules)
    _check_frozen(models, adapter)
    count = _check_optimizer(optimizer, image_proj_model, adapter, models)
    _check_projection(image_proj_model, models)
    return tr(f"four models frozen first, then the processors installed, so AdamW gets exactly the {count} trainable "
              "tensors (projection + to_k_ip/to_v_ip) and nothing of the backbone.",
              f"先冻结四个模型，再安装注意力处理器，所以 AdamW 拿到的恰好是 {count} 个可训练张量"
              "（图像投影 + to_k_ip/to_v_ip），不含主干网络的任何部分。")
