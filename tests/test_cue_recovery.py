"""The cue recovery module: an exact no-op at zero init, prefill-only yet equal to a full recompute,
trainable, per-row sinks under left padding, deepcopy, save/load, sink attention and cue recall."""
import copy

import pytest
import torch

import cue_recovery
from data import IMAGE_SIZE, collate, eval_world, model_inputs, student_messages, user_message
from distill import completion_logits, distill_loss, rollout_completions, scoring_batch, teacher_logits
from model import load_model
from rollout import VISION_TOKENS, sample_completions
from test_rollout import GREEDY_MARGIN, LOGPROB_TOLERANCE, top2_margins


def prompts(n=3, seed=1):
    return [student_messages(s) for s in eval_world(n, seed=seed)]


def with_module(tiny, init="default", seed=0, sink_every=None):
    """A copy of the tiny model with a module attached (the session fixture stays plain)."""
    model, processor = tiny
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    cue_recovery.attach(model, processor, sink_every=sink_every, init=init)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def test_layers_and_parameter_count(tiny):
    assert cue_recovery.module_layers(28, 5) == [0, 5, 10, 15, 20, 25]
    assert cue_recovery.module_layers(4, 1) == [0, 1, 2] and cue_recovery.module_layers(4, 2) == [0, 2]
    model = with_module(tiny, sink_every=2)
    hidden = model.config.text_config.hidden_size
    count, share = cue_recovery.parameter_count(model)
    assert count == 2 * 4 * hidden ** 2 + 2 * hidden and 0 < share < 0.2   # W_Q, W_K, W_V, W_O x 2 + two norms
    model_parameters = {id(p) for p in model.parameters()}       # so the optimizer and state_dict see it
    assert all(id(p) in model_parameters for p in cue_recovery.get(model).parameters())
    assert "model.cue_recovery.w_o.1.weight" in model.state_dict()


def test_zero_init_is_an_exact_no_op(tiny):
    model, processor = tiny
    batch = collate(processor, prompts(4))
    assert batch["attention_mask"].sum(-1).unique().numel() > 1      # left padding is exercised
    # exact on purpose: W_O = 0 makes z = 0 exactly and h + 0 = h, and the rest is the same computation
    assert torch.equal(logits(with_module(tiny, init="zero"), batch), logits(model, batch))


def test_normal_init_draws_every_projection_from_the_models_initializer_range(tiny):
    """--cue_init=normal is what the released code's post_init gives: N(0, initializer_range) for W_Q,
    W_K, W_V and W_O alike (W_O is not zero, so the module acts from the start)."""
    std = tiny[0].config.get_text_config().initializer_range
    module = cue_recovery.get(with_module(tiny, init="normal"))
    for name in ("w_q", "w_k", "w_v", "w_o"):
        weights = torch.cat([linear.weight.flatten() for linear in getattr(module, name)])
        # the sample std of n normal draws is within 5 / sqrt(2n) of std (relative) with overwhelming odds
        assert abs(weights.std().item() / std - 1) < 5 / (2 * weights.numel()) ** 0.5, name
        assert abs(weights.mean().item()) < 5 * std / weights.numel() ** 0.5, name
    with pytest.raises(ValueError, match="'zero', 'default' or 'normal'"):
        with_module(tiny, init="xavier")


