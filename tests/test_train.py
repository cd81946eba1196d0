"""Training runs: stage freezing, one-process outputs (metrics, summary, plot, checkpoints, final model), bad
data, and 2-rank torchrun runs on CPU/gloo (DDP, FSDP2, ZeRO-2, ZeRO-3) with mixed text-only/image ranks and a
SIGKILL + --resume that ends bit-identical to an uninterrupted run; packed runs (one process with an exact resume,
two ranks sharing the micro-batches, FSDP2 and ZeRO-2/3 against packed DDP)."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from fastvl.cli import main as cli
from fastvl.train import parse_args
from fastvl.train.data import ResumableSampler
from fastvl.train.demo import tiny_model, tokenizer, write_dataset
from fastvl.train.engine import TorchEngine
from fastvl.train.launch import torchrun_command
from fastvl.train.model import data_settings, freeze, param_groups

STEPS = 24
COMMON = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_steps", str(STEPS),
          "--logging_steps", "1", "--save_steps", "4", "--learning_rate", "1e-3", "--mm_projector_lr", "2e-3",
          "--tune_parts", "vision,projector,llm", "--dataloader_num_workers", "1", "--seed", "0",
          "--max_bad_fraction", "0.5"]
TEXT_ONLY = {"conversations": [{"from": "human", "value": "What do you see?"},
                               {"from": "gpt", "value": "a blue square at the top left"}]}
QA = [{"from": "human", "value": "<image>\nWhat is in the image?"},
      {"from": "gpt", "value": "a red circle at the top left"}]
BAD = [{"id": "lost", "image": "images/lost.png", "conversations": QA},
       {"id": "mute", "image": "images/00000.png", "conversations": QA[:1]},
       {"id": "odd", "image": 5, "conversations": QA}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model and a data set: 16 images, 12 text-only records, 3 bad records."""
    root = tmp_path_factory.mktemp("train")
    tok = tokenizer()
    tiny_model(tok).save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    data = write_dataset(root / "data", 16, seed=1)
    with open(data, "a") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"text{i}", **TEXT_ONLY}) + "\n")
        for record in BAD:
            f.write(json.dumps(record) + "\n")
    return root, ["--model_name_or_path", str(root / "init"), "--data_path", str(data),
                  "--image_folder", str(root / "data")]


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# the ranks run the reference ops: the Triton interpreter (which conftest turns on) is for kernel tests
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}


def run_ranks(args, nproc=2, timeout=600):
    proc = subprocess.run(torchrun_command(nproc, args), env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


# ------------------------------------------------------------------------------------------------- one process

def test_stage_freezing_no_graph_no_grads_no_state():
    tok = tokenizer()
    model = tiny_model(tok).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = parse_args_for(mm_projector_lr=5e-3)
    freeze(model, ["projector"])
    groups = param_groups(model, args)
    assert {g["part"] for g in groups} == {"projector"} and {g["lr"] for g in groups} == {5e-3}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}  # none on biases and norms
    engine = TorchEngine(model, args, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         torch.device("cpu"), 1)
    seen = []
    model.vision_tower.register_forward_hook(lambda m, i, out: seen.append(out[0].requires_grad))
    processor, counts, _ = data_settings(model, args)
    from fastvl.train.data import TrainCollator, filler_sample
    from fastvl.train.demo import samples
    from fastvl.data import tokenize_conversation

    batch_samples = []
    for image, colour, shape, place in samples(2, seed=0):
        out = processor([image])
        conv = [QA[0], {"from": "gpt", "value": f"a {colour} {shape} at the {place}"}]
        batch_samples.append({**tokenize_conversation(conv, tok, "qwen2", counts(out)), **out})
    batch = TrainCollator(tok, filler_sample(processor, counts, model.config.image_token_id, tok.pad_token_id))(
        batch_samples)
    for _ in range(2):
        engine.backward(batch, batch["num_items"], True)
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_grads
        engine.step()
    assert seen == [False, False]  # the frozen tower built no autograd graph
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("compressor.") for k in changed)
    state_params = set(engine.optimizer.state)
    assert state_params == {p for p in model.compressor.parameters()}
    with pytest.raises(ValueError, match="embq"):
        freeze(tiny_model(tok), ["embq"])


