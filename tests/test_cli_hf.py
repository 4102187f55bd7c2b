"""`fastattn train --init-hf`: a pretrained HF folder trains with its own tokenizer.json (run by HF's tokenizers), the
run's checkpoints carry it, and generate / eval read it back; generate / eval / quantize / prune take the folder
itself. The folder: a tiny random GPT-2 and a byte-level BPE
trained by the tokenizers library on a slice of the embedded corpus. Skipped without transformers."""
import json

import pytest
import torch

from fastattn.cli import main
from fastattn.data import Tokenizer, default_corpus

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import decoders, models, pre_tokenizers, trainers
    path = tmp_path_factory.mktemp("gpt2-hf")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_corpus()[:200_000]], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    eos = tok.token_to_id("<|endoftext|>")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=eos,
        eos_token_id=eos)).save_pretrained(path)
    return path


def _beside(hf_folder, folder, build):
    """A Hugging Face folder with hf_folder's tokenizer files and the model ``build(vocab_size)`` makes."""
    import shutil
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder / name, folder / name)
    build(json.loads((hf_folder / "config.json").read_text())["vocab_size"]).save_pretrained(folder)
    return folder


def test_init_hf_trains_generates_and_evaluates_with_the_folders_tokenizer(hf_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--init-hf", str(hf_folder), "--out", str(run), "--seq-len", "16", "--batch-size", "4",
                 "--steps", "3", "--eval-every", "3", "--eval-batches", "1", "--max-data-tokens", "20000",
                 "--warmup", "1"]) == 0
    assert f"tokenizer {hf_folder}/tokenizer.json (400 ids)" in capsys.readouterr().err
    saved = json.loads((run / "model" / "tokenizer.json").read_text())
    assert saved["type"] == "hf" and saved["special_ids"]["eos"] == 0
    tok = Tokenizer.load(run / "model" / "tokenizer.json")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_folder / "tokenizer.json"))
    text = "It is a truth universally acknowledged, that a single man"
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(text)) == text
    assert main(["generate", str(run), "-p", "It is", "-n", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("It is")
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["lora", "prompt"])
def test_init_hf_fine_tuning_modes(hf_folder, tmp_path, capsys, mode):
    """LoRA (merged on export) and a soft prompt on a pretrained HF GPT-2 with its tokenizer: the exported model
    generates."""
    run = tmp_path / mode
    assert main(["train", "--init-hf", str(hf_folder), "--mode", mode, "--out", str(run), "--seq-len", "16",
                 "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
                 "--max-data-tokens", "20000", "--warmup", "1", "--prompt-len", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "-p", "It is", "-n", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("It is")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny random BERT with a WordPiece tokenizer trained by tokenizers ([CLS] / [SEP] / [MASK] / [PAD])."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    path = tmp_path_factory.mktemp("bert-hf")
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([default_corpus()[:200_000]], trainers.WordPieceTrainer(vocab_size=500,
                                                                                   special_tokens=specials))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({f"{r}_token": f"[{r.upper()}]"
                                                            for r in ("pad", "cls", "sep", "mask")}
                                                           | {"eos_token": "[SEP]"}))
    torch.manual_seed(0)
    transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64)).save_pretrained(path)
    return path


