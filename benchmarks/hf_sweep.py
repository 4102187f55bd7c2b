"""attn_implementation="fastattn" against "eager" (and "sdpa") over many HF transformers architectures.

Each model type gets a tiny random config (2 layers, d 64, 4 heads, 2 KV heads where the config has them, a
sliding window of 5 where it has one), built three times on the same weights. Decoders: 3 x 13 tokens, one row
left-padded; encoders and encoder-decoders: one row right-padded. Printed per architecture: the largest difference
of the outputs on the real tokens against eager and sdpa, sdpa's own difference from eager (the scale of fp32
rounding here), and for decoders whether 8 greedy tokens equal eager's, with a dynamic and with a static cache.
A row says "FASTATTN ERROR" when only our run failed; a config the script cannot build is reported and skipped.

    python benchmarks/hf_sweep.py                    # the default list below
    python benchmarks/hf_sweep.py llama:causal mpnet:encoder bart:seq2seq
    python benchmarks/hf_sweep.py --backward         # also a training step's parameter gradients
"""
import copy
import logging
import sys
import warnings

import torch

import fastattn.hf as fhf

warnings.filterwarnings("ignore")
fhf.register()
import transformers as t  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
V = 97
BACKWARD = False
SMALL = dict(hidden_size=64, d_model=64, n_embd=64, num_hidden_layers=2, n_layer=2, num_layers=2, encoder_layers=2,
             decoder_layers=2, num_decoder_layers=2, num_attention_heads=4, n_head=4, encoder_attention_heads=4,
             decoder_attention_heads=4, num_heads=4, num_key_value_heads=2, intermediate_size=96,
             encoder_ffn_dim=96, decoder_ffn_dim=96, d_ff=96, n_inner=96, ffn_dim=96, vocab_size=V, head_dim=16,
             d_kv=16, max_position_embeddings=128, n_positions=128, num_experts=4, num_local_experts=4,
             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=16, sliding_window=5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             decoder_start_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             attention_dropout=0.0, dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
             max_source_positions=64, max_target_positions=64, n_group=1, topk_group=1,
             global_attn_every_n_layers=2, local_attention=4, rotary_dim=8, dropout_rate=0.0, layerdrop=0.0,
             encoder_layerdrop=0.0, decoder_layerdrop=0.0, residual_dropout=0.0, activation_dropout=0.0,
             classifier_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0)
AUTO = {"causal": "AutoModelForCausalLM", "encoder": "AutoModel", "seq2seq": "AutoModelForSeq2SeqLM"}
DEFAULT = {
    "causal": "llama qwen2 qwen3 qwen3_moe qwen3_next phi phi3 phimoe gemma gemma2 gemma3_text cohere cohere2 "
              "starcoder2 olmo2 olmo3 granite granitemoe mixtral mistral ministral gpt2 gpt_neox gptj codegen opt "
              "falcon gpt_bigcode gpt_oss smollm3 glm glm4 glm4_moe exaone4 ernie4_5 helium apertus minimax lfm2 "
              "nemotron stablelm persimmon biogpt llama4_text qwen2_moe olmoe jetmoe diffllama doge bitnet "
              "vaultgemma hunyuan_v1_dense hunyuan_v1_moe seed_oss arcee bloom mpt xglm gpt_neox_japanese",
    "encoder": "bert roberta distilbert electra albert modernbert deberta-v2 xlm-roberta megatron-bert roformer mpnet",
    "seq2seq": "bart mbart t5 mt5 umt5 pegasus marian blenderbot m2m_100 led",
}


def config(model_type):
    cfg = t.AutoConfig.for_model(model_type)
    for k, v in SMALL.items():
        if hasattr(cfg, k):
            try:
                setattr(cfg, k, v)
            except Exception:  # a derived property
                pass
    if getattr(cfg, "layer_types", None) is not None:  # keep every kind of layer, two layers in all
        kinds = sorted(set(cfg.layer_types))
        cfg.layer_types = [kinds[i % len(kinds)] for i in range(2)]
    return cfg


def outputs(model, ids, mask, **kw):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kw)
    o = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return o.double()


