"""The GPU suite's model-level checks: the test suite runs fastattn.models, the CLI and the HF integration on the CPU
only (CI has no GPU), so this script runs them once on the GPU. Each check prints PASS / FAIL with its numbers; all
of them go to OUT.json.  usage: python benchmarks/gpu_models_check.py OUT.json  (on a machine without a GPU it runs
on the CPU, the CUDA-graph checks skipped: a dry run of the script itself). GPU_CHECKS=name,name runs those checks
alone, in that order (run 4's budget cut every check after the first).

Bounds are the tests' (tests/conftest.py): fastattn's error against a float64 reference <= 2x the error of torch's
own computation in the same dtype + about one rounding step of that dtype."""
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
import fastattn  # noqa: E402
import fastattn.hf  # noqa: E402

fastattn.hf.register()
from fastattn.models import BERT, GPT, BERTConfig, GPTConfig, Seq2Seq, Seq2SeqConfig  # noqa: E402

DEV = "cuda" if GPU else "cpu"
EPS = {torch.float32: 2e-6, torch.bfloat16: 8e-3}
RESULTS = {}
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def bounded(name, ours, theirs, ref, dtype):
    """ours within 2x theirs' error against ref (+ eps at ref's scale); returns the numbers for the record."""
    e, base = err(ours, ref), err(theirs, ref)
    bound = 2 * base + EPS[dtype] * max(1.0, ref.abs().max().item())
    assert torch.isfinite(ours).all(), f"{name}: non-finite"
    assert e <= bound, f"{name}: error {e:.3g} > bound {bound:.3g} (torch's {base:.3g})"
    return {name: {"err": e, "torch_err": base}}


def ids(B, L, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, L), generator=g).to(DEV)


GPT_CFGS = {
    "gpt2-style": dict(vocab_size=512, d_model=128, n_layer=3, n_head=4, max_seq_len=256),
    "llama-style": dict(vocab_size=512, d_model=128, n_layer=3, n_head=8, n_kv_head=2, max_seq_len=256,
                        norm="rmsnorm", mlp="swiglu", pos="rotary", bias=False, tie_embeddings=False),
}


def gpt(name, backend="fastattn", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**GPT_CFGS[name], backend=backend, **kw)).to(DEV, dtype).eval()


@check
def gpt_logits_vs_torch_backend():
    out = {}
    for name in GPT_CFGS:
        x = ids(3, 100, 512)
        mask = torch.ones_like(x)
        mask[1, :37] = 0  # left padding
        with torch.no_grad():
            ref = gpt(name, "torch", torch.float64)(x, mask).logits
            for dt in (torch.float32, torch.bfloat16):
                ours = gpt(name, "fastattn", dt)(x, mask).logits
                theirs = gpt(name, "torch", dt)(x, mask).logits
                keep = mask.bool()  # padded rows' logits are not defined alike
                out |= bounded(f"{name} {str(dt)[6:]}", ours[keep], theirs[keep], ref[keep], dt)
    return out


