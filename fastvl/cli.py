"""The ``fastvl`` command line."""
import argparse
import sys


def _positive_int(text):
    """argparse type: an int >= 1 (argparse names the option and exits with status 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv=None):
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastvl", description="fastvl: fused Triton kernels and model code for fast small vision-language models"
    )
    parser.add_argument("--version", action="version", version=f"fastvl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("gate", help="compile every Triton kernel for sm_80/sm_90 and report registers, spills, smem")
    gate.add_argument("--kernel", help="regular expression on kernel names")
    gate.add_argument("--perf", action="store_true",
                      help="also read each hot loop's SASS: instruction mix and the ceiling on the fraction of peak")
    gate.add_argument("--jobs", type=int, help="parallel compilations (default: one per CPU)")
    gate.add_argument("--arch", type=int, action="append", choices=(80, 90),
                      help="compile for this compute capability only (repeatable; default: 80 and 90)")
    bench = sub.add_parser("bench", help="benchmark suites on embedded default shapes: tables, JSON and plots")
    from .bench import add_arguments

    add_arguments(bench)
    generate = sub.add_parser("generate", help="answer a prompt about an image with a saved FastVL model")
    generate.add_argument("--model", required=True,
                          help="directory of a FastVL model (or a Qwen2-VL, SliMM or FlashSloth one) and its tokenizer")
    generate.add_argument("--image", required=True, help="image file")
    generate.add_argument("--prompt", required=True, help="question or instruction")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=128, help="at most this many tokens (>= 1)")
    convert = sub.add_parser("convert", help="write a Qwen2-VL, Qwen2.5-VL, SliMM or FlashSloth checkpoint as FastVL")
    convert.add_argument("src", help="checkpoint directory")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--from", dest="source", default="auto", choices=("auto", "qwen2_vl", "slimm", "flashsloth"),
                         help="checkpoint format (default: from its config.json)")
    convert.add_argument("--vision-model", help="local vision tower directory for a checkpoint that names a hub "
                         "model (SliMM's custom_visual_model, FlashSloth's mm_vision_tower)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                         help="default: the checkpoint's")
    sub.add_parser(  # listed for --help; main() hands "train ..." to _train before parsing
        "train", add_help=False, help="train a FastVL model on LLaVA data (DDP, DeepSpeed ZeRO, FSDP2); "
        "fastvl train --help lists the flags; --nproc_per_node N runs N ranks with torchrun; "
        "--demo DIR trains a tiny captioner on generated images")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its flags go to the training parser as they are
        return _train(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "gate":
        from .gate import ARCHS, run

        return run(args.kernel, perf=args.perf, jobs=args.jobs, archs=tuple(args.arch or ARCHS))
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "convert":
        return _convert(args)
    return 2


def _fail(command, message):
    print(f"fastvl {command}: {message}", file=sys.stderr)
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
    """Exit status 2, with the offending path, when the model directory, its tokenizer or the image cannot be
    read, or the image cannot be processed (a decompression bomb, an aspect ratio the processor refuses)."""
    import os

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return _fail("generate", f"{args.model}: not a model directory (no config.json)")
    from PIL import Image

    from .data.image import to_pil

    try:
        with Image.open(args.image) as image:
            image = to_pil(image, args.image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return _fail("generate", f"{args.image}: cannot read the image ({exc})")
    import torch

    from .models import FastVLForConditionalGeneration, generate_text, image_processor, load_tokenizer

    try:
        model = FastVLForConditionalGeneration.from_pretrained(args.model, dtype="auto")
        tokenizer = load_tokenizer(args.model, model.config)
    except (OSError, ValueError) as exc:
        return _fail("generate", f"{args.model}: cannot load the model and tokenizer ({exc})")
    processor = image_processor(model.config, args.model)
    try:
        processor([image])
    except ValueError as exc:
        return _fail("generate", f"{args.image}: the model's image processor refuses it ({exc})")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    print(generate_text(model, tokenizer, [image], args.prompt, args.max_new_tokens, processor))
    return 0


def _convert(args):
    """Exit status 2 with the reason when the checkpoint cannot be converted."""
    import torch

    from .models import save_converted

    try:
        save_converted(args.src, args.dst, args.source, args.vision_model, args.dtype and getattr(torch, args.dtype))
    except (OSError, ValueError) as exc:
        return _fail("convert", str(exc))
    print(f"fastvl convert: wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
