"""Packed batches (transformers' DataCollatorWithFlattening layout) against the padded batch of the same samples,
in float64: the same summed loss and the same gradient for every parameter, for every compressor, EmbQ (fastvl's
rules and FlashSloth's), text-only samples in the pack and an M-RoPE LLM; the lm_head on supervised positions
only; bad packed inputs as named errors."""
import pytest
import torch
from transformers import DataCollatorWithFlattening

from fastvl.data import IGNORE_INDEX, Collator
from fastvl.integrations import register_attention
from fastvl.testing import assert_close

from test_models import IMAGE, PAD, QUERY, embq_model, pixels, tiny_model

# (images of the sample as native grids, answer length): two images, text only, a two-frame grid, text only
SAMPLES = [([[1, 4, 8], [1, 8, 4]], 3), ([], 4), ([[2, 4, 4]], 2), ([], 1)]


class _Pad:
    pad_token_id = PAD


def samples(model, spec=SAMPLES, query=0, seed=1):
    """Samples as a dataset gives them: ids, labels (the answer supervised) and their images' pixel rows."""
    grids = [g for images, _ in spec for g in images]
    fixed = model.config.vision_config.tower == "fixed"
    pv, grid = pixels(model, grids=grids or [[1, 4, 4]], images=len(grids), seed=seed)
    counts = iter(model.num_image_tokens(pv if fixed else grid) if grids else [])
    rows = iter(range(len(grids)))
    out, start = [], 0
    for b, (images, answer) in enumerate(spec):
        n = sum(next(counts) for _ in images)
        prompt = [5 + b, 6] + [IMAGE] * n + [7, 8 + b, 9] + [QUERY] * query
        ids = prompt + [10 + (b + i) % 20 for i in range(answer)]
        sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + ids[len(prompt):])}
        if fixed:
            idx = [next(rows) for _ in images]
            sample["pixel_values"] = pv[idx[0]:idx[-1] + 1] if idx else pv[:0]
        else:
            size = sum(t * h * w for t, h, w in images)
            sample["pixel_values"] = pv[start:start + size]
            sample["image_grid_thw"] = torch.tensor(images, dtype=torch.int64).reshape(-1, 3)
            start += size
        out.append(sample)
    return out


def packed(batch_samples, flash_kwargs=True):
    """The packed batch: DataCollatorWithFlattening's layout (without its offsets: position_ids alone) plus every
    sample's images in order."""
    batch = Collator(_Pad, packed=True)(batch_samples)
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in batch_samples])
    assert all(torch.equal(torch.as_tensor(batch[k]), torch.as_tensor(v)) for k, v in flat.items())
    return {k: v for k, v in batch.items() if flash_kwargs or k in flat or k.startswith(("pixel", "image"))}


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    out = model(**batch, num_items_in_batch=items, **kwargs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def use_fastvl_attention(model):
    register_attention()
    model.set_attn_implementation({"text_config": "fastvl"})
    return model


def assert_packed_matches_padded(model, batch_samples, flash_kwargs=True):
    model = model.double()
    padded = Collator(_Pad)(batch_samples)
    padded["pixel_values"] = padded["pixel_values"].double()
    want, want_grads = loss_and_grads(model, padded)  # the model's own (sdpa) attention
    pack = packed(batch_samples, flash_kwargs)
    pack["pixel_values"] = pack["pixel_values"].double()
    got, got_grads = loss_and_grads(use_fastvl_attention(model), pack)
    assert_close(got.loss, want.loss, tol=1e-12, name="loss")
    assert_same_grads(got_grads, want_grads)


def assert_same_grads(got, want, tol=1e-10):
    """Every parameter's gradient to float64 round-off: relative ``tol``, or ``tol / 100`` of the whole gradient's
    norm for gradients that are 0 up to round-off (SAP's b2, biases a softmax cancels)."""
    assert got.keys() == want.keys()
    trained = [n for n, g in want.items() if g is not None]
    assert len(trained) > 0.9 * len(want)  # placeholders aside, everything learns
    scale = torch.stack([g.norm() for g in want.values() if g is not None]).norm()
    for name in want:
        if want[name] is None:
            assert got[name] is None or not got[name].any(), name
        else:
            err = (got[name] - want[name]).norm()
            assert err <= tol * want[name].norm() + tol / 100 * scale, f"{name}: error {err:.3g}"


COMPRESSORS = {
    "none": dict(compressor="none"),
    "patch_merge": dict(compressor="patch_merge"),
    "sap": dict(compressor="sap"),
    "deepstack-midlayers": dict(compressor="deepstack"),
    "deepstack-efficient": dict(compressor="deepstack", deepstack_type="efficient"),
    "mrope": dict(compressor="patch_merge", mrope_section=[4, 6, 6]),
}


@pytest.mark.parametrize("case", COMPRESSORS)
def test_packed_equals_padded(case):
    model = tiny_model(**COMPRESSORS[case])
    assert_packed_matches_padded(model, samples(model), flash_kwargs=case != "mrope")


@pytest.mark.parametrize("rules", ["fastvl", "flashsloth"])
def test_packed_equals_padded_with_embq(rules):
    """EmbQ reads each sample's own question and images; FlashSloth's rules count from each sample's start."""
    if rules == "fastvl":
        model = embq_model()
        spec = SAMPLES
    else:
        model = tiny_model(dict(tower="fixed", image_size=6 * 14, hidden_act="gelu_pytorch_tanh"), compressor="sap",
                           use_embq=True, query_token_id=QUERY, num_query_tokens=3, embq_layer=2, embq_dim=32,
                           embq_question_start=1, embq_without_image="plain", embq_image="batch_index")
        spec = [([[1, 6, 6]], 3), ([[1, 6, 6]], 2), ([], 2)]
    calls = []
    model.embq.register_forward_hook(lambda *a: calls.append(1))
    assert_packed_matches_padded(model, samples(model, spec, query=3))
    assert len(calls) == 2 * 2  # the samples with images, padded then packed


def test_mrope_positions_restart_per_sample():
    """Each packed sample gets the M-RoPE positions it gets alone; given [3, 1, L] positions are used as they are."""
    model = use_fastvl_attention(tiny_model(mrope_section=[4, 6, 6]))
    batch = samples(model)
    seen = []
    rotary = model.get_decoder().rotary_emb
    rotary.register_forward_pre_hook(lambda mod, args: seen.append(mod.positions.clone()))
    pack = packed(batch)
    with torch.no_grad():
        model(**{k: v for k, v in pack.items() if k != "labels"})
        alone = []
        for s in batch:
            model(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"],
                  image_grid_thw=s["image_grid_thw"])
            alone.append(seen.pop())
        assert torch.equal(seen[0], torch.cat(alone, -1))
        given = model(**{k: v for k, v in pack.items() if k not in ("labels", "position_ids")},
                      position_ids=seen[0]).logits
        ref = model(**{k: v for k, v in pack.items() if k != "labels"}).logits
    assert torch.equal(given, ref)


def test_supervised_logits_only():
    """logits_to_keep='supervised': the lm_head on the positions whose next token is a target, the same loss and
    gradients as the full logits, padded and packed (to float32 round-off: transformers' loss casts the logits to
    float32, and sums a different number of ignored positions)."""
    model = tiny_model(compressor="patch_merge").double()
    batch = samples(model)
    padded = Collator(_Pad)(batch)
    padded["pixel_values"] = padded["pixel_values"].double()
    full, full_grads = loss_and_grads(model, padded)
    some, some_grads = loss_and_grads(model, padded, logits_to_keep="supervised")
    targets = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert full.logits.shape[:2] == padded["input_ids"].shape and some.logits.shape == (targets, 40)
    assert_close(some.loss, full.loss, tol=1e-6, name="loss")
    assert_same_grads(some_grads, full_grads, tol=1e-5)
    pack = packed(batch)
    pack["pixel_values"] = pack["pixel_values"].double()
    got, _ = loss_and_grads(use_fastvl_attention(model), pack, logits_to_keep="supervised")
    assert got.logits.shape == (targets, 40)
    assert_close(got.loss, full.loss, tol=1e-6, name="packed loss")
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**pack, logits_to_keep="answers")
    with pytest.raises(ValueError, match="without labels"):
        model(input_ids=pack["input_ids"], logits_to_keep="supervised")


