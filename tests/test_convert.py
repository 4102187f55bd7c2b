"""fastattn.convert: swaps torch's attention / norm / Transformer modules (and Linear -> Int8Linear) in place,
carrying the original Parameter objects; outputs and gradients bounded by torch's own fp32 error against the same
model in float64; state_dict keys, device, dtype and training mode kept; idempotent; skip by name and class;
logging."""
import copy
import logging

import pytest
import torch
from torch import nn

import fastattn
from fastattn import nn as fnn
from conftest import assert_bounded

D, H = 16, 2


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, D)
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.out = nn.Linear(D, 4)

    def forward(self, x):
        h = self.norm(self.inp(x))
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


class Mixed(nn.Module):
    """Every kind convert swaps, next to modules it leaves alone."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, D)
        self.ln = nn.LayerNorm(D)
        self.rms = nn.RMSNorm(D, eps=1e-6)
        self.mha = nn.MultiheadAttention(D, H, batch_first=True, kdim=12, vdim=10)
        self.enc_layer = nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True, norm_first=True)
        self.dec_layer = nn.TransformerDecoderLayer(D, H, 24, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True), 2,
                                             norm=nn.LayerNorm(D), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, H, 24, dropout=0.0, batch_first=True), 2)
        self.transformer = nn.Transformer(D, H, 1, 1, 24, dropout=0.0, batch_first=True)
        self.act = nn.GELU()
        self.head = nn.Linear(D, 4)

    def forward(self, x, k, v):
        h = self.rms(self.ln(self.inp(x)))
        h = h + self.mha(h, k, v, need_weights=False)[0]
        h = self.enc_layer(h)
        h = self.dec_layer(h, h)
        m = self.encoder(h)
        h = self.decoder(h, m)
        h = self.transformer(h, m)
        return self.head(self.act(h))


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, 8, generator=g, dtype=dtype), torch.randn(2, 7, 12, generator=g, dtype=dtype),
            torch.randn(2, 7, 10, generator=g, dtype=dtype))


def build(cls):
    torch.manual_seed(0)
    return cls()


def check_outputs_and_grads(name, model, torch_model, ref_model, args):
    """Outputs (and, in training mode, every parameter's gradient) bounded by torch's fp32 error vs float64."""
    outs = []
    for m, a in ((model, args), (torch_model, args), (ref_model, tuple(t.double() for t in args))):
        m.zero_grad()
        y = m(*a)
        if m.training:
            y.square().sum().backward()
        outs.append(y)
    assert_bounded(name, outs[0], outs[2], outs[1], torch.float32)
    if model.training:
        grads = [dict(m.named_parameters()) for m in (model, torch_model, ref_model)]
        for key, p in grads[0].items():
            assert_bounded(f"{name} d{key}", p.grad, grads[2][key].grad, grads[1][key].grad, torch.float32)


def test_small_model_round_trip():
    model = build(Small).eval()
    torch_model, ref_model = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    assert fastattn.convert(model) is model
    assert type(model.norm) is fnn.LayerNorm and type(model.attn) is fnn.MultiheadAttention
    assert type(model.inp) is nn.Linear  # int8 is off by default
    assert list(model.state_dict()) == keys
    assert all(p is params[k] for k, p in model.named_parameters())  # the same Parameter objects, moved
    check_outputs_and_grads("small", model, torch_model, ref_model, inputs()[:1])
    # idempotent: nothing left to swap, the same modules
    mods = dict(model.named_modules())
    fastattn.convert(model)
    assert all(m is mods[k] for k, m in model.named_modules())


@pytest.mark.parametrize("training", [False, True])
def test_mixed_model(training):
    model = build(Mixed).train(training)
    model.enc_layer.norm2.eval()  # a submodule's own mode survives the swap of its parent
    torch_model, ref_model = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    fastattn.convert(model)
    assert list(model.state_dict()) == keys
    expected = {"ln": fnn.LayerNorm, "rms": fnn.RMSNorm, "mha": fnn.MultiheadAttention,
                "enc_layer": fnn.TransformerEncoderLayer, "dec_layer": fnn.TransformerDecoderLayer,
                "encoder": fnn.TransformerEncoder, "encoder.layers.1": fnn.TransformerEncoderLayer,
                "encoder.norm": fnn.LayerNorm, "decoder": fnn.TransformerDecoder,
                "transformer": fnn.Transformer, "transformer.encoder": fnn.TransformerEncoder,
                "transformer.decoder.layers.0": fnn.TransformerDecoderLayer,
                "transformer.decoder.layers.0.multihead_attn": fnn.MultiheadAttention,
                "act": nn.GELU, "head": nn.Linear}
    for name, cls in expected.items():
        assert type(model.get_submodule(name)) is cls, name
    for name, m in model.named_modules():
        want = torch_model.get_submodule(name).training if name != "enc_layer.norm2" else False
        assert m.training == want, name
    check_outputs_and_grads(f"mixed training={training}", model, torch_model, ref_model, inputs())


def test_whole_transformer_and_root(caplog):
    """An nn.Transformer is swapped as one module (one log line, no per-layer swaps); a model that is itself a
    swappable class comes back as a new module."""
    torch.manual_seed(0)
    tr = nn.Transformer(D, H, 2, 1, 24, dropout=0.0, batch_first=True).eval()
    keys = list(tr.state_dict())
    with caplog.at_level(logging.INFO, logger="fastattn"):
        new = fastattn.convert(tr)
    assert type(new) is fnn.Transformer and list(new.state_dict()) == keys
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fastattn.convert: 1 x nn.Transformer -> fastattn.nn.Transformer"]
    src, tgt = torch.randn(2, 6, D), torch.randn(2, 4, D)
    ref = copy.deepcopy(tr).double()(src.double(), tgt.double())
    assert_bounded("transformer", new(src, tgt), ref, tr(src, tgt), torch.float32)


def test_dtype_and_shared_modules():
    """A float64 model stays float64; a module shared by two parents is replaced by one shared module."""
    norm = nn.LayerNorm(D, dtype=torch.float64)
    model = nn.Sequential(norm, nn.Linear(D, D, dtype=torch.float64), norm)
    x = torch.randn(3, D, dtype=torch.float64)
    want = model(x)
    fastattn.convert(model)
    assert type(model[0]) is fnn.LayerNorm and model[0] is model[2]
    assert model[0].weight.dtype == torch.float64
    assert_bounded("float64", model(x), want, want, torch.float64)


def test_skip_keeps_a_shared_module_at_every_place(caplog):
    """A module registered at two places is one module: skipping it by one name keeps it at the other too (it was
    swapped there, leaving two modules sharing their parameters), and a container holding it is swapped around it."""
    norm, lin = nn.LayerNorm(D), nn.Linear(D, D)
    block = nn.Sequential(nn.LayerNorm(D), norm)
    model = nn.Sequential(norm, lin, block, lin)
    with caplog.at_level(logging.INFO, logger="fastattn"):
        fastattn.convert(model, skip=["0", "1"], int8=True)
    assert type(model[0]) is nn.LayerNorm and model[2][1] is model[0]
    assert type(model[2][0]) is fnn.LayerNorm
    assert type(model[1]) is nn.Linear and model[3] is model[1]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped 2.1 (LayerNorm): in skip (the same module is 0, which is in skip or inside it)" in text, text
    assert "skipped 3 (Linear): in skip (the same module is 1" in text, text
    layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer.norm1, layer)
    with caplog.at_level(logging.INFO, logger="fastattn"):
        fastattn.convert(model, skip=["0"])
    assert type(model[1]) is nn.TransformerEncoderLayer and model[1].norm1 is model[0]
    assert type(model[0]) is nn.LayerNorm and type(model[1].norm2) is fnn.LayerNorm
    assert "1 (TransformerEncoderLayer) swapped part by part: a module inside it is also registered at 0" in \
        "\n".join(r.getMessage() for r in caplog.records)


def test_skip_by_name_and_class(caplog):
    model = build(Mixed)
    with caplog.at_level(logging.INFO, logger="fastattn"):
        fastattn.convert(model, skip=["ln", "encoder.layers.1.self_attn", nn.RMSNorm, "nothing.here"])
    assert type(model.ln) is nn.LayerNorm and type(model.rms) is nn.RMSNorm
    # something inside the encoder is skipped: the encoder is swapped part by part around it
    assert type(model.encoder) is nn.TransformerEncoder
    assert type(model.encoder.layers[0]) is fnn.TransformerEncoderLayer
    assert type(model.encoder.layers[1]) is nn.TransformerEncoderLayer
    assert type(model.encoder.layers[1].self_attn) is nn.MultiheadAttention
    assert type(model.encoder.layers[1].norm1) is fnn.LayerNorm
    assert type(model.transformer) is fnn.Transformer
    text = "\n".join(r.getMessage() for r in caplog.records)
    for line in ("skipped ln (LayerNorm): in skip ('ln')",
                 "skipped rms (RMSNorm): in skip (RMSNorm)",
                 "skipped encoder.layers.1.self_attn (MultiheadAttention): in skip ('encoder.layers.1.self_attn')",
                 "encoder (TransformerEncoder) swapped part by part: encoder.layers.1.self_attn is in skip",
                 "skip entry 'nothing.here' matched no module",
                 "2 x nn.TransformerEncoderLayer -> fastattn.nn.TransformerEncoderLayer",
                 "1 x nn.Transformer -> fastattn.nn.Transformer"):
        assert line in text, line


def test_left_alone_with_reason(caplog):
    """Subclasses (their forward may differ), modules with hooks and modules whose forward was replaced on the
    instance stay as they are, and the log says why."""
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    hooked = nn.LayerNorm(D)
    hooked.register_forward_hook(lambda m, i, o: o + 1)
    patched = nn.LayerNorm(D)  # as accelerate's hooks do: forward replaced on the instance
    patched.forward = lambda x, _f=patched.forward: _f(x) + 1
    model = nn.Sequential(MyNorm(D), hooked, nn.LayerNorm(D), patched)
    with caplog.at_level(logging.INFO, logger="fastattn"):
        fastattn.convert(model, attention=False)
    assert [type(m) for m in model] == [MyNorm, nn.LayerNorm, fnn.LayerNorm, nn.LayerNorm]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "left 0 (MyNorm) as it is: a subclass of nn.LayerNorm" in text
    assert "skipped 1 (LayerNorm): it has forward / backward hooks" in text
    assert "skipped 3 (LayerNorm): its forward is replaced on the instance" in text
    assert "1 x nn.LayerNorm -> fastattn.nn.LayerNorm" in text


def test_flags():
    model = build(Mixed)
    fastattn.convert(model, attention=False)
    assert type(model.mha) is nn.MultiheadAttention and type(model.transformer) is nn.Transformer
    assert type(model.ln) is fnn.LayerNorm and type(model.transformer.encoder.layers[0].norm1) is fnn.LayerNorm
    model = build(Mixed)
    fastattn.convert(model, layernorm=False)
    assert type(model.ln) is nn.LayerNorm and type(model.mha) is fnn.MultiheadAttention


def test_dropout_swapped(caplog):
    """nn.Dropout -> fastattn.nn.Dropout (p, inplace and training mode kept; a subclass left alone); dropout=False
    keeps torch's. In training it drops as torch's does (rate, scale, zero gradients where dropped)."""
    class MyDropout(nn.Dropout):
        pass

    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.25, inplace=True), MyDropout(0.5), nn.Dropout(0.1))
    with caplog.at_level(logging.INFO, logger="fastattn"):
        fastattn.convert(model)
    assert [type(m) for m in model[1:]] == [fnn.Dropout, MyDropout, fnn.Dropout]
    assert (model[1].p, model[1].inplace, model[3].p) == (0.25, True, 0.1)
    assert "2 x nn.Dropout -> fastattn.nn.Dropout" in "\n".join(r.getMessage() for r in caplog.records)
    layer = fnn.Dropout(0.25)
    x = (torch.rand(200, 500) + 0.5).requires_grad_()
    y = layer(x)
    keep = y != 0
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[keep], x[keep] / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad, keep * (1 / torch.tensor(0.75)))
    assert layer.eval()(x) is x and repr(layer) == "Dropout(p=0.25, inplace=False)"
    kept = nn.Sequential(nn.Dropout(0.1))
    fastattn.convert(kept, dropout=False)
    assert type(kept[0]) is nn.Dropout


@pytest.mark.parametrize("mode", [True, "w8a16"])
def test_int8(mode):
    """nn.Linear -> Int8Linear.from_float (also inside fastattn's Transformer layers), exactly as built by hand;
    torch's own TransformerEncoderLayer keeps float linears (its fast path reads the weights)."""
    model = build(Mixed).eval()
    by_hand = copy.deepcopy(model)
    fastattn.convert(by_hand, skip=["enc_layer"])
    for name, m in list(by_hand.named_modules()):
        if type(m) is nn.Linear and not name.startswith("enc_layer"):
            parent, _, leaf = name.rpartition(".")
            setattr(by_hand.get_submodule(parent), leaf,
                    fnn.Int8Linear.from_float(m, "w8a8" if mode is True else mode))
    fastattn.convert(model, int8=mode, skip=["enc_layer"])
    assert type(model.head) is fnn.Int8Linear and type(model.encoder.layers[0].linear1) is fnn.Int8Linear
    assert type(model.enc_layer.linear1) is nn.Linear
    assert type(model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        assert torch.equal(model(*inputs()), by_hand(*inputs()))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        fastattn.convert("model")
    with pytest.raises(ValueError, match="int8"):
        fastattn.convert(nn.Linear(2, 2), int8="int4")
    with pytest.raises(ValueError, match="calibrated"):
        fastattn.convert(nn.Linear(2, 2), int8="w8a8_static")
    with pytest.raises(TypeError, match="skip"):
        fastattn.convert(nn.Linear(2, 2), skip=[3])
    with pytest.raises(TypeError, match="skip: expected .* got int 3"):  # (was: 'int' object is not iterable)
        fastattn.convert(nn.Linear(2, 2), skip=3)


def test_state_dict_hooks_and_parametrizations_kept(caplog):
    """A module with state_dict / load_state_dict hooks, or a parametrized part, stays as it is (a new module would
    not carry them): convert used to swap it, dropping the hooks, and ran the state_dict hook while doing so."""
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    fired = []
    model = build(Small)
    model.norm.register_state_dict_post_hook(lambda m, sd, prefix, local: fired.append("state_dict"))
    model.norm.register_load_state_dict_pre_hook(lambda *a: fired.append("load"))
    parametrize.register_parametrization(model.attn.out_proj, "weight", Double())
    x = inputs()[0]
    want = model(x)
    with caplog.at_level(logging.INFO, logger="fastattn"):
        fastattn.convert(model)
    assert fired == []
    assert type(model.norm) is nn.LayerNorm and type(model.attn) is nn.MultiheadAttention
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped norm (LayerNorm): it has state_dict / load_state_dict hooks" in text
    assert "skipped attn (MultiheadAttention): out_proj is parametrized" in text
    model.load_state_dict(model.state_dict())
    assert fired == ["state_dict", "load"]
    torch.testing.assert_close(model(x), want)


def test_layer_settings_set_after_construction_are_carried():
    """Each norm's eps, each dropout's p and the attentions' dropout, as every original layer has them (changed
    after construction, one layer of an encoder alone; a norm of another class is kept as it is): before, the twin
    took the constructor's, and outputs changed silently."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True), 3,
                                enable_nested_tensor=False).double().eval()
    enc.layers[1].norm2.eps = 0.5
    enc.layers[2].norm1 = nn.RMSNorm(D, eps=1e-3, dtype=torch.float64)
    enc.layers[0].dropout1.p, enc.layers[0].self_attn.dropout = 0.25, 0.125
    dec = nn.TransformerDecoderLayer(D, H, 24, dropout=0.0, batch_first=True).double().eval()
    dec.norm3.eps = 0.25
    x, mem = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 6, D, dtype=torch.float64)
    ref_enc, ref_dec = enc(x), dec(x, mem)
    new_enc, new_dec = fastattn.convert(enc), fastattn.convert(dec)
    assert type(new_enc) is fnn.TransformerEncoder and type(new_dec) is fnn.TransformerDecoderLayer
    assert (new_enc(x) - ref_enc).abs().max() <= 1e-12 and (new_dec(x, mem) - ref_dec).abs().max() <= 1e-12
    assert [layer.norm2.eps for layer in new_enc.layers] == [1e-5, 0.5, 1e-5] and new_dec.norm3.eps == 0.25
    assert new_enc.layers[2].norm1 is enc.layers[2].norm1
    assert (new_enc.layers[0].dropout1.p, new_enc.layers[0].self_attn.dropout) == (0.25, 0.125)


def test_layer_parts_of_other_classes_are_kept():
    """A Transformer layer's feed-forward linears that are not plain nn.Linear (prepare_qat's QATLinear, a subclass)
    stay in fastattn's layer, called as torch's layer calls them; an attention that is not exactly
    nn.MultiheadAttention (a subclass, or a module without its attributes) keeps the whole layer torch's, and the
    walk swaps what is inside it. Before, the layer was rebuilt with plain parts: the fake quantization or the
    subclass's forward dropped silently, and an attention without num_heads crashed convert. (torch's own inference
    fast path reads linear1 / linear2's weights past their forward: the reference runs torch's general path, which
    calls them, as fastattn's layers do.)"""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.5

    class MyMHA(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            out, w = super().forward(*args, **kwargs)
            return out * 2, w

    class Bare(nn.Module):  # an attention of the user's own, with torch's call signature and no num_heads
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D, D)

        def forward(self, q, k, v, **kwargs):
            return self.proj(q), None

    torch.manual_seed(0)
    qat = fastattn.prepare_qat(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False))
    sub = nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True)
    sub.linear2 = Scaled(24, D)
    custom_attn = nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True)
    custom_attn.self_attn = MyMHA(D, H, batch_first=True)
    bare = nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True)
    bare.self_attn = Bare()
    ours_attn = nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True)  # (a part-by-part convert's)
    ours_attn.self_attn = fastattn.convert(ours_attn.self_attn)
    x = torch.randn(2, 5, D)
    # (torch's own layer runs Bare in training only: its inference checks read self_attn.batch_first)
    for model, kept_layer, modes in ((qat, False, (True, False)), (sub, False, (True, False)),
                                     (custom_attn, True, (True, False)), (bare, True, (True,)),
                                     (ours_attn, False, (True, False))):
        ref = copy.deepcopy(model)
        new = fastattn.convert(model)
        layer, ref_layer = (new.layers[0], ref.layers[0]) if isinstance(new, nn.TransformerEncoder) else (new, ref)
        assert (type(layer) is nn.TransformerEncoderLayer) == kept_layer
        assert type(layer.linear2) is type(ref_layer.linear2)
        assert type(layer.self_attn) is (type(ref_layer.self_attn) if kept_layer else fnn.MultiheadAttention)
        for train in modes:
            ref.train(train), new.train(train)
            with torch.set_grad_enabled(train):
                torch.backends.mha.set_fastpath_enabled(kept_layer)  # (a kept layer is torch's on both sides)
                try:
                    want = ref(x)
                finally:
                    torch.backends.mha.set_fastpath_enabled(True)
                assert (new(x) - want).abs().max() <= 1e-5


