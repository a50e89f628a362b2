"""Tests for data.py: fake copies of every on-disk layout, folds, sampler, seeded transforms, download."""
import hashlib
import http.server
import io
import json
import math
import re
import tarfile
import threading
import traceback
import unicodedata
import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import data

COUNT_WARNING = "docs/DATASETS.md says"


def write_image(path: Path, kind: str = "rgb", seed: int = 0, size=(24, 16)) -> Path:
    """A small image file; kind: rgb, gray, cmyk, palette (with transparency), rgba, corrupt, truncated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if kind == "corrupt":
        path.write_bytes(b"this is not an image")
    elif kind == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "rgb":
        Image.fromarray(pixels).save(path, "JPEG")
    elif kind == "gray":
        Image.fromarray(pixels[..., 0]).save(path, "JPEG")
    elif kind == "cmyk":
        Image.fromarray(pixels).convert("CMYK").save(path, "JPEG")
    elif kind == "palette":
        image = Image.fromarray(pixels).convert("P")
        image.info["transparency"] = 0
        image.save(path, "PNG", transparency=0)
    elif kind == "rgba":
        Image.fromarray(np.dstack([pixels, pixels[..., :1]])).save(path, "PNG")
    return path


def build(name, root, split, transform=None):
    """build_dataset on a fake (tiny) copy: the count warning is expected and asserted."""
    with pytest.warns(UserWarning, match=COUNT_WARNING):
        return data.build_dataset(name, root, split, transform)


def ranks(class_ids):
    return {c: r for r, c in enumerate(sorted(set(class_ids)))}


# ----------------------------------------------------------------------------- CUB


CUB_CLASSES = {1: ["rgb", "gray"], 2: ["cmyk", "palette"], 100: ["rgba"], 101: ["rgb", "rgb"], 200: ["rgb"]}


def make_cub(root):
    """root/CUB_200_2011 with images.txt, image_class_labels.txt and a macOS ._ file; {path: class id}."""
    base = root / "CUB_200_2011"
    lines, labels, truth = [], [], {}
    image_id = 0
    for class_id, kinds in CUB_CLASSES.items():
        for k, kind in enumerate(kinds):
            image_id += 1
            relative = f"{class_id:03d}.Class_{class_id}/img_{k}.jpg"
            write_image(base / "images" / relative, kind, seed=image_id)
            lines.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            truth[str(base / "images" / relative)] = class_id
    (base / "images" / "001.Class_1" / "._img_0.jpg").write_bytes(b"\x00\x05\x16\x07")
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return truth


@pytest.fixture
def cub_root(tmp_path):
    return tmp_path, make_cub(tmp_path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cub_split_by_class_and_contiguous_labels(cub_root, split):
    root, truth = cub_root
    dataset = build("cub", root, split)
    in_split = {p: c for p, c in truth.items() if (c <= 100) == (split == "train")}
    assert set(dataset.paths) == set(in_split) and len(dataset) == len(in_split)
    rank = ranks(in_split.values())
    assert dataset.labels == [rank[in_split[p]] for p in dataset.paths]
    assert dataset.num_classes == len(rank)


def test_cub_inner_folder_and_every_mode_becomes_rgb(cub_root):
    root, truth = cub_root
    dataset = build("cub", root / "CUB_200_2011", "train")
    assert len(dataset) == 5
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.mode == "RGB" and image.size == (24, 16) and label == dataset.labels[index]
    gray_index = next(i for i, p in enumerate(dataset.paths) if p.endswith("001.Class_1/img_1.jpg"))
    pixels = np.asarray(dataset[gray_index][0]).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_count_warning_names_both_numbers(cub_root):
    with pytest.warns(UserWarning, match=r"found 5 images of 3 classes.*5864 images of 100 classes"):
        data.build_dataset("cub", cub_root[0], "train")


@pytest.mark.parametrize("name, where, pattern", [
    ("cub", "nowhere", r"root folder .*nowhere does not exist; fetch it with `python data.py download cub --root"),
    ("cub", ".", r"expected .*/images.txt or .*/CUB_200_2011/images.txt; fetch it with `python data.py download cub"),
    ("sop", ".", r"expected .*/Ebay_train.txt or .*/Stanford_Online_Products/Ebay_train.txt; fetch it with"),
    ("cars", ".", r"expected .*/cars_annos.mat or .*/devkit/cars_train_annos.mat or .*/names.csv.* prints how to"),
    ("inshop", ".", r"expected .*/Eval/list_eval_partition.txt.* prints how to get it"),
], ids=["root", "cub", "sop", "cars", "inshop"])
def test_missing_files_name_the_file_and_how_to_get_it(tmp_path, name, where, pattern):
    with pytest.raises(FileNotFoundError, match=pattern):
        data.build_dataset(name, tmp_path / where, data.SPLITS[name][0])


def _malformed_cub(root):
    make_cub(root)
    with open(root / "CUB_200_2011" / "image_class_labels.txt", "a") as handle:
        handle.write("99 1 extra\n")


def _malformed_cars(root):
    make_cars_class_folders(root)
    with open(root / "anno_test.csv", "a") as handle:
        handle.write("x.jpg,1,2,20,12,197\n")


def _non_utf8_cub(root):
    make_cub(root)
    with open(root / "CUB_200_2011" / "images.txt", "ab") as handle:
        handle.write(b"\xff\xfe 9 x.jpg\n")


def _truncated_cars(root):
    make_cars_original(root)
    whole = (root / "cars_annos.mat").read_bytes()
    (root / "cars_annos.mat").write_bytes(whole[:len(whole) // 2])  # an interrupted download


@pytest.mark.parametrize("name, make, pattern", [
    ("cub", _malformed_cub, r"image_class_labels.txt:9: expected 2 fields, got '99 1 extra'"),
    ("cub", _non_utf8_cub, r"/CUB_200_2011/images.txt: expected UTF-8 text, got byte 0xff"),
    ("cars", _truncated_cars, r"/cars_annos.mat: not a readable MATLAB file \(.*\); is the download complete\?$"),
    ("cars", _malformed_cars, r"anno_test.csv:5: expected fname,x1,y1,x2,y2,class \(1..196\), got \['x.jpg'"),
    ("inshop", lambda root: make_inshop(root, declared=52712),
     r"list_eval_partition.txt: declares '52712' rows, 9 follow \(truncated file\?\)"),
], ids=["cub-fields", "cub-not-utf8", "cars-truncated-mat", "cars-class", "inshop-truncated"])
def test_malformed_metadata_names_the_file_and_line(tmp_path, capsys, name, make, pattern):
    make(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        data.build_dataset(name, tmp_path, "train")
    assert data.main(["check", name, "--root", str(tmp_path)]) == 1  # a PROBLEM line, not a traceback
    assert re.search(pattern.replace("$", ""), capsys.readouterr().out)


@pytest.mark.parametrize("kind, error, message", [("corrupt", ValueError, "cannot decode image"),
                                                  ("truncated", ValueError, "cannot decode image"),
                                                  ("missing", FileNotFoundError, "image file not found:")])
def test_unreadable_image_error_names_its_path(tmp_path, kind, error, message):
    path = tmp_path / "bad.jpg"
    if kind != "missing":
        write_image(path, kind)
    dataset = data.RetrievalDataset([str(path)], [0], 1, name="one image")
    with pytest.raises(error, match=f"{message} {path}"):
        dataset[0]


def _write_mode(path: Path, case: str, rng) -> np.ndarray | None:
    """A file that PIL opens in the mode of `case`; the RGB pixels load_image must return (None: refused)."""
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    grey = rng.integers(0, 65536, (6, 10), dtype=np.uint16)
    high_byte = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)  # the rule for 16-bit grey
    if case == "1":
        Image.fromarray(rgb[..., 0] > 127).save(path)
        return np.repeat(np.where(rgb[..., :1] > 127, 255, 0).astype(np.uint8), 3, axis=2)
    if case == "LA":
        Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]])).save(path)
        return np.repeat(rgb[..., :1], 3, axis=2)  # alpha dropped
    if case == "P":  # with transparency
        colours = rng.integers(0, 256, (4, 3), dtype=np.uint8)
        rgb = colours[rng.integers(0, 4, rgb.shape[:2])]
        Image.fromarray(rgb).quantize(4).save(path, transparency=0)
        return rgb
    if case == "RGBA":
        Image.fromarray(np.dstack([rgb, rgb[..., 1]])).save(path)
        return rgb
    if case == "CMYK":  # PIL's formula: RGB -> CMYK (K = 0) -> RGB is exact
        Image.fromarray(rgb).convert("CMYK").save(path)
        return rgb
    if case in ("I;16", "I PNG"):  # "I PNG": a 16-bit grey PNG as Pillow < 10.3 opens it
        Image.fromarray(grey).save(path)
        return high_byte
    if case == "I;16B":
        Image.frombytes("I;16B", (10, 6), grey.astype(">u2").tobytes()).save(path)
        return high_byte
    if case == "I PGM":  # 16-bit PGM: PIL opens it as 32-bit I holding 0-65535
        path.write_bytes(b"P5\n10 6\n65535\n" + grey.astype(">u2").tobytes())
        return high_byte
    if case == "I TIFF":
        Image.fromarray(grey.astype(np.int32) * 1000).save(path)
    elif case == "F TIFF":
        Image.fromarray(grey.astype(np.float32) / 65535).save(path)
    elif case == "F PFM":
        Image.fromarray(grey.astype(np.float32)).save(path, "PPM")
    elif case == "LAB":
        Image.fromarray(rgb).convert("LAB").save(path)
    return None


MODE_CASES = {"1": "x.png", "LA": "x.png", "P": "x.png", "RGBA": "x.png", "CMYK": "x.tif", "I;16": "x.png",
              "I;16B": "x.tif", "I PGM": "x.pgm", "I PNG": "x.png", "I TIFF": "x.tif", "F TIFF": "x.tif",
              "F PFM": "x.pfm", "LAB": "x.tif"}


@pytest.mark.parametrize("case", MODE_CASES)
def test_every_pil_mode_is_read_faithfully_or_refused_naming_file_and_mode(tmp_path, monkeypatch, case):
    if case == "I PNG":
        from PIL import PngImagePlugin
        monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))  # Pillow < 10.3's table
    path = tmp_path / MODE_CASES[case]
    expected = _write_mode(path, case, np.random.default_rng(len(case)))
    mode = case.split()[0]
    with Image.open(path) as opened:
        assert opened.mode == mode and (mode != "P" or "transparency" in opened.info)
    if expected is not None:
        image = data.load_image(path)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)
    else:  # never silently clipped: one line naming the file and its mode
        with pytest.raises(ValueError) as caught:
            data.load_image(path)
        assert str(caught.value).startswith(f"cannot read image {path}: PIL mode {mode} (")
        assert "\n" not in str(caught.value) and isinstance(caught.value, data.UnreadableImage)


@pytest.mark.parametrize("kind, error, message", [("corrupt", ValueError, "cannot decode image"),
                                                  ("missing", FileNotFoundError, "image file not found:"),
                                                  ("float", ValueError, "cannot read image")])
def test_an_unreadable_image_read_in_a_dataloader_worker_is_one_line_naming_it(tmp_path, kind, error, message):
    bad = tmp_path / "bad image.tif"
    if kind == "corrupt":
        bad.write_bytes(b"this is not an image")
    elif kind == "float":
        Image.fromarray(np.ones((16, 24), np.float32)).save(bad)
    good = write_image(tmp_path / "good.jpg")
    dataset = data.RetrievalDataset([str(good), str(bad)], [0, 0], 1, data.build_transform("resnet", False, 8, 8))
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1))
    with pytest.raises(error) as caught:
        next(batches)
    text = str(caught.value)
    traceback.clear_frames(caught.tb)  # torch's re-raise is a reference cycle: the worker ends here, not at a
    del batches, caught  # later collection (5 s) or in a process a later test forks
    assert text.startswith(f"{message} {bad}") and "\n" not in text  # not "Caught ValueError in DataLoader worker"


# ----------------------------------------------------------------------------- Cars196, three layouts


CARS_NAMES = {i: f"Make Model {i} 2012" for i in range(1, 197)}
CARS_NAMES[98] = "Ram C/V Cargo Van Minivan 2012"
CARS_IMAGES = [1, 1, 2, 98, 98, 99, 196, 196]  # class of each image, in the original numbering


def cars_struct(rows, fields):
    array = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        array[0, i] = row
    return array


def make_cars_original(root):
    truth, rows = {}, []
    for i, class_id in enumerate(CARS_IMAGES, start=1):
        relative = f"car_ims/{i:06d}.jpg"
        truth[str(write_image(root / relative, seed=i))] = class_id
        rows.append((relative, 1, 2, 20, 12, class_id, i % 2))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": cars_struct(rows, fields)})
    return truth


def make_cars_devkit(root):
    truth, per_folder = {}, {"cars_train": [], "cars_test": []}
    for i, class_id in enumerate(CARS_IMAGES):
        folder = "cars_train" if i % 2 else "cars_test"
        fname = f"{len(per_folder[folder]) + 1:05d}.jpg"
        truth[str(write_image(root / folder / fname, seed=i))] = class_id
        per_folder[folder].append((1, 2, 20, 12, class_id, fname))
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    (root / "devkit").mkdir()
    for folder, mat in (("cars_train", "devkit/cars_train_annos.mat"), ("cars_test", "cars_test_annos_withlabels.mat")):
        scipy.io.savemat(root / mat, {"annotations": cars_struct(per_folder[folder], fields)})
    return truth


def make_cars_class_folders(root):
    truth, annos = {}, {"train": [], "test": []}
    for i, class_id in enumerate(CARS_IMAGES):
        folder = "train" if i % 2 else "test"
        fname = f"{i:05d}.jpg"
        image_dir = root / "car_data" / "car_data" / folder / CARS_NAMES[class_id].replace("/", "-")
        truth[str(write_image(image_dir / fname, seed=i))] = class_id
        annos[folder].append(f"{fname},1,2,20,12,{class_id}")
    (root / "names.csv").write_text("\n".join(CARS_NAMES[i] for i in range(1, 197)) + "\n")
    for folder, lines in annos.items():
        (root / f"anno_{folder}.csv").write_text("\n".join(lines) + "\n")
    return truth


@pytest.mark.parametrize("make", [make_cars_original, make_cars_devkit, make_cars_class_folders])
def test_cars_every_layout_splits_by_class(tmp_path, make):
    truth = make(tmp_path)
    for split in ("train", "test"):
        dataset = build("cars", tmp_path, split)
        in_split = {p: c for p, c in truth.items() if (c <= 98) == (split == "train")}
        assert set(dataset.paths) == set(in_split)
        rank = ranks(in_split.values())
        assert dataset.labels == [rank[in_split[p]] for p in dataset.paths]
        assert all(Path(p).is_file() for p in dataset.paths)


def test_cars_original_layout_from_inner_folder(tmp_path):
    make_cars_original(tmp_path)
    assert len(build("cars", tmp_path / "car_ims", "test")) == 3


# ----------------------------------------------------------------------------- SOP and In-Shop


def test_sop_reads_ebay_files_and_remaps_test_labels(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    rows = {"train": [(1, 1), (2, 1), (3, 7)], "test": [(4, 11319), (5, 11319), (6, 22634)]}
    for split, items in rows.items():
        lines = ["image_id class_id super_class_id path"]
        for image_id, class_id in items:
            relative = f"mug_final/{class_id}_{image_id}.JPG"
            write_image(base / relative, seed=image_id)
            lines.append(f"{image_id} {class_id} 8 {relative}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    test = build("sop", tmp_path, "test")
    assert test.labels == [0, 0, 1] and test.num_classes == 2
    assert test.paths == [str(base / "mug_final" / n) for n in ("11319_4.JPG", "11319_5.JPG", "22634_6.JPG")]
    train = build("sop", base, "train")
    assert train.labels == [0, 0, 1] and train[2][0].mode == "RGB"


def make_inshop(root, declared=None):
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
            ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
            ("img/MEN/Denim/id_00000001/01_1_front.jpg", "id_00000001", "train"),  # listed after 80
            ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "query"),
            ("img/MEN/Denim/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
            ("img/WOMEN/Tees/id_00000005/01_1_front.jpg", "id_00000005", "gallery"),  # gallery only
            ("img/WOMEN/Tees/id_00000009/01_1_front.jpg", "id_00000009", "query"),
            ("img/WOMEN/Tees/id_00000009/01_4_full.jpg", "id_00000009", "gallery")]
    lines = [str(len(rows) if declared is None else declared), "image_name item_id evaluation_status"]
    for i, (name, item, status) in enumerate(rows):
        write_image(root / "Img" / name, seed=i)
        lines.append(f"{name}{' ' * (60 - len(name))}{item}       {status}")
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return rows


def test_inshop_items_numbered_by_first_appearance_query_and_gallery_share_one_mapping(tmp_path):
    # as the authors' inshop.py: labels (and so the fold blocks) follow the partition file's order
    rows = make_inshop(tmp_path)
    test_items = list(dict.fromkeys(item for _, item, status in rows if status != "train"))
    for split in ("train", "query", "gallery"):
        dataset = build("inshop", tmp_path, split)
        chosen = [(name, item) for name, item, status in rows if status == split]
        universe = list(dict.fromkeys(item for _, item in chosen)) if split == "train" else test_items
        assert dataset.paths == [str(tmp_path / "Img" / name) for name, _ in chosen]
        assert dataset.labels == [universe.index(item) for _, item in chosen]
        assert dataset.num_classes == len(universe)
    train = build("inshop", tmp_path, "train")
    assert train.labels == [0, 0, 1, 2]  # items 02, 80, 01 in the file's order, not sorted
    query, gallery = build("inshop", tmp_path, "query"), build("inshop", tmp_path, "gallery")
    assert query.labels == [0, 2] and gallery.labels == [0, 1, 2]  # items 07, 05, 09 as listed


# ----------------------------------------------------------------------------- digits, subsets, folds


def test_digits_split_is_by_class_with_expected_counts():
    from sklearn.datasets import load_digits

    reference = load_digits()
    train = data.build_dataset("digits", None, "train")  # exact counts: no warning
    test = data.build_dataset("digits", None, "test")
    assert (len(train), train.num_classes, len(test), test.num_classes) == (1083, 6, 714, 4)
    for dataset, offset in ((train, 0), (test, 6)):
        for position in (0, 17, len(dataset) - 1):
            image, label = dataset[position]
            original = int(dataset.paths[position].split("/")[1])
            assert image.shape == (1, 8, 8) and image.dtype == torch.float32
            assert torch.allclose(image[0], torch.tensor(reference.images[original] / 16.0, dtype=torch.float32))
            assert label == reference.target[original] - offset
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0


def test_class_subset_relabels_in_sorted_order():
    dataset = data.build_dataset("digits", None, "train")
    subset = data.class_subset(dataset, [5, 2])
    expected = [(p, {2: 0, 5: 1}[label]) for p, label in zip(dataset.paths, dataset.labels) if label in (2, 5)]
    assert list(zip(subset.paths, subset.labels)) == expected and subset.num_classes == 2
    assert subset.class_names == ["2", "5"]  # digits has no names: a subset's classes are named by their labels
    original = dataset.paths.index(subset.paths[3])
    assert torch.equal(subset[3][0], dataset[original][0])


def test_mlrc_folds_hand_computed_example():
    # C = 10, 4 folds: linspace(0, 10, 5) = [0, 2.5, 5, 7.5, 10] -> boundaries [0, 2, 5, 7, 10]
    ids = [30, 31, 32, 33, 34, 35, 36, 37, 38, 39]
    folds = data.mlrc_folds(list(reversed(ids)), 4)
    assert [val for _, val in folds] == [[30, 31], [32, 33, 34], [35, 36], [37, 38, 39]]
    assert folds[1][0] == [30, 31, 35, 36, 37, 38, 39]
    assert data.mlrc_folds(range(6), 3)[2] == ([0, 1, 2, 3], [4, 5])


def test_mlrc_folds_match_floor_linspace_and_partition_the_classes():
    for n_classes in list(range(2, 40)) + [98, 100, 3997, 11318]:
        for n_folds in range(2, min(n_classes, 6) + 1):
            folds = data.mlrc_folds(range(n_classes), n_folds)
            bounds = np.floor(np.linspace(0, n_classes, n_folds + 1)).astype(int)
            for k, (train, val) in enumerate(folds):
                assert val == list(range(bounds[k], bounds[k + 1]))
                assert sorted(train + val) == list(range(n_classes))


# ----------------------------------------------------------------------------- sampler


LABELS = [0] * 10 + [1] * 3 + [2] * 6 + [3] * 5 + [4] * 8 + [5] * 1 + [6] * 7
MEMBERS = [[i for i, label in enumerate(LABELS) if label == c] for c in range(7)]


def epochs_of(sampler, epochs):
    """Every batch of `epochs` epochs, through set_epoch and iteration as train.py does."""
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += list(sampler)
    return batches


def visits(batch, m, labels=LABELS):
    """[(class, indices)] of the blocks of m consecutive keys; each block must hold one class."""
    blocks = [[i for i, _ in batch[k:k + m]] for k in range(0, len(batch), m)]
    assert all(len({labels[i] for i in block}) == 1 for block in blocks)
    return [(labels[block[0]], block) for block in blocks]


def class_streams(batches, m, labels=LABELS):
    """Per class, its images in the order the batches visit them."""
    streams = {c: [] for c in sorted(set(labels))}
    for batch in batches:
        for c, block in visits(batch, m, labels):
            streams[c] += block
    return streams


def queue_chunks(stream, n, cycle):
    """stream cut into cycles of `cycle` images (None: one endless queue), each cycle into chunks of n."""
    cycles = [stream] if cycle is None else [stream[s:s + cycle] for s in range(0, len(stream), cycle)]
    return [part[k:k + n] for part in cycles for k in range(0, len(part), n)]


def is_queue_of(stream, members, cycle):
    """Each chunk of len(members) from a queue's start is distinct images of the class, a full one all of them."""
    return all(len(set(chunk)) == len(chunk) and set(chunk) <= set(members) and
               (len(chunk) < len(members) or sorted(chunk) == sorted(members))
               for chunk in queue_chunks(stream, len(members), cycle))


