"""The encoder cache: the same numbers as the encoders, built once (linear time, on disk),
reused, rebuilt when a build was killed or when what it depends on changed."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ipa_lab import cache
from ipa_lab.data import IPAdapterDataset
from ipa_lab.encoders import encode_text, image_features
from ipa_lab.trainer import load_backbone


@pytest.fixture(scope="module")
def backbone(toy_model):
    return load_backbone(toy_model, "cpu")


def dataset_of(bb, toy_data):
    return IPAdapterDataset(toy_data, "train", image_processor=bb.feature_extractor, resolution=32)


def test_distinct_is_linear_and_keeps_first_appearance_order():
    values, ids = cache.distinct(["b", "a", "b", "c", "a"])
    assert values == ["b", "a", "c"] and ids.tolist() == [0, 1, 0, 2, 1]
    assert cache.first_rows(ids).tolist() == [0, 1, 3]
    many = [f"caption {i % 50_000}" for i in range(200_000)]
    t0 = time.perf_counter()
    values, ids = cache.distinct(many)  # a list.index per record (quadratic) takes minutes here
    assert time.perf_counter() - t0 < 2.0 and len(values) == 50_000 and ids[-1] == 49_999


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_the_cache_holds_what_the_encoders_give(backbone, toy_data, tmp_path, variant):
    ds = dataset_of(backbone, toy_data)
    logged = []
    c = cache.open_or_build(backbone, ds, variant, tmp_path, "cpu", log=logged.append)
    assert logged[0].startswith("encoder cache:") and "MiB on disk" in logged[0]  # the size, before building
    captions = [r["text"] for r in ds.records]
    for i in (0, 7, len(ds) - 1):
        want = encode_text(backbone.tokenizer, backbone.text_encoder, [captions[i]])[0]
        assert torch.allclose(torch.from_numpy(np.array(c.text[c.caption_ids[i]])), want, atol=1e-5)
        item = ds[i]
        feature = image_features(backbone.image_encoder, item["clip_pixel_values"][None], variant == "plus")[0]
        assert torch.allclose(torch.from_numpy(np.array(c.image[c.image_ids[i]])), feature, atol=1e-5)
        with torch.no_grad():
            post = backbone.vae.encode(item["pixel_values"][None]).latent_dist
        sf = backbone.vae.config.scaling_factor
        assert torch.allclose(torch.from_numpy(np.array(c.mean[c.image_ids[i]])), post.mean[0] * sf, atol=1e-5)
    manifest = c.manifest
    assert manifest["captions"] == len(set(captions)) and manifest["records"] == len(ds)
    on_disk = sum(p.stat().st_size for p in c.folder.glob("*.npy"))
    assert abs(on_disk - manifest["bytes"]) < 4096  # the printed size is the real one (npy headers aside)


def test_a_finished_cache_is_reused_and_a_killed_build_is_redone(backbone, toy_data, tmp_path, monkeypatch):
    ds = dataset_of(backbone, toy_data)
    first = cache.open_or_build(backbone, ds, "base", tmp_path, "cpu")
    built = []
    real_build = cache.build
    monkeypatch.setattr(cache, "build", lambda *a, **k: built.append(1) or real_build(*a, **k))
    again = cache.open_or_build(backbone, ds, "base", tmp_path, "cpu")
    assert built == [] and again.folder == first.folder
    text = np.array(first.text)
    del first, again  # drop the memory maps before the files change under them
    folder = tmp_path / cache.cache_key(backbone, ds, "base")
    (folder / "manifest.json").unlink()  # as if the build had been killed before its commit point
    (folder / "text.npy").unlink()
    (folder / "text.npy").write_bytes(b"half")
    rebuilt = cache.open_or_build(backbone, ds, "base", tmp_path, "cpu")
    assert built == [1] and np.array_equal(np.array(rebuilt.text), text)
    plus = cache.open_or_build(backbone, ds, "plus", tmp_path, "cpu")  # another key, another folder
    assert plus.folder != folder and built == [1, 1]


def test_the_cache_reads_without_unpickling(backbone, toy_data, tmp_path):
    c = cache.open_or_build(backbone, dataset_of(backbone, toy_data), "base", tmp_path, "cpu")
    np.save(c.folder / "image.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="image.npy.*unpickling, are refused"):
        cache.EncoderCache(c.folder, "cpu")


def test_two_runs_building_the_same_cache_never_mix_their_files(backbone, toy_data, tmp_path, monkeypatch):
    ds = dataset_of(backbone, toy_data)
    folder = tmp_path / cache.cache_key(backbone, ds, "base")
    abandoned = folder.with_name(f"{folder.name}.tmp-999999999")  # a build whose process was killed
    abandoned.mkdir()
    real_build = cache.build

    def another_run_finishes_first(bb, dataset, variant, into, **kwargs):
        real_build(bb, dataset, variant, folder)  # the other run renames its finished build into place
        return real_build(bb, dataset, variant, into, **kwargs)

    monkeypatch.setattr(cache, "build", another_run_finishes_first)
    c = cache.open_or_build(backbone, ds, "base", tmp_path, "cpu")
    assert c.folder == folder and (folder / "manifest.json").is_file()
    # our build and the abandoned one are gone; what is left is the cache and its build lock
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, f"{folder.name}.lock"]


# Another process that takes the build lock, then builds the cache (copies a finished one into place)
# or dies when told to on its stdin.
OTHER_BUILDER = """
import os, shutil, sys
from pathlib import Path
from ipa_lab.cache import build_lock
folder, finished = Path(sys.argv[1]), Path(sys.argv[2])
with build_lock(folder):
    print("locked", flush=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.copytree(finished, tmp)
    sys.stdin.readline()  # wait for the word
    os.rename(tmp, folder)
"""


def test_a_run_waits_for_another_process_building_the_same_cache(backbone, toy_data, tmp_path, monkeypatch):
    """Two notebooks side by side (CI runs two at a time) need the same cache: the second waits for
    the first's build instead of building it again; if the first dies unfinished, the lock is free at
    once and the second builds it, removing the dead build's folder."""
    ds = dataset_of(backbone, toy_data)
    folder = tmp_path / cache.cache_key(backbone, ds, "base")
    finished = cache.build(backbone, ds, "base", tmp_path / "elsewhere")  # what the other process will produce
    built = []
    real_build = cache.build
    monkeypatch.setattr(cache, "build", lambda *a, **k: built.append(1) or real_build(*a, **k))

    for other_finishes in (True, False):
        other = subprocess.Popen([sys.executable, "-c", OTHER_BUILDER, str(folder), str(finished)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline().strip() == "locked"
        waiting = threading.Event()

        def other_ends():
            assert waiting.wait(timeout=60)  # we are blocked on the lock: now let the other one end
            if other_finishes:
                other.stdin.write("done\n")
                other.stdin.flush()
            else:
                other.kill()
            other.wait(timeout=60)

        ender = threading.Thread(target=other_ends)
        ender.start()
        c = cache.open_or_build(backbone, ds, "base", tmp_path, "cpu",
                                log=lambda line: "another process is building" in line and waiting.set())
        ender.join(timeout=60)
        assert waiting.is_set() and not ender.is_alive()
        assert c.folder == folder and (folder / "manifest.json").is_file()
        assert built == ([] if other_finishes else [1])  # waited and used theirs; or built it once itself
        assert list(tmp_path.glob("*.tmp-*")) == []  # the dead builder's half-built folder is removed
        del c
        shutil.rmtree(folder)


def test_a_failed_build_leaves_nothing_behind(backbone, toy_data, tmp_path, monkeypatch):
    """A build that raises (an error, Ctrl-C in a notebook) removes its temporary folder, so the next
    attempt, in this process or another, starts clean."""
    ds = dataset_of(backbone, toy_data)

    def interrupted(bb, dataset, variant, into, **kwargs):
        Path(into).mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.open_or_build(backbone, ds, "base", tmp_path, "cpu")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