def test_hf_bert_folder_masked_lm(bert_folder, tmp_path, capsys):
    """eval --task mlm straight on an HF BERT folder, and train --task mlm --init-hf with its WordPiece tokenizer:
    the [CLS] / [SEP] / [MASK] ids are the tokenizer's."""
    assert main(["eval", str(bert_folder), "--batches", "1", "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "mlm"
    run = tmp_path / "bert"
    assert main(["train", "--task", "mlm", "--init-hf", str(bert_folder), "--out", str(run), "--seq-len", "32",
                 "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
                 "--max-data-tokens", "20000", "--warmup", "1"]) == 0
    capsys.readouterr()
    ids = json.loads((run / "model" / "tokenizer.json").read_text())["special_ids"]
    assert (ids["cls"], ids["sep"], ids["mask"], ids["pad"]) == (2, 3, 4, 0)


def test_init_hf_tokenizer_errors(hf_folder, tmp_path, capsys):
    """A task needing a token the folder's tokenizer lacks, --tokenizer hf without --init-hf, a corrupt
    tokenizer.json: one line on stderr, exit code 2, no run folder."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bad / f).write_bytes((hf_folder / f).read_bytes())
    (bad / "tokenizer.json").write_text("{not json")
    for args, needle in ((["--init-hf", str(hf_folder), "--task", "mlm"], "--task mlm: the Hugging Face tokenizer "
                                                                            "has no mask token"),
                         (["--tokenizer", "hf"], "--tokenizer hf reads the --init-hf folder's tokenizer.json"),
                         (["--init-hf", str(bad)], "unreadable Hugging Face tokenizer.json")):
        out = tmp_path / "never"
        assert main(["train", "--out", str(out), "--steps", "1", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert needle in err, err
        assert not out.exists()


def test_end_ids_past_the_vocabulary_are_dropped(hf_folder, tmp_path, caplog):
    """A config's eos_token_id that is no token of tokenizer.json (a config left at its class defaults) ends no
    generation: dropped with a warning, the others kept (model.generate refuses such an id by name)."""
    from fastattn.data.hf_tokenizer import HFTokenizer
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((hf_folder / name).read_bytes())
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [50279, 7]}))
    with caplog.at_level("WARNING", logger="fastattn"):
        tok = HFTokenizer.from_folder(folder)
    assert 50279 not in tok.stop_ids and 7 in tok.stop_ids
    assert "eos_token_id 50279 is not a token of tokenizer.json" in caplog.text


def test_generate_eval_quantize_read_an_hf_folder(hf_folder, tmp_path, capsys):
    """generate / eval / quantize take a Hugging Face folder as they take a checkpoint: from_hf with its own
    tokenizer; greedy text equals transformers' generate decoded by its tokenizer. --init points to --init-hf."""
    import shutil
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    assert main(["generate", str(folder), "-p", "It is", "-n", "6", "--temperature", "0"]) == 0
    ours = capsys.readouterr().out.strip()
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    ids = torch.tensor([hf_tok("It is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours == hf_tok.decode(want[0], skip_special_tokens=True)
    assert main(["eval", str(folder), "--batches", "1", "--seq-len", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    assert main(["quantize", str(folder), "--mode", "w8a16"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "hf-int8" / "tokenizer.json").read_text())["type"] == "hf"
    assert main(["generate", str(tmp_path / "hf-int8"), "-p", "It is", "-n", "3"]) == 0
    capsys.readouterr()
    assert main(["prune", str(folder), "--heads", "0.5"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "hf-pruned"), "--batches", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--init", str(folder), "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "a Hugging Face folder: start from it with --init-hf" in capsys.readouterr().err


def test_speculative_generate_with_an_hf_draft_of_another_family(hf_folder, tmp_path, capsys):
    """--draft takes an HF folder on the same tokenizer, of another family (a BLOOM drafting for a GPT-2): plain
    greedy's text; --prompt-lookup on the folder too."""
    torch.manual_seed(1)
    draft = _beside(hf_folder, tmp_path / "bloom", lambda vocab: transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=vocab, hidden_size=16, n_layer=1, n_head=2)))
    args = ["generate", str(hf_folder), "-p", "It is", "-n", "10", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    for extra in (["--draft", str(draft), "--num-draft-tokens", "3"], ["--prompt-lookup", "3"]):
        assert main(args + extra) == 0
        out = capsys.readouterr()
        assert out.out == plain and "drafted tokens accepted" in out.err, out.err


def _generates_greedily(folder, capsys):
    """fastattn generate on an HF causal-LM folder prints GPT.from_hf's greedy continuation of "It is"."""
    from fastattn.data.hf_tokenizer import HFTokenizer
    from fastattn.models import GPT
    assert main(["generate", str(folder), "-p", "It is", "-n", "6", "--temperature", "0", "--min-new-tokens", "6"]) \
        == 0
    tok = HFTokenizer.from_folder(folder)
    ids = torch.tensor([tok.encode_prompt("It is")])
    want = GPT.from_hf(folder).generate(ids, 6, temperature=0)[0, ids.shape[1]:].tolist()
    assert capsys.readouterr().out.rstrip("\n") == "It is" + tok.decode(want)


def test_mixtral_folder_generates_quantizes_and_fine_tunes(hf_folder, tmp_path, capsys):
    """A Mixtral folder (a mixture of experts) on the test tokenizer: generate's text is GPT.from_hf's greedy
    continuation, quantize keeps its router float, and --init-hf trains it two steps."""
    torch.manual_seed(0)
    folder = _beside(hf_folder, tmp_path / "mixtral", lambda vocab: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                   num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.3)))
    _generates_greedily(folder, capsys)
    assert main(["quantize", str(folder), "--mode", "w8a16"]) == 0
    capsys.readouterr()
    assert main(["train", "--init-hf", str(folder), "--out", str(tmp_path / "run"), "--seq-len", "16",
                 "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
                 "--max-data-tokens", "20000", "--warmup", "1"]) == 0


def test_sharded_hf_folder(hf_folder, tmp_path, capsys):
    """A sharded Hugging Face folder (model-0000x-of-0000y.safetensors + index): generate and quantize read it."""
    folder = tmp_path / "sharded"
    transformers.GPT2LMHeadModel.from_pretrained(hf_folder).save_pretrained(folder, max_shard_size="40KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((hf_folder / f).read_bytes())
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert main(["generate", str(folder), "-p", "It is", "-n", "4", "--temperature", "0"]) == 0
    assert main(["generate", str(hf_folder), "-p", "It is", "-n", "4", "--temperature", "0"]) == 0
    one, two = capsys.readouterr().out.strip().split("\n")
    assert one == two
    assert main(["quantize", str(folder), "--mode", "w8a16"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_float"] > 0


def test_generation_stops_at_every_end_id(hf_folder, tmp_path, capsys):
    """generation_config.json's eos_token_id list (Llama 3's <|eot_id|> beside <|end_of_text|>) ends a generation
    as the tokenizer's eos does: the text stops before the first of them, in the folder and in a run's checkpoint."""
    import shutil
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    from fastattn.data.hf_tokenizer import HFTokenizer
    from fastattn.models import GPT
    tok = HFTokenizer.from_folder(folder)
    prompt = torch.tensor([tok.encode_prompt("It is")])
    with torch.no_grad():
        new = GPT.from_hf(folder).generate(prompt, 6, temperature=0)[0, prompt.shape[1]:].tolist()
    k = next((i for i in range(1, len(new)) if new[i] not in new[:i]), 0)  # its first occurrence ends the text
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, new[k]]}))
    assert HFTokenizer.from_folder(folder).stop_ids == [0, new[k]]
    assert main(["generate", str(folder), "-p", "It is", "-n", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == ("It is" + tok.decode(new[:k])).strip()


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_generate_chat(hf_folder, tmp_path, capsys):
    """--chat: each prompt as a user turn of the folder's chat template, as transformers' apply_chat_template
    renders it; the reply alone is printed, equal to transformers' generate from the same ids. Without a template
    (or on a fastattn checkpoint) it is one line and exit code 2."""
    import shutil
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    assert main(["generate", str(folder), "--chat", "-p", "hi"]) == 2
    assert "--chat: the tokenizer has no chat template" in capsys.readouterr().err
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHAT}))
    assert main(["generate", str(folder), "--chat", "-p", "Who is Emma?", "-n", "5", "--temperature", "0"]) == 0
    reply = capsys.readouterr().out.strip()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "Who is Emma?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert reply == hf_tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_init_from_a_run_that_started_from_hf_keeps_its_tokenizer(hf_folder, tmp_path, capsys):
    """--init from a checkpoint trained on an HF folder's tokenizer continues with that tokenizer (the checkpoint
    carries it): no --tokenizer needed, and the second run's checkpoints carry it on."""
    first, second = tmp_path / "first", tmp_path / "second"
    short = ["--seq-len", "16", "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
             "--max-data-tokens", "20000", "--warmup", "1"]
    assert main(["train", "--init-hf", str(hf_folder), "--out", str(first), *short]) == 0
    capsys.readouterr()
    assert main(["train", "--init", str(first), "--out", str(second), *short]) == 0
    assert f"tokenizer of {first} (400 ids)" in capsys.readouterr().err
    assert json.loads((second / "model" / "tokenizer.json").read_text())["type"] == "hf"
    assert main(["generate", str(second), "-p", "It is", "-n", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("It is")


def test_init_hf_with_another_tokenizer_moves_the_padding_row(hf_folder, tmp_path, capsys):
    """A Llama folder's embedding keeps its pad token's row out of training (padding_idx = pad_token_id 3); with
    another tokenizer (--tokenizer bytes) that row is byte 3, a real token: the run's pad token's row is kept out."""
    from fastattn.data import Tokenizer
    folder = _beside(hf_folder, tmp_path / "llama", lambda vocab: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64, pad_token_id=3)))
    short = ["--seq-len", "16", "--batch-size", "4", "--steps", "1", "--eval-every", "0", "--max-data-tokens", "20000"]
    for tok, want in ((["--tokenizer", "bytes"], Tokenizer().pad_id), ([], 3)):
        run = tmp_path / f"run{want}"
        assert main(["train", "--init-hf", str(folder), *tok, "--out", str(run), *short]) == 0
        assert json.loads((run / "model" / "config.json").read_text())["padding_idx"] == want
    capsys.readouterr()


ROBERTA_SPECIALS = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                    "pad_token": "<pad>", "mask_token": "<mask>", "unk_token": "<unk>"}


def _roberta_tokenizer(path):
    """A byte-level BPE as RoBERTa's and BART's (<s> <pad> </s> <unk> <mask>: ids 0-4), saved in path."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([default_corpus()[:200_000]], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))  # <s> text </s>, as theirs
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(ROBERTA_SPECIALS))
    return tok


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory):
    """A tiny random RoBERTa (its pad id 1, the model's padding_idx)."""
    path = tmp_path_factory.mktemp("roberta-hf")
    tok = _roberta_tokenizer(path)
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1)).save_pretrained(path)
    return path


def test_hf_roberta_folder_masked_lm_and_classifier(roberta_folder, tmp_path, capsys):
    """eval on an HF RoBERTa folder (masked LM), then a classifier fine-tuned from it with --init-hf: its encoder
    starts from the folder's weights, and the run evaluates."""
    assert main(["eval", str(roberta_folder), "--batches", "1", "--seq-len", "32"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "mlm" and 0 <= res["accuracy"] <= 1
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"text": ("good fine nice " if i % 2 else "bad awful poor ") * 2,
                                          "label": ["neg", "pos"][i % 2]}) + "\n" for i in range(40)))
    run = tmp_path / "clf"
    assert main(["train", "--task", "classify", "--init-hf", str(roberta_folder), "--data", str(labels), "--mode",
                 "frozen", "--out", str(run), "--seq-len", "32", "--batch-size", "4", "--steps", "2",
                 "--eval-every", "2", "--eval-batches", "1", "--warmup", "1"]) == 0
    capsys.readouterr()
    from safetensors.torch import load_file
    ours, theirs = load_file(run / "model" / "model.safetensors"), load_file(roberta_folder / "model.safetensors")
    assert torch.equal(ours["encoder.pos.weight"], theirs["roberta.embeddings.position_embeddings.weight"])
    assert json.loads((run / "model" / "config.json").read_text())["roberta_positions"] is True
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "classify"


