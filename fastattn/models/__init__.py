"""Models on fastattn's fused ops: GPT (decoder-only LM), BERT (encoder: masked LM, next sentence, sequence
classification) and Seq2Seq (BART-style encoder-decoder), with static-KV-cache generation and HF checkpoint import.

The interface (stable; the CLI builds on it):

- Configs (``GPTConfig``, ``BERTConfig``, ``Seq2SeqConfig``; dataclasses): vocab_size, d_model, n_layer, n_head,
  n_kv_head (None = n_head), head_dim (None = d_model / n_head), d_ff (None = 4 d_model), max_seq_len, dropout, norm
  ("layernorm" | "rmsnorm"), norm_eps, norm_first, mlp ("gelu" | "swiglu" | "geglu"), activation (the "gelu" and
  "geglu" MLPs': "gelu" | "gelu_tanh" | "relu" | "silu" | "relu2"), pos ("learned" | "sinusoidal" | "rotary" | "alibi"
  (GPT) | "none"), alibi_slopes (None = BLOOM's), pos_offset (learned positions' first table row), rotary_dim (None =
  head_dim), rope_theta, rope_scaling (None | linear | llama3 | yarn | longrope), sliding_window, layer_types and
  rope_local_theta (GPT), nope_layers (GPT: layers without rotary positions), tie_embeddings, bias, qkv_bias (None =
  bias), norm_bias (None = bias), qk_norm (per-head q / k norms; qk_norm_full: over all heads, qk_norm_after_rope:
  after the rotary positions, GPT), embed_scale, attn_scale, attn_softcap, final_softcap, sandwich_norm (Gemma),
  input_norm (False: OLMo 2's output-only norms), parallel_block (None | "two_norms" | "one_norm"; GPT), embed_norm
  (GPT: BLOOM's embedding LayerNorm), padding_idx (GPT: the embedding row without gradient), lm_head_bias, backend
  ("fastattn" | "torch"); BERT adds type_vocab_size (0: none), num_labels, problem_type, pad_token_id,
  roberta_positions, pooler_activation, pooling, pooler_norm, head_bias, rel_pos_buckets and rel_pos_max (DeBERTa's
  disentangled attention); Seq2Seq adds n_decoder_layer, embed_norm, pad / eos / decoder_start / forced_bos token ids,
  relative_buckets and relative_max_distance (T5's relative-position bias).
  ``to_dict()`` / ``from_dict(d)`` (an unknown key raises ValueError naming it), ``save(path)`` / ``load(path)`` JSON.
  A bad value raises ValueError naming the field.
- ``model(...)`` returns a ``ModelOutput`` with ``.logits`` and ``.loss`` (and BERT's ``.nsp_logits``).
  GPT: ``forward(input_ids, attention_mask=None, labels=None, *, shift_labels=None, skip_logits=None)``; BERT:
  ``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None, *,
  skip_logits=None)``; BERTForSequenceClassification: ``forward(input_ids, attention_mask=None, token_type_ids=None,
  labels=None)``; Seq2Seq: ``forward(input_ids, attention_mask=None, decoder_input_ids=None, labels=None, *,
  skip_logits=None)``. attention_mask is HF's: 1 = token, 0 = padding. Labels -100 are ignored. GPT's labels are
  shifted inside (shift_labels: already shifted). In training with labels (``skip_logits`` None) the fastattn
  backend computes the LM loss with fastattn.linear_cross_entropy and returns ``.logits`` None.
- ``generate(input_ids, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, eos_token_id=<config's>,
  attention_mask=None, generator=None, streamer=None, min_new_tokens=0)`` (GPT; Seq2Seq adds
  ``decoder_start_token_id``, ``forced_bos_token_id``, ``forced_eos_token_id``):
  temperature 0 = greedy; eos_token_id may be a list of ids (left out: config.eos_token_id, which from_hf reads from
  the checkpoint's generation_config; None: none). GPT batches of different lengths are padded on the
  left. Speculative decoding (GPT and Seq2Seq): ``assistant_model`` (a smaller model of the same class, same
  tokenizer) with ``num_assistant_tokens``, or ``prompt_lookup_num_tokens`` with ``max_matching_ngram_size``; greedy
  output unchanged, sampling from the same distribution; ``model.speculation_stats`` (a ``SpeculationStats``).
  Beam search (models/beam.py, transformers' own): ``num_beams``, ``num_return_sequences``, ``length_penalty``,
  ``early_stopping``; ``model.beam_scores``. ``repetition_penalty``, ``no_repeat_ngram_size`` as in transformers.
- Every model: ``save_pretrained(dir)`` / ``cls.from_pretrained(dir, **config_overrides)`` (config.json +
  model.safetensors), ``num_parameters(trainable_only=False)``, ``backbone_parameters()`` / ``head_parameters()``.
  ``GPT.from_hf(dir)`` (GPT-2, OPT, GPT-NeoX / Pythia, GPT-J, BLOOM, MPT, Phi-1 / 1.5 / 2, Falcon, StableLM, Llama
  incl. 3.1 / 3.2, Qwen2, Qwen3, Phi-3, Gemma 1 / 2 / 3 text, VaultGemma, Mistral with its sliding window, GPT-BigCode
  / StarCoder, Granite, OLMo 1 / 2 / 3, Cohere 1 / 2, SmolLM3, EXAONE 4, GLM / GLM-4, Helium, ERNIE 4.5, Seed-OSS,
  StarCoder2, Nemotron, Arcee, Ministral, HunYuan; Mixtral, Qwen3-MoE, Qwen2-MoE, GraniteMoE and OLMoE: mixtures of
  experts, models/moe.py), ``BERT.from_hf(dir)`` and ``BERTForSequenceClassification.from_hf(dir, num_labels=...)``
  (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA, ALBERT, DeBERTa-v2 / v3, MPNet, ModernBERT),
  ``Seq2Seq.from_hf(dir)`` (BART, mBART, Marian, Pegasus, M2M100 / NLLB, T5, mT5): bad checkpoints raise
  ``CheckpointError`` naming the key. from_pretrained and from_hf return the model in eval mode, as transformers does.
  ``fastattn.quantize(model, ...)`` / ``fastattn.convert(model, int8=...)`` apply as to any module.
"""
from .bert import BERT, BERTConfig, BERTForSequenceClassification
from .checkpoint import CheckpointError
from .gpt import GPT, GPTConfig
from .config import ModelConfig
from .layers import ModelOutput
from .seq2seq import Seq2Seq, Seq2SeqConfig
from .speculative import SpeculationStats

__all__ = ["GPT", "GPTConfig", "BERT", "BERTConfig", "BERTForSequenceClassification",
           "Seq2Seq", "Seq2SeqConfig", "ModelConfig", "ModelOutput", "CheckpointError", "SpeculationStats"]
