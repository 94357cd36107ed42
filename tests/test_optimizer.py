"""optim.FlatAdamW against torch.optim.AdamW, its float32 master weights under bf16, and the memory
switches: --grad_ckpt (same gradients) and --freeze_vision (the vision tower stays as it was)."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import cue_recovery
import optim
import train
from data import collate, completion_token_ids, make_world, student_messages
from model import load_model


# Why the AdamW comparisons below can be tight on any CPU: both sides see gradients that are equal, or
# equal up to float32 rounding (relative ~1e-7), and Adam's update g / (sqrt(v) + eps) amplifies a
# gradient's rounding only where |g| is near eps = 1e-8. Each test asserts that no gradient comes within
# MIN_GRADIENT = 1e-4 of 0, so the update's relative rounding stays ~1e-7 a step; over 20 steps that is
# < 1e-5 relative, hence rtol=1e-5 and atol=1e-6 on weights of size ~0.1-1. A wrong formula (bias
# correction, decay order, the clip) moves them by >= 1e-3.
MIN_GRADIENT = 1e-4


def smallest_gradient(parameters):
    return min(p.grad.abs().min().item() for p in parameters)


def test_flat_adamw_equals_torch_adamw_with_clipping_and_weight_decay():
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ours = copy.deepcopy(reference)
    torch_adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    flat_adamw = optim.FlatAdamW(ours.parameters(), 1e-2, 0.1, (0.9, 0.95))
    for step in range(20):
        x = torch.randn(8, 6)
        lr = 1e-2 * (1 - step / 40)                        # a changing lr, set the way the loop sets it
        for model, optimizer in ((reference, torch_adamw), (ours, flat_adamw)):
            optimizer.param_groups[0]["lr"] = lr
            (model(x).pow(2).sum() * 10).backward()        # large gradients: the clip at 1.0 binds
        assert smallest_gradient(reference.parameters()) > MIN_GRADIENT
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item()
        torch_adamw.step()
        torch_adamw.zero_grad()
        assert flat_adamw.update(flat_adamw.average_gradients(), grad_clip=1.0) == pytest.approx(norm, rel=1e-5)
        assert norm > 1.0
    for a, b in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the gradients are views into one flat buffer, which backward filled and the update zeroed
    assert all(p.grad.data_ptr() == flat_adamw.grads[o:].data_ptr() for p, o in zip(ours.parameters(), flat_adamw.offsets()))
    assert not flat_adamw.grads.any()


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))   # 53 weights


def global_batch(step):
    return torch.randn(12, 6, generator=torch.Generator().manual_seed(step))


def sharded_worker(rank, world_size, port, path):
    """3 gloo ranks, each with 4 of the 12 rows, the optimizer sharded in three (53 = 18 + 18 + 17 + pad)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = small_model()
    optimizer = optim.FlatAdamW(model.parameters(), 1e-2, 0.1, (0.9, 0.95), rank, world_size, shard=True)
    for step in range(5):
        rows = global_batch(step)[rank::world_size]
        (model(rows).pow(2).sum() * 10 / 12 * world_size).backward()   # the global mean, times the ranks' average
        optimizer.update(optimizer.average_gradients(), grad_clip=1.0)
    state = optimizer.state_dict()                                     # every rank takes part
    if rank == 0:
        torch.save({"weights": [p.detach().clone() for p in model.parameters()], "optimizer": state}, path)
    dist.destroy_process_group()


