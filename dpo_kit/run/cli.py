"""The `dpo-kit` command: run, sweep, validate, join, tiny-model, report, init."""

from __future__ import annotations

import argparse
import sys

from dpo_kit.params import ParamsError


def _run(args) -> int:
    from dpo_kit.run.runner import RunError, RunInterrupted, parse_stages, run_pipeline

    if args.resume and args.overwrite:
        print("dpo-kit run: --resume continues a run and --overwrite archives it; choose one", file=sys.stderr)
        return 2
    try:
        run_dir = run_pipeline(
            args.params,
            args.set,
            parse_stages(args.stages),
            overwrite=args.overwrite,
            progress=not args.quiet,
            isolate_stages=args.isolate_stages,
            resume=args.resume,
            reuse_format=args.reuse_format,
        )
    except RunInterrupted as error:
        print(f"dpo-kit run: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a stage (starting the kernel, between stages): no stage was running
        print("dpo-kit run: interrupted outside a stage; the stages completed so far are kept. Continue with the same"
              " command and --resume.", file=sys.stderr)  # fmt: skip
        return 130
    except (RunError, ParamsError, FileNotFoundError) as error:
        print(f"dpo-kit run: {error}", file=sys.stderr)
        return 1
    print(f"dpo-kit run: done; outputs in {run_dir}")
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        import json

        from dpo_kit.evaluation.evaluate import headline

        print(f"dpo-kit run: {headline(json.loads(metrics.read_text()))}")
    return 0


def _sweep(args) -> int:
    from dpo_kit.run.runner import RunInterrupted
    from dpo_kit.run.sweep import SweepError, run_sweep, summary

    try:
        sweep_dir = run_sweep(
            args.params, grid=args.grid, ranges=args.range, overrides=args.set, name=args.name, sampler=args.sampler,
            samples=args.samples, storage=args.storage, objective=args.objective, direction=args.direction,
            progress=not args.quiet,
        )
    except RunInterrupted as error:
        print(f"dpo-kit sweep: {error}\ndpo-kit sweep: run the same command again to continue the sweep",
              file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("dpo-kit sweep: interrupted; run the same command again to continue the sweep", file=sys.stderr)
        return 130
    except (SweepError, ParamsError, FileNotFoundError) as error:
        print(f"dpo-kit sweep: {error}", file=sys.stderr)
        return 1
    table, failed = summary(sweep_dir, args.storage)
    print(table)
    print(f"dpo-kit sweep: outputs in {sweep_dir}")
    return 1 if failed else 0


def _validate(args) -> int:
    from pathlib import Path

    from dpo_kit.hardware import choose_hardware
    from dpo_kit.manifest import STAGES
    from dpo_kit.params import check_local_files, load_params, params_to_dict
    from dpo_kit.run.runner import RunError, refuse_what_the_environment_lacks
    from dpo_kit.run.stage import run_dir_for
    from dpo_kit.training.train import refuse_training_this_machine_cannot_do

    try:
        params = load_params(args.params, args.set)
        check_local_files(params)
        # What `dpo-kit run` refuses before its first stage (a token, a wandb key, the offline cache), for a fresh run
        # of every stage: a run with --stages or --resume asks only for what its stages still to run need.
        refuse_what_the_environment_lacks(params_to_dict(params), Path(".").resolve(), list(STAGES),
                                          outcome="`dpo-kit run` would refuse it before its first stage")
        refuse_training_this_machine_cannot_do(params, ".", choose_hardware())
    except (ParamsError, RunError) as error:
        print(f"dpo-kit validate: {error}", file=sys.stderr)
        return 1
    print(f"{args.params}: valid; run directory would be {run_dir_for(params, '.')}")
    return 0


def _join(args) -> int:
    from dpo_kit.training.launch import LaunchError, Terminated, join_command, run_joined

    try:
        command = join_command(args.run_dir, args.project_dir, args.machine_rank)
    except (LaunchError, ParamsError, FileNotFoundError) as error:
        print(f"dpo-kit join: {error}", file=sys.stderr)
        return 1
    print(f"dpo-kit join: {' '.join(command)}", flush=True)
    try:
        return run_joined(command, args.project_dir)
    except (KeyboardInterrupt, Terminated) as stopped:
        signal_name, code = ("SIGINT", 130) if isinstance(stopped, KeyboardInterrupt) else ("SIGTERM", 143)
        print(f"dpo-kit join: {signal_name}; this machine's launcher and workers are stopped", file=sys.stderr)
        return code


def _tiny_model(args) -> int:
    from dpo_kit.models.tiny import build_tiny_model

    try:
        written = build_tiny_model(args.directory, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as error:
        print(f"dpo-kit tiny-model: {error}", file=sys.stderr)
        return 1
    print(f"tiny model written to {written}")
    return 0


def _report(args) -> int:
    from dpo_kit.evaluation.report import ReportError
    from dpo_kit.run.report import run_report

    try:
        written = run_report(args.runs, args.output_dir, progress=not args.quiet)
    except ReportError as error:
        print(f"dpo-kit report: {error}", file=sys.stderr)
        return 1
    if "previous" in written:
        print(f"dpo-kit report: moved the earlier report to {written['previous']}")
    print(f"dpo-kit report: {written['notebook']}\ndpo-kit report: {written['html']} (static HTML, to share)")
    return 0


def _init(args) -> int:
    from dpo_kit.run.init_project import InitError, init_project

    try:
        project = init_project(args.directory)
    except InitError as error:
        print(f"dpo-kit init: {error}", file=sys.stderr)
        return 1
    import shlex

    # Quoted as a shell reads it: a folder with a space ("~/My Projects/dpo") made a `cd` that went elsewhere.
    print(f"dpo-kit init: {project}/notebooks and {project}/params written\n"
          f"dpo-kit init: next, cd {shlex.quote(str(project))} && dpo-kit run params/tiny.yaml (or open notebooks/ in"
          " Jupyter)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-kit", description="DPO experiments as papermill notebooks over TRL.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute the stage notebooks into <run.output_dir>/<run.name>/")
    run.add_argument("params", help="params YAML file, e.g. params/tiny.yaml")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    run.add_argument("--stages", help="comma-separated subset of format,train,merge,generate,evaluate")
    run.add_argument("--overwrite", action="store_true", help="archive an existing run of this name and start again")
    run.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run: skip completed stages, continue training from its newest verified checkpoint",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--reuse-format",
        metavar="RUN_DIR",
        help="start from the pairs of an earlier run made with the same data params (copied, recorded in the"
        " manifest) instead of formatting them again",
    )
    run.add_argument(
        "--isolate-stages",
        action="store_true",
        help="one kernel per stage instead of one shared kernel: slower start, all memory freed between stages",
    )
    run.set_defaults(handler=_run)

    sweep = commands.add_parser(
        "sweep", help="one run per point of a grid or search space (Optuna), under <run.output_dir>/<sweep name>/"
    )
    sweep.add_argument("params", help="the base params YAML file")
    sweep.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                       help="values to try, e.g. dpo.beta=0.05,0.1,0.5; several --grid give their product")
    sweep.add_argument("--range", action="append", default=[], metavar="SECTION.KEY=LOW:HIGH[:log]",
                       help="a numeric range for random or TPE search, e.g. dpo.learning_rate=1e-5:1e-3:log")
    sweep.add_argument("--samples", type=int,
                       help="trials to run with --sampler random or tpe (a grid runs each point once)")
    sweep.add_argument("--sampler", choices=("grid", "random", "tpe"),
                       help="grid (the default for --grid without --samples), random, or tpe (the default with"
                       " --range or --samples)")
    sweep.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a key in every trial")
    sweep.add_argument("--name", help="the sweep's directory name (default <run.name>-sweep)")
    sweep.add_argument("--storage", help="Optuna storage shared by workers: postgresql://USER@HOST/DB,"
                       " mysql://USER@HOST/DB, sqlite:///PATH.db or journal:PATH (default: SQLite in the sweep)")
    sweep.add_argument("--objective", default="rewards/accuracies",
                       help="the metrics.json key Optuna optimizes (default: held-out implicit-reward accuracy)")
    sweep.add_argument("--direction", default="maximize", choices=("maximize", "minimize"))
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.set_defaults(handler=_sweep)

    validate = commands.add_parser("validate", help="check a params file without running anything")
    validate.add_argument("params", help="params YAML file, e.g. params/tiny.yaml")
    validate.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    validate.set_defaults(handler=_validate)

    join = commands.add_parser(
        "join", help="on machine N > 0 of a multi-machine run: join the train stage that machine 0 started"
    )
    join.add_argument("run_dir", help="the run directory, on storage shared with machine 0")
    join.add_argument("--machine-rank", type=int, required=True, help="this machine's rank, 1 to num_machines - 1")
    join.add_argument("--project-dir", default=".", help="the project the run's relative paths resolve from")
    join.set_defaults(handler=_join)

    tiny = commands.add_parser("tiny-model", help="build the deterministic tiny offline chat model")
    tiny.add_argument("directory", help="where to write the model and its tokenizer")
    tiny.add_argument("--seed", type=int, default=0, help="the seed of its random weights")
    tiny.add_argument("--overwrite", action="store_true",
                      help="build into a directory that already holds files, replacing those of the same names")
    tiny.set_defaults(handler=_tiny_model)

    report = commands.add_parser(
        "report", help="compare runs: execute notebook 06 into a sweep directory (or --output-dir) and export HTML"
    )
    report.add_argument("runs", nargs="+", help="a sweep directory, a directory of runs, or run directories")
    report.add_argument("--output-dir", help="where the report goes (needed for several directories); default: the one given")
    report.add_argument("--quiet", action="store_true", help="no progress bar")
    report.set_defaults(handler=_report)

    init = commands.add_parser(
        "init", help="copy the kit's notebooks and params into a new project folder, to edit and run from there"
    )
    init.add_argument("directory", help="the project folder to create; an existing one must be empty")
    init.set_defaults(handler=_init)

    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