@pytest.mark.parametrize("family", ["ModernBert", "DebertaV2"])
def test_more_encoder_folders_mlm_and_classifier(tmp_path, capsys, family):
    """ModernBERT (windows, rotary, pre-norm without the first input norm) and DeBERTa-v3 (disentangled attention)
    folders on a RoBERTa-style tokenizer: eval as masked LMs, a classifier fine-tuned from them with --init-hf, its
    checkpoint (their config fields) evaluated."""
    path = tmp_path / family
    path.mkdir()
    tok = _roberta_tokenizer(path)
    kw = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=2, max_position_embeddings=64, pad_token_id=1)
    kw.update(dict(local_attention=8, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2)
              if family == "ModernBert" else
              dict(relative_attention=True, position_buckets=8, max_relative_positions=32, pos_att_type=["p2c", "c2p"],
                   norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0))
    torch.manual_seed(0)
    getattr(transformers, f"{family}ForMaskedLM")(getattr(transformers, f"{family}Config")(**kw)).save_pretrained(path)
    assert main(["eval", str(path), "--batches", "1", "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "mlm"
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"text": ("good fine nice " if i % 2 else "bad awful poor ") * 2,
                                          "label": ["neg", "pos"][i % 2]}) + "\n" for i in range(40)))
    run = tmp_path / "clf"
    assert main(["train", "--task", "classify", "--init-hf", str(path), "--data", str(labels), "--out", str(run),
                 "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
                 "--warmup", "1"]) == 0
    capsys.readouterr()
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert (cfg["first_input_norm"] is False) if family == "ModernBert" else cfg["rel_pos_buckets"] == 8
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "classify"


