"""The README's Python examples run as written. Each ```python block is split into its statements, executed in order
in one namespace; the names a block reads without binding them (q, model, ids, "./gpt2" ...) come from small
fixtures below. The blocks list alternatives as often as steps, so a name a statement reads and no earlier statement
of its block assigned is made fresh for it (``fastattn.quantize(model)`` does not leave ``prepare_qat(model)`` an
int8 model). Statements that name CUDA are skipped on a machine without a GPU. A renamed argument, a changed return
value or a dropped feature fails here with the README's line in the traceback."""
import ast
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

import fastattn

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
HAS_GPU = torch.cuda.is_available()
VOCAB = 97


def _blocks():
    """(first line, source) of every ```python block."""
    out, start, lines = [], None, README.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = i
        elif start is not None and line.strip() == "```":
            out.append((start + 1, "\n".join(lines[start:i - 1]) + "\n"))
            start = None
    return out


BLOCKS = _blocks()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


def _ids(B, L, seed=0):
    return torch.randint(3, VOCAB, (B, L), generator=_gen(seed))


def _tensor_fixtures():
    """Tensors and modules of the kernel-level blocks: small shapes, one namespace for all of them (each name is made
    when a block first reads it)."""
    B, H, L, E = 2, 4, 16, 8
    d = 32

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(d, 48), torch.nn.GELU(), torch.nn.Linear(48, d))

    return {
        # add + norm
        "x": lambda: _randn(6, d), "residual": lambda: _randn(6, d, seed=1), "r": lambda: _randn(6, d, seed=1),
        "weight": lambda: torch.ones(d), "w": lambda: torch.ones(d), "bias": lambda: torch.zeros(d),
        "b": lambda: torch.zeros(d),
        # attention
        "B": lambda: B, "H": lambda: H, "L": lambda: L, "E": lambda: E,
        "q": lambda: _randn(B, H, L, E), "k": lambda: _randn(B, H, L, E, seed=1),
        "v": lambda: _randn(B, H, L, E, seed=2),
        "pad": lambda: torch.arange(L)[None, :] >= torch.tensor([[L], [L - 5]]),
        "slopes": lambda: torch.tensor([2.0 ** -(i + 1) for i in range(H)]),
        "proj": lambda: _randn(B, L, 3 * H * E),
        # decode
        "k_cache": lambda: _randn(B, 2, L, E, seed=1), "v_cache": lambda: _randn(B, 2, L, E, seed=2),
        "lens": lambda: torch.tensor([L, 9], dtype=torch.int32),
        # int8
        "linear": lambda: torch.nn.Linear(d, d),
        "model": mlp, "float_model": mlp,
        "batches": lambda: [_randn(4, d, seed=s) for s in range(3)],
        "train": lambda: _qat_train,
        # cross-entropy
        "hidden": lambda: _randn(3, 5, d), "lm_head": lambda: torch.nn.Linear(d, VOCAB),
        "target": lambda: torch.randint(0, VOCAB, (3, 5), generator=_gen()),
        # drop-ins
        "torch_mha": lambda: torch.nn.MultiheadAttention(512, 8, dropout=0.1, batch_first=True),
    }


def _varlen_fixtures():
    """Block 4's names: three sequences (lengths 3, 5, 2) packed into 10 rows, 4 heads."""
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    return {"q": lambda: _randn(10, 4, 8), "k": lambda: _randn(10, 4, 8, seed=1), "v": lambda: _randn(10, 4, 8, seed=2),
            "cu_seqlens_q": lambda: cu, "cu_seqlens_k": lambda: cu, "max_seqlen_q": lambda: 5,
            "max_seqlen_k": lambda: 5, "cu_seq_q": lambda: cu, "cu_seq_k": lambda: cu, "max_q": lambda: 5,
            "max_k": lambda: 5}


