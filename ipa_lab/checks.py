"""Exercise checkers: one per exercise, each prints a friendly verdict and never a traceback.

In a notebook::

    def hidden_size(name, block_out_channels):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

    checks.hidden_size(hidden_size)

prints ``PASS hidden_size: ...`` or ``FAIL hidden_size: <what is wrong>``, or, in a student copy
whose solution is still the stub, ``TODO hidden_size: not yet implemented``. A checker returns
True or False and never raises, so a notebook always runs to its end; later cells use the
package's own implementation, not the learner's.
"""
from __future__ import annotations

import functools

import torch


class CheckFailed(AssertionError):
    """Raised inside a checker with a message for the learner."""


def _checker(fn):
    """Turn `fn(answer) -> str` (the pass message; raises CheckFailed) into a verdict printer."""

    @functools.wraps(fn)
    def run(*args, **kwargs) -> bool:
        name = fn.__name__
        try:
            msg = fn(*args, **kwargs)
        except NotImplementedError:
            print(f"TODO {name}: not yet implemented (the notebook carries on with ipa_lab's version)")
            return False
        except CheckFailed as e:
            print(f"FAIL {name}: {e}")
            return False
        except Exception as e:  # the learner's code crashed: say where, briefly
            print(f"FAIL {name}: your code raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return False
        print(f"PASS {name}: {msg}")
        return True

    return run


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def expect_shape(t, shape, what: str = "the output") -> None:
    expect(isinstance(t, torch.Tensor), f"{what} should be a torch.Tensor, got {type(t).__name__}")
    expect(tuple(t.shape) == tuple(shape), f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def expect_close(a: torch.Tensor, b: torch.Tensor, what: str = "the output", atol: float = 1e-5) -> None:
    expect_shape(a, b.shape, what)
    diff = (a.detach().float() - b.detach().float()).abs().max().item()
    expect(diff <= atol, f"{what} differs from the expected values by up to {diff:.3g} (allowed {atol:g})")


def expect_equal(got, want, what: str) -> None:
    expect(got == want, f"{what} is {got!r}, expected {want!r}")


# --- notebook 00 ---
def _frozen(config: dict):
    """A config that reads both ways, `cfg["key"]` and `cfg.key`, like diffusers' `model.config`."""
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


def _as_int_tuple(value, what: str) -> tuple:
    try:
        return tuple(int(x) for x in value)
    except TypeError:
        raise CheckFailed(f"{what} should be a tuple of ints, got {type(value).__name__} {value!r}") from None


@_checker
def latent_shape(fn) -> str:
    """fn(height, width, vae_config) -> (channels, latent_height, latent_width)."""
    sd_vae = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
    cases = [
        ("the toy VAE, 32x32 px", {"block_out_channels": [32, 64, 64], "latent_channels": 4}, 32, 32, (4, 8, 8)),
        ("SD 1.5's VAE, 512x512 px", sd_vae, 512, 512, (4, 64, 64)),
        ("SD 1.5's VAE, 512 high x 768 wide", sd_vae, 512, 768, (4, 64, 96)),
        ("a VAE with 16 latent channels, 1024x1024 px",
         {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16}, 1024, 1024, (16, 128, 128)),
    ]
    for what, config, height, width, want in cases:
        got = _as_int_tuple(fn(height, width, _frozen(config)), f"latent_shape for {what}")
        expect(len(got) == 3, f"for {what} you returned {len(got)} numbers {got}; expected 3: (channels, height, width)")
        expect(got[0] == want[0], f"for {what} you gave {got[0]} channels, expected {want[0]}: the number of "
               "channels is the config's latent_channels")
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        expect(not (height != width and got[1:] == want[:0:-1]),
               f"for {what} you swapped height and width: {got}, expected {want}")
        expect(got[1:] == want[1:], f"for {what} you returned {got}, expected {want}: each encoder block but the "
               f"last halves the image, so the factor is 2 ** (len(block_out_channels) - 1) = {factor}")
    return "the VAE keeps latent_channels channels and shrinks each side by 2 ** (len(block_out_channels) - 1)."


@_checker
def encoder_hidden_states_shape(fn) -> str:
    """fn(batch, text_tokens, image_tokens, cross_attention_dim) -> shape of [text tokens; image tokens]."""
    cases = [
        ("the toy (16 text tokens, 4 image tokens, width 64)", (1, 16, 4, 64), (1, 20, 64)),
        ("SD 1.5 + IP-Adapter (77 text tokens, 4 image tokens, width 768)", (2, 77, 4, 768), (2, 81, 768)),
        ("SD 1.5 + IP-Adapter Plus (77 text tokens, 16 image tokens)", (3, 77, 16, 768), (3, 93, 768)),
        ("SDXL + IP-Adapter (77 text tokens, 4 image tokens, width 2048)", (1, 77, 4, 2048), (1, 81, 2048)),
    ]
    for what, args, want in cases:
        got = _as_int_tuple(fn(*args), f"the shape for {what}")
        batch, text, image, dim = args
        expect(len(got) == 3, f"for {what} you returned {got}; expected 3 numbers: (batch, tokens, features)")
        expect(got != (batch, text, dim), f"for {what} you returned {got}: that is the text alone; the "
               f"{image} image tokens are appended after the text tokens")
        expect(got[2] == dim, f"for {what} the features are {got[2]}, expected {dim}: every token, text or "
               "image, is cross_attention_dim wide; the image tokens are concatenated along the sequence "
               "(dim 1), not along the features")
        expect(got == want, f"for {what} you returned {got}, expected {want}")
    return "the cross-attention reads text tokens + image tokens, all cross_attention_dim wide (77 + 4 = 81 for SD 1.5)."


# --- notebook 01 ---
@_checker
def image_proj_forward(fn) -> str:
    """fn(image_embeds, proj, norm, num_tokens) -> (batch, num_tokens, cross_attention_dim) tokens."""
    from .projection import ImageProjModel

    gen = torch.Generator().manual_seed(0)
    for batch, embed_dim, dim, tokens in [(2, 32, 64, 4), (3, 48, 16, 6), (1, 1024, 768, 4)]:
        with torch.random.fork_rng():
            torch.manual_seed(batch)
            model = ImageProjModel(cross_attention_dim=dim, clip_embeddings_dim=embed_dim, clip_extra_context_tokens=tokens)
        with torch.no_grad():  # a LayerNorm that is not the identity, so forgetting it shows
            model.norm.weight.add_(torch.randn(dim, generator=gen) * 0.3)
            model.norm.bias.add_(torch.randn(dim, generator=gen) * 0.3)
        x = torch.randn(batch, embed_dim, generator=gen)
        want = model(x)
        what = f"the output for {batch} embeddings of width {embed_dim} ({tokens} tokens x {dim})"
        try:
            got = fn(x, model.proj, model.norm, tokens)
        except NotImplementedError:
            raise
        except Exception as e:
            if (tokens, dim) == (4, 64):
                raise
            raise CheckFailed(f"with num_tokens={tokens} and cross_attention_dim={dim} your code raised "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Did you hard-code "
                              "4 tokens or 64 features? Take them from num_tokens and the shapes") from None
        expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
        expect(tuple(got.shape) != (batch, tokens * dim), f"{what} has shape {tuple(got.shape)}: one long vector "
               f"per image; reshape it into (batch, num_tokens, cross_attention_dim) = {(batch, tokens, dim)}")
        expect_shape(got, want.shape, what)
        with torch.no_grad():
            flat = model.proj(x)
            no_norm = flat.reshape(batch, tokens, dim)
            wrong_order = model.norm(flat.reshape(batch, dim, tokens).transpose(1, 2))
        expect(not torch.allclose(got, no_norm, atol=1e-5), f"{what} is the reshaped linear output without the "
               "LayerNorm: apply norm to each token after the reshape")
        expect(not torch.allclose(got, wrong_order, atol=1e-5), f"{what} is cut into tokens in the wrong order: token i "
               "is the i-th run of cross_attention_dim consecutive outputs, so reshape to (batch, num_tokens, dim) directly")
        expect_close(got, want, what, atol=1e-4)
        expect(got.requires_grad, "your output carries no gradient (torch.no_grad() or .detach()?): the projection "
               "is what IP-Adapter trains, its forward must let gradients through")
    return "Linear -> reshape to (batch, tokens, dim) -> LayerNorm, exactly ImageProjModel.forward."


@_checker
def projection_parameters(fn) -> str:
    """fn(clip_embeddings_dim, cross_attention_dim, num_tokens) -> parameters of ImageProjModel."""
    from .adapter import count_parameters
    from .projection import ImageProjModel

    cases = [("the toy (32 -> 4 x 64)", 32, 64, 4), ("SD 1.5 with ViT-H/14 (1024 -> 4 x 768)", 1024, 768, 4),
             ("SDXL with ViT-bigG/14 (1280 -> 4 x 2048)", 1280, 2048, 4), ("16 tokens (1024 -> 16 x 768)", 1024, 768, 16)]
    for what, embed_dim, dim, tokens in cases:
        with torch.device("meta"):  # shapes only: nothing allocated
            want = count_parameters(ImageProjModel(dim, embed_dim, tokens))
        got = fn(embed_dim, dim, tokens)
        expect(isinstance(got, (int,)) or (hasattr(got, "__int__") and float(got) == int(got)),
               f"return a whole number, got {got!r}")
        got = int(got)
        hints = {tokens * dim: f"proj's bias ({tokens} x {dim} = {tokens * dim:,}, one per output)",
                 2 * dim: f"the LayerNorm's weight and bias (2 x {dim} = {2 * dim:,})",
                 tokens * dim + 2 * dim: "the bias of proj and the LayerNorm's weight and bias"}
        missing = want - got
        expect(missing not in hints, f"for {what} you get {got:,}, expected {want:,}: you left out {hints.get(missing)}")
        expect(got - want != 2 * dim * (tokens - 1), f"for {what} you get {got:,}, expected {want:,}: there is one "
               f"LayerNorm shared by all {tokens} tokens, so it holds 2 x {dim}, not 2 x {dim} per token")
        expect(got == want, f"for {what} you get {got:,}, expected {want:,} (off by {got - want:+,})")
    return "D*T*C + T*C + 2*C (linear weight, its bias, LayerNorm): 3,150,336 for SD 1.5 with ViT-H."


# --- notebook 02 ---
@_checker
def hidden_size_of(fn) -> str:
    """fn(processor_name, block_out_channels) -> the width of that attention layer."""
    tail = ".transformer_blocks.0.attn2.processor"
    sd15, toy, sdxl = [320, 640, 1280, 1280], [64, 128, 128], [320, 640, 1280]
    cases = [
        (f"down_blocks.0.attentions.0{tail}", sd15, 320),
        (f"down_blocks.2.attentions.1.transformer_blocks.0.attn1.processor", sd15, 1280),
        (f"up_blocks.1.attentions.2{tail}", sd15, 1280),
        (f"up_blocks.2.attentions.0{tail}", sd15, 640),
        (f"up_blocks.3.attentions.1{tail}", sd15, 320),
        (f"mid_block.attentions.0{tail}", sd15, 1280),
        (f"down_blocks.1.attentions.0{tail}", toy, 128),
        (f"up_blocks.2.attentions.1{tail}", toy, 64),
        (f"mid_block.attentions.0{tail}", toy, 128),
        ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor", sdxl, 640),
        ("up_blocks.0.attentions.2.transformer_blocks.9.attn2.processor", sdxl, 1280),
        ("up_blocks.1.attentions.0.transformer_blocks.1.attn2.processor", sdxl, 640),
        ("mid_block.attentions.0.transformer_blocks.9.attn2.processor", sdxl, 1280),
    ]
    for name, widths, want in cases:
        got = fn(name, list(widths))
        where = f"{name!r} with block_out_channels {widths}"
        expect(isinstance(got, int) and not isinstance(got, bool), f"return an int, got {type(got).__name__} {got!r} for {where}")
        if name.startswith("up_blocks") and got != want and got == widths[int(name.split(".")[1])]:
            raise CheckFailed(f"{where}: got {got}, expected {want}. The up path mirrors the down path: "
                              "up_blocks.0 is the deepest, so index block_out_channels reversed")
        if name.startswith("mid_block"):
            expect(got == want, f"{where}: got {got}, expected {want}. The mid block sits at the bottom of the U "
                   "and runs at the deepest width, block_out_channels[-1]")
        expect(got == want, f"{where}: got {got}, expected {want}")
    return "down_blocks.i -> block_out_channels[i], up_blocks.i -> reversed(...)[i], mid_block -> block_out_channels[-1]."


def _softmax_attention(q, k, v, scaled: bool = True):
    scores = q @ k.transpose(-2, -1)
    if scaled:
        scores = scores / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


@_checker
def decoupled_attention(fn) -> str:
    """fn(q, k, v, k_ip, v_ip, scale) -> Attn(q, k, v) + scale * Attn(q, k_ip, v_ip), multi-head tensors."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, n_query, n_text, n_image, head_dim = 2, 2, 16, 7, 4, 8
    q = torch.randn(batch, heads, n_query, head_dim, generator=gen)
    k, v = (torch.randn(batch, heads, n_text, head_dim, generator=gen) for _ in range(2))
    k_ip, v_ip = (torch.randn(batch, heads, n_image, head_dim, generator=gen) * 1.5 for _ in range(2))
    text = _softmax_attention(q, k, v)
    image = _softmax_attention(q, k_ip, v_ip)
    for scale in (1.0, 0.5, 0.0):
        got = fn(q, k, v, k_ip, v_ip, scale)
        want = text + scale * image
        what = f"Z with scale={scale}"
        expect_shape(got, want.shape, what)
        if torch.allclose(got, want, atol=1e-5):
            continue
        joint = _softmax_attention(q, torch.cat([k, k_ip], -2), torch.cat([v, v_ip], -2))
        expect(not torch.allclose(got, joint, atol=1e-5), f"{what}: you ran one softmax over the concatenated "
               "[text; image] keys. That is plain cross-attention on more tokens; decoupled cross-attention "
               "runs two softmaxes, one per branch, and adds the results")
        expect(not torch.allclose(got, scale * text + image, atol=1e-5), f"{what}: the scale multiplies the text "
               "branch; it belongs on the image branch: Attn(q, k, v) + scale * Attn(q, k_ip, v_ip)")
        expect(not torch.allclose(got, text + image, atol=1e-5), f"{what}: the scale is ignored; multiply the "
               "image branch by it")
        unscaled = _softmax_attention(q, k, v, False) + scale * _softmax_attention(q, k_ip, v_ip, False)
        expect(not torch.allclose(got, unscaled, atol=1e-5), f"{what}: the scores lack the 1/sqrt(head_dim) "
               "factor (q @ k^T / sqrt(d) before the softmax)")
        expect_close(got, want, what)
    return "two softmaxes with one query, the image branch weighted by scale; scale=0 leaves the text branch alone."


# --- notebook 03 ---
@_checker
def params_to_opt(fn) -> str:
    """fn(image_proj_model, adapter_modules, unet) -> the list of parameters to hand to the optimizer."""
    from .adapter import freeze, install_ip_adapter
    from .configs import build_unet, load_config
    from .projection import ImageProjModel

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
    got = list(got)
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


@_checker
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
        expect(isinstance(got, int) or (hasattr(got, "__int__") and float(got) == int(got)),
               f"return a whole number, got {got!r}")
        got = int(got)
        expect(got * 2 != want, f"for {what} you get {got:,}, exactly half of {want:,}: each layer gets two new "
               "matrices, to_k_ip and to_v_ip")
        expect(got != want + 2 * sum(widths), f"for {what} you get {got:,}, expected {want:,}: to_k_ip and "
               "to_v_ip have no bias (bias=False)")
        expect(got != 2 * sum(w * w for w in widths), f"for {what} you get {got:,}, expected {want:,}: to_k_ip "
               "reads the image tokens (cross_attention_dim wide) and writes hidden_size, so its weight is "
               "hidden_size x cross_attention_dim")
        expect(got == want, f"for {what} you get {got:,}, expected {want:,} (off by {got - want:+,})")
    return "2 x cross_attention_dim x (sum of the hidden sizes): 2 x 768 x 12,480 = 19,169,280 for SD 1.5."


# --- notebook 04 ---
def _as_bool_pair(value, what: str) -> tuple[bool, bool]:
    try:
        a, b = value
        return bool(a), bool(b)
    except (TypeError, ValueError, RuntimeError):
        raise CheckFailed(f"{what}: return a pair (drop_image, drop_text) of booleans, got {value!r}") from None


@_checker
def drop_decision(fn) -> str:
    """fn(u, p_image, p_text, p_both) -> (drop_image, drop_text) for one uniform draw u in [0, 1)."""
    recipes = [("the original's rates (0.05, 0.05, 0.05)", 0.05, 0.05, 0.05),
               ("this course's short-run rates (0.05, 0.5, 0.05)", 0.05, 0.5, 0.05)]
    for what, p_i, p_t, p_b in recipes:
        bands = [("image", 0.0, p_i, (True, False)), ("text", p_i, p_i + p_t, (False, True)),
                 ("both", p_i + p_t, p_i + p_t + p_b, (True, True)), ("keep", p_i + p_t + p_b, 1.0, (False, False))]
        for band, lo, hi, want in bands:
            for u in (lo, (lo + hi) / 2, hi - 1e-9):
                got = _as_bool_pair(fn(u, p_i, p_t, p_b), f"u={u:.4f} with {what}")
                if got == want:
                    continue
                where = f"u={u:.4f} with {what}"
                if band == "both":
                    raise CheckFailed(f"{where} falls in the 'both' band [{lo:.2f}, {hi:.2f}): drop the image AND the "
                                      f"text, expected {want}, got {got}. One draw decides one of four cases")
                if band == "keep":
                    raise CheckFailed(f"{where} is past all three bands (they end at p_image + p_text + p_both = "
                                      f"{lo:.2f}): keep both, expected {want}, got {got}")
                if u == lo and lo > 0:
                    raise CheckFailed(f"{where} sits exactly on the start of the '{band}' band [{lo:.2f}, {hi:.2f}): "
                                      f"expected {want}, got {got}. Use u < upper bound, so each band includes its "
                                      "lower end")
                raise CheckFailed(f"{where} falls in the '{band}' band [{lo:.2f}, {hi:.2f}): expected (drop_image, "
                                  f"drop_text) = {want}, got {got}. The bands are consecutive: image [0, p_image), "
                                  "text [p_image, p_image + p_text), both [.., .. + p_both), keep the rest")
    return ("one uniform draw, four consecutive bands: image / text / both dropped, or keep; with the original's "
            "rates 85% of the samples keep both.")


@_checker
def noisy_latents(fn) -> str:
    """fn(latents, noise, timesteps, alphas_cumprod) -> the DDPM-noised latents at those timesteps."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([0, 250, 600, 999])
    ab = scheduler.alphas_cumprod
    want = scheduler.add_noise(latents, noise, timesteps)
    got = fn(latents.clone(), noise.clone(), timesteps.clone(), ab.clone())
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect_shape(got, want.shape, "the noisy latents")
    passed = "x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise, per sample: DDPMScheduler.add_noise."
    if torch.allclose(got, want, atol=1e-5):
        return passed
    a = ab[timesteps].view(-1, 1, 1, 1)
    alphas = scheduler.alphas[timesteps].view(-1, 1, 1, 1)
    wrongs = [
        (a * latents + (1 - a) * noise, "you used alpha_bar and 1 - alpha_bar as the weights; take their square roots "
         "(the variances add up to 1, not the weights)"),
        (a.sqrt() * noise + (1 - a).sqrt() * latents, "the weights are swapped: sqrt(alpha_bar) goes with the clean "
         "latents, sqrt(1 - alpha_bar) with the noise"),
        (alphas.sqrt() * latents + (1 - alphas).sqrt() * noise, "you used the one-step alphas; the jump from x_0 to "
         "x_t in one go uses their cumulative product alpha_bar_t = alphas_cumprod[t]"),
        (latents + noise, "you added the noise unscaled; weight x_0 by sqrt(alpha_bar_t) and the noise by "
         "sqrt(1 - alpha_bar_t)"),
    ]
    for wrong, message in wrongs:
        expect(not torch.allclose(got, wrong, atol=1e-5), message)
    same = ab[timesteps[0]]
    flat = same.sqrt() * latents + (1 - same).sqrt() * noise
    expect(not torch.allclose(got, flat, atol=1e-5), "every sample got the first sample's timestep: index "
           "alphas_cumprod with the whole timesteps tensor and reshape to (batch, 1, 1, 1)")
    expect_close(got, want, "the noisy latents", atol=1e-5)
    return passed


@_checker
def diffusion_loss(fn) -> str:
    """fn(noise_pred, noise, latents) -> the training loss (a scalar tensor)."""
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    pred = (noise + 0.3 * torch.randn(3, 4, 8, 8, generator=gen)).requires_grad_(True)
    want = torch.nn.functional.mse_loss(pred, noise)
    got = fn(pred, noise, latents)
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect(got.numel() == 1, f"return one number (the mean over every element), got shape {tuple(got.shape)}")
    value = got.float().reshape(()).item()
    expect(abs(value - torch.nn.functional.mse_loss(pred, latents).item()) > 1e-4,
           "you compared the prediction with the clean latents; the UNet predicts the noise that was added "
           "(epsilon prediction), so the target is the noise")
    expect(abs(value - ((pred - noise) ** 2).sum().item()) > 1e-3,
           "you summed the squared errors; the original takes the mean (F.mse_loss(..., reduction='mean'))")
    expect(abs(value - (pred - noise).abs().mean().item()) > 1e-4,
           "that is the mean absolute error; the diffusion loss is the mean *squared* error")
    expect(abs(value - want.item()) < 1e-5, f"your loss is {value:.5f}, expected {want.item():.5f}")
    expect(got.requires_grad, "your loss carries no gradient (.item(), .detach() or torch.no_grad()?): the "
           "optimizer needs loss.backward() to reach the adapter")
    return "MSE between the predicted and the true noise, averaged over every element."


# --- notebook 05 ---
@_checker
def compose_prompt_embeds(fn) -> str:
    """fn(text, negative_text, image_tokens, uncond_image_tokens) -> (prompt_embeds, negative_prompt_embeds)."""
    gen = torch.Generator().manual_seed(2)
    batch, length, tokens, dim = 2, 16, 4, 64
    text, negative = torch.randn(batch, length, dim, generator=gen), torch.randn(batch, length, dim, generator=gen)
    image, uncond = torch.randn(batch, tokens, dim, generator=gen), torch.randn(batch, tokens, dim, generator=gen)
    got = fn(text, negative, image, uncond)
    expect(not isinstance(got, torch.Tensor), "you returned one tensor; return a pair (prompt_embeds, "
           "negative_prompt_embeds): one sequence for the conditional branch, one for the unconditional")
    try:
        cond_got, uncond_got = got
    except (TypeError, ValueError):
        raise CheckFailed(f"return a pair (prompt_embeds, negative_prompt_embeds), got {type(got).__name__}") from None
    want_cond, want_uncond = torch.cat([text, image], 1), torch.cat([negative, uncond], 1)
    for t, what in ((cond_got, "prompt_embeds"), (uncond_got, "negative_prompt_embeds")):
        expect(isinstance(t, torch.Tensor), f"{what} should be a torch.Tensor, got {type(t).__name__}")
        expect(tuple(t.shape) != (batch, length, dim + tokens) and tuple(t.shape) != (batch, length, 2 * dim),
               f"{what} has shape {tuple(t.shape)}: the tokens were joined along the features (dim 2); append the "
               "image tokens along the sequence, dim 1")
        expect_shape(t, want_cond.shape, f"{what} (text tokens then image tokens, along dim 1)")
    if torch.equal(cond_got, want_uncond) and torch.equal(uncond_got, want_cond):
        raise CheckFailed("the two results are swapped: first the conditional [text; image tokens], then the "
                          "unconditional [negative text; unconditional image tokens]")
    expect(not torch.equal(cond_got, torch.cat([image, text], 1)), "prompt_embeds has the image tokens first; "
           "IPAttnProcessor takes the LAST num_tokens tokens as the image, so they go after the text")
    expect(torch.equal(cond_got, want_cond), "prompt_embeds should be torch.cat([text, image_tokens], dim=1)")
    expect(not torch.equal(uncond_got, torch.cat([negative, image], 1)), "negative_prompt_embeds carries the image "
           "tokens; the unconditional branch gets the unconditional image tokens (the 'no image' the model saw "
           "in training), otherwise guidance cancels the image out")
    expect(not torch.equal(uncond_got, torch.cat([uncond, negative], 1)), "negative_prompt_embeds has the image "
           "tokens first; they go after the text")
    expect(torch.equal(uncond_got, want_uncond),
           "negative_prompt_embeds should be torch.cat([negative_text, uncond_image_tokens], dim=1)")
    return "[text; image] for the conditional branch, [negative text; 'no image'] for the unconditional one."


@_checker
def unconditional_image_tokens(fn) -> str:
    """fn(image_proj_model) -> the 'no image' tokens of the base model, (1, num_tokens, dim)."""
    from .projection import ImageProjModel

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = ImageProjModel(cross_attention_dim=64, clip_embeddings_dim=32, clip_extra_context_tokens=4)
        with torch.no_grad():
            model.proj.bias.normal_(0, 0.5)
            model.norm.weight.normal_(1, 0.3)
            model.norm.bias.normal_(0, 0.3)
    with torch.no_grad():
        want = model(torch.zeros(1, 32))
        got = fn(model)
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect(got.numel() == want.numel(), f"the tokens have shape {tuple(got.shape)}, expected {tuple(want.shape)}: "
           "one image's worth of tokens (num_tokens x cross_attention_dim)")
    got = got.detach().reshape(want.shape)
    expect(bool(got.abs().sum() > 0), "you returned all-zero tokens; in training a dropped image was a zero "
           "*embedding*, passed through the projection: proj(0) is proj's bias, and the LayerNorm then gives "
           "tokens that are not zero. Project torch.zeros(1, clip_embeddings_dim)")
    expect(not torch.allclose(got, model.proj.bias.detach().reshape(want.shape), atol=1e-5),
           "you returned proj's bias without the LayerNorm; run the whole projection on a zero embedding")
    expect_close(got, want, "the unconditional tokens", atol=1e-5)
    return "the projection of a zero image embedding: exactly what the model saw whenever an image was dropped."


@_checker
def guidance(fn) -> str:
    """fn(noise_uncond, noise_cond, guidance_scale) -> the classifier-free guided noise prediction."""
    gen = torch.Generator().manual_seed(4)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for w in (7.5, 1.0, 0.0, 5.0):
        got = fn(uncond.clone(), cond.clone(), w)
        want = uncond + w * (cond - uncond)
        what = f"the guided prediction at guidance_scale={w}"
        expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
        expect_shape(got, want.shape, what)
        if torch.allclose(got, want, atol=1e-5):
            continue
        expect(not torch.allclose(got, cond + w * (cond - uncond), atol=1e-5), f"{what}: start from the "
               "unconditional prediction, uncond + w * (cond - uncond); at w = 1 that gives cond exactly")
        expect(not torch.allclose(got, uncond + w * (uncond - cond), atol=1e-5), f"{what}: the difference points "
               "the wrong way; move from uncond towards cond: uncond + w * (cond - uncond)")
        expect_close(got, want, what)
    return "uncond + w * (cond - uncond): w = 1 is the conditional prediction, w > 1 pushes past it."


# --- notebook 06 ---
@_checker
def perceiver_kv_input(fn) -> str:
    """fn(features, latents) -> the sequence the Resampler's keys and values are computed from."""
    gen = torch.Generator().manual_seed(5)
    features, latents = torch.randn(2, 65, 32, generator=gen), torch.randn(2, 16, 32, generator=gen)
    got = fn(features, latents)
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect(tuple(got.shape) != (2, 65, 32) or not torch.equal(got, features), "you returned the features alone; "
           "the keys and values also come from the latents, so each query can attend to the image and to the "
           "other queries in one step: concatenate them")
    expect(tuple(got.shape) != (2, 16, 32) or not torch.equal(got, latents), "you returned the latents alone: "
           "then the queries never see the image. Concatenate the features and the latents")
    expect_shape(got, (2, 81, 32), "the keys/values input for 65 features and 16 latents (concatenate along the "
                 "token axis, dim -2)")
    if torch.equal(got, torch.cat([latents, features], -2)):
        return ("[latents; features] along the tokens. The original puts the features first; softmax attention does "
                "not depend on the order of the keys, so both orders give the same result.")
    expect(torch.equal(got, torch.cat([features, latents], -2)), "expected torch.cat([features, latents], dim=-2)")
    return "[features; latents] along the tokens: 65 + 16 = 81 keys and values for 16 queries."


@_checker
def perceiver_scores(fn) -> str:
    """fn(q, k, dim_head) -> the attention scores (before the softmax) of the Resampler."""
    gen = torch.Generator().manual_seed(6)
    for dim_head in (64, 16):
        q, k = torch.randn(2, 4, 16, dim_head, generator=gen) * 3, torch.randn(2, 4, 81, dim_head, generator=gen) * 3
        want = (q * dim_head ** -0.25) @ (k * dim_head ** -0.25).transpose(-2, -1)
        got = fn(q.clone(), k.clone(), dim_head)
        what = f"the scores for dim_head={dim_head}"
        expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
        expect(tuple(got.shape) != (2, 4, dim_head, dim_head), f"{what} have shape {tuple(got.shape)}: transpose "
               "the last two dimensions of k, not q (queries x keys)")
        expect_shape(got, want.shape, f"{what} (batch, heads, queries, keys)")
        if torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            continue
        raw = q @ k.transpose(-2, -1)
        expect(not torch.allclose(got, raw, rtol=1e-4, atol=1e-4), f"{what} are not scaled: without the factor "
               "the softmax saturates as dim_head grows; scale q and k by dim_head ** -0.25 each")
        expect(not torch.allclose(got, raw / dim_head, rtol=1e-4, atol=1e-4), f"{what} are scaled by 1/dim_head: "
               f"each of q and k gets dim_head ** -0.25 (the product then gets dim_head ** -0.5), not -0.5 each")
        expect_close(got, want, what, atol=1e-4)
    return "(q * d^-1/4) @ (k * d^-1/4)^T = q k^T / sqrt(d): the usual scale, split between q and k."


@_checker
def resampler_parameters(fn) -> str:
    """fn(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult) -> Resampler parameters."""
    from .adapter import count_parameters
    from .projection import Resampler

    cases = [("SD 1.5 Plus (dim 768, depth 4, 12 heads of 64, 16 queries, ViT-H 1280 -> 768)",
              dict(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=768, ff_mult=4)),
             ("the toy Plus (dim 64, depth 4, 1 head of 64, 16 queries, 64 -> 64)",
              dict(dim=64, depth=4, dim_head=64, heads=1, num_queries=16, embedding_dim=64, output_dim=64, ff_mult=4)),
             ("an odd one (dim 96, depth 3, 3 heads of 16, 8 queries, 48 -> 80, ff_mult 2)",
              dict(dim=96, depth=3, dim_head=16, heads=3, num_queries=8, embedding_dim=48, output_dim=80, ff_mult=2))]
    failures = []  # (what, got, want, the hints that explain the difference)
    for what, kw in cases:
        with torch.device("meta"):
            want = count_parameters(Resampler(**kw))
        got = fn(**kw)
        expect(isinstance(got, int) or (hasattr(got, "__int__") and float(got) == int(got)),
               f"return a whole number, got {got!r}")
        got = int(got)
        dim, depth, inner = kw["dim"], kw["depth"], kw["dim_head"] * kw["heads"]
        hints = [
            (kw["num_queries"] * dim, "the learned latents (num_queries x dim): the queries are parameters too"),
            (dim, "proj_in's bias"),
            (kw["output_dim"], "proj_out's bias"),
            (2 * kw["output_dim"], "norm_out (the final LayerNorm's weight and bias)"),
            (depth * 4 * dim, "the two LayerNorms of each attention layer (norm1 for the features, norm2 for the latents)"),
            (depth * 2 * dim, "the LayerNorm at the start of each feed-forward block"),
            (depth * inner * dim, "the values (to_kv makes keys AND values: 2 x heads x dim_head outputs)"),
        ]
        if got != want:
            failures.append((what, got, want, {text for amount, text in hints if amount == want - got}))
    if failures:
        what, got, want, _ = failures[0]
        common = set.intersection(*(f[3] for f in failures))
        reason = f": you left out {common.pop()}" if len(common) == 1 else f" (off by {got - want:+,})"
        raise CheckFailed(f"for {what} you get {got:,}, expected {want:,}{reason}")
    return "latents + proj_in + depth x (attention + feed-forward) + proj_out + norm_out: 29,918,208 for SD 1.5 Plus."


# --- notebook 07 ---
@_checker
def global_batch(fn) -> str:
    """fn(per_device_batch, num_processes, dataset_size) -> (global_batch, steps_per_epoch)."""
    cases = [("the paper: 8 GPUs x 8 images, about 10M pairs", (8, 8, 10_000_000), 64, {156_250}),
             ("this course on one CPU: batch 64, 4000 images", (64, 1, 4000), 64, {62, 63}),
             ("4 GPUs x 16 images, 1024 images", (16, 4, 1024), 64, {16}),
             ("2 GPUs x 8 images, 4000 images", (8, 2, 4000), 16, {250})]
    for what, args, want_batch, want_steps in cases:
        got = fn(*args)
        try:
            batch, steps = (int(x) for x in got)
        except (TypeError, ValueError):
            raise CheckFailed(f"return a pair (global_batch, steps_per_epoch), got {got!r}") from None
        expect(batch == want_batch, f"for {what} the global batch is {batch}, expected {want_batch}: every process "
               "takes its own per-device batch at each step, so one step consumes per_device x num_processes images")
        expect(steps != args[2] // args[0] or args[1] == 1, f"for {what} you get {steps:,} steps per epoch: that is "
               "one GPU's count; all processes move through the data together, so divide by the global batch")
        expect(steps in want_steps, f"for {what} you get {steps:,} steps per epoch, expected "
               f"{' or '.join(f'{s:,}' for s in sorted(want_steps))} (dataset_size / global batch)")
    return "global batch = per-device batch x processes; an epoch is dataset_size / global batch steps (156,250 for the paper)."


@_checker
def adamw_state_bytes(fn) -> str:
    """fn(num_trainable) -> bytes of AdamW's state for that many fp32 parameters."""
    for n in (22_319_616, 49_087_488, 1000):
        got = fn(n)
        expect(isinstance(got, (int, float)) or hasattr(got, "__float__"), f"return a number, got {got!r}")
        got = float(got)
        want = 8 * n
        expect(got != 4 * n, f"for {n:,} parameters you get {got:,.0f} bytes: that is one fp32 moment; AdamW keeps "
               "two per parameter (exp_avg and exp_avg_sq)")
        expect(got != 16 * n, f"for {n:,} parameters you get {got:,.0f} bytes: that also counts the weights and "
               "the gradients; the optimizer's state is the two moments alone")
        expect(got != 2 * n, f"for {n:,} parameters you get {got:,.0f}: count bytes, not values (fp32 = 4 bytes)")
        expect(abs(got - want) < 0.5, f"for {n:,} parameters you get {got:,.0f} bytes, expected {want:,}")
    return "two fp32 moments per parameter = 8 bytes: 178.6 MB for SD 1.5's 22,319,616 trainable parameters."


@_checker
def static_training_bytes(fn) -> str:
    """fn(n_frozen, n_trainable, frozen_bytes_per_param) -> bytes of weights, gradients and optimizer state."""
    for n_frozen, n_trainable, frozen_bytes in ((1_700_000_000, 22_319_616, 2), (1_700_000_000, 22_319_616, 4),
                                                (1000, 10, 2)):
        got = fn(n_frozen, n_trainable, frozen_bytes)
        expect(isinstance(got, (int, float)) or hasattr(got, "__float__"), f"return a number, got {got!r}")
        got = float(got)
        want = n_frozen * frozen_bytes + 16 * n_trainable
        what = f"for {n_frozen:,} frozen ({frozen_bytes} bytes each) and {n_trainable:,} trainable parameters"
        expect(got != n_frozen * frozen_bytes + 16 * n_trainable + (4 + 8) * n_frozen,
               f"{what} you gave the frozen models gradients and AdamW states: they have none "
               "(requires_grad is False and they are not in the optimizer)")
        expect(got != 16 * (n_frozen + n_trainable), f"{what} you counted every parameter as trainable; only "
               "the adapter has gradients and optimizer state")
        expect(got != n_frozen * frozen_bytes + 12 * n_trainable, f"{what} you left out the trainable weights' "
               "gradients (4 bytes each)")
        expect(got != n_frozen * frozen_bytes + 8 * n_trainable, f"{what} the trainable part needs its fp32 weights "
               "(4), gradients (4) and two AdamW moments (8): 16 bytes each")
        expect(got != (n_frozen + n_trainable) * frozen_bytes, f"{what} you left out the gradients and AdamW state "
               "of the trainable part")
        expect(abs(got - want) < 0.5, f"{what} you get {got:,.0f} bytes, expected {want:,}")
    return "frozen weights x their bytes + 16 bytes per trainable parameter (fp32 weight, gradient, two moments)."
