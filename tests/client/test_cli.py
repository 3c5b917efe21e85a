"""The `gradfleet` command end to end, through real processes."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from gradfleet.client import Client
from gradfleet.client.cli import build_parser, main
from gradfleet.client.data import load_dataset
from gradfleet.client.model_files import save_model
from gradfleet.nn import MLP
from gradfleet.proto.client import ParameterServerClient
from gradfleet.server.cli import build_parser as build_server_parser

pytestmark = [pytest.mark.integration]
GRADFLEET = str(Path(sys.executable).with_name("gradfleet"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GRADFLEET, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def server_address() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [GRADFLEET, "server", "--port", str(port), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        Client(address, timeout=30).close()  # waits until it answers
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_help_lists_every_subcommand() -> None:
    result = run("--help")

    assert result.returncode == 0
    expected = ("server", "train", "status", "scale", "watch", "evaluate", "predict", "export")
    for command in (*expected, "plot"):
        assert command in result.stdout
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(subcommands) == {*expected, "plot"}


@pytest.mark.ray
@pytest.mark.slow
def test_train_status_predict_against_a_separate_server(
    server_address: str, tmp_path: Path
) -> None:
    config = tmp_path / "job.toml"
    config.write_text(
        'name = "iris-cli"\ndataset = "iris"\nbatch_size = 16\nepochs = 30\nworkers = 2\n'
        '[model]\nsizes = [4, 16, 3]\n[optimizer]\nname = "sgd"\nlr = 0.1\nmomentum = 0.9\n'
    )
    out = tmp_path / "run"

    trained = run("train", str(config), "--server", server_address, "--out", str(out))
    job_id = re.search(r"\(job (\w+)\)", trained.stdout)
    status = run("status", "--server", server_address)
    rows = np.random.default_rng(0).standard_normal((7, 4))
    np.save(tmp_path / "rows.npy", rows)
    predicted = run(
        "predict",
        str(out),
        "--input",
        str(tmp_path / "rows.npy"),
        "--output",
        str(tmp_path / "pred.npy"),
    )

    assert trained.returncode == 0, trained.stderr
    assert job_id is not None
    assert {p.name for p in out.iterdir()} >= {
        "model.npz",
        "model.json",
        "history.csv",
        "history.json",
        "config.json",
    }
    assert status.returncode == 0
    line = next(row for row in status.stdout.splitlines() if row.startswith(job_id.group(1)))
    assert "  iris-cli  completed  step" in line
    assert re.search(r"held-out accuracy \d+\.\d\d% at step \d+", line)  # evaluated on Ray
    assert predicted.returncode == 0, predicted.stderr
    # the model carries the training data's standardisation: raw rows in, labels out
    stats = load_dataset("iris").stats
    with Client(server_address) as client:
        served = client.job(job_id.group(1)).model()
    bare = MLP.from_spec({k: v for k, v in served.spec().items() if k != "preprocessing"})
    bare.flat[...] = served.flat
    standardized = (rows - stats["mean"]) / stats["std"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "pred.npy"), bare.logits(standardized).argmax(axis=1)
    )


@pytest.mark.ray
@pytest.mark.slow
def test_watch_export_and_evaluate_a_finished_job(server_address: str, tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text(
        'name = "wine"\ndataset = "wine"\nbatch_size = 16\nsteps = 40\nworkers = 2\n'
        '[model]\nsizes = [13, 16, 3]\n[optimizer]\nname = "adam"\nlr = 0.01\n'
    )
    trained = run("train", str(config), "--server", server_address, "--out", str(tmp_path / "r"))
    job_id = re.search(r"\(job (\w+)\)", trained.stdout)
    assert job_id is not None, trained.stderr

    watched = run("watch", job_id.group(1), "--server", server_address)
    exported = run(
        "export", job_id.group(1), "--server", server_address, "--out", str(tmp_path / "exported")
    )
    evaluated = run("evaluate", str(tmp_path / "exported"), "--data", "wine")

    steps = [line for line in watched.stdout.splitlines() if " step " in line]
    assert watched.returncode == 0, watched.stderr
    assert len(steps) == 40
    assert "completed" in watched.stdout.splitlines()[-1]
    assert exported.returncode == 0, exported.stderr
    assert evaluated.returncode == 0, evaluated.stderr
    accuracy = re.fullmatch(r"val_loss=[\d.]+ val_accuracy=([\d.]+)\n", evaluated.stdout)
    assert accuracy is not None
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert float(accuracy.group(1)) == pytest.approx(
        history["final_metrics"]["val_accuracy"], abs=5e-5
    )


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_default_job_reaches_90_percent(tmp_path: Path) -> None:
    result = run("train", "--out", str(tmp_path / "default"), cwd=tmp_path)

    accuracy = re.search(r"held-out accuracy ([\d.]+)%", result.stdout)
    assert result.returncode == 0, result.stderr
    assert accuracy is not None
    assert float(accuracy.group(1)) >= 90.0
    assert (tmp_path / "default" / "model.npz").exists()


def bad_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"bad-{len(list(tmp_path.glob('bad-*')))}.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing config", "does not exist"),
        ("unknown key", "unknown key"),
        ("wrong type", "batch_size must be an integer"),
        ("not toml", "not valid TOML"),
        ("unreachable server", "no gradfleet server at"),
        ("foreign model file", "not a gradfleet model"),
        ("missing model", "no model at"),
        ("nan timeout", "not a positive number of seconds"),
    ],
)
def test_bad_input_exits_2_with_one_line(case: str, message: str, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, w=np.zeros(3))
    good = 'dataset = "iris"\nepochs = 1\n[model]\nsizes = [4, 3]\n'
    args = {
        "missing config": ["train", str(tmp_path / "nope.toml")],
        "unknown key": ["train", bad_config(tmp_path, "colour = 'blue'\n" + good)],
        "wrong type": ["train", bad_config(tmp_path, 'batch_size = "big"\n' + good)],
        "not toml": ["train", bad_config(tmp_path, "this is = = not toml")],
        "unreachable server": ["status", "--server", f"127.0.0.1:{free_port()}", "--timeout", "1"],
        "foreign model file": ["predict", str(foreign), "--input", str(foreign)],
        "missing model": ["evaluate", str(tmp_path / "none"), "--data", "iris"],
        "nan timeout": ["status", "--server", f"127.0.0.1:{free_port()}", "--timeout", "nan"],
    }[case]

    result = run(*args, "--backend", "local") if args[0] == "train" else run(*args)

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith(("gradfleet: error:", "gradfleet status: error:"))
    assert message in lines[-1]
    assert len([line for line in lines if ": error:" in line]) == 1


@pytest.mark.parametrize("flags", [[], ["-v"], ["--debug"], ["-vv", "-q"]])
def test_server_after_global_flags_takes_its_own_options(flags: list[str], capsys) -> None:
    code = main([*flags, "server", "--port", "70000"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["gradfleet server: port must be within 0..65535, got 70000."]


# The user's first hour (issue 16)

IRIS_JOB = (
    'name = "iris-first-hour"\ndataset = "iris"\nbatch_size = 16\nsteps = 20\nworkers = 2\n'
    "[model]\nsizes = [4, 8, 3]\n"
)
NO_SERVER = "gradfleet: error: no gradfleet server at {} (is `gradfleet server` running?)"
DIVERGED = re.compile(
    r"gradfleet: error: (loss became NaN|the gradients overflowed) at step \d+; "
    r"try a lower learning rate"
)


def write_job(tmp_path: Path, text: str = IRIS_JOB) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_version_prints_the_installed_version() -> None:
    result = run("--version")

    assert result.returncode == 0
    assert result.stdout == f"gradfleet {metadata.version('gradfleet')}\n"


def every_parser() -> Iterator[argparse.ArgumentParser]:
    """The `gradfleet` parser, each of its subcommands' and `gradfleet server`'s."""
    parser = build_parser()
    yield parser
    yield from parser._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
    yield build_server_parser()


def test_every_argument_of_every_command_says_what_it_is_for() -> None:
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in every_parser()
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or not action.help.strip())
    ]

    assert missing == []


@pytest.mark.parametrize(
    ("flags", "optimizer"),
    [
        (["--optimizer", "Adam", "--lr", "0.02"], {"name": "adam", "lr": 0.02}),
        (["--optimizer", "adamw"], {"name": "adamw", "lr": 0.001}),  # its usual rate
        (["--lr", "0.3"], {"name": "sgd", "lr": 0.3, "momentum": 0.9}),  # the table's rest
    ],
)
def test_optimizer_and_learning_rate_from_the_command_line(
    tmp_path: Path, flags: list[str], optimizer: dict
) -> None:
    config = write_job(tmp_path, IRIS_JOB + '[optimizer]\nname = "sgd"\nlr = 0.1\nmomentum = 0.9\n')

    result = run("train", config, "--backend", "local", "--out", str(tmp_path / "run"), *flags)

    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optimizer"] == optimizer


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--timeout", "0"], "argument --timeout: '0' is not a positive number of seconds"),
        (["--timeout", "inf"], "argument --timeout: 'inf' is not a positive number of seconds"),
        (["--lr", "-0.1"], "argument --lr: '-0.1' is not a positive number"),
        (["--optimizer", "RMSprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
    ],
)
def test_bad_train_options_are_refused_by_name(flags: list[str], message: str) -> None:
    result = run("train", *flags)

    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"gradfleet train: error: {message}")


def test_train_against_no_server_fails_in_seconds_before_starting_ray(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()

    # the embedded default job
    result = run(
        "train", "--server", address, "--timeout", "2", "--out", str(tmp_path / "run"), timeout=120
    )

    assert time.monotonic() - started < 20
    assert result.returncode == 2
    assert result.stderr.splitlines() == [NO_SERVER.format(address)]
    assert not (tmp_path / "run").exists()


def test_a_taken_port_is_one_line_without_grpc_logs() -> None:
    environment = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        result = run("server", "--port", str(port), env=environment, timeout=60)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"gradfleet server: could not listen on 127.0.0.1:{port}: the port is in use "
        "(another server?); pick another --port."
    ]


def test_watch_into_a_reader_that_stops_early_exits_quietly(
    server_address: str, tmp_path: Path
) -> None:
    # prepare: a job with more events than a pipe holds
    steps = 3000
    with ParameterServerClient(server_address) as client:
        job = client.create_job(
            {"type": "MLP", "sizes": [2, 2], "dtype": "float32"},
            {"name": "sgd", "lr": 0.1},
            total_steps=steps,
            num_workers=1,
        )
        gradient = np.zeros(client.layout(job).total_elements, np.float32)
        for step in range(steps):
            client.push_gradient(job, 0, step, 1, 1.0, gradient)
    errors = tmp_path / "stderr"
    # execute: `gradfleet watch JOB | head -1`
    with open(errors, "w") as stderr:
        watch = subprocess.Popen(
            [GRADFLEET, "watch", job, "--server", server_address],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert watch.stdout is not None
        first = watch.stdout.readline()
        watch.stdout.close()
        code = watch.wait(timeout=60)
    # assert
    assert first.startswith(f"{job} step 1 ".encode())
    assert errors.read_text() == ""
    assert code == 0


@pytest.fixture(scope="module")
def iris_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_model(MLP([4, 8, 3], seed=0), folder)
    return folder


def save_rows(path: Path, rows: np.ndarray, archive: bool = False) -> Path:
    """`rows` in NumPy's format at `path` whatever its suffix (np.save would add one)."""
    with open(path, "wb") as f:
        if archive:
            np.savez(f, x=rows)
        else:
            np.save(f, rows)
    return path