def shuffle(seed, key, domain, n):
    # the documented stream: the ranks of n raw draws of PCG64(SeedSequence([seed, *key], spawn_key=(domain,)))
    raw = np.random.PCG64(np.random.SeedSequence([seed, *key], spawn_key=(domain,))).random_raw(n)
    return sorted(range(n), key=lambda i: (int(raw[i]), i))


def rounds_reference(m, classes_per_batch, seed, n_batches, refill):
    """The authors' sampler as a state machine: take classes from shuffled rounds, and each visit's
    m images from the class's queue, refilled with its next shuffle when empty; with refill="cycle",
    every queue is emptied (leftovers dropped) at the start of each cycle of ceil(N / C / m) rounds."""
    cycle_rounds = math.ceil(len(LABELS) / len(MEMBERS) / m)
    round_number, round_left = -1, []
    batches = []
    for _ in range(n_batches):
        batch = []
        for _ in range(classes_per_batch):
            if not round_left:
                round_number += 1
                round_left = shuffle(seed, (round_number,), 1, len(MEMBERS))
                if round_number == 0 or (refill == "cycle" and round_number % cycle_rounds == 0):
                    queues, refills = [[] for _ in MEMBERS], [0] * len(MEMBERS)
            c = round_left.pop(0)
            for _ in range(m):
                if not queues[c]:
                    key, domain = (c, refills[c]), 2  # "empty": shuffle j of the endless queue
                    if refill == "cycle":  # shuffle j of the queue of cycle k
                        key, domain = (c, round_number // cycle_rounds, refills[c]), 3
                    queues[c] = [MEMBERS[c][k] for k in shuffle(seed, key, domain, len(MEMBERS[c]))]
                    refills[c] += 1
                batch.append(queues[c].pop(0))
        batches.append(batch)
    return batches


def independent_reference(m, classes_per_batch, seed, epoch, b):
    """The independent draws written out with Python ints (data.py's only order before the rounds)."""
    bits = np.random.PCG64(np.random.SeedSequence([seed, epoch, b]))

    def shuffled_prefix(pool, k):
        pool, raw = list(pool), [int(x) for x in bits.random_raw(k)]
        for i in range(k):
            j = i + raw[i] % (len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    indices = []
    for c in shuffled_prefix(range(len(MEMBERS)), classes_per_batch):
        if len(MEMBERS[c]) >= m:
            indices += shuffled_prefix(MEMBERS[c], m)
        else:
            indices += [MEMBERS[c][int(x) % len(MEMBERS[c])] for x in bits.random_raw(m)]
    return list(zip(indices, [int(x) >> 1 for x in bits.random_raw(len(indices))]))


@pytest.mark.parametrize("refill", ["cycle", "empty"])
@pytest.mark.parametrize("m, classes_per_batch, length, seed", [(4, 3, 5, 3), (1, 4, 6, 0), (2, 7, 3, 2**40)])
def test_rounds_equal_the_authors_state_machine(m, classes_per_batch, length, seed, refill):
    sampler = data.MPerClassSampler(LABELS, m, classes_per_batch, length, seed, refill=refill)
    batches = epochs_of(sampler, 8)
    expected = rounds_reference(m, classes_per_batch, seed, 8 * length, refill)
    assert [[i for i, _ in batch] for batch in batches] == expected


def test_rounds_visit_every_class_once_per_round_across_epochs():
    m, classes_per_batch = 2, 3  # 7 classes: most rounds end inside a batch
    batches = epochs_of(data.MPerClassSampler(LABELS, m, classes_per_batch, 7, seed=5), 6)
    sequence = [c for batch in batches for c, _ in visits(batch, m)]
    rounds = [sequence[k:k + 7] for k in range(0, len(sequence), 7)]
    assert len(rounds) == 18 and all(sorted(r) == list(range(7)) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 10  # each round is shuffled afresh
    # the documented straddle: some batch visits a class twice, and the rounds above still hold
    assert any(len({c for c, _ in visits(batch, m)}) < classes_per_batch for batch in batches)


GOLDEN_LABELS = np.repeat(np.arange(10), [3, 4, 5, 6, 7, 8, 9, 3, 5, 9]).tolist()  # tests/golden's classes


@pytest.mark.parametrize("refill", ["cycle", "empty"])
@pytest.mark.parametrize("m", [4, 2, 1])  # cycles of R = ceil(59 / 10 / m) = 2, 3 and 6 rounds
def test_rounds_queue_has_no_repeat_before_exhaustion_and_reshuffles(m, refill):
    # classes of 3 images are smaller than m = 4: their queues wrap within a visit
    labels, cycle = GOLDEN_LABELS, math.ceil(len(GOLDEN_LABELS) / 10 / m) * m  # images per class per cycle
    batches = epochs_of(data.MPerClassSampler(labels, m, 4, 7, seed=9, refill=refill), 9)  # 63 batches, 25 rounds
    streams = class_streams(batches, m, labels)
    members = {c: [i for i, label in enumerate(labels) if label == c] for c in streams}
    own, other = (cycle, None) if refill == "cycle" else (None, cycle)
    assert all(is_queue_of(streams[c], members[c], own) for c in streams)
    # the other discipline's chunks fail: "empty" continues a shuffle across a cycle start, "cycle" drops
    # its leftovers there (class sizes that do not divide the cycle's R·m images)
    assert not all(is_queue_of(streams[c], members[c], other) for c in streams)
    for c, stream in streams.items():  # each refill is a new shuffle, not the last one again
        assert len({tuple(chunk[:3]) for chunk in queue_chunks(stream, len(members[c]), own) if len(chunk) >= 3}) > 1


@pytest.mark.parametrize("refill", ["cycle", "empty"])
def test_rounds_batch_is_a_pure_function_of_seed_epoch_and_batch(refill):
    batches = epochs_of(data.MPerClassSampler(LABELS, 2, 3, 6, seed=4, refill=refill), 4)
    fresh = data.MPerClassSampler(LABELS, 2, 3, 6, seed=4, refill=refill)
    order = np.random.default_rng(0).permutation(24)
    assert all(fresh.batch(g // 6, g % 6) == batches[g] for g in order)
    # the classes and images depend on the global batch number g = epoch * length + b only
    other = data.MPerClassSampler(LABELS, 2, 3, 4, seed=4, refill=refill)
    for g in (0, 5, 13, 23):
        assert [i for i, _ in other.batch(g // 4, g % 4)] == [i for i, _ in batches[g]]
    # augmentation seeds: the batch's own stream PCG64(SeedSequence([seed, epoch, b]))
    raw = np.random.PCG64(np.random.SeedSequence([4, 2, 1])).random_raw(6)
    assert [s for _, s in batches[13]] == [int(x) >> 1 for x in raw]


@pytest.mark.parametrize("refill", ["cycle", "empty"])
def test_one_image_per_class_rounds(refill):
    sampler = data.MPerClassSampler(LABELS, m=1, classes_per_batch=7, length=12, seed=0, refill=refill)
    batches = list(sampler)
    assert all(sorted(LABELS[i] for i, _ in batch) == list(range(7)) for batch in batches)
    cycle = math.ceil(len(LABELS) / 7) if refill == "cycle" else None  # 6 images per class per cycle
    assert all(is_queue_of(stream, MEMBERS[c], cycle) for c, stream in class_streams(batches, 1).items())


@pytest.mark.parametrize("m, classes_per_batch, length, seed", [(4, 3, 6, 3), (1, 7, 4, 0), (6, 2, 5, 2**40)])
def test_independent_order_is_unchanged(m, classes_per_batch, length, seed):
    sampler = data.MPerClassSampler(LABELS, m, classes_per_batch, length, seed, order="independent")
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        assert list(sampler) == [independent_reference(m, classes_per_batch, seed, epoch, b) for b in range(length)]


def test_independent_batch_composition_and_without_replacement():
    sampler = data.MPerClassSampler(LABELS, m=4, classes_per_batch=3, length=200, seed=3, order="independent")
    small_classes_seen = set()
    for batch in sampler:
        assert len(batch) == 12
        indices = [i for i, _ in batch]
        for c in range(3):
            block = indices[4 * c: 4 * c + 4]
            classes = {LABELS[i] for i in block}
            assert len(classes) == 1
            if LABELS.count(classes.pop()) >= 4:
                assert len(set(block)) == 4  # distinct while the class has enough
            else:
                small_classes_seen.add(LABELS[block[0]])
        assert len({LABELS[i] for i in indices}) == 3
        assert len({s for _, s in batch}) == 12 and all(0 <= s < 2**63 for _, s in batch)
    assert small_classes_seen == {1, 5}  # the with-replacement path ran for both short classes


@pytest.mark.parametrize("order, refill", [("rounds", "cycle"), ("rounds", "empty"), ("independent", "cycle")])
def test_sampler_resumes_from_set_epoch_and_state_dict(order, refill):
    np.random.seed(1)
    first = data.MPerClassSampler(LABELS, 2, 4, 30, seed=11, order=order, refill=refill)
    epoch0 = list(first)
    np.random.seed(2)
    torch.manual_seed(2)
    second = data.MPerClassSampler(LABELS, 2, 4, 30, seed=11, order=order, refill=refill)
    assert list(second) == epoch0 and list(first) == epoch0
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0
    second.set_epoch(1, start=17)
    assert len(second) == 13 and list(second) == epoch1[17:]
    other = {"independent": "rounds", "rounds": "independent", "cycle": "empty", "empty": "cycle"}
    resumed = data.MPerClassSampler(LABELS, 2, 4, 30, seed=0, order=other[order], refill=other[refill])
    resumed.load_state_dict(json.loads(json.dumps(second.state_dict())))
    assert resumed.state_dict() == {"seed": 11, "epoch": 1, "start": 17, "order": order, "refill": refill}
    assert list(resumed) == epoch1[17:]
    assert list(data.MPerClassSampler(LABELS, 2, 4, 30, seed=12, order=order, refill=refill)) != epoch0


def _sampler(**changes):
    return data.MPerClassSampler(**{"labels": LABELS, "m": 1, "classes_per_batch": 7, "length": 20, "seed": 0,
                                    **changes})


def _refused_state():
    sampler = _sampler()
    try:
        sampler.load_state_dict({"seed": 0, "epoch": 0, "start": 0, "order": "shuffled", "refill": "cycle"})
    finally:
        assert sampler.state_dict()["order"] == "rounds"  # a refused state changes nothing


@pytest.mark.parametrize("call, pattern", [
    (lambda: data.build_dataset("mnist", "data", "train"), r"no split 'train' of 'mnist' \(known: \{'cub'"),
    (lambda: data.build_dataset("inshop", "data", "test"), r"no split 'test' of 'inshop'"),
    (lambda: data.build_dataset("cub", None, "train"), "or no root folder"),
    (lambda: data.RetrievalDataset(["a.jpg"], [0, 1], 2), r"2 labels but 1 paths or images"),
    (lambda: data.class_subset(data.RetrievalDataset(["a", "b"], [0, 1], 2, name="ab"), [1, 7]),
     r"2 classes asked of ab; not its labels: \[7\]"),
    (lambda: data.mlrc_folds(range(3), 4), r"n_folds=4 for 3 class ids \(3 distinct\)"),
    (lambda: data.mlrc_folds([5, 5, 6], 2), r"need distinct class ids.*\(2 distinct\)"),
    (lambda: _sampler(classes_per_batch=8), r"classes_per_batch <= 7 \(the classes in labels\), got m=1, length=20"),
    (lambda: _sampler(m=0), r"need m, length >= 1 .* got m=0"),
    (lambda: _sampler(order="random"), r"order in \('rounds', 'independent'\) and refill in \('cycle', 'empty'\), "
                                        r"got 0, 'random', 'cycle'"),
    (lambda: _sampler(refill="never"), r"refill in \('cycle', 'empty'\), got 0, 'rounds', 'never'"),
    (lambda: _sampler().set_epoch(0, 21), r"0 <= start <= 20; got 0, 21"),
    (_refused_state, r"order in \('rounds', 'independent'\) .*, got 0, 'shuffled', 'cycle'"),
    (lambda: data.build_transform("vgg", train=True), r"unknown style 'vgg', expected bninception, resnet or digits"),
], ids=["dataset", "split", "root", "dataset-lengths", "subset", "folds", "fold-ids", "classes-per-batch", "m",
        "order", "refill", "start", "state", "style"])
def test_bad_arguments_are_one_line_value_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("order", ["rounds", "independent"])
def test_sampler_covers_classes_uniformly(order):
    counts, first_of_round = np.zeros(7), np.zeros(7)
    for g, batch in enumerate(data.MPerClassSampler(LABELS, 1, 2, 3500, seed=5, order=order)):
        for i, _ in batch:
            counts[LABELS[i]] += 1
        if g % 7 == 0:  # in rounds order, slot 2g is the first of round 2g / 7
            first_of_round[LABELS[batch[0][0]]] += 1
    if order == "rounds":  # 3,500 batches of 2 visits = 1,000 whole rounds: exact counts
        assert (counts == 1000).all()
        assert np.abs(first_of_round / 500 - 1 / 7).max() < 0.06  # 500 rounds: sd of each share ~0.016
    else:  # 7,000 draws: sd of each share ~0.004
        assert np.abs(counts / counts.sum() - 1 / 7).max() < 0.02


# ----------------------------------------------------------------------------- transforms


def test_seeded_augmentation_is_repeatable_and_leaves_global_rng_alone(cub_root):
    root, _ = cub_root
    dataset = build("cub", root, "train", data.build_transform("bninception", train=True, crop_size=12, resize=14))
    state = torch.get_rng_state()
    a, b = dataset[(0, 123)][0], dataset[(0, 123)][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and a.shape == (3, 12, 12)
    assert len({dataset[(0, s)][0].sum().item() for s in range(10)}) > 1  # seeds do change the crop


def test_seeded_augmentation_same_in_dataloader_workers(cub_root):
    root, _ = cub_root
    dataset = build("cub", root, "train", data.build_transform("resnet", train=True, crop_size=10, resize=12))
    sampler = data.MPerClassSampler(dataset.labels, m=2, classes_per_batch=2, length=3, seed=7)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    for batch, (images, labels) in zip(sampler, loader):
        expected = torch.stack([dataset[key][0] for key in batch])
        assert torch.equal(images, expected)
        assert labels.tolist() == [dataset.labels[i] for i, _ in batch]


@pytest.mark.parametrize("style", ["bninception", "resnet"])
def test_decoded_keeps_uint8_crops_and_gives_the_same_items(cub_root, style):
    # the evaluation transform's first stage done once (the reference: the dataset decoding every time)
    root, _ = cub_root
    dataset = build("cub", root, "test", data.build_transform(style, train=False, crop_size=12, resize=14))
    cached = data.decoded(dataset, workers=0, batch_size=3)  # batches that do not divide the split
    assert cached.images.dtype == torch.uint8 and cached.images.shape == (len(dataset), 3, 12, 12)
    assert cached.labels == dataset.labels and dataset.images is None
    for i in range(len(dataset)):
        mine, theirs = cached[i], dataset[i]
        assert torch.equal(mine[0], theirs[0]) and mine[0].dtype == theirs[0].dtype and mine[1] == theirs[1]
    digits = data.build_dataset("digits", None, "test")
    assert data.decoded(digits) is digits  # already in memory


def test_with_transform_is_a_shallow_copy():
    dataset = data.build_dataset("digits", None, "train")
    shifted = dataset.with_transform(data.build_transform("digits", train=True))
    assert dataset.transform is None and shifted.labels is dataset.labels
    assert torch.equal(dataset[(4, 9)][0], dataset[4][0])


def test_bninception_and_resnet_pixel_conventions():
    rgb = (200, 50, 10)
    image = Image.new("RGB", (40, 30), rgb)
    bgr = data.build_transform("bninception", train=False, crop_size=20, resize=24)(image)
    assert bgr.shape == (3, 20, 20)
    for channel, value in enumerate([rgb[2] - 104, rgb[1] - 117, rgb[0] - 128]):
        assert torch.allclose(bgr[channel], torch.full((20, 20), float(value)), atol=1e-4)
    normalised = data.build_transform("resnet", train=True, crop_size=16, resize=24)(image)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for channel in range(3):
        expected = (rgb[channel] / 255 - mean[channel]) / std[channel]
        assert torch.allclose(normalised[channel], torch.full((16, 16), expected), atol=1e-4)


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    # left half black, right half white: after resize and centre crop the boundary stays central
    pixels = np.zeros((60, 120, 3), dtype=np.uint8)
    pixels[:, 60:] = 255
    out = data.build_transform("resnet", train=False, crop_size=20, resize=30)(Image.fromarray(pixels))
    assert out.shape == (3, 20, 20)
    assert (out[:, :, :9] < 0).all() and (out[:, :, 11:] > 0).all()


def test_digits_train_shift_is_one_of_the_nine_shifts():
    image = torch.arange(64, dtype=torch.float32).view(1, 8, 8) + 1
    shift = data.build_transform("digits", train=True)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = shift(image)
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                reference = torch.zeros_like(image)
                for y in range(8):
                    for x in range(8):
                        if 0 <= y + dy < 8 and 0 <= x + dx < 8:
                            reference[0, y, x] = image[0, y + dy, x + dx]
                if torch.equal(out, reference):
                    matches.append((dy, dx))
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 9
    assert data.build_transform("digits", train=False)(image) is image


# ----------------------------------------------------------------------------- download, extract, check


def md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


class RangeServer:
    """A bounded HTTP server on 127.0.0.1 serving one payload, honouring Range unless told not to."""

    def __init__(self, payload: bytes, honour_range: bool = True):
        outer = self
        self.ranges = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                header = self.headers.get("Range")
                outer.ranges.append(header)
                start = int(header[6:-1]) if header and honour_range else 0
                body = payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/archive.tgz"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_download_resumes_with_range_and_checks_md5(tmp_path, honour_range):
    payload = np.random.default_rng(0).bytes(300_000)
    dest = tmp_path / "archive.tgz"
    (tmp_path / "archive.tgz.part").write_bytes(payload[:123_456])
    with RangeServer(payload, honour_range) as server:
        assert data.download(server.url, dest, md5(payload), timeout=10) == dest
    assert server.ranges == ["bytes=123456-"]
    assert dest.read_bytes() == payload and not (tmp_path / "archive.tgz.part").exists()


def test_download_md5_mismatch_deletes_the_partial_file(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc" * 1000)
    dest = tmp_path / "out" / "archive.zip"
    with pytest.raises(ValueError, match=f"MD5 of {source.as_uri()} is {md5(b'abc' * 1000)}, expected 0+"):
        data.download(source.as_uri(), dest, "0" * 32)
    assert not dest.exists() and not (tmp_path / "out" / "archive.zip.part").exists()
    assert data.download(source.as_uri(), dest, md5(b"abc" * 1000)).read_bytes() == b"abc" * 1000
    with pytest.raises(ValueError, match=f"{dest} exists but its MD5 is not 0+; delete it"):  # kept, not fetched
        data.download(source.as_uri(), dest, "0" * 32)
    assert dest.read_bytes() == b"abc" * 1000


def test_extract_refuses_path_traversal(tmp_path):
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tf:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("ok/../../evil.txt", b"evil")
    for archive in (tar_path, zip_path):
        with pytest.raises(ValueError, match="would be written outside"):
            data.extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def make_sop(root):
    base = root / "Stanford_Online_Products"
    for split, first_class in (("train", 1), ("test", 11319)):
        lines = ["image_id class_id super_class_id path"]
        for k in range(4):
            image_id, class_id = k + first_class, first_class + k // 2
            relative = f"mug_final/{class_id}_{image_id}.JPG"
            write_image(base / relative, seed=image_id)
            lines.append(f"{image_id} {class_id} 8 {relative}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def _archive(name, source, tmp_path):
    """The benchmark's archive (tar for cub, zip for sop) of a tiny copy made under source."""
    if name == "cub":
        make_cub(source)
        archive = tmp_path / "CUB_200_2011.tgz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(source / "CUB_200_2011", arcname="CUB_200_2011")
    else:
        base = make_sop(source)
        archive = tmp_path / "Stanford_Online_Products.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(base.rglob("*")):
                zf.write(path, path.relative_to(source).as_posix())
    return archive


@pytest.mark.parametrize("name, inner", [("cub", "CUB_200_2011"), ("sop", "Stanford_Online_Products")])
def test_an_interrupted_extraction_is_refused_until_download_extracts_again(tmp_path, monkeypatch, capsys, name,
                                                                           inner):
    archive = _archive(name, tmp_path / "source", tmp_path)
    written = []

    def killed_after_three(original):  # the process dies (kill -9) after 3 files: nothing after it runs
        def write(self, *args, **kwargs):
            if len(written) == 3:
                raise RuntimeError("simulated kill -9")
            written.append(args[0])
            return original(self, *args, **kwargs)
        return write

    if name == "cub":  # TarFile.makefile writes each file of a tar, ZipFile.open reads each one of a zip
        monkeypatch.setattr(tarfile.TarFile, "makefile", killed_after_three(tarfile.TarFile.makefile))
    else:
        monkeypatch.setattr(zipfile.ZipFile, "open", killed_after_three(zipfile.ZipFile.open))
    target = tmp_path / "target"
    digest = md5(archive.read_bytes())
    with pytest.raises(RuntimeError, match="simulated kill"):
        data.download_dataset(name, target, archive.as_uri(), digest)
    monkeypatch.undo()
    marker = target / f".extracting-{archive.name}"  # data.extracting_marker(target, archive.name)
    assert marker.is_file() and len(written) == 3
    for root in (target, target / inner):  # the root the archive went into, or its inner folder
        for split in ("train", "test"):
            with pytest.raises(ValueError) as caught:
                data.build_dataset(name, root, split)
            assert str(caught.value) == (
                f"{name}: the extraction of {archive.name} into {target} did not finish (interrupted, or still "
                f"running: {marker} is there); run `python data.py download {name} --root {target}` again, which "
                f"extracts it again")
    assert data.main(["check", name, "--root", str(target)]) == 1
    assert f"PROBLEM: {name}: the extraction of {archive.name} into {target} did not finish" in capsys.readouterr().out
    # running download again re-extracts the (already verified) archive; a complete extraction leaves no marker
    assert data.main(["download", name, "--root", str(target), "--url", archive.as_uri(), "--md5", digest]) == 1
    out = capsys.readouterr().out
    assert out.count("PROBLEM:") == 2 and out.count(COUNT_WARNING) == 2  # only the tiny copy's counts
    assert not list(target.glob(".extracting-*"))
    assert len(build(name, target, "train")) == (5 if name == "cub" else 4)


def test_download_extract_and_check_cli(cub_root, tmp_path, capsys):
    source_root, truth = cub_root
    bad = next(p for p, c in truth.items() if c == 200)
    write_image(Path(bad), "corrupt")
    archive = tmp_path / "served" / "CUB_200_2011.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source_root / "CUB_200_2011", arcname="CUB_200_2011")
    target = tmp_path / "target"
    digest = md5(archive.read_bytes())
    code = data.main(["download", "cub", "--root", str(target), "--url", archive.as_uri(), "--md5", digest])
    out = capsys.readouterr().out
    assert code == 1  # the corrupt file and the counts are problems
    assert "cub train: 5 images, 3 classes" in out and "cub test: 3 images, 2 classes" in out
    assert f"cannot decode image {target / 'CUB_200_2011' / Path(bad).relative_to(source_root / 'CUB_200_2011')}" in out
    assert out.count("PROBLEM:") == 3  # two count warnings and one unreadable image
    assert (target / "CUB_200_2011.tgz").is_file()
    assert data.main(["check", "digits"]) == 0


def test_manual_steps_for_cars_and_inshop(tmp_path, capsys):
    assert data.main(["download", "cars", "--root", str(tmp_path)]) == 1
    assert "cars_annos.mat" in capsys.readouterr().out
    assert data.main(["download", "inshop", "--root", str(tmp_path)]) == 1
    assert "list_eval_partition.txt" in capsys.readouterr().out


@pytest.mark.parametrize("failure", [urllib.error.URLError("no network"), ValueError("MD5 mismatch: expected 97ec…")])
def test_download_failures_are_one_line_errors(monkeypatch, capsys, tmp_path, failure):
    def failing(*args, **kwargs):
        raise failure

    monkeypatch.setattr(data, "download_dataset", failing)
    assert data.main(["download", "cub", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(failure.args[0]) in err
    if isinstance(failure, urllib.error.URLError):  # offline: the by-hand route, with what to put where
        assert all(s in err for s in ("CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78", str(tmp_path), "GB"))


def test_a_missing_dataset_names_both_routes(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        data.build_dataset("sop", tmp_path, "train")
    message = str(caught.value)
    assert f"python data.py download sop --root {tmp_path}" in message
    assert "Stanford_Online_Products.zip" in message and "7f73d41a2f44250d4779881525aea32e" in message


# ----------------------------------------------------------------------------- your own images (folder)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}  # the formats these tests write


def save_image(path: Path, kind: str, seed: int = 0, size=(20, 12)) -> np.ndarray:
    """An image file of `kind` (png, jpeg, bmp, gif: 4-colour palette, rgba, gray, gray16); the RGB pixels
    load_image must return (exact for the lossless kinds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if kind == "gif":  # 4 colours: a GIF stores them exactly
        colours = rng.integers(0, 256, (4, 3), dtype=np.uint8)
        rgb = colours[rng.integers(0, 4, (size[1], size[0]))]
        Image.fromarray(rgb).quantize(4).save(path, "GIF")
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)])).save(path, "PNG")
    elif kind == "gray":
        Image.fromarray(rgb[..., 0]).save(path, "PNG")
        rgb = np.repeat(rgb[..., :1], 3, axis=2)
    elif kind == "gray16":
        grey = rng.integers(0, 65536, rgb.shape[:2], dtype=np.uint16)
        Image.fromarray(grey).save(path, "PNG")
        rgb = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
    else:
        Image.fromarray(rgb).save(path, {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP"}[kind])
    return rgb


# {class folder: [(path inside it, kind)]}; sorted by name: Zebra, a.b c, apple, b | cat, dog, Ünïcødé 猫, ß
FOLDER_CLASSES = {
    "a.b c": [("x.png", "png"), ("sub/deeper/y.JPG", "jpeg"), ("sub/z.bmp", "bmp")],
    "Ünïcødé 猫": [("1.gif", "gif"), ("2.png", "rgba")],
    "Zebra": [("g.png", "gray"), ("h.jpeg", "jpeg")],
    "apple": [("p.PNG", "png"), ("q.gif", "gif")],
    "b": [("0.bmp", "bmp"), ("1.png", "gray")],
    "cat": [("c.png", "png")],
    "dog": [("nested/d.png", "rgba"), ("e.jpg", "jpeg")],
    "ß": [("s.png", "png"), ("t.png", "png")],
}


def make_folder(root: Path, classes=FOLDER_CLASSES) -> dict[str, np.ndarray]:
    """Class folders with nested subfolders, mixed formats, and files that must be skipped; {path: RGB}."""
    written = {}
    for seed, (name, files) in enumerate(classes.items()):
        for k, (relative, kind) in enumerate(files):
            written[str(root / name / relative)] = save_image(root / name / relative, kind, seed=10 * seed + k)
        save_image(root / name / ".hidden.png", "png")  # hidden file
        save_image(root / name / ".cache" / "thumb.png", "png")  # hidden folder
        (root / name / "._x.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource file
        (root / name / "notes.txt").write_text("not an image")
    save_image(root / ".git" / "icon.png", "png")
    save_image(root / "__MACOSX" / "cat" / "c.png", "png")
    return written


def independent_listing(folder: Path) -> list[tuple[str, str]]:
    """(relative POSIX path, class folder) of every image file, by this test's own rules, sorted by path."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts)]
    return sorted((p.relative_to(folder).as_posix(), p.relative_to(folder).parts[0]) for p in files)


def no_count_warning(name, root, split, transform=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder dataset has no expected counts: nothing to warn about
        return data.build_dataset(name, root, split, transform)


@pytest.mark.parametrize("split", ["train", "test"])
def test_folder_lists_split_and_labels_like_an_independent_walk(tmp_path, split):
    make_folder(tmp_path)
    listing = independent_listing(tmp_path)
    names = sorted({name for _, name in listing})
    assert names == ["Zebra", "a.b c", "apple", "b", "cat", "dog", "Ünïcødé 猫", "ß"]  # code point order
    side = names[:4] if split == "train" else names[4:]  # the first half (rounded up) trains
    dataset = no_count_warning("folder", tmp_path, split)
    expected = [(path, side.index(name)) for path, name in listing if name in side]
    assert dataset.paths == [str(tmp_path / path) for path, _ in expected]
    assert dataset.labels == [label for _, label in expected]
    assert dataset.class_names == side and dataset.num_classes == len(side)
    assert len(dataset) == sum(len(FOLDER_CLASSES[name]) for name in side)


def test_folder_reads_every_format_as_rgb(tmp_path):
    written = make_folder(tmp_path)
    for split in ("train", "test"):
        dataset = no_count_warning("folder", tmp_path, split)
        for index, path in enumerate(dataset.paths):
            image, label = dataset[index]
            assert image.mode == "RGB" and image.size == (20, 12) and label == dataset.labels[index]
            if not path.lower().endswith((".jpg", ".jpeg")):  # lossless: exactly the pixels written
                assert np.array_equal(np.asarray(image), written[path]), path


def test_sixteen_bit_grey_keeps_its_high_byte(tmp_path):
    expected = save_image(tmp_path / "deep.png", "gray16")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    assert np.array_equal(np.asarray(data.load_image(tmp_path / "deep.png")), expected)


def test_folder_train_and_test_folders_are_the_split(tmp_path):
    make_folder(tmp_path / "train", {"b": FOLDER_CLASSES["b"], "a": FOLDER_CLASSES["apple"]})
    make_folder(tmp_path / "test", {"z": FOLDER_CLASSES["cat"], "y": FOLDER_CLASSES["dog"]})  # 1 image: fine
    for split, names in (("train", ["a", "b"]), ("test", ["y", "z"])):
        dataset = no_count_warning("folder", tmp_path, split)
        listing = independent_listing(tmp_path / split)
        assert dataset.paths == [str(tmp_path / split / path) for path, _ in listing]
        assert dataset.labels == [names.index(name) for _, name in listing] and dataset.class_names == names


def test_folder_class_names_are_composed_unicode(tmp_path):
    decomposed = unicodedata.normalize("NFD", "é")  # as macOS may store it: e + combining accent
    make_folder(tmp_path, {"d": FOLDER_CLASSES["b"], decomposed: FOLDER_CLASSES["b"], "f": FOLDER_CLASSES["b"],
                           "g": FOLDER_CLASSES["b"]})
    train = no_count_warning("folder", tmp_path, "train")
    test = no_count_warning("folder", tmp_path, "test")
    assert train.class_names == ["d", "f"] and test.class_names == ["g", "é"]  # é (U+00E9) sorts after g
    assert all(Path(path).is_file() for path in test.paths)  # the paths are the files' own names


def test_folder_subsets_keep_their_class_names(tmp_path):
    make_folder(tmp_path)
    train = no_count_warning("folder", tmp_path, "train")
    fit, val = data.mlrc_folds(range(train.num_classes), 2)[1]
    subset = data.class_subset(train, val)
    assert subset.class_names == [train.class_names[c] for c in val]
    assert [subset.class_names[label] for label in subset.labels] == \
        [train.class_names[label] for label in train.labels if label in val]


def _classes(root, counts):
    for name, count in counts.items():
        for k in range(count):
            save_image(root / name / f"{k}.png", "png", seed=k)


@pytest.mark.parametrize("make, pattern", [
    (lambda root: None,
     r"root folder .*nowhere does not exist; set dataset.root \(data.py: --root\) to the folder that holds one"),
    (lambda root: root.mkdir(), r"nowhere holds neither image files nor class folders"),
    (lambda root: (_classes(root, dict.fromkeys("abcd", 2)), save_image(root / "loose.jpg", "jpeg")),
     r"folder: .*nowhere holds images itself \(loose.jpg\); expected one folder per class"),
    (lambda root: (_classes(root, dict.fromkeys("abcd", 2)), (root / "e").mkdir(), (root / "e" / "a.txt").touch()),
     r"class folder .*nowhere/e holds no image files"),
    (lambda root: _classes(root, dict.fromkeys("abc", 2)), r"test split of .*nowhere has 1 class\(es\), at least 2"),
    (lambda root: _classes(root, {"a": 2, "b b": 1, "c": 1, "d": 1}),
     r"class folder .*nowhere/b b holds 1 image\(s\); a training class needs at least 2, a positive pair$"),
    (lambda root: _classes(root, {"train/a": 2, "train/b": 2, "test/c": 1, "test/d": 1, "val/e": 1}),
     r"holds train/ and test/ beside other entries \(val/\)"),
    (lambda root: (_classes(root, {"train/a": 2, "train/b": 2, "test/c": 1, "test/d": 1}),
                   save_image(root / "stray.png", "png")),
     r"holds train/ and test/ beside other entries \(stray.png\)"),
    (lambda root: _classes(root, {"train/a": 2, "train/b": 2, "test/b": 1, "test/d": 1}),
     r"class 'b' is in both .*nowhere/train and .*nowhere/test"),
    (lambda root: _classes(root, {"train": 2, "test/c": 1, "test/d": 1}),
     r"nowhere/train holds images itself \(0.png\)"),
    (lambda root: _classes(root, {"a": 2, "b": 2, "\u00e9": 2, "e\u0301": 2}),  # é composed and decomposed
     r"nowhere: two class folders are named 'é' \(in different Unicode forms\)"),
], ids=["missing", "empty", "loose-image", "empty-class", "one-test-class", "small-train-class", "other-folders",
        "image-beside-the-sides", "class-on-both-sides", "split-without-classes", "one-name-twice"])
def test_folder_refusals_are_one_line_errors_before_training(tmp_path, make, pattern):
    root = tmp_path / "nowhere"
    make(root)
    with pytest.raises((FileNotFoundError, ValueError), match=pattern) as caught:
        data.build_dataset("folder", root, "train")
    assert "\n" not in str(caught.value)


def test_a_small_training_class_names_how_many_are_small(tmp_path):
    _classes(tmp_path, {"a": 1, "b": 1, "c": 1, "d": 1})
    with pytest.raises(ValueError, match=r"/a holds 1 image\(s\).*\(2 training classes have fewer than 2\)"):
        data.build_dataset("folder", tmp_path, "train")
    assert len(no_count_warning("folder", tmp_path, "test")) == 2  # a test class may hold one image


def test_digit_files_read_back_as_the_digits_17_grey_levels(tmp_path):
    levels = np.arange(64).reshape(8, 8) % 17  # every level 0..16
    Image.fromarray(np.rint(levels * 255 / 16).astype(np.uint8)).save(tmp_path / "digit.png")
    assert torch.equal(data.load_digits_image(tmp_path / "digit.png"),
                       torch.tensor(levels / 16.0, dtype=torch.float32).unsqueeze(0))
    save_image(tmp_path / "big.png", "png", size=(9, 8))
    with pytest.raises(ValueError, match=r"big.png: 9×8 pixels; a model trained on digits takes 8×8"):
        data.load_digits_image(tmp_path / "big.png")


def test_folder_check_and_download_cli(tmp_path, capsys):
    make_folder(tmp_path / "mine")
    assert data.main(["check", "folder", "--root", str(tmp_path / "mine")]) == 0
    out = capsys.readouterr().out
    assert "folder train: 9 images, 4 classes" in out and "folder test: 7 images, 4 classes" in out
    assert data.main(["download", "folder", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to download" in err and "data.py check folder" in err


def test_folder_ms_refuses_the_digits_transform():
    import train

    with pytest.raises(ValueError, match="data.transform: digits takes the bundled digits"):
        train.load_config(Path(__file__).parents[1] / "configs" / "folder_ms.yaml", ["data.transform=digits"])


def test_folder_ms_trains_on_a_folder_end_to_end(tmp_path, capsys):
    import train

    root = tmp_path / "my images"
    for c, name in enumerate(["Ünïcødé 猫", "a.b c", "cat", "dog", "eel", "fox", "gnu", "hen"]):
        for k in range(4):  # 4 images a class, two of them in a subfolder; each class its own brightness
            pixels = (np.random.default_rng(10 * c + k).random((20, 24, 3)) * 60 + c * 25).astype(np.uint8)
            (root / name / "sub").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name / ("sub" if k % 2 else "") / f"{k}.png")
    overrides = [f"dataset.root={root}", f"run_dir={tmp_path / 'run'}", "device=cpu", "folds=2", "fold=1",
                 "model.backbone=tiny_cnn", "model.pretrained=null", "model.embedding_dim=16",
                 "model.freeze_bn=false", "model.backbone_kwargs={in_channels: 3}", "data.transform=resnet",
                 "data.crop_size=16", "data.resize=18", "data.classes_per_batch=2", "data.samples_per_class=2",
                 "data.num_workers=0", "ccp.proxies_per_class=2", "ccp.pool_size=3", "train.max_steps=4",
                 "train.eval_every=2", "train.lr=0.001", "train.log_every_seconds=1000"]
    config = Path(__file__).parents[1] / "configs" / "folder_ms.yaml"
    assert train.main([str(config), *overrides]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["models"][0]["test"]["MAP@R"] <= 1.0 and results["models"][0]["steps"] == 4
    assert capsys.readouterr().out.startswith(f"MS-CCP on your images in {root}, fold 1 of 2")  # not "on sop"
