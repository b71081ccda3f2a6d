"""Image tasks: NPZ and class-folder inputs, VTAB-1k split, bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capaboost.data import DataError, ImageTaskData, load_task
from capaboost.data.image import load_image_task, read_image_folder


def _arrays(n: int, classes: int = 3, size: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % classes
    x[:, 0, 0, 0] = np.arange(n) % 256  # make images traceable
    return x, y


def test_npz_with_test_set(tmp_path: Path) -> None:
    x, y = _arrays(30)
    xt, yt = _arrays(7, seed=1)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, class_names=np.array(["a", "b", "c"]))
    data = load_task("image", tmp_path / "d.npz", train_size=20, val_size=6)
    assert isinstance(data, ImageTaskData)
    assert data.sizes() == {"train": 20, "validation": 6, "test": 7}
    assert data.x_train.shape == (20, 4, 4, 3) and data.x_train.dtype == np.uint8
    assert data.class_names == ["a", "b", "c"] and data.num_labels == 3
    np.testing.assert_array_equal(data.x_test, xt)
    # train/val are disjoint draws from the pool, labels travel with their images
    both = np.concatenate([data.x_train, data.x_val]).reshape(26, -1)
    assert len({r.tobytes() for r in both}) == 26
    for xs, ys in ((data.x_train, data.y_train), (data.x_val, data.y_val)):
        for img, lab in zip(xs, ys):
            i = int(np.flatnonzero((x == img).all(axis=(1, 2, 3)))[0])
            assert y[i] == lab


def test_npz_without_test_uses_rest_and_grayscale(tmp_path: Path) -> None:
    x, y = _arrays(40)
    np.savez(tmp_path / "d.npz", x_train=x[..., 0], y_train=y.astype(np.float32))
    data = load_image_task(tmp_path, train_size=25, val_size=5, seed=3)
    assert data.sizes() == {"train": 25, "validation": 5, "test": 10}
    assert data.x_train.shape[1:] == (4, 4, 1) and data.class_names == ["0", "1", "2"]
    again = load_image_task(tmp_path, train_size=25, val_size=5, seed=3)
    np.testing.assert_array_equal(again.y_test, data.y_test)
    assert not np.array_equal(load_image_task(tmp_path, train_size=25, val_size=5, seed=4).x_train, data.x_train)


def test_default_vtab_sizes_and_caps(tmp_path: Path) -> None:
    x, y = _arrays(1100, size=2)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    data = load_image_task(tmp_path / "d.npz")
    assert data.sizes() == {"train": 800, "validation": 200, "test": 100}
    capped = load_image_task(tmp_path / "d.npz", max_train_samples=50, max_eval_samples=10)
    assert capped.sizes() == {"train": 50, "validation": 10, "test": 10}


def test_npz_errors(tmp_path: Path) -> None:
    x, y = _arrays(10)
    np.savez(tmp_path / "a.npz", x_train=x, labels=y)
    with pytest.raises(DataError, match=r"a\.npz, column 'y_train': missing array 'y_train'; arrays found: \['labels', 'x_train'\]"):
        load_image_task(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x_train=x, y_train=y[:9])
    with pytest.raises(DataError, match="10 images but y_train has 9 labels"):
        load_image_task(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x_train=x, y_train=y)
    with pytest.raises(DataError, match=r"fewer than train_size \+ val_size = 1000"):
        load_image_task(tmp_path / "c.npz")
    (tmp_path / "d.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_image_task(tmp_path / "d.npz")
    with pytest.raises(DataError, match="file not found"):
        load_image_task(tmp_path / "missing.npz")


def _write_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (5, 6)) -> None:
    from PIL import Image

    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.full((*size, 3), 40 * c + i, dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_folder_tree(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _write_tree(tmp_path / "imgs", {"dog": 6, "cat": 5})
    x, y, names = read_image_folder(tmp_path / "imgs")
    assert names == ["cat", "dog"] and x.shape == (11, 5, 6, 3) and x.dtype == np.uint8
    assert list(y) == [0] * 5 + [1] * 6 and x[5, 0, 0, 0] == 0 and x[0, 0, 0, 0] == 40
    data = load_image_task(tmp_path / "imgs", train_size=6, val_size=2)
    assert data.sizes() == {"train": 6, "validation": 2, "test": 3} and data.num_labels == 2


def test_folder_train_test_and_resize(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _write_tree(tmp_path / "train", {"a": 4, "b": 4})
    _write_tree(tmp_path / "test", {"a": 2, "b": 1}, size=(8, 8))
    with pytest.raises(DataError, match="pass image_size"):
        _write_tree(tmp_path / "train", {"a": 1}, size=(3, 3))  # overwrite a/0.png with another size
        load_image_task(tmp_path, train_size=5, val_size=2)
    data = load_image_task(tmp_path, train_size=5, val_size=2, image_size=(7, 9))
    assert data.x_test.shape == (3, 7, 9, 3) and data.x_train.shape == (5, 7, 9, 3)
    assert list(data.y_test) == [0, 0, 1]


def test_folder_errors(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        read_image_folder(tmp_path / "noimg")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_text("nope")
    with pytest.raises(DataError, match=r"x\.png: cannot decode image"):
        read_image_folder(tmp_path / "bad")
    _write_tree(tmp_path / "t", {"a": 1, "z": 1})
    with pytest.raises(DataError, match=r"unknown class folder 'z'; allowed classes: \['a'\]"):
        read_image_folder(tmp_path / "t", class_names=["a"])
