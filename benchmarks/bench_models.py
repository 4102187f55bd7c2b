"""pytest-benchmark: fastattn.models.GPT against transformers' own model on the same weights, same run.

A GPT-2-small-sized (124M) model with random weights is saved once by transformers and loaded by both
(``GPT.from_hf``). Greedy generation of NEW tokens after a PROMPT-token prompt: transformers' ``generate``
(attn_implementation="sdpa") against ``GPT.generate`` in float and quantized (``fastattn.quantize``: w8a16, and w8a8
for comparison), on a GPU also with ``cuda_graph=True`` (the "-graph" rows); and the prompt's prefill alone. Each
fastattn row records ``speedup_vs_transformers``: the ratio of the medians to the transformers row of its group
measured earlier in the same run (rows run in that order).

Shapes are selectable for larger machines (environment): FASTATTN_BENCH_MODEL (gpt2-small, gpt2-medium, gpt2-large,
gpt2-xl), FASTATTN_BENCH_BATCH (1), FASTATTN_BENCH_PROMPT (128), FASTATTN_BENCH_NEW (128), FASTATTN_BENCH_ROUNDS
(3 on CPU), FASTATTN_BENCH_THREADS (torch's default; on a shared, loaded host 1 thread is steadier: a parallel
region waits for its slowest thread). CPU runs in float32; on a GPU, bfloat16. Skipped without transformers.
"""
import os

import pytest
import torch

import fastattn
import fastattn.hf
from conftest import GUARD, interleaved, interleaved_speculative, synced
from fastattn.testing import sync

transformers = pytest.importorskip("transformers")
fastattn.hf.register()  # before any model class loads (see fastattn.hf._installed_kernels_package)
from fastattn.models import GPT  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
SIZES = {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
         "gpt2-xl": (1600, 48, 25)}
SIZE = os.environ.get("FASTATTN_BENCH_MODEL", "gpt2-small")
BATCH = int(os.environ.get("FASTATTN_BENCH_BATCH", "1"))
PROMPT = int(os.environ.get("FASTATTN_BENCH_PROMPT", "128"))
NEW = int(os.environ.get("FASTATTN_BENCH_NEW", "128"))
ROUNDS = int(os.environ.get("FASTATTN_BENCH_ROUNDS", "10" if GPU else "3"))
if os.environ.get("FASTATTN_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTATTN_BENCH_THREADS"]))
IMPLS = ["transformers", "fastattn", "fastattn-w8a16", "fastattn-w8a8"]
GRAPHED = ["fastattn-graph", "fastattn-w8a16-graph"]  # generate(cuda_graph=True): GPU only
_medians = {}  # group -> transformers' median, for the ratios


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d, n_layer, n_head = SIZES[SIZE]
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=d, n_layer=n_layer, n_head=n_head, n_positions=max(1024, PROMPT + NEW))
    path = tmp_path_factory.mktemp("hf-gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="sdpa").to(DEVICE, DTYPE).eval()
    ours = {"fastattn": GPT.from_hf(path).to(DEVICE, DTYPE).eval()}
    for mode in ("w8a16", "w8a8"):
        ours[f"fastattn-{mode}"] = fastattn.quantize(GPT.from_hf(path).to(DEVICE, DTYPE).eval(), mode=mode)
    return hf, ours


def _prompt(vocab):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (BATCH, PROMPT), generator=g).to(DEVICE)


