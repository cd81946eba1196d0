"""Starting the ranks: ``torchrun --standalone`` (a free port, so runs can share a machine)."""
import os
import subprocess
import sys


def torchrun_command(nproc, argv):
    """The command that runs ``python -m fastvl.train argv`` on ``nproc`` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "fastvl.train", *argv]


def torchrun(nproc, argv):
    """Runs the ranks (one thread each unless OMP_NUM_THREADS says otherwise); returns the exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(torchrun_command(nproc, argv), env=env)
