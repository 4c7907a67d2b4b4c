"""FISH under torch.distributed: 2 processes launched with torchrun (gloo, CPU) against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fish_ddp_common import KEEP_RATIO, MERGE_EVERY, STEPS, global_batch, optimizer_for, optimizer_step, wrapped
from tiny import make_inputs, make_model

import leantune
from leantune.methods.fish import save_mask

WORKER = Path(__file__).with_name("fish_ddp_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Build the masks here, run the 2-process worker once, and return its outputs and the mask paths."""
    out = tmp_path_factory.mktemp("fish_ddp")
    data = [make_inputs("bert", batch=4, seed=s) for s in range(2)]
    masks = {}
    for name, options in {"shared": {}, "disjoint": {"num_workers": 2}}.items():
        config = leantune.make_config("fish", keep_ratio=KEEP_RATIO, num_samples=8, **options)
        tuned = leantune.wrap(make_model("bert"), config, data=data)
        masks[name] = out / f"{name}.safetensors"
        save_mask(tuned.method.mask(), masks[name])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(WORKER), "--mask", str(masks["shared"]),
               "--disjoint-mask", str(masks["disjoint"]), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = torch.load(out / "ddp.pt")
    merges = [torch.load(out / f"merge_rank{r}.pt") for r in range(2)]
    return {"ddp": results, "merges": merges, "masks": masks}


def single_process(mode: str, mask_path: Path) -> dict[str, torch.Tensor]:
    tuned = wrapped(mode, str(mask_path))
    optimizer = optimizer_for(tuned)
    for step in range(STEPS):
        tuned(**global_batch(step)).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in tuned.parameters() if p.requires_grad], 1.0)
        optimizer_step(tuned, optimizer)
    return tuned.delta_state_dict()


@pytest.mark.parametrize("mode", ["masked", "sparse"])
def test_sparse_hook_ddp_equals_single_process(run, mode: str) -> None:
    reference = single_process(mode, run["masks"]["shared"])
    trained = run["ddp"][mode]["weights"]
    assert set(trained) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value.detach(), rtol=0, atol=1e-6, msg=name)
    untrained = wrapped(mode, str(run["masks"]["shared"])).delta_state_dict()
    assert any(not torch.equal(trained[n], value) for n, value in untrained.items()), "training changed nothing"


@pytest.mark.parametrize("mode", ["masked", "sparse"])
def test_bytes_per_step_are_the_selected_values(run, mode: str) -> None:
    tuned = wrapped(mode, str(run["masks"]["shared"]))
    selected = tuned.method.mask().count()
    head = sum(p.numel() for p in tuned.base_model.classifier.parameters())
    values_bytes = 4 * (selected + head)
    index_bytes = sum(d.indices.numel() * d.indices.element_size() for d in tuned.method.deltas().values())
    sent = run["ddp"][mode]["bytes_per_step"]
    assert len(sent) == STEPS
    assert all(b == values_bytes for b in sent)
    assert max(sent) <= 1.1 * (values_bytes + index_bytes)
    if mode == "masked":  # the buckets hold dense masked gradients: the hook sends a small part of them
        dense = run["ddp"][mode]["dense_bytes_per_step"][0]
        assert dense == 4 * sum(p.numel() for p in tuned.parameters() if p.requires_grad)
        assert max(sent) < dense / 10


def test_periodic_merge_sums_disjoint_worker_deltas(run) -> None:
    first, second = run["merges"]
    assert first["merged"] == second["merged"] == [False] * (MERGE_EVERY - 1) + [True]
    assert first["names"] == second["names"]
    for i, name in enumerate(first["names"]):
        start = first["start"][i]
        torch.testing.assert_close(second["start"][i], start, rtol=0, atol=0)
        deltas = [m["before"][i] - start for m in (first, second)]
        expected = start + deltas[0] + deltas[1]
        for merge in (first, second):
            torch.testing.assert_close(merge["after"][i], expected, rtol=0, atol=1e-7, msg=name)
        if name.endswith(".values"):  # each worker moved only the entries it owns
            key = name.split(".")[-2]
            owner = next(o for n, o in first["owners"].items() if n.replace(".", "-") == key)
            for rank, delta in enumerate(deltas):
                assert torch.all(delta[owner != rank] == 0), name
            assert torch.any(deltas[0][owner == 0] != 0) or torch.any(deltas[1][owner == 1] != 0)
    total = sum(t.numel() for t in first["start"])
    assert first["bytes_sent"] == 4 * total


def test_hook_refuses_masks_that_differ_between_ranks(run) -> None:
    assert "ranks hold different masks" in run["ddp"]["refused"]


def test_disjoint_mask_deals_entries_by_rank(run) -> None:
    tuned = wrapped("sparse", str(run["masks"]["disjoint"]), num_workers=2)
    owners = torch.cat([d.owner for d in tuned.method.deltas().values()])
    assert int((owners == 0).sum()) == int((owners == 1).sum()) > 0