@pytest.mark.parametrize(
    ("name", "archive", "rows"),
    [
        ("row.npy", False, np.array([5.1, 3.5, 1.4, 0.2])),  # one 1-D row
        ("rows.npz", True, np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])),
        ("named.npz", False, np.array([[5.1, 3.5, 1.4, 0.2]])),  # an .npy by its content
    ],
)
def test_predict_reads_rows_in_numpy_files(
    iris_model: Path, tmp_path: Path, name: str, archive: bool, rows: np.ndarray
) -> None:
    source = save_rows(tmp_path / name, rows, archive)

    result = run("predict", str(iris_model), "--input", str(source))

    expected = MLP([4, 8, 3], seed=0).predict(rows.reshape(-1, 4)).tolist()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(p) for p in expected]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "text.npy",
            "5.1,3.5,1.4,0.2\n",
            "cannot read rows from {}: give a .npy, .npz (array x) or .csv of numbers",
        ),
        (
            "empty.npy",
            "",
            "cannot read rows from {}: give a .npy, .npz (array x) or .csv of numbers",
        ),
        ("wide.npy", np.ones(5), "{} has rows of 5 features, the model expects 4"),
        ("words.npy", np.array(["a", "b", "c", "d"]), "{} does not hold rows of numbers"),
        ("header.csv", "a,b,c,d\n", "{} holds no rows"),
        ("cells.csv", "1,2,3,4\n1,2,x,4\n", "{}: line 2, column 3 is not a number: 'x'"),
    ],
)
def test_predict_says_what_is_wrong_with_an_input_file(
    iris_model: Path, tmp_path: Path, name: str, content: str | np.ndarray, message: str
) -> None:
    source = tmp_path / name
    if isinstance(content, str):
        source.write_text(content)
    else:
        save_rows(source, content)

    result = run("predict", str(iris_model), "--input", str(source))

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"gradfleet: error: {message.format(source)}"]