@check
def gpt_packed_sequences():
    """Packed rows (position_ids restarting at each sequence: attention_varlen, Triton's VARLEN kernels on a GPU)
    against the torch backend's block-diagonal mask, both against float64: logits, and a training step's gradients
    of the attention projections (fp32)."""
    lens = [37, 90, 5, 60]
    x = ids(2, sum(lens), 512, seed=4)
    pos = torch.cat([torch.arange(n) for n in lens])[None].expand(2, -1).to(DEV)
    out = {}
    with torch.no_grad():
        ref = gpt("llama-style", "torch", torch.float64)(x, position_ids=pos).logits
        for dt in (torch.float32, torch.bfloat16):
            ours = gpt("llama-style", "fastattn", dt)(x, position_ids=pos).logits
            theirs = gpt("llama-style", "torch", dt)(x, position_ids=pos).logits
            out |= bounded(f"packed logits {str(dt)[6:]}", ours, theirs, ref, dt)
    grads = {}
    for backend, dt in (("fastattn", torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
        model = gpt("llama-style", backend, dt).train()
        model(x, position_ids=pos, labels=x).loss.backward()
        grads[backend, dt] = model.blocks[1].attn.wqkv.weight.grad
    out |= bounded("packed dWqkv fp32", grads["fastattn", torch.float32], grads["torch", torch.float32],
                   grads["torch", torch.float64], torch.float32)
    return out


@check
def gpt_kv_cache_generation():
    """Greedy tokens from the cache equal the argmax of a full forward over the generated text, and a left-padded
    batch generates what each prompt does alone (fp32)."""
    out = {}
    for name in GPT_CFGS:
        model = gpt(name)
        prompts = [ids(1, L, 512, seed=L) for L in (5, 17, 40)]
        with torch.no_grad():
            alone = [model.generate(p, 24, temperature=0) for p in prompts]
            for p, a in zip(prompts, alone):
                full = model(a).logits[0, p.shape[1] - 1:-1].argmax(-1)
                assert torch.equal(full, a[0, p.shape[1]:]), f"{name}: cached decoding != full forward's argmax"
            L = max(p.shape[1] for p in prompts)
            batch = torch.zeros(len(prompts), L, dtype=torch.long, device=DEV)
            mask = torch.zeros_like(batch)
            for i, p in enumerate(prompts):
                batch[i, L - p.shape[1]:], mask[i, L - p.shape[1]:] = p[0], 1
            together = model.generate(batch, 24, temperature=0, attention_mask=mask)
            for i, a in enumerate(alone):
                assert torch.equal(together[i, L:], a[0, -24:]), f"{name}: batched row {i} != alone"
            b16 = gpt(name, dtype=torch.bfloat16).generate(batch, 24, temperature=0, attention_mask=mask)
            out[name] = {"bf16 tokens equal to fp32": float((b16[:, L:] == together[:, L:]).float().mean())}
    return out


@check
def seq2seq_generation():
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=512, d_model=128, n_layer=2, n_head=4, max_seq_len=128)).to(DEV).eval()
    src = ids(2, 30, 512)
    mask = torch.ones_like(src)
    mask[1, 22:] = 0
    with torch.no_grad():
        gen = model.generate(src, 20, temperature=0, attention_mask=mask)
        full = model(src, mask, decoder_input_ids=gen[:, :-1]).logits.argmax(-1)
    assert torch.equal(full, gen[:, 1:]), "Seq2Seq: cached decoding != full forward's argmax"
    return {"tokens": gen.shape[1] - 1}


def scaled_pair(name):
    """(fastattn fp32 GPT, torch-backend fp64 GPT) of config ``name`` with the same weights scaled up by 4: logits
    far apart, so that no near-tie decides a token."""
    model, ref = gpt(name), gpt(name, "torch", torch.float64)
    with torch.no_grad():
        for m in (model, ref):
            for p in m.parameters():
                p.mul_(4)
    return model, ref