def test_kv_cache_sampling_equals_recomputing_the_whole_sequence(tiny):
    model, processor = tiny
    module_model = with_module(tiny)
    chats = prompts(3)
    rollout = sample_completions(module_model, processor, collate(processor, chats), greedy=True, max_new_tokens=8)
    vision_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    generated, margins = [[] for _ in chats], []
    for _ in range(rollout.completion_ids.shape[1]):   # greedy without a cache: the module runs on it all
        last = logits(module_model, collate(processor, chats, completion_ids=generated))[:, -1].float()
        margins.append(top2_margins(last, vision_ids))
        last[:, vision_ids] = float("-inf")
        for row, token in enumerate(last.argmax(-1).tolist()):
            generated[row].append(token)
    lengths = rollout.completion_mask.sum(-1).tolist()
    assert min(lengths) >= 2
    # cached vs recomputed are two paths: no compared token may be a near-tie (see test_rollout.GREEDY_MARGIN)
    assert torch.stack(margins, 1)[rollout.completion_mask.bool()].min() > GREEDY_MARGIN
    for row, length in enumerate(lengths):
        assert rollout.completion_ids[row, :length].tolist() == generated[row][:length]
    # rollout's log-probs against a teacher-forced forward of prompt + completion
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]
    full = collate(processor, chats, completion_ids=completions)
    full_logprobs = logits(module_model, full)[:, :-1].float().log_softmax(-1)
    token_logprobs = full_logprobs.gather(-1, full["input_ids"][:, 1:, None])[..., 0]
    reference = token_logprobs[full["completion_mask"][:, 1:].bool()]
    # cached decode vs full forward: float32 rounding ~1e-6 (see test_rollout.LOGPROB_TOLERANCE); a decode
    # step one rope position off moves these log-probs by ~0.1
    assert torch.allclose(rollout.logprobs[rollout.completion_mask.bool()], reference, rtol=0, atol=LOGPROB_TOLERANCE)
    # and the module changed what was computed (by ~0.8 here, far above any rounding)
    assert not torch.allclose(logits(model, full), logits(module_model, full), atol=1e-3)


def test_update_equals_a_hand_computation_after_deepstack(tiny):
    """Module 0 against per-row, per-head loops over the input of layer 1 (layer 0's output with
    deepstack's visual features added, which a hook on layer 0's output would miss)."""
    model, processor = tiny
    batch = collate(processor, prompts(3))
    module_model = with_module(tiny)
    module = cue_recovery.get(module_model)
    seen = {}
    text_layers = model.model.language_model.layers
    hooks = [text_layers[0].register_forward_hook(lambda layer, args, out: seen.update(layer_0=out)),
             text_layers[1].register_forward_pre_hook(lambda layer, args: seen.update(layer_1=args[0]))]
    logits(model, batch)
    [hook.remove() for hook in hooks]
    visual = (batch["input_ids"] == model.config.image_token_id)
    assert not torch.allclose(seen["layer_0"][visual], seen["layer_1"][visual])   # deepstack added something
    after = {}
    hook = module_model.model.language_model.layers[1].register_forward_pre_hook(
        lambda layer, args: after.update(layer_1=args[0]))
    logits(module_model, batch)
    hook.remove()
    heads = model.config.text_config.num_attention_heads
    with torch.no_grad():
        for row, sink in enumerate((batch["attention_mask"] == 0).sum(-1).tolist()):
            h, values = seen["layer_1"][row, sink], seen["layer_1"][row][visual[row]]   # (d,), (N, d)
            q = module.norm_q(h) @ module.w_q[0].weight.T
            k, u = (module.norm_kv(values) @ w[0].weight.T for w in (module.w_k, module.w_v))
            z = torch.cat([torch.softmax(qh @ kh.T / qh.numel() ** 0.5, -1) @ uh for qh, kh, uh in
                           zip(q.chunk(heads), k.chunk(heads, -1), u.chunk(heads, -1))]) @ module.w_o[0].weight.T
            # per-head loops vs the module's batched matmuls: values ~0.6 differ by ~1e-7 (a few ulps);
            # 1e-5 leaves a 100x margin, and the update read before deepstack's add is off by ~0.4
            assert torch.allclose(after["layer_1"][row, sink], h + z, atol=1e-5)
            others = torch.arange(batch["input_ids"].shape[1]) != sink
            # exact: layer 0 is the same computation in both models, and the module writes the sink only
            assert torch.equal(after["layer_1"][row, others], seen["layer_1"][row, others])


