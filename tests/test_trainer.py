"""transformers' Trainer on a transformed model: the same losses as on the stock model, checkpoints that load as
stock, and packed-sequence decoder training with DataCollatorWithFlattening (issue 16)."""

from __future__ import annotations

import pytest
import torch
from decoder_zoo import make_decoder
from transformers import AutoModelForSequenceClassification, DataCollatorWithFlattening, Trainer, TrainingArguments
from zoo import VOCAB, make_model

from bettertransformer import BetterTransformer, call_counts, is_transformed

pytest.importorskip("accelerate")


def _examples(count: int, vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (count,), generator=gen).tolist()
    return [
        {"input_ids": torch.randint(3, vocab, (n,), generator=gen).tolist(), "label": i % 2}
        for i, n in enumerate(lengths)
    ]


def _pad(batch: list[dict]) -> dict:
    """Right padding to the longest example: what a tokenizer's padding collator builds."""
    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(batch):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if "label" in batch[0]:
        out["labels"] = torch.tensor([e["label"] for e in batch])
    else:  # causal LM: predict every real token
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


def _train(model, data, collator, tmp_path, name: str, **extra) -> list[float]:
    args = TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
        logging_steps=1, save_steps=3, report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **extra,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_losses_match_stock_and_checkpoints_are_stock(tmp_path):
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    stock = make_model("bert", auto_class=AutoModelForSequenceClassification, **no_dropout)
    fast = BetterTransformer.transform(make_model("bert", auto_class=AutoModelForSequenceClassification, **no_dropout))
    data = _examples(24, VOCAB)
    expected = _train(stock, data, _pad, tmp_path, "stock")
    losses = _train(fast, data, _pad, tmp_path, "fast")
    assert len(losses) == len(expected) == 6
    assert max(abs(a - b) for a, b in zip(losses, expected, strict=True)) < 1e-4, (losses, expected)
    assert call_counts(fast)["fast"] > 0 and call_counts(fast)["stock"] == 0
    assert is_transformed(fast)
    # The checkpoint written mid-training is a stock one.
    checkpoint = tmp_path / "fast" / "checkpoint-3"
    assert "bettertransformer" not in (checkpoint / "config.json").read_text()
    loaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert not is_transformed(loaded)
    # reverse after training returns the trained weights.
    trained = {k: v.clone() for k, v in fast.state_dict().items()}
    BetterTransformer.reverse(fast)
    for key, value in fast.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_decoder_training_with_flattening_matches_padded_stock(tmp_path, checkpointing):
    """With gradient checkpointing too: the backward pass recomputes each layer of the packed row."""
    stock, fast = make_decoder("llama"), BetterTransformer.transform(make_decoder("llama"))
    data = [{"input_ids": e["input_ids"]} for e in _examples(24, stock.config.vocab_size, seed=1)]
    expected = _train(stock, data, _pad, tmp_path, "stock", remove_unused_columns=False)
    losses = _train(
        fast, data, DataCollatorWithFlattening(), tmp_path, "fast", remove_unused_columns=False,
        gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": True},
    )  # fmt: skip
    assert max(abs(a - b) for a, b in zip(losses, expected, strict=True)) < 1e-4, (losses, expected)
    assert call_counts(fast)["fast"] == 6  # every step ran its packed row as separate sequences


def test_fifty_steps_of_a_plain_loop_give_stock_losses():
    """AdamW on padded batches of varied lengths, fp32: the loss curve of the transformed model is stock's."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    models = [make_model("bert", auto_class=AutoModelForSequenceClassification, **no_dropout) for _ in range(2)]
    BetterTransformer.transform(models[1])
    data = _examples(200, VOCAB, seed=2)
    curves = []
    for model in models:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses = []
        for step in range(50):
            batch = _pad(data[4 * step : 4 * step + 4])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert max(abs(a - b) for a, b in zip(*curves, strict=True)) < 1e-4
    assert call_counts(models[1])["fast"] == 50
