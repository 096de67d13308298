"""Starting `dkto train` on several processes through accelerate (DDP: NCCL on GPUs, gloo on CPUs).

``dkto train --num-processes N`` re-runs itself as
``python -m accelerate.commands.launch --multi_gpu --num_processes N -m diffusion_kto.cli train ...``; without CUDA
it sets ``ACCELERATE_USE_CPU=1`` so that every process joins one gloo process group (accelerate's MULTI_CPU).

``accelerate launch --cpu --num_processes N`` alone cannot do that: without ``--mpirun_hostfile`` accelerate's
simple launcher starts a single process that trains as if N were 1. :func:`lone_cpu_processes` recognises that
process (``ACCELERATE_USE_CPU`` and ``MASTER_ADDR`` set, no rank variables) and reads N from the parent's command
line, so that :func:`maybe_launch` can start the N gloo processes the user asked for.
"""
from __future__ import annotations

import os
import subprocess
import sys

_RANK_VARIABLES = ("WORLD_SIZE", "LOCAL_RANK", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LAUNCH_TOKENS = ("launch", "accelerate.commands.launch")


def in_distributed_process() -> bool:
    """True inside a process started by torchrun / accelerate's multi-process launchers / mpirun."""
    return any(name in os.environ for name in _RANK_VARIABLES)


def launch_command(num_processes: int, train_args: list[str], *, cpu: bool) -> tuple[list[str], dict[str, str]]:
    """The accelerate command line and environment that run ``dkto train <train_args>`` on N local processes."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no",  # the run config's train.mixed_precision is what the Accelerator uses
        "--dynamo_backend", "no",
        "--main_process_port", "0",  # a free port: several runs may share a machine
        "-m", "diffusion_kto.cli", "train", *train_args,
    ]
    env = dict(os.environ)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return cmd, env


def launch(num_processes: int, train_args: list[str]) -> int:
    """Run ``dkto train <train_args>`` on N processes (GPUs when CUDA is present, else CPU + gloo); exit code."""
    import torch

    if in_distributed_process():
        raise SystemExit("dkto train: --num-processes cannot be used inside accelerate launch / torchrun; drop one of them")
    cmd, env = launch_command(num_processes, train_args, cpu=not torch.cuda.is_available())
    return subprocess.run(cmd, env=env, check=False).returncode


def lone_cpu_processes() -> int | None:
    """N when ``accelerate launch --cpu --num_processes N`` (N > 1, no mpirun) started only this process, else None."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "MASTER_ADDR" not in env:
        return None
    if in_distributed_process():
        return None
    n, machines = _parent_launch_args()
    if machines > 1:
        return None  # multi-node CPU training needs mpirun (accelerate's --mpirun_hostfile); nothing to fix here
    if n is None:
        raise SystemExit(
            "dkto train: accelerate launch --cpu started a single process (multi-CPU launching needs mpirun); "
            "use `dkto train --num-processes N ...` or "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m diffusion_kto.cli train ...`"
        )
    return n if n > 1 else None


def _parent_launch_args() -> tuple[int | None, int]:
    """(num_processes, num_machines) of the parent process's ``accelerate launch`` command line."""
    import psutil

    try:
        return launch_args(psutil.Process(os.getppid()).cmdline())
    except (psutil.Error, OSError):
        return None, 1


def launch_args(cmdline: list[str]) -> tuple[int | None, int]:
    """(num_processes, num_machines) of an ``accelerate launch`` command line, with its --config_file's defaults."""
    from accelerate.commands.launch import launch_command_parser

    starts = [i + 1 for i, tok in enumerate(cmdline) if tok in _LAUNCH_TOKENS or tok.endswith("accelerate-launch")]
    if not starts:
        return None, 1
    try:
        args, _ = launch_command_parser().parse_known_args(cmdline[starts[0]:])
    except SystemExit:
        return None, 1
    n, machines = args.num_processes, args.num_machines
    if args.config_file and (n is None or machines is None):
        from accelerate.commands.config.config_args import load_config_from_file

        defaults = load_config_from_file(args.config_file)
        n = n if n is not None else defaults.num_processes
        machines = machines if machines is not None else defaults.num_machines
    return n, machines or 1


def join_cpu_group_without_cuda() -> None:
    """Inside a multi-process launch on a machine without CUDA (``accelerate launch --multi_gpu``, torchrun), set
    ``ACCELERATE_USE_CPU=1``: otherwise accelerate runs every process as an independent single-process job. Not for
    a DeepSpeed launch, which ``ACCELERATE_USE_CPU`` would turn into plain DDP (the trainer gives DeepSpeed gloo)."""
    import torch

    from .zero import launched as deepspeed_launch

    if in_distributed_process() and "ACCELERATE_USE_CPU" not in os.environ and not torch.cuda.is_available() \
            and not deepspeed_launch():
        os.environ["ACCELERATE_USE_CPU"] = "1"


def maybe_launch(num_processes: int | None, train_args: list[str]) -> int | None:
    """Start the multi-process run asked for (``--num-processes`` or a lone ``accelerate launch --cpu`` process) and
    return its exit code; None when this process should train by itself."""
    if num_processes is not None and num_processes < 1:
        raise SystemExit(f"dkto train: --num-processes must be >= 1, got {num_processes}")
    if num_processes is not None and num_processes > 1:
        return launch(num_processes, train_args)
    lone = lone_cpu_processes()
    if lone is None:
        join_cpu_group_without_cuda()
        return None
    print(
        f"dkto train: accelerate launch --cpu started one process for --num_processes {lone} (multi-CPU launching "
        f"needs mpirun); starting {lone} gloo processes instead",
        file=sys.stderr,
    )
    cmd, env = launch_command(lone, train_args, cpu=True)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(cmd, env=env, check=False).returncode
