"""The cue recovery module: a sink token that reads the image by cross-attention (ViCuR, arXiv 2606.05718).

The sink is one existing token, the first `<|im_start|>` of each sequence (before the image;
the first non-pad token where there is none). After decoder layer L, for every L in
`module_layers`, the sink's hidden state h reads the visual tokens V of its own sequence:
    q = RMSNorm_q(h) W_Q,  K = RMSNorm_kv(V) W_K,  U = RMSNorm_kv(V) W_V      (no rope)
    z = softmax(q K^T / sqrt(d_h)) U W_O                                      (per head)
    h <- h + z
W_Q, W_K, W_V, W_O are d x d per module layer; the two RMSNorms are shared. It runs in prefill
only (the forward whose KV cache is empty); later tokens read the updated sink through causal
attention and the cache, so decoding is unchanged. W_O starts at zero (`init="zero"`, our choice
where the paper is silent) so an attached module is an exact no-op until training moves it;
`init="default"` gives W_O nn.Linear's default init like the other three.
"""

import functools
import json
import math
import os
from contextlib import contextmanager

import torch
from PIL import Image, ImageDraw
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

from data import collate, model_inputs, student_messages, to_device

SINK_TOKEN = "<|im_start|>"
CONFIG_FILE, WEIGHTS_FILE = "cue_recovery.json", "cue_recovery.pt"


def default_sink_every(num_layers):
    """The paper's every 5th layer on 28-layer Qwen3-VL (6 modules); every layer on the tiny models."""
    return 5 if num_layers >= 10 else 1


def module_layers(num_layers, sink_every):
    """Layers L with L % sink_every == 0, the last layer left out: an update after it reaches no
    other token. 28 layers, every 5 -> [0, 5, 10, 15, 20, 25]; 4 layers, every 1 -> [0, 1, 2]."""
    return list(range(0, num_layers - 1, sink_every))


def sink_positions(input_ids, attention_mask, sink_token_id):
    """(B,) index of each row's first sink token, else of its first non-pad token (left padding)."""
    is_sink = input_ids == sink_token_id                                      # (B, L)
    first_real = attention_mask.int().argmax(-1) if attention_mask is not None else torch.zeros_like(input_ids[:, 0])
    return torch.where(is_sink.any(-1), is_sink.int().argmax(-1), first_real)


