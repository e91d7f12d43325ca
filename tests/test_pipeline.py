"""Loading a pipeline offline: the toy folder, cached hub ids, and clear errors for what is not on disk."""
from __future__ import annotations

import pytest

from ipa_lab.pipeline import REQUIRED, TOY_SD, load_pipeline, resolve_model


def _fake_pipeline(folder):
    """A folder that passes for a diffusers pipeline: model_index.json and the parts the course loads."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    for part in REQUIRED:
        (folder / part).mkdir()
    return folder


def _fake_hub_cache(cache, repo_id: str, snapshots: list[str], main: str | None):
    """A hub cache laid out as huggingface_hub lays it out: models--org--name/{refs/main, snapshots/<hash>}."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for commit in snapshots:
        _fake_pipeline(storage / "snapshots" / commit)
    if main is not None:
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(main)
    return storage


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, found through HF_HUB_CACHE; the working folder is tmp_path too."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on the course machines: nothing may be fetched
    monkeypatch.chdir(tmp_path)
    return cache


def test_a_hub_id_that_is_not_cached_fails_at_once_saying_where_it_looked(hub_cache):
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("runwayml/stable-diffusion-v1-5")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and str(hub_cache) in msg and "never downloads" in msg
    assert not any(hub_cache.iterdir())  # looking left nothing behind in the cache


def test_a_cached_hub_id_resolves_to_the_snapshot_refs_main_names_not_the_last_sorted(hub_cache):
    older, newer = "0" * 40, "f" * 40  # refs/main names the one that sorts first
    storage = _fake_hub_cache(hub_cache, "someone/sd", [older, newer], main=older)
    assert resolve_model("someone/sd") == storage / "snapshots" / older


def test_snapshots_without_refs_main_are_named_but_not_guessed(hub_cache):
    _fake_hub_cache(hub_cache, "someone/sd", ["a" * 40], main=None)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*snapshots a{40} but no refs/main"):
        resolve_model("someone/sd")


def test_refs_main_naming_a_missing_snapshot_says_so(hub_cache):
    _fake_hub_cache(hub_cache, "someone/sd", ["a" * 40], main="b" * 40)
    with pytest.raises(FileNotFoundError, match="names snapshot b{40}, which is not in"):
        resolve_model("someone/sd")


def test_a_cached_snapshot_that_is_not_a_whole_pipeline_is_refused(hub_cache):
    storage = _fake_hub_cache(hub_cache, "someone/sd", ["a" * 40], main="a" * 40)
    (storage / "snapshots" / ("a" * 40) / "vae").rmdir()
    with pytest.raises(FileNotFoundError, match="lacks vae"):
        resolve_model("someone/sd")


def test_a_near_miss_of_a_cached_hub_id_is_suggested(hub_cache):
    _fake_hub_cache(hub_cache, "someone/stable-diffusion-v1-5", ["a" * 40], main="a" * 40)
    with pytest.raises(FileNotFoundError, match="Did you mean 'someone/stable-diffusion-v1-5'"):
        resolve_model("someone/stable-diffusion-v1.5")


def test_the_cache_is_found_where_huggingface_hub_looks(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    storage = _fake_hub_cache(tmp_path / "xdg" / "huggingface" / "hub", "someone/sd", ["a" * 40], main="a" * 40)
    assert resolve_model("someone/sd") == storage / "snapshots" / ("a" * 40)


def test_a_mistyped_folder_is_not_mistaken_for_a_hub_id(hub_cache, tmp_path):
    _fake_pipeline(tmp_path / "data" / "toy-sd")
    for typo in ("data/toy_sd", str(tmp_path / "data" / "toy_sd"), "./data/toy_sd"):
        with pytest.raises(FileNotFoundError) as e:
            resolve_model(typo)
        msg = str(e.value)
        assert msg.startswith("no such folder: ") and "did you mean" in msg and "toy-sd?" in msg, msg
        assert "Hugging Face" not in msg, msg
    with pytest.raises(FileNotFoundError, match=r"no such folder: .*dta/toy-sd \(.*dta does not exist\); did you mean .*data\?"):
        resolve_model(str(tmp_path / "dta" / "toy-sd"))
    with pytest.raises(FileNotFoundError, match="no such folder: toy-sd; expected a diffusers pipeline folder"):
        resolve_model("toy-sd")  # a bare name is a folder here, never a hub id


def test_a_home_relative_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = _fake_pipeline(tmp_path / "sd15")
    assert resolve_model("~/sd15") == folder


def test_folders_that_are_not_pipelines_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_model(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks unet, vae"):
        resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model(tmp_path / "model_index.json")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model(tmp_path / "nothing" / "here")


def test_the_toy_pipeline_folder_loads_offline(toy_model):
    pipe = load_pipeline(toy_model)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.image_encoder is not None and pipe.unet.config.cross_attention_dim == 64


def test_the_shipped_toy_pipeline_resolves():
    assert resolve_model(TOY_SD) == TOY_SD


def test_resolving_needs_no_heavy_import():
    # `python -m ipa_lab.train` checks --model before importing torch; pipeline.py must allow it.
    import ast
    import inspect

    import ipa_lab.pipeline

    tree = ast.parse(inspect.getsource(ipa_lab.pipeline))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    modules |= {"." * n.level + (n.module or "") for n in top if isinstance(n, ast.ImportFrom)}
    assert modules <= {"__future__", "difflib", "os", "pathlib", "typing"}, modules  # ipa_lab's own modules import torch
