"""More than one process or GPU, on the engines people already use (issue 16).

DDP, FSDP2 and transformers' tensor parallelism run under ``torchrun`` with two processes (``distributed_worker.py``):
on two CUDA GPUs (NCCL) when there are two, else on the CPU (gloo), so CI runs them too. A model split over two GPUs
by ``device_map`` needs the GPUs. On the two-GPU machine: ``PYTHONPATH=src python -m pytest tests/test_distributed.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from decoder_zoo import PAD, make_decoder
from transformers import AutoModel, AutoModelForCausalLM
from zoo import make_batch, make_model

from bettertransformer import BetterTransformer, call_counts

HERE = Path(__file__).parent
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def _torchrun(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(HERE / "distributed_worker.py"), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


@distributed
def test_ddp_training_gives_the_losses_of_one_process():
    out = _torchrun("ddp")
    assert "ddp: max difference" in out


@distributed
@two_gpus
def test_ddp_training_with_captured_encoder_graphs_gives_the_losses_of_one_process():
    out = _torchrun("ddp-graphed")
    assert "ddp: max difference" in out


@distributed
def test_fsdp2_training_of_a_packed_decoder_gives_the_losses_of_one_process():
    out = _torchrun("fsdp2")
    assert "fsdp2: max difference" in out


@distributed
def test_tensor_parallel_generate_gives_the_tokens_of_one_process(tmp_path):
    make_decoder("llama").save_pretrained(tmp_path)
    out = _torchrun("tp", str(tmp_path))
    # The prefill ran packed; the steps ran our static-cache loop, each the model's own sharded forward (the generic
    # step: the fused one reads whole weights).
    assert "'fast': 1" in out and "'fast generate': 1" in out and "'generic steps': 1" in out, out


@two_gpus
@pytest.mark.cuda
def test_an_encoder_split_over_two_gpus_by_device_map(tmp_path):
    """Layers on two GPUs (accelerate's hooks move the stock modules' inputs): the packed forward moves its tokens
    and their layout to each layer's device, and matches the model on one GPU."""
    make_model("bert", num_hidden_layers=4).save_pretrained(tmp_path)
    device_map = {"embeddings": 0, "pooler": 1, **{f"encoder.layer.{i}": int(i >= 2) for i in range(4)}}
    split = AutoModel.from_pretrained(tmp_path, device_map=device_map).eval()
    whole = AutoModel.from_pretrained(tmp_path).cuda().eval()
    assert {p.device.index for p in split.parameters()} == {0, 1}
    ids, mask = make_batch([32, 17, 5, 11], "right")
    with torch.no_grad():
        expected = whole(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
        fast = BetterTransformer.transform(split)
        got = fast(input_ids=ids.cuda(0), attention_mask=mask.cuda(0)).last_hidden_state
    keep = mask.cuda().bool()
    torch.testing.assert_close(got.to(expected.device)[keep], expected[keep], atol=1e-4, rtol=1e-4)
    assert call_counts(fast)["fast"] == 1


@two_gpus
@pytest.mark.cuda
def test_a_decoder_split_over_two_gpus_by_device_map(tmp_path):
    """Packed prefill across the split; ``generate`` runs transformers' loop (the static buffers live on one
    device) and gives the tokens of the model on one GPU."""
    make_decoder("llama", num_hidden_layers=4).save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map |= {f"model.layers.{i}": int(i >= 2) for i in range(4)}
    split = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map).eval()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path).cuda().eval()
    assert {p.device.index for p in split.parameters()} == {0, 1}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, whole.config.vocab_size, (3, 9), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=PAD)
    expected = whole.generate(ids, **kwargs)
    fast = BetterTransformer.transform(split)
    assert torch.equal(fast.generate(ids, **kwargs).to(expected.device), expected)
    with torch.no_grad():
        logits = fast(input_ids=ids, attention_mask=mask).logits
        reference = whole(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(logits.to(reference.device)[keep], reference[keep], atol=1e-4, rtol=1e-4)
    # On two H200s (2026-11-30): {'fast': 1, 'stock': 10, 'stock generate': 1}: one of the two packed calls ran.
    assert call_counts(fast)["fast"] >= 1 and call_counts(fast)["stock generate"] == 1
