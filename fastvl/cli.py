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
    args = parser.parse_args(argv)
    if args.command == "gate":
        from .gate import run

        return run(args.kernel)
    if args.command == "bench":
        from .bench import run

        return run(quick=args.quick, out=args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
