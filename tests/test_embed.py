"""Tests for embed.py, end to end on scikit-learn's digits written as PNG files: the embeddings equal the
run's own normalised test embeddings of the same images, a fold run gives n(concat(n(f_1), ...)), the
neighbours equal a brute-force search, and bad input is one line before any work."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import embed
import train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_ccp.yaml"


def l2(x: np.ndarray) -> np.ndarray:
    """n(x) = x / ||x|| per row (normalization: l2), in float64."""
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """8 test digits of each class 6-9 as 8-bit grey PNGs <digit>/<row>.png (grey level v of 0..16 saved as
    round(255 v / 16)); {relative path: the image's row in the digits test split}."""
    digits = load_digits()
    test_rows = np.flatnonzero(digits.target >= 6)  # the digits test split, in its order (data.py)
    root = tmp_path_factory.mktemp("digits") / "gallery"
    rows = {}
    for digit in (6, 7, 8, 9):
        (root / str(digit)).mkdir(parents=True)
        for row in np.flatnonzero(digits.target[test_rows] == digit)[:8]:
            grey = np.rint(digits.images[test_rows[row]] * 255 / 16).astype(np.uint8)
            Image.fromarray(grey).save(root / str(digit) / f"{row:03d}.png")
            rows[f"{digit}/{row:03d}.png"] = int(row)
    return root, rows


def test_embeddings_equal_the_runs_own_test_embeddings(digits_run, gallery, tmp_path, capsys):
    root, rows = gallery
    assert embed.main([str(digits_run), str(root), "--out", str(tmp_path / "e.npz"), "--device", "cpu"]) == 0
    assert "32 images" in capsys.readouterr().out
    got = np.load(tmp_path / "e.npz")
    saved = np.load(digits_run / "embeddings.npz")  # the run's n(f(x)) of its test split (evaluation.save_embeddings)
    assert got["paths"].tolist() == sorted(rows)
    order = [rows[path] for path in got["paths"]]
    assert got["embeddings"].dtype == np.float32 and got["embeddings"].shape == (32, 32)
    # the same pixels (load_digits_image) through the same network; other batches may change the last bits
    np.testing.assert_allclose(got["embeddings"], saved["test_embeddings"][order], rtol=0, atol=1e-6)
    assert got["labels"].tolist() == saved["test_labels"][order].tolist()  # folders 6..9 -> 0..3, as the split
    assert got["class_names"].tolist() == ["6", "7", "8", "9"]


def test_query_neighbours_equal_a_brute_force_search(digits_run, gallery, tmp_path, capsys):
    root, rows = gallery
    queries = {"a.png": "7/" + min(p for p in rows if p.startswith("7/"))[2:], "b.png": sorted(rows)[-1]}
    (tmp_path / "queries").mkdir()
    for name, source in queries.items():
        shutil.copy(root / source, tmp_path / "queries" / name)
    out = tmp_path / "neighbours.json"
    args = [str(digits_run / "best.pt"), str(root), "--query", str(tmp_path / "queries"), "--k", "5", "--out", str(out)]
    assert embed.main([*args, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    saved = np.load(digits_run / "embeddings.npz")["test_embeddings"].astype(np.float64)
    paths = sorted(rows)
    gallery_embeddings = saved[[rows[p] for p in paths]]
    assert [entry["query"] for entry in report["queries"]] == ["a.png", "b.png"] and report["k"] == 5
    for entry in report["queries"]:
        distances = np.linalg.norm(gallery_embeddings - saved[rows[queries[entry["query"]]]], axis=1)
        nearest = np.sort(distances)[:5]
        got = [(hit["path"], hit["distance"], hit["class"]) for hit in entry["neighbours"]]
        np.testing.assert_allclose([d for _, d, _ in got], nearest, atol=1e-5)  # the 5 smallest distances ...
        np.testing.assert_allclose([distances[paths.index(p)] for p, _, _ in got], nearest, atol=1e-5)  # ... theirs
        assert got[0][0] == queries[entry["query"]] and got[0][1] < 1e-6  # in the gallery: not excluded
        assert all(c == p.split("/")[0] for p, _, c in got)  # the gallery's class folder
        assert f"query {entry['query']}" in printed and all(p in printed for p, _, _ in got)
    # one image file as the query; an unlabelled folder embeds without labels
    assert embed.main([*args[:3], str(tmp_path / "queries" / "b.png"), "--k", "40", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("distance") == 32  # k is at most the gallery's size
    assert embed.main([args[0], str(tmp_path / "queries"), "--out", str(tmp_path / "q.npz"), "--device", "cpu"]) == 0
    assert sorted(np.load(tmp_path / "q.npz").files) == ["embeddings", "paths"]


def test_a_fold_run_embeds_the_ensemble_of_its_fold_models(gallery, tmp_path, capsys):
    root, rows = gallery
    run = tmp_path / "run"
    # n = l2: the raw embeddings of these short runs lie inside the unit ball, where n(x) = x / max(1, ||x||)
    # would change nothing and the test could not tell whether n was applied
    assert train.main([str(DIGITS), f"run_dir={run}", "fold=null", "train.max_steps=2", "train.eval_every=2",
                       "normalization=l2", "evaluation.save_embeddings=true", "evaluation.nmi=false",
                       "train.log_every_seconds=1000"]) == 0
    assert embed.main([str(run), str(root), "--out", str(tmp_path / "e.npz"), "--device", "cpu"]) == 0
    assert "ensemble of the 3 models" in capsys.readouterr().out
    order = [rows[p] for p in sorted(rows)]
    parts = [np.load(run / f"fold{k}" / "embeddings.npz")["test_embeddings"][order] for k in range(3)]  # n(f_k)
    got = np.load(tmp_path / "e.npz")["embeddings"]
    assert got.shape == (32, 3 * 32)
    np.testing.assert_allclose(got, l2(np.concatenate([l2(p) for p in parts], axis=1)), atol=1e-6)
    # a checkpoint file: that one model
    assert embed.main([str(run / "fold1" / "best.pt"), str(root), "--out", str(tmp_path / "one.npz")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "one.npz")["embeddings"], parts[1], atol=1e-6)
    # an existing --out is refused, whatever it is: here the checkpoint being read
    assert embed.main([str(run / "fold1" / "best.pt"), str(root), "--out", str(run / "fold1" / "best.pt")]) == 1
    assert f"--out {run / 'fold1' / 'best.pt'}: exists; name a new file" in capsys.readouterr().err
    assert torch.load(run / "fold1" / "best.pt", weights_only=False)["fold"] == 1  # untouched
    # a folder that is not the run's own (its models are not where the config puts them) is refused
    (tmp_path / "part" / "seed7" / "fold0").mkdir(parents=True)
    shutil.copy(run / "fold0" / "best.pt", tmp_path / "part" / "seed7" / "fold0")
    assert embed.main([str(tmp_path / "part"), str(root), "--out", str(tmp_path / "x.npz")]) == 1
    assert "part: not a whole run's folder: its config trains fold0/best.pt ... (3 models)" in capsys.readouterr().err
    # a run that lacks one of its models is refused
    (run / "fold2" / "best.pt").unlink()
    assert embed.main([str(run), str(root), "--out", str(tmp_path / "x.npz")]) == 1
    assert "fold2/best.pt is missing (1 of the run's 3 models" in capsys.readouterr().err


def test_a_folder_run_embeds_its_test_images_as_its_own_test(tmp_path):
    """Files through load_image and the resnet eval transform: embed.py on DIR/test equals the run's test."""
    root = tmp_path / "images"
    for c, name in enumerate(["a", "b", "c", "d", "Ünïcødé 猫", "f", "g h", "i"]):
        side = "train" if c < 4 else "test"
        for k in range(3):  # RGB and grey JPEGs and PNGs of several sizes, one in a subfolder
            pixels = (np.random.default_rng(10 * c + k).random((20 + k, 24, 3)) * 60 + c * 25).astype(np.uint8)
            path = root / side / name / ("sub" if k == 2 else "") / f"{k}.{'png' if k else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels if k != 1 else pixels[..., 0]).save(path)
    run = tmp_path / "run"
    assert train.main([str(ROOT / "configs" / "folder_ms.yaml"), f"dataset.root={root}", f"run_dir={run}",
                       "device=cpu", "folds=2", "fold=0", "normalization=l2", "model.backbone=tiny_cnn",
                       "model.pretrained=null", "model.embedding_dim=8", "model.freeze_bn=false",
                       "model.backbone_kwargs={in_channels: 3}", "data.transform=resnet", "data.crop_size=16",
                       "data.resize=18", "data.classes_per_batch=2", "data.samples_per_class=2", "data.num_workers=0",
                       "ccp.proxies_per_class=2", "ccp.pool_size=3", "train.max_steps=2", "train.eval_every=2",
                       "train.log_every_seconds=1000", "evaluation.save_embeddings=true"]) == 0
    assert embed.main([str(run), str(root / "test"), "--out", str(tmp_path / "e.npz"), "--device", "cpu"]) == 0
    got, saved = np.load(tmp_path / "e.npz"), np.load(run / "embeddings.npz")
    np.testing.assert_allclose(got["embeddings"], saved["test_embeddings"], rtol=0, atol=1e-6)  # the same order
    assert got["labels"].tolist() == saved["test_labels"].tolist()
    assert got["class_names"].tolist() == ["f", "g h", "i", "Ünïcødé 猫"]
    assert got["paths"][-1] == "Ünïcødé 猫/sub/2.png"


def test_run_directories_are_read_in_order_of_seed_then_fold(tmp_path):
    for folder in ("seed10/fold0", "seed2/fold1", "seed2/fold0", "seed10/fold1", "seed2/fold10", "seed2/fold2"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "best.pt").touch()
    found = [p.parent.relative_to(tmp_path).as_posix() for p in embed.find_checkpoints(tmp_path)]
    assert found == ["seed2/fold0", "seed2/fold1", "seed2/fold2", "seed2/fold10", "seed10/fold0", "seed10/fold1"]


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere", "{gallery}", "--out", "{tmp}/x.npz"], "nowhere: no such run directory or checkpoint file"),
    (["{tmp}", "{gallery}", "--out", "{tmp}/x.npz"], "holds no best.pt, fold*/best.pt or seed*/fold*/best.pt"),
    (["{tmp}/broken.pt", "{gallery}", "--out", "{tmp}/x.npz"], "cannot read checkpoint"),
    (["{run}", "{tmp}/nowhere", "--out", "{tmp}/x.npz"], "IMAGE_DIR {tmp}/nowhere: no such folder"),
    (["{run}", "{tmp}/empty", "--out", "{tmp}/x.npz"], "holds neither image files nor class folders"),
    (["{run}", "{tmp}/classes", "--out", "{tmp}/x.npz"], "class folder {tmp}/classes/b holds no image files"),
    (["{run}", "{gallery}"], "--out FILE.npz is needed"),
    (["{run}", "{gallery}", "--out", "{tmp}/no/x.npz"], "folder {tmp}/no does not exist"),
    (["{run}", "{gallery}", "--query", "{tmp}/notes.txt"], "not an image file PIL reads"),
    (["{run}", "{gallery}", "--query", "{gallery}/6", "--k", "0"], "--k: expected an integer >= 1, got 0"),
    (["{run}", "{gallery}", "--out", "{tmp}/x.npz", "--device", "tpu"], "argument --device: invalid choice"),
    (["{run}", "{tmp}/big", "--out", "{tmp}/x.npz"], "2.png: 9×8 pixels; a model trained on digits takes 8×8"),
], ids=["no-run", "no-checkpoint", "broken-checkpoint", "no-images-dir", "empty-dir", "empty-class", "no-out",
        "out-folder", "query-not-image", "k", "device", "digits-size"])
def test_bad_input_is_one_line_and_writes_nothing(digits_run, gallery, tmp_path, capsys, args, message):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    for folder in ("classes/a", "classes/b", "big"):  # classes/b stays empty
        (tmp_path / folder).mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "classes" / "a" / "1.png")
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("L", (8, 8)).save(tmp_path / "big" / "1.png")
    Image.new("L", (9, 8)).save(tmp_path / "big" / "2.png")
    fill = {"tmp": tmp_path, "gallery": gallery[0], "run": digits_run}
    assert embed.main([arg.format(**fill) for arg in args]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message.format(**fill) in captured.err and captured.out == ""
    assert not (tmp_path / "x.npz").exists()


def test_help_names_the_rules(capsys):
    assert embed.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: embed.py")
    for rule in ("in order of seed, then fold", "EVERY model found", "is NOT excluded", "n(concat(n(f_1)",
                 "eval transform", "hidden files"):
        assert rule in text, rule
