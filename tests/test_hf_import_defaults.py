"""GPT.from_hf on a config.json that lacks keys: it reads them as transformers does, from the family's config class
defaults (gpt_hf.HF_DEFAULTS: StableLM's partial rotary 0.25, Mixtral's rope_theta 1e6 and rms_norm_eps 1e-5,
Mistral's 4096 window in 131072 positions, ...), not from the importers' own fallbacks (1.0, 1e4, 1e-6, 2048). Each
table entry equals its config class's default (so the table cannot drift from transformers silently), and small
random models whose config.json is stripped of those keys import to transformers' logits and greedy tokens."""
import json

import pytest
import torch

from conftest import assert_bounded, padded_batch
from fastattn.models import GPT
from fastattn.models.gpt_hf import _NO_PADDING_IDX, _PAD, GPT_HF_TYPES, HF_DEFAULTS
transformers = pytest.importorskip("transformers")

VOCAB = 71
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # (their window is None unless use_sliding_window is on)


def _class_default(kind: str, key: str):
    """transformers' default for config.json key ``key`` of model_type ``kind``, as its config class reads it."""
    cfg = transformers.AutoConfig.for_model(kind, **({"use_sliding_window": True} if kind in _QWEN else {}))
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # (Gemma 3, OLMo 3: one dict per layer type)
    if key == "rope_theta":
        return rope["rope_theta"]
    if key in ("partial_rotary_factor", "rotary_pct"):
        return rope["partial_rotary_factor"]
    return getattr(cfg, key)


@pytest.mark.parametrize("kind, key", [(k, key) for k, entry in HF_DEFAULTS.items() for key in entry])
def test_table_equals_the_config_class_default(kind, key):
    assert HF_DEFAULTS[kind][key] == _class_default(kind, key)


@pytest.mark.parametrize("kind", [k for k in GPT_HF_TYPES if k not in _NO_PADDING_IDX])
def test_pad_table_equals_the_config_class_default(kind):
    """The padding_idx from_hf gives a config.json without pad_token_id: transformers' config class default."""
    assert _PAD.get(kind) == transformers.AutoConfig.for_model(kind).pad_token_id


# the keys whose defaults the table holds, and the rope dict transformers 5 writes them into
STRIPPED = ("rope_parameters", "rope_theta", "partial_rotary_factor", "rotary_pct", "rms_norm_eps",
            "max_position_embeddings", "original_max_position_embeddings", "tie_word_embeddings", "sliding_window",
            "attn_logit_softcapping", "final_logit_softcapping")
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.3)
# model_type: (transformers' class name prefix, config kwargs besides SMALL); none sets a STRIPPED key
MOE = dict(num_experts_per_tok=2)
FAMILIES = {"stablelm": ("StableLm", {}), "gpt_neox": ("GPTNeoX", dict(num_key_value_heads=None)),
            "phi": ("Phi", {}), "phi3": ("Phi3", {}), "mixtral": ("Mixtral", dict(num_local_experts=4, **MOE)),
            "cohere": ("Cohere", {}), "smollm3": ("SmolLM3", {}), "helium": ("Helium", dict(head_dim=8)),
            "ernie4_5": ("Ernie4_5", dict(head_dim=8)), "olmo2": ("Olmo2", {}), "olmo3": ("Olmo3", {}),
            "exaone4": ("Exaone4", {}), "arcee": ("Arcee", dict(head_dim=8)),
            "hunyuan_v1_dense": ("HunYuanDenseV1", dict(head_dim=8)), "olmoe": ("Olmoe", dict(num_experts=4, **MOE)),
            "glm": ("Glm", dict(head_dim=8)), "starcoder2": ("Starcoder2", {}), "mistral": ("Mistral", {}),
            "gemma2": ("Gemma2", dict(head_dim=8)), "gemma3_text": ("Gemma3", dict(head_dim=8))}


def _stripped(tmp_path, kind: str):
    """transformers' model of family ``kind`` (norm weights and biases drawn away from 1 / 0), saved to tmp_path
    with a config.json stripped of STRIPPED; the model as transformers reads that folder back."""
    name, kw = FAMILIES[kind]
    cfg = transformers.AutoConfig.for_model(kind, **{**SMALL, **kw})
    torch.manual_seed(0)
    hf = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5).add_(0.0 if n.endswith(".bias") else 1.0)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in saved.items() if k not in STRIPPED}))
    return type(hf).from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_a_stripped_config_imports_as_transformers_reads_it(tmp_path, kind):
    """Logits of a left-padded batch within transformers' own fp32 error against its float64 run (row by row for
    Gemma 2, whose float64 masking gives NaN), greedy tokens equal to transformers' generate."""
    hf = _stripped(tmp_path, kind)
    ours = GPT.from_hf(tmp_path)
    assert ours.config.max_seq_len == hf.config.max_position_embeddings
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    assert ours.tok_emb.padding_idx == hf.get_input_embeddings().padding_idx
    if kind == "mistral":  # its default window, within its default context
        assert ours.config.sliding_window == hf.config.sliding_window == 4096
    eager = {"experts_implementation": "eager"} if kind in ("mixtral", "olmoe") else {}  # (float64 experts)
    hf64 = type(hf).from_pretrained(tmp_path, dtype=torch.float64, **eager).eval()
    ids, mask = padded_batch(VOCAB, 12, 4, left=True, pad_id=0, low=1)
    keep, pos = mask.bool(), (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits[keep], hf(ids, attention_mask=mask, position_ids=pos).logits[keep]
        c = torch.cat([hf64(ids[i:i + 1, keep[i]]).logits[0] for i in range(len(ids))]) if kind == "gemma2" else \
            hf64(ids, attention_mask=mask, position_ids=pos).logits[keep]
        assert_bounded(kind, a, c.double(), b, torch.float32)
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
        assert torch.equal(ours.generate(ids, 10, temperature=0, attention_mask=mask, eos_token_id=None), want)


def test_phi3_reads_its_top_level_original_context_first(tmp_path):
    """Phi-3's config class always has original_max_position_embeddings (4096 where config.json lacks it), which
    transformers puts over the rope dict's: a LongRoPE dict's 16 then never switches a 24-token prompt to the long
    factors, in either model."""
    cfg = transformers.Phi3Config(**SMALL, max_position_embeddings=64, rope_parameters=dict(
        rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=16, short_factor=[1.0, 1.5, 2.0, 3.0],
        long_factor=[2.0, 4.0, 8.0, 16.0]))
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["original_max_position_embeddings"]
    saved["rope_parameters"]["original_max_position_embeddings"] = 16  # (the config class wrote its 4096 there)
    path.write_text(json.dumps(saved))
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    ours = GPT.from_hf(tmp_path)
    assert ours.config.rope_scaling["original_max_position_embeddings"] == hf.config.rope_parameters[
        "original_max_position_embeddings"] == 4096
    ids = padded_batch(VOCAB, 24, 0, left=True, pad_id=0, low=1)[0]
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
        c = type(hf).from_pretrained(tmp_path, dtype=torch.float64).eval()(ids).logits
    assert_bounded("phi3", a, c.double(), b, torch.float32)