@pytest.mark.parametrize("family, kw", [
    ("Olmo2", {}),  # output-only norms, q / k norms over all heads
    ("Cohere2", dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=3)),
    ("Granite", dict(embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=4.0))])
def test_more_families_generate_and_fine_tune(hf_folder, tmp_path, capsys, family, kw):
    """Folders of the families GPT.from_hf gained later (their config fields through the CLI): generate's text is
    GPT.from_hf's greedy continuation; --init-hf trains two steps and the run's checkpoint generates."""
    torch.manual_seed(0)
    folder = _beside(hf_folder, tmp_path / family, lambda vocab: getattr(transformers, f"{family}ForCausalLM")(
        getattr(transformers, f"{family}Config")(**{**dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3), **kw})))
    _generates_greedily(folder, capsys)
    run = tmp_path / "run"
    assert main(["train", "--init-hf", str(folder), "--out", str(run), "--seq-len", "16", "--batch-size", "2",
                 "--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--max-data-tokens", "20000",
                 "--warmup", "1"]) == 0
    assert main(["generate", str(run), "-p", "It is", "-n", "4", "--temperature", "0"]) == 0


def _bart(path, **kw):
    """(a tiny random HF BART, its tokenizer saved in path: a new folder)."""
    path.mkdir()
    tok = _roberta_tokenizer(path)
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, **kw)), tok


def test_hf_bart_folder_generates_evaluates_and_trains(tmp_path, capsys):
    """generate / eval on an HF BART folder (its tokenizer's <s> text </s> into the encoder, forced BOS from its
    generation config): the same tokens as Seq2Seq.from_hf's generate; then a denoising run from it."""
    path = tmp_path / "bart"
    hf, tok = _bart(path)
    hf.generation_config.forced_bos_token_id = 0
    hf.save_pretrained(path)
    run = _seq2seq_folder_round(path, tok, 2, tmp_path, capsys)
    assert json.loads((run / "model" / "config.json").read_text())["pos_offset"] == 2


def test_hf_nllb_folder_generates_evaluates_and_trains(tmp_path, capsys):
    """An M2M100 / NLLB folder (fixed sinusoidal positions counted past the padding): the same round as BART's."""
    path = tmp_path / "nllb"
    path.mkdir()
    tok = _roberta_tokenizer(path)
    torch.manual_seed(0)
    transformers.M2M100ForConditionalGeneration(transformers.M2M100Config(
        vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        scale_embedding=True, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)).save_pretrained(path)
    run = _seq2seq_folder_round(path, tok, 2, tmp_path, capsys)
    assert json.loads((run / "model" / "config.json").read_text())["roberta_positions"] is True


