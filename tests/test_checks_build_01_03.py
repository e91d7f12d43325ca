"""The build exercises of notebooks 01-03 (checkers made with `checks.builds`): each passes the
solution and returns it, reports a stub as TODO and falls back to ipa_lab's piece, and names what
is wrong in plausible wrong answers (without ever raising)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipa_lab import checks
from ipa_lab.adapter import install_ip_adapter as package_install
from ipa_lab.attention import AttnProcessor, IPAttnProcessor as PackageProcessor
from ipa_lab.checks.core import LearnerFunction, NotYetImplemented, learner_code, toy_pipeline
from ipa_lab.projection import ImageProjModel as PackageProjection
from ipa_lab.trainer import prepare_training as package_prepare
from verdicts import assert_fail, assert_pass, assert_todo, stub, verdict


def assert_builds_fail(capsys, checker, piece, *fragments):
    """FAIL through `.passed`, and the fallback named in the verdict line."""
    assert_fail(capsys, checker.passed, piece, *fragments, "the notebook carries on with ipa_lab's")


# --- notebook 01: ImageProjModel -------------------------------------------------------------
class ImageProjModel(nn.Module):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds):
        tokens = self.proj(image_embeds).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class NoNormApplied(ImageProjModel):
    def forward(self, image_embeds):
        return self.proj(image_embeds).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)


class NoNormAtAll(NoNormApplied):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)
        del self.norm


class WrongOrder(ImageProjModel):
    def forward(self, image_embeds):
        flat = self.proj(image_embeds)
        return self.norm(flat.reshape(flat.shape[0], self.cross_attention_dim, -1).transpose(1, 2))


class OneLongVector(ImageProjModel):
    def forward(self, image_embeds):
        return self.proj(image_embeds)


class HardCodedSizes(ImageProjModel):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__(64, 32, 4)


class HardCodedForward(ImageProjModel):
    def forward(self, image_embeds):
        return self.norm(self.proj(image_embeds).reshape(-1, 4, 64))


class NoGradient(ImageProjModel):
    def forward(self, image_embeds):
        with torch.no_grad():
            return super().forward(image_embeds)


class NormTooWide(ImageProjModel):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)
        self.norm = nn.LayerNorm(clip_extra_context_tokens * cross_attention_dim)

    def forward(self, image_embeds):
        return self.norm(self.proj(image_embeds)).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)


class NoBias(ImageProjModel):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim, bias=False)


class ExtraLayer(ImageProjModel):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)
        self.hidden = nn.Linear(clip_embeddings_dim, clip_embeddings_dim)

    def forward(self, image_embeds):
        return super().forward(F.gelu(self.hidden(image_embeds)))


class OtherNames(ImageProjModel):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)
        self.linear, self.ln = self.proj, self.norm
        del self.proj, self.norm


class SwappedLinear(ImageProjModel):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)
        self.proj = nn.Linear(clip_extra_context_tokens * cross_attention_dim, clip_embeddings_dim)


class OtherArguments(ImageProjModel):
    def __init__(self, dim=768, embed_dim=1024, num_tokens=4):
        super().__init__(dim, embed_dim, num_tokens)


class StubForward(ImageProjModel):
    def forward(self, image_embeds):
        raise NotImplementedError("your code here")


class StubInit(nn.Module):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__()
        raise NotImplementedError("your code here")


class CrashingForward(ImageProjModel):
    def forward(self, image_embeds):
        return self.projection(image_embeds)


def test_image_proj_model_passes_and_returns_the_learners_class(capsys):
    assert_pass(capsys, checks.image_proj_model.passed, ImageProjModel)
    assert_pass(capsys, checks.image_proj_model.passed, PackageProjection)
    assert checks.image_proj_model(ImageProjModel) is ImageProjModel
    out = capsys.readouterr().out
    assert "diffusers' ImageProjection" in out and "uses yours from here on" in out


def test_image_proj_model_falls_back_to_the_package(capsys):
    assert checks.image_proj_model(stub) is PackageProjection
    assert checks.image_proj_model(NoBias) is PackageProjection
    capsys.readouterr()
    for todo in (stub, StubForward, StubInit):  # the stub, or a class with one method still stubbed
        ok, out = verdict(capsys, checks.image_proj_model.passed, todo)
        assert ok is False and out.startswith("TODO image_proj_model: not yet implemented"), out
        assert "ipa_lab's ImageProjModel" in out


@pytest.mark.parametrize("piece, fragments", [
    (NoNormApplied, ["without the LayerNorm"]),
    (NoNormAtAll, ["no LayerNorm", "nn.LayerNorm(cross_attention_dim)"]),
    (WrongOrder, ["wrong order"]),
    (OneLongVector, ["one long vector"]),
    (HardCodedSizes, ["hard-coded"]),
    (HardCodedForward, ["hard-code 4 tokens or 64 features"]),
    (NoGradient, ["no gradient"]),
    (NormTooWide, ["the LayerNorm is 256 wide", "nn.LayerNorm(cross_attention_dim)"]),
    (NoBias, ["proj has no bias"]),
    (ExtraLayer, ["hidden.weight (32, 32)", "+1,056 parameters", "nothing more"]),
    (OtherNames, ["linear.weight", "self.proj and self.norm", "checkpoints of the original"]),
    (SwappedLinear, ["input width first"]),
    (OtherArguments, ["keyword arguments cross_attention_dim, clip_embeddings_dim"]),
    (CrashingForward, ["your code raised AttributeError"]),
    (lambda **kwargs: "not a module", ["not an nn.Module"]),
])
def test_image_proj_model_names_the_mistake(capsys, piece, fragments):
    assert_builds_fail(capsys, checks.image_proj_model, piece, *fragments)


# --- notebook 02: decoupled_attention's gaps ---------------------------------------------------
def decoupled_solution(q, k, v, k_ip, v_ip, scale):
    return F.scaled_dot_product_attention(q, k, v) + scale * F.scaled_dot_product_attention(q, k_ip, v_ip)


def softmax_attention(q, k, v, dim=-1):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=dim) @ v


def test_decoupled_attention_scale_on_the_keys_and_softmax_over_the_queries(capsys):
    assert_fail(capsys, checks.decoupled_attention,
                lambda q, k, v, ki, vi, s: F.scaled_dot_product_attention(q, k, v)
                + F.scaled_dot_product_attention(q, ki * s, vi), "multiplies the image keys", "k_ip * scale")
    assert_fail(capsys, checks.decoupled_attention,  # the same mistake made on the query
                lambda q, k, v, ki, vi, s: F.scaled_dot_product_attention(q, k, v)
                + F.scaled_dot_product_attention(q * s, ki, vi), "multiplies the image keys")
    assert_fail(capsys, checks.decoupled_attention,
                lambda q, k, v, ki, vi, s: softmax_attention(q, k, v, -2) + s * softmax_attention(q, ki, vi, -2),
                "softmax runs over dim=-2", "dim=-1")
    assert_fail(capsys, checks.decoupled_attention,  # only in the image branch
                lambda q, k, v, ki, vi, s: softmax_attention(q, k, v) + s * softmax_attention(q, ki, vi, -2),
                "softmax runs over dim=-2")
    assert_pass(capsys, checks.decoupled_attention,  # the scale on the values is the same math: fine
                lambda q, k, v, ki, vi, s: softmax_attention(q, k, v) + softmax_attention(q, ki, vi * s))


# --- notebook 02: IPAttnProcessor --------------------------------------------------------------
def split_heads(x, heads):
    batch, n, width = x.shape
    return x.view(batch, n, heads, width // heads).transpose(1, 2)


def merge_heads(x):
    batch, heads, n, d = x.shape
    return x.transpose(1, 2).reshape(batch, n, heads * d)


class IPAttnProcessor(nn.Module):
    def __init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.scale, self.num_tokens = scale, num_tokens
        self.to_k_ip = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)

    def split(self, encoder_hidden_states):
        end = encoder_hidden_states.shape[1] - self.num_tokens
        return encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]

    def branches(self, attn, hidden_states, text, image, heads=None):
        heads = heads or attn.heads
        q = split_heads(attn.to_q(hidden_states), heads)
        k, v = split_heads(attn.to_k(text), heads), split_heads(attn.to_v(text), heads)
        k_ip, v_ip = split_heads(self.to_k_ip(image), heads), split_heads(self.to_v_ip(image), heads)
        return q, k, v, k_ip, v_ip

    def combine(self, q, k, v, k_ip, v_ip):
        return merge_heads(decoupled_solution(q, k, v, k_ip, v_ip, self.scale))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        text, image = self.split(encoder_hidden_states)
        out = self.combine(*self.branches(attn, hidden_states, text, image))
        return attn.to_out[1](attn.to_out[0](out))


class ManualSoftmax(IPAttnProcessor):
    """The same math written out (softmax(q k^T / sqrt(d)) v per branch): passes too."""

    def combine(self, q, k, v, k_ip, v_ip):
        return merge_heads(softmax_attention(q, k, v) + self.scale * softmax_attention(q, k_ip, v_ip))


class OtherBranchNames(IPAttnProcessor):
    def __init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4):
        super().__init__(hidden_size, cross_attention_dim, scale, num_tokens)
        self.k_ip, self.v_ip = self.to_k_ip, self.to_v_ip
        del self.to_k_ip, self.to_v_ip


class BranchWithBias(IPAttnProcessor):
    def __init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4):
        super().__init__(hidden_size, cross_attention_dim, scale, num_tokens)
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size)


class BranchSwappedWidths(IPAttnProcessor):
    def __init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4):
        super().__init__(hidden_size, cross_attention_dim, scale, num_tokens)
        self.to_k_ip = nn.Linear(hidden_size, cross_attention_dim, bias=False)
        self.to_v_ip = nn.Linear(hidden_size, cross_attention_dim, bias=False)


class NotSplit(IPAttnProcessor):
    def split(self, encoder_hidden_states):
        return encoder_hidden_states, encoder_hidden_states[:, -self.num_tokens:]


class ImageFirst(IPAttnProcessor):
    def split(self, encoder_hidden_states):
        return encoder_hidden_states[:, self.num_tokens:], encoder_hidden_states[:, :self.num_tokens]


class HardCodedFour(IPAttnProcessor):
    def split(self, encoder_hidden_states):
        return encoder_hidden_states[:, :-4], encoder_hidden_states[:, -4:]


class ScaleOnText(IPAttnProcessor):
    def combine(self, q, k, v, k_ip, v_ip):
        return merge_heads(self.scale * F.scaled_dot_product_attention(q, k, v)
                           + F.scaled_dot_product_attention(q, k_ip, v_ip))


class OneSoftmax(IPAttnProcessor):
    def combine(self, q, k, v, k_ip, v_ip):
        return merge_heads(F.scaled_dot_product_attention(q, torch.cat([k, k_ip], 2), torch.cat([v, v_ip], 2)))


class ScaleIgnored(IPAttnProcessor):
    def combine(self, q, k, v, k_ip, v_ip):
        return merge_heads(decoupled_solution(q, k, v, k_ip, v_ip, 1.0))


class NoToOut(IPAttnProcessor):
    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        text, image = self.split(encoder_hidden_states)
        return self.combine(*self.branches(attn, hidden_states, text, image))


class SwappedBranches(IPAttnProcessor):
    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        text, image = self.split(encoder_hidden_states)
        q = split_heads(attn.to_q(hidden_states), attn.heads)
        k, v = split_heads(self.to_k_ip(text), attn.heads), split_heads(self.to_v_ip(text), attn.heads)
        k_ip, v_ip = split_heads(attn.to_k(image), attn.heads), split_heads(attn.to_v(image), attn.heads)
        return attn.to_out[1](attn.to_out[0](self.combine(q, k, v, k_ip, v_ip)))


class OneHead(IPAttnProcessor):
    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        text, image = self.split(encoder_hidden_states)
        out = self.combine(*self.branches(attn, hidden_states, text, image, heads=1))
        return attn.to_out[1](attn.to_out[0](out))


class ScaleFixedAtInit(IPAttnProcessor):
    def __init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4):
        super().__init__(hidden_size, cross_attention_dim, scale, num_tokens)
        self.weight_of_image = scale

    def combine(self, q, k, v, k_ip, v_ip):
        return merge_heads(decoupled_solution(q, k, v, k_ip, v_ip, self.weight_of_image))


class NoMaskArgument(IPAttnProcessor):
    def forward(self, attn, hidden_states, encoder_hidden_states=None):
        return super().forward(attn, hidden_states, encoder_hidden_states)


class NoNumTokensAttribute(IPAttnProcessor):
    def __init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4):
        super().__init__(hidden_size, cross_attention_dim, scale, num_tokens)
        self.tokens = num_tokens
        del self.num_tokens

    def split(self, encoder_hidden_states):
        return encoder_hidden_states[:, :-self.tokens], encoder_hidden_states[:, -self.tokens:]


class NoScaleArgument(IPAttnProcessor):
    def __init__(self, hidden_size, cross_attention_dim=None, num_tokens=4):
        super().__init__(hidden_size, cross_attention_dim, 1.0, num_tokens)


class StubProcessorForward(IPAttnProcessor):
    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        raise NotImplementedError("your code here")


def test_ip_attn_processor_passes_and_returns_the_learners_class(capsys):
    assert_pass(capsys, checks.ip_attn_processor.passed, IPAttnProcessor)
    assert_pass(capsys, checks.ip_attn_processor.passed, PackageProcessor)
    assert_pass(capsys, checks.ip_attn_processor.passed, ManualSoftmax)
    assert checks.ip_attn_processor(IPAttnProcessor) is IPAttnProcessor
    assert checks.ip_attn_processor(ScaleOnText) is PackageProcessor
    assert checks.ip_attn_processor(stub) is PackageProcessor
    capsys.readouterr()
    assert_todo(capsys, checks.ip_attn_processor.passed)
    ok, out = verdict(capsys, checks.ip_attn_processor.passed, StubProcessorForward)
    assert ok is False and out.startswith("TODO ip_attn_processor: not yet implemented"), out


@pytest.mark.parametrize("piece, fragments", [
    (OtherBranchNames, ["self.to_k_ip and self.to_v_ip", "checkpoints of the original"]),
    (BranchWithBias, ["no bias", "bias=False"]),
    (BranchSwappedWidths, ["nn.Linear(cross_attention_dim, hidden_size)"]),
    (NotSplit, ["text keys include the image tokens"]),
    (ImageFirst, ["image tokens from the front"]),
    (HardCodedFour, ["num_tokens=6", "last 4 tokens", "self.num_tokens"]),
    (ScaleOnText, ["scale multiplies the text branch"]),
    (OneSoftmax, ["one softmax over the concatenated"]),
    (ScaleIgnored, ["the scale is ignored"]),
    (NoToOut, ["attn.to_out is not applied"]),
    (SwappedBranches, ["branches are swapped"]),
    (OneHead, ["heads are not split"]),
    (ScaleFixedAtInit, ["changed nothing", "read self.scale in forward"]),
    (NoMaskArgument, ["attention_mask", "keep the signature forward(self, attn, hidden_states"]),
    (NoNumTokensAttribute, ["self.num_tokens = num_tokens"]),
    (NoScaleArgument, ["unexpected keyword argument 'scale'", "keep the signature __init__(self, hidden_size"]),
])
def test_ip_attn_processor_names_the_mistake(capsys, piece, fragments):
    assert_builds_fail(capsys, checks.ip_attn_processor, piece, *fragments)


# --- notebook 02: install_ip_adapter -----------------------------------------------------------
def hidden_size_of(name, block_out_channels):
    if name.startswith("mid_block"):
        return block_out_channels[-1]
    index = int(name.split(".")[1])
    return (block_out_channels[::-1] if name.startswith("up_blocks") else block_out_channels)[index]


def make_install(processor_class=IPAttnProcessor, *, widths=hidden_size_of, attn1=None, copy=True, set_them=True,
                 pass_tokens=True, share=False, returned=lambda unet, processors: nn.ModuleList(unet.attn_processors.values())):
    """The notebook's solution, with knobs that make each plausible mistake."""
    def install(unet, num_tokens=4):
        unet_sd = unet.state_dict()
        processors = {}
        for name in unet.attn_processors.keys():
            layer = name.removesuffix(".processor")
            hidden_size = widths(name, unet.config.block_out_channels)
            if name.endswith("attn1.processor") and attn1 != "ip":
                processors[name] = attn1() if attn1 else AttnProcessor()
                continue
            tokens = num_tokens if pass_tokens else 4
            processor = processor_class(hidden_size, unet.config.cross_attention_dim, num_tokens=tokens)
            if share:
                processor.to_k_ip.weight = unet.get_submodule(layer).to_k.weight
                processor.to_v_ip.weight = unet.get_submodule(layer).to_v.weight
            elif copy:
                value = ".to_k.weight" if copy == "to_k twice" else ".to_v.weight"
                processor.load_state_dict({"to_k_ip.weight": unet_sd[layer + ".to_k.weight"],
                                           "to_v_ip.weight": unet_sd[layer + value]})
            processors[name] = processor
        if set_them:
            unet.set_attn_processor(processors)
        return returned(unet, processors)
    return install


