"""Exercise checkers: one per exercise, each prints a friendly verdict and never a traceback.

In a notebook::

    def hidden_size_of(name, block_out_channels):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

    checks.hidden_size_of(hidden_size_of)

prints ``PASS hidden_size_of: ...`` or ``FAIL hidden_size_of: <what is wrong>``, or, in a student
copy whose solution is still the stub, ``TODO hidden_size_of: not yet implemented``. A checker
never raises, so a notebook always runs to its end.

Most checkers return True or False. The checkers of the exercises that *build* a piece (a module,
the install loop, the training step and loop, the sampling loop) return the piece the notebook
uses from then on: the learner's own when it passed, otherwise ipa_lab's reference, and the
verdict line says which (`core.builds`)::

    ImageProjModel = checks.image_proj_model(ImageProjModel)

For teachers who grade with nbgrader, each exercise is followed by a locked test cell that calls
``checks.grade("image_proj_model")``: it raises AssertionError with the verdict the checker gave
the learner's own answer unless it was PASS (`ipa_lab.student` writes those cells and
their nbgrader metadata).

`core` holds the verdict printer and the `expect*` helpers; each `nbXX_*` module holds the
checkers of one notebook. They are all re-exported here, so a notebook only needs
``from ipa_lab import checks``.
"""
from __future__ import annotations

from .core import CheckFailed, expect, expect_close, expect_equal, expect_shape, grade, set_language
from .nb00_overview import latent_shape, encoder_hidden_states_shape
from .nb01_image_projection import image_proj_model, image_proj_parameters
from .nb02_decoupled_cross_attention import hidden_size_of, decoupled_attention, ip_attn_processor, install_ip_adapter
from .nb03_freeze_and_count import params_to_opt, prepare_training
from .nb04_training_loop import drop_decision, noisy_latents, training_step, train_loop
from .nb05_inference import compose_prompt_embeds, unconditional_image_tokens, guidance, sampling_loop
from .nb06_ip_adapter_plus import perceiver_attention, resampler_parameters
from .nb07_going_real import global_batch, adamw_state_bytes, static_training_bytes
from .nb08_ip_adapter_family import lora_linear_layer, faceid_trainable
from .nb09_which_layers_matter import only_layers, layers_for

__all__ = [
    "latent_shape", "encoder_hidden_states_shape",
    "image_proj_model", "image_proj_parameters",
    "hidden_size_of", "decoupled_attention", "ip_attn_processor", "install_ip_adapter",
    "params_to_opt", "prepare_training",
    "drop_decision", "noisy_latents", "training_step", "train_loop",
    "compose_prompt_embeds", "unconditional_image_tokens", "guidance", "sampling_loop",
    "perceiver_attention", "resampler_parameters",
    "global_batch", "adamw_state_bytes", "static_training_bytes",
    "lora_linear_layer", "faceid_trainable",
    "only_layers", "layers_for",
    "grade", "set_language", "CheckFailed", "expect", "expect_close", "expect_equal", "expect_shape",
]
