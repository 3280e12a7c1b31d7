"""ComfyUI nodes of the pack. The only package that imports `comfy`."""
from .fit_model_to_budget import FitModelToBudget
from .load_gguf import LoadGGUF
from .load_gguf_clip import LoadGGUFCLIP
from .memory_report import MemoryReport
from .quantize_model import QuantizeModel
from .quantize_text_encoder import QuantizeTextEncoder
from .save_quantized_model import SaveQuantizedModel

PREFIX = "QuantKit"

NODE_CLASS_MAPPINGS = {
    f"{PREFIX}QuantizeModel": QuantizeModel,
    f"{PREFIX}QuantizeTextEncoder": QuantizeTextEncoder,
    f"{PREFIX}LoadGGUF": LoadGGUF,
    f"{PREFIX}LoadGGUFCLIP": LoadGGUFCLIP,
    f"{PREFIX}MemoryReport": MemoryReport,
    f"{PREFIX}SaveQuantizedModel": SaveQuantizedModel,
    f"{PREFIX}FitModelToBudget": FitModelToBudget,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    f"{PREFIX}QuantizeModel": "Quantize Model (QuantKit)",
    f"{PREFIX}QuantizeTextEncoder": "Quantize Text Encoder (QuantKit)",
    f"{PREFIX}LoadGGUF": "Load GGUF Model (QuantKit)",
    f"{PREFIX}LoadGGUFCLIP": "Load GGUF CLIP (QuantKit)",
    f"{PREFIX}MemoryReport": "Memory Report (QuantKit)",
    f"{PREFIX}SaveQuantizedModel": "Save Quantized Model (QuantKit)",
    f"{PREFIX}FitModelToBudget": "Fit Model to VRAM Budget (QuantKit)",
}
