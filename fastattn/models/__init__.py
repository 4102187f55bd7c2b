"""Models on fastattn's fused ops: GPT (decoder-only LM), BERT (encoder: masked LM, next sentence, sequence
classification) and Seq2Seq (BART-style encoder-decoder), with static-KV-cache generation and HF checkpoint import."""
from .bert import BERT, BERTConfig, BERTForSequenceClassification
from .checkpoint import CheckpointError
from .gpt import GPT, GPTConfig
from .layers import ModelConfig, ModelOutput
from .seq2seq import Seq2Seq, Seq2SeqConfig

__all__ = ["GPT", "GPTConfig", "BERT", "BERTConfig", "BERTForSequenceClassification",
           "Seq2Seq", "Seq2SeqConfig", "ModelConfig", "ModelOutput", "CheckpointError"]