@check
def speculative_decoding():
    """decode_many (5 rows a sequence on the bound step: the Triton decode kernel's causal rows on a GPU) against the
    full forward, and speculative greedy generation (prompt lookup; an exact copy as the assistant, which must accept
    every draft) equal to plain greedy, for GPT and Seq2Seq (fp32; weights scaled up: no argmax near a tie)."""
    out = {}
    for name in GPT_CFGS:
        model, ref = scaled_pair(name)
        with torch.no_grad():
            x = ids(2, 60, 512)
            model.setup_caches(2, 60)
            model.prefill(x[:, :40], torch.ones(2, 40, dtype=torch.bool, device=DEV))
            many = model.bound_decode_many(5)(x[:, 40:45], model.cache_index[40:45])
            out |= bounded(f"{name} decode_many", many, model(x[:, :45]).logits[:, 40:], ref(x[:, :45]).logits[:, 40:],
                           torch.float32)
            plain = model.generate(x[:, :30], 40, temperature=0)
            copy = gpt(name)
            copy.load_state_dict(model.state_dict())
            for kw in (dict(prompt_lookup_num_tokens=4), dict(assistant_model=copy)):
                spec = model.generate(x[:, :30], 40, temperature=0, **kw)
                assert torch.equal(spec, plain), f"{name} {list(kw)[0]}: tokens differ from plain greedy"
                out[f"{name} {list(kw)[0]} acceptance"] = model.speculation_stats.acceptance
            assert out[f"{name} assistant_model acceptance"] == 1.0, f"{name}: an exact copy rejected drafts"
    torch.manual_seed(0)
    s2s = Seq2Seq(Seq2SeqConfig(vocab_size=512, d_model=128, n_layer=2, n_head=4, max_seq_len=128)).to(DEV).eval()
    src = ids(2, 30, 512)
    with torch.no_grad():
        plain = s2s.generate(src, 30, temperature=0)
        assert torch.equal(s2s.generate(src, 30, temperature=0, prompt_lookup_num_tokens=4), plain), \
            "Seq2Seq prompt lookup: tokens differ from plain greedy"
    out["seq2seq lookup acceptance"] = s2s.speculation_stats.acceptance
    return out


@check
def beam_search():
    """Beam search (4 beams, 2 returned, a left-padded batch; models/beam.py's cache expansion and reordering on the
    device) equal to the torch backend's in float64 on the same weights, for GPT and Seq2Seq (weights scaled up: no
    near-tie decides a beam)."""
    out = {}
    kw = dict(temperature=0, num_beams=4, num_return_sequences=2, eos_token_id=[3, 5], length_penalty=1.5)
    for name in GPT_CFGS:
        model, ref = scaled_pair(name)
        with torch.no_grad():
            x = ids(2, 30, 512)
            mask = torch.ones_like(x)
            mask[1, :9] = 0
            got = model.generate(x, 24, attention_mask=mask, **kw)
            assert torch.equal(got, ref.generate(x, 24, attention_mask=mask, **kw)), f"{name}: beams differ"
        out[f"{name} tokens"] = got.shape[1] - 30
    torch.manual_seed(0)
    cfg = dict(vocab_size=512, d_model=128, n_layer=2, n_head=4, max_seq_len=128)
    s2s = Seq2Seq(Seq2SeqConfig(**cfg)).to(DEV).eval()
    ref = Seq2Seq(Seq2SeqConfig(**cfg, backend="torch")).to(DEV, torch.float64).eval()
    with torch.no_grad():
        for p in s2s.parameters():
            p.mul_(4)
        ref.load_state_dict(s2s.state_dict())
        src = ids(2, 30, 512)
        got = s2s.generate(src, 24, **kw)
        assert torch.equal(got, ref.generate(src, 24, **kw)), "Seq2Seq: beams differ"
    out["seq2seq tokens"] = got.shape[1] - 1
    return out


@check
def mixture_of_experts():
    """A Mixtral-style GPT (8 experts, 2 per token) on the device: logits bounded against the float64 torch backend,
    greedy decoding through the bound step (its experts bound per routed row count) equal to the full forward's
    argmax, and a training step's gradients finite with every expert's present."""
    cfg = dict(GPT_CFGS["llama-style"], n_experts=8, n_experts_per_tok=2, d_ff=96)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).to(DEV).eval()
    torch32, ref = (GPT(GPTConfig(**cfg, backend="torch")).to(DEV, dt).eval() for dt in (torch.float32, torch.float64))
    torch32.load_state_dict(model.state_dict())
    ref.load_state_dict(model.state_dict())
    x = ids(2, 40, 512)
    with torch.no_grad():
        out = bounded("moe logits", model(x).logits, torch32(x).logits, ref(x).logits, torch.float32)
        gen = model.generate(x[:, :20], 12, temperature=0)
        assert torch.equal(model(gen[:, :-1]).logits.argmax(-1)[:, 19:], gen[:, 20:]), "MoE: decoding != forward"
    model.train()
    model(x, labels=x).loss.backward()
    grads = [e.w_in.weight.grad for b in model.blocks for e in b.mlp.experts]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "MoE: an expert's gradient is missing"
    return out


