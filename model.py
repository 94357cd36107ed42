"""Load a Qwen3-VL student or teacher: a real checkpoint by name or path, or the embedded tiny one.

`tiny` and `tiny-large` are real `Qwen3VLForConditionalGeneration` models built from a
`Qwen3VLConfig` with random weights, a word-level tokenizer over the embedded world's
vocabulary that carries Qwen's chat special tokens, and a real `Qwen3VLProcessor`.
Images are 96x96: 16-pixel patches, 2x2 merge, so 9 visual tokens, one per grid cell.
"""

import os
import types

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast,
                          Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLProcessor, Qwen3VLVideoProcessor)

import cue_recovery
from divergences import default_chunk_rows
from data import IMAGE_SIZE, world_vocabulary

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen-style chat template: <|im_start|>role\n content <|im_end|>\n, images as vision pads.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

POS_EMBED_SCALE = 30.0  # tiny init: vision position embeddings at the scale of patch embeddings
TINY_SIZES = {
    # name: (text hidden, text layers, text heads, vision hidden, vision layers)
    "tiny": (128, 4, 4, 64, 2),
    "tiny-large": (192, 6, 6, 96, 2),
}


def tiny_processor():
    """Word-level tokenizer over the world's vocabulary + Qwen special tokens, in a Qwen3VLProcessor."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["<unk>"] + world_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", additional_special_tokens=SPECIAL_TOKENS)
    tokenizer.padding_side = "left"
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": pixels // 4, "longest_edge": pixels},
                                            patch_size=16, merge_size=2, temporal_patch_size=2,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def tiny_config(name, tokenizer):
    """A Qwen3VLConfig of a few million parameters, with the tokenizer's special-token ids."""
    if name not in TINY_SIZES:
        raise ValueError(f"unknown tiny size '{name}'; known: {sorted(TINY_SIZES)}")
    hidden, layers, heads, vision_hidden, vision_layers = TINY_SIZES[name]
    head_dim = hidden // heads
    ids = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         head_dim=head_dim, max_position_embeddings=2048, pad_token_id=ids("<|endoftext|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=4, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=hidden, num_position_embeddings=(IMAGE_SIZE // 16) ** 2, deepstack_visual_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )


# The published shapes of the Qwen3-VL checkpoints the paper uses, so that sizes and memory plans need
# no download: text (hidden, layers, heads, kv heads, intermediate, tied embeddings), vision (depth,
# hidden, intermediate, deepstack layers). On the meta device they give 2.13 B, 8.77 B, 33.36 B parameters.
QWEN3_VL_SHAPES = {
    "Qwen/Qwen3-VL-2B-Instruct": ((2048, 28, 16, 8, 6144, True), (24, 1024, 4096, [5, 11, 17])),
    "Qwen/Qwen3-VL-8B-Instruct": ((4096, 36, 32, 8, 12288, False), (27, 1152, 4304, [8, 16, 24])),
    "Qwen/Qwen3-VL-32B-Instruct": ((5120, 64, 64, 8, 25600, False), (27, 1152, 4304, [8, 16, 24])),
}


def shaped_config(name, tokenizer):
    """A Qwen3VLConfig with a real checkpoint's shapes (QWEN3_VL_SHAPES) and the tokenizer's special ids."""
    (hidden, layers, heads, kv_heads, intermediate, tied), (depth, v_hidden, v_inter, deepstack) = QWEN3_VL_SHAPES[name]
    config = tiny_config("tiny", tokenizer)
    config.text_config.update(dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, head_dim=128, intermediate_size=intermediate,
                                   vocab_size=151936, tie_word_embeddings=tied))
    config.text_config.rope_parameters["mrope_section"] = [24, 20, 20]
    config.vision_config.update(dict(depth=depth, hidden_size=v_hidden, intermediate_size=v_inter, num_heads=16,
                                     out_hidden_size=hidden, num_position_embeddings=2304,
                                     deepstack_visual_indexes=deepstack))
    config.tie_word_embeddings = tied
    return config


def linear_patch_embed(self, hidden_states):
    """Qwen3VLVisionPatchEmbed.forward as a matmul: the Conv3d's kernel equals its stride."""
    weight = self.proj.weight.view(self.embed_dim, -1)                  # (D, C * T * P * P)
    return torch.nn.functional.linear(hidden_states.view(-1, weight.shape[1]).to(weight.dtype), weight, self.proj.bias)


