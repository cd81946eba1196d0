"""Atomic checkpoints: every rank writes into ``tmp-checkpoint-N``; once all have, rank 0 writes
``trainer_state.json`` and renames the directory to ``checkpoint-N``. A kill at any point leaves either a complete
``checkpoint-N`` or a ``tmp-`` directory that ``--resume`` ignores (and the next run deletes)."""
import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

STATE = "trainer_state.json"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(output_dir):
    """Complete checkpoints in ``output_dir``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, STATE)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def remove_partial(output_dir):
    """Deletes what an interrupted save left (rank 0, before training)."""
    for path in glob.glob(os.path.join(output_dir, "tmp-checkpoint-*")):
        shutil.rmtree(path, ignore_errors=True)


def save(output_dir, step, engine, state, save_total_limit=None):
    """Checkpoint ``step``: the engine's model/optimizer/scheduler, each rank's RNG, and ``state`` (the data
    position and the run's counters, JSON). Every rank calls it."""
    tmp = os.path.join(output_dir, f"tmp-checkpoint-{step}")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    engine.save(tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{_rank()}.pth"))
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)  # a leftover of an earlier run with the same step
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        if save_total_limit:
            for old in checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path, engine):
    """Restores the engine and this rank's RNG from checkpoint ``path``; returns its state."""
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    engine.load(path)
    rng = os.path.join(path, f"rng_state_{_rank()}.pth")
    set_rng_state(torch.load(rng, weights_only=False))  # our own file: numpy's state is not a tensor
    return state