def test_the_sink_reads_the_image(tiny):
    """The sink precedes the image, so without the module its state cannot depend on the image."""
    model, processor = tiny
    samples = eval_world(2, seed=3)
    chats = [[user_message(s, samples[0].question)] for s in samples]   # same text, two images
    batch = collate(processor, chats)
    sink = cue_recovery.sink_positions(batch["input_ids"], batch["attention_mask"],
                                       processor.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1]) and sink.tolist() == [0, 0]

    def sink_state_after_layer_0(some_model):   # the input of layer 1, after the module's update
        seen = []
        handle = some_model.model.language_model.layers[1].register_forward_pre_hook(
            lambda layer, args: seen.append(args[0][:, 0].clone()))
        out = logits(some_model, batch)
        handle.remove()
        return seen[0], out

    plain_sink, plain_logits = sink_state_after_layer_0(model)
    module_sink, module_logits = sink_state_after_layer_0(with_module(tiny))
    # exact: the two rows hold the same tokens up to the sink (their first), in one batch, the same kernels
    assert torch.equal(plain_sink[0], plain_sink[1])
    # the module makes them differ by ~0.2, and the last logits by ~0.3: far above any rounding
    assert not torch.allclose(module_sink[0], module_sink[1], atol=1e-3)
    assert not torch.allclose(module_logits[:, -1], plain_logits[:, -1], atol=1e-3)


