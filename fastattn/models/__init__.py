"""Models on fastattn's fused ops: GPT (decoder-only LM), BERT (encoder: masked LM, next sentence, sequence
classification) and Seq2Seq (BART-style encoder-decoder), with static-KV-cache generation and HF checkpoint import."""
from .checkpoint import CheckpointError
from .gpt import GPT, GPTConfig
from .layers import ModelConfig, ModelOutput

__all__ = ["GPT", "GPTConfig", "ModelConfig", "ModelOutput", "CheckpointError"]
