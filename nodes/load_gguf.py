"""Load GGUF Model (placeholder)."""


class LoadGGUF:
    DESCRIPTION = "Loads a GGUF diffusion model."
    CATEGORY = "QuantKit"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"gguf_name": ("STRING", {"default": "", "tooltip": "File name."})}}

    def load(self, gguf_name):
        raise NotImplementedError
