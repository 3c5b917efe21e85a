"""The ``gradfleet`` command: server, train, status, watch, evaluate, predict, export, plot.

Bad input (a missing file, an unknown config key, an unreachable server, a model file
that is not ours) exits with status 2 and one line on stderr; ``--debug`` shows the
traceback instead. ``-q`` leaves only warnings and errors on stderr, ``-qq`` only errors;
what a command answers goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("gradfleet")

DEFAULT_JOB: dict[str, Any] = {
    "name": "digits-default",
    "model": {"sizes": [64, 128, 10], "activation": "relu", "seed": 0},
    "dataset": "digits",
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "batch_size": 64,
    "epochs": 20,
    "workers": 2,
    "eval_every": 50,
    "seed": 0,
}


OPTIMIZERS = ("sgd", "adam", "adamw")
AFTER_COMMAND = "_after_command"


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradfleet",
        description="Data-parallel MLP training: parameter server, Ray workers, NumPy core.",
    )
    parser.add_argument("--version", action="version", version=f"gradfleet {_version()}")
    _output_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    after_command = argparse.ArgumentParser(add_help=False)
    _output_options(after_command, AFTER_COMMAND)

    commands.add_parser(
        "server", help="run a parameter server in the foreground", add_help=False
    ).add_argument(
        "server_args",
        nargs=argparse.REMAINDER,
        help="the server's options (see gradfleet server --help)",
    )

    train = commands.add_parser(
        "train", help="train a job (no CONFIG: the embedded default)", parents=[after_command]
    )
    train.add_argument("config", nargs="?", help="job description in TOML")
    train.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="ray",
        help="ray: workers as Ray actors with a parameter server (default); "
        "local: everything in this process, no Ray",
    )
    train.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    train.add_argument(
        "--server",
        help="parameter server host:port, or one per shard, comma-separated (default: start them)",
    )
    train.add_argument(
        "--servers", type=int, help="spread the job over this many servers (default 1)"
    )
    train.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to wait for the --server to answer (default 10)",
    )
    train.add_argument(
        "--server-placement",
        help="where a started server runs: driver (this process), head, or node:<node id> "
        "(default: head when joining a cluster, else driver)",
    )
    train.add_argument(
        "--checkpoint-dir", help="server checkpoints; on a cluster, a path every node can read"
    )
    train.add_argument("--token-file", help="file holding the server's bearer token")
    train.add_argument("--workers", type=int, help="number of workers")
    train.add_argument("--epochs", type=int, help="epochs (replaces steps)")
    train.add_argument("--steps", type=int, help="steps (replaces epochs)")
    train.add_argument("--batch-size", type=int, help="global batch size")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument(
        "--optimizer",
        type=str.lower,
        choices=OPTIMIZERS,
        help="optimiser by name, with its usual learning rate unless --lr (replaces the "
        "config's optimizer table)",
    )
    train.add_argument(
        "--lr", type=_positive_number, help="learning rate (replaces the optimiser's lr)"
    )
    train.add_argument("--mode", choices=["sync", "async"], help="sync or async updates")
    train.add_argument(
        "--compression",
        help="how gradients travel: none, bf16, fp16, sign or topk:<fraction> (default none)",
    )
    train.add_argument(
        "--pull-compression", help="how weights travel to workers: none, bf16 or fp16"
    )
    train.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        help="send each layer's gradient as backward produces it (default: the config's, off)",
    )
    train.add_argument("--out", help="output folder (default: runs/<name>-<time>)")
    train.add_argument("--no-progress", action="store_true", help="log lines, no progress bar")

    status = commands.add_parser(
        "status", help="show one job or list all jobs on a server", parents=[after_command]
    )
    status.add_argument("job", nargs="?", help="job id (default: every job)")
    _server_options(status)

    watch = commands.add_parser(
        "watch", help="follow a job's progress events", parents=[after_command]
    )
    watch.add_argument("job", help="job id")
    _server_options(watch)

    scale = commands.add_parser(
        "scale", help="ask an elastic job for a number of workers", parents=[after_command]
    )
    scale.add_argument("job", help="job id")
    scale.add_argument("workers", type=int, help="workers wanted (min_workers..max_workers)")
    _server_options(scale)

    evaluate = commands.add_parser(
        "evaluate", help="held-out loss and accuracy of a saved model", parents=[after_command]
    )
    evaluate.add_argument("model", help="model folder or its model.npz")
    evaluate.add_argument(
        "--data", help="dataset name or path (default: the one the model was trained on)"
    )
    evaluate.add_argument("--labels", help="label file for .npy/IDX features")

    predict = commands.add_parser(
        "predict", help="predict classes for rows of a file", parents=[after_command]
    )
    predict.add_argument("model", help="model folder or its model.npz")
    predict.add_argument("--input", required=True, help=".npy, .npz (array x) or .csv features")
    predict.add_argument("--output", help="write predictions here (.npy or .csv); else stdout")

    export = commands.add_parser(
        "export", help="save a job's current weights as a model", parents=[after_command]
    )
    export.add_argument("job", help="job id")
    export.add_argument("--out", required=True, help="output folder")
    _server_options(export)

    plot = commands.add_parser(
        "plot", help="draw a run's loss and accuracy curves again", parents=[after_command]
    )
    plot.add_argument("run", help="a training run's output folder (holding history.json)")
    plot.add_argument("--out", help="write the picture here (default: RUN/curves.png)")
    plot.add_argument("--log", action="store_true", help="log-scale loss axis")
    return parser


def _output_options(parser: argparse.ArgumentParser, suffix: str = "") -> None:
    """--debug, -v and -q. After the command (their names end in `suffix` there) they add
    to those given before it: `gradfleet -q train job.toml -q` is -qq."""
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if suffix else {}
    parser.add_argument(
        "--debug",
        action="store_true",
        dest=f"debug{suffix}",
        help="show tracebacks on errors",
        **unset,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest=f"verbose{suffix}",
        help="more log output",
        **(unset or {"default": 0}),
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="count",
        dest=f"quiet{suffix}",
        help="less on stderr: -q warnings and errors only, -qq errors only",
        **(unset or {"default": 0}),
    )


def _version() -> str:
    try:
        return metadata.version("gradfleet")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "(not installed)"


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--token-file", help="file holding the server's bearer token")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to keep retrying an unreachable server",
    )


def _positive_float(what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {what}")
        return value

    return parse


_positive_seconds = _positive_float("number of seconds")
_positive_number = _positive_float("number")


_GLOBAL_FLAGS = {"--debug": "", "-v": "-v", "--verbose": "-v", "-q": "-q", "--quiet": "-q"}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``gradfleet`` command; returns its exit status. Called without ``argv`` it is
    the command itself, reading ``sys.argv``."""
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = _server_command(argv)
    if server_args is not None:  # its own parser: argparse cannot forward "--port 0" intact
        return _run_server(server_args, command_line)
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("debug", "verbose", "quiet"):  # given after the command: add them up
        setattr(args, name, getattr(args, name) + getattr(args, name + AFTER_COMMAND, 0))
    level = logging.INFO - 10 * args.verbose + 10 * args.quiet
    # -v: gradfleet's debug lines; -vv: every library's too (matplotlib's fonts, say)
    others = level if args.verbose > 1 else max(level, logging.INFO)
    logging.basicConfig(level=others, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gradfleet").setLevel(level)
    logging.captureWarnings(True)  # Python warnings obey -q/-qq like log records
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
        return code
    except BrokenPipeError:
        # the reader of stdout has seen enough (`gradfleet watch JOB | head -1`): not an
        # error. Output still buffered would fail again at exit, so it goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("gradfleet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"gradfleet: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _server_command(argv: list[str]) -> list[str] | None:
    """The arguments for `gradfleet server` when that is the command (after any global
    flags, which carry over as the server's -v/-q, counted), else None."""
    carried: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "server":
            return sorted(carried) + argv[i + 1 :]
        if arg in _GLOBAL_FLAGS:
            carried += [_GLOBAL_FLAGS[arg]] if _GLOBAL_FLAGS[arg] else []
        elif arg[:1] == "-" and len(arg) > 1 and set(arg[1:]) <= {"v", "q"}:  # -vv, -vq
            carried += [f"-{letter}" for letter in arg[1:]]
        else:
            return None
    return None


def _run_server(server_args: list[str], command_line: bool) -> int:
    """Run `gradfleet server` with `server_args`, without gRPC's own log lines.

    gRPC's C core writes its own lines (a failed bind, say) straight to stderr, at the
    verbosity it reads from GRPC_VERBOSITY once, when grpc is imported. The command has
    not imported it yet (`gradfleet.client` loads its parts lazily), so unless the user
    set GRPC_VERBOSITY or asked for -v it is set to NONE first, and the server says what
    went wrong in its own one line.
    """
    verbose = any(a == "--verbose" or (a[:2] == "-v" and set(a[1:]) == {"v"}) for a in server_args)
    if command_line and not verbose and "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from gradfleet.server import cli as server_cli

    return server_cli.main(server_args)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return " ".join(text.split())


def _token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from gradfleet.client.reporting import ProgressReporter, write_run
    from gradfleet.client.training import train
    from gradfleet.worker.config import JobConfig

    if args.config:
        if not Path(args.config).is_file():
            raise UsageError(f"config file {args.config} does not exist")
        table = _read_toml(args.config)
    else:
        table = dict(DEFAULT_JOB)
    overrides = {
        "workers": args.workers,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "mode": args.mode,
        "epochs": args.epochs,
        "steps": args.steps,
        "optimizer": args.optimizer,  # a name: its own settings, not the config's
        "servers": args.servers,
        "compression": args.compression,
        "pull_compression": args.pull_compression,
        "overlap": args.overlap,
    }
    table.update({k: v for k, v in overrides.items() if v is not None})
    if args.epochs is not None:
        table.pop("steps", None)
    if args.steps is not None:
        table.pop("epochs", None)
    job = JobConfig.from_dict(table, args.config or "default job")
    if args.lr is not None:
        job = dataclasses.replace(job, optimizer=job.optimizer_settings | {"lr": args.lr})
    token = _token(args.token_file)
    if args.server and args.backend == "ray":
        _check_server(args.server, token, args.timeout)  # in seconds, not after Ray started
    if not args.config:
        logger.info("no config given: training the embedded default (digits, 2 workers)")
    out = Path(args.out or f"runs/{job.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    reporter = ProgressReporter(
        job.total_steps, job.steps_per_epoch, enabled=not (args.no_progress or args.quiet)
    )
    with reporter:
        result = train(
            job,
            backend=args.backend,
            address=args.ray_address,
            server=args.server,
            token=token,
            progress=reporter.update,
            checkpoint_dir=args.checkpoint_dir,
            server_placement=_placement(args),
        )
    model_path = write_run(result, job, out)
    accuracy = result.final_metrics.get("val_accuracy")
    summary = (
        f"held-out accuracy {accuracy:.2%}"
        if accuracy is not None
        else (f"held-out loss {result.final_metrics.get('val_loss', float('nan')):.4f}")
    )
    job_note = f" (job {result.job_id})" if result.job_id else ""
    print(
        f"trained {job.name}{job_note} for {result.final_metrics['steps']} steps on "
        f"{args.backend} in "
        f"{result.wall_time:.1f}s: {summary}; model saved to {model_path}"
    )
    return 0


def _check_server(address: str, token: str | None, timeout: float) -> None:
    """Raise a one-sentence error unless a gradfleet server answers at `address` within
    `timeout` seconds and takes `token`: the trainer's own client would keep trying for
    a minute or more, after Ray had started."""
    from gradfleet.client.sdk import Client

    with Client(address, token=token, timeout=timeout) as client:
        client.list_jobs()


def _placement(args: argparse.Namespace) -> str:
    """A server inside the driver listens on loopback only: on a cluster (``--ray-address``
    or ``RAY_ADDRESS``, as under ``ray job submit``) it runs on the head node instead."""
    if args.server_placement:
        return str(args.server_placement)
    joining = args.backend == "ray" and (args.ray_address or os.environ.get("RAY_ADDRESS"))
    return "head" if joining else "driver"


def _read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None


def _client(args: argparse.Namespace) -> Any:
    from gradfleet.client.sdk import Client

    return Client(args.server, token=_token(args.token_file), timeout=args.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        handles = [client.job(args.job)] if args.job else client.list_jobs()
        if not handles:
            print("no jobs")
        for handle in handles:
            status = handle.status()
            loss = f"{status.last_loss:.4f}" if status.last_loss is not None else "-"
            scores = status.evaluation or {}
            held_out = (
                f"  held-out accuracy {scores['val_accuracy']:.2%} at step {scores['step']:.0f}"
                if "val_accuracy" in scores
                else ""
            )
            changes = f"  ({len(status.membership)} changes)" if status.membership else ""
            print(
                f"{status.job_id}  {status.name or '-'}  {status.state}  "
                f"step {status.version}/{status.total_steps}  loss {loss}{held_out}  "
                f"workers {_ids(status.members)}{changes}"
            )
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.job(args.job).scale(args.workers)
    print(
        f"{status.job_id} asked for {args.workers} workers (now {_ids(status.members)}); "
        "its trainer starts or stops them at the next step boundaries"
    )
    return 0


def _ids(workers: Any) -> str:
    return "[" + ", ".join(str(w) for w in workers) + "]"


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for event in client.job(args.job).watch():
            print(event)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gradfleet.client.model_files import load_model, model_description
    from gradfleet.worker.datasets import load_dataset
    from gradfleet.worker.result import evaluate

    model = load_model(args.model)
    trained_on = model_description(args.model)
    source = args.data or trained_on.get("dataset")
    if not source:
        raise UsageError(f"{args.model} does not say what it was trained on: pass --data")
    options: dict[str, Any] = {"standardize": False}  # the model standardises raw rows
    if args.labels:
        options["labels"] = args.labels
    if source == trained_on.get("dataset"):  # the same held-out rows training kept apart
        options["seed"] = trained_on.get("seed", 0)
        if trained_on.get("validation_split"):
            options["validation_split"] = trained_on["validation_split"]
    data = load_dataset(source, **options)
    if data.num_features != model.sizes[0]:
        raise UsageError(
            f"{source} has {data.num_features} features, the model expects {model.sizes[0]}"
        )
    # the held-out rows (a file without any is evaluated whole)
    x, y = (data.x_val, data.y_val) if data.x_val is not None else (data.x, data.y)
    assert x is not None and y is not None
    loss = trained_on.get("loss", "cross_entropy")
    y = y.astype(np.int64) if loss == "cross_entropy" else y
    metrics = evaluate(model, x, y, loss)
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from gradfleet.client.model_files import load_model

    model = load_model(args.model)
    path = Path(args.input)
    if not path.is_file():
        raise UsageError(f"input file {path} does not exist")
    predictions = model.predict(_read_rows(path, model.sizes[0]))
    if args.output:
        if args.output.endswith(".csv"):
            np.savetxt(
                args.output, predictions, fmt="%d" if predictions.dtype.kind in "iu" else "%g"
            )
        else:
            np.save(args.output, predictions)
        print(f"wrote {len(predictions)} predictions to {args.output}")
    else:
        sys.stdout.write("\n".join(str(p) for p in predictions.tolist()) + "\n")
    return 0


def _read_rows(path: Path, features: int) -> np.ndarray:
    """Feature rows from .csv (a trailing label column is dropped) or from a NumPy file,
    .npy or .npz (its array ``x``), whatever its name says; one row may be 1-D."""
    from gradfleet.worker.datasets import load_csv

    if path.suffix == ".csv":
        try:
            x, last = load_csv(path, label_column=-1)
        except ValueError as exc:  # says which line or column
            raise UsageError(str(exc)) from None
        if x.shape[1] == features - 1:  # no label column: the last column is a feature
            x = np.column_stack([x, last])
    else:
        x = _numpy_rows(path)
    if x.dtype.kind not in "fiub" or x.ndim < 1:
        raise UsageError(f"{path} does not hold rows of numbers")
    if x.ndim == 1:  # one row, or a column of one-feature rows
        x = x[:, None] if features == 1 else x[None, :]
    if len(x) == 0:
        raise UsageError(f"{path} holds no rows")
    x = x.reshape(len(x), -1)
    if x.shape[1] != features:
        raise UsageError(f"{path} has rows of {x.shape[1]} features, the model expects {features}")
    return x


def _numpy_rows(path: Path) -> np.ndarray:
    """The array in a .npy file, or the array ``x`` of a .npz archive."""
    unreadable = UsageError(
        f"cannot read rows from {path}: give a .npy, .npz (array x) or .csv of numbers"
    )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # not NumPy's format, or pickled objects
        raise unreadable from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded as archive:
        if "x" not in archive.files:
            raise UsageError(f"{path} needs an array named 'x', it holds {archive.files}")
        try:
            return np.asarray(archive["x"])
        except (OSError, ValueError, EOFError):
            raise unreadable from None


def cmd_export(args: argparse.Namespace) -> int:
    from gradfleet.client.model_files import save_model

    with _client(args) as client:
        handle = client.job(args.job)
        model, config = handle.model(), handle.config()
    extra = {k: config[k] for k in ("dataset", "validation_split", "seed", "loss") if k in config}
    path = save_model(model, args.out, extra)
    print(f"saved job {args.job} to {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gradfleet.client.reporting import PLOT_EXTRA, plot_run

    run = Path(args.run)
    if not run.is_dir():
        raise UsageError(f"{run} is not a folder: give the --out folder of a training run")
    try:
        path = plot_run(run, Path(args.out) if args.out else None, log_loss=args.log)
    except ImportError:
        raise UsageError(f"plotting needs matplotlib: {PLOT_EXTRA}") from None
    print(f"wrote {path}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "status": cmd_status,
    "watch": cmd_watch,
    "scale": cmd_scale,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "export": cmd_export,
    "plot": cmd_plot,
}


if __name__ == "__main__":
    sys.exit(main())