def parse_args_for(**overrides):
    args = parse_args(["--model_name_or_path", ".", "--data_path", ".", "--output_dir", ".",
                       "--weight_decay", "0.01"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@pytest.mark.slow
def test_one_process_run_outputs_and_resume_guard(setup, tmp_path, capsys):
    root, data = setup
    (tmp_path / "run.yaml").write_text("\n".join(f"{k}: {v}" for k, v in [
        ("model_name_or_path", data[1]), ("data_path", data[3]), ("image_folder", data[5]),
        ("per_device_train_batch_size", 4), ("max_steps", 3), ("logging_steps", 1), ("save_steps", 1),
        ("save_total_limit", 1), ("dataloader_num_workers", 0), ("max_bad_fraction", 0.9), ("learning_rate", 0.1)]))
    out = tmp_path / "out"
    assert cli(["train", str(tmp_path / "run.yaml"), "--output_dir", str(out), "--learning_rate", "1e-3"]) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "padding_fraction"} <= row.keys()
        assert row["lrs"]["projector"] <= 1e-3 and torch.isfinite(torch.tensor(row["loss"]))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 1 and summary["final_loss"] == rows[-1]["loss"]
    assert summary["samples"] + sum(summary["records_skipped"].values()) == 12
    assert (out / "loss_curve.png").stat().st_size > 0
    assert sorted(os.listdir(out / "checkpoint-2")) and not (out / "checkpoint-1").exists()  # save_total_limit
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "FastVLForConditionalGeneration"
    image = root / "data" / "images" / "00000.png"
    assert cli(["generate", "--model", str(out), "--image", str(image), "--prompt", "What is in the image?",
                "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert cli(["train", str(tmp_path / "run.yaml"), "--output_dir", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_packed_run_and_exact_resume(setup, tmp_path, capsys):
    """--packing: no padding, and a resume from a mid-run checkpoint ends bit-identical to the uninterrupted run."""
    root, data = setup
    args = [*data, "--packing", "--max_tokens_per_batch", "200", "--model_max_length", "200", "--max_steps", "6",
            "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--save_steps", "2",
            "--dataloader_num_workers", "0", "--seed", "0", "--max_bad_fraction", "0.5"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli(["train", *args, "--output_dir", str(full)]) == 0
    rows = metrics(full)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["padding_fraction"] == 0 and r["tokens_per_s"] > 0 for r in rows)
    summary = json.loads((full / "train_summary.json").read_text())
    assert summary["samples"] > 6 * 2  # several samples per micro-batch
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    assert cli(["train", *args, "--output_dir", str(resumed), "--resume"]) == 0
    got, want = weights(resumed), weights(full)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in rows]
    other = list(args)
    other[other.index("--max_tokens_per_batch") + 1] = "300"
    assert cli(["train", *other, "--output_dir", str(resumed), "--resume"]) != 0
    assert "max_tokens_per_batch" in capsys.readouterr().err  # the data position depends on it


def test_too_many_bad_records_stop_with_their_names(setup, tmp_path, capsys):
    root, data = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": f"gone{i}", "image": f"gone{i}.png", "conversations": QA}) + "\n"
                           for i in range(6)) + json.dumps(TEXT_ONLY) + "\n")
    status = cli(["train", "--model_name_or_path", data[1], "--data_path", str(bad), "--image_folder", str(tmp_path),
                  "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_steps", "3",
                  "--dataloader_num_workers", "0"])
    err = capsys.readouterr().err
    assert status == 1
    assert "max_bad_fraction" in err and "missing_image" in err and "(id 'gone" in err and "bad.jsonl" in err


# ------------------------------------------------------------------------------------------------- torchrun