@check
def bert_vs_torch_backend():
    out = {}
    x = ids(4, 64, 512)
    mask = torch.ones_like(x)
    mask[2:, 40:] = 0

    def make(backend, dt):
        torch.manual_seed(0)
        cfg = BERTConfig(vocab_size=512, d_model=128, n_layer=2, n_head=4, max_seq_len=128, backend=backend)
        return BERT(cfg).to(DEV, dt).eval()
    with torch.no_grad():
        ref = make("torch", torch.float64)(x, mask).logits
        for dt in (torch.float32, torch.bfloat16):
            keep = mask.bool()
            out |= bounded(f"bert {str(dt)[6:]}", make("fastattn", dt)(x, mask).logits[keep],
                           make("torch", dt)(x, mask).logits[keep], ref[keep], dt)
    return out


@check
def gpt_training_bf16_vs_torch():
    """Eight AdamW steps under bf16 autocast: fastattn's losses stay as close to the fp32 run's as torch's do."""
    x = ids(4, 129, 512, seed=3)
    losses = {}
    for tag, backend, amp in (("fp32", "torch", None), ("torch-bf16", "torch", torch.bfloat16),
                              ("fastattn-bf16", "fastattn", torch.bfloat16)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**GPT_CFGS["llama-style"], backend=backend, dropout=0.0)).to(DEV).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[tag] = []
        for _ in range(8):
            with torch.autocast(DEV, dtype=amp or torch.float32, enabled=amp is not None):
                loss = model(x[:, :-1], labels=x[:, :-1]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[tag].append(loss.item())
    d_torch = max(abs(a - b) for a, b in zip(losses["torch-bf16"], losses["fp32"]))
    d_ours = max(abs(a - b) for a, b in zip(losses["fastattn-bf16"], losses["fp32"]))
    assert d_ours <= 2 * d_torch + 1e-3, f"bf16 training drifts {d_ours:.3g} from fp32 (torch bf16: {d_torch:.3g})"
    assert losses["fastattn-bf16"][-1] < losses["fastattn-bf16"][0] - 0.5, "loss does not fall"
    return {"losses": losses, "max |bf16 - fp32|": {"fastattn": d_ours, "torch": d_torch}}


@check
def hf_llama_fastattn_vs_sdpa():
    """A tiny Llama on the GPU: attn_implementation="fastattn" (and fastattn.convert on top) against "sdpa", both
    against a float64 "sdpa" run (float64 "eager" turns a left-padded row into NaN: its padded queries see no key);
    left padding; greedy generate equal to sdpa's."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    x = ids(3, 50, 512)
    mask = torch.ones_like(x)
    mask[1, :13] = 0
    out = {}
    with torch.no_grad():
        ref = copy.deepcopy(base).to(DEV, torch.float64)
        ref.set_attn_implementation("sdpa")
        r = ref(input_ids=x, attention_mask=mask).logits
        keep = mask.bool()
        for dt in (torch.float32, torch.bfloat16):
            m = copy.deepcopy(base).to(DEV, dt)
            m.set_attn_implementation("sdpa")
            theirs = m(input_ids=x, attention_mask=mask).logits
            gen_sdpa = m.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False)
            m.set_attn_implementation("fastattn")
            ours = m(input_ids=x, attention_mask=mask).logits
            gen_ours = m.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False)
            out |= bounded(f"llama {str(dt)[6:]}", ours[keep], theirs[keep], r[keep], dt)
            fastattn.convert(m)
            conv = m(input_ids=x, attention_mask=mask).logits
            out |= bounded(f"llama+convert {str(dt)[6:]}", conv[keep], theirs[keep], r[keep], dt)
            if dt == torch.float32:
                assert torch.equal(gen_ours, gen_sdpa), "fp32 greedy generate differs from sdpa's"
    return out


@check
def gpt_from_hf_gpt2():
    import transformers
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=512))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT.from_hf(d, device=DEV)
        hf64 = transformers.GPT2LMHeadModel.from_pretrained(d, dtype=torch.float64).to(DEV).eval()
        hf32 = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").to(DEV).eval()
    x = ids(2, 60, 512)
    with torch.no_grad():
        res = bounded("gpt2 fp32", ours(x).logits, hf32(x).logits, hf64(x).logits, torch.float32)
        a = ours.generate(x, 16, temperature=0)
        b = hf32.generate(x, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b), "greedy tokens differ from transformers' generate"
    return res


# families from_hf gained in session 21, on the device: (transformers class prefix, config, our class)
FAMILIES = {
    "olmo2": ("Olmo2", dict(num_key_value_heads=2), "GPT"),  # q / k norms over all heads, output-only norms
    "cohere2": ("Cohere2", dict(num_hidden_layers=4, sliding_window=8), "GPT"),  # windows + layers without positions
    "phi3-longrope": ("Phi3", dict(original_max_position_embeddings=48, rope_parameters=dict(
        rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=48, short_factor=[1.0] * 16,
        long_factor=[4.0] * 16)), "GPT"),  # generation crossing the original context re-runs the sequence
    "modernbert": ("ModernBert", dict(num_hidden_layers=3, local_attention=16), "BERT"),  # bidirectional windows
    "deberta-v3": ("DebertaV2", dict(relative_attention=True, position_buckets=16, max_relative_positions=64,
                                     pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                                     position_biased_input=False, type_vocab_size=0), "BERT"),  # float bias
}


@check
def families_from_hf():
    """Each family above, small and random, on the device: logits of a 60-token batch (right padding in the second
    row) bounded by transformers' fp32 error against its float64 run, and for the decoders 16 greedy tokens after 40
    equal to transformers' generate."""
    import transformers
    out = {}
    for name, (prefix, kw, ours_cls) in FAMILIES.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, f"{prefix}Config")(**{**dict(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0, initializer_range=0.1),
            **kw})
        head = "ForCausalLM" if ours_cls == "GPT" else "ForMaskedLM"
        hf_cls = getattr(transformers, prefix + head)
        with tempfile.TemporaryDirectory() as d:
            hf_cls(cfg).save_pretrained(d)
            ours = (GPT if ours_cls == "GPT" else BERT).from_hf(d, device=DEV)
            hf32 = hf_cls.from_pretrained(d, attn_implementation="sdpa" if prefix != "DebertaV2" else None).to(DEV)
            hf64 = hf_cls.from_pretrained(d, dtype=torch.float64).to(DEV)
        x, mask = ids(2, 60, 512), torch.ones(2, 60, dtype=torch.long, device=DEV)
        if ours_cls == "BERT":
            mask[1, 44:] = 0
        keep = mask.bool()
        with torch.no_grad():
            out |= bounded(name, ours(x, attention_mask=mask).logits[keep], hf32(x, attention_mask=mask).logits[keep],
                           hf64.eval()(x, attention_mask=mask).logits[keep], torch.float32)
            if ours_cls == "GPT":
                a = ours.generate(x[:, :40], 16, temperature=0)
                b = hf32.eval().generate(x[:, :40], max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                         pad_token_id=0)
                assert torch.equal(a, b), f"{name}: greedy tokens differ from transformers' generate"
    return out


