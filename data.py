"""Everything between files on disk and batches of tensors (PAPER.md §7, docs/DATASETS.md): readers of
the four retrieval benchmarks as their archives unpack (CUB-200-2011, Cars196 in its three layouts,
Stanford Online Products, In-Shop), of `digits` (scikit-learn's bundled 8×8 digits, the demo's set) and
of `folder` (your own images, DIR/<class>/<image>); the class-disjoint splits and the MLRC folds of the
training classes; the m-per-class batch sampler (m = 1: one image per class, for the baselines of §4);
the train/eval transforms for BN-Inception and ResNet-50; and `python data.py download|check NAME`.

Splits are by class; labels are 0-based and contiguous within a split (In-Shop's query and gallery
share one mapping). A dataset key is an index or an (index, seed) pair: with a seed the random
transform draws from a CPU generator seeded with it, so an augmentation, like the sampler's batches,
is a pure function of its seed: the same in every DataLoader worker, process and resumed run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import hashlib
import operator
import os
import shutil
import sys
import tarfile
import unicodedata
import urllib.error
import urllib.request
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import scipy.io
import torch
from PIL import Image
from torchvision.transforms import v2

# ----------------------------------------------------------------------------- facts (docs/DATASETS.md)

SPLITS = {
    "cub": ("train", "test"),
    "cars": ("train", "test"),
    "sop": ("train", "test"),
    "inshop": ("train", "query", "gallery"),
    "digits": ("train", "test"),
    "folder": ("train", "test"),  # your own images: no expected counts
}

# (images, classes) per split; a mismatch is warned about, not fatal (usually a truncated download).
EXPECTED_COUNTS = {
    "cub": {"train": (5864, 100), "test": (5924, 100)},
    "cars": {"train": (8054, 98), "test": (8131, 98)},
    "sop": {"train": (59551, 11318), "test": (60502, 11316)},
    "inshop": {"train": (25882, 3997), "query": (14218, 3985), "gallery": (12612, 3985)},
    "digits": {"train": (1083, 6), "test": (714, 4)},
}


def _fetch_hint(name: str, root: Path) -> str:
    if name in ARCHIVES:
        return f"fetch it with `python data.py download {name} --root {root}`, or {_by_hand(name, root)}"
    return f"`python data.py download {name} --root {root}` prints how to get it"


def _by_hand(name: str, root: Path) -> str:
    """The offline route: the archive put in place by hand, then verified and extracted by `download`."""
    _, filename, md5 = ARCHIVES[name]
    return (f"put {filename} ({ARCHIVE_SIZES[name]}, MD5 {md5}) into {root} by hand and run "
            f"`python data.py download {name} --root {root}`: it checks the MD5 and extracts it")


# ----------------------------------------------------------------------------- images


class _OneLineFromWorkers:
    """An error naming an image file whose message stays one line when a DataLoader worker raised it.

    torch re-raises a worker's exception as its class called with "Caught X in DataLoader worker
    process N.\\nOriginal Traceback ..." and the worker's whole traceback; this constructor keeps only
    the original message (the traceback's last `X: message` line), so `error: {err}` is one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            prefix = f"{type(self).__name__}: "
            raised = [line for line in message.splitlines() if prefix in line]
            message = raised[-1].split(prefix, 1)[1] if raised else message
        super().__init__(message)


class UnreadableImage(_OneLineFromWorkers, ValueError):
    """An image file that does not decode, or whose pixels have no faithful 8-bit RGB reading."""


class MissingImage(_OneLineFromWorkers, FileNotFoundError):
    """An image file that does not exist."""


# PIL modes read by PIL's own conversion to RGB: exact, or PIL's formula for CMYK and YCbCr (no colour
# profiles); alpha is dropped, not composited. 16-bit grey is read below; every other mode is refused.
_RGB_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# formats whose 32-bit "I" pixels hold 16-bit grey, 0-65535: PNG (Pillow < 10.3), PGM with maxval > 255
_SIXTEEN_BIT_I_FORMATS = frozenset({"PNG", "PPM"})
_REFUSED_MODES = {"I": "32-bit integers of unknown range", "F": "floats of unknown range"}


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into 8-bit RGB by the rules of docs/DATASETS.md ("Pixels").

    Grey, palette, CMYK, YCbCr and 1-bit convert as PIL converts them; alpha is dropped. 16-bit grey
    (PIL's I;16 modes, and I from PNG or PGM) keeps its high byte, value >> 8, as PIL reads 16-bit RGB.
    Other modes (32-bit I or F, LAB, premultiplied alpha) would be clipped or guessed: refused. Errors
    name the path in one line, also from inside a DataLoader worker: MissingImage (a FileNotFoundError)
    or UnreadableImage (a ValueError).
    """
    try:
        with Image.open(path) as image:
            image.load()
            # palette transparency must go through RGBA, or PIL warns and may lose colours
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format in _SIXTEEN_BIT_I_FORMATS):
                image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
            if image.mode not in _RGB_MODES:
                what = _REFUSED_MODES.get(image.mode, "no exact conversion to RGB")
                raise UnreadableImage(f"cannot read image {path}: PIL mode {image.mode} ({what}) is refused rather "
                                      f"than clipped or guessed; save it as 8-bit RGB or grey")
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise MissingImage(f"image file not found: {path}") from err
    except UnreadableImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        message = " ".join(str(err).splitlines())  # one line, whatever the decoder said
        raise UnreadableImage(f"cannot decode image {path}: {message}") from err


# ----------------------------------------------------------------------------- datasets


class RetrievalDataset(torch.utils.data.Dataset):
    """One split: `labels` (0-based ints), `paths`, `num_classes`, items (image, label).

    An item is a PIL RGB image when transform is None, else transform(image). In-memory sets keep
    their images in `images` (digits: (N, 1, 8, 8) floats and synthetic paths; `decoded`: uint8 crops).
    `class_names[label]` names a class where the data has names (folder) or is a class_subset, else it
    is None.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], num_classes: int,
                 transform: Callable | None = None, images: torch.Tensor | None = None,
                 name: str = "", class_names: Sequence[str] | None = None) -> None:
        if len(paths) != len(labels) or (images is not None and len(images) != len(labels)):
            raise ValueError(f"RetrievalDataset {name}: {len(labels)} labels but {len(paths)} paths or images")
        self.paths = list(paths)
        self.labels = [int(label) for label in labels]
        self.num_classes = int(num_classes)
        self.transform = transform
        self.images = images
        self.name = name
        self.class_names = None if class_names is None else list(class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"RetrievalDataset({self.name}: {len(self)} items, {self.num_classes} classes)"

    def with_transform(self, transform: Callable | None) -> RetrievalDataset:
        """The same items with another transform (a shallow copy: the lists are shared)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[object, int]:
        """key = index, or (index, seed): then the transform draws from a CPU generator seeded
        with `seed`, so the augmentation is a pure function of the seed."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = operator.index(index)
        item = self.images[index] if self.images is not None else load_image(self.paths[index])
        if self.transform is not None:
            if seed is None:
                item = self.transform(item)
            else:
                # only the CPU generator: torch.manual_seed would also reseed (and leak into) CUDA's
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(int(seed))
                    item = self.transform(item)
        return item, self.labels[index]


def _contiguous(class_ids: Sequence[int], order: Sequence[int] | None = None) -> tuple[list[int], int]:
    """Map raw class ids to 0..C-1 by their place in `order` (distinct ids; default: class_ids sorted)."""
    ranks = {cid: rank for rank, cid in enumerate(sorted(set(class_ids)) if order is None else order)}
    return [ranks[cid] for cid in class_ids], len(ranks)


def _need_file(path: Path, name: str, root: Path, note: str = "") -> Path:
    """`path`, which must be a file: else one line naming it and how to get the dataset."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: expected {path}{note}; {_fetch_hint(name, root)}")
    return path


def _bad_line(path: Path, number: int, problem: str) -> ValueError:
    return ValueError(f"{path}:{number}: {problem}")


def _locate(root: Path, name: str, markers: Sequence[str], inner: Sequence[str] = ()) -> tuple[Path, str]:
    """The first folder holding one of `markers` (root itself, a known inner folder, or root's parent),
    and the marker found there."""
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: root folder {root} does not exist; {_fetch_hint(name, root)}")
    candidates = [root, *(root / sub for sub in inner), root.parent]
    for base in candidates:
        for marker in markers:
            if (base / marker).is_file():
                return base, marker
    expected = " or ".join(str(base / marker) for base in candidates[:-1] for marker in markers)
    raise FileNotFoundError(f"{name}: expected {expected}; {_fetch_hint(name, root)}")


def _text_rows(path: Path, n_fields: int, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of each non-empty line after `skip` lines."""
    with open(path, encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                fields = line.split()
                if number <= skip or not fields:
                    continue
                if len(fields) != n_fields:
                    raise _bad_line(path, number, f"expected {n_fields} fields, got {line.strip()!r}")
                yield number, fields
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: expected UTF-8 text, got byte {err.object[err.start]:#04x} ({err.reason}); "
                             f"is the file damaged? extract it again") from None


def _int_field(path: Path, number: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad_line(path, number, f"expected an integer, got {text!r}") from None


def _read_cub(root: Path, split: str) -> tuple[list[str], list[int]]:
    # classes 1-100 train, 101-200 test; train_test_split.txt is the classification split: ignored
    base, _ = _locate(root, "cub", ("images.txt",), inner=("CUB_200_2011",))
    labels_file = _need_file(base / "image_class_labels.txt", "cub", root)
    relative = {fields[0]: fields[1] for _, fields in _text_rows(base / "images.txt", 2)}
    items = []
    for number, (image_id, class_id) in _text_rows(labels_file, 2):
        if image_id not in relative:
            raise _bad_line(labels_file, number, f"image id {image_id} is not in {base / 'images.txt'}")
        items.append((str(base / "images" / relative[image_id]), _int_field(labels_file, number, class_id)))
    return _split_by_class(items, last_train_class=100, split=split)


def _split_by_class(items: list[tuple[str, int]], last_train_class: int, split: str) -> tuple[list[str], list[int]]:
    keep = [(path, cid) for path, cid in items if (cid <= last_train_class) == (split == "train")]
    return [path for path, _ in keep], [cid for _, cid in keep]


def _mat_records(path: Path, variable: str, fields: Sequence[str]) -> list[dict]:
    """The struct array `variable` of a .mat file as a list of {field: python value}."""
    try:
        records = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)[variable]
    except KeyError:
        raise ValueError(f"{path}: expected a variable {variable!r}") from None
    except (OSError, ValueError, scipy.io.matlab.MatReadError) as err:  # truncated or not a .mat file at all
        raise ValueError(f"{path}: not a readable MATLAB file ({err}); is the download complete?") from None
    records = records.ravel() if isinstance(records, np.ndarray) else [records]
    out = []
    for position, record in enumerate(records):
        missing = [f for f in fields if f not in getattr(record, "_fieldnames", ())]
        if missing:
            raise ValueError(f"{path}: {variable}[{position}] lacks fields {missing}")
        out.append({f: getattr(record, f) for f in fields})
    return out


def _read_cars(root: Path, split: str) -> tuple[list[str], list[int]]:
    # three layouts (docs/DATASETS.md), all merged and split by class: 1-98 train, 99-196 test
    layouts = ("cars_annos.mat", "devkit/cars_train_annos.mat", "names.csv")  # original, devkit, class folders
    base, marker = _locate(root, "cars", layouts, inner=("stanford_cars",))
    if marker == "cars_annos.mat":
        items = [(str(base / r["relative_im_path"]), int(r["class"]))
                 for r in _mat_records(base / marker, "annotations", ("relative_im_path", "class"))]
    else:
        items = _cars_devkit(base) if marker == layouts[1] else _cars_class_folders(base)
    return _split_by_class(items, last_train_class=98, split=split)


def _cars_devkit(base: Path) -> list[tuple[str, int]]:
    places = (base / "cars_test_annos_withlabels.mat", base / "devkit" / "cars_test_annos_withlabels.mat")
    test_annos = _need_file(next((p for p in places if p.is_file()), places[0]), "cars", base,
                            " (the test file without labels is of no use)")
    items = []
    for folder, annos in (("cars_train", base / "devkit" / "cars_train_annos.mat"), ("cars_test", test_annos)):
        items += [(str(base / folder / r["fname"]), int(r["class"]))
                  for r in _mat_records(annos, "annotations", ("fname", "class"))]
    return items


def _cars_class_folders(base: Path) -> list[tuple[str, int]]:
    with open(base / "names.csv", encoding="utf-8-sig") as handle:
        names = [line.strip() for line in handle if line.strip()]
    items = []
    for folder in ("train", "test"):
        annos = _need_file(base / f"anno_{folder}.csv", "cars", base, f" beside {base / 'names.csv'}")
        with open(annos, newline="", encoding="utf-8-sig") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row:
                    continue
                class_id = _int_field(annos, number, row[5]) if len(row) == 6 else 0
                if not 1 <= class_id <= len(names):
                    raise _bad_line(annos, number, f"expected fname,x1,y1,x2,y2,class (1..{len(names)}), got {row}")
                class_folder = names[class_id - 1].replace("/", "-")
                items.append((str(base / "car_data" / "car_data" / folder / class_folder / row[0]), class_id))
    return items


def _read_sop(root: Path, split: str) -> tuple[list[str], list[int]]:
    # Ebay_train.txt holds classes 1-11,318, Ebay_test.txt 11,319-22,634
    base, _ = _locate(root, "sop", ("Ebay_train.txt",), inner=("Stanford_Online_Products",))
    listing = _need_file(base / f"Ebay_{split}.txt", "sop", root)
    paths, class_ids = [], []
    for number, (_, class_id, _, relative) in _text_rows(listing, 4, skip=1):
        paths.append(str(base / relative))
        class_ids.append(_int_field(listing, number, class_id))
    return paths, class_ids


def _read_inshop(root: Path, split: str) -> tuple[list[str], list[int], list[int]]:
    # line 1: row count, line 2: header, then "image_name item_id status"; paths relative to Img/
    base, _ = _locate(root, "inshop", ("Eval/list_eval_partition.txt",), inner=("In-shop Clothes Retrieval Benchmark",))
    partition = base / "Eval" / "list_eval_partition.txt"
    rows = [fields for _, fields in _text_rows(partition, 3, skip=2)]
    with open(partition, encoding="utf-8") as handle:
        declared = handle.readline().strip()
    statuses = sorted({status for _, _, status in rows})
    if declared != str(len(rows)) or not set(statuses) <= set(SPLITS["inshop"]):
        raise ValueError(f"{partition}: declares {declared!r} rows, {len(rows)} follow (truncated file?), "
                         f"evaluation_status {statuses} (expected train, query, gallery)")
    chosen = [(str(base / "Img" / name), item) for name, item, status in rows if status == split]
    # items numbered by first appearance in the file, as the authors' inshop.py (so are the fold blocks);
    # query and gallery share one label mapping: the items of both
    order = list(dict.fromkeys(item for _, item, status in rows if (status == "train") == (split == "train")))
    return [path for path, _ in chosen], [item for _, item in chosen], order


def _digits(split: str) -> RetrievalDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero((digits.target < 6) == (split == "train"))
    images = torch.as_tensor(digits.images[keep] / 16.0, dtype=torch.float32).unsqueeze(1)
    labels, num_classes = _contiguous(digits.target[keep].tolist())
    return RetrievalDataset([f"digits/{i}" for i in keep], labels, num_classes, images=images,
                            name=f"digits {split}")


def load_digits_image(path: str | os.PathLike) -> torch.Tensor:
    """An 8×8 image file as a digits item: a (1, 8, 8) float tensor of the set's 17 grey levels v/16.

    The file is read as grey (load_image, then PIL's L) and each 0-255 value p becomes round(16·p/255)/16,
    so a digit saved as round(255·v/16) reads back exactly as _digits holds it. Another size is a
    ValueError naming the file.
    """
    image = load_image(path).convert("L")
    if image.size != (8, 8):
        raise ValueError(f"{path}: {image.size[0]}×{image.size[1]} pixels; a model trained on digits takes 8×8")
    levels = np.rint(np.asarray(image, dtype=np.float64) * 16 / 255)
    return torch.as_tensor(levels / 16.0, dtype=torch.float32).unsqueeze(0)


# ----------------------------------------------------------------------------- your own images: class folders


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions of the formats PIL can read (its .mpo files are read by the JPEG reader)."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN or fmt == "MPO")


def _skipped(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # hidden, macOS ._* files, a zip's macOS metadata


def _nfc(text: str) -> str:
    # macOS may store names decomposed (NFD): sorting and naming the composed form gives one order everywhere
    return unicodedata.normalize("NFC", text)


def image_files(folder: str | os.PathLike) -> list[str]:
    """Every image file under `folder`, recursively: POSIX paths relative to it, sorted (by their NFC form).

    An image file has an extension PIL reads (image_extensions(), any case); hidden files and folders
    (names starting with '.', so macOS ._* files too) and __MACOSX folders are skipped.
    """
    folder, found = Path(folder), []
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not _skipped(name)]
        here = Path(parent).relative_to(folder)
        found += [(here / name).as_posix() for name in files
                  if not _skipped(name) and Path(name).suffix.lower() in image_extensions()]
    return sorted(found, key=_nfc)


_EXTENSIONS_NOTE = "image files: extensions PIL reads, .jpg .png .bmp .gif .tif .webp ...; hidden files skipped"


class FolderListing(NamedTuple):
    """The images of a folder: `paths` relative to it; `labels` and `class_names` None when unlabelled."""
    paths: list[str]
    labels: list[int] | None
    class_names: list[str] | None


def read_image_folder(folder: str | os.PathLike) -> FolderListing:
    """A folder of class folders, folder/<class>/<image> (nested subfolders belong to their class), or,
    when `folder` holds image files itself, every image under it, unlabelled (image_files' rule).

    Class names are the folder names (NFC), labels 0..C-1 in their sorted order. One-line errors:
    no such folder, neither images nor class folders, two folders with one name, a class without images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    entries = sorted((entry for entry in os.scandir(folder) if not _skipped(entry.name)), key=lambda e: _nfc(e.name))
    if _loose_images(entries):
        return FolderListing(image_files(folder), None, None)
    classes = {}
    for entry in (entry for entry in entries if entry.is_dir()):
        if _nfc(entry.name) in classes:
            raise ValueError(f"{folder}: two class folders are named {_nfc(entry.name)!r} (in different Unicode forms)")
        files = image_files(entry.path)
        if not files:
            raise ValueError(f"class folder {entry.path} holds no image files ({_EXTENSIONS_NOTE})")
        classes[_nfc(entry.name)] = [f"{entry.name}/{name}" for name in files]
    if not classes:
        raise ValueError(f"{folder} holds neither image files nor class folders ({_EXTENSIONS_NOTE})")
    names = list(classes)  # sorted: entries were
    labelled = sorted(((path, label) for label, name in enumerate(names) for path in classes[name]),
                      key=lambda item: _nfc(item[0]))
    return FolderListing([path for path, _ in labelled], [label for _, label in labelled], names)


def _loose_images(entries: Iterable[os.DirEntry]) -> list[str]:
    """The names of the image files among a folder's entries (not in a subfolder)."""
    extensions = image_extensions()
    return [entry.name for entry in entries if entry.is_file() and Path(entry.name).suffix.lower() in extensions]


def _read_folder(root: Path, split: str) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of `split` of the folder dataset (docs/DATASETS.md, "Your own images").

    root/train/<class>/... and root/test/<class>/... when root holds exactly those two folders; otherwise
    root/<class>/..., the classes sorted by name, the first half (rounded up) train, the rest test.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"folder: root folder {root} does not exist; set dataset.root (data.py: --root) to "
                                f"the folder that holds one folder per class (DIR/<class>/<image>)")
    entries = sorted((entry for entry in os.scandir(root) if not _skipped(entry.name)), key=lambda e: e.name)
    folders = [entry.name for entry in entries if entry.is_dir()]
    if {"train", "test"} <= set(folders):
        others = [name + "/" for name in folders if name not in ("train", "test")] + _loose_images(entries)
        if others:
            raise ValueError(f"folder: {root} holds train/ and test/ beside other entries ({', '.join(others[:3])}): "
                             f"give either exactly train/ and test/, each of class folders, or class folders only")
        sides = {side: _class_folders(root / side) for side in ("train", "test")}
        both = sorted(set(sides["train"].class_names) & set(sides["test"].class_names))
        if both:
            raise ValueError(f"folder: class {both[0]!r} is in both {root / 'train'} and {root / 'test'} "
                             f"({len(both)} such classes); a class belongs to one side of the split")
        splits = {side: (root / side, listing) for side, listing in sides.items()}
    else:
        listing = _class_folders(root)
        half = (len(listing.class_names) + 1) // 2
        splits = {"train": (root, _classes_of(listing, range(half))),
                  "test": (root, _classes_of(listing, range(half, len(listing.class_names))))}
    halved = " (the class folders, sorted by name, are halved: give at least 4)" if root == splits["train"][0] else ""
    for side, (base, listing) in splits.items():
        if len(listing.class_names) < 2:
            raise ValueError(f"folder: the {side} split of {root} has {len(listing.class_names)} class(es), at least "
                             f"2 are needed{halved}")
    base, listing = splits[split]
    if split == "train":
        counts = np.bincount(listing.labels, minlength=len(listing.class_names))
        small = np.flatnonzero(counts < 2)
        if len(small):
            more = f" ({len(small)} training classes have fewer than 2)" if len(small) > 1 else ""
            raise ValueError(f"folder: class folder {base / listing.class_names[small[0]]} holds {counts[small[0]]} "
                             f"image(s); a training class needs at least 2, a positive pair{more}")
    return [str(base / path) for path in listing.paths], listing.labels, listing.class_names


def _class_folders(folder: Path) -> FolderListing:
    listing = read_image_folder(folder)
    if listing.labels is None:
        loose = next(path for path in listing.paths if "/" not in path)
        raise ValueError(f"folder: {folder} holds images itself ({loose}); expected one folder per class: "
                         f"{folder}/<class>/<image>")
    return listing


def _classes_of(listing: FolderListing, classes: range) -> FolderListing:
    """The images of classes (a range of labels), relabelled from 0."""
    keep = [(path, label - classes.start) for path, label in zip(listing.paths, listing.labels) if label in classes]
    return FolderListing([path for path, _ in keep], [label for _, label in keep],
                         listing.class_names[classes.start:classes.stop])


def build_dataset(name: str, root: str | os.PathLike | None, split: str,
                  transform: Callable | None = None) -> RetrievalDataset:
    """The `split` of dataset `name` (cub, cars, sop, inshop, digits, folder) extracted under `root`.

    root is the folder the archive was extracted into or the dataset's inner folder (for folder: the
    folder of class folders); it is ignored for digits. Warns when a benchmark's counts differ from
    docs/DATASETS.md.
    """
    if split not in SPLITS.get(name, ()) or (root is None and name != "digits"):
        raise ValueError(f"build_dataset: no split {split!r} of {name!r} (known: {SPLITS}), or no root folder")
    if name == "digits":
        dataset = _digits(split)
    elif name == "folder":
        root = Path(root).expanduser()
        paths, labels, class_names = _read_folder(root, split)
        return RetrievalDataset(paths, labels, len(class_names), transform, name=f"folder {split}",
                                class_names=class_names)
    else:
        root = Path(root).expanduser()
        _refuse_unfinished_extraction(name, root)
        if name == "inshop":
            paths, class_ids, order = _read_inshop(root, split)
        else:
            paths, class_ids = {"cub": _read_cub, "cars": _read_cars, "sop": _read_sop}[name](root, split)
            order = None
        labels, num_classes = _contiguous(class_ids, order)
        dataset = RetrievalDataset(paths, labels, num_classes, name=f"{name} {split}")
    _warn_counts(dataset, name, split, root)
    return dataset.with_transform(transform)


def _refuse_unfinished_extraction(name: str, root: Path) -> None:
    """One line if `download` began extracting the archive of `name` into root (or into root's parent,
    when root is the archive's inner folder) and did not finish: its files may be missing or cut off."""
    if name not in ARCHIVES:
        return
    for folder in (root, root.parent):
        marker = extracting_marker(folder, ARCHIVES[name][1])
        if marker.exists():
            raise ValueError(f"{name}: the extraction of {ARCHIVES[name][1]} into {folder} did not finish "
                             f"(interrupted, or still running: {marker} is there); run `python data.py download "
                             f"{name} --root {folder}` again, which extracts it again")


def _warn_counts(dataset: RetrievalDataset, name: str, split: str, root: Path | None) -> None:
    images, classes = EXPECTED_COUNTS[name][split]
    if (len(dataset), dataset.num_classes) != (images, classes):
        warnings.warn(f"{name} {split} under {root}: found {len(dataset)} images of {dataset.num_classes} "
                      f"classes, docs/DATASETS.md says {images} images of {classes} classes (a truncated download "
                      f"is the usual cause; `python data.py check {name} --root {root}` lists problems)",
                      stacklevel=3)


# ----------------------------------------------------------------------------- class-disjoint folds


def class_subset(dataset: RetrievalDataset, classes: Sequence[int]) -> RetrievalDataset:
    """The items of `classes` (labels of `dataset`), relabelled 0..len(classes)-1 in sorted order; its
    class_names are theirs in `dataset`, or, where it has none, their labels there ("7" for label 7)."""
    wanted = sorted({int(c) for c in classes})
    missing = sorted(set(wanted) - set(dataset.labels))
    if not wanted or missing:
        raise ValueError(f"class_subset: {len(wanted)} classes asked of {dataset.name}; not its labels: {missing[:10]}")
    rank = {c: r for r, c in enumerate(wanted)}
    keep = [i for i, label in enumerate(dataset.labels) if label in rank]
    subset = copy.copy(dataset)
    subset.paths = [dataset.paths[i] for i in keep]
    subset.labels = [rank[dataset.labels[i]] for i in keep]
    subset.num_classes = len(wanted)
    subset.images = None if dataset.images is None else dataset.images[keep]
    subset.class_names = [str(c) if dataset.class_names is None else dataset.class_names[c] for c in wanted]
    subset.name = f"{dataset.name} ({len(wanted)}-class subset)"
    return subset


def mlrc_folds(class_ids: Sequence[int], n_folds: int = 4) -> list[tuple[list[int], list[int]]]:
    """[(train classes, validation classes)] for contiguous class-disjoint blocks (PAPER.md §7).

    Block k holds the sorted classes [floor(k·C/n), floor((k+1)·C/n)): the authors' boundaries
    floor(linspace(0, C, n+1)) in exact integer arithmetic. Fold k (0-based) validates on block k
    (the authors' 1-based model k validates on block n - k: same folds, other order).
    """
    ids = sorted(int(c) for c in class_ids)
    if len(set(ids)) != len(ids) or not 2 <= n_folds <= len(ids):
        raise ValueError(f"mlrc_folds: need distinct class ids and 2 <= n_folds <= their number, got n_folds={n_folds} "
                         f"for {len(ids)} class ids ({len(set(ids))} distinct)")
    bounds = [k * len(ids) // n_folds for k in range(n_folds + 1)]
    return [(ids[:bounds[k]] + ids[bounds[k + 1]:], ids[bounds[k]:bounds[k + 1]]) for k in range(n_folds)]


# ----------------------------------------------------------------------------- sampler

SAMPLER_ORDERS = ("rounds", "independent")
QUEUE_REFILLS = ("cycle", "empty")  # a class's queue: rebuilt every cycle (the authors'), or refilled when empty
# spawn keys that keep the round and queue streams apart from the batch stream [seed, epoch, b]:
# SeedSequence pads short entropy with zeros, so [seed, r] alone would equal [seed, r, 0]
_ROUNDS, _QUEUES, _CYCLES = 1, 2, 3


def _draw_distinct(bits: np.random.PCG64, population: np.ndarray, k: int) -> np.ndarray:
    # partial Fisher-Yates on PCG64's raw stream: a stable stream, unlike Generator methods (NEP 19);
    # the modulo bias is below population size / 2**64
    pool = population.copy()
    raw = bits.random_raw(k)
    for i in range(k):
        j = i + int(raw[i] % np.uint64(len(pool) - i))
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def _permutation(seed: int, key: tuple[int, ...], domain: int, n: int) -> np.ndarray:
    """A shuffle of range(n), a pure function of (seed, key, domain)."""
    # the ranks of n raw 64-bit draws: vectorised (a round of SOP shuffles ~11k classes) and stable
    # across numpy versions; ties (probability < n²/2**65) fall back to index order
    bits = np.random.PCG64(np.random.SeedSequence([seed, *key], spawn_key=(domain,)))
    return np.argsort(bits.random_raw(n), kind="stable")


@functools.lru_cache(maxsize=2)  # a round lasts ~C/P batches (1,400 for SOP): shuffle it once, not per batch
def _round_order(seed: int, r: int, n_classes: int) -> np.ndarray:
    order = _permutation(seed, (r,), _ROUNDS, n_classes)
    order.flags.writeable = False  # the cached array is shared by every caller
    return order


class MPerClassSampler:
    """Batch sampler: `length` batches per epoch of `classes_per_batch` class visits × m items.

    A batch is a list of (index, augmentation seed) keys for RetrievalDataset, m consecutive keys
    per visited class; m = 1 gives the one-image-per-class batches of the baselines (PAPER.md §4).
    Batch b of epoch e is a pure function of (seed, e, b) (no state is carried between batches),
    so a run resumed at any batch continues exactly. Call set_epoch before every epoch.

    order="rounds" (default, the authors' sampler, PAPER.md §7): with P = classes_per_batch and
    global batch number g = e·length + b, batch g visits class slots g·P … g·P+P−1 of an endless
    sequence of rounds, round r being a shuffle of all C classes seeded by (seed, r). Every class
    is thus visited once per round before any class repeats. A visit takes the next m images of the
    class's queue, shuffles of its images one after another: within a queue no image repeats before
    the class is exhausted (m images that span a refill may); a class of fewer than m images wraps.
    refill="cycle" (default, the authors'): each class's shuffled queue is rebuilt every
    R = ceil(mean images per class / m) rounds, leftovers discarded; round r takes positions
    (r mod R)·m … +m−1 of cycle r // R's queue, its shuffles seeded by (seed, c, r // R, j), j = 0, 1, …
    refill="empty": one endless queue per class, shuffles seeded by (seed, c, j); round r takes its
    positions r·m … r·m+m−1. A batch that straddles two rounds may visit one class twice (its last
    visit of round r and its first of round r+1), as the authors' sampler does; the slots are never
    reordered, so the rounds stay exact.

    order="independent": every batch draws P distinct classes and m distinct images of each
    (with replacement when a class has fewer than m) afresh from the batch's own stream; refill
    is ignored.

    The augmentation seeds come from the batch's own stream PCG64(SeedSequence([seed, e, b])).
    """

    def __init__(self, labels: Sequence[int], m: int, classes_per_batch: int, length: int, seed: int,
                 *, order: str = "rounds", refill: str = "cycle") -> None:
        labels = np.asarray(labels)
        classes = np.unique(labels)
        if min(m, length) < 1 or not 1 <= classes_per_batch <= len(classes):
            raise ValueError(f"MPerClassSampler: need m, length >= 1 and 1 <= classes_per_batch <= {len(classes)} (the "
                             f"classes in labels), got m={m}, length={length}, classes_per_batch={classes_per_batch}")
        self.members = [np.flatnonzero(labels == c) for c in classes]
        self.m, self.classes_per_batch, self.length = m, classes_per_batch, length
        self.cycle_rounds = -(-len(labels) // (len(classes) * m))  # R = ceil(N / C / m)
        self.seed, self.epoch, self.start, self.order, self.refill = 0, 0, 0, order, refill
        self.load_state_dict({"seed": seed, "epoch": 0, "start": 0, "order": order, "refill": refill})

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields batches start..length-1 of `epoch`."""
        if epoch < 0 or not 0 <= start <= self.length:
            raise ValueError(f"MPerClassSampler: need epoch >= 0, 0 <= start <= {self.length}; got {epoch}, {start}")
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return self.length - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.start, self.length):
            yield self.batch(self.epoch, b)

    def batch(self, epoch: int, b: int) -> list[tuple[int, int]]:
        """Batch b of `epoch`: classes_per_batch class visits, m (index, augmentation seed) keys each."""
        bits = np.random.PCG64(np.random.SeedSequence([self.seed, epoch, b]))
        if self.order == "rounds":
            indices = self._rounds_batch(epoch * self.length + b)
        else:
            indices = self._independent_batch(bits)
        seeds = (bits.random_raw(len(indices)) >> np.uint64(1)).tolist()  # 63 bits: fits an int64
        return list(zip(indices, seeds))

    def _rounds_batch(self, g: int) -> list[int]:
        # slots g·P … g·P+P−1; slot s is position s mod C of round s // C, the class's (s // C)-th visit
        n_classes = len(self.members)
        slots = range(g * self.classes_per_batch, (g + 1) * self.classes_per_batch)
        rounds = {r: _round_order(self.seed, r, n_classes) for r in {s // n_classes for s in slots}}
        indices = []
        for slot in slots:
            r, position = divmod(slot, n_classes)
            indices += self._visit(int(rounds[r][position]), r)
        return indices

    def _visit(self, c: int, r: int) -> list[int]:
        # queue positions r·m … r·m+m−1 of class c; queue position q is item q mod n of shuffle q // n
        key, domain = (c,), _QUEUES
        if self.refill == "cycle":  # round r is round r mod R of cycle r // R, whose queue starts afresh
            cycle, r = divmod(r, self.cycle_rounds)
            key, domain = (c, cycle), _CYCLES
        members, start = self.members[c], r * self.m
        n = len(members)
        shuffles = range(start // n, (start + self.m - 1) // n + 1)
        queue = np.concatenate([_permutation(self.seed, (*key, j), domain, n) for j in shuffles])
        offset = start - shuffles[0] * n
        return members[queue[offset:offset + self.m]].tolist()

    def _independent_batch(self, bits: np.random.PCG64) -> list[int]:
        indices = []
        for c in _draw_distinct(bits, np.arange(len(self.members)), self.classes_per_batch):
            members = self.members[c]
            if len(members) >= self.m:
                indices += _draw_distinct(bits, members, self.m).tolist()
            else:
                indices += members[bits.random_raw(self.m) % np.uint64(len(members))].tolist()
        return indices

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start, "order": self.order,
                "refill": self.refill}

    def load_state_dict(self, state: dict) -> None:
        """Adopt seed, order, refill and the last set_epoch(epoch, start) from `state`. The position is the one
        set_epoch gave, not the batches yielded since (a DataLoader reads ahead): a resumed run calls set_epoch
        with its own step, which the batches then follow exactly."""
        seed, epoch, start, order, refill = (state[key] for key in ("seed", "epoch", "start", "order", "refill"))
        if seed < 0 or order not in SAMPLER_ORDERS or refill not in QUEUE_REFILLS:
            raise ValueError(f"MPerClassSampler: need seed >= 0, order in {SAMPLER_ORDERS} and refill in "
                             f"{QUEUE_REFILLS}, got {seed}, {order!r}, {refill!r}")
        self.seed, self.order, self.refill = int(seed), order, refill
        self.set_epoch(epoch, start)


# ----------------------------------------------------------------------------- transforms

BNINCEPTION_MEAN_BGR = (104.0, 117.0, 128.0)  # Caffe convention: BGR, 0-255, std 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CaffeBGR:
    """RGB (3, H, W) tensor in 0-255 (uint8) -> float BGR minus the Caffe mean (BN-Inception's input)."""

    def __init__(self, mean_bgr: Sequence[float] = BNINCEPTION_MEAN_BGR) -> None:
        self.mean = torch.tensor(mean_bgr, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        # RGB -> BGR while still uint8 (a quarter of the bytes to move), then x - mean in float
        return image.flip(0).to(torch.float32) - self.mean


class RandomShift:
    """Shift a (C, H, W) tensor by up to `max_shift` pixels each way, zero fill (torch's RNG)."""

    def __init__(self, max_shift: int = 1) -> None:
        self.max_shift = max_shift

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        padded = torch.nn.functional.pad(image, (s, s, s, s))
        return padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]


def build_transform(style: str, train: bool, crop_size: int = 227, resize: int = 256) -> Callable:
    """Train or eval transform for style "bninception", "resnet" or "digits" (PAPER.md §7).

    Images: train = shorter side to `resize` -> RandomResizedCrop(crop_size, scale (0.16, 1),
    ratio (3/4, 4/3)) -> horizontal flip; eval = shorter side to `resize` -> centre crop.
    digits: train = random shift by up to 1 pixel; eval = identity.
    """
    if style == "digits":
        return RandomShift(1) if train else v2.Identity()
    if style not in ("bninception", "resnet"):
        raise ValueError(f"build_transform: unknown style {style!r}, expected bninception, resnet or digits")
    if train:
        geometry = [v2.Resize(resize), v2.RandomResizedCrop(crop_size, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3)),
                    v2.RandomHorizontalFlip(0.5)]
    else:
        geometry = [v2.Resize(resize), v2.CenterCrop(crop_size)]
    if style == "bninception":
        convert = [CaffeBGR()]
    else:
        convert = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    # two stages: the image as a uint8 tensor, then its conversion to the network's input (see decoded)
    return v2.Compose([v2.Compose(geometry + [v2.ToImage(), v2.ToPureTensor()]), v2.Compose(convert)])


def decoded(dataset: RetrievalDataset, workers: int = 0, batch_size: int = 128) -> RetrievalDataset:
    """`dataset` under an evaluation transform of build_transform, with its first stage (decoding, resize,
    centre crop: deterministic) applied once to every image and kept in memory as one uint8 tensor (which
    forked loader workers read without a copy); its items then run only the second stage, the float
    conversion, so they are bit for bit those of `dataset`. An in-memory set (digits) is returned as is."""
    if dataset.images is not None:
        return dataset
    first, convert = dataset.transform.transforms
    images = None
    loader = torch.utils.data.DataLoader(dataset.with_transform(first), batch_size=batch_size, num_workers=workers)
    for start, (batch, _) in zip(range(0, len(dataset), batch_size), loader):
        if images is None:
            images = torch.empty((len(dataset), *batch.shape[1:]), dtype=batch.dtype)
        images[start:start + len(batch)] = batch
    cached = dataset.with_transform(convert)
    cached.images = images
    return cached


# ----------------------------------------------------------------------------- download and check

# name -> (address, archive file name, MD5); only these two are still publicly downloadable.
ARCHIVES = {
    "cub": ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
            "CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78"),
    "sop": ("http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
            "Stanford_Online_Products.zip", "7f73d41a2f44250d4779881525aea32e"),
}

ARCHIVE_SIZES = {"cub": "about 1.1 GB", "sop": "about 2.9 GB"}

MANUAL_STEPS = {
    "cars": """Cars196 cannot be downloaded automatically: its original addresses are gone.
Put ONE of these layouts under --root (all three are read; the split is by class, 1-98 / 99-196):
  1. original: car_ims/000001.jpg ... and cars_annos.mat
     (car_ims.tgz MD5 d5c8f0aa497503f355e17dc7886c3f14, cars_annos.mat MD5 b407c6086d669747186bd1d764ff9dbc)
  2. devkit / torchvision: cars_train/, cars_test/, devkit/cars_train_annos.mat and
     cars_test_annos_withlabels.mat (beside devkit/ or inside it)
  3. class folders: names.csv, anno_train.csv, anno_test.csv, car_data/car_data/{train,test}/<class>/
Then run: python data.py check cars --root DIR""",
    "inshop": """In-Shop Clothes Retrieval needs a sign-in: download it by hand from
  https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html
Put Eval/list_eval_partition.txt and Img/img.zip under --root, unzip Img/img.zip inside Img/
(giving Img/img/WOMEN/... and Img/img/MEN/...), then run: python data.py check inshop --root DIR""",
}


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read a MiB at a time (archives are gigabytes)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike, md5: str, timeout: float = 60.0) -> Path:
    """Download url to dest, resuming a partial `dest.part` with an HTTP Range request.

    The MD5 is checked before the file takes its final name; on a mismatch the partial file is
    deleted and ValueError raised. An existing dest with the right MD5 is kept as is.
    """
    dest = Path(dest)
    if dest.exists() and file_md5(dest) != md5:
        raise ValueError(f"download: {dest} exists but its MD5 is not {md5}; delete it to download again")
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            # a server (or file://) that ignores Range answers 200 with the whole file: start over
            resumed = offset > 0 and getattr(response, "status", None) == 206
            with open(part, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
    except urllib.error.HTTPError as err:
        if not (err.code == 416 and offset > 0):  # 416: nothing left to fetch, the .part is complete
            raise
    got = file_md5(part)
    if got != md5:
        part.unlink()
        raise ValueError(f"download: MD5 of {url} is {got}, expected {md5}; deleted {part}, run again")
    os.replace(part, dest)
    return dest


def _inside(folder: Path, member: str, archive: Path) -> None:
    target = (folder / member).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise ValueError(f"extract: {archive} member {member!r} would be written outside {folder}; refusing")


def extracting_marker(folder: str | os.PathLike, archive_name: str) -> Path:
    """The file that says an extraction of `archive_name` into folder started and has not finished."""
    return Path(folder) / f".extracting-{archive_name}"


@contextlib.contextmanager
def _marked_extraction(archive: Path, folder: Path) -> Iterator[None]:
    # written before the first member, removed after the last: an error or a kill -9 leaves it in place
    marker = extracting_marker(folder, archive.name)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"extraction of {archive} started; this file is removed when it completes\n")
    yield
    marker.unlink()


def extract(archive: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Unpack a .zip or tar archive into folder, refusing members that would land outside it.

    While it runs, extracting_marker(folder, archive name) exists: build_dataset refuses a folder an
    interrupted extraction left (kill -9, a full disk) until an extraction completes.
    """
    archive, folder = Path(archive), Path(folder)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                _inside(folder, member, archive)
            with _marked_extraction(archive, folder):
                zf.extractall(folder)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                _inside(folder, member.name, archive)
                if member.issym() or member.islnk():
                    _inside(folder, os.path.join(os.path.dirname(member.name), member.linkname), archive)
            with _marked_extraction(archive, folder):
                tf.extractall(folder, filter="data")
    else:
        raise ValueError(f"extract: {archive} is neither a zip nor a tar archive")


def download_dataset(name: str, root: str | os.PathLike, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch (with resume), verify and extract the archive of `name` into root; url/md5 override the table."""
    if name not in ARCHIVES:
        raise ValueError(f"download_dataset: only {sorted(ARCHIVES)} can be downloaded, got {name!r}")
    default_url, filename, default_md5 = ARCHIVES[name]
    root = Path(root).expanduser()
    archive = download(url or default_url, root / filename, md5 or default_md5)
    extract(archive, root)
    return archive


def _read_problem(path: str) -> str | None:
    try:
        load_image(path)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


def check(name: str, root: str | os.PathLike | None, workers: int = 8) -> list[str]:
    """Verify the layout, decode every image, print counts; return every problem found."""
    problems = []
    for split in SPLITS[name]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                dataset = build_dataset(name, root, split)
            except (FileNotFoundError, ValueError) as err:
                return problems + [str(err)]
        problems += [str(w.message) for w in caught]
        print(f"{name} {split}: {len(dataset)} images, {dataset.num_classes} classes")
        if dataset.images is None:
            with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
                problems += [p for p in pool.map(_read_problem, dataset.paths, chunksize=64) if p]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download or check a retrieval benchmark (docs/DATASETS.md).")
    parser.add_argument("command", choices=("download", "check"),
                        help="download: fetch, verify and extract the archive (cub, sop; the others print how to get "
                             "them); check: verify the layout and decode every image")
    parser.add_argument("name", choices=sorted(SPLITS), help="the dataset (folder: your own images under --root)")
    parser.add_argument("--root", default="data", help="folder the archive is (or will be) extracted into; for "
                                                       "folder, the folder of class folders (default: data)")
    parser.add_argument("--url", help="download from this address instead (a mirror)")
    parser.add_argument("--md5", help="expected MD5 of the archive instead of the one in docs/DATASETS.md")
    args = parser.parse_args(argv)
    if args.command == "download":
        if args.name == "digits":
            print("digits is bundled with scikit-learn: nothing to download")
            return 0
        if args.name == "folder":
            print(f"folder is your own images, DIR/<class>/<image>: nothing to download; check them with "
                  f"`python data.py check folder --root DIR`", file=sys.stderr)
            return 1
        if args.name in MANUAL_STEPS:
            print(MANUAL_STEPS[args.name])
            return 1
        print(f"downloading {args.url or ARCHIVES[args.name][0]} into {args.root} (resumes a partial download)")
        try:
            download_dataset(args.name, args.root, args.url, args.md5)
        except urllib.error.URLError as err:  # offline, or the address is gone
            print(f"error: cannot download {args.url or ARCHIVES[args.name][0]}: {err.reason}; without network, "
                  f"{_by_hand(args.name, Path(args.root).expanduser())}", file=sys.stderr)
            return 1
        except (OSError, ValueError) as err:  # an MD5 mismatch, a full disk
            print(f"error: {err}", file=sys.stderr)
            return 1
    problems = check(args.name, args.root)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{len(problems)} problem(s) found" if problems else "all good")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
