"""eplb-compile: demo (the main job, CPU by default), graphs, bench, plot, examples, report, place.

A user's mistake is reported on one line of stderr naming the option and what
it accepts, with exit status 2, before any long work starts. It runs past 300
lines because every command's options and their up-front checks live here,
next to the shared checkers, so that one file says what the CLI accepts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """One line per error: the usage text would bury the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def bounded_int(minimum: int, maximum: int):
    """An argparse type: an integer from ``minimum`` to ``maximum``. Every int
    option has a maximum, so a typo such as 10**12 tokens is refused on one
    line, not met later as a traceback or an exhausted machine."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer from {minimum} to {maximum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be an integer <= {maximum}, got {value}")
        return value

    return parse


def _check_divides(parser, option: str, value: int, total: int, what: str) -> None:
    if total % value:
        divisors = ", ".join(str(d) for d in range(1, total + 1) if total % d == 0)
        parser.error(f"argument {option}: must divide the {what}, one of {divisors}; got {value}")


def _check_output_file(parser, option: str, path: Path, suffix: str | None = None) -> None:
    """Fail now, not after the run, on a file that cannot be written."""
    if suffix is not None and path.suffix.lower() != suffix:
        parser.error(f"argument {option}: must be a {suffix} file, got {str(path)!r}")
    parent = path.parent
    if not parent.is_dir():
        parser.error(f"argument {option}: directory {str(parent)!r} does not exist")
    if path.is_dir():
        parser.error(f"argument {option}: {str(path)!r} is a directory, expected a file name")
    # Try for real: permission bits say nothing to root, a read-only mount or /proc.
    try:
        if path.exists():
            with open(path, "ab"):  # appends nothing: the file is left as it is
                pass
        else:
            _create_and_remove_in(parent)
    except OSError as error:
        parser.error(f"argument {option}: {str(path)!r} cannot be written ({error.strerror or error})")


def _create_and_remove_in(directory: Path) -> None:
    descriptor, name = tempfile.mkstemp(dir=directory, prefix=".eplb-compile-write-check-")
    os.close(descriptor)
    os.remove(name)


def _check_output_dir(parser, option: str, path: Path, create: bool = False) -> None:
    """An existing, writable directory; with ``create``, also one whose parent exists (made by the command)."""
    if path.exists() and not path.is_dir():
        parser.error(f"argument {option}: {str(path)!r} is a file, expected a directory")
    if not path.is_dir() and not (create and path.parent.is_dir()):
        parser.error(f"argument {option}: directory {str(path if not create else path.parent)!r} does not exist "
                     "(pass an existing directory)")
    writable = path if path.is_dir() else path.parent
    try:
        _create_and_remove_in(writable)
    except OSError as error:
        parser.error(f"argument {option}: directory {str(writable)!r} cannot be written ({error.strerror or error})")


def _check_matplotlib(parser, option: str) -> None:
    from eplb_compile.plots import PLOT_EXTRA_HINT

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error(f"{option} needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}")


def _check_cuda(parser, device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but no CUDA device is available; use --device cpu")
    if device == "cuda":
        from eplb_compile.kernels import eager_extension

        try:
            eager_extension.enabled()
        except ValueError as error:
            parser.error(str(error))


def _demo(args: argparse.Namespace) -> int:
    from eplb_compile.demo import DemoConfig, format_report, lowering_mismatches, run_demo

    parser = args.parser
    defaults = DemoConfig()
    _check_divides(parser, "--ep-size", args.ep_size, defaults.num_physical,
                   f"{defaults.num_physical} physical experts ({defaults.num_logical} logical + "
                   f"{defaults.num_redundant} redundant)")
    _check_cuda(parser, args.device)
    if args.plot:
        _check_output_file(parser, "--plot", args.plot, ".png")
        _check_matplotlib(parser, "--plot")
    if args.save_window:
        _check_output_file(parser, "--save-window", args.save_window)
    if args.record:
        _check_output_dir(parser, "--record", args.record, create=True)
        if args.record.is_dir() and any(args.record.iterdir()):
            parser.error(f"argument --record: directory {str(args.record)!r} is not empty")
    cfg = DemoConfig(
        layers=args.layers,
        ep_size=args.ep_size,
        tokens_per_rank=args.tokens_per_rank,
        steps=args.steps,
        device=args.device,
        seed=args.seed,
        count_path_min_tokens=args.count_path_min_tokens,
        placement="linear" if args.linear else "eplb",
    )
    result = run_demo(cfg, compile=not args.eager)
    print(format_report(cfg, result))
    if args.record:
        from eplb_compile.demo_recording import write_demo_recording

        try:
            steps = write_demo_recording(cfg, result, str(args.record))
        except OSError as error:
            print(f"eplb-compile demo: error: {error}", file=sys.stderr)
            return 2
        print(f"recorded {steps} steps of {cfg.ep_size} EP ranks into {args.record} "
              f"(try: eplb-compile report {args.record} --what-if)")
    if args.plot:
        from eplb_compile.plots import imbalance_series, plot_imbalance_over_steps

        plot_imbalance_over_steps(imbalance_series(result.loads, cfg.ep_size), args.plot)
        print(f"wrote {args.plot}")
    if args.save_window:
        import torch

        torch.save(result.loads["topk"], args.save_window)
        print(f"wrote {args.save_window} ([steps, layers, physical] global loads)")
    problems = lowering_mismatches(result)
    if problems:
        print("MISMATCH between the lowerings and the reference:", *problems, sep="\n  ")
        return 1
    print(
        f"OK: topk and count lowerings gave identical global loads in all {cfg.steps} steps, "
        "equal to the element-wise reference"
    )
    return 0


def _graphs(args: argparse.Namespace) -> int:
    _check_cuda(args.parser, args.device)
    if args.regenerate:
        _check_output_dir(args.parser, "--out", args.out)
    from eplb_compile import capture

    if args.regenerate:
        capture.regenerate(args.out, args.device)
        return 0
    for path in capture.PATHS:
        for kind, text in capture.capture_graphs(path, args.device).items():
            print(f"===== {path} / {kind} =====")
            print(text)
    return 0


_WINDOW_FILE = ("a saved load window: a torch.save'd integer tensor [layers, physical] or "
                "[steps, layers, physical], as `eplb-compile demo --save-window FILE.pt` writes")


def _read_load_window(parser, path: Path):
    import torch

    if path.is_dir():
        parser.error(f"argument load: {str(path)!r} is a directory, expected {_WINDOW_FILE}")
    if not path.is_file():
        parser.error(f"argument load: no such file {str(path)!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes are not the user's business
            load = torch.load(path, map_location="cpu", weights_only=True)
    # A file that is not a tensor archive fails in many ways (pickle, zip,
    # struct errors); all mean the same to the user. torch's own text would
    # suggest unsafe loading, so it is not shown.
    except Exception:  # noqa: BLE001
        parser.error(f"argument load: {str(path)!r} is not {_WINDOW_FILE}")
    if not isinstance(load, torch.Tensor) or load.dim() not in (2, 3) or load.dtype.is_floating_point \
            or load.dtype.is_complex or load.dtype == torch.bool:
        what = f"{load.dtype} tensor of shape {tuple(load.shape)}" if isinstance(load, torch.Tensor) \
            else type(load).__name__
        parser.error(f"argument load: {str(path)!r} holds a {what}, not {_WINDOW_FILE}")
    # A dense tensor with data: a sparse, meta or quantized one has no values to draw.
    if load.layout != torch.strided or load.is_meta or load.is_quantized:
        kind = "meta" if load.is_meta else "quantized" if load.is_quantized else str(load.layout).split(".")[-1]
        parser.error(f"argument load: {str(path)!r} holds a {kind} tensor, not a dense one ({_WINDOW_FILE})")
    return load


def _plot(args: argparse.Namespace) -> int:
    parser = args.parser
    _check_output_file(parser, "-o/--output", args.output, ".png")
    _check_matplotlib(parser, "eplb-compile plot")
    load = _read_load_window(parser, args.load)
    _check_divides(parser, "--ep-size", args.ep_size, load.shape[-1], f"{load.shape[-1]} physical experts of the load")
    from eplb_compile.plots import plot_load_heatmap

    print(f"wrote {plot_load_heatmap(load, args.ep_size, args.output)}")
    return 0


def _examples(args: argparse.Namespace) -> int:
    from eplb_compile.ep_simulation import EXAMPLE_CONFIG as cfg

    parser = args.parser
    _check_divides(parser, "--ranks", args.ranks, cfg.num_physical, f"{cfg.num_physical} physical experts")
    _check_output_dir(parser, "--out", args.out, create=True)
    _check_matplotlib(parser, "eplb-compile examples")
    from eplb_compile.ep_simulation import example_title, run_spawned, verify
    from eplb_compile.plots import write_example_figures

    results = run_spawned(cfg, args.ranks)
    windows = {name: results[0][f"{name}_windows"] for name in ("topk", "counts")}
    args.out.mkdir(exist_ok=True)
    for path in write_example_figures(windows, args.ranks, args.out, title=example_title(cfg, args.ranks)):
        print(f"wrote {path}")
    failures = verify(cfg, args.ranks, results)
    if failures:
        print("MISMATCH between the lowerings and the reference:", *failures, sep="\n  ")
        return 1
    print(f"OK: both lowerings equal the reference in all {cfg.steps} steps on {args.ranks} ranks")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eplb-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # The maxima keep a laptop's demo in memory and time (tokens x ranks x layers).
    layers, tokens, steps = bounded_int(1, 256), bounded_int(1, 65536), bounded_int(1, 100_000)
    ranks, seed, crossover = bounded_int(1, 1024), bounded_int(0, 2**63 - 1), bounded_int(0, 2**31 - 1)

    demo = sub.add_parser("demo", help="compile a toy MoE block and record its load through both lowerings")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    demo.add_argument("--layers", type=layers, default=4)
    demo.add_argument("--ep-size", type=ranks, default=4, help="EP ranks; must divide the 20 physical experts")
    demo.add_argument("--tokens-per-rank", type=tokens, default=512)
    demo.add_argument("--steps", type=steps, default=8)
    demo.add_argument("--seed", type=seed, default=0)
    demo.add_argument("--count-path-min-tokens", type=crossover, default=None, help="selector crossover override")
    demo.add_argument("--eager", action="store_true", help="skip torch.compile")
    demo.add_argument("--plot", type=Path, metavar="FILE.png",
                      help="plot per-layer imbalance over steps for both lowerings (needs the [plot] extra)")
    demo.add_argument("--save-window", type=Path, metavar="FILE.pt", help="torch.save the [steps, layers, physical] loads")
    demo.add_argument("--record", type=Path, metavar="DIR",
                      help="also write the load in the vLLM plugin recorder's format into DIR (new or empty), "
                           "for report and place")
    demo.add_argument("--linear", action="store_true",
                      help="start on vLLM's linear placement instead of EPLB's from the routing prior")
    demo.set_defaults(func=_demo, parser=demo)

    graphs = sub.add_parser("graphs", help="print (or --regenerate) the captured graphs")
    graphs.add_argument("--regenerate", action="store_true", help="rewrite the goldens in --out")
    graphs.add_argument("--out", type=Path, default=Path("graphs"), help="existing goldens directory (default: ./graphs)")
    graphs.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    graphs.set_defaults(func=_graphs, parser=graphs)

    from eplb_compile.bench import add_bench_arguments, run_bench

    bench = sub.add_parser("bench", help="time the lowerings against vLLM's kernel (needs a CUDA GPU)")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)

    plot = sub.add_parser("plot", help="draw a layer x rank load heatmap from a saved load window (needs [plot])")
    plot.add_argument("load", type=Path, help="torch.save'd int tensor: [layers, physical] or [steps, layers, physical]")
    plot.add_argument("--ep-size", type=ranks, required=True, help="number of EP ranks")
    plot.add_argument("-o", "--output", type=Path, default=Path("load_heatmap.png"), help="PNG to write")
    plot.set_defaults(func=_plot, parser=plot)

    examples = sub.add_parser("examples", help="run the gloo simulation and draw the example figures (graphs/README.md)")
    examples.add_argument("--out", type=Path, default=Path("eplb_compile_examples"),
                          help="directory for the figures, made if missing (default: ./eplb_compile_examples; "
                               "the committed ones are regenerated with --out graphs)")
    examples.add_argument("--ranks", type=bounded_int(1, 16), default=4, help="gloo processes (EP ranks)")
    examples.set_defaults(func=_examples, parser=examples)

    from eplb_compile import report

    report_parser = sub.add_parser("report", help="summarise a load recording made by the vLLM plugin's recorder")
    report.add_report_arguments(report_parser)
    report_parser.set_defaults(func=report.report_command)

    from eplb_compile import place

    place_parser = sub.add_parser("place", help="compute an expert placement from a recording (vLLM's EPLB policy)")
    place.add_place_arguments(place_parser)
    place_parser.set_defaults(func=place.place_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