def check(model_type, kind):
    cfg, auto = config(model_type), getattr(t, AUTO[kind])
    models = {}
    for impl in ("eager", "sdpa", "fastattn"):
        try:
            torch.manual_seed(0)
            models[impl] = auto.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
        except Exception as e:
            if impl == "fastattn":
                return f"fastattn refused by transformers: {type(e).__name__}: {str(e)[:120]}"
    sd = models["eager"].state_dict()
    for m in models.values():
        m.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    rows, cols = (0, slice(0, 4)) if kind == "causal" else (1, slice(-3, None))
    mask[rows, cols] = 0
    ids[rows, cols] = 0
    kw, keep = {}, mask.bool()
    if kind == "seq2seq":
        kw["decoder_input_ids"] = torch.randint(3, V, (3, 7), generator=g)
        keep = torch.ones(3, 7, dtype=torch.bool)
    outs = {}
    for k, m in models.items():
        try:
            outs[k] = outputs(m, ids, mask, **kw)
        except Exception as e:
            outs[k] = e
    if isinstance(outs["fastattn"], Exception):
        e = outs["fastattn"]
        if isinstance(outs["eager"], Exception):
            return f"config not built here: {type(e).__name__}: {str(e)[:100]}"
        return f"FASTATTN ERROR {type(e).__name__}: {str(e)[:200]}"
    res = []
    for k in ("eager", "sdpa"):
        o = outs.get(k)
        res.append(f"{k} n/a" if not isinstance(o, torch.Tensor) else
                   f"|fa-{k}| {(outs['fastattn'] - o)[keep].abs().max().item():.1e}")
    if all(isinstance(outs.get(k), torch.Tensor) for k in ("eager", "sdpa")):
        res.append(f"|sdpa-eager| {(outs['sdpa'] - outs['eager'])[keep].abs().max().item():.1e}")
    res.append(f"max|out| {outs['eager'][keep].abs().max().item():.1e}")
    if BACKWARD:
        res.append(_gradients(models, ids, mask, keep, kw))
    if kind == "causal":
        for cache in (None, "static"):
            gen = [models[k].generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                      do_sample=False, pad_token_id=0, cache_implementation=cache)
                   for k in ("eager", "fastattn")]
            res.append(f"{cache or 'dynamic'} {'same' if torch.equal(*gen) else 'DIFFERENT'}")
    return ", ".join(res)


def _gradients(models, ids, mask, keep, kw):
    """A training step (train mode, dropout 0) of eager and fastattn: the largest parameter-gradient difference,
    relative to the largest gradient, beside sdpa's own from eager."""
    grads = {}
    for k in ("eager", "sdpa", "fastattn"):
        m = models.get(k)
        if m is None:
            continue
        m.train().zero_grad()
        try:
            out = m(input_ids=ids, attention_mask=mask, **kw)
            o = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            o[keep].square().mean().backward()
        except Exception as e:
            grads[k] = e
            continue
        finally:
            m.eval()
        grads[k] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    if isinstance(grads.get("fastattn"), Exception):
        return f"BACKWARD ERROR {type(grads['fastattn']).__name__}: {str(grads['fastattn'])[:120]}"

    def rel(a, b):
        top = max(g.abs().max().item() for g in b.values()) or 1.0
        return max((a[n] - b[n]).abs().max().item() for n in b) / top
    out = [f"grad |fa-eager|/max {rel(grads['fastattn'], grads['eager']):.1e}"]
    if isinstance(grads.get("sdpa"), dict):
        out.append(f"|sdpa-eager|/max {rel(grads['sdpa'], grads['eager']):.1e}")
    return ", ".join(out)


def main(argv):
    global BACKWARD
    BACKWARD = "--backward" in argv
    argv = [a for a in argv if a != "--backward"]
    specs = [a.split(":") for a in argv] or [(m, k) for k, ms in DEFAULT.items() for m in ms.split()]
    print(f"transformers {t.__version__}, torch {torch.__version__}")
    for model_type, kind in specs:
        try:
            r = check(model_type, kind)
        except Exception as e:
            r = f"config not built here: {type(e).__name__}: {str(e)[:100]}"
        print(f"{model_type:18s} {kind:8s} {r}", flush=True)


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        sys.exit(print(__doc__))
    main(sys.argv[1:])