def _qat_train(model):
    """The README's `train(...)`: a few optimizer steps of a QAT-prepared model."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for s in range(3):
        x = _randn(4, 32, seed=s)
        loss = F.mse_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _hf_folders(root: pathlib.Path):
    """Tiny randomly initialised checkpoints under the names the README loads: ./gpt2, ./llama, ./bart-large-cnn,
    ./roberta-base."""
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(  # GPT-2's vocabulary: the block's eos_token_id is 50256
        n_embd=32, n_layer=2, n_head=4, n_positions=320, **{**small, "vocab_size": 50257}),
    ).save_pretrained(root / "gpt2")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=320, **small)).save_pretrained(root / "llama")
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=200, decoder_start_token_id=2,
        forced_eos_token_id=None, **small))
    with torch.no_grad():  # transformers 5 unties these from `shared` when tie_word_embeddings=False: one table
        for side in (bart.model.encoder, bart.model.decoder):
            side.embed_tokens.weight.copy_(bart.model.shared.weight)
    bart.save_pretrained(root / "bart-large-cnn")
    transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
        type_vocab_size=1, vocab_size=VOCAB, pad_token_id=1)).save_pretrained(root / "roberta-base")
    return transformers


def _model_fixtures(root: pathlib.Path):
    """The models block's inputs: a left-padded batch of two prompts, packed sequences, a small draft GPT."""
    from fastattn.models import GPT, GPTConfig
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    packed = _ids(1, 12, seed=3)
    return {
        "ids": lambda: _ids(2, 12), "mask": lambda: mask,
        "small_gpt": lambda: GPT.from_hf(str(root / "gpt2")).eval(),
        "input_ids": lambda: _ids(2, 10, seed=1), "targets": lambda: _ids(2, 10, seed=2),
        "packed_ids": lambda: packed, "labels": lambda: packed,
        "pos": lambda: torch.tensor([list(range(5)) + list(range(7))]),
        "src_ids": lambda: _ids(2, 9, seed=4), "src_mask": lambda: torch.ones(2, 9, dtype=torch.long),
        "GPTConfig": lambda: GPTConfig,
    }


def _check_cross_entropy(ns):
    """The comment under linear_cross_entropy: it equals F.cross_entropy over F.linear's logits."""
    logits = F.linear(ns["hidden"], ns["lm_head"].weight, ns["lm_head"].bias).float()
    ref = F.cross_entropy(logits.flatten(0, -2), ns["target"].flatten(), ignore_index=-100)
    torch.testing.assert_close(ns["loss"], ref)


def _check_int8_gpt(ns):
    """The GPT quantized w8a16 and saved by the models block comes back int8, and generates as it did."""
    from fastattn.models import GPT
    from fastattn.nn import Int8Linear
    back = GPT.from_pretrained("gpt2-int8")
    assert any(isinstance(m, Int8Linear) for m in back.modules()), "gpt2-int8 came back without int8 layers"
    assert pathlib.Path("gpt2-int8", "quantization.json").is_file()
    ids = ns["ids"][:1]
    torch.testing.assert_close(back.generate(ids, 8, temperature=0), ns["gpt"].generate(ids, 8, temperature=0))


# (text the block holds, a check of its results beyond running); the README's other claims have tests of their own
CHECKS = [("linear_cross_entropy(hidden", _check_cross_entropy), ('save_pretrained("gpt2-int8")', _check_int8_gpt)]


def _names(node, ctx):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}


def _run_block(first_line, source, fixtures, namespace):
    assigned = set()
    for stmt in ast.parse(source).body:
        if re.search(r"\bcuda", ast.get_source_segment(source, stmt)) and not HAS_GPU:
            continue
        for name in sorted(_names(stmt, ast.Load) - assigned):
            if name in fixtures:
                namespace[name] = fixtures[name]()
        module = ast.Module([stmt], type_ignores=[])
        ast.increment_lineno(module, first_line - 1)  # tracebacks point at the README's own lines
        exec(compile(module, str(README), "exec"), namespace)
        assigned |= _names(stmt, ast.Store)


def _namespace():
    return {"torch": torch, "F": F, "fastattn": fastattn, "__name__": "readme"}


@pytest.mark.parametrize("first_line, source", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_python_example_runs(first_line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples' relative paths (./gpt2, save_pretrained("gpt2-int8"))
    fixtures = _varlen_fixtures() if "attention_varlen" in source else _tensor_fixtures()
    namespace = _namespace()
    if "from_hf" in source or "AutoModel" in source:
        transformers = _hf_folders(tmp_path)
        fixtures.update(_model_fixtures(tmp_path), path=lambda: str(tmp_path / "llama"),
                        AutoModelForCausalLM=lambda: transformers.AutoModelForCausalLM)
    _run_block(first_line, source, fixtures, namespace)
    for marker, check in CHECKS:
        if marker in source:
            check(namespace)


def test_every_python_block_is_checked():
    """The parser sees the README's blocks (a changed fence would otherwise make the test above vacuous)."""
    fences = README.read_text().count("```python")
    assert len(BLOCKS) == fences >= 9
    for _, source in BLOCKS:
        ast.parse(source)  # each block is valid Python on its own