def test_quiet_leaves_warnings_and_twice_quiet_only_errors(tmp_path: Path) -> None:
    # prepare: data whose one row of class 2 warns (it cannot be on both sides of the split)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2))
    y = (x[:, 0] > 0).astype(int)
    y[0] = 2
    np.savetxt(tmp_path / "odd.csv", np.column_stack([x, y]), delimiter=",", fmt="%g")
    config = write_job(
        tmp_path,
        f'name = "odd"\ndataset = "{tmp_path / "odd.csv"}"\nbatch_size = 8\nsteps = 5\n'
        "[model]\nsizes = [2, 3]\n",
    )
    train = ("train", config, "--backend", "local", "--out", str(tmp_path / "run"))
    # execute
    chatty, quiet, after, silent = (
        run(*train),
        run("-q", *train),
        run(*train, "-q"),  # given after the command as well
        run("-qq", *train),
    )
    # assert
    assert [r.returncode for r in (chatty, quiet, after, silent)] == [0, 0, 0, 0]
    assert any(line.startswith("INFO ") for line in chatty.stderr.splitlines())
    assert quiet.stderr == after.stderr
    assert [line.split(":")[0] for line in quiet.stderr.splitlines()] == [
        "WARNING gradfleet.worker.datasets"
    ]
    assert silent.stderr == ""
    assert silent.stdout.startswith("trained odd for 5 steps on local")


