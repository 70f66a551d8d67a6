"""timm ResNet state dicts load into our `ResNet` with timm's own outputs.

Run by hand in the bench venv (torch, timm; see requirements-bench.txt), never in CI:

    .venv-bench/bin/python benchmarks/check_resnet_timm.py [--out runs/check_resnet_timm.json]

For timm `resnet18` and `resnet50` (random weights, random BatchNorm statistics, eval mode) and a
resnet18 with a CIFAR stem (timm has no such model: its `conv1` replaced by a 3x3 stride-1 convolution
and its `maxpool` by the identity, the usual CIFAR adaptation), it saves `model.state_dict()` as
safetensors with the Hub's `config.json`, reads the architecture and loads it with
`vitshap_jax.models.resnet_pretrained`, and prints the largest logit difference to timm on the same random
images (float32, CPU). The masked case compares our `patch_mask` pass with timm on the images whose
held-out patches were set to `mask_value` by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vitshap_jax.models.resnet import ResNet  # noqa: E402
from vitshap_jax.models.resnet_pretrained import load_resnet_pretrained, read_resnet_architecture  # noqa: E402

PATCH = 16


def _randomize_bn(model, seed):
    """Random BatchNorm affine parameters and running statistics (timm starts with ones and zeros and
    zero-initializes each block's last gain, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()


def _cases():
    torch.manual_seed(0)  # timm's own initialization of the convolutions and heads
    cifar = timm.create_model("resnet18", pretrained=False, num_classes=10)
    cifar.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    cifar.maxpool = torch.nn.Identity()
    return {
        "timm resnet18 (224 px)": (timm.create_model("resnet18", pretrained=False), 224),
        "timm resnet50 (224 px)": (timm.create_model("resnet50", pretrained=False), 224),
        "resnet18 + CIFAR stem (32 px)": (cifar, 32),
    }


def _save(model, folder):
    os.makedirs(folder)
    path = os.path.join(folder, "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    cfg = {"architecture": "resnet", "pretrained_cfg": dict(model.pretrained_cfg)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, default=str)
    return path


def _compare(ref, ours) -> dict:
    diff = float(np.abs(ref - ours).max())
    return {
        "max_abs_diff": diff,
        "max_abs_value": float(np.abs(ref).max()),
        "ok": bool(diff < 1e-4 * max(1, np.abs(ref).max())),
    }


def check(tmp) -> dict:
    results = {}
    for i, (name, (model, image)) in enumerate(_cases().items()):
        model = _randomize_bn(model, i)
        path = _save(model, os.path.join(tmp, f"case{i}"))
        arch = read_resnet_architecture(path)
        ours = ResNet(num_classes=arch["num_classes"], patch_size=PATCH, **arch["model"])
        params = ours.init(jax.random.key(0), jnp.zeros((1, image, image, 3)))["params"]
        params = load_resnet_pretrained(path, params)
        rng = np.random.default_rng(i)
        x = rng.standard_normal((4, image, image, 3)).astype(np.float32)
        n = (image // PATCH) ** 2
        mask = rng.random((4, n)) < 0.5
        held_out = np.asarray(ours.apply({}, jnp.asarray(x), jnp.asarray(mask), method=ResNet.masked_input))
        for label, torch_input, patch_mask in (("", x, None), (", masked", held_out, mask)):
            with torch.no_grad():
                ref = model(torch.from_numpy(torch_input.transpose(0, 3, 1, 2).copy())).numpy()
            logits = ours.apply({"params": params}, jnp.asarray(x), patch_mask)
            results[f"{name}{label}"] = _compare(ref, np.asarray(logits)) | {
                "read": f"depth {arch['model']['depth']}, width {arch['model']['width']}, stem "
                f"{arch['model']['stem']}, normalization {arch['normalization']}",
                "parameters": f"{sum(p.size for p in jax.tree.leaves(params)):,} "
                f"(timm {sum(p.numel() for p in model.parameters()):,})",
            }
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, jax {jax.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        results = check(tmp)
    width = max(map(len, results))
    for name, r in results.items():
        verdict = "ok" if r["ok"] else "MISMATCH"
        diff, size = r["max_abs_diff"], r["max_abs_value"]
        print(f"{name:<{width}}  max |diff| {diff:.2e} of max |logit| {size:.2f}  {verdict}")
        print(f"{'':<{width}}  read: {r['read']}; parameters {r['parameters']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    if not all(r["ok"] for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