def _cli(*args, timeout=240):
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "fastattn", *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"fastattn {' '.join(args)}: rc {p.returncode}\n{p.stderr[-2000:]}"
    return p.stdout, time.time() - t


@check
def cli_train_eval_generate():
    """The CLI on the GPU: bf16 and fp16 (GradScaler) training of a small GPT, a resumed run, eval and generate."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        common = ["--device", DEV, "--d-model", "128", "--n-layer", "2", "--n-head", "4", "--seq-len", "128",
                  "--eval-every", "40", "--warmup", "10", "--log-every", "20"]
        for prec in ("bf16", "fp16") if GPU else ("bf16",):
            run = os.path.join(d, prec)
            _, s = _cli("train", "--out", run, "--steps", "80", "--precision", prec, *common)
            m = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
            evals = [r["val_loss"] for r in m if "val_loss" in r]
            assert len(evals) >= 2 and evals[-1] < evals[0], f"{prec}: validation loss not falling: {evals}"
            out[f"train {prec}"] = {"s": round(s, 1), "val_loss": evals}
        run = os.path.join(d, "bf16")
        _cli("train", "--out", run, "--steps", "100", "--precision", "bf16", "--resume", *common)
        ev, _ = _cli("eval", os.path.join(run, "model"), "--device", DEV, "--batches", "4")
        out["eval"] = json.loads(ev)
        gen, _ = _cli("generate", os.path.join(run, "model"), "--device", DEV, "--prompt", "It is a truth",
                      "--max-new-tokens", "30", "--temperature", "0")
        assert len(gen.strip()) > len("It is a truth"), f"no continuation: {gen!r}"
        out["generate"] = gen.strip()[-200:]
    return out


@check
def gpt_decode_step_compiled():
    """decode_one under torch.compile(fullgraph=True) (GPU: inductor with CUDA graphs, "reduce-overhead", as
    gpt-fast runs it; CPU: the "eager" backend, a dry run) gives the eager step's logits, compiled once."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    out = {}
    eager, compiled = gpt("llama-style"), gpt("llama-style")
    x = ids(2, 20, 512)
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[0, :6] = False
    counter = torch._dynamo.testing.CompileCounter()
    with torch.no_grad():
        for m in (eager, compiled):
            m.setup_caches(2, 40)
        tok = eager.prefill(x, keep).argmax(-1, keepdim=True)
        compiled.prefill(x, keep)
        t0 = time.time()
        if GPU:
            step = torch.compile(compiled.decode_one, fullgraph=True, mode="reduce-overhead")
        else:
            step = torch.compile(compiled.decode_one, backend=counter, fullgraph=True)
        worst = 0.0
        for t in range(20, 36):
            a = eager.decode_one(tok, eager.cache_index[t:t + 1])
            b = step(tok, compiled.cache_index[t:t + 1]).clone()
            worst = max(worst, err(b, a))
            tok = a.argmax(-1, keepdim=True)
        out["compile + 16 steps s"] = round(time.time() - t0, 1)
    torch._dynamo.reset()
    assert worst <= 1e-4, f"compiled decode step differs from eager by {worst:.3g}"
    if not GPU:
        assert counter.frame_count == 1, f"{counter.frame_count} compilations"
    out["max diff"] = worst
    return out


