"""Training data: bad records as named errors (direct use) and counted skips (training), the collator's filler
row and all-ignored batches, dataset lists with sampling strategies, the resumable sampler, token-budget packing,
the arguments."""
import json

import pytest
import torch
from PIL import Image

from fastvl.data import IGNORE_INDEX, LlavaDataset, MissingImageError, NativeResolutionProcessor, SampleError
from fastvl.train import parse_args
from fastvl.train.data import (PackedBatches, ResumableSampler, SkippingDataset, TrainCollator, best_fit_decreasing,
                               build_dataset, filler_sample, sample_sizes)
from fastvl.models import FastVLConfig, FastVLForConditionalGeneration
from fastvl.train.demo import draw, tokenizer
from fastvl.train.engine import deepspeed_config
from fastvl.train.model import data_settings

QA = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "a red circle"}]
TEXT = [{"from": "human", "value": "What do you see?"}, {"from": "gpt", "value": "a blue square"}]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A small model with a native-resolution (Qwen2-VL) tower: its processor refuses extreme aspect ratios."""
    config = FastVLConfig(vision_config=dict(depth=1, embed_dim=128, num_heads=2, intermediate_size=128),
                          text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           vocab_size=len(tok)),
                          image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"))
    torch.manual_seed(0)
    return FastVLForConditionalGeneration(config)


@pytest.fixture
def folder(tmp_path):
    import random

    draw("red", "circle", "top left", random.Random(0)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (5000, 10)).save(tmp_path / "thin.png")
    (tmp_path / "dir.png").mkdir()
    return tmp_path


def dataset(folder, records, tok, model, name="data.jsonl", **kwargs):
    path = folder / name
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path.write_bytes(b"\n".join(lines) + b"\n")
    processor, counts, queries = data_settings(model, parse_args_stub())
    return LlavaDataset(path, folder, tok, processor, "qwen2", counts, queries, **kwargs)


def parse_args_stub():
    class Args:
        min_pixels = max_pixels = None

    return Args()


BAD = [
    ({"id": "five", "image": 5, "conversations": QA}, "malformed_record", r"'image' must be a file name.*got 5"),
    ({"image": ["ok.png", None], "conversations": QA}, "malformed_record", r"'image' must be.*None"),
    ({"image": {"path": "ok.png"}, "conversations": QA}, "malformed_record", r"'image' must be"),
    ({"image": "", "conversations": QA}, "malformed_record", r"'image' must be"),
    (b'{"image": "ok.png", "conversations": [{"from": "human", "value": "caf\xe9"}]}', "malformed_record",
     r"not valid JSON in UTF-8"),
    (b"[1, 2", "malformed_record", r"not valid JSON"),
    ({"conversations": "hello"}, "malformed_record", r"no 'conversations' list"),
    ({"conversations": [{"from": "gpt", "value": "hi"}]}, "malformed_record", r"alternate"),
    ({"conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": "x"}]}, "malformed_record", r"str"),
    ({"image": "ok.png", "conversations": QA[:1]}, "no_supervised_token", r"nothing to learn"),
    ({"image": "gone.png", "conversations": QA}, "missing_image", r"gone\.png' not found"),
    ({"image": "dir.png", "conversations": QA}, "missing_image", r"dir\.png' not found"),
    ({"image": "garbage.png", "conversations": QA}, "bad_image", r"garbage\.png' cannot be read"),
    ({"image": "truncated.png", "conversations": QA}, "bad_image", r"truncated\.png' cannot be read"),
    ({"image": "thin.png", "conversations": QA}, "bad_image", r"cannot be processed.*aspect ratio"),
    ({"image": "ok.png", "conversations": [QA[0], {"from": "gpt", "value": "red " * 60}]}, "too_long",
     r"tokens, more than max_length=60"),
]


@pytest.mark.parametrize("record, cause, match", BAD, ids=[f"{c}-{i}" for i, (_, c, _) in enumerate(BAD)])
def test_bad_records_name_file_record_and_cause(folder, tok, model, record, cause, match):
    data = dataset(folder, [{"image": "ok.png", "conversations": QA}, record], tok, model, max_length=60)
    assert data[0]["input_ids"].numel() <= 60
    with pytest.raises(SampleError, match=match) as info:
        data[1]
    assert info.value.cause == cause
    assert "data.jsonl" in str(info.value) and "record 1" in str(info.value)
    if cause == "missing_image":
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, MissingImageError)
    assert SkippingDataset(data)[1] == {"skipped": cause, "error": str(info.value)}


def test_json_file_errors(folder, tok, model):
    (folder / "latin1.json").write_bytes(b'[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]')
    with pytest.raises(ValueError, match=r"json_path: .*latin1\.json.*not valid JSON in UTF-8"):
        LlavaDataset(folder / "latin1.json", folder, tok, NativeResolutionProcessor(), "qwen2", 4)
    (folder / "ok.json").write_text("[]")
    with pytest.raises(ValueError, match="max_length"):
        LlavaDataset(folder / "ok.json", folder, tok, NativeResolutionProcessor(), "qwen2", 4, max_length=0)
    with pytest.raises(ValueError, match="'<learnable>' of template 'qwen2' is not a single token"):  # at once
        LlavaDataset(folder / "ok.json", folder, tok, NativeResolutionProcessor(), "qwen2", 4, num_query_tokens=9)


def test_collator_skips_and_fills(folder, tok, model):
    data = SkippingDataset(dataset(folder, [{"image": "ok.png", "conversations": QA}, {"conversations": TEXT},
                                            {"image": "gone.png", "conversations": QA},
                                            {"conversations": TEXT[:1]}], tok, model))
    processor, counts, queries = data_settings(model, parse_args_stub())
    filler = filler_sample(processor, counts, model.config.image_token_id, tok.pad_token_id)
    collate = TrainCollator(tok, filler)
    mixed = collate([data[0], data[1], data[2]])
    assert mixed["num_samples"] == 2 and mixed["input_ids"].shape[0] == 2
    assert [c for c, _ in mixed["skipped"]] == ["missing_image"]
    assert mixed["num_tokens"] == data[0]["input_ids"].numel() + data[1]["input_ids"].numel()
    assert mixed["num_items"] == (mixed["labels"][:, 1:] != IGNORE_INDEX).sum() > 0
    text = collate([data[1]])  # no image: the filler row joins, unsupervised
    assert text["input_ids"].shape[0] == 2 and text["image_grid_thw"].shape == (1, 3)
    assert (text["labels"][1] == IGNORE_INDEX).all() and text["num_samples"] == 1
    nothing = collate([data[2], data[3]])  # every record skipped: only the filler, nothing supervised
    assert nothing["num_samples"] == 0 and nothing["num_items"] == 0
    assert sorted(c for c, _ in nothing["skipped"]) == ["missing_image", "no_supervised_token"]
    # the model runs on the filler alone; the loss is exactly zero, every gradient zero and finite
    model.train()
    inputs = {k: nothing[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")}
    loss = model(**inputs, num_items_in_batch=max(nothing["num_items"], 1)).loss
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)
    model.zero_grad(set_to_none=True)


def test_dataset_list_and_sampling(folder, tok, model):
    records = [{"id": str(i), "conversations": TEXT} for i in range(10)]
    (folder / "a.json").write_text(json.dumps(records))
    (folder / "list.yaml").write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: first:3\n"
                                      "  - json_path: a.json\n    sampling_strategy: end:20%\n"
                                      "  - json_path: a.json\n    sampling_strategy: random:4\n"
                                      "  - json_path: a.json\n")
    processor, counts, queries = data_settings(model, parse_args_stub())
    kwargs = dict(tokenizer=tok, processor=processor, template="qwen2", num_image_tokens=counts)
    data = build_dataset(str(folder / "list.yaml"), str(folder), 0, **kwargs)
    assert len(data) == 3 + 2 + 4 + 10
    parts = data.datasets
    assert parts[0].indices == [0, 1, 2] and parts[1].indices == [8, 9] and len(set(parts[2].indices)) == 4
    assert build_dataset(str(folder / "list.yaml"), str(folder), 0, **kwargs).datasets[2].indices == parts[2].indices
    for bad in ("sampling_strategy: last:3", "sampling_strategy: first:x", "sampling_strategy: all:3"):
        (folder / "bad.yaml").write_text(f"datasets:\n  - json_path: a.json\n    {bad}\n")
        with pytest.raises(ValueError, match=r"datasets\[0\].*sampling_strategy"):
            build_dataset(str(folder / "bad.yaml"), str(folder), 0, **kwargs)
    (folder / "empty.yaml").write_text("datasets: []\n")
    with pytest.raises(ValueError, match="non-empty 'datasets' list"):
        build_dataset(str(folder / "empty.yaml"), str(folder), 0, **kwargs)


def test_resumable_sampler_continues_the_same_order():
    data = list(range(23))
    for rank in (0, 1):
        sampler = ResumableSampler(data, 2, rank, seed=3)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            full = list(sampler)
            sampler.set_epoch(epoch, start=5)
            assert list(sampler) == full[5:] and len(sampler) == len(full) - 5
        assert full != list(range(rank, 23, 2))  # shuffled


def test_sample_sizes_from_headers_and_packed_collator(folder, tok, model):
    """Sizes measured without decoding pixels match the samples; a packed batch has no padding."""
    records = [{"image": "ok.png", "conversations": QA}, {"conversations": TEXT}, {"image": "gone.png",
                                                                                     "conversations": QA}]
    data = dataset(folder, records, tok, model)
    _, counts, _ = data_settings(model, parse_args_stub())
    sizes = sample_sizes(data, counts.vit_patches)
    assert sizes[2] is None  # cannot become a sample: skipped when loaded
    for size, sample in zip(sizes[:2], (data[0], data[1])):
        assert size == (sample["input_ids"].numel(), counts.vit_patches(sample))
    assert sizes[0][1] == data[0]["pixel_values"].shape[0] > 0 and sizes[1][1] == 0
    processor, *_ = data_settings(model, parse_args_stub())
    filler = filler_sample(processor, counts, model.config.image_token_id, tok.pad_token_id)
    skipping = SkippingDataset(data)
    batch = TrainCollator(tok, filler, packed=True)([skipping[0], skipping[1], skipping[2]])
    assert batch["input_ids"].shape == (1, sizes[0][0] + sizes[1][0]) and "attention_mask" not in batch
    assert batch["num_padding"] == 0 and batch["num_slots"] == batch["input_ids"].numel()
    assert batch["cu_seq_lens_q"].tolist() == [0, sizes[0][0], sizes[0][0] + sizes[1][0]]
    padded = TrainCollator(tok, filler)([skipping[0], skipping[1]])
    assert padded["num_padding"] == sizes[0][0] - sizes[1][0] and padded["num_items"] == batch["num_items"]


def test_best_fit_decreasing():
    items = [(10 + i, tokens, patches) for i, (tokens, patches) in enumerate(
        [(5, 0), (7, 4), (3, 4), (9, 0), (2, 1), (4, 8), (12, 2), (1, 0)])]
    size = {i: (t, p) for i, t, p in items}
    bins = best_fit_decreasing(items, 10)
    assert sorted(i for b in bins for i in b) == sorted(size)
    assert [16] in bins  # 12 tokens > 10: alone in its bin
    assert all(sum(size[i][0] for i in b) <= 10 for b in bins if b != [16])
    assert len(bins) == 5  # 43 tokens, 12 of them alone: the best possible
    assert all(b == sorted(b, key=[i for i, _, _ in items].index) for b in bins)  # items keep their order
    capped = best_fit_decreasing(items, 10, max_patches=8)
    assert all(sum(size[i][1] for i in b) <= 8 for b in capped)
    assert [15] in best_fit_decreasing(items, 10, max_patches=3)  # 8 patches > 3: alone in its bin


def test_packed_batches_are_seeded_shared_out_and_resume():
    sizes = [(1 + (7 * i) % 13, i % 3) for i in range(40)] + [None]
    plans = [PackedBatches(sizes, 2, rank, seed=3, max_tokens=16, window=16) for rank in (0, 1)]
    for epoch in (0, 1):
        everything = plans[0].plan(epoch)
        assert sorted(i for b in everything for i in b) == list(range(41))  # each record once
        assert all(sum(sizes[i][0] for i in b if sizes[i]) <= 16 for b in everything)
        mine = []
        for sampler in plans:
            sampler.set_epoch(epoch)
            mine.append(list(sampler))
            assert len(sampler) == len(mine[-1]) == len(everything) // 2
            sampler.set_epoch(epoch, start=3)
            assert list(sampler) == mine[-1][3:] and len(sampler) == len(mine[-1]) - 3
        assert not set(map(tuple, mine[0])) & set(map(tuple, mine[1]))  # ranks share nothing
    assert plans[0].plan(0) != plans[0].plan(1)
    assert PackedBatches(sizes, 2, 0, seed=3, max_tokens=16, window=16).plan(1) == plans[1].plan(1)  # seeded
    assert PackedBatches(sizes, 2, 0, seed=4, max_tokens=16, window=16).plan(1) != plans[1].plan(1)
    # the order stays random: the first window's records pack among themselves
    order = torch.randperm(41, generator=torch.Generator().manual_seed(3)).tolist()
    first = {i for b in plans[0].plan(0) for i in b if i in order[:16]}
    assert first == set(order[:16]) and sorted(order[:16]) != order[:16]


def test_arguments_yaml_flags_and_aliases(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "run.yaml").write_text(f"model_name_or_path: {tmp_path}\ndata_path: {tmp_path / 'd.json'}\n"
                                       f"output_dir: {tmp_path / 'out'}\nlearning_rate: 1.0e-3\nbf16: true\n")
    args = parse_args([str(tmp_path / "run.yaml"), "--learning_rate", "2e-4", "--version", "plain",
                       "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model", "--gradient_checkpointing", "True",
                       "--fsdp", "full_shard auto_wrap"])
    assert args.learning_rate == 2e-4 and args.bf16 and args.template == "plain" and args.gradient_checkpointing
    assert args.parts == ["projector", "llm"] and args.fsdp_mode == "full_shard"
    assert parse_args([str(tmp_path / "run.yaml"), "--fsdp"]).fsdp_mode == "full_shard"
    assert parse_args([str(tmp_path / "run.yaml")]).fsdp_mode is None
    for flags, match in [(["--tune_parts", "eyes"], "tune_parts"), (["--learning_rate", "nan"], "learning_rate"),
                         (["--warmup_ratio", "2"], "warmup_ratio"), (["--fsdp", "hybrid"], "fsdp"),
                         (["--fsdp", "--deepspeed", "zero2"], "exclude"), (["--version", "vicuna"], "template"),
                         (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
                         (["--image_folder", str(tmp_path / "nope")], "image_folder"),
                         (["--vision_tower", str(tmp_path)], "either"),
                         (["--packing"], "max_tokens_per_batch.*required"),
                         (["--packing", "--max_tokens_per_batch", "100"], "max_tokens_per_batch.*model_max_length"),
                         (["--max_tokens_per_batch", "4096"], "max_tokens_per_batch.*needs --packing"),
                         (["--packing", "--max_tokens_per_batch", "4096", "--max_patches_per_batch", "0"],
                          "max_patches_per_batch")]:
        with pytest.raises(ValueError, match=match):
            parse_args([str(tmp_path / "run.yaml"), *flags])
    (tmp_path / "typo.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match="unknown arguments.*learning_rat"):
        parse_args([str(tmp_path / "typo.yaml")])
    with pytest.raises(ValueError, match="output_dir"):
        parse_args(["--data_path", str(tmp_path / "d.json"), "--model_name_or_path", str(tmp_path)])


def test_deepspeed_config_fills_auto(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    args = parse_args(["--model_name_or_path", str(tmp_path), "--data_path", str(tmp_path / "d.json"),
                       "--output_dir", str(tmp_path), "--per_device_train_batch_size", "4",
                       "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5"])
    config = deepspeed_config("zero3", args, world=2, hidden_size=16)
    assert config["train_batch_size"] == 16 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["reduce_bucket_size"] == 256
    (tmp_path / "mine.json").write_text(json.dumps({"train_batch_size": 99, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="train_batch_size=99"):
        deepspeed_config(str(tmp_path / "mine.json"), args, world=2, hidden_size=16)
    (tmp_path / "odd.json").write_text(json.dumps({"steps_per_print": "auto"}))
    with pytest.raises(ValueError, match="steps_per_print"):
        deepspeed_config(str(tmp_path / "odd.json"), args, world=2, hidden_size=16)
