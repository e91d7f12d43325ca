"""Loading a pipeline offline: the toy folder, and clear errors for what is not on disk."""
from __future__ import annotations

import pytest

from ipa_lab.pipeline import TOY_SD, load_pipeline, resolve_model


def test_a_hub_id_that_is_not_cached_fails_at_once_saying_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("runwayml/stable-diffusion-v1-5")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and str(tmp_path / "cache") in msg and "never downloads" in msg


def test_a_cached_hub_snapshot_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snap = tmp_path / "models--someone--sd" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    assert resolve_model("someone/sd") == snap


def test_folders_that_are_not_pipelines_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_model(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks unet, vae"):
        resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no pipeline folder"):
        resolve_model(tmp_path / "nothing" / "here")


def test_the_toy_pipeline_folder_loads_offline(toy_model):
    pipe = load_pipeline(toy_model)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.image_encoder is not None and pipe.unet.config.cross_attention_dim == 64


def test_the_shipped_toy_pipeline_resolves():
    assert resolve_model(TOY_SD) == TOY_SD