def mixed_steps(records, image_records):
    """Steps where one rank's micro-batch has no image and the other's has one (the data order of COMMON)."""
    per_rank = []
    for rank in (0, 1):
        sampler = ResumableSampler(range(records), 2, rank, seed=0)
        sampler.set_epoch(0)
        per_rank.append([i in image_records for i in sampler])
    return [i for i, (a, b) in enumerate(zip(*per_rank)) if a != b]


@pytest.fixture(scope="module")
def ddp_run(setup):
    root, data = setup
    out = root / "ddp"
    err = run_ranks([*data, "--output_dir", str(out), *COMMON])
    return out, err


@pytest.mark.slow
def test_ddp_mixed_ranks_bad_records_and_summary(ddp_run):
    out, err = ddp_run
    assert mixed_steps(31, set(range(16))), "the data order must give text-only and image ranks together"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == "TorchEngine" and summary["steps"] == STEPS
    skipped = summary["records_skipped"]
    assert summary["samples"] + sum(skipped.values()) == STEPS * 2 * 2  # 2 ranks x 2 micro-batches of 1
    assert skipped["missing_image"] >= 1 and skipped["no_supervised_token"] >= 1 and skipped["malformed_record"] >= 1
    assert "skipped:" in err and "(id 'lost')" in err
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(out))


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(setup, ddp_run, tmp_path):
    root, data = setup
    reference, _ = ddp_run
    out = tmp_path / "killed"
    args = [*data, "--output_dir", str(out), *COMMON]
    proc = subprocess.Popen(torchrun_command(2, args), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-8").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run ended before it was killed"
    run_ranks(args + ["--resume"])
    resumed, uninterrupted = weights(out), weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(reference)]


