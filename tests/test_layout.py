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
    "attention",  # the processors
    "encoders",  # the frozen encoders' outputs
    "metrics",  # what a picture shows
    "adapter",  # install, find, freeze, count
    "checkpoint",  # save, read, load strictly
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
             "count_ip_adapter_parameters": "adapter", "ip_processors": "adapter", "_is_ip_processor": "adapter",
             "format_table": "tables", "classify": "metrics", "agreement": "metrics", "clip_score": "metrics",
             "generate_with_diffusers": "diffusers_path", "diffusers_ip_adapter": "diffusers_path",
             "unconditional_image_tokens": "generate", "encode_image_prompt": "generate"}
    defined: dict[str, list[str]] = {}
    for module in ORDER:  # (the exercise checkers in ipa_lab.checks are named after the exercises)
        for node in ast.parse(_source(module)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in homes:
                defined.setdefault(node.name, []).append(module)
    assert defined == {name: [home] for name, home in homes.items()}
