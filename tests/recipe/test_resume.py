"""Resume: a run stopped after N iterations and resumed from its checkpoint has the losses of an
uninterrupted run (TP = 2 on two gloo ranks, real data); a run killed while writing a checkpoint
resumes from the last complete one with the same losses again (one rank, --mock-data)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT, TINY

# Smaller than the make-run model: 6 iterations of 4 x 128 tokens.
SMALL = ["--config", TINY, "--hidden-size", "64", "--ffn-hidden-size", "192", "--seq-length", "128",
         "--max-position-embeddings", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", "6", "--lr-warmup-iters", "1"]
LOSS = re.compile(r"^iter (\d+)/\d+ \| loss (\S+) \|", re.M)


def _launch(script, *flags, nproc=1, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_recipe(*flags, nproc=1):
    proc = _launch(os.path.join(ROOT, "examples", "pretrain_gdn.py"), *SMALL, *flags, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def losses(out: str) -> dict[int, str]:
    """iteration -> loss as printed (6 decimals: equal strings mean equal to float32 print)."""
    return {int(i): v for i, v in LOSS.findall(out)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from qla_megatron.training.data import repository_documents, write_indexed_dataset

    prefix = str(tmp_path_factory.mktemp("corpus") / "corpus_text_document")
    write_indexed_dataset(repository_documents(ROOT), prefix)
    return prefix


def test_stop_and_resume_matches_uninterrupted_run(tmp_path, corpus):
    data = ["--data-path", corpus, "--save-interval", "3"]
    full = losses(run_recipe(*data, "--save", str(tmp_path / "full"), nproc=2))
    assert sorted(full) == list(range(1, 7))
    stopped = run_recipe(*data, "--save", str(tmp_path / "run"), "--exit-interval", "3", nproc=2)
    assert "exiting at iteration 3" in stopped
    resumed = run_recipe(*data, "--save", str(tmp_path / "run"), "--load", str(tmp_path / "run"), nproc=2)
    assert "resumed from" in resumed and "at iteration 3" in resumed
    assert losses(stopped) == {i: full[i] for i in (1, 2, 3)}
    assert losses(resumed) == {i: full[i] for i in (4, 5, 6)}
    assert float(full[6]) < float(full[1])


def test_killed_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    flags = ["--mock-data", "--save-interval", "2"]
    # The uninterrupted run also logs the time breakdown (it changes no loss: test_breakdown.py)
    # and its log goes through the measurement's summary (examples/launch/summarize_logs.py).
    full_log = run_recipe(*flags, "--save", str(tmp_path / "full"), "--time-breakdown")
    full = losses(full_log)
    (tmp_path / "full.log").write_text(full_log)
    summary = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "launch", "summarize_logs.py"),
                              "--skip", "2", f"tiny={tmp_path / 'full.log'}"], capture_output=True, text=True,
                             check=True).stdout
    row = summary.splitlines()[-1]
    assert row.startswith("| tiny | 4 |") and "GDN op" in row and "optimizer" in row, summary
    ckpt = tmp_path / "run"
    killed = _launch(os.path.join(ROOT, "tests", "recipe", "kill_during_save.py"), "4", *SMALL, *flags,
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
