"""Memory Report (placeholder until its issue lands): passes inputs through."""


class MemoryReport:
    DESCRIPTION = "Shows where the memory goes: models, formats, devices and peaks."
    CATEGORY = "QuantKit"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"label": ("STRING", {"default": "", "tooltip": "A title for this report."})}}

    def report(self, label):
        return (label,)
