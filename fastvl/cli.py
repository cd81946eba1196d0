"""The ``fastvl`` command line."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastvl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("gate", help="compile every Triton kernel for sm_80/sm_90 and report registers, spills, smem")
    gate.add_argument("--kernel", help="regular expression on kernel names")
    gate.add_argument("--perf", action="store_true",
                      help="also read each hot loop's SASS: instruction mix and the ceiling on the fraction of peak")
    gate.add_argument("--jobs", type=int, help="parallel compilations (default: one per CPU)")
    bench = sub.add_parser("bench", help="FLOPs, bytes and timings of every op on embedded default shapes")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats (CPU smoke run)")
    bench.add_argument("--out", help="write the results as JSON to this file")
    generate = sub.add_parser("generate", help="answer a prompt about an image with a saved FastVL model")
    generate.add_argument("--model", required=True, help="directory of a saved FastVL model and its tokenizer")
    generate.add_argument("--image", required=True, help="image file")
    generate.add_argument("--prompt", required=True, help="question or instruction")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    if args.command == "gate":
        from .gate import run

        return run(args.kernel, perf=args.perf, jobs=args.jobs)
    if args.command == "bench":
        from .bench import run

        return run(quick=args.quick, out=args.out)
    if args.command == "generate":
        return _generate(args)
    return 2


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
