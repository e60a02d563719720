"""Stage 1: the VQGAN tokenizer. Later stages use only what is exported here."""
from stage1_tokenizer.model import VQGAN, VQGANConfig, TokenizerLoadError
from stage1_tokenizer.quantize import QuantizerConfig, QuantizerOutput, VectorQuantizer

__all__ = ["VQGAN", "VQGANConfig", "TokenizerLoadError", "QuantizerConfig", "QuantizerOutput", "VectorQuantizer"]
