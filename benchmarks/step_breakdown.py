"""Where a training rank's time goes, from a py-spy profile of a whole run.

Record every process of a run with py-spy (``pip install py-spy``; ``--idle`` keeps the time
spent waiting in collectives), then
split each rank's samples inside its training loop by the outermost frame that names a part
of the step:

    py-spy record --subprocesses --idle --rate 97 --format raw -o ft.txt -- \\
        ftlaunch RECIPE.yaml --backend torchrun --no-progress
    python benchmarks/step_breakdown.py ft.txt ftlaunch

    py-spy record --subprocesses --idle --rate 97 --format raw -o hf.txt -- \\
        python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        benchmarks/hf_peer.py SPEC.json
    python benchmarks/step_breakdown.py hf.txt trainer

DeepSpeed's backward and step are split further: communication (gradient reduction, the
parameter all-gather; both include waiting for the slower rank), the gradient norm, the
optimizer, and autograd's own work. Percentages are of the rank's samples inside the loop.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

LOOPS = {"ftlaunch": "train (launcher/train/loop.py", "trainer": "Trainer._inner_training_loop"}
PARTS = (  # (part, frame substring); the outermost matching frame decides
    ("DeepSpeed backward", "DeepSpeedEngine.backward "),
    ("DeepSpeed step", "DeepSpeedEngine.step "),
    ("model forward", "DeepSpeedEngine.forward "),
    ("output projection + cross-entropy (chunked)", "chunked_loss_sum "),
    ("ftlaunch: all-reduce of the step's counts", "all_reduce (launcher/ranks.py"),
    ("ftlaunch: gather of the ranks' loss and step times", "gather_rows (launcher/ranks.py"),
    ("ftlaunch: stop check", "stop_here "),
    ("ftlaunch: batch assembly", "Batches.make "),
)
DEEPSPEED_PARTS = (
    ("gradient reduction (comm)", ("average_tensor", "reduce_ipg_grads", "allreduce", "all_reduce")),
    ("parameter all-gather (comm)", ("all_gather",)),
    ("gradient norm", ("norm",)),
    ("optimizer", ("adam", "Adam", "_fused")),
    ("autograd", ("_engine_run_backward", "backward (torch")),
)


def breakdown(path: Path, loop: str) -> dict[str, collections.Counter]:
    ranks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        if not count.isdigit() or not processes:
            raise ValueError(
                f"{path}:{number}: not a stack of py-spy's raw format recorded with "
                "--subprocesses (FRAME;FRAME;... COUNT, led by 'process PID:...' frames)")
        process = processes[-1].split(":")[0]
        frames = [f for f in frames if not f.startswith("process ")]
        if not any(loop in f for f in frames):
            continue
        samples = int(count)
        ranks[process]["total"] += samples
        part, at = "other", len(frames)
        for i, frame in enumerate(frames):
            part = next((name for name, key in PARTS if key in frame), "")
            if part:
                at = i
                break
        part = part or "other"
        if part.startswith("DeepSpeed"):
            inner = next(
                (name for f in frames[at:] for name, keys in DEEPSPEED_PARTS
                 if any(k in f for k in keys)), "rest")
            part = f"{part}: {inner}"
        ranks[process][part] += samples
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", type=Path, help="py-spy --format raw output")
    parser.add_argument("system", choices=sorted(LOOPS))
    args = parser.parse_args()
    try:
        ranks = breakdown(args.profile, LOOPS[args.system])
    except (OSError, ValueError) as e:
        print(f"step_breakdown: error: {e}", file=sys.stderr)
        sys.exit(2)
    for process, parts in sorted(ranks.items()):
        total = parts.pop("total")
        print(f"{process}: {total} samples in the training loop")
        for part, samples in parts.most_common():
            print(f"  {100 * samples / total:5.1f}%  {part}")


if __name__ == "__main__":
    main()
