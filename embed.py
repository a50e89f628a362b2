"""Use a trained model: embed a folder of images, or find the nearest gallery images of query images.

usage: python embed.py RUN_DIR_OR_CHECKPOINT IMAGE_DIR --out FILE.npz
       python embed.py RUN_DIR_OR_CHECKPOINT GALLERY_DIR --query IMAGE_OR_DIR [--k 5] [--out FILE.json]
Images are listed as the folder dataset lists them (data.read_image_folder: class folders give labels),
read through the run's eval transform, embedded by its network in eval mode and normalised with its n(x)
(PAPER.md §3): the space its retrieval is measured in (§6). A run of several fold models gives their
ensemble as train.py tests it (§7). `python embed.py --help` gives every rule.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import torch

import build
import data
import evaluate
import model
from bookkeeping import load_checkpoint, make_deterministic, save_json, save_npz

DESCRIPTION = "Embed the images under IMAGE_DIR with a trained model, or find each query's nearest gallery images."
RULES = """\
what is embedded:
  IMAGE_DIR (or GALLERY_DIR, or a --query folder) is either a folder of class folders, DIR/<class>/<image>,
  whose folder names become the labels (0.. in sorted name order) and class names, or a folder that holds
  images itself: then every image under it is embedded, without labels. Subfolders are searched
  recursively; an image is a file whose extension PIL reads (any case); hidden files, macOS ._* files and
  __MACOSX folders are skipped; the order is that of the relative paths (as docs/DATASETS.md says).
  Each image goes through the run's eval transform (data.transform, crop_size, resize of its config; for
  a digits run: an 8x8 grey image, read as the digits' 17 grey levels) and the network in eval mode, then
  the run's normalisation n(x): the embeddings train.py's retrieval metrics are computed on.

which model:
  a checkpoint file (best.pt, last.pt of train.py): that model. A run directory: its best.pt; for a run of
  several fold models (fold*/best.pt) their ensemble as train.py computes it for the test: with
  evaluation.ensemble authors, n(concat(n(f_1), ..., n(f_k))), with mlrc, concat(l2(n(f_1)), ...). With
  repeats (seed*/fold*/best.pt, seed*/best.pt) EVERY model found is in the ensemble, in order of seed, then
  fold. A run directory that lacks a model its config names is refused, and so is a part of one (a seed's
  folder of a run with repeats).

output:
  --out FILE.npz: embeddings (N, d) float32, paths (relative to IMAGE_DIR), and labels and class_names
  when IMAGE_DIR holds class folders.
  --query: for each query image the k nearest gallery images by Euclidean distance between the
  embeddings (exact search with faiss, as evaluate.py; the k distances printed are recomputed in
  float64, ties ordered by gallery path), with their class where the gallery has classes; --out FILE.json
  writes the same. A query image that is also in the gallery is NOT excluded: it finds itself (distance 0).
  --out must name a new file: embed.py overwrites nothing.

examples:
  python embed.py runs/folder_ms photos/ --out photos.npz
  python embed.py runs/folder_ms/fold0/best.pt gallery/ --query query.jpg --k 10 --out neighbours.json
"""


class InputError(ValueError):
    """Bad input: one line naming the path or flag and what was expected."""


class Images(NamedTuple):
    """The images to embed: `folder` and data.FolderListing (paths relative to folder, labels or None)."""
    folder: Path
    listing: data.FolderListing


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 1, as every other bad input
        print(f"error: {message} (see python embed.py --help)", file=sys.stderr)
        raise SystemExit(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="embed.py", description=DESCRIPTION, epilog=RULES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("source", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory of train.py or a checkpoint file")
    add("images", metavar="IMAGE_DIR", help="the images to embed (with --query: the gallery)")
    add("--out", metavar="FILE", help="FILE.npz of the embeddings (needed without --query); with --query, "
                                      "FILE.json of the neighbours")
    add("--query", metavar="IMAGE_OR_DIR", help="an image file or a folder of images: print each one's nearest "
                                                "gallery images")
    add("--k", type=int, default=5, help="neighbours per query (default 5; at most the gallery's size)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto (default): CUDA when available")
    add("--batch-size", type=int, metavar="N", help="images per batch (default: the run's data.eval_batch_size)")
    add("--workers", type=int, metavar="N", help="DataLoader workers (default: the run's data.num_workers; auto: "
                                                 "build.loader_workers)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- checks (before any work)

def find_checkpoints(source: Path) -> list[Path]:
    """The checkpoint file itself; or a run directory's best.pt; or every fold*/best.pt, seed*/best.pt and
    seed*/fold*/best.pt in it, in order of the numbers in their folder names (seed, then fold)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise InputError(f"{source}: no such run directory or checkpoint file")
    if (source / "best.pt").is_file():
        return [source / "best.pt"]
    patterns = ("fold*/best.pt", "seed*/best.pt", "seed*/fold*/best.pt")
    found = [path for pattern in patterns for path in source.glob(pattern)]
    if not found:
        raise InputError(f"{source}: holds no best.pt, fold*/best.pt or seed*/fold*/best.pt (a run directory of "
                         f"train.py, whose models have been validated at least once)")
    numbers = [[int(n) for n in re.findall(r"\d+", path.parent.relative_to(source).as_posix())] for path in found]
    return [path for _, path in sorted(zip(numbers, found))]  # seed2 before seed10


