"""Shipped models store float16 weights: half the size, the same segmentation."""

from __future__ import annotations

from dataclasses import replace

import torch

from medseg.model import half_state, init_model, load_model, store_half
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names


def _ensemble(tmp_path):
    base = ModelSpec(
        labels=labels_from_names(["background", "anterior", "posterior"]),
        network=NetworkSpec(out_channels=3, base_channels=8),
        preset="mr",
        window=(64, 48),
    )
    top = tmp_path / "ensemble"
    for i in range(2):
        init_model(top / f"m{i}", base, seed=i)
    replace(base, members=("m0", "m1")).save(top / "model.json")
    return top


def test_store_half_halves_files_and_keeps_predictions(tmp_path):
    top = _ensemble(tmp_path)
    sizes = [(top / m / "weights.safetensors").stat().st_size for m in ("m0", "m1")]
    before = load_model(top)
    x = torch.randn(4, 1, 64, 48, generator=torch.Generator().manual_seed(0))
    store_half(top)
    after = load_model(top)  # checksums in the members' model.json were rewritten
    for member_before, member_after, size in zip(before.members, after.members, sizes):
        assert (member_after.folder / "weights.safetensors").stat().st_size < 0.55 * size
        assert next(member_after.network.parameters()).dtype == torch.float32
        with torch.no_grad():
            p, q = member_before.network(x).softmax(1), member_after.network(x).softmax(1)
        assert (p - q).abs().max() < 1e-2
        assert (p.argmax(1) == q.argmax(1)).float().mean() > 0.999


def test_half_state_keeps_out_of_range_and_integer_tensors():
    state = {"w": torch.ones(3), "big": torch.tensor([1e5, 1.0]), "steps": torch.tensor(7), "empty": torch.ones(0)}
    out = half_state(state)
    assert out["w"].dtype == torch.float16
    assert out["big"].dtype == torch.float32 and out["big"][0] == 1e5
    assert out["steps"].dtype == torch.int64
    assert out["empty"].dtype == torch.float32