def test_parameters_get_gradients_from_the_distillation_loss_alone(tiny):
    """The paper's sampled-token loss, the plain model with the cue hint as teacher: no auxiliary loss."""
    model, processor = tiny
    module_model = with_module(tiny, init="zero").train()
    module = cue_recovery.get(module_model)
    samples = eval_world(3, seed=2)
    rollout = sample_completions(module_model, processor, collate(processor, [student_messages(s) for s in samples]),
                     max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    completions = rollout_completions(rollout)
    with torch.no_grad():
        scored = teacher_logits(model, processor, samples, "cues", completions)
    student_batch = scoring_batch(processor, [student_messages(s) for s in samples], completions)

    def step():
        module_model.zero_grad()
        student_logits, tokens = completion_logits(module_model, student_batch)
        loss, _ = distill_loss(student_logits, tokens, rollout.logprobs[rollout.completion_mask.bool()], scored)
        loss.backward()

    step()   # W_O = 0: only W_O has a gradient (z = 0 whatever W_Q, W_K, W_V, the norms)
    assert all(w.weight.grad.abs().sum() > 0 for w in module.w_o)
    # exact: the gradient into W_Q passes through W_O = 0, a product with exact zeros
    assert all(w.weight.grad is None or w.weight.grad.abs().sum() == 0 for w in module.w_q)
    with torch.no_grad():
        for p in module.parameters():
            p -= 0.1 * p.grad if p.grad is not None else 0
    step()   # after one step every parameter of the module learns
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_the_sink_is_the_first_im_start_under_left_padding(tiny):
    model, processor = tiny
    im_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    batch = collate(processor, prompts(4))
    pads = (batch["attention_mask"] == 0).sum(-1)
    sinks = cue_recovery.sink_positions(batch["input_ids"], batch["attention_mask"], im_start)
    assert torch.equal(sinks, pads) and (batch["input_ids"].gather(1, sinks[:, None]) == im_start).all()
    no_sink = batch["input_ids"].masked_fill(batch["input_ids"] == im_start, 50)
    assert torch.equal(cue_recovery.sink_positions(no_sink, batch["attention_mask"], im_start), pads)
    ids = torch.tensor([[0, 0, 9, 1, 1], [9, 9, 9, 9, 9]])   # a later im_start: the first one counts
    assert cue_recovery.sink_positions(ids, torch.tensor([[0, 0, 1, 1, 1], [1] * 5]), 1).tolist() == [3, 0]
    # each row of a left-padded batch equals that row alone
    module_model = with_module(tiny)
    together = logits(module_model, batch)[:, -1]
    for row, chat in enumerate(prompts(4)):
        alone = logits(module_model, collate(processor, [chat]))[:, -1]
        # padded batch of 4 vs one row: other GEMM shapes, logits ~0.7 differ by ~6e-7 here; 1e-4 leaves a
        # 100x margin, and a sink taken at the row's first pad instead moves them by > 1e-2
        assert torch.allclose(together[row], alone[0], atol=1e-4)


def test_deepcopy_hooks_use_the_copys_module(tiny):
    model, processor = tiny
    batch = collate(processor, prompts(2))
    original = with_module(tiny)
    before = logits(original, batch)
    duplicate = copy.deepcopy(original)
    assert torch.equal(logits(duplicate, batch), before)          # exact: the same weights, the same computation
    with torch.no_grad():
        for w in cue_recovery.get(duplicate).w_o:
            w.weight.mul_(3.0)
    assert torch.equal(logits(original, batch), before)
    assert not torch.allclose(logits(duplicate, batch), before, atol=1e-3)    # 3 W_O moves them by ~0.1


def test_save_and_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    batch = collate(processor, prompts(2))
    module_model = with_module(tiny)
    module_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cue_recovery.save(module_model, tmp_path)
    loaded, _ = load_model(str(tmp_path))                     # load_model restores the module
    assert cue_recovery.get(loaded).config == cue_recovery.get(module_model).config
    assert torch.equal(logits(loaded.eval(), batch), logits(module_model, batch))   # exact: the same weights and path
    plain_dir = tmp_path / "plain"
    model.save_pretrained(plain_dir)
    assert cue_recovery.attach(model, saved=plain_dir) is None and cue_recovery.get(model) is None


def test_sink_attention_sums_to_one_and_cue_recall(tiny):
    model, processor = tiny
    samples = eval_world(3, seed=2)
    batch = collate(processor, [student_messages(s) for s in samples])
    weights = cue_recovery.sink_attention(with_module(tiny, sink_every=1), batch)
    assert weights.shape == (3, 3, 9)                                # (B, modules, 9 visual tokens)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 3), atol=1e-5)   # a float32 sum of 9 weights: <= ~1e-6 off
    recall, area = cue_recovery.cue_recall(weights, [s.boxes for s in samples], batch["image_grid_thw"],
                                           [s.image.size for s in samples])
    assert recall.shape == (3, 3) and ((recall >= 0) & (recall <= 1)).all() and (area > 0).all()
    # by hand: a 96x96 image, 9 cells of 32x32 in reading order
    grid = torch.tensor([[1, 6, 6]])
    on_cell_4 = torch.zeros(1, 9)
    on_cell_4[0, 4] = 1.0                                          # the centre cell, pixels 32..64
    recall, area = cue_recovery.cue_recall(on_cell_4, [[[32, 32, 64, 64]]], grid, [(96, 96)])
    # exact: weights 0, 0.5, 1 times a coverage of 0 or 1, no matmul involved (approx where it is a fraction)
    assert recall.item() == 1.0 and area.item() == pytest.approx(1 / 9)
    half = torch.tensor([[0.5, 0.5] + [0.0] * 7])                   # half on a1, half on a2
    boxes = [[[0, 0, 16, 32], [8, 0, 32, 32]]]                      # overlapping: a1 fully covered
    recall, area = cue_recovery.cue_recall(half, boxes, grid, [(96, 96)])
    assert recall.item() == pytest.approx(0.5) and area.item() == pytest.approx(1 / 9)
    recall, _ = cue_recovery.cue_recall(half, [[[0, 0, 32, 32]]], grid, [(IMAGE_SIZE * 2, IMAGE_SIZE * 2)])
    assert recall.item() == pytest.approx(0.5 * 0.25)              # boxes scale with the original size


def saved_vicur_checkpoint(tiny, folder):
    model, processor = tiny
    module_model = with_module(tiny, seed=3)
    module_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    cue_recovery.save(module_model, folder)
    return module_model


def test_evaluating_a_vicur_checkpoint_never_reads_cues_answers_or_rationales(tiny, tmp_path):
    import dataclasses
    from evaluate import evaluate
    module_model = saved_vicur_checkpoint(tiny, tmp_path)
    loaded, processor = load_model(str(tmp_path))
    samples = eval_world(14, seed=4)
    stripped = [dataclasses.replace(s, cue=None, rationale=None, answer="?", boxes=[]) for s in samples]
    # exact: the same prompts and weights take the same computation, unless a cue, answer or rationale
    # reached the model (or the loaded module differs from the saved one)
    predictions = [r["prediction"] for r in evaluate(loaded, processor, samples, max_new_tokens=12,
                                                     progress=False)["records"]]
    assert predictions == [r["prediction"] for r in evaluate(loaded, processor, stripped, max_new_tokens=12,
                                                             progress=False)["records"]]
    assert predictions == [r["prediction"] for r in evaluate(module_model, processor, samples, max_new_tokens=12,
                                                             progress=False)["records"]]


def test_evaluate_cli_writes_heat_maps_and_cue_recall(tiny, tmp_path, capsys):
    import json
    from PIL import Image
    import evaluate
    saved_vicur_checkpoint(tiny, tmp_path / "ckpt")
    evaluate.main([f"--ckpt={tmp_path / 'ckpt'}", "--num_eval=7", "--max_new_tokens=4", "--heatmaps=2",
                   f"--out={tmp_path / 'eval.json'}"])
    recall = json.load(open(tmp_path / "eval.json"))["cue_recall"]
    assert len(recall["per_layer"]) == len(recall["layers"]) == 3 and 0 < recall["box_area_share"] < 1
    model, processor = load_model(str(tmp_path / "ckpt"))
    in_batches_of_3 = cue_recovery.evaluation_cue_recall(model, processor, eval_world(7), batch_size=3)
    # batches of 3 vs one of 7: recalls ~0.1 differ by rounding (~1e-8, also across CPU kernels); 1e-6 leaves
    # a 60x margin, and averaging per-batch means instead of rows moves them by ~1e-2
    assert in_batches_of_3["per_layer"] == pytest.approx(recall["per_layer"], abs=1e-6)
    assert in_batches_of_3["box_area_share"] == pytest.approx(recall["box_area_share"])
    pictures = sorted((tmp_path / "heatmaps").glob("*.png"))
    assert len(pictures) == 2 and "wrote 2 heat maps" in capsys.readouterr().out
    width, height = Image.open(pictures[0]).size
    assert height == 3 * IMAGE_SIZE and width == 3 * (3 * IMAGE_SIZE + 4)      # one panel per module layer


def test_the_cue_recall_logged_in_training_equals_the_prompt_alone(tiny):
    """distill_step records the sink's attention during the student's forward on prompt + completion;
    the visual tokens and the sink precede the completion, so it must equal a prefill of the prompt."""
    model, processor = tiny
    module_model = with_module(tiny, seed=5)
    samples = eval_world(4, seed=6)
    samples[1] = copy.copy(samples[1])
    samples[1].boxes = []                                            # a row without boxes is left out
    completions = [processor.tokenizer.encode(text) for text in ("the answer is 3", "no", "red", "a1 small red")]
    with cue_recovery.recording(module_model) as recorded:
        completion_logits(module_model, scoring_batch(processor, [student_messages(s) for s in samples], completions))
    batch = scoring_batch(processor, [student_messages(s) for s in samples], completions)
    logged = cue_recovery.rows_cue_recall(torch.stack(recorded, 1), samples, batch, processor)
    prompt = collate(processor, [student_messages(s) for s in samples])
    recall, _ = cue_recovery.cue_recall(cue_recovery.sink_attention(module_model, prompt), [s.boxes for s in samples],
                                        prompt["image_grid_thw"], [s.image.size for s in samples])
    # prompt + completion vs prompt alone: other lengths and padding, so rounding (<= ~1e-7 on a recall of
    # ~0.07); 1e-5 leaves a 100x margin, and counting the box-less row moves it by 1e-3, rows 0-2 by 6e-5
    assert logged == pytest.approx(recall.mean(-1)[[0, 2, 3]].mean().item(), abs=1e-5)
