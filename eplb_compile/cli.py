"""``eplb-compile``: demo (the main job, CPU by default), graphs, bench, plot."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from eplb_compile.demo import DemoConfig, format_report, run_demo, verify

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    cfg = DemoConfig(
        layers=args.layers,
        ep_size=args.ep_size,
        tokens_per_rank=args.tokens_per_rank,
        steps=args.steps,
        device=args.device,
        seed=args.seed,
        count_path_min_tokens=args.count_path_min_tokens,
    )
    result = run_demo(cfg, compile=not args.eager)
    print(format_report(cfg, result))
    if args.plot:
        from eplb_compile import metrics
        from eplb_compile.plots import plot_imbalance_over_steps

        series = {
            name: torch.stack([metrics.imbalance_max_over_mean(step, cfg.ep_size) for step in loads])
            for name, loads in result.loads.items()
        }
        plot_imbalance_over_steps(series, args.plot)
        print(f"wrote {args.plot}")
    if args.save_window:
        torch.save(result.loads["topk"], args.save_window)
        print(f"wrote {args.save_window} ([steps, layers, physical] global loads)")
    problems = verify(result)
    if problems:
        print("MISMATCH between the lowerings and the reference:", *problems, sep="\n  ")
        return 1
    print(
        f"OK: topk and count lowerings gave identical global loads in all {cfg.steps} steps, "
        "equal to the element-wise reference"
    )
    return 0


def _graphs(args: argparse.Namespace) -> int:
    from eplb_compile import capture

    if args.regenerate:
        capture.regenerate(args.device)
        return 0
    for path in capture.PATHS:
        for kind, text in capture.capture(path, args.device).items():
            print(f"===== {path} / {kind} =====")
            print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eplb-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile a toy MoE block and record its load through both lowerings")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--ep-size", type=int, default=4)
    demo.add_argument("--tokens-per-rank", type=int, default=512)
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--count-path-min-tokens", type=int, default=None, help="selector crossover override")
    demo.add_argument("--eager", action="store_true", help="skip torch.compile")
    demo.add_argument("--plot", metavar="FILE.png", help="plot per-layer imbalance over steps for both lowerings")
    demo.add_argument("--save-window", metavar="FILE.pt", help="torch.save the [steps, layers, physical] loads")
    demo.set_defaults(func=_demo)

    graphs = sub.add_parser("graphs", help="print (or --regenerate) the captured graphs in graphs/")
    graphs.add_argument("--regenerate", action="store_true")
    graphs.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    graphs.set_defaults(func=_graphs)

    bench = sub.add_parser("bench", help="time the lowerings against vLLM's kernel (needs CUDA)")
    try:
        from eplb_compile.bench import add_bench_arguments, run_bench
    except ImportError as error:  # Triton missing: say so when asked
        bench.set_defaults(func=lambda _args, error=error: _unavailable("bench", error))
    else:
        add_bench_arguments(bench)
        bench.set_defaults(func=run_bench)

    plot = sub.add_parser("plot", help="draw a layer x rank load heatmap from a torch.save'd load window")
    from eplb_compile.plots import add_plot_arguments, plot_command

    add_plot_arguments(plot)
    plot.set_defaults(func=plot_command)
    return parser


def _unavailable(command: str, error: Exception) -> int:
    print(f"error: `eplb-compile {command}` is unavailable: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
