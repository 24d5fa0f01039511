"""vitq: ADFQ-ViT post-training quantization of Vision Transformers with real int4/int8 kernels.

Calibration (fake quantization that computes exactly what the kernels compute):

    qmodel = vitq.quantize(model, vitq.ADFQConfig(w_bits=4, a_bits=4), calib_images)
    vitq.evaluate(qmodel, test_data, fp_model=model)   # {'top1', 'fp_top1', 'agreement', 'n'}
"""
from .config import PRESETS, ADFQConfig
from .api import evaluate, load_quantized, quantize, save_quantized
from . import ranking  # noqa: F401  (registers the 'dhe_ranking' MHA loss)

__all__ = ["ADFQConfig", "PRESETS", "quantize", "evaluate", "save_quantized", "load_quantized"]
# export / save / load of deploy models: added by the export layer