@check
def gpt_decode_step_cuda_graph():
    """decode_one and the bound step captured in a CUDA graph and replayed give the eager step's logits (last: a
    failed capture can leave the CUDA context unusable for what would run after it)."""
    if not GPU:
        return {"skipped": "no GPU"}
    out = {}
    for name in GPT_CFGS:
        for bound in (False, True):
            eager, graphed = gpt(name), gpt(name)
            x = ids(2, 20, 512)
            keep = torch.ones_like(x, dtype=torch.bool)
            logits = {}
            with torch.no_grad():
                for tag, m in (("eager", eager), ("graph", graphed)):
                    m.setup_caches(2, 64)
                    first = m.prefill(x, keep).argmax(-1, keepdim=True)
                    step = m.bound_decode_one() if bound else m.decode_one
                    tok, pos = first.clone(), torch.tensor([20], device=DEV)
                    seq = []
                    if tag == "eager":
                        for _ in range(12):
                            lg = step(tok, pos)
                            seq.append(lg.clone())
                            tok.copy_(lg.argmax(-1, keepdim=True))
                            pos += 1
                    else:
                        s = torch.cuda.Stream()
                        s.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(s):  # the first step eagerly (warm-up: compiles, autotunes)
                            lg = step(tok, pos)
                        torch.cuda.current_stream().wait_stream(s)
                        seq.append(lg.clone())
                        tok.copy_(lg.argmax(-1, keepdim=True))
                        pos += 1
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            static = step(tok, pos)
                        for _ in range(11):
                            g.replay()
                            seq.append(static.clone())
                            tok.copy_(static.argmax(-1, keepdim=True))
                            pos += 1
                    logits[tag] = torch.stack(seq)
            d = err(logits["graph"], logits["eager"])
            assert d <= 1e-4, f"{name} bound={bound}: graphed decode differs from eager by {d:.3g}"
            out[f"{name} {'bound' if bound else 'decode_one'}"] = {"max diff": d}
    return out