def test_encoder_use_nested_tensor_carried():
    """TransformerEncoder.use_nested_tensor (what torch's forward reads) as the original has it: set False after
    construction, the padded positions keep their values, as in torch (before: convert rebuilt it True, and they
    became zeros)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 24, dropout=0.0, batch_first=True), 2).eval()
    enc.use_nested_tensor = False
    x = torch.randn(2, 4, D)
    pad = torch.tensor([[False, False, True, True], [False, False, False, True]])
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
        new = fastattn.convert(copy.deepcopy(enc))
        assert type(new) is fnn.TransformerEncoder and not new.use_nested_tensor
        assert (new(x, src_key_padding_mask=pad) - ref).abs().max() <= 1e-5
        assert ref[pad].abs().min() > 0


class MixedWithDropout(Mixed):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.25)

    def forward(self, x, k, v):
        return self.drop(super().forward(x, k, v))


@pytest.mark.parametrize("int8", [False, "w8a16"])
def test_fx_symbolic_trace_as_torchs(int8):
    """torch.fx keeps torch.nn's modules as leaves; after convert a model traces the same way: one call_module node
    per module (the norms: calls of fastattn's layer_norm / rms_norm), the traced model's outputs and gradients
    equal the model's. fx traced into the drop-ins' forwards and raised (their checks are control flow)."""
    torch_model = build(MixedWithDropout)
    model = fastattn.convert(copy.deepcopy(torch_model), int8=int8)

    def modules(g):
        return [n.target for n in g.graph.nodes if n.op == "call_module"]

    g = torch.fx.symbolic_trace(model)
    assert modules(g) == [m for m in modules(torch.fx.symbolic_trace(torch_model)) if m not in ("ln", "rms")]
    assert [n.target.__name__ for n in g.graph.nodes if n.op == "call_function"][:2] == ["layer_norm", "rms_norm"]
    args = inputs()
    for training in (False, True):
        model.train(training)
        g.train(training)
        torch.manual_seed(1)
        y = model(*args)
        torch.manual_seed(1)
        yg = g(*args)
        assert torch.equal(y, yg)
    params = [p for p in model.parameters() if p.requires_grad]
    ga = torch.autograd.grad(y.square().sum(), params)
    gb = torch.autograd.grad(yg.square().sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    with pytest.raises(torch.fx.proxy.TraceError, match="cannot be the root"):  # torch's raises TraceError too
        torch.fx.symbolic_trace(fnn.MultiheadAttention(D, H))


def test_fx_symbolic_trace_refuses_a_hooked_drop_in():
    """The record is made inside the call, after the module's hooks ran on the Proxies: they would be in the graph and
    run again in the recorded call (an output 101.8 off). A hooked drop-in (own or global hook) is refused."""
    model = nn.Sequential(nn.Linear(8, 8), fnn.Dropout(0.5)).eval()
    h = model[1].register_forward_hook(lambda mod, a, out: out + 100)
    with pytest.raises(torch.fx.proxy.TraceError, match=r"1 \(fastattn.nn.Dropout\) has hooks \(_forward_hooks\)"):
        torch.fx.symbolic_trace(model)
    h.remove()
    g = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, a: None)
    try:
        with pytest.raises(torch.fx.proxy.TraceError, match="_global_forward_pre_hooks"):
            torch.fx.symbolic_trace(model)
    finally:
        g.remove()
    x = torch.randn(3, 8)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))
