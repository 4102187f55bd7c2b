"""HF models that hand attn_implementation="fastattn" more than a mask: sparse-attention key selections
(transformers folds them into the mask for eager / sdpa only), Gemma 4's KV-shared layers (which slice every mask
as (B, 1, L, S)), and attention sinks on sequences packed by flash-attention's kwargs. Small random configs, fp32,
bounded by eager's own fp32 error against eager in float64."""
import copy
import logging

import pytest
import torch

import fastattn.hf as fhf
from conftest import assert_bounded

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

V = 97
MLA = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
           n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, index_head_dim=8, index_n_heads=2, first_k_dense_replace=2, max_position_embeddings=64,
           pad_token_id=0, index_topk=3)  # (dense MLPs: the experts' grouped_mm has no float64)
MINIMAX = dict(vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, num_local_experts=4,
               dense_intermediate_size=32, shared_intermediate_size=16, rotary_dim=4, index_n_heads=2,
               index_head_dim=8, index_block_size=2, index_local_blocks=1, layer_types=["minimax_m3_sparse"] * 2,
               mlp_layer_types=["dense"] * 2, pad_token_id=0, max_position_embeddings=64, index_topk_blocks=1)


def model(model_type, impl="eager", **kw):
    fhf.register()
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def logits_against_eager(base, run):
    """run(model) on fastattn (fp32) bounded against eager in fp32 and fp64."""
    out = {}
    for impl, dtype in (("eager", torch.float64), ("eager", torch.float32), ("fastattn", torch.float32)):
        m = copy.deepcopy(base).to(dtype)
        m.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl, dtype] = run(m).double()
    assert_bounded("logits", out["fastattn", torch.float32], out["eager", torch.float64],
                   out["eager", torch.float32], torch.float32)


@pytest.mark.parametrize("model_type, kw", [("deepseek_v32", MLA), ("glm_moe_dsa", MLA),
                                            ("minimax_m3_vl_text", MINIMAX)])
def test_sparse_attention_selects_its_keys(model_type, kw):
    """The indexer's top-k keys (indices=) or blocks (block_indices=): fastattn ran dense attention (logits 0.13-0.25
    off eager, equal to the model with the top-k off)."""
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(0))
    logits_against_eager(model(model_type, **kw), lambda m: m(ids, use_cache=False).logits)


def test_gemma4_kv_shared_layers_generate():
    """Gemma 4's prefill before its KV-shared layers slices each mask as (B, 1, L, S): the compact masks fastattn
    builds raised IndexError in generate()."""
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, global_head_dim=8, sliding_window=4, num_kv_shared_layers=2,
               layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=V,
               hidden_size_per_layer_input=8, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    base = model("gemma4_text", **cfg)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    runs = {}
    for impl in ("eager", "fastattn"):
        m = copy.deepcopy(base)
        m.set_attn_implementation(impl)
        runs[impl] = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(runs["fastattn"], runs["eager"])


def test_sinks_on_flash_kwargs_packing():
    """GPT-OSS (attention sinks) on DataCollatorWithFlattening(return_flash_attn_kwargs=True) batches: each example
    attends within itself (they attended to each other: logits 0.16 off each example run alone)."""
    base = model("gpt_oss", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                 sliding_window=3, pad_token_id=0, layer_types=["sliding_attention", "full_attention"])
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "sinks" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 7, 4)]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    with torch.no_grad():
        alone = torch.cat([base(torch.tensor([s]), use_cache=False).logits[0] for s in seqs])
        base.set_attn_implementation("fastattn")
        packed = base(**batch, use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
