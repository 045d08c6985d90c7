"""One rank of a multi-process check, run by ``torchrun --nproc_per_node 2`` (``test_distributed.py`` starts it).

Modes (each compares the transformed model under an existing engine with one process computing the same thing):

- ``ddp``: DistributedDataParallel training of a transformed BERT classifier; each rank takes half of every global
  batch. Losses (averaged over ranks) equal those of one process training on the whole batch.
- ``fsdp2``: ``fully_shard`` training of a transformed Llama-style decoder on packed rows; the same comparison.
- ``tp``: transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")``) of a saved Llama-style
  decoder; the transformed model's greedy ``generate`` (our static-cache loop, each step the model's own sharded
  forward) gives the tokens of the whole model in one process.

Runs on CUDA GPUs (NCCL), or on the CPU (gloo) where the engine supports it. Exits non-zero on a mismatch.
Usage: ``torchrun --nproc_per_node 2 tests/distributed_worker.py MODE [CHECKPOINT_DIR]``
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from bettertransformer import BetterTransformer, call_counts  # noqa: E402
from bettertransformer.switches import SWITCHES  # noqa: E402

STEPS = 4


def _device() -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def _padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _global_batches(vocab: int, rows: int, lengths: list[int]) -> list[list[list[int]]]:
    """STEPS global batches of ``rows`` sequences; rank r takes rows r, r + world, ... (equal lengths per rank)."""
    gen = torch.Generator().manual_seed(0)
    return [[torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(rows)]
            for _ in range(STEPS)]  # fmt: skip


def _mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _check(name: str, got: list[float], expected: list[float], atol: float) -> None:
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    if dist.get_rank() == 0:
        print(f"{name}: losses {got}\n{name}: one process {expected}\n{name}: max difference {worst:.2e}", flush=True)
    if worst > atol:
        raise SystemExit(f"{name}: losses differ from one process by {worst:.2e} (> {atol})")


def ddp(device: torch.device, graphed: bool = False) -> None:
    """DDP against one process on the same global batches; ``graphed``: under bf16 autocast on CUDA, where the
    encoder's layers replay captured training graphs (their gradients reach DDP's hooks through autograd)."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForSequenceClassification
    from zoo import VOCAB, make_model

    rank, world = dist.get_rank(), dist.get_world_size()
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    base = make_model("bert", auto_class=AutoModelForSequenceClassification, **no_dropout).to(device).train()
    single = BetterTransformer.transform(copy.deepcopy(base))
    model = DistributedDataParallel(BetterTransformer.transform(copy.deepcopy(base)))
    batches = _global_batches(VOCAB, 4 * world, [19, 3, 11, 7, 19, 3, 11, 7][: 2 * world])
    labels = torch.arange(4 * world, device=device) % 2
    losses, expected = [], []
    for which, net in (("ddp", model), ("single", single)):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for rows in batches:
            take = slice(rank, None, world) if which == "ddp" else slice(None)
            ids, mask = _padded(rows[take], device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if graphed else nullcontext():
                loss = net(input_ids=ids, attention_mask=mask, labels=labels[take]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            (losses if which == "ddp" else expected).append(
                _mean_over_ranks(loss.item(), device) if which == "ddp" else loss.item()
            )
    assert call_counts(model.module)["fast"] == STEPS, call_counts(model.module)
    if graphed:
        assert call_counts(model.module)["graphed training"] == STEPS, call_counts(model.module)
    _check("ddp", losses, expected, 2e-2 if graphed else 1e-5 if device.type == "cpu" else 1e-4)


def fsdp2(device: torch.device) -> None:
    from decoder_zoo import make_decoder
    from torch.distributed.fsdp import fully_shard
    from transformers import DataCollatorWithFlattening

    rank, world = dist.get_rank(), dist.get_world_size()
    base = make_decoder("llama").to(device).train()
    single = BetterTransformer.transform(copy.deepcopy(base))
    model = BetterTransformer.transform(copy.deepcopy(base))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    batches = _global_batches(base.config.vocab_size, 3 * world, [23, 5, 14] * world)
    collate = DataCollatorWithFlattening(return_tensors="pt")
    losses, expected = [], []
    for which, net in (("fsdp2", model), ("single", single)):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for rows in batches:
            mine = rows[3 * rank : 3 * rank + 3] if which == "fsdp2" else rows
            if which == "fsdp2":
                batch = {k: v.to(device) for k, v in collate([{"input_ids": r} for r in mine]).items()}
                loss = net(**batch).loss
            else:  # one process: the mean over ranks of each rank's packed-row loss (equal token counts per rank)
                parts = [rows[3 * r : 3 * r + 3] for r in range(world)]
                loss = (
                    sum(
                        net(**{k: v.to(device) for k, v in collate([{"input_ids": x} for x in p]).items()}).loss
                        for p in parts
                    )
                    / world
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            (losses if which == "fsdp2" else expected).append(
                _mean_over_ranks(loss.item(), device) if which == "fsdp2" else loss.item()
            )
    assert call_counts(model)["fast"] == STEPS, call_counts(model)
    _check("fsdp2", losses, expected, 1e-5 if device.type == "cpu" else 1e-4)
    # generate on the sharded model: transformers' own loop (FSDP gathers the weights around each forward; our loop's
    # buffers and steps would hold shards), the trained single-process model's tokens
    SWITCHES.generate_devices = frozenset({"cuda", "cpu"})
    ids = torch.tensor([[5, 9, 17, 3]], device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        got, want = model.eval().generate(ids, **kwargs), single.eval().generate(ids, **kwargs)
    assert call_counts(model)["stock generate"] == 1 and call_counts(model)["fast generate"] == 0, call_counts(model)
    if not torch.equal(got, want):
        raise SystemExit(f"fsdp2: generate gave {got.tolist()}, one process {want.tolist()}")


def tp(device: torch.device, checkpoint: str) -> None:
    from transformers import AutoModelForCausalLM

    parallel = AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto").eval()
    whole = AutoModelForCausalLM.from_pretrained(checkpoint).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, whole.config.vocab_size, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids, mask = ids.to(device), mask.to(device)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = whole.generate(ids, **kwargs)
    stock = parallel.generate(ids, **kwargs)
    try:
        BetterTransformer.transform(parallel, keep_original_model=True)
        raise SystemExit("tp: keep_original_model=True copied a sharded model")
    except ValueError as error:
        assert "keep_original_model=False" in str(error), error
    fast = BetterTransformer.transform(parallel)
    SWITCHES.generate_devices = frozenset({"cuda", "cpu"})  # the static-cache loop on the CPU too (gloo runs)
    got = fast.generate(ids, **kwargs)
    if dist.get_rank() == 0:
        print("tp: one process", expected.tolist(), "\ntp: stock tensor-parallel", stock.tolist(), flush=True)
        print("tp: transformed", got.tolist(), "\ntp: calls", call_counts(fast), flush=True)
    if not torch.equal(got, expected):
        raise SystemExit("tp: the transformed tensor-parallel model generated other tokens than one process")


def main() -> None:
    mode = sys.argv[1]
    device = _device()
    if mode != "tp":  # transformers starts the process group itself for tp_plan
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if mode == "ddp":
        ddp(device)
    elif mode == "ddp-graphed":
        ddp(device, graphed=True)
    elif mode == "fsdp2":
        fsdp2(device)
    elif mode == "tp":
        tp(device, sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every check has passed (a failed one raised above). Leave without the interpreter's teardown: on the CPU a
    # tensor-parallel run's process once aborted there ("terminate called without an active exception", a native
    # thread still joinable at exit) after printing equal tokens, which failed the test for nothing it checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
