"""Helpers to run a stage under `accelerate launch` with 2 CPU processes (gloo) and check it from the outside
(the test is `test_trains_on_two_processes_and_resumes_on_one` in test_faults.py).

Each run is checked from the outside: every rank logs (at DEBUG) its own values and the captions of its
batch; TensorBoard holds what the main process logged; a `sitecustomize` audit hook records every file
any rank writes under the output folder. That is enough to see that logged losses are means over ranks,
that only the main process writes checkpoints, logs, samples and metrics, that the ranks split an epoch's
data into disjoint shards covering all of it, and that a 2-process checkpoint resumes on one process.

Why `--multi_gpu` and ACCELERATE_USE_CPU=true rather than `--cpu --num_processes 2`: with accelerate 1.x,
`--cpu` goes through the "simple" launcher, which starts one process unless an MPI hostfile is
configured (huggingface/accelerate#2741). `--multi_gpu` starts torchrun workers, and ACCELERATE_USE_CPU
makes each one a MULTI_CPU process on the gloo backend; the tests assert that two ranks really ran.
"""

import io
import json
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.training.checkpoint import TEMP_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[2]
RES = 16
BATCH = 8

# Imported by every Python process of the run (it is on PYTHONPATH): records (rank, path) of each file
# opened for writing, renamed into place, or written by safetensors' save_file or torch.save (which write
# from Rust / C++, unseen by Python's audit events) under WATCH_DIR, one line per event in WRITE_LOG.RANK.
WRITE_HOOK = """
import os, sys
_watch, _log = os.environ.get("LDM_TEST_WATCH_DIR"), os.environ.get("LDM_TEST_WRITE_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
if _watch and _log:
    def _record(path):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_watch + os.sep):
            with open(_log + "." + os.environ.get("RANK", "0"), "a", encoding="utf-8") as f:
                f.write(path + "\\n")

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
                _record(args[0])
        elif event == "os.rename":
            _record(args[1])

    sys.addaudithook(_hook)
    import safetensors.torch as _st
    import torch as _torch

    def _recording(save, path_arg):
        def wrapper(*args, **kwargs):
            if isinstance(args[path_arg], (str, os.PathLike)):
                _record(args[path_arg])
            return save(*args, **kwargs)

        return wrapper

    _st.save_file = _recording(_st.save_file, 1)
    _torch.save = _recording(_torch.save, 1)
"""

RANK_LINE = re.compile(r"ldm\.training\.distributed: rank (\d+) step (\d+) (\{.*\})\s*$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ldm(args: list[str], out: Path, tmp: Path, processes: int) -> subprocess.CompletedProcess:
    """`ldm --log-level DEBUG ARGS` on `processes` CPU processes (plain `python -m ldm` for one)."""
    hook_dir = tmp / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(WRITE_HOOK, encoding="utf-8")
    env = os.environ | {
        "PYTHONPATH": f"{hook_dir}{os.pathsep}{REPO_ROOT}",
        "LDM_TEST_WATCH_DIR": str(out.resolve()),
        "LDM_TEST_WRITE_LOG": str(tmp / f"writes-{processes}"),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
    }
    command = [sys.executable, "-m", "ldm", "--log-level", "DEBUG", *args]
    if processes > 1:
        launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launch += ["--main_process_port", str(free_port())]
        command = [sys.executable, *launch, *command[1:]]
    proc = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def rank_records(stderr: str) -> dict[tuple[int, int], dict]:
    """{(rank, step): {"values": ..., "captions": ...}} from the DEBUG lines (the last micro-batch of a step)."""
    records = {}
    for line in stderr.splitlines():
        match = RANK_LINE.search(line)
        if match:
            records[int(match.group(1)), int(match.group(2))] = json.loads(match.group(3))
    return records


def tensorboard_scalars(out: Path, tag: str) -> dict[int, float]:
    (events,) = out.glob("logs/*/events.out.tfevents*")  # one writer: the main process's
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def writes(tmp: Path, processes: int) -> dict[int, list[str]]:
    """The files each rank wrote under the output folder, as paths relative to it (in order)."""
    found = {}
    for log in tmp.glob(f"writes-{processes}.*"):
        found[int(log.suffix[1:])] = log.read_text(encoding="utf-8").split()
    return found


def check_reduced(scalars: dict[int, float], records: dict, key: str, steps: range) -> None:
    """Each logged value is the mean of the two ranks' values, and they differ (so the mean is not trivial)."""
    differing = 0
    for step in steps:
        mine, theirs = records[0, step]["values"][key], records[1, step]["values"][key]
        assert scalars[step] == pytest.approx((mine + theirs) / 2, rel=1e-5), (step, mine, theirs)
        differing += abs(mine - theirs) > 1e-3 * abs(mine)
    assert differing >= len(steps) - 1


def check_epoch_split(records: dict, steps: range, expected: list[str]) -> None:
    """In one epoch the ranks' captions are disjoint and together are the dataset, each item once."""
    seen = {rank: [c for step in steps for c in records[rank, step]["captions"]] for rank in (0, 1)}
    assert len(expected) == len(set(expected))  # unique captions, so a caption identifies its item
    assert not set(seen[0]) & set(seen[1])
    assert Counter(seen[0] + seen[1]) == Counter(expected)


def check_main_process_writes(written: dict[int, list[str]], out: Path) -> list[str]:
    """Rank 1 wrote only its own RNG state; rank 0 every other file, each once (TensorBoard's file it appends to).

    Returns the files rank 0 wrote, relative to `out`.
    """
    assert set(written) == {0, 1}
    assert written[1] and all(Path(p).name == "random_states_1.pkl" for p in written[1]), written[1]
    repeated = [p for p, n in Counter(written[0]).items() if n > 1]
    assert all(".tfevents." in Path(p).name for p in repeated), repeated  # TensorBoard appends to its one file
    # A checkpoint is written into checkpoints/.incomplete-step_N and renamed whole: its files are the step's.
    return [str(Path(p).relative_to(out.resolve())).replace(TEMP_PREFIX, "") for p in written[0]]


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (RES + 4, RES), color).save(buf, "PNG")
    return buf.getvalue()


def write_shards(folder: Path, name: str, shards: int, per_shard: int) -> list[str]:
    """`shards` .tar files of `per_shard` samples; caption f"{name} {shard}-{i}" identifies each one."""
    captions = []
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{name}-{s:02d}.tar")) as sink:
            for i in range(per_shard):
                captions.append(f"{name} {s}-{i}")
                sink.write({"__key__": f"{s:02d}{i:03d}", "png": png((15 * s, 15 * i, 100)), "txt": captions[-1]})
    return captions
