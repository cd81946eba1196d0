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
    bench = sub.add_parser("bench", help="FLOPs, bytes and timings of every op on embedded default shapes")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats (CPU smoke run)")
    bench.add_argument("--out", help="write the results as JSON to this file")
    generate = sub.add_parser("generate", help="answer a prompt about an image with a saved FastVL model")
    generate.add_argument("--model", required=True, help="directory of a saved FastVL model and its tokenizer")
    generate.add_argument("--image", required=True, help="image file")
    generate.add_argument("--prompt", required=True, help="question or instruction")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=128, help="at most this many tokens (>= 1)")
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


def _generate(args):
    """Exit status 2, with the offending path, when the model directory or the image cannot be read, or the
    image cannot be processed (a decompression bomb, an aspect ratio the processor refuses)."""
    import os

    def fail(message):
        print(f"fastvl generate: {message}", file=sys.stderr)
        return 2

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return fail(f"{args.model}: not a model directory (no config.json)")
    from PIL import Image

    from .data.image import to_pil

    try:
        with Image.open(args.image) as image:
            image = to_pil(image, args.image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return fail(f"{args.image}: cannot read the image ({exc})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import FastVLForConditionalGeneration, generate_text
    from .models.generate import image_processor

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    except (OSError, ValueError) as exc:
        return fail(f"{args.model}: cannot load the model and tokenizer ({exc})")
    if not isinstance(model, FastVLForConditionalGeneration):
        return fail(f"{args.model}: holds a {type(model).__name__}, not a FastVL model")
    try:
        image_processor(model.config)([image])
    except ValueError as exc:
        return fail(f"{args.image}: the model's image processor refuses it ({exc})")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    print(generate_text(model, tokenizer, [image], args.prompt, args.max_new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
