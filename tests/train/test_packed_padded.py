"""Packing changes nothing but speed: the same documents packed into rows (qtulu attention, fused
loss) or padded one per row (SDPA, full logits) give the same summed loss, the same trained-token
count and the same LoRA gradients, on the micro preset in 4 bits, through the loop's own loss."""

import numpy as np
import pytest
import torch

from qtulu.config import load_config
from qtulu.data.mixtures import load_mix
from qtulu.data.prepare import PreparedDataset, Row, collate_packed, collate_padded, prepare_dataset
from qtulu.model.attention import use_varlen_attention
from qtulu.model.load import build_model
from qtulu.model.tokenizer import load_tokenizer
from qtulu.train.batches import count_tokens
from qtulu.train.loss import micro_batch_loss


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def lora_model(cfg, attention: str):
    torch.manual_seed(0)  # the same LoRA init in both models
    model = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # B starts at zero (then A gets no gradient): give every adapter weight a value
        gen = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    base = model.get_base_model()
    if attention == "qtulu":
        use_varlen_attention(base)
    else:
        base.set_attn_implementation("sdpa")
    return model


def documents(row: Row) -> list[Row]:
    bounds = row.cu_seqlens
    return [Row(row.input_ids[a:b], row.labels[a:b], np.array([b - a], dtype=np.int32))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-loss", "full-logits"])
def test_packed_rows_equal_documents_padded(tmp_path, fused):
    cfg = load_config("micro", "sample")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    folder = prepare_dataset(load_mix("sample"), None, tokenizer, 256, 5, tmp_path / "packed")
    ds = PreparedDataset(folder)
    rows = sorted(ds, key=lambda r: -len(r.seq_lens))[:2]  # the two rows with the most documents
    docs = [d for r in rows for d in documents(r)]
    assert len(docs) >= 4

    packed_model, padded_model = lora_model(cfg, "qtulu"), lora_model(cfg, "sdpa")
    packed = micro_batch_loss(packed_model, collate_packed(rows), fused=fused)
    padded = micro_batch_loss(padded_model, collate_padded(docs, tokenizer.pad_token_id), fused=False)
    count = count_tokens(rows)[1]
    assert count == count_tokens(docs)[1] > 0
    (packed / count).backward()
    (padded / count).backward()

    assert rel_err(packed, padded) <= 1e-5
    grads = {n: p.grad for n, p in padded_model.named_parameters() if p.requires_grad}
    assert len(grads) > 0
    for name, param in packed_model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            assert rel_err(param.grad, grads[name]) <= 1e-4, name