def not_reversed(name, block_out_channels):
    return block_out_channels[-1] if name.startswith("mid_block") else block_out_channels[int(name.split(".")[1])]


def image_branch_everywhere(unet, num_tokens=4):
    """An IPAttnProcessor on attn1 too, built at the layer's own width: no crash, but weights where none belong."""
    processors = {}
    for name in unet.attn_processors:
        layer = unet.get_submodule(name.removesuffix(".processor"))
        processor = IPAttnProcessor(*layer.to_k.weight.shape, num_tokens=num_tokens)
        processor.to_k_ip.weight.data.copy_(layer.to_k.weight)
        processor.to_v_ip.weight.data.copy_(layer.to_v.weight)
        processors[name] = processor
    unet.set_attn_processor(processors)
    return nn.ModuleList(unet.attn_processors.values())


def test_install_ip_adapter_passes_with_either_processor_class(capsys):
    solution = make_install()
    assert_pass(capsys, checks.install_ip_adapter.passed, solution)
    assert_pass(capsys, checks.install_ip_adapter.passed, make_install(PackageProcessor))
    assert_pass(capsys, checks.install_ip_adapter.passed, package_install)
    assert checks.install_ip_adapter(solution) is solution
    assert checks.install_ip_adapter(stub) is package_install
    capsys.readouterr()
    assert_todo(capsys, checks.install_ip_adapter.passed)