class CueRecovery(nn.Module):
    def __init__(self, hidden_size, num_heads, layers, sink_token_id, visual_token_ids, eps=1e-6,
                 sink_every=1, init="zero", init_std=0.02):
        super().__init__()
        if init not in ("zero", "default", "normal"):
            raise ValueError(f"init must be 'zero', 'default' or 'normal', got '{init}'")
        self.layers, self.num_heads = list(layers), num_heads
        self.config = dict(sink_every=sink_every, init=init, layers=self.layers, sink_token_id=sink_token_id,
                           visual_token_ids=list(visual_token_ids))
        self.norm_q, self.norm_kv = Qwen3VLTextRMSNorm(hidden_size, eps), Qwen3VLTextRMSNorm(hidden_size, eps)
        linears = lambda: nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=False) for _ in self.layers)
        self.w_q, self.w_k, self.w_v, self.w_o = linears(), linears(), linears(), linears()
        if init == "zero":                      # W_O = 0: the student starts exactly at its base
            for w_o in self.w_o:
                nn.init.zeros_(w_o.weight)
        if init == "normal":                    # the released code's post_init: N(0, initializer_range) everywhere
            for linear in [*self.w_q, *self.w_k, *self.w_v, *self.w_o]:
                nn.init.normal_(linear.weight, mean=0.0, std=init_std)
        self.state = None      # what the current forward's hooks read (set by `record_inputs`)
        self.recorded = None   # a list inside `recording(model)`

    def record_inputs(self, base_model, args, kwargs):
        """Pre-forward hook on Qwen3VLModel: find the sink and the visual tokens of this forward,
        or set no state (the module does not run) when the KV cache already holds tokens."""
        inputs = dict(zip(("input_ids", "attention_mask", "position_ids", "past_key_values"), args)) | kwargs
        cache = inputs.get("past_key_values")
        self.state = None
        if cache is not None and cache.get_seq_length() > 0:  # a decode step: the sink is in the cache
            return
        input_ids, attention_mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if input_ids is None:
            raise ValueError("the cue recovery module finds the sink and the visual tokens from input_ids; "
                             "call the model with input_ids, not inputs_embeds")
        visual = torch.isin(input_ids, torch.tensor(self.config["visual_token_ids"], device=input_ids.device))
        counts = visual.sum(-1)                                               # (B,)
        num_visual = int(counts.max())
        if num_visual == 0:
            return
        # the visual positions of each row first, in sequence order: (B, N) indices and key mask
        order = torch.sort((~visual).int(), dim=-1, stable=True).indices[:, :num_visual]
        key_mask = torch.arange(num_visual, device=input_ids.device) < counts[:, None]
        self.state = dict(rows=torch.arange(input_ids.shape[0], device=input_ids.device),
                          sinks=sink_positions(input_ids, attention_mask, self.config["sink_token_id"]),
                          visual_positions=order, key_mask=key_mask)

    def clear_inputs(self, base_model, args, kwargs, output):
        self.state = None

    def update_sink(self, index, layer, args, kwargs):
        """Pre-forward hook on the decoder layer after module layer `index`: its input is the
        previous layer's output with deepstack's visual features already added."""
        if self.state is None:
            return None
        hidden_states = self(index, args[0] if args else kwargs["hidden_states"])
        return ((hidden_states, *args[1:]), kwargs) if args else (args, kwargs | {"hidden_states": hidden_states})

    def forward(self, index, hidden_states):
        """hidden_states (B, L, d) -> the same with the sink rows updated by module `index`."""
        state, (batch, _, hidden) = self.state, hidden_states.shape
        heads, head_dim = self.num_heads, hidden // self.num_heads
        sink = hidden_states[state["rows"], state["sinks"]]                            # (B, d)
        visual = self.norm_kv(hidden_states[state["rows"][:, None], state["visual_positions"]])  # (B, N, d)
        q = self.w_q[index](self.norm_q(sink)).view(batch, heads, 1, head_dim)           # q = RMSNorm_q(h) W_Q
        k = self.w_k[index](visual).view(batch, -1, heads, head_dim).transpose(1, 2)     # K = RMSNorm_kv(V) W_K
        u = self.w_v[index](visual).view(batch, -1, heads, head_dim).transpose(1, 2)     # U = RMSNorm_kv(V) W_V
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(head_dim)                 # (B, H, 1, N)
        key_mask = state["key_mask"][:, None, None, :]                                   # own visual tokens only
        weights = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min).softmax(-1) * key_mask
        if self.recorded is not None:
            self.recorded.append(weights.mean(1)[:, 0])                                  # (B, N), head average
        z = self.w_o[index]((weights.to(u.dtype) @ u).reshape(batch, hidden))           # z = softmax(.) U W_O
        return hidden_states.index_put((state["rows"], state["sinks"]), sink + z)        # h <- h + z


def get(model):
    """The model's CueRecovery module, or None."""
    return getattr(model.model, "cue_recovery", None)


def _install(model, module):
    """Store `module` as model.model.cue_recovery and hook it in. Hooks are bound methods of the
    module, so copy.deepcopy(model) gives hooks bound to the copy's own module.

    Deepstack ordering: Qwen3VLTextModel adds the visual features of layer L to the visual positions
    *after* decoder layer L returns, outside the layer, so a forward hook on layer L would run before
    that addition. The update for module layer L is a forward pre-hook on layer L + 1 instead: its
    input is exactly layer L's output plus deepstack, and the layer's (checkpointed) forward runs after."""
    if get(model) is not None:
        raise ValueError("this model already has a cue recovery module")
    text_model = model.model.language_model
    model.model.cue_recovery = module.to(device=text_model.embed_tokens.weight.device,
                                         dtype=text_model.embed_tokens.weight.dtype)
    model.model.register_forward_pre_hook(module.record_inputs, with_kwargs=True)
    model.model.register_forward_hook(module.clear_inputs, with_kwargs=True)
    for index, layer in enumerate(module.layers):
        text_model.layers[layer + 1].register_forward_pre_hook(functools.partial(module.update_sink, index),
                                                               with_kwargs=True)
    # its weights go to cue_recovery.pt (see `save`), not into save_pretrained's files,
    # which from_pretrained would reject as unexpected keys
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | {
        f"model.cue_recovery.{key}" for key in module.state_dict()}
    return module