def load_states(source: Path, paths: list[Path]) -> list[dict]:
    """The checkpoints, loaded (one-line errors); a run directory must hold every model its config names."""
    states = []
    for path in paths:
        try:
            states.append(load_checkpoint(path))
        except ValueError as err:  # ConfigError: damaged, foreign or unsafe file
            raise InputError(str(err).removeprefix("resume: ")) from None
    if source.is_dir() and paths != [source / "best.pt"]:
        found = {path.parent.relative_to(source) for path in paths}
        expected = [d for _, _, d in build.model_folders(states[0]["config"])]
        if not found & set(expected):  # e.g. one seed's folder of a run with repeats
            raise InputError(f"{source}: not a whole run's folder: its config trains {expected[0] / 'best.pt'} "
                             f"... ({len(expected)} models); give the run directory or one checkpoint file")
        missing = [d for d in expected if d not in found]
        if missing:
            raise InputError(f"{source}: {missing[0] / 'best.pt'} is missing ({len(missing)} of the run's "
                             f"{len(expected)} models lack a best.pt); has the run finished?")
    settings = {(s["config"]["normalization"], str(s["config"]["data"])) for s in states}
    if len(settings) > 1:
        raise InputError(f"{source}: its checkpoints were trained with different data or normalisation settings")
    return states


def list_images(path: Path, what: str) -> Images:
    """IMAGE_DIR, GALLERY_DIR or a query folder; a query may also be one image file."""
    if path.is_file() and what == "--query":
        if path.suffix.lower() not in data.image_extensions():
            raise InputError(f"--query {path}: not an image file PIL reads (extension {path.suffix or 'none'})")
        return Images(path.parent, data.FolderListing([path.name], None, None))
    if not path.is_dir():
        raise InputError(f"{what} {path}: no such folder")
    try:
        return Images(path, data.read_image_folder(path))
    except ValueError as err:
        raise InputError(f"{what}: {err}") from None


# ----------------------------------------------------------------------------- the work

class Stacked(torch.nn.Module):
    """Every model on the same batch: raw f_i(x), (B, models, d); the images are read once for all."""

    def __init__(self, networks: list[torch.nn.Module]):
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([network(x) for network in self.networks], dim=1)


def saved_network(state: dict, path: Path, device: torch.device) -> model.EmbeddingModel:
    """The checkpoint's network as train.evaluate_saved builds it (build.saved_network: the layout it trained in)."""
    try:
        return build.saved_network(state, device)
    except RuntimeError as err:
        raise InputError(f"{path}: its weights do not fit the network its config describes: "
                         f"{str(err).splitlines()[0]}") from None


def dataset_of(images: Images, cfg: dict) -> data.RetrievalDataset:
    """The images as the run's eval split reads them: its eval transform (a digits run: 8x8 grey tensors)."""
    dc, listing = cfg["data"], images.listing
    paths = [str(images.folder / path) for path in listing.paths]
    pixels = torch.stack([data.load_digits_image(p) for p in paths]) if dc["transform"] == "digits" else None
    labels = listing.labels if listing.labels is not None else [0] * len(paths)
    return data.RetrievalDataset(paths, labels, len(listing.class_names or [None]), build.transform(cfg, train=False),
                                 images=pixels, class_names=listing.class_names)


