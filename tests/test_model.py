"""The embedded tiny Qwen3-VL: real transformers classes, special-token ids, save and load by path."""
import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from data import collate, eval_world, model_inputs, student_messages
from model import load_model, num_parameters


def test_tiny_is_the_real_qwen3_vl_with_consistent_token_ids(tiny):
    model, processor = tiny
    assert type(model) is Qwen3VLForConditionalGeneration and type(processor) is Qwen3VLProcessor
    tokenizer, config = processor.tokenizer, model.config
    for name, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert getattr(config, name) == tokenizer.convert_tokens_to_ids(token) == getattr(processor, name)
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.vision_config.deepstack_visual_indexes == [0]
    assert 1e6 < num_parameters(model) < 5e6
    large, _ = load_model("tiny-large")
    assert num_parameters(large) > 2 * num_parameters(model)


def test_save_pretrained_round_trip_by_path(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path))
    samples = eval_world(3)
    batch = collate(processor, [student_messages(s) for s in samples])
    again = collate(loaded_processor, [student_messages(s) for s in samples])
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    with torch.no_grad():   # exact: the same weights, the same inputs, the same computation
        assert torch.equal(model(**model_inputs(batch)).logits, loaded.eval()(**model_inputs(again)).logits)


def test_a_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        load_model("./tiny-huge")
    (tmp_path / "out").mkdir()   # 'out/sft/ckpt' under an existing local folder is a path, not a hub id
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "out" / "sft" / "ckpt"))


def test_patch_embedding_as_matmul_equals_the_conv3d(tiny):
    model, _ = tiny
    embed = model.model.visual.patch_embed
    patches = torch.randn(40, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    conv = embed.proj(patches.view(-1, 3, 2, 16, 16)).view(-1, embed.embed_dim)
    # oneDNN's convolution vs a GEMM: dot products of 1536 terms summed in other orders, outputs up to ~3.4;
    # they differ by up to 5e-6 (15 ulps) over random inputs, so 1e-5 was a 2x margin: 1e-4 is 20x, and a
    # kernel flattened in another order (channels and frames swapped) is off by ~3
    assert torch.allclose(embed(patches), conv, rtol=0, atol=1e-4)


def test_a_deep_copy_uses_its_own_patch_embedding(tiny):
    import copy
    model, _ = tiny
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.visual.patch_embed.proj.weight.zero_()
        twin.model.visual.patch_embed.proj.bias.zero_()
    patches = torch.randn(8, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    assert twin.model.visual.patch_embed(patches).abs().max() == 0        # exact: zero weights and bias
    assert model.model.visual.patch_embed(patches).abs().max() > 0