def attach(model, tokenizer=None, sink_every=None, init="zero", saved=None):
    """Give a Qwen3VLForConditionalGeneration its cue recovery module -> the module: a new one
    (tokenizer: the model's tokenizer or processor, for the sink token's id), or, with saved=DIR, the
    one saved in DIR by `save`, its weights loaded (None when DIR holds no module: a hub id, a plain
    checkpoint). The one way a module gets onto a model."""
    text_config = model.config.get_text_config()
    if saved is not None:
        if not os.path.isfile(os.path.join(str(saved), CONFIG_FILE)):
            return None
        with open(os.path.join(saved, CONFIG_FILE)) as f:
            config = json.load(f)
        module = _install(model, CueRecovery(text_config.hidden_size, text_config.num_attention_heads, config["layers"],
                                             config["sink_token_id"], config["visual_token_ids"],
                                             text_config.rms_norm_eps, config["sink_every"], config["init"]))
        module.load_state_dict(torch.load(os.path.join(saved, WEIGHTS_FILE), map_location="cpu", weights_only=True))
        return module
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    num_layers = text_config.num_hidden_layers
    sink_every = sink_every or default_sink_every(num_layers)
    visual_token_ids = (model.config.image_token_id, model.config.video_token_id)
    module = CueRecovery(text_config.hidden_size, text_config.num_attention_heads, module_layers(num_layers, sink_every),
                         tokenizer.convert_tokens_to_ids(SINK_TOKEN), visual_token_ids, text_config.rms_norm_eps,
                         sink_every, init, getattr(text_config, "initializer_range", 0.02))
    return _install(model, module)


def parameter_count(model):
    """(parameters of the module, their share of the whole model): about 4 d^2 per module layer."""
    count = sum(p.numel() for p in get(model).parameters())
    return count, count / sum(p.numel() for p in model.parameters())


def save(model, directory):
    """Write cue_recovery.json (how it attaches) and cue_recovery.pt (its weights) next to
    save_pretrained's files; nothing when the model has no module."""
    module = get(model)
    if module is None:
        return
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(module.config, f, indent=1)
    torch.save(module.state_dict(), os.path.join(directory, WEIGHTS_FILE))


@contextmanager
def recording(model):
    """Within the block, every prefill forward of `model` appends its modules' sink attention, one
    (B, N) head average per module in layer order, to the list it yields; outside it nothing is kept
    (so --grad_ckpt's recompute records nothing)."""
    module = get(model)
    if module is None:
        raise ValueError("the model has no cue recovery module (cue_recovery.attach it first)")
    module.recorded = []
    try:
        yield module.recorded
    finally:
        module.recorded = None


@torch.no_grad()
def sink_attention(model, batch):
    """One prefill forward -> (B, num_modules, N) the sink's attention over each row's visual
    tokens (in sequence order, zero past a row's count), averaged over heads."""
    with recording(model) as recorded:
        model(**model_inputs(batch), logits_to_keep=1)
    return torch.stack(recorded, dim=1) if recorded else None