def _seq2seq_folder_round(path, tok, eos, tmp_path, capsys):
    """generate from an HF encoder-decoder folder (the same text as Seq2Seq.from_hf's greedy tokens), eval it as
    seq2seq, and fine-tune it 2 steps with the seq2seq task; returns the run folder."""
    from fastattn.models import Seq2Seq
    assert main(["generate", str(path), "-p", "It is a truth", "-n", "6", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    ids = torch.tensor([tok.encode("It is a truth").ids])
    want = Seq2Seq.from_hf(path).generate(ids, 6, temperature=0, eos_token_id=eos)[0, 1:].tolist()
    want = want[:want.index(eos)] if eos in want else want
    assert text.rstrip("\n") == "It is a truth" + tok.decode(want)
    assert main(["eval", str(path), "--batches", "1", "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "seq2seq"
    run = tmp_path / "run"
    assert main(["train", "--task", "seq2seq", "--init-hf", str(path), "--out", str(run), "--seq-len", "32",
                 "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
                 "--max-data-tokens", "20000", "--warmup", "1"]) == 0
    capsys.readouterr()
    return run


def test_hf_opt_folder_smoothquant(hf_folder, tmp_path, capsys):
    """An OPT folder (SmoothQuant's model family) through `fastattn quantize --mode w8a8 --smoothquant`: the int8
    model evaluates, within a few percent of the float model's perplexity, and generates."""
    torch.manual_seed(0)
    folder = _beside(hf_folder, tmp_path / "opt", lambda vocab: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=vocab, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=0, eos_token_id=0)))
    assert main(["eval", str(folder), "--batches", "2", "--seq-len", "32"]) == 0
    ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert main(["quantize", str(folder), "--mode", "w8a8", "--smoothquant", "--calib", "2"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "opt-int8"), "--batches", "2", "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(ppl, rel=0.05)
    assert main(["generate", str(tmp_path / "opt-int8"), "-p", "It is", "-n", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("It is")


def test_corrupt_hf_folder_is_one_line(hf_folder, tmp_path, capsys):
    """A truncated model.safetensors in an HF folder: one clear line on stderr, exit code 2, no traceback."""
    import shutil
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert main(["eval", str(folder), "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: not readable" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny random Flan-T5-style model with a Unigram tokenizer (<pad> </s> <unk>, then T5's <extra_id_N>
    sentinels; no mask token), its post-processor appending </s> as T5's does."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    path = tmp_path_factory.mktemp("t5-hf")
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(20)]
    tok.train_from_iterator([default_corpus()[:200_000]], trainers.UnigramTrainer(
        vocab_size=400, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                            "unk_token": "<unk>"}))
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)).save_pretrained(path)
    return path


def test_t5_span_corruption_batches(t5_folder):
    """The seq2seq task on a T5 tokenizer: spans replaced by consecutive sentinels; putting each target span back
    in place of its sentinel gives the block again; targets end with the next sentinel and </s>, -100 after."""
    import types
    from fastattn.cli.tasks import IGNORE, Seq2SeqTask
    from fastattn.data.hf_tokenizer import HFTokenizer
    tok = HFTokenizer.from_folder(t5_folder)
    cfg = types.SimpleNamespace(data=None, val_fraction=0.05, max_data_tokens=20000, seq_len=48, mask_prob=0.15)
    task = Seq2SeqTask(cfg, tok)
    sentinels = tok.sentinel_ids()
    assert len(sentinels) == 20 and task.sentinels == sentinels
    g = torch.Generator().manual_seed(0)
    x = task.data.blocks("train", 4, cfg.seq_len, g, None)
    for row in x:
        inputs, targets = task._span_corrupt(row, g)
        used = [t for t in inputs if t in sentinels]
        assert used == sentinels[:len(used)] and used, "consecutive sentinels, at least one span"
        assert inputs[-1] == tok.eos_id and targets[-2:] == [sentinels[len(used)], tok.eos_id]
        spans, cur = {}, None
        for t in targets[:-2]:
            if t in sentinels:
                cur = spans.setdefault(t, [])
            else:
                cur.append(t)
        rebuilt = [u for t in inputs[:-1] for u in (spans[t] if t in sentinels else [t])]
        assert rebuilt == row.tolist()
    inputs, labels = task.batch("train", 3)
    assert (labels[:, 0] == sentinels[0]).all() and (inputs["decoder_input_ids"][:, 0] == tok.pad_id).all()
    keep = labels != IGNORE
    assert torch.equal(inputs["decoder_input_ids"][:, 1:][keep[:, 1:]], labels[:, :-1][keep[:, 1:]])


def test_hf_t5_folder_generates_evaluates_and_trains(t5_folder, tmp_path, capsys):
    """generate (the same tokens as Seq2Seq.from_hf's), eval and a span-corruption fine-tune of an HF T5 folder."""
    tok = tokenizers.Tokenizer.from_file(str(t5_folder / "tokenizer.json"))
    run = _seq2seq_folder_round(t5_folder, tok, 1, tmp_path, capsys)
    assert json.loads((run / "model" / "config.json").read_text())["relative_buckets"] == 32


def test_seq2seq_source_target_pairs(t5_folder, tmp_path, capsys):
    """--task seq2seq with a .jsonl of source / target pairs fine-tunes on them (supervised, not denoising): labels
    are the targets as the tokenizer encodes them (T5: text </s>), the decoder starts at pad; the loss falls over a
    few steps, and eval reads the same kind of file."""
    import types
    from fastattn.cli.tasks import IGNORE, Seq2SeqTask
    from fastattn.data.hf_tokenizer import HFTokenizer
    pairs = tmp_path / "pairs.jsonl"
    words = ["good day", "thank you", "the old house", "a small dog", "it is raining", "see you soon"]
    pairs.write_text("".join(json.dumps({"source": f"shout: {w}", "target": w.upper()}) + "\n"
                             for w in words * 4))
    tok = HFTokenizer.from_folder(t5_folder)
    cfg = types.SimpleNamespace(data=[str(pairs)], val_fraction=0.1, seq_len=32, mask_prob=0.15)
    task = Seq2SeqTask(cfg, tok)
    inputs, labels = task.batch("train", 4, index=0)
    for row, lab in zip(inputs["input_ids"], labels):
        src = next(s for s, t in task.pairs[0] if tok.encode_prompt(s) == row[row != tok.pad_id].tolist())
        assert lab[lab != IGNORE].tolist() == tok.encode_prompt(dict(task.pairs[0])[src])
    assert (inputs["decoder_input_ids"][:, 0] == tok.pad_id).all()
    _fine_tune_on_pairs("seq2seq", t5_folder, pairs, tmp_path / "run", capsys)


def _fine_tune_on_pairs(task, folder, pairs, run, capsys):
    """12 steps of --task on the pairs from an HF folder: the training loss falls; eval reads the pairs."""
    assert main(["train", "--task", task, "--init-hf", str(folder), "--data", str(pairs), "--out", str(run),
                 "--seq-len", "32", "--batch-size", "8", "--steps", "12", "--eval-every", "4", "--eval-batches", "1",
                 "--warmup", "1", "--lr", "3e-3", "--log-every", "1"]) == 0
    capsys.readouterr()
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    assert main(["eval", str(run), "--data", str(pairs), "--batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == task


def test_clm_prompt_response_pairs(hf_folder, tmp_path, capsys):
    """--task clm with a .jsonl of source / target pairs: supervised fine-tuning of a GPT, the loss on the target
    and end token only (each target id is the next input id; the source's are -100); the loss falls; eval reads
    the pairs."""
    import types
    from fastattn.cli.tasks import IGNORE, CLMTask
    from fastattn.data.hf_tokenizer import HFTokenizer
    pairs = tmp_path / "sft.jsonl"
    words = ["good day", "thank you", "the old house", "a small dog", "it is raining", "see you soon"]
    pairs.write_text("".join(json.dumps({"source": f"Say it loud: {w}\n", "target": w.upper()}) + "\n"
                             for w in words * 4))
    tok = HFTokenizer.from_folder(hf_folder)
    task = CLMTask(types.SimpleNamespace(data=[str(pairs)], val_fraction=0.1, seq_len=32), tok)
    inputs, target = task.batch("train", 6, index=0)
    for row, keep, tgt in zip(inputs["input_ids"], inputs["attention_mask"], target):
        ids = row[keep.bool()].tolist()
        text = tok.decode(ids)
        source = next(s for s, _ in task.pairs[0] if text.startswith(s))
        n = len(tok.encode_prompt(source))
        want = tok.encode(dict(task.pairs[0])[source]) + [tok.eos_id]
        assert (tgt[:n - 1] == IGNORE).all() and tgt[n - 1:n - 1 + len(want)].tolist() == want
        assert ids[n:] == want[:-1]  # each target id is the next input id
    _fine_tune_on_pairs("clm", hf_folder, pairs, tmp_path / "run", capsys)


def test_clm_pairs_chat(hf_folder, tmp_path, capsys):
    """--chat: each source as the user turn of the tokenizer's chat template (ending where the reply starts), the
    target as the reply; without a template, or with another task, one line and exit code 2."""
    import shutil
    import types
    from fastattn.cli.tasks import IGNORE, CLMTask
    from fastattn.data import DataError
    from fastattn.data.hf_tokenizer import HFTokenizer
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    pairs = tmp_path / "chat.jsonl"
    pairs.write_text("".join(json.dumps({"source": f"Say {w}", "target": w}) + "\n" for w in ["yes", "no"] * 4))
    args = ["train", "--init-hf", str(folder), "--data", str(pairs), "--chat", "--out", str(tmp_path / "r"),
            "--seq-len", "48", "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--eval-batches", "1"]
    assert main(args) == 2
    assert "--chat: " in capsys.readouterr().err
    assert main(args[:-12] + ["--task", "mlm", "--chat"]) == 2
    assert "--chat formats the clm task's" in capsys.readouterr().err
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHAT}))
    tok = HFTokenizer.from_folder(folder)
    cfg = types.SimpleNamespace(data=[str(pairs)], val_fraction=0.1, seq_len=48, chat=True)
    task = CLMTask(cfg, tok)
    inputs, target = task.batch("train", 2, index=0)
    src = tok.encode_chat(task.pairs[0][0][0])
    assert inputs["input_ids"][0, :len(src)].tolist() == src and (target[0, :len(src) - 1] == IGNORE).all()
    with pytest.raises(DataError, match="--chat: needs --data files of source / target pairs"):
        CLMTask(types.SimpleNamespace(data=None, val_fraction=0.1, seq_len=48, max_data_tokens=20000, chat=True),
                tok)
    assert main(args) == 0
    capsys.readouterr()


def test_generate_takes_beam_search_from_the_folders_generation_config(tmp_path, capsys):
    """An HF BART folder whose generation_config.json asks for beam search (as BART-large-CNN's does) generates with
    it unless told otherwise: the text of Seq2Seq.from_hf's beam search; --num-beams 1 --temperature 0 is greedy,
    --temperature samples; a bad value there is named in one line."""
    from fastattn.models import Seq2Seq
    path = tmp_path / "bart"
    hf, tok = _bart(path, init_std=0.3)
    hf.generation_config.update(num_beams=3, no_repeat_ngram_size=2, length_penalty=2.0, early_stopping=True)
    hf.save_pretrained(path)
    model = Seq2Seq.from_hf(path)
    ids = torch.tensor([tok.encode("It is a truth").ids])

    def text(**kw):
        out = model.generate(ids, 8, temperature=0, eos_token_id=2, **kw)[0, 1:].tolist()
        return "It is a truth" + tok.decode(out[:out.index(2)] if 2 in out else out)

    beams = text(num_beams=3, no_repeat_ngram_size=2, length_penalty=2.0, early_stopping=True)
    assert beams != text(no_repeat_ngram_size=2)
    args = ["generate", str(path), "-p", "It is a truth", "-n", "8"]
    assert main(args) == 0
    assert capsys.readouterr().out == f"--- [0] ---\n{beams}\n"  # not streamed
    assert main(args + ["--num-beams", "1", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == text(no_repeat_ngram_size=2)
    assert main(args + ["--temperature", "0.7"]) == 0
    capsys.readouterr()
    cfg = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**cfg, "num_beams": 0}))
    assert main(args) == 2
    assert "generation_config.json: num_beams 0 is not a valid value" in capsys.readouterr().err


def test_generate_takes_sampling_from_the_folders_generation_config(hf_folder, tmp_path, capsys, monkeypatch):
    """As transformers' generate: a folder whose generation_config.json samples (an instruct model's do_sample,
    temperature, top_p, top_k) samples with those settings; without do_sample it decodes greedily (transformers'
    tokens); options given win; a bad value is named in one line."""
    import shutil

    from fastattn.models import GPT
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    seen, real = [], GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw))
    args = ["generate", str(folder), "-p", "It is", "-n", "6", "--min-new-tokens", "6"]
    assert main(args) == 0  # no do_sample: greedy, transformers' text
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    ids = torch.tensor([hf_tok("It is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert capsys.readouterr().out.strip() == hf_tok.decode(want[0], skip_special_tokens=True)
    assert seen[-1]["temperature"] == 0.0
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(
        {**gen, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}))
    assert main(args) == 0
    assert {k: seen[-1][k] for k in ("temperature", "top_p", "top_k", "min_p")} == \
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": None}
    assert main(args + ["--temperature", "1.1", "--top-k", "0"]) == 0
    assert (seen[-1]["temperature"], seen[-1]["top_k"], seen[-1]["top_p"]) == (1.1, None, 0.9)
    # a folder that does not sample, asked to with --temperature: its top_k / top_p, as generate(do_sample=True)
    (folder / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False, "top_p": 0.5, "top_k": 3}))
    assert main(args + ["--temperature", "1.0"]) == 0
    assert (seen[-1]["temperature"], seen[-1]["top_k"], seen[-1]["top_p"]) == (1.0, 3, 0.5)
    assert main(args) == 0 and seen[-1]["temperature"] == 0.0  # and greedy without it
    (folder / "generation_config.json").write_text(json.dumps({**gen, "temperature": -1}))
    capsys.readouterr()
    assert main(args) == 2
    assert "generation_config.json: temperature -1 is not a valid value" in capsys.readouterr().err


