"""Mixture-of-experts GPTs (models/moe.py, gpt_hf_moe.py): the MoE layer against a per-token float64 reference
(outputs and gradients of the input, the router and every expert; with a shared expert too), GPT.from_hf on small
random Mixtral, Qwen3-MoE and Qwen2-MoE (a shared expert) checkpoints (logits within transformers' own fp32 error,
greedy and beam-search tokens equal to its generate; the per-expert files transformers writes and the fused tensors
of its modules' state dict), the load-balancing loss against transformers', both backends training
alike, the bound decode step (the MoE module inside it) decoding what the full forward predicts, speculative
decoding, int8 keeping the router in float, and bad configs named."""
import json

import pytest
import torch

import fastattn
from conftest import assert_bounded, backends_train_alike
from fastattn.models import GPT, GPTConfig, CheckpointError
from fastattn.models.moe import MoE

VOCAB = 53
EOS = [3, 5, 7, 11]


def _cfg(**kw):
    return GPTConfig(**{**dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=24,
                               max_seq_len=64, norm="rmsnorm", mlp="swiglu", pos="rotary", bias=False,
                               n_experts=4, n_experts_per_tok=2), **kw})


@pytest.mark.parametrize("norm_topk, shared", [(True, 0), (False, 0), (True, 16)])
def test_moe_layer_equals_per_token_reference(norm_topk, shared):
    torch.manual_seed(0)
    moe = MoE(_cfg(moe_norm_topk=norm_topk, moe_shared_d_ff=shared)).double()
    for p in moe.parameters():
        p.data.normal_(0, 0.5)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    out = moe(x)

    def reference(x):
        rows = []
        for t in x.reshape(-1, 32):
            probs = (moe.router.weight @ t).softmax(-1)
            w, ids = probs.topk(2)
            w = w / w.sum() if norm_topk else w
            y = sum(wi * moe.experts[int(e)](t[None])[0] for wi, e in zip(w, ids))
            if shared:
                y = y + torch.sigmoid(moe.shared_gate.weight @ t) * moe.shared(t[None])[0]
            rows.append(y)
        return torch.stack(rows).view(x.shape)

    x2 = x.detach().clone().requires_grad_()
    want = reference(x2)
    torch.testing.assert_close(out, want)
    with torch.no_grad():  # one token at a time (decoding's path: its k experts directly)
        for i in range(5):
            torch.testing.assert_close(moe(x[1:2, i:i + 1]), want[1:2, i:i + 1], rtol=0, atol=1e-15)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    want.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    for a, p in zip(grads, moe.parameters()):
        torch.testing.assert_close(a, p.grad)
    assert all(a.abs().sum() > 0 for a in grads)  # router and every expert learn (each chosen by some token)


def test_unused_experts_get_zero_gradients():
    """An expert no token chose still takes part in the graph, with zero gradients (DDP and FSDP reduce every
    parameter on every rank: tests/test_cli_distributed.py)."""
    torch.manual_seed(0)
    moe = MoE(_cfg())
    moe(torch.randn(1, 1, 32)).sum().backward()  # one token: 2 of the 4 experts
    grads = [e.w_in.weight.grad for e in moe.experts]
    assert all(g is not None for g in grads) and sum(bool(g.any()) for g in grads) == 2


transformers = pytest.importorskip("transformers")


GRANITE = dict(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0)


def _hf(kind, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, bos_token_id=0,
                eos_token_id=0, pad_token_id=0)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **base, num_local_experts=4, num_experts_per_tok=2, **kw)).eval()
    if kind == "granitemoe":  # Granite's four multipliers (gpt_hf._granite)
        return transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
            **base, num_local_experts=4, num_experts_per_tok=2, **GRANITE, **kw)).eval()
    if kind == "olmoe":  # q / k norms over all heads (not per head)
        return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            **base, num_experts=4, num_experts_per_tok=2, **kw)).eval()
    if kind == "qwen2_moe":  # a shared expert beside the routed ones, q / k / v biases
        return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            shared_expert_intermediate_size=40, **kw)).eval()
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, **kw)).eval()


def _prompts():
    ids = torch.randint(12, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("kind, kw", [("mixtral", {}), ("qwen3_moe", dict(norm_topk_prob=True)),
                                      ("qwen3_moe", dict(norm_topk_prob=False)), ("qwen2_moe", {}),
                                      ("granitemoe", {}), ("olmoe", {})])
def test_from_hf_matches_transformers(tmp_path, kind, kw):
    torch.manual_seed(0)
    hf = _hf(kind, **kw)
    hf.save_pretrained(tmp_path)  # one tensor per expert and projection, as the published checkpoints
    hf64 = type(hf).from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager").eval()
    ours = GPT.from_hf(tmp_path)
    cfg = ours.config
    assert (cfg.n_experts, cfg.n_experts_per_tok, cfg.d_ff, cfg.qk_norm, cfg.qk_norm_full, cfg.moe_shared_d_ff) == \
        (4, 2, 48 if kind in ("mixtral", "granitemoe", "olmoe") else 24, kind in ("qwen3_moe", "olmoe"),
         kind == "olmoe", 40 if kind == "qwen2_moe" else 0)
    assert cfg.moe_norm_topk is (kind in ("mixtral", "granitemoe") or kw.get("norm_topk_prob", False))
    ids, mask = _prompts()
    keep = mask.bool()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids, attention_mask=mask).logits for m in (ours, hf, hf64))
    assert_bounded(f"{kind} logits", a[keep], c[keep], b[keep], torch.float32)
    ours64 = GPT.from_hf(tmp_path, dtype=torch.float64)
    g = dict(max_new_tokens=10, do_sample=False, pad_token_id=3, eos_token_id=EOS)
    assert torch.equal(ours64.generate(ids, 10, temperature=0, attention_mask=mask, eos_token_id=EOS),
                       hf64.generate(input_ids=ids, attention_mask=mask, **g))
    assert torch.equal(ours64.generate(ids, 10, temperature=0, attention_mask=mask, eos_token_id=EOS, num_beams=3),
                       hf64.generate(input_ids=ids, attention_mask=mask, num_beams=3, **g))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "granitemoe", "olmoe"])
