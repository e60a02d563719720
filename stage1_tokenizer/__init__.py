"""Stage 1: the VQGAN tokenizer. Later stages use only what is exported here."""
from stage1_tokenizer.model import VQGAN, VQGANConfig, TokenizerLoadError
from stage1_tokenizer.quantize import QuantizerConfig, QuantizerOutput, VectorQuantizer
from stage1_tokenizer.quantizers import (FiniteScalarQuantizer, LookupFreeQuantizer, ResidualQuantizer,
                                         build_quantizer)

__all__ = ["VQGAN", "VQGANConfig", "TokenizerLoadError", "QuantizerConfig", "QuantizerOutput", "VectorQuantizer",
           "FiniteScalarQuantizer", "LookupFreeQuantizer", "ResidualQuantizer", "build_quantizer"]