@check
def gpt_generate_cuda_graph():
    """generate(cuda_graph=True) gives eager generate's tokens: greedy on a left-padded batch, and sampling from the
    same seed; ALiBi's step (a host sync) falls back to eager with a warning and the same tokens; a Seq2Seq's
    greedy decoding (the cross-attention's K/V fixed in the graph)."""
    if not GPU:
        return {"skipped": "no GPU"}
    out = {}
    cases = [(name, {}) for name in GPT_CFGS] + [("gpt2-style", {"pos": "alibi"})]
    for name, kw in cases:
        model = gpt(name, **kw)
        batch = ids(3, 30, 512)
        mask = torch.ones_like(batch)
        mask[1, :11] = 0
        with torch.no_grad():
            runs = {g: model.generate(batch, 40, temperature=0, attention_mask=mask, cuda_graph=g) for g in (0, 1)}
            assert torch.equal(runs[0], runs[1]), f"{name} {kw}: greedy tokens differ with cuda_graph"
            sampled = [model.generate(batch, 40, temperature=0.8, top_k=50, attention_mask=mask, cuda_graph=g,
                                      generator=torch.Generator(DEV).manual_seed(7)) for g in (False, True)]
            assert torch.equal(*sampled), f"{name} {kw}: sampled tokens differ with cuda_graph"
        out[f"{name}{' alibi' if kw else ''}"] = "tokens equal"
    torch.manual_seed(0)
    s2s = Seq2Seq(Seq2SeqConfig(vocab_size=512, d_model=128, n_layer=2, n_head=4, max_seq_len=128)).to(DEV).eval()
    src = ids(2, 30, 512)
    with torch.no_grad():
        runs = [s2s.generate(src, 20, temperature=0, cuda_graph=g) for g in (False, True)]
    assert torch.equal(*runs), "Seq2Seq: greedy tokens differ with cuda_graph"
    out["seq2seq"] = "tokens equal"
    return out


def main(path):
    print(f"gpu_models_check on {torch.cuda.get_device_name() if GPU else 'cpu'}, torch {torch.__version__}",
          flush=True)
    failed = 0
    chosen = [c for c in os.environ.get("GPU_CHECKS", "").split(",") if c]
    unknown = sorted(set(chosen) - {fn.__name__ for fn in CHECKS})
    if unknown:
        print(f"GPU_CHECKS: no check named {', '.join(unknown)}", flush=True)
        return 2
    todo = [next(fn for fn in CHECKS if fn.__name__ == c) for c in chosen] if chosen else CHECKS
    for fn in todo:
        t = time.time()
        try:
            RESULTS[fn.__name__] = {"ok": True, "result": fn()}
            print(f"PASS {fn.__name__} ({time.time() - t:.1f}s): {json.dumps(RESULTS[fn.__name__]['result'])[:400]}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 (each check reports; the rest still run)
            failed += 1
            RESULTS[fn.__name__] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()[-3000:]}
            print(f"FAIL {fn.__name__} ({time.time() - t:.1f}s): {type(e).__name__}: {e}\n"
                  f"{traceback.format_exc()[-1500:]}", flush=True)
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
    print(f"{len(todo) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu_models_check.json"))