def test_the_sharded_optimizer_on_three_ranks_equals_adamw_and_resumes_on_one(tmp_path):
    mp.spawn(sharded_worker, args=(3, 29631, str(tmp_path / "state.pt")), nprocs=3)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    reference = small_model()
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    for step in range(6):
        (reference(global_batch(step)).pow(2).sum() * 10 / 12).backward()
        assert smallest_gradient(reference.parameters()) > MIN_GRADIENT   # so the ranks' rounding stays small
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        adamw.step()
        adamw.zero_grad()
        if step == 4:                                                  # where the three ranks stopped
            for a, b in zip(reference.parameters(), saved["weights"]):
                torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
    resumed = small_model()                                            # one process continues the run
    with torch.no_grad():
        for p, w in zip(resumed.parameters(), saved["weights"]):
            p.copy_(w)
    optimizer = optim.FlatAdamW(resumed.parameters(), 1e-2, 0.1, (0.9, 0.95))
    optimizer.load_state_dict(saved["optimizer"])
    (resumed(global_batch(5)).pow(2).sum() * 10 / 12).backward()
    optimizer.update(optimizer.average_gradients(), grad_clip=1.0)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit, match="other trained weights"):
        optim.FlatAdamW(torch.nn.Linear(2, 2).parameters(), 1e-2, 0.1, (0.9, 0.95)).load_state_dict(saved["optimizer"])


def test_bf16_weights_follow_float32_master_weights():
    """lr 1e-4 on weights near 1: each step's change is below bf16's spacing there (2^-7), so AdamW on bf16
    weights never moves them, while the float32 master accumulates the steps and bf16 shows their sum."""
    start = (torch.ones(64) + torch.linspace(0, 0.5, 64)).bfloat16().float()   # representable in bf16
    grads = [torch.randn(64, generator=torch.Generator().manual_seed(s)).bfloat16().float() for s in range(300)]
    reference = torch.nn.Parameter(start.clone())
    bf16_naive = torch.nn.Parameter(start.clone().bfloat16())
    bf16_ours = torch.nn.Parameter(start.clone().bfloat16())
    reference_adamw = torch.optim.AdamW([reference], lr=1e-4, weight_decay=0.0)
    naive_adamw = torch.optim.AdamW([bf16_naive], lr=1e-4, weight_decay=0.0)
    ours = optim.FlatAdamW([bf16_ours], 1e-4, 0.0, (0.9, 0.999))
    for grad in grads:
        for p, optimizer in ((reference, reference_adamw), (bf16_naive, naive_adamw)):
            p.grad = grad.to(p.dtype)
            optimizer.step()
        bf16_ours.grad.copy_(grad)                                    # its gradient is a view: fill it
        ours.update(ours.average_gradients(), grad_clip=1e9)
    assert torch.equal(bf16_naive.detach(), start.bfloat16())                      # stuck
    assert torch.equal(bf16_ours.detach(), reference.detach().bfloat16())          # moved as float32 did
    assert not torch.equal(bf16_ours.detach(), start.bfloat16())
    torch.testing.assert_close(ours.master, reference.detach(), rtol=0, atol=1e-6)


def training_batch(processor, n=3):
    samples = make_world(n, seed=3)
    return collate(processor, [student_messages(s) for s in samples],
                   [completion_token_ids(processor, s.rationale) for s in samples])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    """Recomputed activations (with the cue module's hooks inside the recomputed layers) change nothing."""
    _, processor = tiny
    batch = training_batch(processor)
    results = []
    for grad_ckpt in (False, True):
        model, _ = load_model("tiny", seed=0)
        cue_recovery.attach(model, processor, init="default")  # a module that acts, so its hooks matter
        model.train()
        if grad_ckpt:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.is_activation_checkpointing
        loss, _ = train.sft_loss(model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    # the recompute runs the same kernels on the same shapes: the floats are equal, on any CPU (a hook
    # that ran twice or not at all in the recompute moves the gradients by >= 1e-2)
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_freeze_vision_trains_the_language_model_only(tmp_path):
    train.main(["--mode=sft", "--max_steps=2", "--num_train=32", "--num_eval=7", "--num_validation=10", "--batch_size=4",
                "--max_new_tokens=4", "--freeze_vision", "--grad_ckpt", f"--out_dir={tmp_path}"])
    start, _ = load_model("tiny", seed=0)
    start = {k: v for k, v in start.state_dict().items()}
    trained = load_file(tmp_path / "ckpt" / "model.safetensors")
    vision = [k for k in start if ".visual." in f".{k}"]
    assert vision and set(vision) <= set(trained)
    assert all(torch.equal(trained[k], start[k]) for k in vision)
    assert not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])