def _run(benchmark, impl, step, group, tokens):
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=DEVICE, dtype=str(DTYPE)[6:], model=SIZE, batch=BATCH,
                                prompt=PROMPT, new=NEW, threads=torch.get_num_threads(),
                                op=f"{SIZE} {group.split()[0]}", direction=f"b{BATCH}", width=f"{PROMPT}+{NEW}")
    benchmark.pedantic(step, warmup_rounds=1, rounds=ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: one plain run, no statistics
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["tokens/s"] = tokens / median
    if impl == "transformers":
        _medians[group] = median
    elif group in _medians:
        benchmark.extra_info["speedup_vs_transformers"] = _medians[group] / median


@pytest.mark.parametrize("impl", IMPLS + GRAPHED)
def test_greedy_generation(benchmark, models, impl):
    hf, ours = models
    graphed = impl in GRAPHED
    if graphed and not GPU:
        pytest.skip("cuda_graph: GPU only")
    ids = _prompt(hf.config.vocab_size)
    if impl == "transformers":
        def step():
            with torch.inference_mode():
                out = hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0)
            sync(DEVICE)
            return out
    else:
        model = ours[impl.removesuffix("-graph")]

        def step():
            with torch.inference_mode():
                out = model.generate(ids, NEW, temperature=0, min_new_tokens=NEW, cuda_graph=graphed)
            sync(DEVICE)
            return out
    _run(benchmark, impl, step, f"generate {SIZE} {str(DTYPE)[6:]} b{BATCH} {PROMPT}+{NEW} greedy", BATCH * NEW)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill(benchmark, models, impl):
    hf, ours = models
    ids = _prompt(hf.config.vocab_size)
    if impl == "transformers":
        def step():
            with torch.inference_mode():
                hf(ids, use_cache=True, logits_to_keep=1)
            sync(DEVICE)
    else:
        model = ours[impl]
        keep = torch.ones_like(ids, dtype=torch.bool)

        def step():
            with torch.inference_mode():
                model.setup_caches(BATCH, PROMPT + NEW)
                model.prefill(ids, keep)
            sync(DEVICE)
    _run(benchmark, impl, step, f"prefill {SIZE} {str(DTYPE)[6:]} b{BATCH} {PROMPT}", BATCH * PROMPT)


@pytest.mark.parametrize("impl", ["fastattn", "fastattn-w8a16", "fastattn-w8a8"])
def test_greedy_generation_interleaved(benchmark, models, impl):
    """Each round runs transformers' generate, then ours (conftest.interleaved): speedup_vs_transformers from the
    two minima."""
    hf, ours = models
    ids = _prompt(hf.config.vocab_size)

    def theirs():
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        sync(DEVICE)

    def mine():
        with torch.inference_mode():
            ours[impl].generate(ids, NEW, temperature=0, min_new_tokens=NEW)
        sync(DEVICE)

    interleaved(benchmark, {"transformers": theirs, impl: mine}, impl, BATCH * NEW,
                f"generate interleaved {SIZE} {str(DTYPE)[6:]} b{BATCH} {PROMPT}+{NEW} greedy", ROUNDS,
                device=DEVICE, dtype=str(DTYPE)[6:], model=SIZE, batch=BATCH, prompt=PROMPT, new=NEW,
                threads=torch.get_num_threads())


LOOKUP = int(os.environ.get("FASTATTN_BENCH_LOOKUP", "4"))


def test_prompt_lookup_interleaved(benchmark, models):
    """Speculative decoding by prompt lookup (LOOKUP tokens drafted a step), ours and transformers' own
    (prompt_lookup_num_tokens), against both plain greedy runs, rounds interleaved; all four give the same tokens.
    The random weights' greedy output repeats itself, so lookup drafts are often right (``acceptance``): what a
    task that copies from its input (summaries, code edits) sees, not open-ended text."""
    hf, ours = models
    ids = _prompt(hf.config.vocab_size)
    model = ours["fastattn"]

    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    runs = {"transformers": synced(DEVICE, lambda: hf.generate(ids, **kw)),
            "transformers-lookup": synced(DEVICE, lambda: hf.generate(ids, prompt_lookup_num_tokens=LOOKUP, **kw)),
            "fastattn": synced(DEVICE, lambda: model.generate(ids, NEW, temperature=0, min_new_tokens=NEW)),
            "fastattn-lookup": synced(DEVICE, lambda: model.generate(ids, NEW, temperature=0, min_new_tokens=NEW,
                                                                     prompt_lookup_num_tokens=LOOKUP))}
    interleaved_speculative(
        benchmark, runs, model, BATCH * NEW,
        f"generate prompt-lookup {SIZE} {str(DTYPE)[6:]} b{BATCH} {PROMPT}+{NEW} greedy k{LOOKUP}", ROUNDS,
        device=DEVICE, dtype=str(DTYPE)[6:], model=SIZE, batch=BATCH, prompt=PROMPT, new=NEW,
        threads=torch.get_num_threads())


