"""Image classification from a class-folder tree or NPZ arrays, with the VTAB-1k split.

VTAB-1k trains on 800 examples and selects on 200, both drawn (fixed seed)
from the training pool; the test set is the given one, or the remainder of
the pool when none is given. Arrays are returned as (N, H, W, C) exactly as
stored (uint8 for decoded images) — normalisation belongs to the model's
image processor, not the loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capaboost.data.errors import DataError
from capaboost.data.protocols import subsample, vtab_split
from capaboost.data.task_specs import metrics_for_task

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageTaskData:
    """Image task after the VTAB-1k split; ``x_*`` are (N, H, W, C), ``y_*`` int64 (N,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_labels: int
    class_names: list[str]
    metric_names: list[str]
    main_metric: str
    seed: int = 0

    def sizes(self) -> dict[str, int]:
        """Split sizes, handy for logs and sanity checks."""
        return {"train": len(self.y_train), "validation": len(self.y_val), "test": len(self.y_test)}


# ------------------------------------------------------------------ folder tree
def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image folders needs Pillow: pip install pillow") from None
    return Image


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_folder(
    root: str | Path,
    image_size: int | tuple[int, int] | None = None,
    mode: str = "RGB",
    class_names: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``root/<class_name>/*.png|jpg`` into (images, labels, class_names).

    Classes are the sorted sub-folder names (ids in that order) unless
    ``class_names`` fixes them. Images of different sizes need
    ``image_size`` (an int or (height, width)): we refuse to guess a resize.
    """
    Image = _pil()
    root = Path(root)
    if not root.is_dir():
        raise DataError("image folder not found; expected root/<class_name>/*.png|jpg", root)
    dirs = _class_dirs(root)
    if not dirs:
        raise DataError("no class sub-folders; expected root/<class_name>/*.png|jpg", root)
    names = class_names if class_names is not None else [d.name for d in dirs]
    ids = {n: i for i, n in enumerate(names)}
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    images, labels = [], []
    for d in dirs:
        if d.name not in ids:
            raise DataError(f"unknown class folder {d.name!r}; allowed classes: {names}", d)
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if size is not None:
                        im = im.resize((size[1], size[0]))
                    arr = np.asarray(im, dtype=np.uint8)
            except OSError as e:
                raise DataError(f"cannot decode image: {e}", f) from e
            if arr.ndim == 2:
                arr = arr[:, :, None]
            if images and arr.shape != images[0].shape:
                raise DataError(
                    f"image shape {arr.shape} differs from {images[0].shape}; pass image_size to resize", f
                )
            images.append(arr)
            labels.append(ids[d.name])
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in any class folder", root)
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(names)


# ------------------------------------------------------------------ npz
def _check_xy(x: np.ndarray, y: np.ndarray, path: Path, xk: str, yk: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 3:
        x = x[..., None]  # grayscale (N, H, W)
    if x.ndim != 4:
        raise DataError(f"{xk} must be (N, H, W[, C]), got shape {x.shape}", path, column=xk)
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise DataError(f"{xk} has {len(x)} images but {yk} has {len(y)} labels", path, column=yk)
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise DataError(f"{yk} must hold integer class ids, got dtype {y.dtype}", path, column=yk)
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"{yk} has negative class id {int(y.min())}", path, column=yk)
    return x, y


def read_npz(path: str | Path) -> dict[str, np.ndarray | list[str] | None]:
    """Read ``x_train``, ``y_train`` and optional ``x_test``/``y_test``/``class_names`` from an NPZ."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found; expected an .npz with x_train, y_train[, x_test, y_test]", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"not a readable .npz file: {e}", path) from e
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataError(f"missing array {key!r}; arrays found: {sorted(arrays)}", path, column=key)
    out: dict = {}
    out["x_train"], out["y_train"] = _check_xy(arrays["x_train"], arrays["y_train"], path, "x_train", "y_train")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError("x_test and y_test must be given together", path)
    if "x_test" in arrays:
        out["x_test"], out["y_test"] = _check_xy(arrays["x_test"], arrays["y_test"], path, "x_test", "y_test")
    else:
        out["x_test"] = out["y_test"] = None
    out["class_names"] = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else None
    return out


# ------------------------------------------------------------------ task
def load_image_task(
    data_dir: str | Path,
    seed: int = 0,
    train_size: int = 800,
    val_size: int = 200,
    image_size: int | tuple[int, int] | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    name: str = "image",
) -> ImageTaskData:
    """Load an image task and apply the VTAB-1k split.

    ``data_dir`` is an ``.npz`` file, a folder holding one ``.npz``, a
    folder with ``train/`` and ``test/`` class trees, or a single class tree
    (then test = the pool minus the 800 + 200).
    """
    path = Path(data_dir)
    x_test = y_test = None
    class_names: list[str] | None = None
    npz = [path] if path.suffix == ".npz" else (sorted(path.glob("*.npz")) if path.is_dir() else [])
    if path.is_dir() and len(npz) > 1:
        raise DataError(f"several .npz files, pass one: {[p.name for p in npz]}", path)
    if npz:
        d = read_npz(npz[0])
        x_pool, y_pool, x_test, y_test = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
        class_names = d["class_names"]  # type: ignore[assignment]
        source = npz[0]
    elif path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
        x_pool, y_pool, class_names = read_image_folder(path / "train", image_size)
        x_test, y_test, _ = read_image_folder(path / "test", image_size, class_names=class_names)
        source = path
    else:
        x_pool, y_pool, class_names = read_image_folder(path, image_size)
        source = path

    try:
        tr, va, rest = vtab_split(len(y_pool), train_size, val_size, seed)
    except ValueError as e:
        raise DataError(f"{e}; lower train_size/val_size", source) from None
    if x_test is None:
        if not rest:
            raise DataError("no test set given and no examples left after the train/val split", source)
        x_test, y_test = x_pool[rest], y_pool[rest]
    n_labels = int(max(y_pool.max(), y_test.max() if len(y_test) else 0)) + 1
    if class_names is None:
        class_names = [str(i) for i in range(n_labels)]
    elif n_labels > len(class_names):
        raise DataError(f"class id {n_labels - 1} but only {len(class_names)} class names", source)
    n_labels = len(class_names)

    tr = subsample(tr, max_train_samples, seed, "train")
    va = subsample(va, max_eval_samples, seed, "eval")
    test_idx = subsample(list(range(len(y_test))), max_eval_samples, seed, "eval")
    metric_names, main = metrics_for_task("image")
    return ImageTaskData(
        name=name,
        x_train=x_pool[tr],
        y_train=y_pool[tr],
        x_val=x_pool[va],
        y_val=y_pool[va],
        x_test=x_test[test_idx],
        y_test=y_test[test_idx],
        num_labels=n_labels,
        class_names=list(class_names),
        metric_names=metric_names,
        main_metric=main,
        seed=seed,
    )