def test_install_ip_adapter_leaves_the_shared_toy_unet_alone(capsys):
    checks.install_ip_adapter.passed(make_install())
    checks.prepare_training.passed(solution_prepare)
    capsys.readouterr()
    pipe = toy_pipeline()
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
    assert all(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


@pytest.mark.parametrize("piece, fragments", [
    (make_install(attn1="ip"), ["at down_blocks.1.attentions.0.transformer_blocks.0.attn1", "AttnProcessor()"]),
    (image_branch_everywhere, ["attn1 (self-attention) got parameters", "attn2 only"]),
    (make_install(widths=not_reversed), ["at up_blocks.2.attentions.0.transformer_blocks.0.attn2",
                                         "up_blocks.2 is 64 wide", "reverse", "size mismatch"]),
    (make_install(copy=False), ["to_k_ip was left random", "copy the layer's to_k"]),
    (make_install(copy="to_k twice"), ["to_v_ip holds the values of the layer's to_k; copy to_v into to_v_ip"]),
    (make_install(set_them=False), ["still runs diffusers' own processors", "call unet.set_attn_processor"]),
    (make_install(set_them=False, returned=lambda unet, processors: nn.ModuleList(processors.values())),
     ["the UNet still runs its old ones", "call unet.set_attn_processor"]),
    (make_install(set_them=False, returned=lambda unet, processors: nn.ModuleList()), ["nothing was installed"]),
    (make_install(pass_tokens=False), ["num_tokens=6", "pass num_tokens on"]),
    (make_install(share=True), ["shares its tensor with the layer's to_k"]),
    (make_install(returned=lambda unet, processors: list(unet.attn_processors.values())), ["nn.ModuleList"]),
    (make_install(returned=lambda unet, processors: None), ["returned None"]),
    (make_install(returned=lambda unet, processors: nn.ModuleList(
        p for p in unet.attn_processors.values() if hasattr(p, "to_k_ip"))), ["holds 7 modules, expected 14"]),
    (make_install(returned=lambda unet, processors: nn.ModuleList(reversed(unet.attn_processors.values()))),
     ["another order"]),
    (make_install(attn1=lambda: __import__("diffusers").models.attention_processor.AttnProcessor2_0()),
     ["Module subclass", "ipa_lab.attention's AttnProcessor()"]),
])
def test_install_ip_adapter_names_the_mistake(capsys, piece, fragments):
    assert_builds_fail(capsys, checks.install_ip_adapter, piece, *fragments)


def test_install_ip_adapter_compares_outputs(capsys):
    class Unscaled(IPAttnProcessor):  # a processor that survived no checker: the UNet's output shows it
        def combine(self, q, k, v, k_ip, v_ip):
            return merge_heads(decoupled_solution(q, k, v, k_ip, v_ip, 1.0))

    assert_builds_fail(capsys, checks.install_ip_adapter, make_install(Unscaled), "at scale 0.0", "plain UNet")


# --- notebook 03: prepare_training -------------------------------------------------------------
def params_to_opt(image_proj_model, adapter_modules, unet):
    return list(itertools.chain(image_proj_model.parameters(), adapter_modules.parameters()))


def make_prepare(*, freeze=("unet", "vae", "text_encoder", "image_encoder"), freeze_after_install=False,
                 embed_dim="projection_dim", params=params_to_opt, optimizer=torch.optim.AdamW, pass_lr=True,
                 returned=lambda proj, adapter, opt: (proj, adapter, opt)):
    """The notebook's solution, with knobs that make each plausible mistake."""
    def prepare(unet, vae, text_encoder, image_encoder, lr=1e-4):
        models = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "image_encoder": image_encoder}
        if not freeze_after_install:
            for name in freeze:
                models[name].requires_grad_(False)
        image_proj_model = PackageProjection(cross_attention_dim=unet.config.cross_attention_dim,
                                             clip_embeddings_dim=getattr(image_encoder.config, embed_dim),
                                             clip_extra_context_tokens=4)
        adapter_modules = make_install()(unet)
        if freeze_after_install:
            for name in freeze:
                models[name].requires_grad_(False)
        opt = optimizer(params(image_proj_model, adapter_modules, unet), lr=lr if pass_lr else 1e-4)
        return returned(image_proj_model, adapter_modules, opt)
    return prepare