BEAMS = int(os.environ.get("FASTATTN_BENCH_BEAMS", "4"))


@pytest.mark.parametrize("impl", ["fastattn", "fastattn-w8a16"])
def test_beam_search_interleaved(benchmark, models, impl):
    """Beam search (BEAMS beams, NEW tokens each), transformers' generate and ours alternated; the float rows give
    the same tokens (test_same_greedy_tokens)."""
    hf, ours = models
    ids = _prompt(hf.config.vocab_size)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, num_beams=BEAMS)
    runs = {"transformers": synced(DEVICE, lambda: hf.generate(ids, **kw)),
            impl: synced(DEVICE, lambda: ours[impl].generate(ids, NEW, temperature=0, min_new_tokens=NEW,
                                                              num_beams=BEAMS))}
    interleaved(benchmark, runs, impl, BATCH * NEW,
                f"generate beams {SIZE} {str(DTYPE)[6:]} b{BATCH} {PROMPT}+{NEW} {BEAMS} beams", ROUNDS,
                device=DEVICE, dtype=str(DTYPE)[6:], model=SIZE, batch=BATCH, prompt=PROMPT, new=NEW, beams=BEAMS,
                threads=torch.get_num_threads())


@pytest.mark.parametrize("impl", ["fastattn", "fastattn-w8a16"])
@pytest.mark.parametrize("width", [1, 2, 3, 5, 8])
def test_verify_step(benchmark, models, impl, width):
    """One speculative step of ``width`` tokens per sequence against a PROMPT-token cache (GPT.decode_many, bound;
    width 1: the decode step): what checking k = width - 1 drafts costs. With acceptance a per draft and a draft
    costing c decode steps a token, a step yields (1 - a^(k+1)) / (1 - a) tokens for k c + step(width) / step(1)."""
    model = models[1][impl]
    ids = _prompt(model.config.vocab_size)
    tokens = ids[:, :width]
    with torch.inference_mode():
        model.setup_caches(BATCH, PROMPT + NEW)
        model.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        step = model.bound_decode_one() if width == 1 else model.bound_decode_many(width)
        pos = model.cache_index[PROMPT:PROMPT + width]
        next_pos = model.next_pos.clone()

        def run():
            with torch.inference_mode():
                model.next_pos.copy_(next_pos)  # the same slots and positions every call
                step(tokens, pos)
            sync(DEVICE)
        benchmark.group = f"verify step {SIZE} {impl} b{BATCH} cache {PROMPT}"
        benchmark.extra_info.update(impl=impl, width=width, model=SIZE, batch=BATCH, device=DEVICE)
        benchmark.pedantic(run, warmup_rounds=3, rounds=max(ROUNDS, 20), iterations=1)


@GUARD
def test_same_greedy_tokens(benchmark, models):
    """The float rows generate the same tokens (a benchmark of two different computations would be worthless)."""
    hf, ours = models
    ids = _prompt(hf.config.vocab_size)[:, :16]
    with torch.inference_mode():
        theirs = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        mine = ours["fastattn"].generate(ids, 8, temperature=0, min_new_tokens=8)  # (as theirs: eos held back)
        lookup = ours["fastattn"].generate(ids, 8, temperature=0, min_new_tokens=8, prompt_lookup_num_tokens=LOOKUP)
        beams = ours["fastattn"].generate(ids, 8, temperature=0, min_new_tokens=8, num_beams=BEAMS)
        theirs_beams = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                   num_beams=BEAMS)
    assert torch.equal(mine, theirs) and torch.equal(lookup, theirs) and torch.equal(beams, theirs_beams)