@pytest.mark.parametrize(
    "backend", ["local", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])]
)
def test_divergence_is_one_line_and_saves_no_model(tmp_path: Path, backend: str) -> None:
    config = write_job(
        tmp_path,
        'name = "boom"\ndataset = "digits"\nbatch_size = 64\nsteps = 50\nworkers = 2\n'
        '[model]\nsizes = [64, 32, 10]\n[optimizer]\nname = "sgd"\nlr = 1000.0\n',
    )
    out = tmp_path / "run"

    result = run("train", config, "--backend", backend, "--out", str(out), "--no-progress")

    said = [line for line in result.stderr.splitlines() if not line.startswith("INFO ")]
    assert result.returncode == 2
    assert len(said) == 1 and DIVERGED.fullmatch(said[0]), result.stderr
    assert not (out / "model.npz").exists()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(address, token file) of a `gradfleet server --token-file` in its own process."""
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("the-right-token\n")
    port = free_port()
    process = subprocess.Popen(
        [GRADFLEET, "server", "--port", str(port), "--token-file", str(token), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    try:
        Client(address, token="the-right-token", timeout=30).close()  # waits until it answers
        yield address, token
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("token", ["missing", "wrong"])
@pytest.mark.parametrize("command", ["status", "train"])
def test_a_missing_or_wrong_token_is_one_line(
    token_server: tuple[str, Path], tmp_path: Path, token: str, command: str
) -> None:
    address, _ = token_server
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    flags = ["--token-file", str(wrong)] if token == "wrong" else []
    extra = [write_job(tmp_path), "--out", str(tmp_path / "run")] if command == "train" else []

    result = run(command, *extra, "--server", address, *flags, timeout=60)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"gradfleet: error: the server at {address} refused the call: its token is {token}; "
        "pass the server's token (token= in Python, --token-file on the command line)"
    ]


def test_evaluate_without_data_scores_the_rows_training_held_out(tmp_path: Path) -> None:
    # prepare: a split and a seed that are not the defaults
    config = write_job(
        tmp_path,
        'name = "wine"\nbatch_size = 32\nsteps = 40\nworkers = 2\nseed = 3\n'
        'dataset = { source = "wine", validation_split = 0.3 }\n[model]\nsizes = [13, 16, 3]\n',
    )
    run_folder = tmp_path / "run"
    trained = run("train", config, "--backend", "local", "--out", str(run_folder))
    printed = re.search(r"held-out accuracy ([\d.]+)%", trained.stdout)
    assert trained.returncode == 0 and printed is not None, trained.stderr

    # execute
    evaluated = run("evaluate", str(run_folder))

    # assert
    scores = re.fullmatch(r"val_loss=[\d.]+ val_accuracy=([\d.]+)\n", evaluated.stdout)
    assert evaluated.returncode == 0, evaluated.stderr
    assert scores is not None
    assert float(scores.group(1)) == pytest.approx(float(printed.group(1)) / 100, abs=1e-4)


@pytest.mark.parametrize(
    ("extra", "flags", "recorded"),
    [
        (
            "",
            ["--compression", "bf16", "--pull-compression", "bf16", "--servers", "2", "--overlap"],
            {"compression": "bf16", "pull_compression": "bf16", "servers": 2, "overlap": True},
        ),
        (
            'compression = "sign"\nservers = 2\noverlap = true\n',
            ["--compression", "fp16", "--servers", "1", "--no-overlap"],
            {"compression": "fp16", "pull_compression": "none", "servers": 1, "overlap": False},
        ),
    ],
    ids=["flags", "flags-over-the-file"],
)
def test_codecs_servers_and_overlap_from_the_command_line_are_recorded(
    tmp_path: Path, extra: str, flags: list[str], recorded: dict
) -> None:
    config = write_job(tmp_path, extra + IRIS_JOB)

    result = run("train", config, "--backend", "local", "--out", str(tmp_path / "run"), *flags)

    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {key: saved[key] for key in recorded} == recorded
    assert "for 20 steps on local" in result.stdout


def test_a_topk_job_file_trains_in_local_mode(tmp_path: Path) -> None:
    config = write_job(tmp_path, 'compression = "topk:0.01"\n' + IRIS_JOB)

    result = run("train", config, "--backend", "local", "--out", str(tmp_path / "run"))

    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["compression"] == "topk:0.01"
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["steps"]) == 20


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compression", "zstd"], "compression: unknown compression 'zstd'"),
        (["--pull-compression", "sign"], "pull_compression must be none, bf16 or fp16"),
    ],
    ids=["compression", "pull-compression"],
)
def test_an_unknown_codec_on_the_command_line_is_one_line(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    result = run("train", "--backend", "local", "--out", str(tmp_path / "run"), *flags)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"gradfleet: error: {message}")
    assert not (tmp_path / "run").exists()
