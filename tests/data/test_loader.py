"""Loader determinism, rank sharding, exact resume, epochs, and the build_data entry point."""

import itertools
import json

import pytest
import torch

from mtp_recipes.data import build_data, build_dataloader, load_tokenizer, pack_documents
from mtp_recipes.data.formats import Document

SEQ_LEN = 4


def packed_rows(n_rows: int):
    """n_rows full rows; row i holds tokens 4i+1 .. 4i+4, so ``input_ids[:, 0] // 4`` names the row."""
    docs = [Document(list(range(SEQ_LEN * i + 1, SEQ_LEN * i + 5)), [True] * SEQ_LEN) for i in range(n_rows)]
    return pack_documents(docs, SEQ_LEN, pad_id=0, strategy="greedy")


def row_ids(batch) -> list[int]:
    return (batch["input_ids"][:, 0] // SEQ_LEN).tolist()


def take(loader, n: int) -> list[list[int]]:
    return [row_ids(b) for b in itertools.islice(iter(loader), n)]


def test_seeded_shuffle_is_deterministic() -> None:
    packed = packed_rows(40)
    assert take(build_dataloader(packed, 4, seed=1), 25) == take(build_dataloader(packed, 4, seed=1), 25)
    assert take(build_dataloader(packed, 4, seed=1), 10) != take(build_dataloader(packed, 4, seed=2), 10)
    assert take(build_dataloader(packed, 4, shuffle=False), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_ranks_get_disjoint_rows_and_equal_batch_counts() -> None:
    packed = packed_rows(50)
    loaders = [build_dataloader(packed, 4, seed=3, rank=r, world_size=3) for r in range(3)]
    assert {len(loader) for loader in loaders} == {4}  # 50 rows // (4 * 3)
    shards = [set(itertools.chain(*take(loader, 4))) for loader in loaders]
    assert all(len(s) == 16 for s in shards)
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    with pytest.raises(ValueError, match="outside world_size"):
        build_dataloader(packed, 4, rank=3, world_size=3)


def test_epochs_cover_every_row_and_reshuffle() -> None:
    loader = build_dataloader(packed_rows(12), 4, seed=0)
    epochs = take(loader, 9)
    first, second = list(itertools.chain(*epochs[:3])), list(itertools.chain(*epochs[3:6]))
    assert sorted(first) == sorted(second) == list(range(12)) and first != second
    assert loader.epoch == 3


def test_resume_continues_with_the_next_batch() -> None:
    packed = packed_rows(30)
    reference = take(build_dataloader(packed, 4, seed=7, rank=1, world_size=2), 12)
    run = build_dataloader(packed, 4, seed=7, rank=1, world_size=2)
    assert take(run, 5) == reference[:5]
    state = run.state_dict()
    resumed = build_dataloader(packed, 4, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert take(resumed, 7) == reference[5:]  # crosses the epoch boundary (3 batches per epoch)


def test_too_few_rows_for_one_batch() -> None:
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_dataloader(packed_rows(3), 4)


def test_build_data_from_chat_jsonl(tmp_path) -> None:
    conversation = [{"role": "user", "content": "Name a builtin."}, {"role": "assistant", "content": "len"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"conv": conversation}) + "\n")
    tokenizer = load_tokenizer("builtin:debug")
    cfg = {"source": str(tmp_path / "chat.jsonl"), "messages_field": "conv", "seq_len": 64, "batch_size": 1}
    batch = next(iter(build_data(cfg, tokenizer)))
    assert set(batch) == {"input_ids", "labels", "position_ids", "seq_idx"}
    assert all(t.shape == (1, 64) for t in batch.values())
    targets = batch["labels"][batch["labels"] != -100]
    assert tokenizer.decode(targets) == "len<|im_end|>\n"
    with pytest.raises(ValueError, match=r"unknown data config fields \['seqlen'\]"):
        build_data({**cfg, "seqlen": 8}, tokenizer)


def test_build_data_builtin_with_omegaconf_and_cap() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {
            "source": "builtin:pydoc",
            "max_documents": 10,
            "seq_len": 128,
            "batch_size": 2,
            "packing": "greedy",
            "seed": 5,
        }
    )
    loader = build_data(cfg, load_tokenizer(None), rank=1, world_size=2)
    assert loader.dataset.stats.documents == 10
    batch = next(iter(loader))
    assert batch["input_ids"].dtype == torch.long and batch["seq_idx"].dtype == torch.int32