def test_seq2seq_pairs_start_at_the_models_decoder_start(tmp_path, capsys):
    """A Pegasus-like folder (decoder_start_token_id = pad, not eos): eval on source / target pairs starts the
    decoder where the model does, its loss transformers' (labels shifted right after the model's start token)."""
    path = tmp_path / "pegasus"
    path.mkdir()
    tok = _roberta_tokenizer(path)  # (no T5 sentinels: the task's own guess would be eos)
    torch.manual_seed(0)
    hf = transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(
        vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, init_std=0.3,
        pad_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=2)).eval()
    hf.save_pretrained(path)
    rows = [("It is a truth universally acknowledged", "a truth"), ("Emma Woodhouse, handsome", "handsome and rich"),
            ("She was the youngest", "the youngest of two")]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
    total = count = 0
    with torch.no_grad():
        for s, t in rows:
            src, labels = torch.tensor([tok.encode(s).ids]), torch.tensor([tok.encode(t).ids])
            total += hf(input_ids=src, labels=labels).loss.item() * labels.numel()
            count += labels.numel()
    assert main(["eval", str(path), "--data", str(pairs)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(total / count, rel=1e-6)


def test_quantize_prune_and_train_keep_the_folders_generation_config(tmp_path, capsys, monkeypatch):
    """quantize / prune / train --init-hf of an HF folder whose generation_config.json asks for beam search (and
    train --init from that run): the output carries it, and generate on it searches as on the folder (was: sampling
    at the CLI's temperature)."""
    from fastattn.models import Seq2Seq
    path = tmp_path / "bart"
    hf, tok = _bart(path)
    hf.generation_config.update(num_beams=3, no_repeat_ngram_size=2)
    hf.save_pretrained(path)
    seen, real = [], Seq2Seq.generate
    monkeypatch.setattr(Seq2Seq, "generate", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw))
    assert main(["quantize", str(path), "--mode", "w8a16", "--eval-batches", "0"]) == 0
    assert main(["prune", str(path), "--heads", "0.5"]) == 0
    tiny = ["--seq-len", "32", "--batch-size", "2", "--steps", "1", "--eval-every", "0", "--max-data-tokens", "20000"]
    assert main(["train", "--task", "seq2seq", "--init-hf", str(path), "--out", str(tmp_path / "run"), *tiny]) == 0
    assert main(["train", "--task", "seq2seq", "--init", str(tmp_path / "run"), "--out", str(tmp_path / "run2"),
                 *tiny]) == 0
    assert (tmp_path / "run" / "ckpt-0000001" / "generation_config.json").is_file()
    import shutil
    for folder in (path, tmp_path / "bart-int8", tmp_path / "bart-pruned", tmp_path / "run", tmp_path / "run2",
                   "run without model"):
        if folder == "run without model":  # (a run still training: its newest checkpoint's file, as its weights)
            shutil.rmtree(tmp_path / "run" / "model")
            folder = tmp_path / "run"
        assert main(["generate", str(folder), "-p", "It is a truth", "-n", "4"]) == 0
        assert (seen[-1]["num_beams"], seen[-1]["no_repeat_ngram_size"], seen[-1]["temperature"]) == (3, 2, 0.0)
    capsys.readouterr()


def test_encoder_tokenizer_without_eos(bert_folder, tmp_path, capsys):
    """A BERT folder as bert-base-uncased ships it (no eos_token): its [SEP] ends each text; eval, mlm and classify
    runs take it (were refused: 'the tokenizer has no end-of-text token')."""
    import shutil

    from fastattn.data.hf_tokenizer import HFTokenizer
    folder = tmp_path / "bert"
    shutil.copytree(bert_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "eos_token"}))
    tok = HFTokenizer.from_folder(folder)
    assert tok.eos_id == tok.sep_id == 3
    assert main(["eval", str(folder), "--batches", "1", "--seq-len", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "mlm"
    assert main(["train", "--task", "mlm", "--init-hf", str(folder), "--out", str(tmp_path / "run"), "--seq-len", "32",
                 "--batch-size", "2", "--steps", "1", "--eval-batches", "1", "--max-data-tokens", "20000"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("labels, given, want", [(3, [], 3), (2, ["--num-labels", "4"], 4)])
def test_classify_init_hf_takes_the_label_count(bert_folder, tmp_path, capsys, labels, given, want):
    """train --task classify --init-hf from a masked-LM folder: the classifier has the data's label count, or
    --num-labels' (were: the folder config's 2, refusing 3 labels and ignoring --num-labels)."""
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": f"word {i} " * 3, "label": f"l{i % labels}"}) + "\n"
                            for i in range(30)))
    run = tmp_path / "run"
    assert main(["train", "--task", "classify", "--init-hf", str(bert_folder), "--data", str(data), "--out", str(run),
                 "--seq-len", "16", "--batch-size", "4", "--steps", "1", "--eval-batches", "1", "--warmup", "0",
                 *given]) == 0
    capsys.readouterr()
    assert json.loads((run / "model" / "config.json").read_text())["num_labels"] == want


def test_empty_prompt_without_bos_in_the_encoding(hf_folder, capsys, monkeypatch):
    """A GPT-2 tokenizer adds no BOS: an empty prompt starts from the bos token, as transformers' generate does
    without input (was: 'expected at least one token a row'); beside other prompts too."""
    import io
    import sys
    import types

    from fastattn.data.hf_tokenizer import HFTokenizer
    tok = HFTokenizer.from_folder(hf_folder)
    assert tok.encode_prompt("") == [0] and tok.encode_prompt("It is") == tok.encode("It is")
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b""), isatty=lambda: False))
    assert main(["generate", str(hf_folder), "-n", "5", "--min-new-tokens", "5", "--temperature", "0"]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    with torch.no_grad():
        want = hf.generate(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert want[0, 0] == 0 and capsys.readouterr().out.strip() == tok.decode(want[0, 1:].tolist()).strip()
    assert main(["generate", str(hf_folder), "-p", "", "-p", "It is", "-n", "3", "--temperature", "0"]) == 0
    assert "--- [1] ---\nIt is" in capsys.readouterr().out


def test_hf_folder_messages(hf_folder, tmp_path, capsys):
    """One line each, exit code 2: a folder without tokenizer.json (named once), an HF model_type from_hf does not
    import (named as such, not 'unknown model_type'), resuming an --init-hf run without --init-hf."""
    import shutil

    def one_line(*args):
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err

    notok = tmp_path / "notok"
    shutil.copytree(hf_folder, notok)
    (notok / "tokenizer.json").unlink()
    err = one_line("eval", str(notok))
    assert f"{notok}: no readable tokenizer.json" in err and err.count(str(notok)) == 1, err
    neo = tmp_path / "neo"
    transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=400, hidden_size=16, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
        max_position_embeddings=32, bos_token_id=0, eos_token_id=0)).save_pretrained(neo)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder / name, neo / name)
    capsys.readouterr()
    for args in (["eval", str(neo)], ["generate", str(neo), "-p", "a"], ["quantize", str(neo)],
                 ["train", "--init-hf", str(neo), "--out", str(tmp_path / "x")],
                 ["train", "--init", str(neo), "--out", str(tmp_path / "x")]):
        assert f"{neo}: a Hugging Face 'gpt_neo' folder, which from_hf cannot import" in one_line(*args)
    assert not (tmp_path / "x").exists() and not (tmp_path / "neo-int8").exists()
    run = tmp_path / "run"
    short = ["--out", str(run), "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--eval-batches", "1",
             "--max-data-tokens", "20000", "--warmup", "1"]
    assert main(["train", "--init-hf", str(hf_folder), *short, "--steps", "1"]) == 0
    capsys.readouterr()
    assert f"--init-hf None (the run's: '{hf_folder}')" in one_line("train", "--resume", *short)