def test_first_label_of_each_sample_is_never_a_target():
    """Labels without DataCollatorWithFlattening's separator: the last token of a sample does not learn the first
    token of the next."""
    model = use_fastvl_attention(tiny_model(compressor="patch_merge"))
    pack = packed(samples(model))
    starts = (pack["position_ids"] == 0).nonzero()[:, 1]
    unseparated = pack["labels"].clone()
    unseparated[0, starts] = pack["input_ids"][0, starts]
    with torch.no_grad():
        a = model(**pack).loss
        b = model(**{**pack, "labels": unseparated}).loss
    assert torch.equal(a, b)


def test_bad_packed_inputs():
    model = tiny_model(compressor="patch_merge")
    pack = packed(samples(model))
    with pytest.raises(ValueError, match='attn_implementation.*"fastvl".*sdpa'):
        model(**pack)
    use_fastvl_attention(model)
    ones = torch.ones_like(pack["input_ids"])
    without_cu = {k: v for k, v in pack.items() if not k.startswith(("cu_", "max_"))}
    cases = [
        (dict(pack, attention_mask=ones), ValueError, "attention_mask: a packed batch"),
        (dict(without_cu, attention_mask=ones), ValueError, "attention_mask: position_ids restart"),
        (dict(pack, cu_seq_lens_q=pack["cu_seq_lens_q"][:-1]), ValueError, "cu_seq_lens_q: offsets must"),
        (dict(pack, cu_seq_lens_q=pack["cu_seq_lens_q"].float()), TypeError, "cu_seq_lens_q"),
        (dict(pack, cu_seq_lens_k=pack["cu_seq_lens_k"].flip(0)), ValueError, "cu_seq_lens_k"),
        (dict(pack, position_ids=torch.arange(pack["input_ids"].shape[1])[None]), ValueError, "position_ids: they"),
        (dict(pack, position_ids=pack["position_ids"][:, :-1]), ValueError, "position_ids: expected"),
        (dict(without_cu, input_ids=pack["input_ids"].repeat(2, 1), labels=pack["labels"].repeat(2, 1),
              position_ids=pack["position_ids"].repeat(2, 1)), ValueError, "batch size 1"),
    ]
    for inputs, error, match in cases:
        with pytest.raises(error, match=match):
            model(**inputs)
