"""The package's layout: one home for each concern, and data flowing one way between them.

Each module below may import only modules listed before it (the course's own modules that are
not listed, such as `data` or `pipeline`, are outside this order). A module importing one listed
after it would mean a concern living in the wrong place: the projection knowing about
checkpoints, configs knowing about the models built from them, sampling knowing about the
evaluation.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ipa_lab"

ORDER = [
    "configs",  # architectures as data (+ builders of diffusers'/transformers' classes)
    "tables",  # plain-text tables
    "projection",  # image features -> tokens
    "faceid",  # FaceID's projections (identity embedding -> tokens)
    "attention",  # the processors
    "attention_faceid",  # FaceID's processors: the same, with LoRA
    "encoders",  # the frozen encoders' outputs
    "metrics",  # what a picture shows
    "adapter",  # install, find, freeze, count
    "checkpoint",  # save, read, load strictly
    "results",  # the experiment commands' CSV files
    "family",  # every IP-Adapter variant, counted
    "recognition",  # the toy's identity embedding
    "convert",  # the original trainer's checkpoints -> the adapter file
    "generate",  # sampling with our adapter
    "diffusers_path",  # the same through diffusers' code
    "evaluate",  # the evaluation protocol and its command line
]


def _source(module: str) -> str:
    path = PACKAGE / module / "__init__.py" if (PACKAGE / module).is_dir() else PACKAGE / f"{module}.py"
    return path.read_text()


def _imported(module: str) -> set[str]:
    """The ipa_lab modules `module` imports, anywhere in its file (function-local imports too)."""
    found = set()
    for node in ast.walk(ast.parse(_source(module))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: "from .x import y", "from ..x import y", "from . import x"
                names = [node.module] if node.module else [a.name for a in node.names]
            elif (node.module or "").startswith("ipa_lab."):
                names = [node.module.split(".", 1)[1]]
            else:
                continue
            found |= {n.split(".")[0] for n in names if n}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ipa_lab.")}
    return found


@pytest.mark.parametrize("module", ORDER)
def test_imports_flow_one_way(module):
    later = set(ORDER[ORDER.index(module):])
    assert not (_imported(module) & later), f"{module} imports {sorted(_imported(module) & later)}, listed after it"


def test_each_moved_name_has_one_home():
    """The names that used to exist twice (or in the wrong module) are defined once, where they belong."""
    homes = {"read_checkpoint": "checkpoint", "image_proj_from_state_dict": "checkpoint", "load_into": "checkpoint",
             "_mismatches": "checkpoint", "num_tokens_of": "projection", "build_image_projection": "projection",
             "count_ip_adapter_parameters": "adapter", "ip_processors": "adapter", "is_ip_processor": "adapter",
             "format_table": "tables", "write_csv": "results", "read_csv": "results", "classify": "metrics", "agreement": "metrics", "clip_score": "metrics",
             "generate_with_diffusers": "diffusers_path", "diffusers_ip_adapter": "diffusers_path",
             "unconditional_image_tokens": "generate", "encode_image_prompt": "generate"}
    defined: dict[str, list[str]] = {}
    for module in ORDER:  # (the exercise checkers in ipa_lab.checks are named after the exercises)
        for node in ast.parse(_source(module)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in homes:
                defined.setdefault(node.name, []).append(module)
    assert defined == {name: [home] for name, home in homes.items()}


# The training side, in the same spirit: each may import the modules above it (and the ORDER
# above); nothing imports `pretrain` (how the toy was made is not a dependency of anything).
TRAINING = [
    "loop",  # steps, checkpoints, Ctrl-C
    "cache",  # the frozen encoders' outputs on disk
    "train",  # a run's settings and the command line (standard library until checked)
    "trainer",  # the loop of IP-Adapter training
    "bench",  # the benchmarks
    "ablation",  # the paper's ablations and the course's recipe, measured
    "blocks",  # which layers matter: per-block scales, adapters in some blocks (notebook 9)
    "train_faceid",  # FaceID trained and measured on the toy (notebook 8)
]


def _top_level_imports(module: str) -> set[str]:
    """The top-level packages `module` imports at its top level (not inside functions)."""
    names = set()
    for node in ast.parse(_source(module)).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." + (node.module or "") if node.level else (node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("module", TRAINING)
def test_training_modules_flow_one_way(module):
    later = set(TRAINING[TRAINING.index(module):]) | {"pretrain"}
    # The one exception: the command line (train.main) calls the trainer once the settings are
    # checked, with an import inside main, so that a bad flag fails before torch loads.
    imported = {n.lstrip(".") for n in _top_level_imports(module) if n.startswith(".")} if module == "train" \
        else _imported(module)
    assert not (imported & later), f"{module} imports {sorted(imported & later)}"


def test_the_training_command_line_imports_nothing_heavy_at_the_top():
    """train.py's top-level imports are the standard library: the settings are checked before torch loads."""
    assert _top_level_imports("train") <= {"__future__", "argparse", "os", "sys", "dataclasses", "pathlib"}
