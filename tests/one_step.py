"""One optimizer step's averaged gradient and metrics, for the data-parallel tests (test_ddp.py):

    python tests/one_step.py OUT.pt [train.py flags]                          one process
    python -m torch.distributed.run --nproc_per_node=2 tests/one_step.py ...  two gloo ranks

It builds the run as train.py does (train.setup), computes step 0's gradients (train.sft_step or
train.distill_step), averages them across ranks (FlatAdamW.average_gradients, gathered when sharded)
and reduces the metrics (train.reduce_metrics); rank 0 writes {"grad", "metrics"} to OUT.pt.

VICUR_WRONG makes it a deliberately wrong data-parallel step, to show that the tests catch one:
  own_tokens   each rank divides its loss by its own completion-token count, not the step's global one
  skip_bucket  the first gradient bucket is left out of the all-reduce (each rank keeps its own)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import cue_recovery  # noqa: E402
import train  # noqa: E402


def make_wrong(variant, optimizer):
    if variant == "own_tokens":
        train.all_reduce_mean = lambda value, world_size: value            # N is then this rank's count
    elif variant == "skip_bucket":
        all_reduce = dist.all_reduce
        dist.all_reduce = lambda tensor, *args, **kwargs: (
            None if tensor.data_ptr() == optimizer.grads.data_ptr() else all_reduce(tensor, *args, **kwargs))
    elif variant:
        raise SystemExit(f"unknown VICUR_WRONG={variant}")


def main(out, argv):
    config = train.parse_args(argv)
    rank, world_size = train.init_distributed(config)
    _, model, processor, teacher, optimizer, samples, _, _ = train.setup(config, rank, world_size)
    make_wrong(os.environ.get("VICUR_WRONG", ""), optimizer)
    model.train()
    if teacher is None:
        metrics = train.sft_step(model, processor, samples, 0, rank, world_size, config, {})
    else:
        metrics = train.distill_step(model, teacher, optimizer, processor, samples, 0, rank, world_size, config, {})
    shard = optimizer.average_gradients()
    grad = torch.zeros(optimizer.shard_size * optimizer.parts)
    for source, piece in optimizer.shards(shard):
        grad[source * optimizer.shard_size:(source + 1) * optimizer.shard_size] = piece
    names = train.step_metric_names(config, has_module=cue_recovery.get(model) is not None)
    metrics = train.reduce_metrics(metrics, names, world_size)
    if rank == 0:
        torch.save({"grad": grad[:optimizer.total], "metrics": metrics}, out)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