def test_load_balancing_loss_matches_transformers(tmp_path, kind):
    """With output_router_logits (transformers adds router_aux_loss_coef x its load-balancing loss to the loss), the
    import keeps the coefficient: in training, .aux_loss and .loss of a padded batch within transformers' own fp32
    error; in eval mode the loss is the task's alone."""
    torch.manual_seed(0)
    _hf(kind, output_router_logits=True, router_aux_loss_coef=0.3).save_pretrained(tmp_path)
    ours = GPT.from_hf(tmp_path).train()
    assert ours.config.router_aux_loss_coef == 0.3
    hf = [type(_hf(kind)).from_pretrained(tmp_path, dtype=dt, experts_implementation="eager").train()
          for dt in (torch.float32, torch.float64)]
    ids, mask = _prompts()
    labels = ids.masked_fill(mask == 0, -100)
    a = ours(ids, mask, labels=labels)
    b, c = (m(input_ids=ids, attention_mask=mask, labels=labels) for m in hf)
    assert_bounded(f"{kind} aux_loss", a.aux_loss, c.aux_loss, b.aux_loss, torch.float32)
    assert_bounded(f"{kind} loss", a.loss, c.loss, b.loss, torch.float32)
    a.loss.backward()
    assert ours.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        plain = ours.eval()(ids, mask, labels=labels)
    assert plain.aux_loss is None and plain.loss < a.loss


@pytest.mark.parametrize("kind", ["mixtral", "granitemoe"])
def test_fused_expert_tensors_are_read(tmp_path, kind):
    """A state dict of transformers 5's modules (experts.gate_up_proj (E, 2F, d), experts.down_proj (E, d, F)) gives
    the same model as the files save_pretrained writes (Mixtral's per-expert tensors, GraniteMoE's input_linear /
    output_linear / router.layer)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    hf = _hf(kind)
    hf.save_pretrained(tmp_path / "files")
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = hf.state_dict()
    assert any(k.endswith("layers.0.mlp.experts.gate_up_proj") or
               k.endswith("layers.0.block_sparse_moe.experts.gate_up_proj") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((tmp_path / "files" / "config.json").read_text())
    a, b = GPT.from_hf(tmp_path / "files").state_dict(), GPT.from_hf(fused).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_backends_train_alike_and_the_bound_decode_step():
    """Both backends train alike; the bound decode step (the MoE module inside it) decodes what the full forward
    predicts, and what the torch backend's modules decode."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    models = {}

    def make(backend):
        torch.manual_seed(0)
        models[backend] = GPT(_cfg(backend=backend))
        return models[backend]
    model = backends_train_alike(make, dict(input_ids=ids, labels=ids)).eval()
    model.setup_caches(2, 16)
    assert model.bound_decode_one() != model.decode_one
    with torch.no_grad():
        out = model.generate(ids[:, :5], 7, temperature=0)
        full = model(out[:, :-1]).logits.argmax(-1)
        assert torch.equal(full[:, 4:], out[:, 5:])
        assert torch.equal(models["torch"].eval().generate(ids[:, :5], 7, temperature=0), out)
        one = model.generate(ids[:1, :5], 7, temperature=0)  # one sequence: one token's experts a step
        assert torch.equal(one, out[:1])


def test_speculative_decoding_of_a_mixture_of_experts():
    """decode_many's W rows per sequence through the bound step's experts: prompt lookup and an exact-copy
    assistant give plain greedy's tokens (the copy accepting every draft)."""
    torch.manual_seed(0)
    m = GPT(_cfg()).double().eval()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    copy = GPT(_cfg()).double().eval()
    copy.load_state_dict(m.state_dict())
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    plain = m.generate(x, 16, temperature=0)
    assert torch.equal(m.generate(x, 16, temperature=0, prompt_lookup_num_tokens=3), plain)
    assert m.speculation_stats.accepted > 0
    assert torch.equal(m.generate(x, 16, temperature=0, assistant_model=copy), plain)
    assert m.speculation_stats.acceptance == 1.0


def test_int8_keeps_the_router_in_float():
    torch.manual_seed(0)
    model = fastattn.quantize(GPT(_cfg()).eval(), mode="w8a16")
    moe = model.blocks[0].mlp
    assert type(moe.router.weight) is torch.nn.Parameter and moe.router.weight.dtype == torch.float32
    assert type(moe.experts[0].w_in).__name__ == "Int8Linear"
    assert model.generate(torch.randint(0, VOCAB, (1, 4)), 3, temperature=0).shape == (1, 7)


def test_bad_configs_are_named(tmp_path):
    for kw, name in [(dict(n_experts=1), "n_experts"), (dict(n_experts_per_tok=5), "n_experts_per_tok"),
                     (dict(n_experts=-1), "n_experts"), (dict(n_experts=0, router_aux_loss_coef=0.1),
                                                         "router_aux_loss_coef")]:
        with pytest.raises(ValueError, match=name):
            _cfg(**kw)
    from fastattn.cli.config import CLIError
    from fastattn.cli.distributed import tensor_parallel
    with pytest.raises(CLIError, match="mixture-of-experts"):
        tensor_parallel(GPT(_cfg()), 2, torch.device("cpu"))
    _hf("qwen3_moe").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [1]}))
    with pytest.raises(CheckpointError, match="mlp_only_layers"):
        GPT.from_hf(tmp_path)
