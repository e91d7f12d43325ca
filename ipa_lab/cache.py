"""The encoder cache: what the frozen encoders make of the data set, computed once, on disk.

During IP-Adapter training the VAE, the text encoder and the image encoder never change, so
their outputs for a given image or caption never change either. The original recipe runs them
on every step anyway; the fast path runs them once, here, and a training step only reads rows:

    folder/
      text.npy          (captions, L, D)   text states of each distinct caption
      caption_ids.npy   (records,)         record -> row of text.npy
      latent_mean.npy   (images, C, h, w)  the VAE's latent mean (times its scaling factor)
      latent_std.npy    (images, C, h, w)  and std: a new latent is still sampled every step
      image.npy         (images, ...)      image features (`ipa_lab.encoders.image_features`)
      image_ids.npy     (records,)         record -> row of the image arrays
      empty_text.npy, uncond_image.npy     what a dropped caption / image becomes
      manifest.json     written last: shapes, sizes, and the key of what was cached

Plain `.npy` files (NumPy's standard format), read memory-mapped and without pickles, so the
cache may be far larger than memory: 10M captions of SD 1.5 text states are about 2.4 TB. It is
built in batches, streamed to disk (memory stays bounded by the batch, not by the data set), in
time linear in the number of records, and only once: it is built in a temporary folder whose
`manifest.json` is written last, then renamed into place, so a build that is killed leaves
nothing that looks finished, and a finished one is reused by `--resume`, by later runs on the
same data and by every process of a distributed run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

try:
    import fcntl  # POSIX file locks (Linux, macOS)
except ImportError:  # Windows
    fcntl = None

from .checkpoint import write_atomically
from .encoders import encode_text, image_features, unconditional_image_features

FORMAT = 1  # bump when the layout above changes: old caches are then rebuilt, never misread
ARRAYS = ("text", "caption_ids", "latent_mean", "latent_std", "image", "image_ids", "empty_text", "uncond_image")


def distinct(values) -> tuple[list, np.ndarray]:
    """The distinct values in order of first appearance, and each value's row among them.

    One pass with a dict: linear time (a `list.index` per record would be quadratic)."""
    rows: dict = {}
    ids = np.fromiter((rows.setdefault(v, len(rows)) for v in values), dtype=np.int64, count=len(values))
    return list(rows), ids


def first_rows(ids: np.ndarray) -> np.ndarray:
    """Where each distinct value first appears: ids are numbered in order of first appearance,
    so a new one is exactly an id above every id before it."""
    new = np.ones(len(ids), dtype=bool)
    new[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]
    return np.flatnonzero(new)


def cache_key(bb, dataset, variant: str) -> str:
    """What the cached numbers depend on: the data, the encoders, the variant, the resolution.

    The data enter by their records (an image changed in place, under the same name, is not
    noticed: delete the cache folder then); the encoders by their class, dtype, every
    parameter's shape and the values of a few parameters (cheap at any size)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "variant": variant, "resolution": dataset.resolution,
                         "records": len(dataset), "root": str(Path(dataset.root).resolve())}).encode())
    for r in dataset.records:
        h.update(f"{r['image_file']}\0{r['text']}\0".encode())
    for model in (bb.vae, bb.text_encoder, bb.image_encoder):
        params = list(model.parameters())
        h.update(f"{type(model).__name__} {params[0].dtype} {[tuple(p.shape) for p in params]}".encode())
        for p in (params[0], params[len(params) // 2], params[-1]):
            h.update(p.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    h.update(json.dumps(dataset.image_processor.to_dict() if dataset.image_processor else None, sort_keys=True,
                        default=str).encode())
    return h.hexdigest()[:16]


class _ImageFiles(Dataset):
    """Each distinct image once (by the first record that names it), preprocessed for the VAE
    and for the image encoder."""

    def __init__(self, dataset, records: np.ndarray):
        self.dataset, self.records = dataset, records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        item = self.dataset[int(self.records[i])]
        return {"pixel_values": item["pixel_values"], "clip_pixel_values": item["clip_pixel_values"]}


class _NpyWriter:
    """Append rows to a `.npy` file: the header first (the final shape), then the rows as they
    come. Plain file writes, not a writable memory map, so written pages do not pile up in the
    process's memory."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype):
        self.f = open(path, "wb")
        self.dtype = np.dtype(dtype)
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": tuple(shape)})
        self.expected, self.rows = shape[0], 0

    def write(self, rows: torch.Tensor | np.ndarray) -> None:
        a = rows.detach().float().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        self.f.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        self.rows += len(a)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if self.rows != self.expected:
            raise RuntimeError(f"{self.f.name}: wrote {self.rows} rows, expected {self.expected}")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map one array of the cache; never unpickle (an object array is refused)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read the encoder cache file {path} ({e}); it is damaged or not an array of "
                         f"numbers (objects, which would need unpickling, are refused): delete {path.parent} "
                         "and it is rebuilt") from None


@dataclass
class CacheSize:
    captions: int
    images: int
    records: int
    bytes: int

    def __str__(self) -> str:
        return (f"{self.records:,} records: {self.captions:,} distinct captions, {self.images:,} distinct images "
                f"-> {self.bytes / 2**20:,.1f} MiB on disk")


class EncoderCache:
    """The cache of one data set, opened memory-mapped; `cache(d, device)` gives a step's inputs.

    Attributes are the arrays of the module doc (`text`, `mean`, `std`, `image`, ...)."""

    def __init__(self, folder: str | os.PathLike, device):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        load = lambda name: _open_npy(self.folder / f"{name}.npy")  # noqa: E731
        self.text, self.caption_ids = load("text"), np.asarray(load("caption_ids"))
        self.mean, self.std, self.image = load("latent_mean"), load("latent_std"), load("image")
        self.image_ids = np.asarray(load("image_ids"))
        self.empty_text = torch.from_numpy(np.array(load("empty_text"))).to(device)
        self.uncond_image = torch.from_numpy(np.array(load("uncond_image"))).to(device)

    def __call__(self, d, device):
        """The inputs of one step: (latents, text states, image features), all on `device`.

        Rows are read on the CPU (where the memory map is) by the step's CPU indices, then moved;
        the drops are applied on `device`."""
        idx = d.indices.cpu().numpy()
        rows = lambda a, ids: torch.from_numpy(np.ascontiguousarray(a[ids])).to(device)  # noqa: E731
        img = self.image_ids[idx]
        latents = rows(self.mean, img) + rows(self.std, img) * d.latent_eps.to(device)
        text = rows(self.text, self.caption_ids[idx])
        text = torch.where(d.drop_text.to(device)[:, None, None], self.empty_text, text)
        image = rows(self.image, img)
        mask = d.drop_image.to(device).view(-1, *([1] * (image.ndim - 1)))
        image = torch.where(mask, self.uncond_image.expand_as(image), image)
        return latents, text, image


def cache_size(bb, dataset, variant: str, captions: list, files: list) -> tuple[CacheSize, dict]:
    """Probe the encoders once on the first item: the cache's shapes and size, before building."""
    probe = dataset[0]
    with torch.no_grad():
        latent = bb.vae.encode(probe["pixel_values"][None].to(bb.vae.device, bb.vae.dtype)).latent_dist.mean
        feature = image_features(bb.image_encoder, probe["clip_pixel_values"][None], variant == "plus")
        text = encode_text(bb.tokenizer, bb.text_encoder, [""])
    shapes = {"text": (len(captions), *text.shape[1:]), "latent_mean": (len(files), *latent.shape[1:]),
              "latent_std": (len(files), *latent.shape[1:]), "image": (len(files), *feature.shape[1:]),
              "caption_ids": (len(dataset),), "image_ids": (len(dataset),),
              "empty_text": (1, *text.shape[1:]), "uncond_image": (1, *feature.shape[1:])}
    itemsize = {"caption_ids": 8, "image_ids": 8}
    total = sum(int(np.prod(s)) * itemsize.get(k, 4) for k, s in shapes.items())
    return CacheSize(len(captions), len(files), len(dataset), total), shapes


def build(bb, dataset, variant: str, folder: str | os.PathLike, batch_size: int = 64, text_batch_size: int = 1024,
          num_workers: int = 0, log=None) -> Path:
    """Run the frozen encoders over the data set once and write the cache into `folder`.

    `batch_size` images go through the VAE and the image encoder at a time. Each image's numbers do
    not depend on it (bitwise, tested), only the speed does: on the CPU the toy VAE encodes 64 at a
    time about a third faster than 256, whose activations no longer fit the CPU's cache.
    `log`: a print-like function for the size (before) and a progress bar (while building);
    None builds silently. Returns `folder`."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # a build that was killed: start again (no manifest, nothing reused)
    folder.mkdir(parents=True)
    captions, caption_ids = distinct([r["text"] for r in dataset.records])
    files, image_ids = distinct([r["image_file"] for r in dataset.records])
    size, shapes = cache_size(bb, dataset, variant, captions, files)
    if log:
        log(f"encoder cache: {size}")
    _save_npy(folder / "caption_ids.npy", caption_ids)
    _save_npy(folder / "image_ids.npy", image_ids)
    quiet_bar = {"disable": True} if log is None else {}  # else tqdm decides (TQDM_DISABLE=1 hides it)
    bar = tqdm(total=len(captions) + len(files), desc="encoder cache", unit="item", **quiet_bar)
    with torch.no_grad():
        text = _NpyWriter(folder / "text.npy", shapes["text"], np.float32)
        for s in range(0, len(captions), text_batch_size):
            chunk = captions[s : s + text_batch_size]
            text.write(encode_text(bb.tokenizer, bb.text_encoder, chunk))
            bar.update(len(chunk))
        text.close()
        _save_npy(folder / "empty_text.npy", encode_text(bb.tokenizer, bb.text_encoder, [""]).float().cpu().numpy())
        writers = {k: _NpyWriter(folder / f"{k}.npy", shapes[k], np.float32) for k in ("latent_mean", "latent_std", "image")}
        sf = bb.vae.config.scaling_factor
        loader = DataLoader(_ImageFiles(dataset, first_rows(image_ids)), batch_size=batch_size, num_workers=num_workers)
        for batch in loader:
            post = bb.vae.encode(batch["pixel_values"].to(bb.vae.device, bb.vae.dtype)).latent_dist
            writers["latent_mean"].write(post.mean.float() * sf)
            writers["latent_std"].write(post.std.float() * sf)
            writers["image"].write(image_features(bb.image_encoder, batch["clip_pixel_values"], variant == "plus"))
            bar.update(len(batch["pixel_values"]))
        for w in writers.values():
            w.close()
        uncond = unconditional_image_features(bb.image_encoder, variant == "plus")
        _save_npy(folder / "uncond_image.npy", uncond.float().cpu().numpy())
    bar.close()
    manifest = {"format": FORMAT, "variant": variant, "captions": size.captions, "images": size.images,
                "records": size.records, "bytes": size.bytes, "shapes": {k: list(v) for k, v in shapes.items()}}
    write_atomically(folder / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return folder


def _remove_abandoned_builds(folder: Path) -> None:
    """Delete the temporary folders of builds that are not running (killed, or raised). Called with
    `build_lock` held, so a running build, which would hold that lock, cannot be among them. Without
    file locks (Windows) nothing tells a running build from a dead one, so nothing is deleted there."""
    if fcntl is None:
        return
    for tmp in folder.parent.glob(f"{folder.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def build_lock(folder: Path, log=None):
    """Hold the lock of this cache's build: one process on this machine builds it at a time.

    Two notebooks side by side (CI runs two at a time) or two training runs may need the same cache
    at once; the second waits here while the first builds, then finds it ready, instead of doing the
    same work a second time. The operating system releases the lock when its holder ends, even when
    it is killed, so a dead builder never keeps anyone waiting. Where there is no `fcntl` (Windows),
    nothing is locked: two processes may then both build, and the rename keeps that safe."""
    if fcntl is None:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f"{folder.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"encoder cache: another process is building {folder}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_into_place(bb, dataset, variant: str, folder: Path, num_workers: int, log) -> None:
    """Build into a temporary folder of this process, then rename it into place (the commit)."""
    _remove_abandoned_builds(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        build(bb, dataset, variant, tmp, num_workers=num_workers, log=log)
    except BaseException:  # an error, or Ctrl-C in a notebook: leave nothing half-built behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists() and not (folder / "manifest.json").is_file():
        shutil.rmtree(folder)  # an unfinished folder of an older layout: never trusted
    try:
        os.rename(tmp, folder)
    except OSError:  # another run finished the same cache first: use theirs
        shutil.rmtree(tmp)


def open_or_build(bb, dataset, variant: str, root: str | os.PathLike, device, accelerator=None, log=None,
                  num_workers: int = 0) -> EncoderCache:
    """The cache for this data set and these encoders under `root`, built if it is not there yet.

    Each (data, encoders, variant, resolution) has its own subfolder named by `cache_key`, so
    base and Plus runs can share a root. A build goes into a temporary folder that is renamed
    into place when complete, so two runs that share a root never build into each other's files,
    and a run that finds another process building the same cache waits for it (`build_lock`)
    instead of building it a second time. Under a distributed launch the main process builds while
    the others wait for the manifest (polling: a long build would outlast a collective barrier's
    timeout), then all open it."""
    folder = Path(root) / cache_key(bb, dataset, variant)
    ready = lambda: (folder / "manifest.json").is_file()  # noqa: E731
    if accelerator is None or accelerator.is_main_process:
        if not ready():
            with build_lock(folder, log):
                if not ready():  # still not there once the lock is ours: nobody else built it
                    _build_into_place(bb, dataset, variant, folder, num_workers, log)
        elif log:
            log(f"encoder cache: reusing {folder}")
    else:
        while not ready():
            time.sleep(1.0)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return EncoderCache(folder, device)