def patch_embed_as_matmul(model):
    """On CPU, Conv3d's backward is many times slower than the equivalent matmul (a fifth of a tiny
    SFT step), so the patch embedding applies the same weights with F.linear; parameters and
    checkpoints are unchanged. Bound as a method, so a deepcopy of the model uses its own weights."""
    embed = model.model.visual.patch_embed
    embed.forward = types.MethodType(linear_patch_embed, embed)
    return model


def load_processor(name_or_path):
    """The processor of a model (left padding, as batched sampling needs), without its weights."""
    if name_or_path in TINY_SIZES:
        return tiny_processor()
    looks_local = name_or_path.startswith((".", "/", "~")) or os.path.isdir(name_or_path.split("/")[0])
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"checkpoint directory '{name_or_path}' does not exist "
                                f"(a model is 'tiny', 'tiny-large', a hub id or a local directory)")
    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(name_or_path, dtype=torch.float32, seed=0, device="cpu"):
    """(model, processor). 'tiny' / 'tiny-large' build the embedded model with random weights
    (seeded); anything else goes to transformers' from_pretrained (a hub id or a local directory).
    A directory saved from a ViCuR student comes back with its cue recovery module attached."""
    if name_or_path in TINY_SIZES:
        processor = tiny_processor()
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(tiny_config(name_or_path, processor.tokenizer)).to(dtype)
        with torch.no_grad():  # random init puts position embeddings ~30x below patch embeddings;
            model.model.visual.pos_embed.weight.mul_(POS_EMBED_SCALE)  # match them so position is readable
    else:
        processor = load_processor(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
        cue_recovery.attach(model, saved=os.path.expanduser(name_or_path))  # a ViCuR checkpoint's module
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return patch_embed_as_matmul(model).to(device), processor


def num_parameters(model):
    return sum(p.numel() for p in model.parameters())


def parameter_counts(name_or_path, tokenizer):
    """(parameters, text decoder hidden size, layers, vocab, vision tower parameters) of a model, built
    on the meta device (no memory, no weights): a QWEN3_VL_SHAPES name, a tiny size, or a local
    directory with a config.json."""
    if name_or_path in QWEN3_VL_SHAPES:
        config = shaped_config(name_or_path, tokenizer)
    elif name_or_path in TINY_SIZES:
        config = tiny_config(name_or_path, tokenizer)
    elif os.path.isfile(os.path.join(os.path.expanduser(name_or_path), "config.json")):
        config = Qwen3VLConfig.from_pretrained(os.path.expanduser(name_or_path))
    else:
        raise ValueError(f"no shapes known for '{name_or_path}' without downloading it; known: "
                         f"{sorted(QWEN3_VL_SHAPES) + sorted(TINY_SIZES)} or a local checkpoint directory")
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    text = config.get_text_config()
    return (num_parameters(model), text.hidden_size, text.num_hidden_layers, text.vocab_size,
            num_parameters(model.model.visual))


def memory_plan(student, teacher, weight_bytes, micro_batch_tokens, tokenizer, world_size=1,
                shard_optimizer=False, grad_ckpt=False, freeze_vision=False, logits_from_hidden=False):
    """Per-GPU memory, in bytes, of one rank's training step as train.py runs it: weights and gradients
    in the weights' dtype (gradients only for what trains: not the vision tower under freeze_vision),
    optim.FlatAdamW's float32 master weights and two moments (12 bytes per trained weight, split over
    the ranks when sharded), a frozen teacher (None: none; the self teacher is a second copy of the
    student), and an activation estimate for one micro-batch of T tokens: 34 T d bytes per decoder layer
    in 16-bit without recomputation (Korthikanti et al. 2022, attention scores left out as SDPA never
    stores them), or with grad_ckpt each layer's input (T d values) plus one layer's 34 T d being
    recomputed; plus the logits: T V in the weights' dtype and twice T V in float32 (the upcast and its
    gradient), or with logits_from_hidden the same for one chunk of rows (divergences.HiddenLogits) and
    a float32 accumulator of lm_head's gradient (V d); and with a teacher its logits for the same
    micro-batch (T V in the weights' dtype)."""
    params, hidden, layers, vocab, vision = parameter_counts(student, tokenizer)
    trained = params - vision if freeze_vision else params
    shards = world_size if shard_optimizer else 1
    rows = [("student weights", params * weight_bytes),
            ("gradients" + (" (vision tower frozen)" if freeze_vision else ""), trained * weight_bytes),
            ("optimizer: fp32 master weights + 2 moments" + (f", 1/{shards} shard" if shards > 1 else ""),
             12 * trained // shards)]
    if teacher is not None:
        teacher_params = params if teacher == student else parameter_counts(teacher, tokenizer)[0]
        rows.append((f"teacher weights ({teacher}), frozen", teacher_params * weight_bytes))
    per_layer = 34 * micro_batch_tokens * hidden * weight_bytes // 2
    activations = (micro_batch_tokens * hidden * weight_bytes * layers + per_layer) if grad_ckpt \
        else per_layer * layers
    rows.append(("activations, estimate" + (" (recomputed per layer)" if grad_ckpt else ""), activations))
    if logits_from_hidden:
        chunk = min(micro_batch_tokens, default_chunk_rows(vocab, cuda=True))
        rows += [(f"logits: one {chunk}-row chunk (+ float32 copy, gradient)", chunk * vocab * (weight_bytes + 8)),
                 ("lm_head gradient accumulator (float32)", 4 * vocab * hidden)]
    else:
        rows.append(("logits (+ float32 copy and gradient)", micro_batch_tokens * vocab * (weight_bytes + 8)))
    if teacher is not None:
        rows.append(("teacher logits (one micro-batch)", micro_batch_tokens * vocab * weight_bytes))
    return rows


def teacher_memory_plan(teacher, weight_bytes, micro_batch_tokens, tokenizer):
    """Per-GPU memory, in bytes, of a rank that holds only the teacher (--teacher_ranks): its frozen
    weights, one decoder layer's activations at a time (a forward without gradient keeps none for a
    backward: 34 T d bytes in 16-bit, as in memory_plan), and its logits for one micro-batch (T V)."""
    params, hidden, _, vocab, _ = parameter_counts(teacher, tokenizer)
    return [(f"teacher weights ({teacher}), frozen", params * weight_bytes),
            ("activations of one layer, estimate (no backward)", 34 * micro_batch_tokens * hidden * weight_bytes // 2),
            ("teacher logits (one micro-batch)", micro_batch_tokens * vocab * weight_bytes)]


def print_memory_plan(config, world_size, distilling):
    """--dry_run: what one GPU holds for this config, from the model's shapes alone (memory_plan);
    with --teacher_ranks, what a student rank and what a teacher rank hold (teacher_memory_plan).
    config: train.Config; distilling: its mode has a teacher."""
    teacher = None
    if distilling:
        teacher = config.init_from or config.student if config.teacher == "self" else config.teacher
    tokens = config.batch_size * (config.num_rollouts if distilling else 1) * config.max_length
    weight_bytes, tokenizer = torch.finfo(getattr(torch, config.dtype)).bits // 8, tiny_processor().tokenizer
    remote = bool(config.teacher_ranks and teacher)
    students = world_size - config.teacher_ranks if remote else world_size
    rows = memory_plan(config.init_from or config.student, None if remote else teacher, weight_bytes, tokens, tokenizer,
                       students, config.shard_optimizer, config.grad_ckpt, config.freeze_vision,
                       config.logits_from_hidden and distilling)
    if remote:  # what comes back: the sampled tokens' log-probs, or the full rows for a divergence loss
        full_rows = config.mode != "ptdpo" and config.loss != "sampled_rkl"
        rows.append(("the teacher's answer (one micro-batch)", tokens * (parameter_counts(teacher, tokenizer)[3] *
                                                                       weight_bytes if full_rows else 8)))
    roles = [("a student rank" if remote else "per GPU", rows)]
    if remote:
        roles.append(("a teacher rank", teacher_memory_plan(teacher, weight_bytes, tokens, tokenizer)))
    print(f"memory plan: {config.mode}, student {config.init_from or config.student}, {config.dtype}, world size "
          f"{world_size}" + (f" ({students} student + {config.teacher_ranks} teacher ranks)" if remote else "")
          + f", micro-batch {tokens} tokens (global batch {config.batch_size * config.grad_accum * students})")
    for role, rows in roles:
        total = sum(size for _, size in rows)
        print(f" {role}:")
        for name, size in rows + [("total", total)]:
            print(f"  {name:<56} {size / 2**30:>8.1f} GiB")
        print(f"  {'fits on an 80 GB card' if total < 80e9 else 'does NOT fit on an 80 GB card'}")
    print("  the activation lines are estimates; --shard_optimizer, --grad_ckpt and --freeze_vision each shrink a line")
