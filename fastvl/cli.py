"""The ``fastvl`` command line."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastvl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("gate", help="compile every Triton kernel for sm_80/sm_90 and report registers, spills, smem")
    gate.add_argument("--kernel", help="regular expression on kernel names")
    bench = sub.add_parser("bench", help="FLOPs, bytes and timings of every op on embedded default shapes")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats (CPU smoke run)")
    bench.add_argument("--out", help="write the results as JSON to this file")
    generate = sub.add_parser("generate", help="answer a prompt about an image with a saved FastVL model")
    generate.add_argument("--model", required=True, help="directory of a saved FastVL model and its tokenizer")
    generate.add_argument("--image", required=True, help="image file")
    generate.add_argument("--prompt", required=True, help="question or instruction")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    sub.add_parser(  # listed for --help; main() hands "train ..." to _train before parsing
        "train", add_help=False, help="train a FastVL model on LLaVA data (DDP, DeepSpeed ZeRO, FSDP2); "
        "fastvl train --help lists the flags; --nproc_per_node N runs N ranks with torchrun; "
        "--demo DIR trains a tiny captioner on generated images")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its flags go to the training parser as they are
        return _train(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "gate":
        from .gate import run

        return run(args.kernel)
    if args.command == "bench":
        from .bench import run

        return run(quick=args.quick, out=args.out)
    if args.command == "generate":
        return _generate(args)
    return 2


def _train(argv):
    """``--nproc_per_node N`` (N > 1): the same arguments on N ranks through torchrun; ``--demo DIR``: the demo;
    otherwise one process."""
    launcher = argparse.ArgumentParser(prog="fastvl train", add_help=False)
    launcher.add_argument("--nproc_per_node", type=int, default=None)
    launcher.add_argument("--demo", default=None)
    known, rest = launcher.parse_known_args(argv)
    if known.nproc_per_node is not None and known.nproc_per_node < 1:
        print(f"fastvl train: --nproc_per_node must be positive, got {known.nproc_per_node}", file=sys.stderr)
        return 2
    if known.demo is not None:
        from .train.demo import run

        return run(known.demo, known.nproc_per_node or 2, rest)
    if (known.nproc_per_node or 1) > 1:
        from .train.launch import torchrun

        return torchrun(known.nproc_per_node, rest)
    from .train import main as train_main

    return train_main(rest)


def _generate(args):
    """Exit status 2, with the offending path, when the model directory or the image cannot be read."""
    import os

    def fail(message):
        print(f"fastvl generate: {message}", file=sys.stderr)
        return 2

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return fail(f"{args.model}: not a model directory (no config.json)")
    try:
        from PIL import Image

        with Image.open(args.image) as image:
            image = image.convert("RGB")
    except OSError as exc:
        return fail(f"{args.image}: cannot read the image ({exc})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import FastVLForConditionalGeneration, generate_text

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    except (OSError, ValueError) as exc:
        return fail(f"{args.model}: cannot load the model and tokenizer ({exc})")
    if not isinstance(model, FastVLForConditionalGeneration):
        return fail(f"{args.model}: holds a {type(model).__name__}, not a FastVL model")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    print(generate_text(model, tokenizer, [image], args.prompt, args.max_new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