solution_prepare = make_prepare()


def test_prepare_training_passes_and_returns_the_learners_function(capsys):
    assert_pass(capsys, checks.prepare_training.passed, solution_prepare)
    assert_pass(capsys, checks.prepare_training.passed, package_prepare)
    assert checks.prepare_training(solution_prepare) is solution_prepare
    assert checks.prepare_training(stub) is package_prepare
    capsys.readouterr()
    assert_todo(capsys, checks.prepare_training.passed)


@pytest.mark.parametrize("piece, fragments", [
    (make_prepare(freeze_after_install=True), ["froze the UNet after installing", "Freeze first"]),
    (make_prepare(freeze=("unet", "text_encoder", "image_encoder")), ["the VAE is not frozen", "954,567"]),
    (make_prepare(freeze=("unet", "vae", "image_encoder")), ["the text encoder is not frozen"]),
    (make_prepare(freeze=("unet", "vae", "text_encoder")), ["the image encoder is not frozen"]),
    (make_prepare(freeze=("vae", "text_encoder", "image_encoder")), ["the UNet is not frozen"]),
    (make_prepare(params=lambda proj, adapter, unet: list(proj.parameters()) + list(unet.parameters())),
     ["the optimizer holds 5,835,012 UNet parameters"]),
    (make_prepare(params=lambda proj, adapter, unet: list(adapter.parameters())), ["the projection is not in the optimizer"]),
    (make_prepare(params=lambda proj, adapter, unet: list(proj.parameters())), ["to_k_ip/to_v_ip are not"]),
    (make_prepare(pass_lr=False), ["lr=0.0003", "pass lr on"]),
    (make_prepare(optimizer=torch.optim.Adam), ["torch.optim.AdamW"]),
    (make_prepare(embed_dim="hidden_size"), ["image_encoder.config.projection_dim (32)"]),
    (make_prepare(returned=lambda proj, adapter, opt: (proj, opt)), ["3-tuple", "got a tuple of 2 items"]),
    (make_prepare(returned=lambda proj, adapter, opt: (proj, list(adapter), opt)), ["adapter_modules"]),
])
def test_prepare_training_names_the_mistake(capsys, piece, fragments):
    assert_builds_fail(capsys, checks.prepare_training, piece, *fragments)


