"""Resume: a run resumed from a checkpoint logs the losses of an uninterrupted run (TP = 2 on two
gloo ranks, real data); a run killed while writing a checkpoint resumes from the last complete
one with the same losses again; SIGTERM saves and stops a run (one rank, --mock-data)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT
from .runs import SMALL, launch, losses, run_recipe

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from qla_megatron.training.data import repository_documents, write_indexed_dataset

    prefix = str(tmp_path_factory.mktemp("corpus") / "corpus_text_document")
    write_indexed_dataset(repository_documents(ROOT), prefix)
    return prefix


def test_resume_matches_uninterrupted_run(tmp_path, corpus):
    """Resumed from the iteration-3 checkpoint of a 6-iteration run (Megatron's --ckpt-step picks it;
    stopping a run there is test_sigterm_saves_and_exits), iterations 4-6 log the same losses."""
    data = ["--data-path", corpus, "--save-interval", "3"]
    full_dir = tmp_path / "full"
    full = losses(run_recipe(*data, "--save", str(full_dir), nproc=2))
    assert sorted(full) == list(range(1, 7)) and float(full[6]) < float(full[1])
    assert (full_dir / "iter_0000003").is_dir() and (full_dir / "iter_0000006").is_dir()
    resumed = run_recipe(*data, "--load", str(full_dir), "--ckpt-step", "3", "--save", str(tmp_path / "resumed"),
                         nproc=2)
    assert "at iteration 3" in resumed
    assert losses(resumed) == {i: full[i] for i in (4, 5, 6)}


def test_killed_during_save_resumes_from_last_complete_checkpoint(tmp_path, mock_run):
    flags = ["--mock-data", "--save-interval", "2"]
    # The uninterrupted run (conftest's mock_run) also logs the time breakdown (it changes no loss:
    # test_breakdown.py); its log goes through the measurement's summary (summarize_logs.py).
    full_log = mock_run
    full = losses(full_log)
    (tmp_path / "full.log").write_text(full_log)
    summary = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "launch", "summarize_logs.py"),
                              "--skip", "2", f"tiny={tmp_path / 'full.log'}"], capture_output=True, text=True,
                             check=True).stdout
    row = summary.splitlines()[-1]
    assert row.startswith("| tiny | 4 |") and "GDN op" in row and "optimizer" in row, summary
    ckpt = tmp_path / "run"
    killed = launch(os.path.join(ROOT, "tests", "recipe", "kill_during_save.py"), "4", *SMALL, *flags,
                     "--save", str(ckpt))
    assert killed.returncode != 0 and "killed while saving iteration 4" in killed.stdout, killed.stdout[-2000:]
    assert (ckpt / "iter_0000004").is_dir(), "the half-written checkpoint is there"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    resumed = run_recipe(*flags, "--save", str(ckpt), "--load", str(ckpt))
    assert "at iteration 2" in resumed
    assert losses(killed.stdout) == {i: full[i] for i in (1, 2, 3, 4)}
    assert losses(resumed) == {i: full[i] for i in (3, 4, 5, 6)}


def test_sigterm_saves_and_exits(tmp_path):
    """--exit-signal-handler: SIGTERM mid-run finishes the iteration, saves it, exits cleanly."""
    import signal
    import time

    ckpt, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = [sys.executable, os.path.join(ROOT, "examples", "pretrain_gdn.py"), *SMALL, "--train-iters", "200",
           "--mock-data", "--save", str(ckpt), "--save-interval", "1000", "--exit-signal-handler"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "iter 3/200" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    stopped = re.search(r"exiting at iteration (\d+) \(signal SIGTERM\)", text)
    assert stopped, text[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == stopped.group(1)
    assert max(losses(text)) == int(stopped.group(1)) < 200