@pytest.mark.slow
def test_packed_ddp_ranks_share_the_micro_batches(setup, tmp_path):
    """Two ranks measure the records' sizes in shares, gather them and train on disjoint packed micro-batches."""
    root, data = setup
    out = tmp_path / "packed"
    run_ranks([*data, "--output_dir", str(out), "--packing", "--max_tokens_per_batch", "200", "--model_max_length",
               "200", "--max_steps", "3", "--logging_steps", "1", "--dataloader_num_workers", "1", "--seed", "0",
               "--max_bad_fraction", "0.5"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["samples"] + sum(summary["records_skipped"].values()) > 3 * 2  # several records per micro-batch
    assert all(r["padding_fraction"] == 0 and torch.isfinite(torch.tensor(r["loss"])) for r in metrics(out))


ENGINES = {"fsdp": ["--fsdp"], "zero2": ["--deepspeed", "zero2"], "zero3": ["--deepspeed", "zero3"]}


def assert_same_run(out, reference):
    """The same losses, gradient norms and final weights as the reference run."""
    ours, ref = metrics(out), metrics(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3, abs=1e-5)
    got, want = weights(out), weights(reference)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engines_match_ddp(setup, ddp_run, tmp_path, engine):
    """Same data, same steps: FSDP2 and ZeRO-2/3 give DDP's losses, gradient norms and weights."""
    root, data = setup
    reference, _ = ddp_run
    out = tmp_path / engine
    run_ranks([*data, "--output_dir", str(out), *COMMON, *ENGINES[engine]])
    assert_same_run(out, reference)


# Records hold 27-39 LLM tokens, so 120 packs 1-7 of them per micro-batch: with this seed some micro-batches
# are text-only (the filler sample) while the other rank's has images, and some carry the bad records.
PACKED = ["--packing", "--max_tokens_per_batch", "120", "--model_max_length", "120",
          "--gradient_accumulation_steps", "2", "--max_steps", "4", "--logging_steps", "1", "--save_steps", "0",
          "--learning_rate", "1e-3", "--mm_projector_lr", "2e-3", "--tune_parts", "vision,projector,llm",
          "--dataloader_num_workers", "0", "--seed", "0", "--max_bad_fraction", "0.5"]


@pytest.fixture(scope="module")
def packed_ddp_run(setup):
    root, data = setup
    out = root / "packed_ddp"
    run_ranks([*data, "--output_dir", str(out), *PACKED])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_packed_engines_match_ddp(setup, packed_ddp_run, tmp_path, engine):
    """--packing under FSDP2 and ZeRO-2/3: no padding, and the packed DDP run's losses, gradient norms and
    weights."""
    root, data = setup
    out = tmp_path / engine
    run_ranks([*data, "--output_dir", str(out), *PACKED, *ENGINES[engine]])
    summary = json.loads((packed_ddp_run / "train_summary.json").read_text())
    micro_batches = summary["steps"] * 2 * 2  # 2 ranks x 2 accumulated
    assert summary["samples"] + sum(summary["records_skipped"].values()) > 2 * micro_batches  # several in each
    assert all(r["padding_fraction"] == 0 for r in metrics(out) + metrics(packed_ddp_run))
    assert_same_run(out, packed_ddp_run)


@pytest.mark.slow
def test_new_model_from_checkpoints_flashsloth_style(setup, tmp_path):
    """FlashSloth's recipe from a SigLIP tower and a causal LM: SAP, EmbQ, the phi2 template (its tokens added
    to the tokenizer, the embeddings resized), stage 1 (projector only), then stage 2 from the saved model."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from test_data import _byte_tokenizer  # a byte-level BPE: reloads as the LLM's own tokenizer class

    root, data = setup
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=128, intermediate_size=160, num_hidden_layers=3,
                                         num_attention_heads=2, image_size=3 * 14, patch_size=14)).save_pretrained(
        tmp_path / "siglip")
    tok = _byte_tokenizer(specials=[])
    llm = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok)))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    common = ["--data_path", data[3], "--image_folder", data[5], "--per_device_train_batch_size", "4",
              "--max_steps", "2", "--dataloader_num_workers", "0", "--max_bad_fraction", "0.5"]
    stage1 = tmp_path / "stage1"
    assert cli(["train", "--vision_tower", str(tmp_path / "siglip"), "--language_model", str(tmp_path / "llm"),
                "--compressor", "sap", "--use_embq", "--num_query_tokens", "3", "--embq_layer", "1",
                "--version", "phi2", "--tune_parts", "projector", "--output_dir", str(stage1), *common]) == 0
    model = AutoModelForCausalLM.from_pretrained(stage1)
    assert model.config.chat_template == "phi2" and model.config.use_embq and model.config.compressor == "sap"
    assert model.get_input_embeddings().num_embeddings > len(tok)  # <image>, </s>, <learnable> added
    start = dict(llm.named_parameters())
    assert all(torch.equal(p, start[n[len("language_model."):]]) for n, p in model.named_parameters()
               if n.startswith("language_model.") and "embed_tokens" not in n and "lm_head" not in n)
    summary = json.loads((stage1 / "train_summary.json").read_text())
    assert summary["tune_parts"] == ["projector"] and summary["final_loss"] > 0
    assert cli(["train", "--model_name_or_path", str(stage1), "--tune_parts", "projector,embq,llm",
                "--output_dir", str(tmp_path / "stage2"), *common]) == 0
    assert json.loads((tmp_path / "stage2" / "train_summary.json").read_text())["tune_parts"] == [
        "projector", "embq", "llm"]


@pytest.mark.slow
def test_demo_learns_to_caption(tmp_path, monkeypatch):
    """A shortened demo (fewer images and steps than the real one): captions of fresh images far above chance."""
    from fastvl.train import demo

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the ranks run the reference ops
    assert demo.run(str(tmp_path), nproc=2, extra_args=["--max_steps", "150", "--save_steps", "50"],
                    train_images=800, eval_images=40) == 0
    result = json.loads((tmp_path / "demo_eval.json").read_text())
    accuracy, chance = result["accuracy"], result["chance"]
    assert accuracy["colour"] >= 0.9 and accuracy["caption"] >= 10 * chance["caption"], result