def test_an_unusable_forward_output_is_described_as_the_answer(capsys):
    class DoubleOutput(ImageProjModel):
        def forward(self, image_embeds):
            return super().forward(image_embeds).double()

    class ReturnsTuple(IPAttnProcessor):
        def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            return (super().forward(attn, hidden_states, encoder_hidden_states),)

    assert_builds_fail(capsys, checks.image_proj_model, DoubleOutput, "dtype torch.float64, expected torch.float32")
    assert_builds_fail(capsys, checks.ip_attn_processor, ReturnsTuple, "returned tuple, expected a tensor")


def test_learner_code_records_the_answer_on_its_owner():
    owner = LearnerFunction(lambda: None)
    assert learner_code(lambda x: 2 * x, owner=owner)(3) == 6 and owner.returned == 6
    with pytest.raises(NotYetImplemented):
        learner_code(stub, owner=owner)()


@pytest.mark.parametrize("checker, piece", [(checks.image_proj_model, ImageProjModel),
                                            (checks.ip_attn_processor, IPAttnProcessor),
                                            (checks.install_ip_adapter, make_install()),
                                            (checks.prepare_training, solution_prepare)])
def test_a_check_leaves_the_notebooks_random_state_alone(capsys, checker, piece):
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    assert checker.passed(piece)
    assert torch.equal(torch.rand(3), want)