def cue_recall(weights, boxes, image_grid_thw, image_sizes, patch_size=16, merge_size=2):
    """Share of the sink's attention on the ground-truth boxes, beside the share of the image they cover.

    weights (B, ..., N): attention over each row's visual tokens, the row's one image first.
    boxes: per row, [x0, y0, x1, y1] in original pixels; image_grid_thw (B, 3) in patches;
    image_sizes: per row, the original (width, height). The processor resized the image to
    (grid_h * patch, grid_w * patch); a merged token covers a (patch * merge)^2 cell of it.
        recall = sum_j w_j * |cell_j ∩ union(boxes)| / |cell_j|      (to the resized pixel)
    Returns (recall (B, ...), box_area_share (B,)).
    """
    recalls, area_shares = [], []
    for row, (t, grid_h, grid_w) in enumerate(image_grid_thw.tolist()):
        height, width = grid_h * patch_size, grid_w * patch_size
        scale_x, scale_y = width / image_sizes[row][0], height / image_sizes[row][1]
        inside = torch.zeros(height, width)
        for x0, y0, x1, y1 in boxes[row]:
            inside[round(y0 * scale_y):round(y1 * scale_y), round(x0 * scale_x):round(x1 * scale_x)] = 1
        cell = patch_size * merge_size
        fraction = inside.view(grid_h // merge_size, cell, grid_w // merge_size, cell).mean((1, 3)).flatten()
        fraction = fraction.repeat(t).to(weights.device)                      # (tokens of this image,)
        recalls.append((weights[row, ..., :fraction.numel()].float() * fraction).sum(-1))
        area_shares.append(inside.mean())
    return torch.stack(recalls), torch.stack(area_shares)


def rows_cue_recall(weights, samples, batch, processor):
    """Mean cue recall of weights a forward on `batch` recorded (B, num_modules, N), over the rows of
    `samples` that have boxes; None unless every row holds one image (image_grid_thw is then per row)."""
    if not all(hasattr(s.image, "size") for s in samples) or not any(s.boxes for s in samples):
        return None
    recall, _ = cue_recall(weights, [s.boxes for s in samples], batch["image_grid_thw"], [s.image.size for s in samples],
                           processor.image_processor.patch_size, processor.image_processor.merge_size)
    has_boxes = torch.tensor([bool(s.boxes) for s in samples], device=recall.device)
    return recall.mean(-1)[has_boxes].mean().item()                            # modules, then rows


@torch.no_grad()
def evaluation_cue_recall(model, processor, samples, batch_size=64):
    """Cue recall over the samples that have boxes, from the student's own prompt (image + question):
    {'layers', 'per_layer', 'recall' (their mean), 'box_area_share' (what uniform attention would get)},
    or None when no sample has boxes."""
    rows = [s for s in samples if s.boxes and hasattr(s.image, "size")]   # boxes belong to one image
    if not rows:
        return None
    patch, merge = processor.image_processor.patch_size, processor.image_processor.merge_size
    recalls, areas = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = to_device(collate(processor, [student_messages(s) for s in chunk]), model.device)
        recall, area = cue_recall(sink_attention(model, batch), [s.boxes for s in chunk], batch["image_grid_thw"],
                                  [s.image.size for s in chunk], patch_size=patch, merge_size=merge)
        recalls.append(recall.cpu())
        areas.append(area)
    per_layer = torch.cat(recalls).mean(0)
    return {"layers": get(model).layers, "per_layer": per_layer.tolist(), "recall": per_layer.mean().item(),
            "box_area_share": torch.cat(areas).mean().item()}


def recall_line(recall):
    """evaluation_cue_recall's result as one printed line."""
    per_layer = ", ".join(f"layer {layer}: {100 * r:.1f}%" for layer, r in zip(recall["layers"], recall["per_layer"]))
    return (f"cue recall (the sink's attention inside the cue boxes): {100 * recall['recall']:.1f}% "
            f"({per_layer}); the boxes cover {100 * recall['box_area_share']:.1f}% of the image")


def heatmap(image, weights, boxes, grid_hw, layers, scale=3):
    """One panel per module layer: the image darkened where the sink does not look (the token with the
    largest weight is left as drawn), each token's share of the attention in %, the cue boxes in green.
    weights (num_modules, N) for this image's N = grid_h * grid_w tokens; grid_hw in merged tokens."""
    grid_h, grid_w = grid_hw
    width, height = image.width * scale, image.height * scale
    cell_w, cell_h = width / grid_w, height / grid_h
    base = image.convert("RGB").resize((width, height), Image.NEAREST)
    panels = []
    for layer, w in zip(layers, weights):
        w = w[:grid_h * grid_w].view(grid_h, grid_w)
        shade = ((1 - w / w.max().clamp_min(1e-12)) * 200).byte().numpy()  # 0 where it looks most
        alpha = Image.fromarray(shade, mode="L").resize((width, height), Image.NEAREST)
        panel = Image.composite(Image.new("RGB", (width, height), (0, 0, 0)), base, alpha)
        draw = ImageDraw.Draw(panel)
        for x0, y0, x1, y1 in boxes:
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=(0, 200, 0), width=2)
        for row in range(grid_h):
            for col in range(grid_w):
                draw.text((col * cell_w + 3, row * cell_h + 2), f"{100 * w[row, col]:.0f}%", fill=(255, 255, 0),
                          stroke_width=1, stroke_fill=(0, 0, 0))
        draw.text((3, height - 12), f"after layer {layer}", fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
        panels.append(panel)
    sheet = Image.new("RGB", (len(panels) * (width + 4), height), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (width + 4), 0))
    return sheet


def write_heatmaps(model, processor, samples, folder):
    """Heat maps of the sink's attention for `samples` as folder/<id>.png -> the paths."""
    several = [s.id for s in samples if not hasattr(s.image, "size")]
    if several:
        raise ValueError(f"heat maps are drawn over one image per sample; {several[:3]} have a video or several")
    os.makedirs(folder, exist_ok=True)
    batch = to_device(collate(processor, [student_messages(s) for s in samples]), model.device)
    weights = sink_attention(model, batch).float().cpu()                       # (B, M, N)
    merge = processor.image_processor.merge_size
    paths = []
    for sample, w, (_, grid_h, grid_w) in zip(samples, weights, batch["image_grid_thw"].tolist()):
        path = os.path.join(folder, f"{sample.id or len(paths)}.png")
        heatmap(sample.image, w, sample.boxes, (grid_h // merge, grid_w // merge), get(model).layers).save(path)
        paths.append(path)
    return paths