def embed_images(stacked: Stacked, cfg: dict, images: Images, device: torch.device, batch_size: int,
                 workers: int) -> np.ndarray:
    """n(f(x)) of every image; for several models their ensemble (evaluation.ensemble of the run)."""
    loader = torch.utils.data.DataLoader(dataset_of(images, cfg), batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    raw = evaluate.embed(stacked, loader, device)[0]  # (N, models, d)
    parts = [build.normalizer(cfg)(raw[:, i].contiguous()) for i in range(raw.shape[1])]  # train.embed_normalized
    return parts[0].numpy() if len(parts) == 1 else evaluate.ensemble(parts, build.ensemble_normalizer(cfg)).numpy()


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, Euclidean distances), (Q, k), of each query's k nearest gallery rows: exact search with faiss
    (as evaluate.py), the k distances recomputed in float64, ties ordered by gallery index."""
    index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]
    distances = np.linalg.norm(queries.astype(np.float64)[:, None, :] - gallery.astype(np.float64)[found], axis=2)
    order = np.lexsort((found, distances), axis=-1)
    return np.take_along_axis(found, order, axis=1), np.take_along_axis(distances, order, axis=1)


def neighbour_report(query: Images, gallery: Images, indices: np.ndarray, distances: np.ndarray) -> list[dict]:
    def named(listing: data.FolderListing, i: int) -> dict:
        return {} if listing.labels is None else {"class": listing.class_names[listing.labels[i]]}

    g = gallery.listing
    return [{"query": path, **named(query.listing, q),
             "neighbours": [{"path": g.paths[i], "distance": float(d), **named(g, i)}
                            for i, d in zip(indices[q], distances[q])]}
            for q, path in enumerate(query.listing.paths)]


def run(args: argparse.Namespace) -> None:
    source = Path(args.source).expanduser()
    paths = find_checkpoints(source)
    images = list_images(Path(args.images).expanduser(), "GALLERY_DIR" if args.query else "IMAGE_DIR")
    query = None if args.query is None else list_images(Path(args.query).expanduser(), "--query")
    if query is None and args.out is None:
        raise InputError("--out FILE.npz is needed: where the embeddings are written (or give --query)")
    out = None if args.out is None else Path(args.out).expanduser()
    if out is not None and not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    if out is not None and out.exists():  # never over a checkpoint, an image or an earlier output
        raise InputError(f"--out {out}: exists; name a new file (embed.py overwrites nothing)")
    for flag, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value is not None and value < (0 if flag == "--workers" else 1):
            raise InputError(f"{flag}: expected an integer >= {0 if flag == '--workers' else 1}, got {value}")
    try:
        device = build.resolve_device(args.device)
    except ValueError:
        raise InputError(f"--device {args.device}: CUDA is not available here") from None
    states = load_states(source, paths)
    dc = states[0]["config"]["data"]
    batch_size = args.batch_size or dc["eval_batch_size"]
    workers = build.loader_workers(states[0]["config"]) if args.workers is None else args.workers
    what = paths[0] if len(paths) == 1 else f"the ensemble of the {len(paths)} models in {source}"

    make_deterministic(0)  # the kernels the run's own evaluation used
    cfg = states[0]["config"]
    stacked = Stacked([saved_network(state, path, device) for state, path in zip(states, paths)]).to(device)
    embeddings = embed_images(stacked, cfg, images, device, batch_size, workers)
    if query is None:
        arrays = {"embeddings": embeddings.astype(np.float32), "paths": np.array(images.listing.paths, dtype=str)}
        if images.listing.labels is not None:
            arrays["labels"] = np.array(images.listing.labels, dtype=np.int64)
            arrays["class_names"] = np.array(images.listing.class_names, dtype=str)
        save_npz(out, arrays)
        print(f"{len(embeddings)} images of {images.folder} embedded by {what}: {out} holds embeddings "
              f"{embeddings.shape}" + (", labels and class_names" if "labels" in arrays else ""))
        return
    queries = embed_images(stacked, cfg, query, device, batch_size, workers)
    indices, distances = nearest(queries, embeddings, min(args.k, len(embeddings)))
    report = neighbour_report(query, images, indices, distances)
    for entry in report:
        print(f"query {entry['query']}" + (f" (class {entry['class']})" if "class" in entry else ""))
        for rank, hit in enumerate(entry["neighbours"], 1):
            print(f"  {rank:>3}. {hit['path']}  distance {hit['distance']:.4f}"
                  + (f"  class {hit['class']}" if "class" in hit else ""))
    if out is not None:
        save_json({"model": str(what), "gallery": str(images.folder), "k": int(indices.shape[1]), "queries": report},
                  out)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        run(args)
    except SystemExit as exit:  # --help (0) or an argument error (1, already printed)
        return int(exit.code or 0)
    except (ValueError, OSError) as err:  # InputError, a damaged image, a full disk: one line
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
